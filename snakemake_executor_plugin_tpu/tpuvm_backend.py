"""Backend `tpu-vm`: drive the hosts of a Cloud TPU VM slice with `gcloud compute tpus tpu-vm ssh/scp`.

What the operators' runbook does by hand, per job: sync each host's checkout to the local commit
(git bundle over scp, or git fetch), source the env file, run the setup command once per commit,
optionally free a busy TPU, start every worker with nohup (log + exit-code file under logs/), poll
the exit files, stop every worker of the job on failure or cancel. With `provision:` the VM is
found or created first (lifecycle.py), and a preempted VM is recreated and the job run again.
Every gcloud command goes to the job's command log.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from snakemake_executor_plugin_tpu import gcloud as gc
from snakemake_executor_plugin_tpu import lifecycle
from snakemake_executor_plugin_tpu.gitsync import GitState, make_bundle
from snakemake_executor_plugin_tpu.runner import JobFailure, Preempted
from snakemake_executor_plugin_tpu.slices import SliceSpec

SSH_TIMEOUT_S = 300  # a setup command (pip install) runs inside one ssh call
MAX_POLL_ERRORS = 4  # consecutive failed status checks of a worker before it counts as lost


def _tail(text: str, n: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


class SliceState:
    """What the executor learned about a TPU VM during this run (shared by its jobs)."""

    def __init__(self, hosts: int = 0):
        self.lock = threading.Lock()
        self.hosts = hosts  # of the whole slice (a `tpu_hosts=1` job prepares host 0 only)
        self.synced: set[str] = set()  # commits every host already has
        self.coordinator_ip: str | None = None
        self.zone: str | None = None  # where the VM is (provision: found or created there)
        self.ready = False  # provision: the VM was found READY or created during this run
        self.created: str | None = None  # zone of a VM this run created

    def forget_vm(self) -> None:
        """After a preemption: the next job finds (or creates) the VM and syncs it again."""
        with self.lock:
            self.ready = False
            self.synced.clear()
            self.coordinator_ip = None


class TpuVmBackend:
    def __init__(self, label: str, spec: SliceSpec, tag: str, host0_command: str, git: GitState,
                 state: SliceState, bundle_dir: str, inputs: Sequence[str] = (), outputs: Sequence[str] = (),
                 log: Callable[[str], None] = print, gcloud: str = "gcloud", command_log: str | None = None):
        self.label = label
        self.spec = spec
        self.tag = tag
        self.host0_command = host0_command
        self.git = git
        self.state = state
        self.bundle_dir = bundle_dir
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.log = log
        self.gcloud = gcloud
        self.hosts = spec.hosts
        self.rundir = gc.join_path(spec.workdir, git.prefix)
        self.poll_errors = [0] * self.hosts
        self.last_error = [""] * self.hosts
        self.coordinator: str | None = None
        self.commands = lifecycle.CommandLog(command_log or os.path.join(bundle_dir, "..", "logs", f"{tag}.gcloud.log"),
                                             gcloud)
        self.max_recreate = spec.provision.max_recreate if spec.provision else 0

    # ------------------------------------------------------------------ gcloud plumbing
    @property
    def zone(self) -> str:
        return self.state.zone or self.spec.zone

    def _loc(self) -> dict:
        return dict(name=self.spec.name, zone=self.zone, project=self.spec.project,
                    extra=self.spec.gcloud_args, gcloud=self.gcloud)

    def _run(self, argv: list[str], timeout: float = SSH_TIMEOUT_S) -> subprocess.CompletedProcess:
        return self.commands.run(argv, timeout, self.label)

    def ssh(self, worker: int, script: str, timeout: float = SSH_TIMEOUT_S) -> subprocess.CompletedProcess:
        return self._run(gc.ssh_argv(worker=worker, command=script, **self._loc()), timeout)

    def _each(self, fn: Callable[[int], object], workers: Sequence[int] | None = None) -> list:
        workers = list(range(self.hosts)) if workers is None else list(workers)
        if not workers:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(workers))) as pool:
            return list(pool.map(fn, workers))

    def _must(self, step: str, results: list[subprocess.CompletedProcess], workers: Sequence[int] | None = None):
        workers = list(range(self.hosts)) if workers is None else list(workers)
        bad = [(w, r) for w, r in zip(workers, results) if r.returncode != 0]
        if bad:
            detail = "\n".join(f"--- worker {w}: {step} exited {r.returncode} ---\n{_tail(r.stderr + r.stdout)}"
                               f"\n(command: {gc.display(r.args)[:300]})" for w, r in bad)
            raise JobFailure(f"{self.label}: {step} failed on TPU VM {self.spec.name} worker(s) "
                             f"{', '.join(str(w) for w, _ in bad)}\n{detail}")

    # ------------------------------------------------------------------ backend interface
    def log_location(self, worker: int) -> str:
        return f"{self.spec.name} worker {worker}:{gc.join_path(self.rundir, gc.worker_files(self.tag, worker))}.log"

    def _ensure_vm(self) -> None:
        """provision: a READY VM (found, or created now in the first zone with room)."""
        sp = self.spec
        with self.state.lock:
            if self.state.ready:
                return
            zone, created = lifecycle.ensure(self.commands, sp, self.label, self.log)
            self.state.zone, self.state.ready = zone, True
            if created:
                self.state.created = zone
                self.state.synced.clear()
                self.state.coordinator_ip = None
        if created and sp.provision.env_file and sp.env_file:
            self._copy_env_file()

    def _copy_env_file(self) -> None:
        """A new VM has no env file: copy the local one (provision.env_file) to slice.env_file on every host."""
        local = os.path.expanduser(self.spec.provision.env_file)
        if not os.path.isfile(local):
            raise JobFailure(f"{self.label}: provision.env_file {local} not found on this machine")
        dest = gc.home_relative(self.spec.env_file)
        self._must("copying the env file", self._each(
            lambda w: self._run(gc.scp_to_argv(local, dest, worker=w, **self._loc()))))

    def after_preemption(self) -> None:
        self.state.forget_vm()
        self.poll_errors = [0] * self.hosts

    def _check_preempted(self) -> None:
        """Raise Preempted when the VM is PREEMPTED/TERMINATED or gone (ssh failures are often just that)."""
        gone = lifecycle.gone_state(self.commands, self.spec, self.zone, self.label)
        if gone is not None:
            what = "no longer exists" if gone == "NOT_FOUND" else f"is {gone}"
            raise Preempted(f"TPU VM {self.spec.name} in {self.zone} {what}")

    def prepare(self) -> None:
        sp, sha = self.spec, self.git.sha
        bundle_name = None
        if sp.provision:
            self._ensure_vm()
        with self.state.lock:
            need_sync = sp.code_sync == "bundle" and sha not in self.state.synced
        if need_sync:
            checks = self._each(lambda w: self.ssh(w, gc.check_commit_script(sp.workdir, sha), 60))
            self._must("checking the code version", checks)
            missing = [w for w, r in enumerate(checks) if "have" not in r.stdout.split()]
            if missing:
                bundle = make_bundle(self.git, self.bundle_dir)
                bundle_name = f"sidrl-{sha[:12]}.bundle"
                self.log(f"{self.label}: shipping commit {sha[:12]} to {sp.name} worker(s) {missing}")
                self._must("copying the code bundle", self._each(
                    lambda w: self._run(gc.scp_to_argv(str(bundle), bundle_name, worker=w, **self._loc())),
                    missing), missing)
        script = gc.prepare_script(sp.workdir, sha, sp.code_sync, bundle_name, sp.env_file, sp.setup_command,
                                   sp.busy_cleanup)
        self._must("preparing the host (code sync, setup)", self._each(lambda w: self.ssh(w, script)))
        if self.hosts >= self.state.hosts:
            with self.state.lock:
                self.state.synced.add(sha)
        self.coordinator = self._coordinator()
        if sp.transfer_files and self.inputs:
            self._push_inputs()

    def _coordinator(self) -> str | None:
        sp = self.spec
        if sp.hosts == 1 or sp.coordinator == "auto":
            return None  # single host: no cluster; auto: jax.distributed discovers the slice itself
        if sp.coordinator != "internal-ip":
            return sp.coordinator
        with self.state.lock:
            ip = self.state.coordinator_ip
        if ip is None:
            r = self._run(gc.describe_argv(**self._loc()), 120)
            self._must("describing the TPU VM", [r], [0])
            try:
                endpoints = json.loads(r.stdout).get("networkEndpoints") or []
                ip = endpoints[0]["ipAddress"]
            except (ValueError, LookupError, AttributeError, TypeError):
                raise JobFailure(f"{self.label}: `{gc.display(r.args)}` gave no networkEndpoints[0].ipAddress; "
                                 "set coordinator: auto or HOST:PORT on the slice") from None
            if len(endpoints) != sp.hosts:
                raise JobFailure(f"{self.label}: TPU VM {sp.name} has {len(endpoints)} host(s) but slice "
                                 f"'{sp.slice_id}' says hosts: {sp.hosts}; fix the slice config")
            with self.state.lock:
                self.state.coordinator_ip = ip
        return f"{ip}:{sp.coordinator_port}"

    def worker_env(self, worker: int) -> dict[str, str]:
        from snakemake_executor_plugin_tpu.local_backend import trainer_env

        env = {"SIDRL_JOB_TAG": self.tag, "SIDRL_SLICE": self.spec.slice_id, "SIDRL_TPU_NAME": self.spec.name,
               "SIDRL_TPU_ZONE": self.zone, "SIDRL_WORKER": str(worker)}
        env.update(self.spec.env)
        return trainer_env(self.coordinator, self.hosts, worker, env)

    def start(self) -> None:
        sp = self.spec

        def start_one(w: int):
            cmd = self.host0_command if w == 0 else sp.follower_cmd()
            return self.ssh(w, gc.start_script(self.rundir, self.tag, w, cmd, self.worker_env(w), sp.env_file), 120)

        results = self._each(start_one)
        if any(r.returncode != 0 for r in results):
            self.kill([w for w, r in enumerate(results) if r.returncode == 0])
            self._must("starting the worker", results)

    def poll(self) -> list[tuple[str, int | None]]:
        unreachable = threading.Event()

        def poll_one(w: int):
            r = self.ssh(w, gc.poll_script(self.rundir, self.tag, w), 120)
            try:
                if r.returncode != 0:
                    unreachable.set()
                    raise ValueError(_tail(r.stderr + r.stdout, 5))
                state = gc.parse_state(r.stdout)
                self.poll_errors[w] = 0
                return state
            except ValueError as e:  # transient ssh trouble: retry a few polls before giving up on the host
                self.poll_errors[w] += 1
                self.last_error[w] = str(e)
                if self.poll_errors[w] >= MAX_POLL_ERRORS:
                    self.log(f"{self.label}: worker {w} unreachable {MAX_POLL_ERRORS} times: {e}")
                    return ("lost", None)
                return ("running", None)

        states = self._each(poll_one)
        if unreachable.is_set() or any(st == "lost" for st, _ in states):
            self._check_preempted()
        return states

    def kill(self, workers: list[int]) -> None:
        self._each(lambda w: self.ssh(w, gc.kill_script(self.rundir, self.tag, w), 120), workers)

    def tail(self, worker: int, lines: int) -> str:
        r = self.ssh(worker, gc.tail_script(self.rundir, self.tag, worker, lines), 120)
        text = r.stdout if r.returncode == 0 else f"(ssh failed: {_tail(r.stderr, 3)})"
        if self.poll_errors[worker] >= MAX_POLL_ERRORS:
            text += f"\n(worker unreachable: {self.last_error[worker]})"
        return text

    # ------------------------------------------------------------------ files without shared storage
    def _rel(self, path: str) -> str:
        if os.path.isabs(path):
            raise JobFailure(f"{self.label}: transfer_files needs paths inside the workflow directory, got {path}")
        return path

    def _push_inputs(self) -> None:
        files = [self._rel(p) for p in self.inputs if os.path.exists(p)]
        parents = sorted({os.path.dirname(p) or "." for p in files})
        mk = f"cd {gc.qpath(self.rundir)} && mkdir -p " + " ".join(shlex.quote(p) for p in parents)
        self._must("creating input directories", [self.ssh(0, mk, 120)], [0])
        for p in files:
            dest = gc.home_relative(gc.join_path(self.rundir, os.path.dirname(p))) + "/"
            r = self._run(gc.scp_to_argv(p, dest, worker=0, recurse=os.path.isdir(p), **self._loc()))
            self._must(f"copying input {p} to worker 0", [r], [0])

    def finish(self, success: bool) -> None:
        if not (success and self.spec.transfer_files):
            return
        for p in self.outputs:
            self._rel(p)
            local_parent = os.path.dirname(p) or "."
            os.makedirs(local_parent, exist_ok=True)
            src = gc.home_relative(gc.join_path(self.rundir, p))
            r = self._run(gc.scp_from_argv(src, local_parent + "/", worker=0, recurse=True, **self._loc()))
            if r.returncode != 0:
                raise JobFailure(f"{self.label}: copying output {p} back from {self.spec.name} worker 0 failed: "
                                 f"{_tail(r.stderr)}")
