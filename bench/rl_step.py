"""Benchmark: one GRPO step of the RL loop, phase by phase, for the tiny demo model.

    python bench/rl_step.py [--batch 8 --n 8 --mode beam --steps 5 --prompt-len 64 --num-sids 120]

Prints one JSON line: mean seconds per step of each phase, after warm-up (compilation) steps:
  rollout    trie-constrained beam search / sampling of G completions per prompt
  rollout_old  (beam mode) the same rollout by a frozen copy of the decoder before the shared
             prompt cache and layer scan (bench/legacy_decoder.py), on the same params and prompts
             in the same step, with `rollout_same_as_old` saying the outputs were identical
  reward     the reward function (rl.reward) on the rollout
  advantage  group-normalised advantages
  logprobs   building prompt+completion rows and the old/reference log-probs (the loop counts
             this in its "advantage" phase)
  update     rl.updates_per_rollout optimizer steps
and samples_per_s = batch * n / step seconds. Uses the same jitted functions as trainer.rl.loop
(random weights and a random catalog: timings do not depend on what the model learned).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import legacy_decoder  # noqa: E402
from trainer.train import parallel  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.model.qwen2 import ModelConfig, build_model  # noqa: E402
from trainer.train.optim import build_optimizer  # noqa: E402
from trainer.rl import advantage, reward, rollout, update  # noqa: E402
from trainer.rl.loop import make_step_fns  # noqa: E402
from trainer.decode.trie import build_trie  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXT_VOCAB, CODEBOOK = 400, 32  # prompt tokens 0..399, then 3 code levels, then the newline and EOS


def _catalog(num_sids: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, CODEBOOK, size=(num_sids * 2, 3)), axis=0)[:num_sids]
    return (codes + TEXT_VOCAB + np.arange(3) * CODEBOOK).astype(np.int32)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="prompts per step (rollout.batch_size)")
    p.add_argument("--n", type=int, default=8, help="completions per prompt (rollout.n)")
    p.add_argument("--mode", default="beam", choices=rollout.MODES)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--num-sids", type=int, default=120)
    args = p.parse_args(argv)

    cfg = load_config([REPO / "config/trainer/demo/base.yaml", REPO / "config/trainer/demo/rl.yaml"],
                      [f"rollout.batch_size={args.batch}", f"rollout.n={args.n}", f"rollout.mode={args.mode}"])
    table = _catalog(args.num_sids, cfg["seed"])
    newline = TEXT_VOCAB + 3 * CODEBOOK
    mcfg = ModelConfig.from_dict(cfg["model"], vocab_size=newline + 2)
    graphdef, state = nnx.split(build_model(mcfg, cfg["seed"]))
    host_params = jax.device_get(nnx.to_pure_dict(state))

    mesh = parallel.make_mesh(cfg["mesh"])
    shardings = parallel.param_shardings(host_params, mesh)
    params = parallel.place(host_params, shardings)
    with_ref = update.needs_reference(cfg["rl"]["kl_coef"])  # as trainer.rl.loop: only what the loss uses
    with_old = update.needs_old_logprobs(cfg["rl"]["updates_per_rollout"])
    ref_params = parallel.place(host_params, shardings) if with_ref else None
    tx, _, _ = build_optimizer(cfg["train"]["optimizer"], args.warmup + args.steps)
    opt_state = parallel.init_opt_state(tx, params, mesh)
    state_shardings = (shardings, jax.tree.map(lambda x: x.sharding, opt_state))
    logprobs, update_step, _, build_sequences = make_step_fns(graphdef, tx, cfg, mesh, state_shardings)
    rep = parallel.replicated(mesh)
    trie = jax.tree.map(lambda x: parallel.place(x, rep), build_trie(table))
    sid_table = parallel.place(table, rep)
    reward_fn = jax.jit(reward.get(cfg["rl"]["reward"]))
    adv_fn = jax.jit(lambda r: advantage.group_advantages(r, float(cfg["rl"]["adv_eps"])))
    rng = np.random.default_rng(1)

    times = {k: [] for k in ("rollout", "reward", "advantage", "logprobs", "update")}
    old_times, same_as_old = [], True
    for step in range(args.warmup + args.steps):
        ids = rng.integers(0, TEXT_VOCAB, size=(args.batch, args.prompt_len)).astype(np.int32)
        prompt_ids = parallel.place(ids, rep)
        prompt_mask = parallel.place(np.ones_like(ids), rep)
        targets = parallel.place(rng.integers(0, len(table), size=args.batch).astype(np.int32), rep)
        t = {}
        sid_index, t["rollout"] = _timed(rollout.rollout, graphdef, params, prompt_ids, prompt_mask, trie,
                                         cfg["rollout"], newline, newline + 1, jax.random.key(step))
        if args.mode == "beam":  # before/after in the same step, same inputs (not part of the step)
            legacy = legacy_decoder.from_stacked(mcfg, jax.device_get(params))
            (old_index, _), old_s = _timed(legacy_decoder.beam_search, legacy, prompt_ids, prompt_mask, trie,
                                           args.n, newline, newline + 1)
            same_as_old &= bool((np.asarray(old_index) == np.asarray(sid_index)).all())
            if step >= args.warmup:
                old_times.append(old_s)
        rewards, t["reward"] = _timed(reward_fn, sid_index, targets)
        adv, t["advantage"] = _timed(adv_fn, rewards)

        def rows():
            seq, mask, adv_rows = build_sequences(prompt_ids, prompt_mask, sid_table, sid_index, adv, newline)
            out = {"input_ids": seq, "attention_mask": mask, "advantages": adv_rows}
            if with_old:
                out["old_logp"] = logprobs(params, seq, mask)
            if with_ref:
                out["ref_logp"] = logprobs(ref_params, seq, mask)
            return jax.block_until_ready(out)
        batch, t["logprobs"] = _timed(rows)

        def updates(params, opt_state):
            for _ in range(int(cfg["rl"]["updates_per_rollout"])):
                params, opt_state, _ = update_step(params, opt_state, batch)
            return params, opt_state
        (params, opt_state), t["update"] = _timed(updates, params, opt_state)
        if step >= args.warmup:
            for k, v in t.items():
                times[k].append(v)

    per_phase = {f"{k}_s": float(np.mean(v)) for k, v in times.items()}
    step_s = sum(per_phase.values())
    result = {"bench": "rl_step", "mode": args.mode, "batch": args.batch, "n": args.n,
              "prompt_len": args.prompt_len, "num_sids": len(table), "reward": cfg["rl"]["reward"],
              **per_phase, "step_s": step_s,
              **({"rollout_old_s": float(np.mean(old_times)),
                  "rollout_speedup": float(np.mean(old_times)) / per_phase["rollout_s"],
                  "rollout_same_as_old": same_as_old} if old_times else {}),
              "loadavg": [round(x, 2) for x in os.getloadavg()], "samples_per_s": args.batch * args.n / step_s,
              "timed_steps": args.steps, "params": int(sum(x.size for x in jax.tree.leaves(host_params))),
              "backend": jax.default_backend(), "devices": jax.device_count()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
