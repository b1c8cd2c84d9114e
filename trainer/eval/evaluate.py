"""`python -m trainer eval`: constrained beam search over a split, predictions and metrics.

    python -m trainer eval --config C --data DIR --checkpoint X.msgpack --tokenizer TOKDIR --out OUTDIR \
        [--set eval.num_beams=50 --set eval.split=test ...]

Writes OUTDIR/eval_predictions.json (MiniOneRec calc.py format: one record per split row, in split
order, with `input` = prompt text, `output` = target SID + "\\n", `predict` = num_beams distinct SIDs
best first) and OUTDIR/run_summary.json (eval/hr@K, eval/ndcg@K, eval/invalid_prediction_count, ...).

Multi-process: process 0 reads every file (config, data, tokenizer, checkpoint) and broadcasts the
token arrays and params; each process decodes its own contiguous slice of rows (sharded over its
local devices); process 0 gathers the predictions and writes the outputs. `eval.batch_size` is
the number of prompts one process decodes per call.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from trainer.train import distributed
from trainer.data.batching import left_pad, length_bucket
from trainer.data import TOKENIZER_FILES
from trainer.cli import base_parser
from trainer.config import ConfigError, load_config
from trainer.decode.beam import check_num_beams, compiled_programs, constrained_beam_search
from trainer.errors import PredictionError, UserError
from trainer.io_utils import atomic_write_json, md5_file, setup_logging
from trainer.eval.metrics import compute_metrics
from trainer.model.qwen2 import ModelConfig, build_model, matmul_weights_in_compute_dtype
from trainer.decode.trie import SidTrie, build_trie
from trainer.train.train_state import PREVIOUS_DIR, retire_outputs

log = logging.getLogger("trainer")
PREDICTIONS_FILE = "eval_predictions.json"
SUMMARY_FILE = "run_summary.json"


def _local_mesh() -> Mesh | None:
    devices = jax.local_devices()
    return Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None


def predict_sid_rows(model, prompts: list[list[int]], pad_id: int, trie: SidTrie, num_beams: int, newline_id: int,
                     eos_id: int, batch_size: int, progress: bool = False,
                     stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Beam-search every prompt (token id lists) in fixed-shape batches.

    Returns (sid_rows int32 [N, num_beams], scores float32 [N, num_beams]) in prompt order; rows
    index the SID table the trie was built from. Prompts are grouped by length bucket
    (batching.length_bucket, a fixed ladder) so short prompts are not padded to the longest one;
    each bucket is one [batch, length] shape, one compiled program. `stats`, when given, gets
    `length_buckets` {length: prompts} and `compiles` (programs compiled by this call).
    """
    check_num_beams(trie, num_beams)
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size={batch_size}: must be >= 1")
    n = len(prompts)
    if n == 0:
        return np.zeros((0, num_beams), np.int32), np.zeros((0, num_beams), np.float32)
    mesh = _local_mesh()
    if mesh is not None:  # shard each batch over this process's devices, replicate the weights
        batch_size = math.ceil(batch_size / mesh.size) * mesh.size
        graphdef, state = nnx.split(model)  # a replicated copy; the caller's model is left as is
        model = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(length_bucket(len(p)), []).append(i)
    batches = [(length, idx[s:s + batch_size]) for length, idx in sorted(buckets.items())
               for s in range(0, len(idx), batch_size)]
    compiled_before = compiled_programs()
    sid_rows = np.zeros((n, num_beams), np.int32)
    sc = np.zeros((n, num_beams), np.float32)
    for length, idx in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        chunk = [prompts[i] for i in idx]
        chunk = chunk + [chunk[0]] * (batch_size - len(chunk))  # pad the last batch; dropped below
        ids, mask = left_pad(chunk, pad_id, length)
        if mesh is not None:
            ids, mask = jax.device_put((ids, mask), NamedSharding(mesh, P("data")))
        rows, scores = constrained_beam_search(model, ids, mask, trie, num_beams, newline_id, eos_id)
        sid_rows[idx], sc[idx] = np.asarray(rows)[:len(idx)], np.asarray(scores)[:len(idx)]
    if stats is not None:
        stats["length_buckets"] = {length: len(idx) for length, idx in sorted(buckets.items())}
        stats["compiles"] = compiled_programs() - compiled_before
    _check_beams(sid_rows, sc)
    return sid_rows, sc


def _check_beams(sid_rows: np.ndarray, scores: np.ndarray) -> None:
    """Constrained decoding guarantees distinct valid SIDs; stop loudly if that is ever broken."""
    bad = ~np.isfinite(scores).all(axis=1)
    bad |= np.array([len(set(r.tolist())) != len(r) for r in sid_rows], bool)
    if bad.any():
        i = int(np.argmax(bad))
        raise PredictionError(f"beam search returned invalid or duplicate SIDs for prompt {i} "
                              f"(rows {sid_rows[i].tolist()}, scores {scores[i].tolist()}); this is a bug")


def encode_prompts(tok, examples, max_prompt_len: int | None, wording: str) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, token ids) of the next-item prompts in `wording` (prompts.EVAL_PROMPTS)."""
    from trainer.data.prompts import sequential_prompt
    from trainer.data.tokenizer import encode_prompt

    prompts = [sequential_prompt(ex.history_sids, wording) for ex in examples]
    return [p.text for p in prompts], [encode_prompt(tok, p, max_prompt_len or 1 << 30) for p in prompts]


def build_records(texts: list[str], targets: list[str], sid_rows: np.ndarray, sids: list[str]) -> list[dict]:
    """calc.py records: prompt text, target SID + newline, the beams' SIDs best first."""
    return [{"input": text, "output": target + "\n", "predict": [sids[j] for j in row]}
            for text, target, row in zip(texts, targets, sid_rows.tolist())]


def evaluate_examples(model, tok, catalog, examples, num_beams: int, batch_size: int,
                      max_prompt_len: int | None = None, progress: bool = False, *,
                      wording: str) -> tuple[list[dict], dict]:
    """Single-process evaluation (tests, benchmarks): (prediction records, compute_metrics dict)."""
    from trainer.data.tokenizer import newline_id, sid_token_table

    trie = build_trie(sid_token_table(tok, catalog.sids))
    texts, prompts = encode_prompts(tok, examples, max_prompt_len, wording)
    sid_rows, _ = predict_sid_rows(model, prompts, tok.pad_token_id, trie, num_beams, newline_id(tok),
                                   tok.eos_token_id, batch_size, progress)
    records = build_records(texts, [ex.target_sid for ex in examples], sid_rows, catalog.sids)
    return records, compute_metrics(records, set(catalog.sids))


# ----------------------------------------------------------------------------- CLI

def verify_eval_copy(receipt: str | Path, checkpoint: str | Path, tokenizer_dir: str | Path) -> None:
    """The local eval copy must be byte-identical to what the GCS receipt records.

    Snakemake only compares timestamps: a corrupted or edited eval copy is newer than its inputs,
    so it would simply be evaluated as if it were the trained checkpoint. Checked on process 0
    before anything is loaded.
    """
    from trainer.errors import HandoffError
    from trainer.ops.handoff import load_receipt, verify_local

    listed = {e["name"] for e in load_receipt(receipt)["files"]}
    paths = [Path(checkpoint)] + [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if n in listed]
    for path in paths:
        try:
            verify_local(receipt, path.name, path)
        except HandoffError as e:
            raise HandoffError(f"eval copy rejected: {e}. In the workflow: delete {path} and rerun snakemake with "
                               "`--forcerun eval_copy` (downloads it again from GCS; nothing is retrained)") from None


def _load_inputs(args) -> dict:
    """Process 0: read config, data, tokenizer and checkpoint; everything followers need."""
    from trainer.data import readers as dt
    from trainer.data.tokenizer import load_tokenizer, newline_id, sid_token_table
    from trainer.model import resolve

    cfg = load_config(args.config, args.overrides, "eval")
    ev = cfg["eval"]
    data_dir = args.data or cfg["data"]["dir"]
    tok_dir = args.tokenizer or cfg["tokenizer"]["path"]
    if not tok_dir:
        raise ConfigError("no tokenizer: pass --tokenizer DIR (the checkpoint's tokenizer files) or set tokenizer.path")
    if args.receipt:
        verify_eval_copy(args.receipt, args.checkpoint, tok_dir)
    catalog = dt.load_catalog(data_dir)
    examples = dt.read_split(data_dir, ev["split"], catalog, cfg["data"]["max_history"])
    if ev["max_samples"] is not None:
        examples = examples[: int(ev["max_samples"])]
    if not examples:
        raise ConfigError(f"{data_dir}: split '{ev['split']}' has no rows to evaluate")
    tok = load_tokenizer(tok_dir)
    sid_table = sid_token_table(tok, catalog.sids)
    check_num_beams(build_trie(sid_table), int(ev["num_beams"]))
    model_cfg, params = resolve.load_checkpoint(args.checkpoint, cfg["model"], len(tok))  # the checkpoint's model
    params = matmul_weights_in_compute_dtype(params, model_cfg)  # same scores, half the weight reads in bf16
    texts, prompts = encode_prompts(tok, examples, cfg["data"]["max_prompt_len"], ev["prompt"])
    return {
        "cfg": cfg, "model_cfg": model_cfg.to_dict(), "params": params,
        "prompts": prompts, "texts": texts, "targets": [ex.target_sid for ex in examples],
        "sids": catalog.sids, "sid_table": sid_table, "newline_id": newline_id(tok), "pad_id": tok.pad_token_id,
        "eos_id": tok.eos_token_id,
        "checkpoint_md5": md5_file(args.checkpoint), "data_dir": str(data_dir), "tokenizer": str(tok_dir),
    }


def _gather_rows(local: np.ndarray, per_process: int) -> np.ndarray:
    """Concatenate every process's [rows, K] slice in process order (on every process)."""
    if distributed.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    padded = np.zeros((per_process,) + local.shape[1:], local.dtype)
    padded[: len(local)] = local
    stacked = np.asarray(multihost_utils.process_allgather(padded, tiled=False))  # [procs, rows, K]
    return stacked.reshape((-1,) + local.shape[1:])


def run(args) -> dict | None:
    main_proc = distributed.is_main()
    host_params = None
    try:
        inputs = _load_inputs(args) if main_proc else None
        if main_proc:  # params go array by array below, never pickled with the rest
            host_params = inputs.pop("params")
            inputs["param_template"] = distributed.array_template(host_params)
        payload = distributed.broadcast_object(inputs if main_proc else None)
    except UserError as e:
        distributed.broadcast_object({"error": str(e)})  # followers must stop too, not hang
        raise
    if "error" in payload:
        raise UserError(f"process 0 failed: {payload['error']}")
    cfg, ev = payload["cfg"], payload["cfg"]["eval"]
    num_beams, n = int(ev["num_beams"]), len(payload["prompts"])

    model_cfg = ModelConfig(**payload["model_cfg"])
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(model_cfg, cfg["seed"])))
    model = nnx.merge(graphdef, distributed.broadcast_to_local(host_params, payload["param_template"]))
    del host_params
    trie = build_trie(payload["sid_table"])

    if main_proc:  # a kill while decoding must not leave an earlier eval's files looking current
        retire_outputs(args.out, (PREDICTIONS_FILE, SUMMARY_FILE))
    procs, rank = distributed.process_count(), jax.process_index()
    per_process = math.ceil(n / procs)
    mine = payload["prompts"][rank * per_process:(rank + 1) * per_process]
    t0 = time.time()
    decode_stats: dict = {}
    local_rows, _ = predict_sid_rows(model, mine, payload["pad_id"], trie, num_beams, payload["newline_id"],
                                     payload["eos_id"], int(ev["batch_size"]), progress=main_proc, stats=decode_stats)
    sid_rows = _gather_rows(local_rows.astype(np.int32), per_process)[:n]
    seconds = time.time() - t0
    if not main_proc:
        return None

    sids = payload["sids"]
    records = build_records(payload["texts"], payload["targets"], sid_rows, sids)
    metrics = compute_metrics(records, set(sids))
    summary = {
        **metrics,
        "split": ev["split"],
        "samples_per_s": n / seconds if seconds > 0 else None,
        # process 0's decode shapes: prompts per padded length, and the programs that compiled
        "decode_length_buckets": {str(k): v for k, v in decode_stats.get("length_buckets", {}).items()},
        "decode_compiles": decode_stats.get("compiles", 0),
        "seconds": seconds,
        "checkpoint": str(args.checkpoint),
        "checkpoint_md5": payload["checkpoint_md5"],
        "data_dir": payload["data_dir"],
        "tokenizer": payload["tokenizer"],
        **distributed.device_info(),
        "model": payload["model_cfg"],
        "config": cfg,
    }
    out = Path(args.out)
    atomic_write_json(out / PREDICTIONS_FILE, records)
    atomic_write_json(out / SUMMARY_FILE, summary)
    shutil.rmtree(out / PREVIOUS_DIR, ignore_errors=True)
    log.info("eval %s: n=%d beams=%d %s  (%.1f samples/s)", ev["split"], n, num_beams,
             " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("eval/hr") or k.startswith("eval/ndcg")),
             summary["samples_per_s"] or 0.0)
    return summary


def main(argv: list[str]) -> int:
    p = base_parser("eval", "constrained beam search over a split: predictions + HR/NDCG")
    p.add_argument("--data", default=None, help="dataset directory (default: data.dir)")
    p.add_argument("--checkpoint", required=True, help="msgpack params to evaluate")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: tokenizer.path)")
    p.add_argument("--out", required=True, help="output directory for eval_predictions.json and run_summary.json")
    p.add_argument("--receipt", default=None,
                   help="GCS handoff receipt (gcs_copy.json): refuse a checkpoint/tokenizer whose checksums differ")
    args = p.parse_args(argv[1:])
    distributed.start(argv)
    if distributed.is_main():
        setup_logging(args.log)
    run(args)
    return 0
