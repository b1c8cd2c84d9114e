"""Multi-process JAX: cluster init from the environment, broadcast from process 0, followers.

Protocol (used by the TPU executor, see snakemake_executor_plugin_tpu):
- Every host of a slice gets `TRAINER_COORDINATOR=host:port`, `TRAINER_NUM_PROCESSES=N` and its own
  `TRAINER_PROCESS_ID=i` in the environment. Host 0 runs the Snakemake job, whose rule calls
  `python -m trainer <command> ...`; hosts 1..N-1 run `python -m trainer follow`.
- Process 0 broadcasts its argv (jax.experimental.multihost_utils, public API; jax 0.10 has no
  public key-value store); a follower runs the same command with the same argv, in its own
  (possibly empty) directory. Only process 0 reads and writes files; followers receive inputs by broadcast.
- Host 0 may take long to start (its Snakemake job fetches inputs first), so a follower waits up
  to TRAINER_FOLLOWER_TIMEOUT_S (default 3600) for the coordinator to listen before jax.distributed's own timer
  starts, and names host 0 when it never does.
- On TPU VMs the coordinator may be left out: jax.distributed discovers the slice itself.
- Small objects travel pickled (broadcast_object); weights never do: process 0 sends them one
  array at a time straight into their target sharding (broadcast_arrays).
- `TRAINER_EXPECT_BACKEND` (set by the executor for slices of real accelerators, e.g. `tpu`):
  a job that finds another JAX backend stops instead of running on the host's CPU unnoticed.
"""
from __future__ import annotations

import functools
import logging
import os
import pickle
import socket
import sys
import time

import jax
import numpy as np

ENV_COORD, ENV_NUM, ENV_ID = "TRAINER_COORDINATOR", "TRAINER_NUM_PROCESSES", "TRAINER_PROCESS_ID"
ENV_TIMEOUT = "TRAINER_FOLLOWER_TIMEOUT_S"
ENV_BACKEND, ENV_ACCELERATOR = "TRAINER_EXPECT_BACKEND", "TRAINER_ACCELERATOR"


def env_int(name: str, default: int | None = None, minimum: int = 0) -> int:
    """An integer from the environment; a missing (without default) or malformed value is a
    UserError naming the variable (the executor sets these; a user may set them by hand)."""
    from trainer.errors import UserError

    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise UserError(f"environment variable {name} is not set; the multi-process protocol needs "
                            f"{ENV_COORD}, {ENV_NUM} and {ENV_ID} on every process (see trainer/train/distributed.py)")
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UserError(f"environment variable {name}={text!r}: expected an integer >= {minimum}")
    return value


JOIN_TIMEOUT_S = 300  # jax.distributed's own registration timeout, once the coordinator listens

log = logging.getLogger("trainer")
_initialized = False
_argv: list[str] | None = None


def init_from_env() -> None:
    """Join the cluster described by the environment; a no-op for single-process runs."""
    global _initialized
    if _initialized:
        return
    num = env_int(ENV_NUM, 1, minimum=1)
    follower_timeout_s = env_int(ENV_TIMEOUT, 3600, minimum=1)  # followers wait this long for host 0; checked on every process
    if num > 1 or os.environ.get("TRAINER_TPU_AUTO_DISTRIBUTED") == "1":
        # CPU processes need a collectives implementation to talk to each other (ignored on TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if os.environ.get(ENV_COORD):
            pid = _process_id(num)
            if pid != 0:
                wait_for_coordinator(os.environ[ENV_COORD], pid, follower_timeout_s)
            jax.distributed.initialize(
                coordinator_address=os.environ[ENV_COORD],
                num_processes=num,
                process_id=pid,
                initialization_timeout=JOIN_TIMEOUT_S,
            )
        else:
            jax.distributed.initialize()
        log.info("backend=%s process=%d/%d", jax.default_backend(), jax.process_index(), jax.process_count())
    _initialized = True
    check_backend()


def check_backend() -> None:
    """Stop when the slice's accelerator is missing (jax silently falls back to the CPU)."""
    from trainer.errors import UserError

    want = os.environ.get(ENV_BACKEND)
    if want and jax.default_backend() != want:
        where = os.environ.get(ENV_ACCELERATOR) or "this slice"
        raise UserError(
            f"{where} expects JAX backend '{want}' but JAX found '{jax.default_backend()}' (devices: "
            f"{[d.device_kind for d in jax.devices()][:4]}): install the accelerator's jax build on the host "
            f"(TPU: pip install '.[tpu]', which pins jax[tpu]) and check that no other process holds the chips")


def device_info() -> dict:
    """What every run_summary records about where it ran."""
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "process_count": jax.process_count()}


def _process_id(num: int) -> int:
    from trainer.errors import UserError

    pid = env_int(ENV_ID)
    if pid >= num:
        raise UserError(f"environment variable {ENV_ID}={pid} but {ENV_NUM}={num}: ids run from 0 to {num - 1}")
    return pid


def wait_for_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """A follower: block until host 0's coordinator accepts connections (host 0 may still be
    fetching inputs); past `timeout_s`, fail naming host 0 and its address."""
    from trainer.errors import UserError

    host, _, port = address.rpartition(":")
    deadline, logged = time.monotonic() + timeout_s, False
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"process {process_id}: host 0 (process 0, the jax.distributed coordinator at {address}) never "
                    f"joined: nothing listened there for {timeout_s:g} s ({e}). See worker 0's log for why it did "
                    f"not start the trainer; raise {ENV_TIMEOUT} if its start-up (fetching inputs) takes "
                    "longer.") from None
            if not logged:
                log.warning("process %d: waiting for host 0 (coordinator %s) to start", process_id, address)
                logged = True
            time.sleep(1)


def broadcast_scalar(x):
    """Process 0's value of a numpy scalar, on every process."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(np.asarray(x))


def start(argv: list[str]) -> None:
    """Entry of every multi-process command: join the cluster; process 0 publishes its argv.

    Then every process waits at a key-value-store barrier and joins one tiny collective: a follower
    imports the command's module only after it gets the argv, and process 0 may work alone for
    minutes before its first broadcast (an import), either of which can exceed the fixed 30 s connect
    window in which the CPU collectives (gloo) set up their connections. The barrier has no such
    limit, and the collective right after it sets the connections up while every process is there.
    """
    init_from_env()
    exchange_argv(argv)


def is_main() -> bool:
    return jax.process_index() == 0


def process_count() -> int:
    return jax.process_count()


def broadcast_object(obj=None):
    """Send a picklable object from process 0 to every process (others pass anything)."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8) if is_main() else np.zeros(0, np.uint8)
    size = multihost_utils.broadcast_one_to_all(np.array(payload.size, np.int64))
    buf = np.zeros(int(size), np.uint8)
    if is_main():
        buf[:] = payload
    buf = multihost_utils.broadcast_one_to_all(buf)
    return pickle.loads(np.asarray(buf).tobytes())


@functools.lru_cache(maxsize=None)
def _process_mesh():
    from jax.sharding import Mesh
    devices = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
    return Mesh(devices, ("processes", "local_devices"))


@functools.lru_cache(maxsize=None)
def _collect(sharding):
    """[processes, ...] with process 0's data and zeros elsewhere -> its sum, laid out in `sharding`."""
    import jax.numpy as jnp
    return jax.jit(lambda a: jnp.sum(a, axis=0, dtype=a.dtype), out_shardings=sharding)


def broadcast_arrays(tree, template, shardings):
    """Process 0's host arrays `tree` (None elsewhere) as global arrays in `shardings`, on every process.

    `template` (leaves with .shape/.dtype, e.g. ShapeDtypeStruct) gives the structure on every
    process. One array crosses at a time and lands directly in its sharding, so a follower never
    holds a host copy of the tree; its transient extra memory is one array per local device.
    """
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    from trainer.train import parallel

    if jax.process_count() == 1:
        return parallel.place(tree, shardings)
    main = is_main()
    mesh = _process_mesh()

    def send(spec, sharding, x=None):
        src = np.asarray(x) if main else np.zeros(spec.shape, spec.dtype)
        if src.shape != tuple(spec.shape) or src.dtype != np.dtype(spec.dtype):
            raise ValueError(f"array {src.shape} {src.dtype} does not match its template {spec.shape} {spec.dtype}")
        staged = multihost_utils.host_local_array_to_global_array(src[None], mesh, P("processes"))
        return _collect(sharding)(staged)

    if main:
        return jax.tree.map(lambda spec, s, x: send(spec, s, x), template, shardings, tree)
    return jax.tree.map(send, template, shardings)


def broadcast_to_local(tree, template):
    """Process 0's host arrays `tree` on every process, as arrays on its first local device
    (for per-process work such as evaluation's own slice of rows); sent one array at a time."""
    if jax.process_count() == 1:
        return jax.device_put(tree, jax.local_devices()[0])
    from jax.sharding import NamedSharding, PartitionSpec as P

    rep = NamedSharding(_process_mesh(), P())
    placed = broadcast_arrays(tree, template, jax.tree.map(lambda _: rep, template))
    return jax.tree.map(lambda x: x.addressable_data(0), placed)


def array_template(tree):
    """Shapes and dtypes of a host tree: what followers need to receive it (small, picklable)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


class _Failure:
    def __init__(self, message: str):
        self.message = message


def on_main(fn, *args, **kwargs):
    """Run `fn` on process 0 only (it reads the files) and hand its result to every process.

    If it fails, the other processes raise too instead of waiting forever in the next collective.
    """
    from trainer.errors import UserError

    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            broadcast_object(_Failure(f"{type(e).__name__}: {e}"))
            raise
        return broadcast_object(result)
    result = broadcast_object(None)
    if isinstance(result, _Failure):
        raise UserError(f"process 0 failed: {result.message}")
    return result


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _kv_client():
    from jax._src import distributed as jdist

    client = jdist.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def exchange_argv(argv: list[str] | None) -> list[str] | None:
    """Process 0's argv on every process, after the start barrier and one tiny collective (see
    start), so a follower that runs `follow` (argv None) learns what to run, and one that runs the
    command itself joins."""
    global _argv
    if _argv is None:  # once per process: `follow` exchanges it before running the command's main
        if jax.process_count() == 1:
            _argv = argv
        else:
            _kv_client().wait_at_barrier("trainer/started", env_int(ENV_TIMEOUT, 3600, 1) * 1000)
            sync("trainer/started")
            _argv = broadcast_object(list(argv) if is_main() else None)
    return _argv


def main(argv: list[str]) -> int:
    """`python -m trainer follow`: join the cluster, run what process 0 runs."""
    from trainer.cli import COMMANDS
    import importlib

    init_from_env()
    if is_main():
        print("error: `follow` is for processes 1..N-1; process 0 runs the command itself", file=sys.stderr)
        return 2
    command_argv = exchange_argv(None)
    log.info("follower %d runs: %s", jax.process_index(), " ".join(command_argv))
    module = importlib.import_module(COMMANDS[command_argv[0]])
    return int(module.main(command_argv) or 0)
