"""Many workers on one study in a real PostgreSQL: exact budget, racing starts, resume."""

import optuna
import pytest
from helpers import assert_exact_budget, cli, spawn

from nkat_search.storage import backends

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.optuna_api]


@pytest.mark.long
def test_three_workers_share_one_budget_exactly(pg_url, tiny_study):
    assert cli("start", "--study", tiny_study(trials=8), "--storage", pg_url, "--workers", "0").returncode == 0
    workers = [spawn("worker", "--storage", pg_url) for _ in range(3)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], outputs
    assert "nkat-test-pw" not in "".join(outputs)  # the password is masked in every line
    study = optuna.load_study(study_name="tiny", storage=backends.open_storage(pg_url))
    assert_exact_budget(study, 8)


def test_two_starts_racing_on_a_new_study_make_one_study(pg_url, tiny_study):
    path = tiny_study(trials=2)
    racers = [spawn("start", "--study", path, "--storage", pg_url, "--workers", "0") for _ in range(2)]
    outputs = [r.communicate(timeout=120)[0] for r in racers]
    assert [r.returncode for r in racers] == [0, 0], outputs
    assert optuna.get_all_study_names(backends.open_storage(pg_url)) == ["tiny"]


@pytest.mark.long
def test_resume_after_all_workers_stopped_reaches_the_new_budget(pg_url, tiny_study):
    path = tiny_study(trials=2)
    first = cli("start", "--study", path, "--storage", pg_url)
    assert first.returncode == 0, first.stderr
    more = cli("start", "--study", path, "--storage", pg_url, "--trials", "4")
    assert more.returncode == 0, more.stderr
    study = optuna.load_study(study_name="tiny", storage=backends.open_storage(pg_url))
    assert_exact_budget(study, 4)


def test_wrong_password_is_one_sentence_without_the_password(pg_server, tiny_study):
    url = pg_server.url("postgres", password="not-the-password")
    run = cli("start", "--study", tiny_study(), "--storage", url, "--workers", "0")
    assert run.returncode == 2
    assert "cannot open the storage" in run.stderr and "not-the-password" not in run.stderr
    assert "Traceback" not in run.stderr


def test_unreachable_database_fails_fast(tiny_study):
    import time

    started = time.monotonic()
    run = cli("status", "--storage", "postgresql+psycopg://u:secret@127.0.0.1:1/none")
    assert run.returncode == 2 and "secret" not in run.stderr and "cannot open the storage" in run.stderr
    assert time.monotonic() - started < 30
