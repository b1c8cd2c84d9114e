"""Backend `local`: the hosts of a slice are local processes (a multi-host slice simulated on one machine).

Host 0 runs the Snakemake job in the workflow directory; followers run in fresh, empty scratch
directories, so a follower that touches a file fails the same way it would on a real TPU host.
Per-worker logs and exit-code files go to `.snakemake/tpu/<jobid>/worker<i>.{log,exit}`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

from snakemake_executor_plugin_tpu.gcloud import wrapped_command
from snakemake_executor_plugin_tpu.runner import JobFailure


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env(coordinator: str | None, hosts: int, worker: int, extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The environment protocol of trainer.train.distributed for one host."""
    env = {"TRAINER_NUM_PROCESSES": str(hosts), "TRAINER_PROCESS_ID": str(worker)}
    if coordinator:
        env["TRAINER_COORDINATOR"] = coordinator
    elif hosts > 1:  # no address: jax.distributed discovers the TPU slice itself
        env["TRAINER_TPU_AUTO_DISTRIBUTED"] = "1"
    env.update(extra)
    return env


class LocalBackend:
    def __init__(self, label: str, jobdir: str | os.PathLike, workdir: str, commands: list[str],
                 envs: list[Mapping[str, str]], kill_grace_s: float = 3):
        """commands[i]/envs[i]: what host i runs and its extra environment; host 0 runs in `workdir`."""
        self.label = label
        self.jobdir = Path(jobdir).absolute()
        self.workdir = workdir
        self.commands = commands
        self.envs = envs
        self.hosts = len(commands)
        self.kill_grace_s = kill_grace_s
        self.procs: list[subprocess.Popen | None] = [None] * self.hosts
        self.scratch: list[str] = []

    def _file(self, worker: int, ext: str) -> Path:
        return self.jobdir / f"worker{worker}.{ext}"

    def log_location(self, worker: int) -> str:
        return os.path.relpath(self._file(worker, "log"))

    def prepare(self) -> None:
        shutil.rmtree(self.jobdir, ignore_errors=True)  # jobids restart at 1 every run
        self.jobdir.mkdir(parents=True)
        self.scratch = [tempfile.mkdtemp(prefix=f"tpu-follower{w}-") for w in range(1, self.hosts)]

    def cwd(self, worker: int) -> str:
        return self.workdir if worker == 0 else self.scratch[worker - 1]

    def start(self) -> None:
        for w, cmd in enumerate(self.commands):
            env = dict(os.environ)
            env.update(self.envs[w])
            exit_file = str(self._file(w, "exit"))
            with open(self._file(w, "log"), "wb") as log:
                try:
                    self.procs[w] = subprocess.Popen(
                        ["bash", "-c", wrapped_command(cmd, exit_file)], cwd=self.cwd(w), env=env,
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                except OSError as e:
                    self.kill(list(range(w)))
                    raise JobFailure(f"{self.label}: could not start worker {w}: {e}") from None

    def poll(self) -> list[tuple[str, int | None]]:
        states = []
        for w, proc in enumerate(self.procs):
            rc = proc.poll() if proc else None
            if proc is None or rc is None:
                states.append(("running", None) if proc else ("lost", None))
                continue
            exit_file = self._file(w, "exit")
            if exit_file.exists():
                states.append(("exit", int(exit_file.read_text().strip() or 1)))
            else:  # the wrapper itself was killed
                states.append(("lost", None))
        return states

    def kill(self, workers: list[int]) -> None:
        procs = [self.procs[w] for w in workers if self.procs[w] is not None and self.procs[w].poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                try:
                    os.killpg(p.pid, sig)  # the whole process group: the wrapper and what it started
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + self.kill_grace_s
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.05)
            procs = [p for p in procs if p.poll() is None]
            if not procs:
                break
        # reap grandchildren that outlived the wrapper in the same group
        for w in workers:
            p = self.procs[w]
            if p is not None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def tail(self, worker: int, lines: int) -> str:
        path = self._file(worker, "log")
        if not path.exists():
            return "(no log)"
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def finish(self, success: bool) -> None:
        for d in self.scratch:
            shutil.rmtree(d, ignore_errors=True)
