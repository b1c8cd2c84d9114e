"""`python -m trainer metrics`: the final results/{ds}/metrics.json and its plots.

Collects the RL and SFT-best evaluations, both cross-checks, the GCS receipt and the run
summaries into one file with provenance (git commit, config digest, checksums, GCS URIs), and
refuses to write it when a cross-check failed or any prediction was invalid.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from trainer.cli import base_parser
from trainer.errors import PredictionError, UserError
from trainer.eval.significance import RESAMPLES, SEED
from trainer.io_utils import atomic_write_bytes, atomic_write_json, read_json, setup_logging

METRIC_PREFIXES = ("eval/hr@", "eval/ndcg@")


def _read_json(path: str | Path, what: str):
    return read_json(path, UserError, f"it should hold the {what}: rerun the step that produces it")


def _metric_values(summary: dict) -> dict[str, float]:
    return {k.split("/", 1)[1]: float(v) for k, v in summary.items() if k.startswith(METRIC_PREFIXES)}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def config_digest(*configs: dict) -> str:
    blob = json.dumps(configs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _crosscheck_summary(check: dict) -> dict:
    """Which calc the cross-check ran (upstream's at a commit, an external script, or the fallback)."""
    keys = ("tool", "upstream_commit", "calc_source", "fallback_reason", "max_abs_diff")
    return {k: check[k] for k in keys if k in check}


def build_metrics(dataset: str, rl_eval: dict, sft_eval: dict, crosscheck: dict, sft_crosscheck: dict,
                  receipt: dict, rl_run: dict, sft_run: dict, deltas: dict, popularity: dict) -> dict:
    """metrics.json; `deltas` from significance.paired_bootstrap, `popularity` its popularity_floor.
    Checksums come from the summaries and the receipt, never from re-reading a checkpoint: the
    evaluation (on the eval host) verified its copy against the receipt and records its md5."""
    for name, check in (("RL", crosscheck), ("SFT best", sft_crosscheck)):
        if not check.get("passed"):
            raise PredictionError(f"{name} cross-check did not pass (max_abs_diff={check.get('max_abs_diff')}, "
                                  f"invalid={check.get('invalid_count')}); see calc_crosscheck.json")
    invalid = int(rl_eval["eval/invalid_prediction_count"])
    if invalid:
        raise PredictionError(f"{invalid} invalid predictions in the RL evaluation")
    rl_m, sft_m = _metric_values(rl_eval), _metric_values(sft_eval)
    ckpt_entry = next((f for f in receipt["files"] if f["name"] == "sft_state_rl_last.msgpack"), None)
    if ckpt_entry is None:
        raise UserError("GCS receipt lists no sft_state_rl_last.msgpack; rerun gcs_copy")
    evaluated = rl_eval.get("checkpoint_md5")
    if ckpt_entry["md5"] != evaluated:
        raise UserError(f"the evaluated checkpoint's md5 {evaluated} differs from the uploaded object's "
                        f"{ckpt_entry['md5']}; delete workdir/checkpoints/... and rerun")
    return {
        "dataset": dataset,
        "n": rl_eval["n"],
        "num_beams": rl_eval["num_beams"],
        **rl_m,
        "invalid_prediction_count": invalid,
        "crosscheck": {"passed": True, **_crosscheck_summary(crosscheck), "sft": _crosscheck_summary(sft_crosscheck)},
        "sft_best": {**sft_m, "invalid_prediction_count": int(sft_eval["eval/invalid_prediction_count"])},
        # paired bootstrap over the test rows: an interval that holds zero is not a measured difference
        "rl_minus_sft": deltas,
        "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "interval": "95% percentile, rows resampled "
                      "once per draw for both models"},
        "popularity_floor": {"fit_on": "train", **popularity},
        "rl_training": {
            "steps": rl_run.get("steps"), "process_count": rl_run.get("process_count"),
            "samples_per_s": rl_run.get("samples_per_s"), "seconds": rl_run.get("seconds"),
            "final_reward_mean": (rl_run.get("curves") or [{}])[-1].get("reward_mean"),
        },
        "provenance": {
            "git_commit": git_commit(),
            "config_digest": config_digest(sft_run.get("config"), rl_run.get("config"), rl_eval.get("config")),
            "sft_best_md5": sft_run.get("sft_best_md5"),
            "rl_init_checkpoint_md5": rl_run.get("init_checkpoint_md5"),
            "rl_last_md5": rl_run.get("checkpoint_md5"),
            "eval_checkpoint_md5": rl_eval.get("checkpoint_md5"),
            "gcs": {f["name"]: {"uri": f["uri"], "md5": f["md5"], "crc32c": f.get("crc32c"),
                                "generation": f.get("generation")} for f in receipt["files"]},
            "gcs_endpoint": receipt.get("endpoint"),
        },
    }


def plot(curves: list[dict], metrics: dict, out_dir: Path) -> list[Path]:
    """Reward/KL curves of RL and HR@K/NDCG@K of RL vs SFT, as PNGs (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buf.getvalue())
        return out_dir / name

    steps = [c["step"] for c in curves]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("reward_mean", "accuracy", "kl")):
        ax.plot(steps, [c.get(key) for c in curves], marker=".")
        ax.set_title(key)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"RL training ({metrics['dataset']}); accuracy = share of prompts whose group holds the target", y=1.04)
    paths = [save(fig, "rl_curves.png")]

    ks = sorted({int(k.split("@")[1]) for k in metrics if k.startswith("hr@")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
    for ax, name in zip(axes, ("hr", "ndcg")):
        ax.plot(ks, [metrics["sft_best"][f"{name}@{k}"] for k in ks], marker="o", label="SFT best")
        ax.plot(ks, [metrics[f"{name}@{k}"] for k in ks], marker="o", label="RL (rl_last)")
        ax.plot(ks, [metrics["popularity_floor"][f"{name}@{k}"] for k in ks], ls="--", color="grey",
                label="popularity floor (train)")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"{name.upper()}@K (n={metrics['n']})")
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    keys = [f"{name}@{k}" for name in ("hr", "ndcg") for k in ks]
    d = metrics["rl_minus_sft"]
    ax.errorbar(range(len(keys)), [d[k]["delta"] for k in keys], fmt="o", capsize=3,
                yerr=[[d[k]["delta"] - d[k]["ci95"][0] for k in keys], [d[k]["ci95"][1] - d[k]["delta"] for k in keys]])
    for i, k in enumerate(keys):
        if d[k]["excludes_zero"]:
            ax.annotate("*", (i, d[k]["ci95"][1]), ha="center", va="bottom")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=60)
    ax.set_title("RL - SFT, paired bootstrap 95% (* excludes 0)")
    ax.grid(alpha=0.3)
    paths.append(save(fig, "rl_vs_sft.png"))
    return paths


def main(argv: list[str]) -> int:
    from trainer.data import readers
    from trainer.eval.metrics import load_predictions
    from trainer.eval.significance import paired_bootstrap, popularity_floor

    p = base_parser("metrics", "assemble results/{ds}/metrics.json (+ plots) from the stage outputs")
    for flag in ("--dataset", "--rl-eval", "--sft-eval", "--rl-predictions", "--sft-predictions", "--crosscheck",
                 "--sft-crosscheck", "--receipt", "--rl-run", "--sft-run", "--rl-curves", "--data",
                 "--out", "--plots"):
        p.add_argument(flag, required=True)
    args = p.parse_args(argv[1:])
    log = setup_logging(args.log)
    curves = [json.loads(line) for line in Path(args.rl_curves).read_text().splitlines() if line.strip()]
    rl_records, sft_records = load_predictions(args.rl_predictions), load_predictions(args.sft_predictions)
    catalog = readers.load_catalog(args.data)
    popularity = popularity_floor(readers.read_split(args.data, "train", catalog), rl_records, catalog.sids)
    metrics = build_metrics(
        args.dataset, _read_json(args.rl_eval, "RL evaluation summary"), _read_json(args.sft_eval, "SFT evaluation summary"),
        _read_json(args.crosscheck, "RL cross-check"), _read_json(args.sft_crosscheck, "SFT cross-check"),
        _read_json(args.receipt, "GCS receipt"), _read_json(args.rl_run, "RL run summary"),
        _read_json(args.sft_run, "SFT run summary"),
        paired_bootstrap(rl_records, sft_records), popularity)
    plot(curves, metrics, Path(args.plots))
    atomic_write_json(args.out, metrics)
    d = metrics["rl_minus_sft"].get("hr@10")
    log.info("%s: hr@10=%s ndcg@10=%s (SFT best hr@10=%s; RL-SFT %s; popularity %s) -> %s", args.dataset,
             metrics.get("hr@10"), metrics.get("ndcg@10"), metrics["sft_best"].get("hr@10"), d,
             popularity.get("hr@10"), args.out)
    return 0
