"""Train a tiny model a few SFT steps on a given mesh (argv: data fsdp [dropout]); print the final
params' checksum as JSON.

Run in a fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=N (tests/test_parallel.py).
"""
import json
import sys

import jax
import numpy as np
from flax import nnx

from trainer.train import parallel
from trainer.model.qwen2 import ModelConfig, build_model
from trainer.train.optim import build_optimizer
from trainer.train.sft import make_steps

data, fsdp = int(sys.argv[1]), int(sys.argv[2])
dropout = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0  # sft.dropout: its masks must not depend on the mesh
mesh = parallel.make_mesh({"data": data, "fsdp": fsdp})
cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
graphdef, state = nnx.split(build_model(cfg, 0))
params = parallel.place(jax.device_get(state.to_pure_dict()), parallel.param_shardings(state.to_pure_dict(), mesh))
opt = {"name": "adamw", "clip_norm": 1.0, "weight_decay": 0.0,
       "lr_schedule": {"type": "constant", "peak_value": 1e-2, "warmup_ratio": 0.0, "warmup_steps": None,
                       "init_value": 0.0, "end_value": 0.0}}
tx, _, _ = build_optimizer(opt, 4)
opt_state = parallel.init_opt_state(tx, params, mesh)
train_step, _ = make_steps(graphdef, tx, mesh, dropout)
rng = np.random.default_rng(0)
for step in range(4):
    ids = rng.integers(1, 64, size=(8, 12)).astype(np.int32)
    batch = parallel.global_batch({"input_ids": ids, "attention_mask": np.ones_like(ids)}, mesh)
    params, opt_state, m = train_step(params, opt_state, batch, jax.random.fold_in(jax.random.key(0), step))
emb = params["embed_tokens"]["embedding"]
leaves = [np.asarray(parallel.to_host(x)) for x in jax.tree.leaves(params)]
print(json.dumps({"devices": len(jax.devices()), "emb_spec": str(emb.sharding.spec),
                  "loss": float(m["loss"]), "sums": [float(np.abs(x).sum()) for x in leaves]}))
