"""Benchmark: our trie-constrained beam search against (a) a frozen copy of the decoder before the
shared-prefix cache and layer scan (bench/legacy_decoder.py) and (b) transformers `generate` run as
upstream MiniOneRec's evaluate.py runs it, all on the same exported tiny Qwen2 in the same process.

    python bench/decode.py [--runs 3 --ours-prompts 64 --hf-prompts 8 --beams 50 --prompt-len 160 ...]

(b) is upstream's procedure: left-padded batches of 4, GenerationConfig(num_beams=50,
num_return_sequences=50, length_penalty=0.0, max_new_tokens=256) to EOS, and upstream's own
`ConstrainedLogitsProcessor` (full-vocab log_softmax, then the trie mask) imported from
../shared/minionerec-upstream with a constraint table built as evaluate.py builds its hash_dict
(the response header's last 3 tokens, then a, b, c, the newline, EOS). Without that directory the
run stops: the comparison would not be upstream's.

Prints JSON lines:
1. `decode`: samples/s of ours, old and transformers (median of --runs timed runs each, after one
   compiling/warm-up run), speedups, identical top-K lists and max score difference on every
   compared prompt, KV-cache bytes per prompt before (old: the prompt cache copied per beam) and
   after (prompt once + each beam's <= 4 generated tokens), compile seconds, load average before
   and after (the machine is shared: read the numbers with it).
2. `decode_catalog`: per-step decode time for synthetic catalogs of 1k, 10k and 100k SIDs: the trie
   keeps per-step work bounded by the codebook size, not the catalog size.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import legacy_decoder  # noqa: E402
from trainer.decode.beam import _beam_search, constrained_beam_search  # noqa: E402
from trainer.decode.trie import LEVELS, build_trie, sid_index_lookup  # noqa: E402
from trainer.model import hf_io  # noqa: E402
from trainer.model.qwen2 import ModelConfig, build_model, init_gen_cache, params_dict  # noqa: E402

SHARED = Path(os.environ.get("SIDRL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
UPSTREAM = SHARED / "minionerec-upstream"
OFFICE_INFO = SHARED / "minionerec-data/data/Amazon/info/Office_Products_5_2016-10-2018-11.txt"
OFFICE_ITEMS = 3459
CODEBOOK = 256
TEXT_VOCAB = 1024  # ordinary (prompt) tokens: ids 0..1023
A0, B0, C0 = TEXT_VOCAB, TEXT_VOCAB + CODEBOOK, TEXT_VOCAB + 2 * CODEBOOK
NEWLINE, EOS = TEXT_VOCAB + 3 * CODEBOOK, TEXT_VOCAB + 3 * CODEBOOK + 1
VOCAB = EOS + 1
HEADER = (7, 8, 9)  # the prompts' last 3 tokens: stands for "### Response:\n", upstream's first hash key


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


def bench_model(seed: int):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=1024)
    model = build_model(cfg, seed=0)
    # Larger-than-init random weights: well-separated log-probs, so ranking comparisons are meaningful.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return cfg, model


def first_call(decode, prompts, batch) -> float:
    """Seconds of the first (compiling, warming) call on one batch."""
    t0 = time.perf_counter()
    jax.block_until_ready(decode(prompts[:batch]))
    return time.perf_counter() - t0


def timed_run(decode, prompts, batch):
    """decode(chunk) -> (rows, scores) over all prompts in batches: (rows, scores, seconds)."""
    rows, scores = [], []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        r, sc = decode(prompts[s:s + batch])
        rows.append(np.asarray(r))
        scores.append(np.asarray(sc))
    return np.concatenate(rows), np.concatenate(scores), time.perf_counter() - t0


def upstream_constraint(table: np.ndarray):
    """upstream evaluate.py's hash_dict, for token-id SIDs: the key at the first step is the prompt's
    last 3 tokens (the response header); later keys are the generated tokens so far."""
    allowed: dict[str, set] = {}
    for row in table.tolist():
        ids = list(HEADER) + row + [NEWLINE, EOS]
        for i in range(len(HEADER), len(ids)):
            key = ids[:i] if i == len(HEADER) else ids[len(HEADER):i]
            allowed.setdefault("-".join(map(str, key)), set()).add(ids[i])
    allowed = {k: sorted(v) for k, v in allowed.items()}
    return lambda batch_id, hash_key: allowed.get("-".join(str(t) for t in hash_key), [])


def hf_decoder(tm, table: np.ndarray, beams: int):
    """transformers generate exactly as upstream's evaluate.py drives it (see module docstring)."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    sys.path.insert(0, str(UPSTREAM))
    from LogitProcessor import ConstrainedLogitsProcessor  # upstream's own file

    fn = upstream_constraint(table)
    lookup = sid_index_lookup(table)
    config = GenerationConfig(num_beams=beams, length_penalty=0.0, num_return_sequences=beams, pad_token_id=EOS,
                              eos_token_id=EOS, max_new_tokens=256)

    def decode(chunk):
        with torch.no_grad():
            processor = ConstrainedLogitsProcessor(prefix_allowed_tokens_fn=fn, num_beams=beams, base_model="qwen")
            out = tm.generate(torch.tensor(chunk, dtype=torch.long),
                              attention_mask=torch.ones(chunk.shape, dtype=torch.long), generation_config=config, return_dict_in_generate=True, output_scores=True,
                              logits_processor=LogitsProcessorList([processor]))
        gen = out.sequences[:, chunk.shape[1]:].numpy()
        rows = np.array([lookup.get(tuple(s[:LEVELS]), -1) for s in gen.tolist()]).reshape(len(chunk), beams)
        return rows, out.sequences_scores.numpy().reshape(len(chunk), beams)

    return decode


def cache_bytes_per_prompt(cfg: ModelConfig, model, prompt_len: int, beams: int) -> dict:
    """KV-cache bytes one prompt holds during a beam search, from the real arrays' shapes."""
    ids = jax.ShapeDtypeStruct((1, prompt_len), jnp.int32)
    _, prompt = nnx.eval_shape(lambda m, i: m.prefill(i, jnp.ones_like(i)), model, ids)
    gen = jax.eval_shape(lambda: init_gen_cache(cfg, 1, beams, LEVELS + 1))
    old = jax.eval_shape(lambda: legacy_decoder.init_cache(cfg, beams, prompt_len + LEVELS + 1))
    nbytes = lambda *xs: int(sum(x.size * x.dtype.itemsize for x in xs))  # noqa: E731
    return {"kv_bytes_per_prompt_old": nbytes(old.k, old.v),
            "kv_bytes_per_prompt_ours": nbytes(prompt.k, prompt.v, gen.k, gen.v)}


def per_step_times(model, prompts, beams, batch, sizes, repeats):
    """ms per generated token (4 fed per SID) after subtracting the catalog-independent prefill.

    Sizes are timed round-robin and the best of `repeats` kept, so load drift on a shared machine
    does not favour one size.
    """
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda st, ids, m: nnx.merge(graphdef, st).prefill(ids, m))
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
    result = {"bench": "decode_catalog", "prefill_ms": round(best["prefill"] * 1e3, 2), "batch": batch,
              "num_beams": beams}
    for n, trie in tries.items():
        result[f"step_ms_{n // 1000}k"] = round((best[n] - best["prefill"]) / (LEVELS + 1) * 1e3, 3)
        result[f"call_ms_{n // 1000}k"] = round(best[n] * 1e3, 2)
        result[f"widths_{n // 1000}k"] = list(trie.widths)
    first, last = sizes[0] // 1000, sizes[-1] // 1000
    result[f"ratio_{last}k_vs_{first}k"] = round(result[f"step_ms_{last}k"] / result[f"step_ms_{first}k"], 3)
    return result


def agreement(a_rows, a_scores, b_rows, b_scores) -> dict:
    same = (a_rows == b_rows).all(axis=1)
    return {"identical_topk": bool(same.all()), "identical_prompts": f"{int(same.sum())}/{len(same)}",
            "max_score_diff": float(np.abs(a_scores - b_scores).max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beams", type=int, default=50)
    p.add_argument("--prompt-len", type=int, default=160)
    p.add_argument("--ours-prompts", type=int, default=64)
    p.add_argument("--ours-batch", type=int, default=16)
    p.add_argument("--hf-prompts", type=int, default=8)
    p.add_argument("--hf-batch", type=int, default=4, help="upstream evaluate.py's default batch_size")
    p.add_argument("--runs", type=int, default=3, help="timed runs per decoder (the median is reported)")
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-catalog", action="store_true", help="only the first JSON line")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (UPSTREAM / "LogitProcessor.py").is_file():
        raise SystemExit(f"{UPSTREAM}/LogitProcessor.py not found: the transformers side must run upstream's "
                         "ConstrainedLogitsProcessor (set SIDRL_SHARED to the directory holding minionerec-upstream)")

    import torch
    import transformers

    load_before = os.getloadavg()
    cfg, model = bench_model(args.seed)
    table, catalog = office_table()
    trie = build_trie(table)
    rng = np.random.default_rng(args.seed)
    n = max(args.ours_prompts, args.hf_prompts)
    prompts = rng.integers(10, TEXT_VOCAB, size=(n, args.prompt_len)).astype(np.int32)
    prompts[:, -len(HEADER):] = HEADER

    ones = lambda chunk: np.ones_like(chunk)  # noqa: E731
    ours = lambda c: constrained_beam_search(model, c, ones(c), trie, args.beams, NEWLINE, EOS)  # noqa: E731
    legacy = legacy_decoder.from_stacked(cfg, jax.device_get(params_dict(model)))
    old = lambda c: legacy_decoder.beam_search(legacy, c, ones(c), trie, args.beams, NEWLINE, EOS)  # noqa: E731

    # Interleave ours and old run by run so load drift on the shared machine hits both alike.
    mine, theirs = prompts[:args.ours_prompts], prompts[:args.hf_prompts]
    first = {"ours": first_call(ours, mine, args.ours_batch), "old": first_call(old, mine, args.ours_batch)}
    ours_s, old_s, hf_s = [], [], []
    for _ in range(args.runs):
        o_rows, o_scores, s = timed_run(ours, mine, args.ours_batch)
        ours_s.append(s)
        l_rows, l_scores, s = timed_run(old, mine, args.ours_batch)
        old_s.append(s)
    with tempfile.TemporaryDirectory() as tmp:
        hf_io.export_hf(params_dict(model), cfg, tmp)
        tm = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        hf = hf_decoder(tm, table, args.beams)
        first["hf"] = first_call(hf, theirs, args.hf_batch)
        for _ in range(args.runs):
            h_rows, h_scores, s = timed_run(hf, theirs, args.hf_batch)
            hf_s.append(s)
    k = args.hf_prompts
    ours_sps = args.ours_prompts / statistics.median(ours_s)
    old_sps = args.ours_prompts / statistics.median(old_s)
    hf_sps = args.hf_prompts / statistics.median(hf_s)
    print(json.dumps({
        "bench": "decode", "catalog": catalog, "num_sids": int(trie.num_sids), "trie_widths": list(trie.widths),
        "num_beams": args.beams, "prompt_len": args.prompt_len, "backend": jax.default_backend(),
        "threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count()},
        "ours_prompts": args.ours_prompts, "hf_prompts": args.hf_prompts, "runs": args.runs,
        "ours_samples_per_s": round(ours_sps, 2), "old_samples_per_s": round(old_sps, 2),
        "hf_samples_per_s": round(hf_sps, 3),
        "speedup_vs_old": round(ours_sps / old_sps, 2), "speedup_vs_hf": round(ours_sps / hf_sps, 1),
        "ours_run_s": [round(x, 3) for x in ours_s], "old_run_s": [round(x, 3) for x in old_s],
        "hf_run_s": [round(x, 3) for x in hf_s],
        "vs_old": agreement(o_rows, o_scores, l_rows, l_scores),
        "vs_hf": agreement(o_rows[:k], o_scores[:k], h_rows, h_scores),
        **cache_bytes_per_prompt(cfg, model, args.prompt_len, args.beams),
        "first_call_s": {k: round(v, 2) for k, v in first.items()},
        "compiled_programs_ours": _beam_search._cache_size(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }), flush=True)
    if not args.skip_catalog:
        sizes = [int(s) for s in args.sizes.split(",")]
        print(json.dumps(per_step_times(model, prompts, args.beams, args.ours_batch, sizes, args.repeats)
                         | {"loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
