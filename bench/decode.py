"""Benchmark: our jitted trie-constrained beam search vs transformers `generate` with
`prefix_allowed_tokens_fn` (how MiniOneRec evaluates), on the same exported tiny Qwen2.

    python bench/decode.py [--ours-prompts 64 --hf-prompts 8 --beams 50 ...]

Prints two JSON lines:
1. Office-sized catalog (the real Office info file when present, else 3,459 synthetic SIDs):
   ours_samples_per_s, hf_samples_per_s, speedup, identical_topk (same SIDs in the same order on
   every prompt both decoded).
2. Per-step decode time for synthetic catalogs of 1k, 10k and 100k SIDs (same model, prompts,
   batch): the trie keeps the per-step work bounded by the codebook size, not the catalog size.

Timings exclude compilation (one warm-up call first); both sides use this machine's CPU threads.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.model import hf_io  # noqa: E402
from trainer.decode.beam import _prefill, constrained_beam_search  # noqa: E402
from trainer.model.qwen2 import ModelConfig, build_model, params_dict  # noqa: E402
from trainer.decode.trie import build_trie, hf_prefix_allowed_tokens_fn, sid_index_lookup  # noqa: E402

OFFICE_INFO = Path("/work/shared/minionerec-data/data/Amazon/info/Office_Products_5_2016-10-2018-11.txt")
OFFICE_ITEMS = 3459
CODEBOOK = 256
TEXT_VOCAB = 1024  # ordinary (prompt) tokens: ids 0..1023
A0, B0, C0 = TEXT_VOCAB, TEXT_VOCAB + CODEBOOK, TEXT_VOCAB + 2 * CODEBOOK
NEWLINE, EOS = TEXT_VOCAB + 3 * CODEBOOK, TEXT_VOCAB + 3 * CODEBOOK + 1
VOCAB = EOS + 1


def office_table() -> tuple[np.ndarray, str]:
    """Distinct SIDs of the Office info file as token ids, or a synthetic catalog of that size."""
    if OFFICE_INFO.is_file():
        sids = list(dict.fromkeys(line.split("\t")[0].strip() for line in OFFICE_INFO.read_text().splitlines()
                                  if line.strip()))
        rows = [[int(part.split("_")[1]) for part in sid.strip("<>").split("><")] for sid in sids]
        return np.array(rows, np.int32) + np.array([A0, B0, C0], np.int32), f"office ({OFFICE_INFO.name})"
    return synthetic_table(OFFICE_ITEMS, seed=0), f"synthetic ({OFFICE_ITEMS} SIDs)"


def synthetic_table(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, CODEBOOK, size=(int(n * 1.2) + 100, 3)), axis=0)
    codes = codes[rng.permutation(len(codes))[:n]]
    assert len(codes) == n
    return codes.astype(np.int32) + np.array([A0, B0, C0], np.int32)


def bench_model(args):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=1024)
    model = build_model(cfg, seed=0)
    # Larger-than-init random weights: well-separated log-probs, so ranking comparisons are meaningful.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(args.seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return cfg, model


def ours_decode(model, prompts, trie, beams, batch):
    """Decode all prompts in batches; returns (rows [N, beams], seconds excluding compile)."""
    mask = np.ones_like(prompts[:batch])
    jax.block_until_ready(constrained_beam_search(model, prompts[:batch], mask, trie, beams, NEWLINE, EOS))  # compile
    out = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        rows, _ = constrained_beam_search(model, prompts[s:s + batch], mask, trie, beams, NEWLINE, EOS)
        out.append(np.asarray(rows))
    return np.concatenate(out), time.perf_counter() - t0


def hf_decode(tm, prompts, table, beams, batch):
    import torch

    fn = hf_prefix_allowed_tokens_fn(table, prompts.shape[1], NEWLINE, EOS)
    lookup = sid_index_lookup(table)

    def run(chunk):
        with torch.no_grad():
            seqs = tm.generate(torch.tensor(chunk, dtype=torch.long), attention_mask=torch.ones(chunk.shape, dtype=torch.long),
                               num_beams=beams, num_return_sequences=beams, do_sample=False, length_penalty=0.0,
                               max_new_tokens=4, early_stopping=True, prefix_allowed_tokens_fn=fn,
                               eos_token_id=EOS, pad_token_id=EOS)
        gen = seqs[:, prompts.shape[1]:].numpy().reshape(len(chunk), beams, 4)
        return np.array([[lookup.get(tuple(s[:3]), -1) for s in row] for row in gen.tolist()])

    run(prompts[:1])  # warm-up
    out = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        out.append(run(prompts[s:s + batch]))
    return np.concatenate(out), time.perf_counter() - t0


def per_step_times(model, prompts, beams, batch, sizes, repeats):
    """ms per generated token (4 per SID) after subtracting the catalog-independent prefill.

    Sizes are timed round-robin and the best of `repeats` kept, so load drift on a shared machine
    does not favour one size.
    """
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda st, ids, m: _prefill(nnx.merge(graphdef, st), ids, m))
    ids, mask = jnp.asarray(prompts[:batch]), jnp.ones(prompts[:batch].shape, jnp.int32)
    tries = {n: build_trie(synthetic_table(n, seed=n)) for n in sizes}
    calls = {"prefill": lambda: prefill(state, ids, mask)}
    for n, trie in tries.items():
        calls[n] = functools.partial(constrained_beam_search, model, ids, mask, trie, beams, NEWLINE, EOS)
    best = {}
    for fn in calls.values():
        jax.block_until_ready(fn())  # compile
    for _ in range(repeats):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)

    result = {"prefill_ms": round(best["prefill"] * 1e3, 2), "batch": batch, "num_beams": beams}
    for n, trie in tries.items():
        result[f"step_ms_{n // 1000}k"] = round((best[n] - best["prefill"]) / 4 * 1e3, 3)
        result[f"call_ms_{n // 1000}k"] = round(best[n] * 1e3, 2)
        result[f"widths_{n // 1000}k"] = list(trie.widths)
    first, last = sizes[0] // 1000, sizes[-1] // 1000
    result[f"ratio_{last}k_vs_{first}k"] = round(result[f"step_ms_{last}k"] / result[f"step_ms_{first}k"], 3)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beams", type=int, default=50)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--ours-prompts", type=int, default=64)
    p.add_argument("--ours-batch", type=int, default=16)
    p.add_argument("--hf-prompts", type=int, default=8)
    p.add_argument("--hf-batch", type=int, default=4)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    import transformers

    cfg, model = bench_model(args)
    table, catalog = office_table()
    trie = build_trie(table)
    rng = np.random.default_rng(args.seed)
    n = max(args.ours_prompts, args.hf_prompts)
    prompts = rng.integers(0, TEXT_VOCAB, size=(n, args.prompt_len)).astype(np.int32)

    ours_rows, ours_s = ours_decode(model, prompts[:args.ours_prompts], trie, args.beams, args.ours_batch)
    with tempfile.TemporaryDirectory() as tmp:
        hf_io.export_hf(params_dict(model), cfg, tmp)
        tm = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        hf_rows, hf_s = hf_decode(tm, prompts[:args.hf_prompts], table, args.beams, args.hf_batch)
    k = min(args.ours_prompts, args.hf_prompts)
    same = (ours_rows[:k] == hf_rows[:k]).all(axis=1)
    ours_sps, hf_sps = args.ours_prompts / ours_s, args.hf_prompts / hf_s
    print(json.dumps({
        "catalog": catalog, "num_sids": int(trie.num_sids), "trie_widths": list(trie.widths),
        "num_beams": args.beams, "prompt_len": args.prompt_len, "backend": jax.default_backend(),
        "ours_prompts": args.ours_prompts, "hf_prompts": args.hf_prompts,
        "ours_samples_per_s": round(ours_sps, 2), "hf_samples_per_s": round(hf_sps, 3),
        "speedup": round(ours_sps / hf_sps, 1), "identical_topk": bool(same.all()),
        "identical_prompts": f"{int(same.sum())}/{k}",
    }), flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(json.dumps(per_step_times(model, prompts, args.beams, args.ours_batch, sizes, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
