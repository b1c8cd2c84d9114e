"""Supervised fine-tuning to an "SFT best" checkpoint.

`python -m trainer sft --config C --data DIR [--set ...]` trains on the tasks `sft.tasks` (default:
history of SIDs -> next SID plus title -> SID; trainer/data/tasks.py), response-only cross-entropy
averaged over response tokens, and keeps
the best params by `sft.best_metric` on the first `sft.eval_samples` valid rows: `valid/loss`, or
`valid/hr@K` / `valid/ndcg@K` (K in 1, 3, 5, 10, 20, 50) from K-beam constrained decoding in batches of
`eval.batch_size`. Process 0 prepares the data, decodes and writes every file; other processes receive
token arrays and metrics by broadcast. A rerun resumes from the last train state of the same config.
"""
from __future__ import annotations

import functools
import logging
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from trainer.model import checkpoint
from trainer.train import distributed
from trainer.train import parallel
from trainer.train import train_state
from trainer.data.batching import SID_ANSWER_TOKENS, left_pad
from trainer.cli import base_parser
from trainer.decode.beam import check_num_beams
from trainer.eval.evaluate import build_records
from trainer.eval.sharded_decode import global_trie, predict_sid_rows_sharded
from trainer.eval.metrics import TOPK, compute_metrics
from trainer.decode.trie import build_trie
from trainer.config import ConfigError, load_config
from trainer.errors import CheckpointError
from trainer.io_utils import atomic_write_bytes, atomic_write_json, md5_file, setup_logging
from trainer.train.state_store import METRICS
from trainer.train.losses import response_logprobs
from trainer.model import resolve
from trainer.model.qwen2 import build_model
from trainer.train.optim import build_optimizer
from trainer.runlog import RunLog

log = logging.getLogger("trainer")
N_RESP = SID_ANSWER_TOKENS  # batches without a resp_mask hold only SID answers


def parse_best_metric(name: str) -> tuple[str, int | None]:
    """`valid/loss` -> ("loss", None); `valid/hr@10` -> ("hr", 10). ConfigError names the key."""
    if name == "valid/loss":
        return "loss", None
    m = re.fullmatch(r"valid/(hr|ndcg)@(\d+)", str(name))
    if not m or int(m.group(2)) not in TOPK:
        raise ConfigError(f"sft.best_metric: '{name}' is not supported; use valid/loss, valid/hr@K or valid/ndcg@K "
                          f"with K in {list(TOPK)}")
    return m.group(1), int(m.group(2))


def build_tokenizer(cfg: dict, catalog, texts: list[str]):
    from trainer.data import tokenizer as tk

    if cfg["tokenizer"]["path"]:
        tok = tk.load_tokenizer(cfg["tokenizer"]["path"])
        tk.add_sid_tokens(tok, catalog.sids)
        return tok
    return tk.train_bpe_tokenizer(texts, catalog.sids, cfg["tokenizer"]["bpe_vocab_size"],
                                  cfg["tokenizer"]["bpe_merge_across_spaces"])


def encode_samples(tok, samples, sid_table, sid_pos: dict, max_prompt_len: int):
    """(ids [N, L], mask [N, L], response mask [N, R], prompt token lists) for prompt + answer + EOS.

    Rows are left padded, so every answer ends at the last position; R is the longest answer and
    the response mask marks each row's own answer tokens among the last R positions.
    """
    from trainer.data import tokenizer as tk

    nl, eos = tk.newline_id(tok), tok.eos_token_id
    prompts_ids = [tk.encode_prompt(tok, s.prompt, max_prompt_len) for s in samples]
    answers = [list(sid_table[sid_pos[s.sid]]) + [nl, eos] if s.sid is not None
               else tok.encode(s.text + "\n", add_special_tokens=False) + [eos] for s in samples]
    ids, mask = left_pad([p + a for p, a in zip(prompts_ids, answers)], tok.pad_token_id)
    r = max(len(a) for a in answers)
    resp_mask = np.zeros((len(samples), r), np.float32)
    for i, a in enumerate(answers):
        resp_mask[i, r - len(a):] = 1.0
    return ids, mask, resp_mask, prompts_ids


def prepare_data(cfg: dict, data_dir: str) -> dict:
    """Process 0: read the dataset, build the tokenizer, encode the tasks as token arrays."""
    from trainer.data import readers as dt
    from trainer.data import tasks
    from trainer.data import tokenizer as tk

    catalog = dt.load_catalog(data_dir)
    train = dt.read_split(data_dir, "train", catalog, cfg["data"]["max_history"])
    valid = dt.read_split(data_dir, "valid", catalog, cfg["data"]["max_history"])
    sid_pos = catalog.sid_index
    samples = tasks.sft_samples(cfg["sft"]["tasks"], data_dir, catalog, train, cfg["data"]["category"],
                                int(cfg["seed"]))
    tok = build_tokenizer(cfg, catalog, [s.prompt.text + (s.text or "") for s in samples])
    table = tk.sid_token_table(tok, catalog.sids)
    mpl = cfg["data"]["max_prompt_len"]
    train_ids, train_mask, train_resp, _ = encode_samples(tok, samples, table, sid_pos, mpl)
    limit = cfg["sft"]["eval_samples"]
    n_valid = len(valid) if limit is None else min(len(valid), limit)
    if n_valid == 0:
        raise ConfigError(f"{data_dir}: valid.csv has no rows (or sft.eval_samples=0); SFT selects its best "
                          "checkpoint on the valid split, so add rows or raise sft.eval_samples")
    valid_samples = tasks.sft_samples(["next_item"], data_dir, catalog, valid[:n_valid], None, 0)
    valid_ids, valid_mask, valid_resp, valid_prompts = encode_samples(tok, valid_samples, table, sid_pos, mpl)
    return {"tokenizer": tok, "vocab_size": len(tok), "train_ids": train_ids, "train_mask": train_mask,
            "train_resp": train_resp, "valid_ids": valid_ids, "valid_mask": valid_mask, "valid_resp": valid_resp,
            "num_sids": len(catalog.sids),
            # what process 0 needs to decode the valid prompts (sft.best_metric valid/hr@K, valid/ndcg@K)
            "valid_prompts": valid_prompts, "valid_targets": np.array([sid_pos[s.sid] for s in valid_samples]),
            "sids": catalog.sids, "sid_table": table, "pad_id": tok.pad_token_id, "newline_id": tk.newline_id(tok),
            "eos_id": tok.eos_token_id}


def make_steps(graphdef, tx, mesh=None, dropout_rate: float = 0.0):
    """Jitted (train_step, eval_loss); with `mesh`, activations are split by rows over it.
    train_step(params, opt_state, batch, key) drops out at `dropout_rate` when given `key`."""
    def loss_fn(params, batch, key=None):
        model = nnx.merge(graphdef, params)
        resp = batch.get("resp_mask")
        if resp is None:
            resp = jnp.ones((batch["input_ids"].shape[0], N_RESP), jnp.float32)
        with parallel.rows_over(mesh):
            lp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], resp.shape[1],
                                   dropout_rate, key)
        return -(lp * resp).sum() / jnp.maximum(resp.sum(), 1.0)

    # params and optimizer state are donated: the caller rebinds both, so the old and the new
    # train state never coexist in device memory.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch, key=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    @jax.jit
    def eval_loss(params, batch):
        return loss_fn(params, batch)

    return train_step, eval_loss


def resolve_schedule(sft: dict, n_train: int) -> tuple[int, int]:
    """(steps, eval_every): `sft.epochs` counts steps as HF Trainer does (whole batches per epoch);
    an eval_every below 1 is a fraction of the steps, rounded up like HF's eval_steps."""
    steps = int(sft["steps"])
    if sft["epochs"] is not None:
        steps = max(1, round(float(sft["epochs"]) * max(1, n_train // int(sft["batch_size"]))))
    every = sft["eval_every"]
    if every < 1:
        every = math.ceil(steps * every)
    return steps, int(every)


def run(cfg: dict, data_dir: str) -> dict | None:
    out = Path(cfg["output_dir"])
    main_proc = distributed.is_main()
    sft = cfg["sft"]
    for key in ("steps", "batch_size", "checkpoint_every"):
        if not isinstance(sft[key], int) or sft[key] < 1:
            raise ConfigError(f"sft.{key}={sft[key]!r}: must be an integer >= 1")
    patience = sft["early_stopping_patience"]
    _, beams = parse_best_metric(sft["best_metric"])  # fail before any work on a typo
    from trainer.data import tokenizer as tk

    if main_proc:  # first: a kill from here on must not leave an earlier run looking like this one
        train_state.retire_outputs(out, ("sft_best.msgpack", "metrics.jsonl", *tk.TOKENIZER_FILES))
    kept = {}

    def prepare():
        prepared = prepare_data(cfg, data_dir)
        kept["tokenizer"] = prepared.pop("tokenizer")  # stays on process 0, which writes it
        return prepared

    bundle = distributed.on_main(prepare)
    tok = kept.get("tokenizer")
    mesh = parallel.make_mesh(cfg["mesh"])
    init_ckpt = cfg["init"]["checkpoint"]
    if init_ckpt:  # the checkpoint's own model; its params sent array by array, never pickled
        def load_init():
            mcfg, kept["params"] = resolve.load_checkpoint(init_ckpt, cfg["model"], bundle["vocab_size"])
            return mcfg, distributed.array_template(kept["params"])

        mcfg, template = distributed.on_main(load_init)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(mcfg, cfg["seed"])))
        params = distributed.broadcast_arrays(kept.pop("params", None), template,
                                              parallel.param_shardings(template, mesh))
    else:
        mcfg = resolve.from_settings(cfg["model"], bundle["vocab_size"])
        graphdef, state = nnx.split(build_model(mcfg, cfg["seed"]))
        params = state.to_pure_dict()  # plain nested dicts: serialisable with the optimizer state
        params = parallel.place(jax.device_get(params), parallel.param_shardings(params, mesh))

    bs, n_train = int(sft["batch_size"]), len(bundle["train_ids"])
    steps, eval_every = resolve_schedule(sft, n_train)
    if bs > n_train:
        raise ConfigError(f"sft.batch_size={bs} exceeds the {n_train} training sequences of {data_dir} "
                          f"(the samples of sft.tasks); lower sft.batch_size to at most {n_train}")
    trie = None
    if beams is not None:  # valid/hr@K or valid/ndcg@K: K-beam constrained decoding of the valid prompts
        trie = build_trie(bundle["sid_table"])
        check_num_beams(trie, beams, key="sft.best_metric")
        trie = global_trie(trie, mesh)
    parallel.check_divisible(bs, mesh, "sft.batch_size")
    tx, schedule, opt_desc = build_optimizer(cfg["train"]["optimizer"], steps)
    opt_state = parallel.init_opt_state(tx, params, mesh)
    train_step, eval_loss = make_steps(graphdef, tx, mesh, float(sft["dropout"]))
    dropout_key = jax.random.key(int(cfg["seed"]))  # folded with the step: a resumed run draws the same masks

    store = train_state.store_for(out, cfg)
    start, best, best_step = 0, None, None
    resumed = train_state.resume(store, params, opt_state, ("best", "best_step"))
    if resumed is not None:
        params, opt_state, start, extra = resumed
        if extra["best_step"] >= 0:
            best, best_step = extra["best"], int(extra["best_step"])
        log.info("resuming SFT from step %d (%s)", start, store.where)

    runlog = RunLog(out, cfg, main_proc, "sft", resume_step=start,
                    saved=distributed.on_main(lambda: (store.read(METRICS) or b"").decode()) if start else None)
    writer, due = train_state.AsyncWriter(store), train_state.schedule(sft["checkpoint_every"], cfg)
    # The best params so far stay in process 0's memory and go to the store (best_<step>.msgpack)
    # with the next train state, which names its best_step; a resumed run reads that file at the end.
    best_params, best_saved = None, best_step
    valid = {"input_ids": bundle["valid_ids"], "attention_mask": bundle["valid_mask"], "resp_mask": bundle["valid_resp"]}
    higher_is_better = sft["best_metric"] != "valid/loss"
    t0, tokens, stopped_at = time.time(), 0, None
    for step in tqdm(range(start, steps), desc="sft", disable=not main_proc, initial=start, total=steps):
        rows = train_state.batch_rows(n_train, bs, step, cfg["seed"])
        batch = parallel.global_batch({"input_ids": bundle["train_ids"][rows],
                                       "attention_mask": bundle["train_mask"][rows],
                                       "resp_mask": bundle["train_resp"][rows]}, mesh)
        params, opt_state, m = train_step(params, opt_state, batch, jax.random.fold_in(dropout_key, step))
        tokens += int(bundle["train_mask"][rows].sum())
        done = step + 1
        if done % eval_every == 0 or done == steps:
            metrics = {"train/loss": float(m["loss"]), "train/grad_norm": float(m["grad_norm"]),
                       "lr": float(schedule(step)), "valid/loss": _mean_eval_loss(eval_loss, params, valid, mesh)}
            if beams is not None:  # every process decodes the same global batches: same numbers everywhere
                metrics.update(_valid_ranking(graphdef, params, bundle, trie, beams, int(cfg["eval"]["batch_size"]),
                                              mesh))
            value = metrics[sft["best_metric"]]
            if best is None or (value > best if higher_is_better else value < best):
                best, best_step = value, done
                best_params = checkpoint.host_tree_on_main(params)  # process 0 only; one array at a time
            runlog.log(done, metrics)
            log.info("step %d %s", done, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            # EarlyStoppingCallback: stop after `patience` evaluations in a row without a new best
            if patience is not None and (done - best_step) // eval_every >= patience and done < steps:
                log.info("early stop at step %d: no better %s since step %d", done, sft["best_metric"], best_step)
                stopped_at = done
                break
        if due.due(done, steps):
            host_state = train_state.to_host(params, opt_state, done, {
                "best": np.nan if best is None else best, "best_step": -1 if best_step is None else best_step})
            if main_proc:
                before = ()
                if best_step != best_saved:
                    before = ((_best_name(best_step), lambda p=best_params: checkpoint.params_to_bytes(p, mcfg.to_dict())),)
                    best_saved = best_step
                train_state.save_async(writer, host_state, runlog.snapshot(), before)
    elapsed = time.time() - t0
    layout = parallel.describe(mesh, params)
    if not main_proc:
        return None
    writer.wait()
    tk.save_tokenizer(tok, out)
    if best_params is not None:
        checkpoint.save_params(out / "sft_best.msgpack", best_params, mcfg.to_dict())
    else:  # found before the resume: saved with an earlier train state
        data = store.read(_best_name(best_step))
        if data is None:
            raise CheckpointError(f"{store.where}/{_best_name(best_step)}: missing, though the train state names "
                                  f"step {best_step} as the best; delete {store.where} to train again")
        atomic_write_bytes(out / "sft_best.msgpack", data)
    summary = {
        "kind": "sft", "best_metric": sft["best_metric"], "best_value": best, "best_step": best_step,
        "steps": steps, "stopped_at": stopped_at, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
        **distributed.device_info(), **layout,
        "optimizer": opt_desc, "model": mcfg.to_dict(), "num_sids": bundle["num_sids"],
        "train_sequences": n_train, "curves": runlog.history(),
        "sft_best_md5": md5_file(out / "sft_best.msgpack"), "config": cfg,
    }
    atomic_write_json(out / "run_summary.json", summary)
    store.clear()
    train_state.clear(out)  # and the earlier run's outputs moved aside
    runlog.close()
    return summary


def _best_name(step: int) -> str:
    return f"sft_best_{step}.msgpack"


def _valid_ranking(graphdef, params, bundle: dict, trie, beams: int, batch_size: int, mesh) -> dict:
    """valid/hr@K and valid/ndcg@K of K-beam constrained decoding with the sharded params."""
    rows = predict_sid_rows_sharded(nnx.merge(graphdef, params), bundle["valid_prompts"], bundle["pad_id"], trie,
                                    beams, bundle["newline_id"], bundle["eos_id"], batch_size, mesh)
    sids = bundle["sids"]
    records = build_records([""] * len(rows), [sids[i] for i in bundle["valid_targets"]], rows, sids)
    m = compute_metrics(records, set(sids))
    return {f"valid/hr@{beams}": m[f"eval/hr@{beams}"], f"valid/ndcg@{beams}": m[f"eval/ndcg@{beams}"]}


def _mean_eval_loss(eval_loss, params, valid: dict, mesh) -> float:
    n = len(valid["input_ids"]) // mesh.size * mesh.size
    if n == 0:
        raise ConfigError(f"valid split has fewer rows than the {mesh.size} devices; add rows or lower sft.eval_samples")
    return float(eval_loss(params, parallel.global_batch({k: v[:n] for k, v in valid.items()}, mesh)))


def main(argv: list[str]) -> int:
    p = base_parser("sft", "supervised fine-tuning to an SFT best checkpoint")
    p.add_argument("--data", default=None, help="dataset directory (default: data.dir)")
    args = p.parse_args(argv[1:])
    setup_logging(args.log)
    distributed.start(argv)
    cfg = distributed.on_main(load_config, args.config, args.overrides, "sft")  # followers have no files
    run(cfg, args.data or cfg["data"]["dir"])
    return 0
