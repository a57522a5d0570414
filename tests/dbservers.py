"""Private PostgreSQL and MariaDB servers that tests (and benchmarks) may restart, stop and kill.

The shared servers on 127.0.0.1:5432 / :3306 must never be restarted, so everything that needs a database
to go away under a running study starts its own server here: a fresh data folder under the temp folder, a
free TCP port on 127.0.0.1 (kept across restarts), trust / empty-password auth, small buffers, no fsync.

    with PrivatePostgres() as server:         # or PrivateMariaDB(); start() is implicit in `with`
        url = server.create_database()        # postgresql://postgres@127.0.0.1:PORT/hw4_xxx (bare dialect:
        ...                                   #   search.storage.normalize_url picks the driver)
        server.restart()                      # pg_ctl stop -m fast + start; MariaDB: SIGTERM + start
        server.stop("immediate"); server.start()   # no checkpoint: crash recovery on start
        server.kill9(); server.start()        # SIGKILL the server and its children, start on the same data
        server.terminate_backends("hw4_xxx")  # drop every other connection to that database
    # close() (end of `with`): stopped, data folder deleted

MariaDB URLs read mysql+pymysql://root@127.0.0.1:PORT/NAME. Both classes raise ServerUnavailable, with the
tail of the server's log, when the binaries are missing or a server does not accept connections in 30 s.
As root, PostgreSQL runs as user `postgres` (runuser) and MariaDB as root (--user=root).

pytest: each kind starts at most once per test session (server_factory(kind), cached) and every server
started is stopped and deleted at the end of the session, whatever the tests did. `private_db` gives each
test a fresh database on a running server (a server a test left stopped or killed is started again first)
and drops it afterwards; it defaults to both kinds, or pick them:

    from tests.dbservers import private_db  # noqa: F401  (fixture; tests/conftest.py imports it already)

    @pytest.mark.parametrize("private_db", ["postgresql", "mysql"], indirect=True)
    def test_x(private_db):
        url, server = private_db              # server: restart() / stop() / start() / kill9() / terminate_backends()

`private_server` (import it the same way) gives just the running server of each kind. Missing binaries
FAIL these fixtures, they never skip.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


class ServerUnavailable(RuntimeError):
    """A private server could not be set up, started or stopped (the message says why, with its log tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_root() -> bool:
    return os.geteuid() == 0


def _alive(pid: int | None) -> bool:
    """True while pid is a process that is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not Path("/proc").is_dir()  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Every descendant of pid (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int | None, timeout: float = 10.0) -> None:
    """SIGKILL pid, its process group when it leads one, and all its descendants; wait until they are gone."""
    if not _alive(pid):
        return
    assert pid is not None
    victims = [pid, *_children(pid)]
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(v) for v in victims):
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"processes {[v for v in victims if _alive(v)]} survived SIGKILL")
        time.sleep(0.01)


def _reap(root: str, state: dict) -> None:
    """Last resort (garbage collection or interpreter exit without close()): kill the server, delete its folder."""
    proc = state.get("proc")
    try:
        _kill_tree(state.get("pid"))
        if proc is not None:
            proc.wait(timeout=10)
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
    shutil.rmtree(root, ignore_errors=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:]) or "(log is empty)"


class _PrivateServer:
    """What PrivatePostgres and PrivateMariaDB share: a temp folder, a port, the lifecycle around start/stop."""

    kind = ""
    url_template = ""
    admin_db = ""

    def __init__(self, base_dir: str | Path | None = None, port: int | None = None) -> None:
        self._find_binaries()
        self.root = Path(tempfile.mkdtemp(prefix=f"hw4_{self.kind}_", dir=base_dir))
        self.port = port or free_port()
        self.log = self.root / "server.log"
        self._state: dict = {"pid": None, "proc": None}
        self._finalizer = weakref.finalize(self, _reap, str(self.root), self._state)
        self.closed = False

    # -- to provide per kind --
    def _find_binaries(self) -> None:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self, mode: str) -> None:
        raise NotImplementedError

    def _pid(self) -> int | None:
        raise NotImplementedError

    def _connect(self, dbname: str | None = None, timeout: float = 5.0):
        """A DB-API connection in autocommit mode, as the admin user."""
        raise NotImplementedError

    def _quote(self, name: str) -> str:
        raise NotImplementedError

    # -- lifecycle --
    def is_running(self) -> bool:
        return _alive(self._pid())

    def start(self) -> _PrivateServer:
        """Start the server (a no-op when it runs) and wait until it accepts a real connection."""
        if self.closed:
            raise ServerUnavailable(f"{self.kind} server at {self.root} is closed")
        if not self.is_running():
            self._start()
            self._state["pid"] = self._pid()
        self._wait_ready()
        return self

    def stop(self, mode: str = "fast") -> None:
        """Shut down: "fast" (clean: checkpoint) or "immediate" (no checkpoint: crash recovery on the next start)."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"stop mode {mode!r}: use 'fast' or 'immediate'")
        if self.is_running():
            self._stop(mode)
        self._state["pid"] = None

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill9(self) -> None:
        """SIGKILL the server and all its processes, as a crash would; start() brings it back on the same data."""
        _kill_tree(self._pid())
        proc = self._state.get("proc")
        if proc is not None:
            proc.wait(timeout=10)
        self._state["pid"] = None

    def ensure_running(self) -> None:
        """Start the server if a test left it stopped or killed."""
        if not self.is_running():
            self.start()

    def close(self) -> None:
        """Stop the server and delete its data folder (idempotent)."""
        if self.closed:
            return
        try:
            if self.is_running():
                self.stop("immediate")
        except Exception:  # noqa: BLE001 - deleting it anyway
            pass
        self.closed = True
        self._finalizer()  # kills whatever is left, deletes the folder

    def __enter__(self) -> _PrivateServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 127.0.0.1:{self.port} {'running' if self.is_running() else 'down'}>"

    # -- databases --
    def url(self, name: str) -> str:
        return self.url_template.format(port=self.port, name=name)

    def create_database(self, name: str | None = None) -> str:
        """Create a new empty database (a unique name unless given) and return its URL."""
        name = name or f"hw4_{uuid.uuid4().hex[:12]}"
        self._execute(f"CREATE DATABASE {self._quote(name)}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        raise NotImplementedError

    def terminate_backends(self, dbname: str) -> int:
        """Close every other connection to dbname, as a server-side kill would; returns how many."""
        raise NotImplementedError

    def _execute(self, sql: str, params: tuple = (), dbname: str | None = None) -> list[tuple]:
        conn = self._connect(dbname)
        try:
            cur = conn.cursor()
            cur.execute(sql, params or None)
            rows = list(cur.fetchall()) if cur.description else []
            cur.close()
            return rows
        finally:
            conn.close()

    def _wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._connect(timeout=2).close()
                return
            except Exception as e:  # noqa: BLE001 - any failure to connect means "not yet"
                error = e
            proc = self._state.get("proc")
            if proc is not None and proc.poll() is not None:
                raise ServerUnavailable(f"{self.kind} server at {self.root} exited with code {proc.returncode} "
                                        f"while starting; log tail:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{self.kind} server on 127.0.0.1:{self.port} did not accept connections "
                                        f"within {timeout:.0f} s ({error}); log tail:\n{self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        return _tail(self.log)


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise ServerUnavailable("PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/pg_ctl, no pg_ctl "
                            "and initdb on PATH): install them, e.g. apt-get install postgresql")


class PrivatePostgres(_PrivateServer):
    """A PostgreSQL server of our own: initdb in a temp folder, pg_ctl -w to start and stop it."""

    kind = "postgresql"
    url_template = "postgresql://postgres@127.0.0.1:{port}/{name}"
    admin_db = "postgres"

    def _find_binaries(self) -> None:
        self.bin = _postgres_bin()

    def __init__(self, base_dir: str | Path | None = None, port: int | None = None) -> None:
        super().__init__(base_dir, port)
        self.data = self.root / "data"
        if _is_root():
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if _is_root():
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def _initdb(self) -> None:
        done = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                         "--no-locale", "--no-sync", "--no-instructions")
        if done.returncode != 0:
            raise ServerUnavailable(f"initdb failed in {self.data}:\n{done.stdout}{done.stderr}")
        # fsync off: a commit still reaches the OS (synchronous_commit stays on), so it survives kill -9 of the
        # server, just not of the machine
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"""
# private test server (tests/dbservers.py)
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.root}'
fsync = off
full_page_writes = off
shared_buffers = 16MB
max_connections = 100
huge_pages = off
logging_collector = off
""")

    def _pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if "postgres" in _cmdline(pid) else None  # a stale file's pid may be someone else's now

    def _clear_stale_locks(self) -> None:
        """After a kill -9 the pid and socket lock files stay; a reused pid in them would block the next start."""
        for lock in (self.data / "postmaster.pid", self.root / f".s.PGSQL.{self.port}.lock"):
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                continue
            if not _alive(pid) or "postgres" not in _cmdline(pid):
                lock.unlink(missing_ok=True)

    def _start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        self._clear_stale_locks()
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(START_TIMEOUT)),
                         "start", timeout=START_TIMEOUT + 10)
        if done.returncode != 0:
            raise ServerUnavailable(f"pg_ctl start failed ({done.stdout.strip()} {done.stderr.strip()}); "
                                    f"log tail:\n{self._log_tail()}")

    def _stop(self, mode: str) -> None:
        done = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(STOP_TIMEOUT)), "stop",
                         timeout=STOP_TIMEOUT + 10)
        if done.returncode != 0 and self.is_running():
            raise ServerUnavailable(f"pg_ctl stop -m {mode} failed ({done.stdout.strip()} {done.stderr.strip()}); "
                                    f"log tail:\n{self._log_tail()}")

    def _connect(self, dbname: str | None = None, timeout: float = 5.0):
        kwargs = {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": dbname or self.admin_db,
                  "connect_timeout": max(1, int(timeout))}
        try:
            import psycopg2
        except ImportError:
            import psycopg

            return psycopg.connect(**kwargs, autocommit=True)
        conn = psycopg2.connect(**kwargs)
        conn.autocommit = True
        return conn

    def _quote(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def drop_database(self, name: str) -> None:
        self._execute(f"DROP DATABASE IF EXISTS {self._quote(name)} WITH (FORCE)")

    def terminate_backends(self, dbname: str) -> int:
        rows = self._execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        return sum(bool(r[0]) for r in rows)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _which(*names: str, dirs: tuple[str, ...] = ("/usr/sbin", "/usr/bin", "/usr/local/bin")) -> str | None:
    for name in names:
        found = shutil.which(name) or next((f"{d}/{name}" for d in dirs if os.access(f"{d}/{name}", os.X_OK)), None)
        if found:
            return found
    return None


class PrivateMariaDB(_PrivateServer):
    """A MariaDB server of our own: mariadb-install-db in a temp folder, mariadbd run as our child process."""

    kind = "mysql"
    url_template = "mysql+pymysql://root@127.0.0.1:{port}/{name}"
    admin_db = ""

    def _find_binaries(self) -> None:
        self.mariadbd = _which("mariadbd", "mysqld")
        self.install_db = _which("mariadb-install-db", "mysql_install_db")
        if not self.mariadbd or not self.install_db:
            raise ServerUnavailable("MariaDB server binaries not found (mariadbd / mysqld and mariadb-install-db): "
                                    "install them, e.g. apt-get install mariadb-server")

    def __init__(self, base_dir: str | Path | None = None, port: int | None = None) -> None:
        super().__init__(base_dir, port)
        self.data = self.root / "data"
        self.socket = self.root / "mysqld.sock"
        self.pidfile = self.root / "mysqld.pid"
        self.log = self.root / "error.log"

    def _options(self) -> list[str]:
        """Server options after --no-defaults: small, fast, not durable against an OS crash (fine for tests)."""
        return [
            f"--datadir={self.data}", *(["--user=root"] if _is_root() else []),
            "--skip-name-resolve", "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=16M", "--innodb-log-buffer-size=4M",
            "--innodb-flush-log-at-trx-commit=2", "--innodb-doublewrite=0", "--innodb-use-native-aio=0",
            "--innodb-buffer-pool-load-at-startup=0", "--innodb-buffer-pool-dump-at-shutdown=0",
            "--performance-schema=0", "--max-connections=200", "--key-buffer-size=1M",
        ]

    def _install(self) -> None:
        done = subprocess.run(
            [self.install_db, "--no-defaults", *self._options(), "--auth-root-authentication-method=normal",
             "--skip-test-db"],
            cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not (self.data / "mysql").is_dir():
            raise ServerUnavailable(f"{self.install_db} failed in {self.data}:\n{done.stdout}{done.stderr}")

    def _pid(self) -> int | None:
        proc = self._state.get("proc")
        return proc.pid if proc is not None and proc.poll() is None else None

    def _start(self) -> None:
        if not (self.data / "mysql").is_dir():
            self._install()
        for stale in (self.pidfile, self.socket, Path(f"{self.socket}.lock")):
            stale.unlink(missing_ok=True)
        with (self.root / "stdout.log").open("ab") as out:
            self._state["proc"] = subprocess.Popen(
                [self.mariadbd, "--no-defaults", *self._options(), f"--port={self.port}", "--bind-address=127.0.0.1",
                 f"--socket={self.socket}", f"--pid-file={self.pidfile}", f"--log-error={self.log}",
                 "--port-open-timeout=10"],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _stop(self, mode: str) -> None:
        proc = self._state["proc"]
        if mode == "immediate":  # InnoDB's "as if it crashed": no page flush, crash recovery on the next start
            try:
                self._execute("SET GLOBAL innodb_fast_shutdown = 2")
            except Exception:  # noqa: BLE001 - SIGTERM it anyway
                pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise ServerUnavailable(f"mariadbd did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM (killed); "
                                    f"log tail:\n{self._log_tail()}") from None

    def _connect(self, dbname: str | None = None, timeout: float = 5.0):
        import pymysql

        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", database=dbname or None,
                               connect_timeout=max(1, int(timeout)), autocommit=True)

    def _quote(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def drop_database(self, name: str) -> None:
        self.terminate_backends(name)  # DROP would wait on their metadata locks
        self._execute(f"DROP DATABASE IF EXISTS {self._quote(name)}")

    def terminate_backends(self, dbname: str) -> int:
        import pymysql

        conn = self._connect()
        killed = 0
        try:
            cur = conn.cursor()
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()",
                        (dbname,))
            for (thread_id,) in cur.fetchall():
                try:
                    cur.execute(f"KILL {int(thread_id)}")
                    killed += 1
                except pymysql.MySQLError:  # gone in between
                    pass
        finally:
            conn.close()
        return killed


# ---------------------------------------------------------------- pytest

KINDS = ("postgresql", "mysql")
SERVER_CLASSES: dict[str, type[_PrivateServer]] = {"postgresql": PrivatePostgres, "mysql": PrivateMariaDB}
_SERVERS: dict[str, _PrivateServer] = {}


def close_all_servers() -> None:
    """Stop and delete every server server_factory started (at the end of a test session, and at exit)."""
    while _SERVERS:
        _, server = _SERVERS.popitem()
        server.close()


atexit.register(close_all_servers)


def server_factory(kind: str) -> _PrivateServer:
    """The running private server of this kind ("postgresql" or "mysql"), started once per process."""
    if kind not in SERVER_CLASSES:
        raise ValueError(f"private server kind {kind!r}: use one of {', '.join(KINDS)}")
    server = _SERVERS.get(kind)
    if server is None:
        server = _SERVERS[kind] = SERVER_CLASSES[kind]()
    server.ensure_running()
    return server


_cleanup_registered: set[int] = set()


def _session_server(request: pytest.FixtureRequest, kind: str | None) -> _PrivateServer:
    if id(request.config) not in _cleanup_registered:
        _cleanup_registered.add(id(request.config))
        request.config.add_cleanup(close_all_servers)
    if kind not in SERVER_CLASSES:
        pytest.fail(f"private server kind {kind!r}: parametrize with one of {list(KINDS)}", pytrace=False)
    try:
        return server_factory(kind)
    except ServerUnavailable as e:
        pytest.fail(f"private {kind} server unavailable: {e}", pytrace=False)


class PrivateDB(NamedTuple):
    url: str
    server: _PrivateServer


@pytest.fixture(params=KINDS)
def private_db(request: pytest.FixtureRequest) -> Iterator[PrivateDB]:
    """(url, server): a fresh database on a running private server of kind request.param, dropped afterwards."""
    server = _session_server(request, getattr(request, "param", None))
    url = server.create_database()
    yield PrivateDB(url, server)
    server.ensure_running()
    server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(params=KINDS)
def private_server(request: pytest.FixtureRequest) -> _PrivateServer:
    """The running private server of kind request.param (shared by the session; restarted if left down)."""
    return _session_server(request, getattr(request, "param", None))
