"""`python -m trainer rl`: GRPO-style RL from the SFT best to `sft_state_rl_last.msgpack`.

Each step runs the four phases on one global batch of `rollout.batch_size` prompts:
rollout (G = rollout.n completions each) -> reward -> advantage -> update. The same program runs
on every process of a slice; process 0 reads the data, tokenizer and init checkpoint and
broadcasts them, and it alone writes files. Data order and sampling keys are pure functions of
(seed, step), so a run resumed from a train-state checkpoint replays exactly what an
uninterrupted run does.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from trainer.model import checkpoint
from trainer.train import distributed
from trainer.train import parallel
from trainer.train import train_state
from trainer.train.state_store import METRICS
from trainer.data.batching import bucketed_length, left_pad
from trainer.data import TOKENIZER_FILES
from trainer.cli import base_parser
from trainer.config import ConfigError, load_config
from trainer.io_utils import atomic_write_bytes, atomic_write_json, md5_file, setup_logging
from trainer.model import resolve
from trainer.model.qwen2 import ModelConfig, build_model
from trainer.train.optim import build_optimizer
from trainer.rl import advantage, reward, rollout, update, validate
from trainer.runlog import RunLog
from trainer.decode.trie import build_trie
from trainer.eval.sharded_decode import global_trie

log = logging.getLogger("trainer")
CHECKPOINT_FILE = "sft_state_rl_last.msgpack"


@dataclass(frozen=True)
class RLInputs:
    """What process 0 reads (data, tokenizer, init checkpoint) and every process needs, as arrays."""
    model_cfg: dict  # the init checkpoint's own model (trainer.model.resolve)
    params: dict  # process 0's host arrays; what crosses to the others is only their template
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    targets: np.ndarray  # catalog index of each prompt's target SID
    sid_table: np.ndarray
    newline_id: int
    eos_id: int  # beam rollouts score a, b, c, newline and EOS, as upstream's beam search
    init_md5: str
    tokenizer_dir: str
    num_sids: int
    valid: dict | None  # in-training validation rows, None when off
    sid_embeddings: np.ndarray | None  # unit item embeddings per SID (rl.reward semantic), else None


def prepare_inputs(cfg: dict, data_dir: str) -> RLInputs:
    """Process 0: read and encode everything the run needs."""
    from trainer.data import readers as dt
    from trainer.data import tasks
    from trainer.data import tokenizer as tk

    tok_dir = cfg["tokenizer"]["path"]
    if not tok_dir:
        raise ConfigError("tokenizer.path is not set: point it at the SFT run directory (its tokenizer files)")
    if not cfg["init"]["checkpoint"]:
        raise ConfigError("init.checkpoint is not set: point it at the SFT best (sft_best.msgpack)")
    catalog = dt.load_catalog(data_dir)
    examples = dt.read_split(data_dir, "train", catalog, cfg["data"]["max_history"])
    if not examples:
        raise ConfigError(f"{data_dir}/train.csv has no rows to train on")
    tok = tk.load_tokenizer(tok_dir)
    samples = tasks.rl_samples(cfg["rl"]["tasks"], data_dir, catalog, examples, int(cfg["seed"]))
    encoded = [tk.encode_prompt(tok, s.prompt, cfg["data"]["max_prompt_len"]) for s in samples]
    prompt_ids, prompt_mask = left_pad(encoded, tok.pad_token_id, bucketed_length(encoded))
    mcfg, params = resolve.load_checkpoint(cfg["init"]["checkpoint"], cfg["model"], len(tok))
    return RLInputs(
        model_cfg=mcfg.to_dict(), params=params, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        targets=np.array([catalog.sid_index[s.sid] for s in samples], np.int32),
        sid_table=tk.sid_token_table(tok, catalog.sids), newline_id=tk.newline_id(tok),
        eos_id=tok.eos_token_id, init_md5=md5_file(cfg["init"]["checkpoint"]), tokenizer_dir=str(tok_dir), num_sids=len(catalog.sids),
        valid=validate.prepare(cfg, data_dir, catalog, tok),
        sid_embeddings=(reward.load_sid_embeddings(cfg["rl"]["item_embeddings"], catalog)
                        if reward.needs_embeddings(cfg["rl"]["reward"]) else None))


def _sharding_for(rows: int, mesh) -> NamedSharding:
    """Split rows over the mesh when they divide evenly; otherwise every device holds all rows
    (e.g. the smoke run's single prompt on a 4-process slice)."""
    return parallel.batch_sharding(mesh) if rows % mesh.size == 0 else parallel.replicated(mesh)


def total_steps(cfg: dict, n_prompts: int) -> int:
    """`steps`, or with `epochs` set, HF Trainer's count: epochs x whole batches per epoch."""
    if cfg["epochs"] is None:
        return int(cfg["steps"])
    return max(1, round(float(cfg["epochs"]) * max(1, n_prompts // int(cfg["rollout"]["batch_size"]))))


def make_ref_sync(cfg: dict, ref_shardings):
    """TRL's SyncRefModelCallback: after every `ref_model_sync_steps`-th optimizer step,
    ref <- alpha * policy + (1 - alpha) * ref. None when rl.sync_ref_model is off."""
    rl = cfg["rl"]
    if not rl["sync_ref_model"]:
        return None
    every, alpha = int(rl["ref_model_sync_steps"]), float(rl["ref_model_mixup_alpha"])
    if every < 1 or not 0.0 < alpha <= 1.0:
        raise ConfigError(f"rl.ref_model_sync_steps={every} must be >= 1 and rl.ref_model_mixup_alpha={alpha} "
                          "in (0, 1]")
    mix = jax.jit(lambda ref, p: jax.tree.map(lambda r, x: (1.0 - alpha) * r + alpha * x, ref, p),
                  out_shardings=ref_shardings)
    return lambda done, ref, params: mix(ref, params) if done % every == 0 else ref


def make_step_fns(graphdef, tx, cfg: dict, mesh, state_shardings, sid_embeddings=None):
    rl = cfg["rl"]
    logprobs, update_step = update.make_phase_fns(graphdef, tx, float(rl["clip_eps"]), float(rl["kl_coef"]),
                                                  state_shardings, mesh)
    reward_fn = reward.get(rl["reward"], sid_embeddings)
    g = int(cfg["rollout"]["n"])
    seq_sharding = _sharding_for(int(cfg["rollout"]["batch_size"]) * g, mesh)

    @jax.jit
    def score(sid_index, targets):
        rewards = reward_fn(sid_index, targets)
        return rewards, advantage.group_advantages(rewards, float(rl["adv_eps"]))

    def sequences(prompt_ids, prompt_mask, sid_table, sid_index, adv, newline_id, eos_id):
        """Prompt + completion rows [B*G, P+5], one per completion, with its advantage."""
        resp = rollout.completion_tokens(sid_table, sid_index, newline_id, eos_id)  # [B, G, 5]
        b, p = prompt_ids.shape
        ids = jnp.concatenate([jnp.repeat(prompt_ids[:, None], g, 1), resp], -1).reshape(b * g, p + update.N_RESP)
        mask = jnp.concatenate([jnp.repeat(prompt_mask[:, None], g, 1), jnp.ones_like(resp)], -1).reshape(b * g, -1)
        return ids, mask, adv.reshape(-1)

    build_sequences = jax.jit(sequences, static_argnums=(5, 6), out_shardings=(seq_sharding,) * 3)
    return logprobs, update_step, score, build_sequences


class Trainer:
    """The live state of one RL run on a mesh: params, optimizer, reference, trie and step functions."""

    def __init__(self, cfg: dict, inputs: RLInputs, host_params: dict | None):
        """`inputs.params` holds the params' template; process 0 passes the arrays as `host_params`
        and they reach every process one array at a time, straight into their sharding."""
        self.cfg, self.inputs = cfg, inputs
        self.b, self.g = int(cfg["rollout"]["batch_size"]), int(cfg["rollout"]["n"])
        self.updates = int(cfg["rl"]["updates_per_rollout"])
        n_prompts = len(inputs.prompt_ids)
        if self.b > n_prompts:
            raise ConfigError(f"rollout.batch_size={self.b} exceeds the {n_prompts} training prompts; lower it")
        self.steps = total_steps(cfg, n_prompts)
        self.mesh = mesh = parallel.make_mesh(cfg["mesh"])
        model_cfg = ModelConfig(**inputs.model_cfg)
        self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(model_cfg, cfg["seed"])))  # no weights
        shardings = parallel.param_shardings(inputs.params, mesh)
        self.params = distributed.broadcast_arrays(host_params, inputs.params, shardings)
        # The frozen reference (the SFT best) exists only when the KL term uses it; the old-policy
        # log-probs only when more than one (off-policy) update follows a rollout.
        self.with_ref = update.needs_reference(cfg["rl"]["kl_coef"])
        self.with_old = update.needs_old_logprobs(self.updates)
        self.ref_params = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(self.params) if self.with_ref else None
        tx, self.schedule, self.opt_desc = build_optimizer(cfg["train"]["optimizer"], self.steps * self.updates)
        self.opt_state = parallel.init_opt_state(tx, self.params, mesh)
        rep = parallel.replicated(mesh)
        self.trie = global_trie(build_trie(inputs.sid_table), mesh)
        self.sid_table = parallel.place(inputs.sid_table, rep)
        state_shardings = (shardings, jax.tree.map(lambda x: x.sharding, self.opt_state))
        self.logprobs, self.update_step, self.score, self.build_sequences = make_step_fns(
            self.graphdef, tx, cfg, mesh, state_shardings, inputs.sid_embeddings)
        self.sync_ref = make_ref_sync(cfg, shardings) if self.with_ref else None  # no KL: nothing to sync
        self.prompt_sharding = _sharding_for(self.b, mesh)
        self.base_key = jax.random.key(int(cfg["seed"]))
        self.timings = {"rollout": 0.0, "reward_advantage": 0.0, "logprobs": 0.0, "update": 0.0, "eval": 0.0}

    def saved_state(self):
        """What the train state holds beside the params: a synced reference moves, so it goes too."""
        return {"opt": self.opt_state, "ref": self.ref_params} if self.sync_ref else self.opt_state

    def resume(self, store) -> int:
        """The step to start from: the latest state in `store`, placed into this run's shardings, or 0."""
        resumed = train_state.resume(store, self.params, self.saved_state())
        if resumed is None:
            return 0
        self.params, extra, start, _ = resumed
        self.opt_state, self.ref_params = (extra["opt"], extra["ref"]) if self.sync_ref else (extra, self.ref_params)
        return start

    def _timed(self, phase: str, fn, *args):
        t = time.time()
        out = fn(*args)
        jax.block_until_ready(out)
        self.timings[phase] += time.time() - t
        return out

    def step(self, step: int) -> dict:
        """One RL step (rollout -> reward/advantage -> update); returns its logged metrics."""
        inp, cfg = self.inputs, self.cfg
        rows = train_state.batch_rows(len(inp.prompt_ids), self.b, step, int(cfg["seed"]))
        prompt_ids, prompt_mask, targets = (parallel.place(a[rows], self.prompt_sharding)
                                            for a in (inp.prompt_ids, inp.prompt_mask, inp.targets))
        with parallel.rows_over(self.mesh):  # FSDP: the decoder's activations stay split by rows
            sid_index = self._timed("rollout", rollout.rollout, self.graphdef, self.params, prompt_ids, prompt_mask,
                                    self.trie, cfg["rollout"], inp.newline_id, inp.eos_id,
                                    jax.random.fold_in(self.base_key, step))
        rewards, adv = self._timed("reward_advantage", self.score, sid_index, targets)  # one jitted call
        batch = self._timed("logprobs", self._update_batch, prompt_ids, prompt_mask, sid_index, adv)
        t = time.time()
        for _ in range(self.updates):
            self.params, self.opt_state, m = self.update_step(self.params, self.opt_state, batch)
        m = jax.device_get(m)
        self.timings["update"] += time.time() - t
        if self.sync_ref:
            self.ref_params = self.sync_ref(step + 1, self.ref_params, self.params)
        r = parallel.to_host(rewards)
        metrics = {"reward_mean": float(r.mean()), "accuracy": float((r >= 1.0).any(axis=1).mean()),
                   "loss": float(m["loss"]), "pg_loss": float(m["pg_loss"]),
                   "clip_frac": float(m["clip_frac"]), "grad_norm": float(m["grad_norm"]),
                   "lr": float(self.schedule(step * self.updates))}
        if self.with_ref:
            metrics["kl"] = float(m["kl"])
        return metrics

    def _update_batch(self, prompt_ids, prompt_mask, sid_index, adv) -> dict:
        """Completion rows with their advantages and, when needed, old-policy / reference log-probs."""
        ids, mask, adv_rows = self.build_sequences(prompt_ids, prompt_mask, self.sid_table, sid_index, adv,
                                                   self.inputs.newline_id, self.inputs.eos_id)
        batch = {"input_ids": ids, "attention_mask": mask, "advantages": adv_rows}
        if self.with_old:
            batch["old_logp"] = self.logprobs(self.params, ids, mask)
        if self.with_ref:
            batch["ref_logp"] = self.logprobs(self.ref_params, ids, mask)
        return batch

    def validate(self) -> dict:
        """Every process runs it: one SPMD decode with the sharded params, no gather of them."""
        t = time.time()
        metrics = validate.evaluate(self.graphdef, self.params, self.inputs.valid, self.trie, self.inputs.newline_id,
                                    self.inputs.eos_id, self.cfg["eval"], self.mesh)
        self.timings["eval"] += time.time() - t
        return metrics


def write_outputs(out: Path, trainer: Trainer, host_params, start: int, elapsed: float, valid_metrics: dict,
                  runlog: RunLog) -> dict:
    """Process 0: the rl_last checkpoint, tokenizer files and run_summary.json (written last)."""
    cfg, inp = trainer.cfg, trainer.inputs
    checkpoint.save_params(out / CHECKPOINT_FILE, host_params, inp.model_cfg)
    for name in TOKENIZER_FILES:
        src = Path(inp.tokenizer_dir) / name
        if src.exists():
            atomic_write_bytes(out / name, src.read_bytes())
    summary = {
        "kind": "rl", "steps": trainer.steps, "resumed_from_step": start, "seconds": elapsed,
        "samples_per_s": (trainer.steps - start) * trainer.b * trainer.g / max(elapsed, 1e-9),
        "phase_seconds": trainer.timings, **distributed.device_info(), "model": inp.model_cfg,
        "reference_model": trainer.with_ref, "old_logprob_pass": trainer.with_old,
        **parallel.describe(trainer.mesh, trainer.params), "init_checkpoint": cfg["init"]["checkpoint"],
        "init_checkpoint_md5": inp.init_md5, "optimizer": trainer.opt_desc, "num_sids": inp.num_sids,
        "train_prompts": len(inp.prompt_ids), "valid": valid_metrics, "curves": runlog.history(),
        "checkpoint_md5": md5_file(out / CHECKPOINT_FILE),
        "config": cfg,
    }
    atomic_write_json(out / "run_summary.json", summary)
    return summary


def _inputs_on_every_process(cfg: dict, data_dir: str) -> tuple[RLInputs, dict | None]:
    """(inputs with the params' template, process 0's host params or None): only small arrays are
    pickled to the followers; the params follow in Trainer, array by array."""
    kept = {}

    def prepare():
        inputs = prepare_inputs(cfg, data_dir)
        kept["params"] = inputs.params
        return dataclasses.replace(inputs, params=distributed.array_template(inputs.params))

    return distributed.on_main(prepare), kept.get("params")


def run(cfg: dict, data_dir: str) -> dict | None:
    out = Path(cfg["output_dir"])
    main_proc = distributed.is_main()
    rollout.check_mode(cfg["rollout"]["mode"])  # before any work, not at the first rollout
    if main_proc:  # first: a kill from here on must not leave an earlier run looking like this one
        train_state.retire_outputs(out, (CHECKPOINT_FILE, "metrics.jsonl", *TOKENIZER_FILES))
    trainer = Trainer(cfg, *_inputs_on_every_process(cfg, data_dir))
    store = train_state.store_for(out, cfg)
    start = trainer.resume(store)
    if start:
        log.info("resuming RL from step %d (%s)", start, store.where)

    steps = trainer.steps
    runlog = RunLog(out, cfg, main_proc, "rl", resume_step=start,
                    saved=distributed.on_main(lambda: (store.read(METRICS) or b"").decode()) if start else None)
    writer, due = train_state.AsyncWriter(store), train_state.schedule(cfg["checkpoint_every_steps"], cfg)
    eval_every, valid_metrics = int(cfg["eval_every_steps"]), {}
    t_start = time.time()
    for step in tqdm(range(start, steps), desc="rl", disable=not main_proc, initial=start, total=steps):
        metrics = trainer.step(step)
        done = step + 1
        if eval_every > 0 and (done % eval_every == 0 or done == steps):
            valid_metrics = trainer.validate()
            metrics.update(valid_metrics)
        runlog.log(done, metrics)
        if done % max(1, steps // 20) == 0 or done == steps:
            log.info("step %d %s", done, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if due.due(done, steps):
            host_state = train_state.to_host(trainer.params, trainer.saved_state(), done)
            if main_proc:
                train_state.save_async(writer, host_state, runlog.snapshot())

    elapsed = time.time() - t_start
    host_params = checkpoint.host_tree_on_main(trainer.params)  # process 0 only; one array at a time
    if not main_proc:
        return None
    writer.wait()
    summary = write_outputs(out, trainer, host_params, start, elapsed, valid_metrics, runlog)
    store.clear()
    train_state.clear(out)  # and the earlier run's outputs moved aside
    runlog.close()
    return summary


def main(argv: list[str]) -> int:
    p = base_parser("rl", "GRPO-style RL from the SFT best checkpoint")
    p.add_argument("--data", default=None, help="dataset directory (default: data.dir)")
    args = p.parse_args(argv[1:])
    distributed.start(argv)
    if distributed.is_main():
        setup_logging(args.log)
    cfg = distributed.on_main(load_config, args.config, args.overrides, "rl")  # followers have no files
    run(cfg, args.data or cfg["data"]["dir"])
    return 0
