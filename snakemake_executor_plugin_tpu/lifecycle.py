"""TPU VM lifecycle of slices with `provision:`: find or create the VM, recreate it after a
preemption, delete it after the workflow; and the log every gcloud command goes to.

Creation tries `provision.zones` in order and moves on only when a zone answers with a capacity,
quota or reservation error (the texts Cloud TPU gives, see ZONE_UNAVAILABLE); any other error
stops. A VM the executor creates carries the label created-by=sidrl-executor, and only such a VM
is ever deleted (after a preemption, to recreate it; with `delete_after`, when the workflow ends).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from typing import Callable

from snakemake_executor_plugin_tpu import gcloud as gc
from snakemake_executor_plugin_tpu.runner import JobFailure
from snakemake_executor_plugin_tpu.slices import SliceSpec

CREATED_BY = {"created-by": "sidrl-executor"}
GONE = ("PREEMPTED", "TERMINATED")  # spot/preemptible VMs must be deleted and recreated
TRANSIENT = ("CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "UNHIDING")
# Errors of `tpu-vm create` after which another zone may work (Cloud TPU's own wording).
ZONE_UNAVAILABLE = [
    (re.compile(r"no more capacity in the zone|ZONE_RESOURCE_POOL_EXHAUSTED|RESOURCE_EXHAUSTED|"
                r"Insufficient (reserved )?capacity", re.I), "no capacity"),
    (re.compile(r"Quota limit '[^']*' has been exceeded|QUOTA_EXCEEDED|Quota '[^']*' exceeded", re.I), "quota"),
    (re.compile(r"Reservation not found", re.I), "no reservation"),
]
NOT_FOUND = re.compile(r"NOT_FOUND|was not found|does not exist")


class CommandLog:
    """Runs gcloud commands and appends each one (secrets masked), its exit code and time to a file."""

    def __init__(self, path: str | os.PathLike, gcloud: str = "gcloud"):
        self.path = str(path)
        self.gcloud = gcloud
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def _append(self, text: str) -> None:
        with self._lock, open(self.path, "a") as f:
            f.write(text)

    def run(self, argv: list[str], timeout: float, label: str = "") -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            r = subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout:g} s")
        except FileNotFoundError:
            raise JobFailure(f"{label}: `{self.gcloud}` not found on PATH; install the Google Cloud SDK") from None
        entry = f"$ {gc.display(argv)}\n# exit {r.returncode} after {time.monotonic() - t0:.1f} s\n"
        if r.returncode != 0 and r.stderr.strip():
            entry += "".join(f"# {line}\n" for line in gc.redact(r.stderr.strip()).splitlines()[-10:])
        self._append(entry)
        return r


def _loc(spec: SliceSpec, zone: str) -> dict:
    return dict(name=spec.name, zone=zone, project=spec.project, extra=spec.gcloud_args)


def describe(cmds: CommandLog, spec: SliceSpec, zone: str, label: str) -> dict | None:
    """`describe` of the VM in `zone`; None when it does not exist there."""
    r = cmds.run(gc.describe_argv(gcloud=cmds.gcloud, **_loc(spec, zone)), 120, label)
    if r.returncode != 0:
        if NOT_FOUND.search(r.stderr):
            return None
        raise JobFailure(f"{label}: `{gc.display(r.args)}` failed: {r.stderr.strip()[-500:]}")
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise JobFailure(f"{label}: `{gc.display(r.args)}` printed no JSON: {r.stdout[-300:]!r}") from None


def created_here(info: dict) -> bool:
    labels = info.get("labels") or {}
    return all(labels.get(k) == v for k, v in CREATED_BY.items())


def candidate_zones(spec: SliceSpec) -> list[str]:
    zones = [spec.zone] if spec.zone else []
    return zones + [z for z in (spec.provision.zones if spec.provision else ()) if z not in zones]


def find(cmds: CommandLog, spec: SliceSpec, label: str) -> tuple[str | None, dict | None]:
    for zone in candidate_zones(spec):
        info = describe(cmds, spec, zone, label)
        if info is not None:
            return zone, info
    return None, None


def create(cmds: CommandLog, spec: SliceSpec, label: str, log: Callable[[str], None]) -> str:
    """Create the VM in the first zone that has room; returns that zone."""
    p = spec.provision
    refused = []
    for zone in p.zones:
        log(f"{label}: creating TPU VM {spec.name} ({p.accelerator}{', spot' if p.spot else ''}) in {zone}")
        argv = gc.create_argv(spec.name, zone, p.accelerator, p.runtime_version, p.spot, spec.project, CREATED_BY,
                              spec.gcloud_args, cmds.gcloud)
        r = cmds.run(argv, 3600, label)
        if r.returncode == 0:
            return zone
        why = next((kind for pattern, kind in ZONE_UNAVAILABLE if pattern.search(r.stderr)), None)
        message = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        if why is None:
            raise JobFailure(f"{label}: creating TPU VM {spec.name} in {zone} failed: {message}\n"
                             f"(command: {gc.display(argv)})")
        log(f"{label}: zone {zone}: {why} ({message}); trying the next zone")
        refused.append(f"{zone}: {why}")
    raise JobFailure(f"{label}: could not create TPU VM {spec.name} in any zone of provision.zones "
                     f"({'; '.join(refused)}); add zones or retry later")


def delete(cmds: CommandLog, spec: SliceSpec, zone: str, label: str, log: Callable[[str], None]) -> None:
    log(f"{label}: deleting TPU VM {spec.name} in {zone}")
    r = cmds.run(gc.delete_argv(spec.name, zone, spec.project, spec.gcloud_args, cmds.gcloud), 1800, label)
    if r.returncode != 0 and not NOT_FOUND.search(r.stderr):
        raise JobFailure(f"{label}: deleting TPU VM {spec.name} in {zone} failed: {r.stderr.strip()[-500:]}")


def gone_state(cmds: CommandLog, spec: SliceSpec, zone: str, label: str) -> str | None:
    """'PREEMPTED' / 'TERMINATED' / 'NOT_FOUND' when the VM is unusable for good, else None."""
    try:
        info = describe(cmds, spec, zone, label)
    except JobFailure:
        return None  # cannot tell: the caller's own retry logic applies
    if info is None:
        return "NOT_FOUND"
    state = str(info.get("state", "READY"))
    return state if state in GONE else None


def ensure(cmds: CommandLog, spec: SliceSpec, label: str, log: Callable[[str], None]) -> tuple[str, bool]:
    """The zone of a READY VM (found, or created now) and whether it was created now."""
    p = spec.provision
    zone, info = find(cmds, spec, label)
    deadline = time.monotonic() + p.wait_ready_s
    while info is not None and info.get("state", "READY") in TRANSIENT and time.monotonic() < deadline:
        log(f"{label}: TPU VM {spec.name} is {info['state']}; waiting")
        time.sleep(10)
        info = describe(cmds, spec, zone, label)
    if info is not None:
        state = str(info.get("state", "READY"))
        if state in GONE:
            if not created_here(info):
                raise JobFailure(
                    f"{label}: TPU VM {spec.name} in {zone} is {state}, and it was not created by this executor, "
                    f"so it is not deleted. Delete it (`{gc.display(gc.delete_argv(spec.name, zone, spec.project))}`) "
                    "and rerun: the executor then creates it.")
            delete(cmds, spec, zone, label, log)
            info = None
        elif state != "READY":
            raise JobFailure(f"{label}: TPU VM {spec.name} in {zone} is {state}, not READY")
    if info is not None:
        return zone, False
    return create(cmds, spec, label, log), True
