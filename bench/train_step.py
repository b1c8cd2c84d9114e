"""Benchmark: the SFT train step (forward + backward + optimizer) against this machine's fp32 peak.

    python bench/train_step.py [--configs tiny,medium] [--repeats 5] [--batch medium=32] [--peak-sizes 512,1024,2048]

Prints one JSON line for the matmul peak, then one per model config, with tokens_per_s,
achieved_gflops, peak_gflops and mfu (= achieved / peak). The step is the real
`trainer.train.sft.make_steps` train_step (AdamW, clip 1.0, as the demo SFT) on params placed exactly
as `trainer.train.sft.run` places them; only the batch is random tokens (fully unpadded).

FLOPs per step (PaLM-style model FLOPs, the formula is echoed in the output):
    6 * N_body * B * T              every matmul weight of the decoder layers, all positions
  + 6 * d * V * B * R               LM head, only the R response positions (losses.py projects those)
  + 12 * L * B * T^2 * H * hd       attention scores and weighted values, forward + backward
Embedding lookups, norms, RoPE, softmax and the optimizer's elementwise work count as zero, so
mfu is a lower bound on how busy the FMA units are.

Peak: best of several jitted chains of square fp32 matmuls (the same XLA CPU backend and threads
as the train step). Timings take the best of `--repeats` runs after a compile/warm-up call, and
configs are timed round-robin so load drift on a shared machine does not favour one of them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.train import parallel  # noqa: E402
from trainer.config import DEFAULTS  # noqa: E402
from trainer.model.qwen2 import ModelConfig, build_model  # noqa: E402
from trainer.train.optim import build_optimizer  # noqa: E402
from trainer.train.sft import N_RESP, make_steps  # noqa: E402

# tiny: config/trainer/demo/base.yaml (vocab and length of the demo's BPE tokenizer + synthetic SIDs,
# prompts left-truncated to 128 tokens + 5 response tokens).
# medium: Qwen2.5 ratios (head_dim 64, 4 query heads per KV head, intermediate 5.5x hidden, tied
# embeddings) at hidden 512 x 8 layers; vocab of a BPE + 3x256 SID-codebook tokenizer.
CONFIGS = {
    "tiny": dict(model=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                            vocab_size=488), batch=32, seq=133),
    "medium": dict(model=dict(hidden_size=512, intermediate_size=2816, num_layers=8, num_heads=8, num_kv_heads=2,
                              vocab_size=4096), batch=16, seq=128),
}
FORMULA = "6*N_body*B*T + 6*d*V*B*R + 12*L*B*T^2*H*hd"


def matmul_peak_calls(sizes: list[int]) -> dict[int, tuple]:
    """Per size: (compiled call, FLOPs per call) of a dependent chain of n x n fp32 matmuls."""
    calls = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / np.sqrt(n)  # keeps values finite
        iters = max(4, int(2e10 / (2 * n ** 3)))  # ~20 GFLOP per call
        chain = jax.jit(lambda a, b, iters=iters: jax.lax.fori_loop(0, iters, lambda i, x: jnp.dot(x, b), a))
        chain(a, b).block_until_ready()  # compile
        calls[n] = (lambda chain=chain, a=a, b=b: chain(a, b).block_until_ready(), 2.0 * n ** 3 * iters)
    return calls


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(mcfg: ModelConfig, batch: int, seq: int) -> tuple[float, int]:
    """(model FLOPs of one train step by FORMULA, N_body)."""
    d, hd, h, kv, f = mcfg.hidden_size, mcfg.head_dim, mcfg.num_heads, mcfg.num_kv_heads, mcfg.intermediate_size
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    n_body = mcfg.num_layers * per_layer
    flops = 6 * n_body * batch * seq + 6 * d * mcfg.vocab_size * batch * N_RESP
    flops += 12 * mcfg.num_layers * batch * seq ** 2 * h * hd
    return float(flops), n_body


def build_step(name: str, batch: int | None):
    spec = CONFIGS[name]
    mcfg = ModelConfig(**spec["model"])
    batch = batch or spec["batch"]
    seq = spec["seq"]
    model = build_model(mcfg, seed=0)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    opt = json.loads(json.dumps(DEFAULTS["train"]["optimizer"]))
    opt["name"], opt["lr_schedule"]["peak_value"] = "adamw", 3e-3  # the demo SFT optimizer
    tx, _, _ = build_optimizer(opt, total_steps=1000)
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1})
    params = parallel.place(jax.device_get(params), parallel.param_shardings(params, mesh))
    opt_state = parallel.init_opt_state(tx, params, mesh)  # as trainer.train.sft.run
    train_step, _ = make_steps(graphdef, tx)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, mcfg.vocab_size, size=(batch, seq)).astype(np.int32)
    data = parallel.global_batch({"input_ids": ids, "attention_mask": np.ones_like(ids)}, mesh)
    carry = {"params": params, "opt_state": opt_state}

    def run_once():
        # The step donates nothing, so feeding its outputs back keeps every call a real update.
        carry["params"], carry["opt_state"], m = train_step(carry["params"], carry["opt_state"], data)
        jax.block_until_ready(m["loss"])

    flops, n_body = step_flops(mcfg, batch, seq)
    info = {"config": name, "model": spec["model"], "batch": batch, "seq": seq, "tokens_per_step": batch * seq,
            "n_body_params": n_body, "n_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "step_gflop": round(flops / 1e9, 3), "flops_formula": FORMULA}
    return run_once, flops, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,medium")
    p.add_argument("--batch", action="append", default=[], metavar="NAME=B", help="override a config's batch size")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per config (best is kept)")
    p.add_argument("--peak-sizes", default="512,1024,2048")
    args = p.parse_args(argv)
    batches = {k: int(v) for k, v in (b.split("=") for b in args.batch)}

    env = {"backend": jax.default_backend(), "devices": jax.device_count(), "cpus": os.cpu_count(),
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    load_before = os.getloadavg()[0]
    # Every timed thing is a (call, flops) pair; all are timed round-robin, best of `repeats` kept.
    timed = {f"peak_{n}": v for n, v in matmul_peak_calls([int(s) for s in args.peak_sizes.split(",")]).items()}
    steps = {n: build_step(n, batches.get(n)) for n in args.configs.split(",")}
    first_call = {}
    for n, (run_once, flops, _) in steps.items():
        first_call[n] = _timed(run_once)  # compile + first step
        timed[n] = (run_once, flops)
    best = {k: float("inf") for k in timed}
    for _ in range(args.repeats):
        for k, (call, _) in timed.items():
            best[k] = min(best[k], _timed(call))
    load = {"load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    by_size = {k[5:]: round(timed[k][1] / best[k] / 1e9, 1) for k in timed if k.startswith("peak_")}
    peak = max(by_size.values())
    print(json.dumps({"kind": "matmul_peak", "peak_gflops": peak, "by_size": by_size, **env, **load}), flush=True)
    for n, (_, flops, info) in steps.items():
        t = best[n]
        achieved = flops / t / 1e9
        print(json.dumps({"kind": "train_step", **info, "step_s": round(t, 4), "first_call_s": round(first_call[n], 2),
                          "tokens_per_s": round(info["tokens_per_step"] / t, 1), "achieved_gflops": round(achieved, 1),
                          "peak_gflops": peak, "mfu": round(achieved / peak, 3), **load}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
