"""Benchmark: what RL does on the demo data with each optimizer, with paired bootstrap intervals.

    python bench/rl_optimizers.py [--sft-steps 450 --rl-steps 100 --out /tmp/rl_optimizers]

Trains the demo SFT for --sft-steps (under-trained, so RL has room), then runs --rl-steps of RL
(32 prompts x 16 beams, ranking reward) from it once per optimizer setting below, and prints one
JSON line per setting: valid HR@10 / NDCG@10 before and after on the whole valid split (20 beams),
the paired bootstrap 95% interval of each delta (the same resampled rows for both models), the
share of RL groups that held the target (the others have reward 0 everywhere, so advantage 0 and,
with kl_coef 0, exactly zero gradient), and the mean gradient norm of the steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_config  # noqa: E402
from trainer.eval.significance import paired_bootstrap, per_row  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE, SFT = REPO / "config/trainer/demo/base.yaml", REPO / "config/trainer/demo/sft.yaml"
RESAMPLES = 2000  # bootstrap draws (the workflow's metrics.json uses trainer.eval.significance's 1,000)
SETTINGS = {  # name -> RL overrides
    "sgd_0.1_kl0 (demo)": ["train.optimizer.name=sgd", "train.optimizer.lr_schedule.type=constant",
                           "train.optimizer.lr_schedule.peak_value=0.1", "rl.kl_coef=0.0"],
    "adamw_1e-5_kl1e-3 (upstream lr, beta)": ["train.optimizer.name=adamw", "train.optimizer.weight_decay=0.0",
                                              "train.optimizer.clip_norm=0.3",
                                              "train.optimizer.lr_schedule.peak_value=1e-5",
                                              "train.optimizer.lr_schedule.warmup_ratio=0.03", "rl.kl_coef=1e-3"],
    "adamw_2e-4_kl0": ["train.optimizer.name=adamw", "train.optimizer.weight_decay=0.0",
                       "train.optimizer.lr_schedule.peak_value=2e-4", "rl.kl_coef=0.0"],
}


def predictions(data: Path, sft_dir: Path, checkpoint: Path) -> list[dict]:
    """Each valid row's 20-beam prediction record (the evaluation's own format)."""
    from trainer.data import readers as dt
    from trainer.data.tokenizer import load_tokenizer
    from trainer.eval.evaluate import evaluate_examples
    from trainer.model.checkpoint import load_into_model
    from trainer.model.qwen2 import ModelConfig, build_model

    cfg = load_config([BASE])
    tok, catalog = load_tokenizer(sft_dir), dt.load_catalog(data)
    examples = dt.read_split(data, "valid", catalog, cfg["data"]["max_history"])
    model = build_model(ModelConfig.from_dict(cfg["model"], len(tok)), 0)
    load_into_model(model, checkpoint)
    records, _ = evaluate_examples(model, tok, catalog, examples, 20, 50, cfg["data"]["max_prompt_len"],
                                   wording="sft")  # the wording SFT trained on
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-steps", type=int, default=450)
    p.add_argument("--rl-steps", type=int, default=100)
    p.add_argument("--out", default="/tmp/rl_optimizers")
    args = p.parse_args()
    from trainer.data.synthetic import generate
    from trainer.rl import loop
    from trainer.train import sft

    out = Path(args.out)
    data, sft_dir = out / "data", out / "sft"
    if not (sft_dir / "sft_best.msgpack").exists():
        generate(data, 120, 400, 8, 0)  # the demo dataset
        sft.run(load_config([BASE, SFT], [f"sft.steps={args.sft_steps}", "sft.eval_every=150",
                                          f"output_dir={sft_dir}"]), str(data))
    before = predictions(data, sft_dir, sft_dir / "sft_best.msgpack")
    rows0 = per_row(before)
    for i, (name, sets) in enumerate(SETTINGS.items()):
        rl_out = out / f"rl{i}"
        t = time.time()
        loop.run(load_config([BASE], [
            f"steps={args.rl_steps}", "rollout.batch_size=32", "rollout.n=16", "rollout.mode=beam",
            "rl.reward=ranking", "checkpoint_every_steps=0", "eval_every_steps=0", f"output_dir={rl_out}",
            f"init.checkpoint={sft_dir / 'sft_best.msgpack'}", f"tokenizer.path={sft_dir}"] + sets), str(data))
        seconds = time.time() - t
        after = predictions(data, sft_dir, rl_out / "sft_state_rl_last.msgpack")
        rows1, boot = per_row(after), paired_bootstrap(after, before, resamples=RESAMPLES)
        print(json.dumps({
            "setting": name, "valid_rows": len(before), "rl_seconds": round(seconds, 1),
            **{key: [round(rows0[key].mean(), 4), round(rows1[key].mean(), 4)] for key in ("hr@10", "ndcg@10")},
            **{f"{key}_delta_ci95": [round(x, 4) for x in boot[key]["ci95"]] for key in ("hr@10", "ndcg@10")},
            "groups_with_target": round(float(np.mean([r["accuracy"] for r in _rows(rl_out)])), 3),
            "mean_grad_norm": round(float(np.mean([r["grad_norm"] for r in _rows(rl_out)])), 4),
        }), flush=True)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


if __name__ == "__main__":
    main()
