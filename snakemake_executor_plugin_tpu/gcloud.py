"""Pure builders of gcloud command lines and of the bash scripts they run on TPU VM hosts.

Nothing here runs anything, so every command line is unit-tested. argv lists are passed to
subprocess without a local shell; the remote `--command` is one argv element whose own quoting is
done with shlex. Remote paths are relative to the login home unless absolute (`~/` is allowed).
"""
from __future__ import annotations

import re
import shlex
from typing import Iterable, Mapping, Sequence

GCLOUD = "gcloud"
TPU_VM = ("compute", "tpus", "tpu-vm")
BUSY_CLEANUP = "rm -f /tmp/libtpu_lockfile || true; fuser -k /dev/vfio/* 2>/dev/null || true"


def format_workers(worker: int | str | Iterable[int]) -> str:
    """--worker value: one index, 'all', or a comma list of indices."""
    if isinstance(worker, str):
        if worker == "all" or re.fullmatch(r"\d+(,\d+)*", worker):
            return worker
        raise ValueError(f"--worker must be 'all', an index or a comma list of indices, got {worker!r}")
    if isinstance(worker, int):
        items = [worker]
    else:
        items = list(worker)
    if not items or any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in items):
        raise ValueError(f"--worker needs non-negative integer indices, got {worker!r}")
    return ",".join(str(w) for w in items)


def _location(zone: str, project: str | None) -> list[str]:
    return ["--zone", zone] + (["--project", project] if project else [])


def ssh_argv(name: str, zone: str, worker, command: str, project: str | None = None,
             extra: Sequence[str] = (), gcloud: str = GCLOUD) -> list[str]:
    return [gcloud, *TPU_VM, "ssh", name, *_location(zone, project), f"--worker={format_workers(worker)}",
            "--command", command, *extra]


def scp_to_argv(local: str, remote: str, name: str, zone: str, worker, project: str | None = None,
                recurse: bool = False, extra: Sequence[str] = (), gcloud: str = GCLOUD) -> list[str]:
    return [gcloud, *TPU_VM, "scp", *(["--recurse"] if recurse else []), local, f"{name}:{remote}",
            *_location(zone, project), f"--worker={format_workers(worker)}", *extra]


def scp_from_argv(remote: str, local: str, name: str, zone: str, worker, project: str | None = None,
                  recurse: bool = False, extra: Sequence[str] = (), gcloud: str = GCLOUD) -> list[str]:
    return [gcloud, *TPU_VM, "scp", *(["--recurse"] if recurse else []), f"{name}:{remote}", local,
            *_location(zone, project), f"--worker={format_workers(worker)}", *extra]


def describe_argv(name: str, zone: str, project: str | None = None, extra: Sequence[str] = (),
                  gcloud: str = GCLOUD) -> list[str]:
    return [gcloud, *TPU_VM, "describe", name, *_location(zone, project), "--format=json", *extra]


def create_argv(name: str, zone: str, accelerator: str, version: str, spot: bool = False,
                project: str | None = None, labels: Mapping[str, str] = {}, extra: Sequence[str] = (),
                gcloud: str = GCLOUD) -> list[str]:
    """`gcloud compute tpus tpu-vm create` as the runbook types it (waits until the VM is created)."""
    label = [f"--labels={','.join(f'{k}={v}' for k, v in labels.items())}"] if labels else []
    return [gcloud, *TPU_VM, "create", name, *_location(zone, project), f"--accelerator-type={accelerator}",
            f"--version={version}", *(["--spot"] if spot else []), *label, "--quiet", *extra]


def delete_argv(name: str, zone: str, project: str | None = None, extra: Sequence[str] = (),
                gcloud: str = GCLOUD) -> list[str]:
    return [gcloud, *TPU_VM, "delete", name, *_location(zone, project), "--quiet", *extra]


# environment variables whose values never appear in a log line
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)
_EXPORT = re.compile(r"""(export ([A-Za-z_][A-Za-z0-9_]*)=)('[^']*'|"[^"]*"|[^\s;]+)""")


def redact(text: str) -> str:
    """`export NAME=value` with a secret-looking NAME -> `export NAME=***`."""
    return _EXPORT.sub(lambda m: m.group(1) + "***" if SECRET_NAME.search(m.group(2)) else m.group(0), text)


def display(argv: Sequence[str]) -> str:
    """The command as a user would paste it into a shell (secret values masked)."""
    return shlex.join(redact(a) for a in argv)


# ---------------------------------------------------------------- remote bash scripts

def qpath(path: str) -> str:
    """Shell-quote a path but keep a leading `~/` meaning the home directory."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def home_relative(path: str) -> str:
    """A path for scp's remote side (relative paths are taken from the home directory)."""
    return path[2:] if path.startswith("~/") else path


def join_path(*parts: str) -> str:
    parts = [p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p and p != "."]
    return "/".join(parts) or "."


def worker_files(tag: str, worker: int) -> str:
    """Stem of a worker's files under logs/: .log (output), .exit (exit code), .pid (process group)."""
    return f"logs/{tag}_worker{worker}"


def env_exports(env: Mapping[str, str]) -> str:
    return "; ".join(f"export {k}={shlex.quote(str(v))}" for k, v in env.items())


# An env file as operators write it: CRLF line ends, blanks around lines and around `=` (a stray
# `\r` in WANDB_API_KEY breaks the login). Normalised before it is sourced; never printed.
NORMALISE_ENV = (r"sed -e 's/\r$//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "
                 r"-e 's/^\(export[[:space:]]\{1,\}\)\{0,1\}\([A-Za-z_][A-Za-z0-9_]*\)[[:space:]]*=[[:space:]]*/\2=/'")


def source_env_file(env_file: str | None) -> str:
    if not env_file:
        return ""
    q = qpath(env_file)
    return (f"if [ -f {q} ]; then set -a; eval \"$({NORMALISE_ENV} {q})\"; set +a; else "
            f"echo \"env_file {env_file} not found on this host; create it or drop env_file\" >&2; exit 4; fi")


def wrapped_command(command: str, exit_file: str, env: Mapping[str, str] = {}, env_file: str | None = None) -> str:
    """Run `command` with `env`, then write its exit code to `exit_file` (atomically)."""
    steps = [s for s in (source_env_file(env_file), env_exports(env)) if s]
    steps.append(f"( {command} )")
    ef = shlex.quote(exit_file)
    return "; ".join(steps) + f"; rc=$?; echo $rc > {ef}.tmp && mv -f {ef}.tmp {ef}; exit $rc"


def check_commit_script(workdir: str, sha: str) -> str:
    """Prints `have` when the host's checkout already contains the commit, else `need`."""
    w = qpath(workdir)
    return f"if git -C {w} cat-file -e {sha}^{{commit}} 2>/dev/null; then echo have; else echo need; fi"


def prepare_script(workdir: str, sha: str, code_sync: str, bundle: str | None = None,
                   env_file: str | None = None, setup_command: str | None = None,
                   busy_cleanup: bool = False) -> str:
    """Put the host's checkout at `sha`, run the setup command once per commit, free a busy TPU."""
    w = qpath(workdir)
    lines = ["set -e"]
    if busy_cleanup:
        lines.append(BUSY_CLEANUP)
    if bundle:
        lines.append(f"B=\"$PWD\"/{shlex.quote(bundle)}")
    lines.append(f"mkdir -p {w}")
    if code_sync != "none":
        lines.append(f"[ -d {w}/.git ] || git init -q {w}")
    lines.append(f"cd {w}")
    if code_sync == "bundle":
        lines.append(f"git cat-file -e {sha}^{{commit}} 2>/dev/null || git fetch -q \"$B\" HEAD")
    elif code_sync == "fetch":
        lines.append(f"git cat-file -e {sha}^{{commit}} 2>/dev/null || git fetch -q origin || git fetch -q origin {sha}")
    if code_sync != "none":
        lines.append(f"git checkout -q --detach {sha} || {{ echo \"cannot check out {sha} in {workdir} on this "
                     "host (local changes there?); clean that checkout and retry\" >&2; exit 3; }")
    if bundle:
        lines.append("rm -f \"$B\"")
    if setup_command:
        marker = f".sidrl_setup_{sha}"
        log = f"logs/setup_{sha[:12]}.log"
        inner = "; ".join(s for s in (source_env_file(env_file), setup_command) if s)
        lines += [
            "mkdir -p logs",
            f"if [ ! -f {marker} ]; then ( {inner} ) > {log} 2>&1 || {{ echo \"setup_command failed "
            f"(exit $?), see {workdir}/{log}:\" >&2; tail -n 30 {log} >&2; exit 5; }}; touch {marker}; fi",
        ]
    lines.append("echo prepared")
    return "\n".join(lines)


def start_script(rundir: str, tag: str, worker: int, command: str, env: Mapping[str, str],
                 env_file: str | None = None) -> str:
    """Start one host's process under nohup in its own session; returns at once."""
    stem = worker_files(tag, worker)
    inner = wrapped_command(command, f"{stem}.exit", env, env_file)
    return "\n".join([
        "set -e",
        f"cd {qpath(rundir)}",
        "mkdir -p logs",
        f"rm -f {stem}.exit {stem}.log {stem}.pid",
        f"setsid nohup bash -c {shlex.quote(inner)} > {stem}.log 2>&1 < /dev/null &",
        f"echo $! > {stem}.pid",
        "echo started",
    ])


def poll_script(rundir: str, tag: str, worker: int) -> str:
    """Prints `state exit N`, `state running` or `state lost` (gone without an exit code)."""
    stem = worker_files(tag, worker)
    return "\n".join([
        f"cd {qpath(rundir)} 2>/dev/null || {{ echo 'state lost'; exit 0; }}",
        f"if [ -f {stem}.exit ]; then echo \"state exit $(cat {stem}.exit)\"",
        f"elif [ -f {stem}.pid ] && {ALIVE.format(pgid=f'$(cat {stem}.pid)')}; then echo 'state running'",
        f"elif [ -f {stem}.exit ]; then echo \"state exit $(cat {stem}.exit)\"",
        "else echo 'state lost'; fi",
    ])


# a process group is alive while it has a member that is not a zombie (reaping may lag after a kill)
ALIVE = "ps -e -o pgid=,stat= | awk -v g=\"{pgid}\" '$1 == g && $2 !~ /^Z/ {{f = 1}} END {{exit !f}}'"


def _self_safe_pattern(text: str) -> str:
    """A pkill -f regex for `text` that does not match the shell running it ([l]ogs/... trick)."""
    return f"[{text[0]}]{re.escape(text[1:])}"


def kill_script(rundir: str, tag: str, worker: int, grace_s: float = 3) -> str:
    """Stop a host's process group (TERM, then KILL) and anything still carrying the job tag."""
    stem = worker_files(tag, worker)
    pattern = shlex.quote(_self_safe_pattern(f"{stem}.exit"))
    return "\n".join([
        f"cd {qpath(rundir)} 2>/dev/null || exit 0",
        f"pg=$(cat {stem}.pid 2>/dev/null || true)",
        "[ -n \"$pg\" ] && kill -TERM -- -\"$pg\" 2>/dev/null",
        f"pkill -TERM -f {pattern} 2>/dev/null",
        f"sleep {grace_s:g}",
        "[ -n \"$pg\" ] && kill -KILL -- -\"$pg\" 2>/dev/null",
        f"pkill -KILL -f {pattern} 2>/dev/null",
        "echo killed",
    ])


def tail_script(rundir: str, tag: str, worker: int, lines: int = 40) -> str:
    stem = worker_files(tag, worker)
    return f"cd {qpath(rundir)} 2>/dev/null && tail -n {int(lines)} {stem}.log 2>/dev/null || echo '(no log on this host)'"


def parse_state(stdout: str) -> tuple[str, int | None]:
    """('exit', code) | ('running', None) | ('lost', None) from poll_script output."""
    for line in reversed(stdout.splitlines()):
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "state":
            if parts[1] == "exit" and len(parts) == 3 and re.fullmatch(r"-?\d+", parts[2]):
                return "exit", int(parts[2])
            if parts[1] in ("running", "lost"):
                return parts[1], None
    raise ValueError(f"unexpected poll output: {stdout.strip()[-200:]!r}")
