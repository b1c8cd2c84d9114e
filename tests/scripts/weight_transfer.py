"""One process of tests/test_weight_transfer.py: process 0 sends a param-like tree to every process
straight into an FSDP sharding over all processes, then the tree comes back to process 0 alone.
Prints one JSON line: what this process saw."""
import json

import jax
import ml_dtypes
import numpy as np

from trainer.model.checkpoint import host_tree_on_main
from trainer.train import distributed, parallel

distributed.init_from_env()
rng = np.random.default_rng(0)  # every process can rebuild the expected values, only process 0 sends them
tree = {"embed": rng.normal(size=(16, 6)).astype(ml_dtypes.bfloat16), "norm": rng.normal(size=(6,)).astype(np.float32),
        "layers": {0: {"kernel": rng.normal(size=(6, 8)).astype(np.float32)}}, "count": np.array(3, np.int32)}
template = distributed.on_main(distributed.array_template, tree)
mesh = parallel.make_mesh({"data": 1, "fsdp": jax.device_count()})
shardings = parallel.param_shardings(template, mesh)
placed = distributed.broadcast_arrays(tree if distributed.is_main() else None, template, shardings)
local_ok = all(np.array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])
               for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(tree)) for shard in got.addressable_shards)
back = host_tree_on_main(placed)
print(json.dumps({
    "process": jax.process_index(), "local_shards_match": local_ok,
    "sharded": [not x.is_fully_replicated for x in jax.tree.leaves(placed)],
    "dtypes": [str(x.dtype) for x in jax.tree.leaves(placed)],
    "back": None if back is None else all(a.dtype == b.dtype and np.array_equal(a, b)
                                          for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)))}))
