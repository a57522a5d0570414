"""The private database servers of tests/dbservers.py: data survives restarts, stops and kill -9."""

import pytest
import sqlalchemy as sa

from search.storage import normalize_url
from tests.dbservers import PrivateDB, PrivatePostgres


def _rows(engine: sa.Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT id, note FROM t ORDER BY id"))]


def _insert(engine: sa.Engine, i: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO t (id, note) VALUES (:i, :n)"), {"i": i, "n": f"row {i}"})


@pytest.mark.parametrize("private_db", ["postgresql", "mysql"], indirect=True)
def test_rows_survive_restart_stop_and_kill9(private_db: PrivateDB) -> None:
    url, server = private_db
    assert url.startswith(("postgresql://postgres@127.0.0.1:", "mysql+pymysql://root@127.0.0.1:"))
    engine = sa.create_engine(normalize_url(url), pool_pre_ping=True)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, note VARCHAR(20))"))
        _insert(engine, 1)

        server.restart()
        assert _rows(engine) == [(1, "row 1")]  # pre-ping replaces the pooled connection the restart closed
        _insert(engine, 2)

        server.stop("immediate")
        assert not server.is_running()
        with pytest.raises(sa.exc.OperationalError):
            _rows(engine)
        server.start()
        _insert(engine, 3)

        server.kill9()
        assert not server.is_running()
        server.start()
        assert _rows(engine) == [(1, "row 1"), (2, "row 2"), (3, "row 3")]

        fresh = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
        assert _rows(fresh) == _rows(engine)
        fresh.dispose()
    finally:
        engine.dispose()


@pytest.mark.parametrize("private_db", ["postgresql", "mysql"], indirect=True)
def test_terminate_backends_cuts_open_connections(private_db: PrivateDB) -> None:
    url, server = private_db
    engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
    conn = engine.connect()
    try:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        assert server.terminate_backends(url.rsplit("/", 1)[1]) == 1
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT 1"))
    finally:
        conn.close()
        engine.dispose()
    server.kill9()  # left down on purpose: the fixture starts it again for the next test and drops the database


@pytest.mark.parametrize("private_db", ["postgresql", "mysql"], indirect=True)
def test_a_server_left_killed_is_running_again(private_db: PrivateDB) -> None:
    url, server = private_db
    assert server.is_running()
    with sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool).connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1


def test_standalone_server_is_deleted_on_close() -> None:
    with PrivatePostgres() as server:
        root = server.root
        assert server.is_running()
        server.kill9()
        (server.data / "postmaster.pid").write_text("1\n")  # a stale pid file naming a live process that isn't ours
        server.start()
        assert server.is_running()
    assert not root.exists()
