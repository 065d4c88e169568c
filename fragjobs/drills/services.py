"""The drill's own services on spare ports of 127.0.0.1: Redis, PostgreSQL, moto's S3 server.

Each one is started here, can be stopped and started again on the same port with the same
data (the outage drills), and is stopped for good at the end:

* :class:`LocalRedis` — ``redis-server`` with a password. By default it keeps an append-only
  file in its folder, as the farm's compose file does (``--appendonly yes``), so a restart
  keeps queued and unacknowledged messages; ``persistence=False`` keeps everything in memory
  only (a restart then loses whatever was queued, whatever the farm does).
* :class:`LocalPostgres` — ``initdb`` into a temporary folder and ``pg_ctl`` on a spare port,
  with a password (scram-sha-256), listening on 127.0.0.1 only. PostgreSQL refuses to run
  as root: as root, its folder is given to the ``postgres`` user and ``initdb``/``pg_ctl`` run
  as that user (``runuser``).
* :class:`MotoS3` — moto's standalone S3 server in a process of its own.

Every wait is bounded; a service that does not come up raises :class:`ServiceError` with the
end of its log.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOCALHOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_POLL_S = 0.1


class ServiceError(RuntimeError):
    """A service of the drill could not be started, stopped or found."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def port_open(port: int, host: str = LOCALHOST) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (within a second)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path | None) -> None:
    """Wait until ``port`` accepts connections; raise if ``process`` exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {process.returncode}" if process.poll() is not None else "hung"
            raise ServiceError(f"{what} did not start ({state}){_tail(log)}")
        time.sleep(_POLL_S)


def stop_process(process: subprocess.Popen | None, *, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM ``process`` (its whole session), SIGKILL it if it outlives ``timeout``."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def _tail(log: Path | None, chars: int = 1500) -> str:
    if log is None or not log.is_file():
        return ""
    return ":\n" + log.read_text(errors="replace")[-chars:]


class LocalRedis:
    """``redis-server`` on a spare port of 127.0.0.1 with a password.

    Args:
        folder: its working folder (append-only file, log).
        persistence: keep an append-only file (fsync on every write), so that a restart keeps
            the queues; False: memory only.
    """

    def __init__(self, folder: Path, *, persistence: bool = True) -> None:
        self.folder = folder
        self.persistence = persistence
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        self.log = folder / "redis.log"

    def url(self, db: int = 0) -> str:
        """The ``redis://`` URL of database ``db``, with the password."""
        return f"redis://:{self.password}@{LOCALHOST}:{self.port}/{db}"

    def start(self) -> None:
        """Start the server (again, on the same port and folder); wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("redis-server is not on PATH (apt-get install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = [
            f"port {self.port}",
            f"bind {LOCALHOST}",
            "protected-mode yes",
            f"requirepass {self.password}",
            f'dir "{self.folder}"',
            f'logfile "{self.log}"',
            'save ""',
            f"appendonly {'yes' if self.persistence else 'no'}",
            "appendfsync always",
            "daemonize no",
        ]
        # The configuration (and so the password) travels on stdin, not on the command line.
        self.process = subprocess.Popen(
            [binary, "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.process.stdin.write(("\n".join(config) + "\n").encode())
        self.process.stdin.close()
        wait_for_port(self.port, self.process, "redis-server", self.log)
        self._wait_loaded()

    def _wait_loaded(self) -> None:
        """Wait until PING answers PONG (the append-only file is loaded)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((LOCALHOST, self.port), timeout=2) as conn,
            ):
                conn.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while reply.count(b"\r\n") < 2:
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    reply += chunk
                if b"+PONG" in reply:
                    return
            time.sleep(_POLL_S)
        raise ServiceError(f"redis-server on {self.port} does not answer PING{_tail(self.log)}")

    def stop(self) -> None:
        """Shut the server down cleanly (SIGTERM: the append-only file is flushed)."""
        stop_process(self.process)
        self.process = None


def postgres_bindir(given: str | None = None) -> Path:
    """The folder holding ``initdb``, ``pg_ctl``, ``createdb``: ``given``, PATH, or the newest
    ``/usr/lib/postgresql/<version>/bin``.

    Raises:
        ServiceError: none found.
    """
    candidates = [Path(given)] if given else []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    found = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in found), key=_version_key, reverse=True)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")):
            return folder
    raise ServiceError(
        "no PostgreSQL server binaries (initdb, pg_ctl, createdb) found: install postgresql "
        "or pass --pg-bindir /usr/lib/postgresql/<version>/bin"
    )


def _version_key(path: Path) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in path.parent.name).split()
    return tuple(int(d) for d in digits) or (0,)


class LocalPostgres:
    """A PostgreSQL cluster of its own in a temporary folder, on a spare port of 127.0.0.1.

    As root, the folder belongs to the ``postgres`` user and the server runs as that user.
    """

    USER = "fragjobs"
    DATABASE = "fragjobs"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.password = secrets.token_hex(16)
        # Not under the drill's folder: that may sit below folders the postgres user cannot
        # enter (a pytest tmp_path is 0700 root).
        self.folder = Path(tempfile.mkdtemp(prefix="fragjobs-drills-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._as_user: list[str] = []
        self.running = False

    @property
    def url(self) -> str:
        """The catalog's SQLAlchemy URL (psycopg 3)."""
        return (
            f"postgresql+psycopg://{self.USER}:{self.password}@{LOCALHOST}:{self.port}/"
            f"{self.DATABASE}"
        )

    def init(self) -> None:
        """``initdb`` (superuser :attr:`USER` with the password) and create the database."""
        password_file = self.folder / "pw"
        password_file.write_text(self.password + "\n")
        if os.geteuid() == 0:
            import pwd

            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServiceError(
                    "PostgreSQL refuses to run as root and there is no 'postgres' user to run "
                    "it as: run the drill as another user"
                ) from exc
            for path in (self.folder, password_file):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._run(
            "initdb",
            *("-D", str(self.data), "-U", self.USER, f"--pwfile={password_file}"),
            *("-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"),
        )
        password_file.unlink()
        self.start()
        self._run(
            "createdb",
            *("-h", LOCALHOST, "-p", str(self.port), "-U", self.USER, self.DATABASE),
            as_server=False,
        )

    def start(self) -> None:
        """Start the server (again) on the same port; wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses={LOCALHOST} -k {self.folder} -c fsync=off"
        self._run(
            "pg_ctl",
            *("-D", str(self.data), "-l", str(self.log), "-o", options),
            *("-w", "-t", str(int(START_TIMEOUT_S)), "start"),
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: sessions are cut, as a restart does)."""
        if not self.running:
            return
        self._run(
            "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(STOP_TIMEOUT_S)), "stop"
        )
        self.running = False

    def remove(self) -> None:
        """Stop the server at once if it runs, and delete its folder."""
        with contextlib.suppress(ServiceError, OSError, subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self, tool: str, *args: str, as_server: bool = True) -> None:
        command = [*(self._as_user if as_server else []), str(self.bindir / tool), *args]
        env = {**os.environ, "PGPASSWORD": self.password, "LC_ALL": "C"}
        try:
            done = subprocess.run(
                command,
                env=env,
                cwd=self.folder if as_server else None,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S + 30,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{tool} did not finish{_tail(self.log)}") from exc
        if done.returncode != 0:
            raise ServiceError(f"{tool} failed: {done.stderr.strip()[-1500:]}{_tail(self.log)}")


class MotoS3:
    """moto's standalone S3 server in a process of its own, on a spare port of 127.0.0.1."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.log = folder / "moto.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """The server's URL."""
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> None:
        """Start the server; wait until it accepts connections.

        Raises:
            ServiceError: it did not start (``pip install 'moto[server]'``).
        """
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOCALHOST, "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, self.process, "moto's S3 server (moto[server])", self.log)

    def stop(self) -> None:
        """Stop the server."""
        stop_process(self.process)
        self.process = None
