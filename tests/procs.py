"""Process helpers shared by the executor tests."""
import signal
from pathlib import Path


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def fake_gcs_servers(under: str | Path) -> list[tuple[int, str]]:
    """(pid, command line) of live fake-gcs-server processes serving a directory under `under`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and b"fake-gcs-server" in args[0] and str(under).encode() in b" ".join(args) and alive(int(proc.name)):
            found.append((int(proc.name), b" ".join(args).decode(errors="replace")))
    return found


def default_sigint() -> None:
    """`preexec_fn` for a child a test sends Ctrl-C (SIGINT): a job started in the background by a
    shell (`cmd &`, some CI runners) runs with SIGINT ignored, its children inherit that, and the
    test's SIGINT would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
