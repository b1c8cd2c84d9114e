"""Device mesh, parameter sharding and global batches (1 device, N local devices, N processes).

The mesh has axes ("data", "fsdp"). Batches are split over both axes; each parameter matrix is
sharded over "fsdp" along its first dimension that divides evenly (replicated otherwise), so
fsdp=1 is plain data parallelism and fsdp=-1 shards every matrix over the whole slice. The
stacked decoder layers (`layers/...`, leading layer axis that the scan walks) are never sharded on
that axis: each layer's matrix is split the same way as an unstacked one.
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainer.config import ConfigError

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: dict, devices=None) -> Mesh:
    """Over `devices` (default: every device of the cluster)."""
    devices = jax.devices() if devices is None else list(devices)
    fsdp = int(mesh_cfg.get("fsdp", 1))
    data = int(mesh_cfg.get("data", -1))
    if fsdp == -1 and data == -1:
        raise ConfigError("mesh.data and mesh.fsdp are both -1; set one of them (e.g. mesh.data=1 with mesh.fsdp=-1)")
    if fsdp == -1:
        fsdp = max(1, len(devices) // data)
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} != {len(devices)} devices")
    return Mesh(np.array(devices).reshape(data, fsdp), BATCH_AXES)


def param_spec(shape: tuple[int, ...], fsdp: int, stacked: bool = False) -> P:
    """`stacked`: dim 0 is the layer axis, kept whole; the rest is split like an unstacked array."""
    if stacked:
        return P(None, *param_spec(shape[1:], fsdp))
    if len(shape) >= 2 and fsdp > 1:
        for dim, n in enumerate(shape):
            if n % fsdp == 0:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
    return P()


def _is_stacked(path) -> bool:
    return any(getattr(k, "key", None) == "layers" for k in path)


def _shardings_like(tree, mesh: Mesh):
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(np.shape(x), fsdp, _is_stacked(path))), tree)


def param_shardings(tree, mesh: Mesh):
    return _shardings_like(tree, mesh)


def init_opt_state(tx, params, mesh: Mesh):
    """Optimizer state laid out like the params it mirrors (scalars replicated), as global arrays:
    an unconstrained init would leave step counters on one local device of each process."""
    shardings = _shardings_like(jax.eval_shape(tx.init, params), mesh)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def rows_over(mesh: Mesh | None):
    """Context for tracing a step: the model splits its activations by rows over `mesh`
    (trainer.model.qwen2.shard_rows), so FSDP gathers weights instead of replicating the batch."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def describe(mesh: Mesh, params) -> dict:
    """For run summaries: the mesh and how many parameter arrays are sharded (FSDP) vs replicated."""
    leaves = jax.tree.leaves(params)
    sharded = sum(not x.sharding.is_fully_replicated for x in leaves)
    return {"mesh": dict(mesh.shape), "params_sharded": sharded, "params_replicated": len(leaves) - sharded}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(tree, shardings):
    """Put host arrays that are identical on every process onto a (possibly global) sharding."""
    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def global_batch(rows: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """`rows` hold the FULL global batch on every process; each process feeds its own slice."""
    sharding = batch_sharding(mesh)
    return {k: place(v, sharding) for k, v in rows.items()}


def to_host(x) -> np.ndarray:
    """Fetch a (possibly multi-process) array to every host as numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def check_divisible(global_batch_size: int, mesh: Mesh, key: str) -> None:
    n = mesh.size
    if global_batch_size % n:
        raise ConfigError(f"{key}={global_batch_size} must be a multiple of the {n} devices in the mesh")
