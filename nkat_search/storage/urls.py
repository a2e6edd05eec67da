"""Storage URLs: resolution (flag, environment, embedded default), masking, opening with heartbeats
and safe retries, the per-study lock that keeps the trial budget exact across workers, and the
study's definition, budget and warm starts in the storage.

This module and cli.py are the only places that read environment variables. It imports no torch.
"""

from __future__ import annotations

import logging

from .. import settings
from ..config import UsageError

log = logging.getLogger("nkat_search")


ENV_STORAGE = "NKAT_SEARCH_STORAGE"


# The embedded default: Optuna's journal file storage, safe for several local processes.
DEFAULT_URL = "journal:nkat-search.journal"


RDB_SCHEMES = ("postgresql", "sqlite")


SECRET_WORDS = ("pass", "pwd", "secret", "token", "key")  # query parameters that can hold a credential


# One worker process holds at most this many database connections: the pool of the storage (the
# trial and its heartbeat thread) and one for the budget lock.
POOL_SIZE, POOL_OVERFLOW, LOCK_CONNECTIONS = 1, 1, 1


def resolve_url(flag: str | None) -> str:
    """--storage, else $NKAT_SEARCH_STORAGE, else the journal file in the working directory."""
    if flag is not None:
        if not flag.strip():
            raise UsageError(
                "--storage is empty (an unset variable in a script?); pass a storage URL such as "
                "journal:FILE or postgresql+psycopg://user@host/db."
            )
        return flag.strip()
    env = settings.get(ENV_STORAGE)
    if env is not None and not env.strip():
        raise UsageError(f"${ENV_STORAGE} is set but empty; set it to a storage URL or unset it.")
    return env.strip() if env else DEFAULT_URL


def parse_url(url: str):
    """SQLAlchemy's reading of a database URL, or None where it cannot be read unambiguously: it does
    not parse, or a password holds an '@' that is not percent-encoded. SQLAlchemy splits
    user:p@ss@host at the first '@' and would take the rest of the password for the host (or its
    port, or the database name), so no part of such a URL can be shown."""
    import sqlalchemy.engine

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        return None
    if parsed.password is not None and ("@" in (parsed.host or "") or "@" in (parsed.database or "")):
        return None
    return parsed


def mask(url: str) -> str:
    """The URL with any password replaced by ***, for every log line and message.

    Parsed with SQLAlchemy's URL parser, never a regular expression; what cannot be read (see
    parse_url) is shown as its scheme only, since any other part could hold a credential."""
    if url.startswith("journal:"):
        return url
    parsed = parse_url(url)
    if parsed is None:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        return f"{scheme}://***" if scheme.replace("+", "").isalnum() else "***"
    if parsed.password is None and "@" in url.split("://", 1)[-1].split("/", 1)[0] and parsed.username is None:
        return f"{parsed.drivername}://***"
    secret = {k: "***" for k in parsed.query if any(word in k.lower() for word in SECRET_WORDS)}
    if parsed.password is None and not secret:
        return url  # as the user wrote it (SQLAlchemy would percent-encode an '@' in a file name)
    return parsed.set(query={**parsed.query, **secret}).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


# A password shorter than this is not searched for in messages: replacing every "pw" or "a" would
# mangle the words around it (and a driver's message does not quote a password).
MIN_MASKED = 4


def mask_text(text: str, url: str) -> str:
    """text (a driver's error message, say) with the URL and its password masked wherever they appear."""
    text = text.replace(url, mask(url))
    parsed = parse_url(url)
    if parsed is not None:
        secrets = [str(parsed.password or "")]
    else:  # the user part as written, and its pieces between '@' and ':'
        user = url.split("://", 1)[-1].rpartition("@")[0]
        secrets = [user, *user.replace(":", "@").split("@")]
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_MASKED:
            text = text.replace(secret, "***")
    return text


def heartbeat_settings() -> tuple[int, int, float]:
    """(heartbeat interval, grace period, database retry bound) in seconds, from
    NKAT_SEARCH_HEARTBEAT_INTERVAL (10), NKAT_SEARCH_GRACE_PERIOD (90) and NKAT_SEARCH_DB_RETRY_SECONDS (60).

    A worker waits for a database that went away for up to the retry bound, missing its heartbeats
    meanwhile; others must not take its trial for dead before it gives up: grace > bound + interval."""
    names = ("NKAT_SEARCH_HEARTBEAT_INTERVAL", "NKAT_SEARCH_GRACE_PERIOD", "NKAT_SEARCH_DB_RETRY_SECONDS")
    values = []
    for name in names:
        text = settings.get(name)
        assert text is not None  # all three have defaults in settings.SETTINGS
        try:
            values.append(int(text))
        except ValueError:
            raise UsageError(f"{name} must be a whole number of seconds, got {text!r}.") from None
    interval, grace, bound = values
    if interval < 1 or bound < 0:
        raise UsageError("NKAT_SEARCH_HEARTBEAT_INTERVAL must be >= 1 s and NKAT_SEARCH_DB_RETRY_SECONDS >= 0 s.")
    if grace <= bound + interval:
        raise UsageError(
            f"NKAT_SEARCH_GRACE_PERIOD ({grace} s) must be longer than NKAT_SEARCH_DB_RETRY_SECONDS "
            f"({bound} s) plus NKAT_SEARCH_HEARTBEAT_INTERVAL ({interval} s), or a worker waiting for "
            f"the database is taken for dead; raise the grace period above {bound + interval} s."
        )
    return interval, grace, float(bound)


class NoStudies(UsageError):
    """A command that only reads was pointed at a storage that does not exist yet (no file, no schema)."""


def journal_path(url: str) -> str | None:
    return url[len("journal:") :] if url.startswith("journal:") else None


def sqlite_path(url: str) -> str | None:
    """The database file of a sqlite URL; None for other schemes and for an in-memory database."""
    if not url.startswith("sqlite"):
        return None
    import sqlalchemy.engine

    database = sqlalchemy.engine.make_url(url).database
    return None if not database or database == ":memory:" else database
