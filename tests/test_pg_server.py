"""The throwaway PostgreSQL server in pg_server.py works the way the postgres tests assume."""

import optuna
import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.postgres


def test_fresh_database_accepts_sqlalchemy_connections(pg_url):
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == pg_url.rsplit("/", 1)[1]
        # every test gets an empty database
        assert conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar_one() == 0
    engine.dispose()


def test_optuna_rdb_study_round_trips(pg_url):
    storage = optuna.storages.RDBStorage(pg_url)
    study = optuna.create_study(study_name="roundtrip", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=3)
    storage.remove_session()
    storage.engine.dispose()

    reloaded = optuna.load_study(study_name="roundtrip", storage=pg_url)
    assert len(reloaded.trials) == 3
    assert reloaded.best_value == max(t.value for t in study.trials)


def test_storage_survives_server_restart(pg_server, pg_url):
    # pool_pre_ping replaces pooled connections the restart killed; Optuna turns it on only for MySQL
    storage = optuna.storages.RDBStorage(pg_url, engine_kwargs={"pool_pre_ping": True})
    study = optuna.create_study(study_name="restart", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)

    pg_server.restart()
    assert pg_server.running

    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)
    assert len(optuna.load_study(study_name="restart", storage=storage).trials) == 2
    storage.engine.dispose()


def test_stopped_server_refuses_connections_then_start_recovers(pg_server, pg_url):
    engine = sa.create_engine(pg_url, pool_pre_ping=True)
    pg_server.stop()
    with pytest.raises(sa.exc.OperationalError):
        with engine.connect():
            pass
    pg_server.start()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    engine.dispose()


def test_wrong_password_is_rejected(pg_server, pg_url):
    dbname = pg_url.rsplit("/", 1)[1]
    engine = sa.create_engine(pg_server.url(dbname, password="not-the-password"))
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        with engine.connect():
            pass
    engine.dispose()
