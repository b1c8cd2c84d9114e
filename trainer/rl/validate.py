"""In-training validation of the RL policy: HR@K / NDCG@K on a valid-split subset (`eval_every_steps`).

Uses the evaluation decoder (constrained beam search, `eval.num_beams` beams) on host copies of
the params. Every process decodes its own contiguous slice of the rows and the slices are
all-gathered, so every process makes the same collective calls in the same order (the param
gather, then the row gather) whichever process logs the result.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from trainer.train import parallel
from trainer.config import ConfigError

DEFAULT_SAMPLES = 128  # valid rows when eval.max_samples is null: cheap enough to run often


def prepare(cfg: dict, data_dir: str, catalog, tok) -> dict | None:
    """Process 0: the encoded valid rows, or None when in-training validation is off."""
    from trainer.data import readers as dt
    from trainer.eval.evaluate import encode_prompts

    if int(cfg["eval_every_steps"]) <= 0:
        return None
    num_beams = int(cfg["eval"]["num_beams"])
    if num_beams < 10:
        raise ConfigError(f"eval.num_beams={num_beams}: in-training validation (eval_every_steps="
                          f"{cfg['eval_every_steps']}) reports HR@10/NDCG@10, so it needs at least 10 beams")
    limit = cfg["eval"]["max_samples"]
    examples = dt.read_split(data_dir, "valid", catalog, cfg["data"]["max_history"])
    examples = examples[: int(limit) if limit is not None else DEFAULT_SAMPLES]
    if not examples:
        raise ConfigError(f"{data_dir}/valid.csv has no rows, but eval_every_steps={cfg['eval_every_steps']} "
                          "asks for validation; add rows or set eval_every_steps=0")
    # The training wording, like SFT's best-checkpoint selection; eval.prompt applies to `trainer eval`.
    _, prompts = encode_prompts(tok, examples, cfg["data"]["max_prompt_len"], "sft")
    return {"prompts": prompts, "targets": [e.target_sid for e in examples], "sids": list(catalog.sids),
            "pad_id": tok.pad_token_id}


def evaluate(graphdef, params, valid: dict, sid_table: np.ndarray, newline_id: int, eos_id: int,
             eval_cfg: dict) -> dict:
    """Every process: {'valid/hr@K': ..., 'valid/ndcg@K': ...} for K <= eval.num_beams."""
    from trainer.eval.evaluate import _gather_rows, build_records, predict_sid_rows
    from trainer.eval.metrics import compute_metrics
    from trainer.decode.trie import build_trie

    host = jax.tree.map(parallel.to_host, params)  # collective: every process holds all params
    model = nnx.merge(graphdef, jax.device_put(host, jax.local_devices()[0]))
    n, procs, rank = len(valid["prompts"]), jax.process_count(), jax.process_index()
    per_process = math.ceil(n / procs)
    mine = valid["prompts"][rank * per_process:(rank + 1) * per_process]
    rows, _ = predict_sid_rows(model, mine, valid["pad_id"], build_trie(np.asarray(sid_table)),
                               int(eval_cfg["num_beams"]), newline_id, eos_id, int(eval_cfg["batch_size"]))
    rows = _gather_rows(rows.astype(np.int32), per_process)[:n]  # collective
    records = build_records([""] * n, valid["targets"], rows, valid["sids"])
    metrics = compute_metrics(records, set(valid["sids"]))
    return {k.replace("eval/", "valid/"): v for k, v in metrics.items()
            if k.startswith(("eval/hr@", "eval/ndcg@"))}
