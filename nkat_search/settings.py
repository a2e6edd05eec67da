"""Every NKAT_SEARCH_* environment variable: its name, default and meaning, and the one function that
reads it. It imports nothing of ours; modules that need a setting call `get`."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None  # None: unset means "not given" (the caller decides)
    meaning: str


SETTINGS = {
    s.name: s
    for s in (
        Setting(
            "NKAT_SEARCH_STORAGE",
            None,
            "storage URL when --storage is not given; unset: the journal file nkat-search.journal",
        ),
        Setting("NKAT_SEARCH_STUDY", None, "study name when --study is not given and the storage holds several"),
        Setting(
            "NKAT_SEARCH_DATA_ROOT",
            None,
            "folder of the real datasets when --data-root is not given; unset: the study file's data.root",
        ),
        Setting("NKAT_SEARCH_ARTIFACTS", "artifacts", "folder of the artifact store for the report's weights"),
        Setting("NKAT_SEARCH_HEARTBEAT_INTERVAL", "10", "seconds between a running trial's heartbeats"),
        Setting(
            "NKAT_SEARCH_GRACE_PERIOD",
            "90",
            "seconds without a heartbeat after which a trial's worker is taken for dead",
        ),
        Setting("NKAT_SEARCH_DB_RETRY_SECONDS", "60", "seconds a worker waits for a database that went away"),
    )
}


def get(name: str) -> str | None:
    """The variable's value as set (an empty value included), else its default."""
    return os.environ.get(name, SETTINGS[name].default)


def given(name: str) -> str | None:
    """The variable's value where it is set and not blank, else its default."""
    value = os.environ.get(name, "").strip()
    return value or SETTINGS[name].default
