"""Slice definitions: where a job that asks for `resources: tpu="<slice>"` runs.

A slice is read from YAML (`slices:` mapping, see docs/executor.md):

    slices:
      train: {accelerator: v6e-16, hosts: 4, backend: tpu-vm, name: my-tpu, zone: us-east5-b}
      eval:  {accelerator: v6e-8 (simulated), hosts: 1, backend: local}

This module is pure (no Snakemake imports) so the Snakefile can import it for dry-run messages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml

BACKENDS = ("local", "tpu-vm")
CODE_SYNC = ("bundle", "fetch", "none")
RESOURCE = "tpu"  # the rule resource that names a slice


class SliceConfigError(Exception):
    """A slice definition or a job's slice request is wrong; the message says which and how to fix."""


@dataclass(frozen=True)
class Provision:
    """`provision:` of a tpu-vm slice: the executor creates the VM when missing (see lifecycle.py)."""

    zones: tuple[str, ...]  # tried in order on capacity / quota / reservation errors
    runtime_version: str  # gcloud --version, e.g. v2-alpha-tpuv6e
    accelerator: str  # gcloud --accelerator-type (default: the slice's accelerator)
    spot: bool = False
    delete_after: bool = False  # delete the VM when the workflow ends, if this executor created it
    max_recreate: int = 3  # preemptions survived per job before it fails
    env_file: str | None = None  # local file copied to the slice's env_file path on a VM it creates
    wait_ready_s: float = 900  # how long a VM may stay CREATING/STARTING/... before giving up


@dataclass(frozen=True)
class SliceSpec:
    slice_id: str  # the key under `slices:` (what rules name in `resources: tpu=...`)
    accelerator: str
    hosts: int
    backend: str = "local"
    name: str | None = None  # TPU VM name (tpu-vm)
    zone: str | None = None
    project: str | None = None
    env_file: str | None = None  # sourced (with `set -a`) before every command on a host
    setup_command: str | None = None  # run once per commit on every host (marker file)
    workdir: str = "sidrl"  # tpu-vm: repo checkout on each host, relative to the login home or absolute
    python: str | None = None  # interpreter on the host; local default: this Python
    busy_cleanup: bool = False  # tpu-vm: free a TPU held by a stale process before starting
    timeout_s: float = 0  # 0 = no limit
    follower_command: str = "{python} -m trainer follow"
    coordinator: str = "internal-ip"  # tpu-vm: internal-ip | auto | HOST:PORT
    coordinator_port: int = 8476
    poll_interval_s: float | None = None  # how often workers are checked (local 0.2 s, tpu-vm 15 s)
    follower_grace_s: float = 120  # followers still running this long after host 0 exited 0: failure
    code_sync: str = "bundle"  # tpu-vm: bundle (scp a git bundle) | fetch (git fetch origin) | none
    transfer_files: bool = False  # tpu-vm without a shared storage: scp inputs to / outputs from host 0
    gcloud_args: tuple[str, ...] = ()  # extra args for every gcloud call, e.g. [--tunnel-through-iap]
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment on every host
    provision: Provision | None = None  # tpu-vm: create the VM when missing, recreate when preempted

    @property
    def python_exe(self) -> str:
        if self.python:
            return self.python
        return "python3" if self.backend == "tpu-vm" else _local_python()

    @property
    def poll_s(self) -> float:
        if self.poll_interval_s is not None:
            return float(self.poll_interval_s)
        return 15.0 if self.backend == "tpu-vm" else 0.2

    def follower_cmd(self) -> str:
        return self.follower_command.format(python=self.python_exe)

    def describe(self) -> str:
        """One line for logs and dry-run messages: where the job runs."""
        hosts = f"{self.hosts} host" + ("s" if self.hosts != 1 else "")
        if self.backend == "tpu-vm":
            zone = self.zone or "|".join(self.provision.zones)
            where = f"TPU VM {self.name} in {zone}" + (f" (project {self.project})" if self.project else "")
            if self.provision:
                where += " (created when missing" + (", spot" if self.provision.spot else "") + ")"
        else:
            where = "local processes"
        return f"slice '{self.slice_id}': {self.accelerator}, {hosts}, {where}"


def _local_python() -> str:
    import sys

    return sys.executable


_FIELDS = {f.name: f for f in fields(SliceSpec) if f.name != "slice_id"}
_REQUIRED = ("accelerator", "hosts")


def parse_slice(slice_id: str, raw: Mapping[str, Any], source: str) -> SliceSpec:
    where = f"{source}: slices.{slice_id}"
    if not isinstance(raw, Mapping):
        raise SliceConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise SliceConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_FIELDS)}")
    missing = [k for k in _REQUIRED if raw.get(k) in (None, "")]
    if missing:
        raise SliceConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    vals = dict(raw)
    try:
        vals["hosts"] = int(vals["hosts"])
        for key in ("timeout_s", "follower_grace_s"):
            if key in vals and vals[key] is not None:
                vals[key] = float(vals[key])
        if vals.get("poll_interval_s") is not None:
            vals["poll_interval_s"] = float(vals["poll_interval_s"])
        if "coordinator_port" in vals:
            vals["coordinator_port"] = int(vals["coordinator_port"])
    except (TypeError, ValueError) as e:
        raise SliceConfigError(f"{where}: {e}; hosts/coordinator_port must be integers, *_s numbers") from None
    for key in ("busy_cleanup", "transfer_files"):
        if key in vals and not isinstance(vals[key], bool):
            raise SliceConfigError(f"{where}.{key}: expected true or false, got {vals[key]!r}")
    if vals["hosts"] < 1:
        raise SliceConfigError(f"{where}.hosts: must be >= 1, got {vals['hosts']}")
    backend = vals.get("backend", "local")
    if backend not in BACKENDS:
        raise SliceConfigError(f"{where}.backend: unknown '{backend}'; valid: {', '.join(BACKENDS)}")
    if vals.get("provision") is not None:
        if backend != "tpu-vm":
            raise SliceConfigError(f"{where}.provision: only for backend tpu-vm")
        vals["provision"] = parse_provision(vals["provision"], str(vals["accelerator"]), f"{where}.provision")
    if backend == "tpu-vm":
        for key in ("name", "zone"):
            if key == "zone" and vals.get("provision"):
                continue  # found in, or created in, one of provision.zones
            if not vals.get(key):
                raise SliceConfigError(f"{where}.{key}: required for backend tpu-vm (the TPU VM's {key})")
    if vals.get("code_sync", "bundle") not in CODE_SYNC:
        raise SliceConfigError(f"{where}.code_sync: unknown '{vals['code_sync']}'; valid: {', '.join(CODE_SYNC)}")
    coord = str(vals.get("coordinator", "internal-ip"))
    if coord not in ("internal-ip", "auto") and ":" not in coord:
        raise SliceConfigError(f"{where}.coordinator: expected internal-ip, auto or HOST:PORT, got '{coord}'")
    vals["gcloud_args"] = tuple(str(a) for a in (vals.get("gcloud_args") or ()))
    env = vals.get("env") or {}
    if not isinstance(env, Mapping):
        raise SliceConfigError(f"{where}.env: expected a mapping NAME: value")
    vals["env"] = {str(k): str(v) for k, v in env.items()}
    for key in ("name", "zone", "project", "env_file", "setup_command", "workdir", "python", "accelerator"):
        if vals.get(key) is not None:
            vals[key] = str(vals[key])
    return SliceSpec(slice_id=str(slice_id), **vals)


_PROVISION = {f.name for f in fields(Provision)}


def parse_provision(raw: Any, accelerator: str, where: str) -> Provision:
    if not isinstance(raw, Mapping):
        raise SliceConfigError(f"{where}: expected a mapping (zones, runtime_version, spot, accelerator, delete_after)")
    unknown = sorted(set(raw) - _PROVISION)
    if unknown:
        raise SliceConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_PROVISION))}")
    zones = raw.get("zones")
    if isinstance(zones, str):
        zones = [zones]
    if not zones or not all(isinstance(z, str) and z for z in zones):
        raise SliceConfigError(f"{where}.zones: a list of zones to try in order, e.g. [us-east5-b, europe-west4-a]")
    if not raw.get("runtime_version"):
        raise SliceConfigError(f"{where}.runtime_version: required (gcloud --version, e.g. v2-alpha-tpuv6e)")
    for key in ("spot", "delete_after"):
        if key in raw and not isinstance(raw[key], bool):
            raise SliceConfigError(f"{where}.{key}: expected true or false, got {raw[key]!r}")
    try:
        max_recreate, wait_ready_s = int(raw.get("max_recreate", 3)), float(raw.get("wait_ready_s", 900))
    except (TypeError, ValueError) as e:
        raise SliceConfigError(f"{where}: {e}; max_recreate must be an integer, wait_ready_s a number") from None
    return Provision(zones=tuple(zones), runtime_version=str(raw["runtime_version"]),
                     accelerator=str(raw.get("accelerator") or accelerator), spot=bool(raw.get("spot", False)),
                     delete_after=bool(raw.get("delete_after", False)), max_recreate=max_recreate,
                     env_file=str(raw["env_file"]) if raw.get("env_file") else None, wait_ready_s=wait_ready_s)


def parse_slices(raw: Any, source: str) -> dict[str, SliceSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SliceConfigError(f"{source}: `slices` must be a mapping of slice name -> settings")
    return {str(k): parse_slice(str(k), v, source) for k, v in raw.items()}


def load_slices_file(path: str | os.PathLike) -> dict[str, SliceSpec]:
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SliceConfigError(f"slices config {path}: file not found (check --tpu-slices-config)") from None
    except yaml.YAMLError as e:
        raise SliceConfigError(f"slices config {path}: invalid YAML: {e}") from None
    if not isinstance(doc, Mapping) or "slices" not in doc:
        raise SliceConfigError(f"slices config {path}: no top-level `slices:` key")
    return parse_slices(doc["slices"], str(path))


def requested_slice(rule: str, resources: Mapping[str, Any], slices: Mapping[str, SliceSpec]) -> SliceSpec | None:
    """The slice a job asked for via its `tpu` resource, or None (run locally)."""
    want = resources.get(RESOURCE) if resources else None
    if want in (None, "", 0, "none", "local"):
        return None
    if want not in slices:
        known = ", ".join(sorted(slices)) or "(none defined)"
        raise SliceConfigError(
            f"rule {rule}: resources: tpu=\"{want}\" names an unknown slice; known slices: {known}. "
            "Define it under `slices:` in the slices config or fix the rule."
        )
    return slices[want]


def placement(slices_raw: Any, slice_id: str | None, source: str = "config") -> str:
    """Human-readable placement for a rule's `message:` (shown by `snakemake -n`).

    Raises SliceConfigError for unknown slices, so a typo fails at parse time, dry-run included.
    """
    if not slice_id:
        return "runs locally"
    spec = requested_slice(f"<{slice_id}>", {RESOURCE: slice_id}, parse_slices(slices_raw, source))
    return "runs on " + spec.describe()
