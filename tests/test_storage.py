"""The storage layer under load, without torch: worker processes running worker.run_loop with a
trivial objective share one budget exactly on every storage, never draw the same point by
accident, and 48 of them fit a server with max_connections = 100."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from helpers import ROOT, assert_exact_budget, create_study, dropped_connection, storage_call, worker_groups
from optuna.trial import TrialState
from pg_server import launch_or_skip

from nkat_search.search import studies
from nkat_search.search.space import suggest
from nkat_search.search.study_file import load_study
from nkat_search.search.worker import Worker, run_loop
from nkat_search.storage import backends, urls

pytestmark = [pytest.mark.optuna_api]


@pytest.fixture
def workers(tmp_path):
    yield from worker_groups(tmp_path)


def storage_url(kind: str, tmp_path: Path, request) -> str:
    if kind == "journal":
        return f"journal:{tmp_path / 'study.journal'}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_processes_finish_exactly_the_budget_on_every_storage(kind, tmp_path, request, tiny_study, workers):
    url = storage_url(kind, tmp_path, request)
    create_study(url, tiny_study(), budget=10)
    group = workers(2, url, seconds=0.2, steps=2)
    group.release()
    assert group.wait(timeout=240) == [0, 0], group.output()
    trials = assert_exact_budget(optuna.load_study(study_name="tiny", storage=backends.open_storage(url)), 10)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
    assert not [t for t in trials if t.state == TrialState.FAIL]


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory) -> str:
    """One SQLite file for the module's studies (each test names its own study)."""
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'studies.db'}"


# Every call the worker loop makes into RDBStorage (Study and Trial reach some of them through
# Optuna's _CachedStorage, which calls the private methods), and how many of its statements fail.
STORAGE_CALLS = [
    *(
        (name, 1)
        for name in (
            "get_study_id_from_name",
            "get_study_user_attrs",
            "_get_stale_trial_ids",
            "get_trial",
            "get_trial_id_from_study_id_trial_number",
            "set_trial_user_attr",
            "set_trial_system_attr",
            "record_heartbeat",
            "set_trial_intermediate_value",
            "set_trial_state_values",
            "_create_new_trial",
        )
    ),
    *((name, 1) for name in ("_get_trials", "_set_trial_param")),
    # Optuna's _create_new_trial tries five times within a few seconds, then raises; the worker
    # loop waits for the database and asks again.
    ("_create_new_trial", 5),
]


@pytest.mark.slow
@pytest.mark.parametrize(("call", "drops"), STORAGE_CALLS)
def test_a_connection_dropped_in_any_storage_call_of_the_worker_loop_costs_no_trial(
    call, drops, sqlite_url, tiny_study
):
    # The connection drops at the first statement of that call (nothing of it landed), `drops`
    # times in a row: the worker must go on (retrying the call, or asking again) and fail no trial.
    config = load_study(tiny_study(name=f"{call.strip('_').replace('_', '-')}-{drops}"))
    store = backends.open_storage(sqlite_url)
    study = studies.create_or_resume(store, sqlite_url, config, 3)
    dropped = []

    def drop(conn, cursor, statement, parameters, context, executemany):
        if len(dropped) < drops and storage_call() == call:
            dropped.append(statement)
            raise dropped_connection(statement)

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", drop)

    def objective(trial):
        params = suggest(trial, config)
        trial.report(params["temperature"], 1)
        assert not trial.should_prune()
        return params["embed_dim"] * params["temperature"]

    assert run_loop(Worker(study, store, sqlite_url, config), objective, poll_seconds=0.1) == 0
    assert len(dropped) == drops, f"the worker loop called {call} {len(dropped)} times"
    trials = assert_exact_budget(study, 3)
    assert not [(t.number, t.user_attrs.get("fail_reason")) for t in trials if t.state == TrialState.FAIL]


def startup_only(path: str, budget: int) -> str:
    """The tiny study with every trial of the budget a TPE start-up trial (sampled independently)."""
    text = Path(path).read_text().replace("n_startup_trials = 2", f"n_startup_trials = {budget}")
    Path(path).write_text(text)
    return path


@pytest.mark.postgres
@pytest.mark.slow
def test_three_workers_never_draw_the_same_start_up_point(pg_url, tiny_study, workers):
    # A seed shared by every worker's sampler would make them all draw the same start-up points;
    # each trial gets its own seed instead (kinds.trial_seed).
    create_study(pg_url, startup_only(tiny_study(), 12), budget=12)
    group = workers(3, pg_url, seconds=0.3)
    group.release()
    assert group.wait(timeout=240) == [0, 0, 0], group.output()
    trials = assert_exact_budget(optuna.load_study(study_name="tiny", storage=backends.open_storage(pg_url)), 12)
    assert len({t.user_attrs["worker"] for t in trials}) == 3
    points = [(t.params["embed_dim"], t.params["temperature"]) for t in trials]
    assert len(set(points)) == len(points), points


def test_a_seeded_study_run_twice_by_one_worker_draws_the_same_points_in_the_same_order(tiny_study, tmp_path):
    config = load_study(tiny_study())  # seed 0; 2 start-up trials, then TPE

    def run(journal: str) -> list[dict]:
        url = f"journal:{tmp_path / journal}"
        store = backends.open_storage(url)
        study = studies.create_or_resume(store, url, config, 6)

        def objective(trial):
            params = suggest(trial, config)
            return params["embed_dim"] * params["temperature"]

        assert run_loop(Worker(study, store, url, config), objective, poll_seconds=0.05) == 0
        return [t.params for t in study.get_trials()]

    first, second = run("first.journal"), run("second.journal")
    assert len(first) == 6 and first == second
    assert len({p["temperature"] for p in first}) == 6


def _peak_connections(port: int, dbname: str, stop: threading.Event, peaks: dict) -> None:
    """Sample the database's connections until stop: the peak in all, and per application_name."""
    import psycopg
    from pg_server import PASSWORD, USER

    with psycopg.connect(
        host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="postgres", autocommit=True
    ) as conn:
        while not stop.is_set():
            rows = conn.execute(
                "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = %s GROUP BY application_name",
                (dbname,),
            ).fetchall()
            per_worker = {name: n for name, n in rows if name.startswith("worker-")}
            peaks["all"] = max(peaks.get("all", 0), sum(per_worker.values()))
            peaks["per_worker"] = max([peaks.get("per_worker", 0), *per_worker.values()])
            peaks["workers_connected"] = max(peaks.get("workers_connected", 0), len(per_worker))
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server_100():
    """A server of its own with max_connections = 100 (the session's allows 200)."""
    server = launch_or_skip(max_connections=100)
    yield server
    server.destroy()


@pytest.mark.long
@pytest.mark.postgres
@pytest.mark.slow
def test_48_workers_fit_a_server_with_100_connections_and_finish_the_budget_exactly(server_100, tiny_study, workers):
    count, budget = 48, 96
    url = server_100.create_database("many")
    # Start-up trials only, so that sampling stays cheap: this is the storage's test.
    store = backends.open_storage(url)
    studies.create_or_resume(store, url, load_study(startup_only(tiny_study(), budget)), budget)
    store.engine.dispose()  # the workers have the server to themselves (this process keeps its lock connection)
    # Each worker names itself (application_name), so the server tells its connections apart.
    group = workers(count, [f"{url}?application_name=worker-{i}" for i in range(count)], seconds=0.005)
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=_peak_connections, args=(server_100.port, "many", stop, peaks), daemon=True)
    sampler.start()
    try:
        group.release(timeout=600)
        codes = group.wait(timeout=600)
    finally:
        stop.set()
        sampler.join()
    assert codes == [0] * count, group.output(tail=1500)
    trials = assert_exact_budget(optuna.load_study(study_name="tiny", storage=backends.open_storage(url)), budget)
    assert not [t for t in trials if t.state == TrialState.FAIL]
    print(
        f"\n48 workers: peak {peaks['all']} connections in all, at most {peaks['per_worker']} per worker, "
        f"{peaks['workers_connected']} workers connected at once; "
        f"{len({t.user_attrs['worker'] for t in trials})} workers ran trials"
    )
    assert peaks["workers_connected"] == count
    assert (
        peaks["per_worker"] <= urls.POOL_SIZE + urls.POOL_OVERFLOW + urls.LOCK_CONNECTIONS
    )  # the bound storage.py states


# ---------------------------------------------------------------------------------------------
# URLs and messages: no piece of a password, nothing created by a mistake


AMBIGUOUS = [  # passwords holding '@' (and ':' or '/') that are not percent-encoded
    "postgresql+psycopg://nkat:SECRET@SECRET@127.0.0.1:1/x",
    "postgresql+psycopg://nkat:SECRET@SECRET:SECRET@127.0.0.1:1/x",
    "postgresql+psycopg://nkat:SECRET@SECRET/SECRET@127.0.0.1/x",
    "postgresql+psycopg://nkat:SECRET@SECRET@SECRET@localhost/x?sslmode=disable",
    "postgresql+psycopg://nkat:SECRET?SECRET@SECRET@127.0.0.1/x",
    "sqlite://nkat:SECRET@SECRET@host/x.db",
]


@pytest.mark.parametrize("url", AMBIGUOUS)
def test_a_url_whose_password_holds_an_at_sign_is_masked_whole_and_refused(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scheme = url.split("://")[0]
    assert urls.mask(url) == f"{scheme}://***"
    with pytest.raises(urls.UsageError) as err:
        backends.open_storage(url, create=True)
    message = str(err.value)
    assert "SECRET" not in message and f"{scheme}://***" in message and "%40" in message, message
    assert "SECRET" not in urls.mask_text(f"could not connect to {url} as nkat:SECRET@SECRET", url)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql+psycopg://nkat:pw@127.0.0.1:5432/x", "postgresql+psycopg://nkat:***@127.0.0.1:5432/x"),
        ("postgresql+psycopg://nkat:SE%40CRET@127.0.0.1/x", "postgresql+psycopg://nkat:***@127.0.0.1/x"),
        ("postgresql+psycopg://user@server:SECRET@host/x", "postgresql+psycopg://user%40server:***@host/x"),
        ("sqlite:///folder@home/study@1.db", "sqlite:///folder@home/study@1.db"),
    ],
)
def test_a_url_that_reads_one_way_is_shown_with_its_password_masked(url, shown):
    assert urls.mask(url) == shown
    assert urls.parse_url(url) is not None


def test_masking_a_message_leaves_its_words_alone_when_the_password_is_short():
    text = "connection to server at 127.0.0.1 failed: password authentication failed for user nkat"
    assert urls.mask_text(text, "postgresql+psycopg://nkat:e@127.0.0.1/x") == text
    assert (
        urls.mask_text("rejected hunter22 as a password", "postgresql://nkat:hunter22@h/x")
        == "rejected *** as a password"
    )


@pytest.mark.parametrize("create", [True, False])
def test_a_sqlite_file_that_is_not_a_database_is_named_and_left_alone(tmp_path, create):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(urls.UsageError) as err:
        backends.open_storage(f"sqlite:///{garbage}", create=create)
    message = str(err.value)
    assert "file is not a database" in message and "host" not in message and message.endswith("."), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.db"]  # no lock file beside it


def test_a_read_only_open_of_an_unreachable_server_gives_the_drivers_reason():
    with pytest.raises(urls.UsageError) as err:
        backends.open_storage("postgresql+psycopg://nkat:SECRET-pw@127.0.0.1:1/x", create=False)
    message = str(err.value)
    assert "Connection refused" in message and "An exception is raised" not in message, message
    assert "SECRET" not in message


@pytest.mark.parametrize("existing", [False, True])
def test_warm_start_from_an_unknown_study_is_refused_before_anything_is_created(tmp_path, existing):
    config = load_study(str(ROOT / "nkat_search" / "studies" / "smoke.toml"))
    url = f"journal:{tmp_path / 's.journal'}"
    if existing:
        studies.create_or_resume(backends.open_storage(url), url, config, 1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(urls.UsageError, match=r"--warm-start-from 'nope': no such study in .* \(it holds: none\)"):
        studies.check_warm_start_source(url, config, "nope")
    with pytest.raises(urls.UsageError, match="names the study itself"):
        studies.check_warm_start_source(url, config, config.name)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
