"""In-training validation of the RL policy: HR@K / NDCG@K on a valid-split subset (`eval_every_steps`).

Uses the evaluation decoder (constrained beam search, `eval.num_beams` beams) with the policy's
own sharded params (trainer.eval.sharded_decode): every process runs the same global batches, so
no process gathers the params, and every process gets the same metrics.
"""
from __future__ import annotations

from flax import nnx

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


def evaluate(graphdef, params, valid: dict, trie, newline_id: int, eos_id: int, eval_cfg: dict, mesh) -> dict:
    """Every process: {'valid/hr@K': ..., 'valid/ndcg@K': ...} for K <= eval.num_beams.
    `trie`: replicated over `mesh` (sharded_decode.global_trie)."""
    from trainer.eval.evaluate import build_records
    from trainer.eval.metrics import compute_metrics
    from trainer.eval.sharded_decode import predict_sid_rows_sharded

    rows = predict_sid_rows_sharded(nnx.merge(graphdef, params), valid["prompts"], valid["pad_id"], trie,
                                    int(eval_cfg["num_beams"]), newline_id, eos_id, int(eval_cfg["batch_size"]), mesh)
    n = len(valid["prompts"])
    records = build_records([""] * n, valid["targets"], rows, valid["sids"])
    metrics = compute_metrics(records, set(valid["sids"]))
    return {k.replace("eval/", "valid/"): v for k, v in metrics.items()
            if k.startswith(("eval/hr@", "eval/ndcg@"))}
