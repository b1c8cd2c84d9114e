"""Helpers for the workflow tests: run the real Snakefile in a scratch copy of the repository.

A scratch workflow holds copies of Snakefile, rules/, workflow/, config/ and profiles/ (the trainer and the
executor plugin are imported from the venv), so every run has its own data/, runs/, results/,
.snakemake/ and GCS emulator root (the default `workdir/gcs-emulator`, relative, hence inside
the copy). The demo is shrunk with `--config` overrides; Snakemake merges nested mappings given
with --config into config.yaml (lists such as overrides.rl are replaced as a whole).

One completed demo run is shared by the whole pytest session (`shared_demo_run`); tests that
change or break things work on a clone of it (`clone_run`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.upstream_oracle import UPSTREAM

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "rules", "workflow", "config", "profiles")
EMULATOR_ROOT = "workdir/gcs-emulator"  # config.yaml's handoff.emulator_root, relative to the workflow dir
RUN_TIMEOUT_S = 1500  # a whole shrunk graph with 4-process jobs, on a busy 2-core machine

# Tiny sizes for CI: the same graph, fewer steps and samples (config/trainer/demo/* stay as they are).
SMALL_OVERRIDES = {
    "sft": ["sft.steps=4", "sft.batch_size=8", "sft.eval_every=4", "sft.checkpoint_every=4", "sft.eval_samples=8"],
    "rl": ["steps=2", "checkpoint_every_steps=2", "rollout.batch_size=4", "rollout.n=4"],
    "eval": ["eval.max_samples=12", "eval.num_beams=10", "eval.batch_size=12"],
}

DATA_FILES = ["train.csv", "valid.csv", "test.csv", "info.txt", "index.json", "item.json"]
CHECKPOINT_FILES = ["sft_state_rl_last.msgpack", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def graph_artifacts(ds: str) -> list[str]:
    """Every file of the graph for dataset `ds` (relative to the workflow dir)."""
    return [
        *(f"data/{ds}/{n}" for n in DATA_FILES),
        *(f"runs/{ds}/sft/{n}" for n in ("sft_best.msgpack", "run_summary.json", "tokenizer.json",
                                         "tokenizer_config.json", "chat_template.jinja")),
        *(f"runs/{ds}/rl/{n}" for n in CHECKPOINT_FILES + ["run_summary.json", "metrics.jsonl"]),
        f"handoff/{ds}/gcs_copy.json",
        *(f"workdir/checkpoints/{ds}/{n}" for n in CHECKPOINT_FILES),
        *(f"results/{ds}/{model}/{n}" for model in ("rl", "sft")
          for n in ("eval_predictions.json", "run_summary.json", "calc_crosscheck.json")),
        f"results/{ds}/metrics.json",
        f"results/{ds}/plots/rl_curves.png",
        f"results/{ds}/plots/rl_vs_sft.png",
    ]


def make_workflow(dest: Path) -> Path:
    """A fresh scratch copy of the workflow (code and config only) at `dest`.

    `upstream_root` points at the shared copy of upstream's files (../shared is relative to the
    repository, not to the scratch copy), so the cross-check runs upstream's own calc.py.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    config = dest / "config/config.yaml"
    text = config.read_text()
    line = "upstream_root: ../shared/minionerec-upstream"
    assert line in text, f"config/config.yaml no longer has '{line}'"
    config.write_text(text.replace(line, f"upstream_root: {UPSTREAM}"))
    return dest


def clone_run(src: Path, dest: Path) -> Path:
    """Copy a completed workflow dir, timestamps and .snakemake metadata included, so Snakemake sees
    the same up-to-date state. The emulator's objects are copied; its server state is not (the
    clone starts its own server on its own copy when a job needs it)."""
    skip = shutil.ignore_patterns("emulator.json", "emulator.lock", "emulator.log", "locks", "incomplete")
    shutil.copytree(src, dest, symlinks=True, ignore=skip)
    return dest


def config_args(overrides: dict | None = None, **extra) -> list[str]:
    """`--config` arguments (values as JSON, which Snakemake reads as YAML)."""
    entries = {"overrides": overrides if overrides is not None else SMALL_OVERRIDES, **extra}
    return ["--config", *(f"{k}={json.dumps(v)}" for k, v in entries.items())]


def snakemake_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "SNAKEMAKE_PROFILE"))}
    env["PYTHONPATH"] = str(REPO)  # the executor plugin is found on sys.path by its module name
    return env


def snakemake(workdir: Path, *args: str, overrides: dict | None = None, config: dict | None = None,
              timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `python -m snakemake ARGS --config ...` in `workdir` (its profiles/default applies)."""
    cmd = [sys.executable, "-m", "snakemake", *args, *config_args(overrides, **(config or {}))]
    return subprocess.run(cmd, cwd=workdir, env=snakemake_env(), capture_output=True, text=True, timeout=timeout)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


def finished_rules(text: str) -> Counter:
    """Rules of the jobs that finished, from a run's output ("Finished jobid: N (Rule: X)")."""
    return Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", text))


def planned_rules(text: str) -> Counter:
    """Rules a run plans, from the "Job stats" table (`snakemake -n` or a real run)."""
    m = re.search(r"Job stats:\njob\s+count\n[-\s]+\n(.*?)\ntotal\s+\d+", text, re.S)
    if not m:
        return Counter()
    return Counter({name: int(n) for name, n in re.findall(r"^(\w+)\s+(\d+)$", m.group(1), re.M)})


def stop_emulator(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "trainer", "gcs-emulator", "stop", "--root", str(root)],
                   env=snakemake_env(), capture_output=True, text=True, timeout=60)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def describe(proc: subprocess.CompletedProcess, workdir: Path | None = None, tail: int = 6000) -> str:
    """Failure message for asserts: the end of Snakemake's output and of every job log."""
    parts = [output_of(proc)[-tail:]]
    if workdir is not None and (workdir / "logs").is_dir():
        for log in sorted((workdir / "logs").rglob("*.log")):
            parts.append(f"--- {log.relative_to(workdir)} ---\n{log.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


# ----------------------------------------------------------------- one shared demo run per session

_SHARED: dict[str, object] = {}


def shared_demo_run(tmp_path_factory, request) -> tuple[Path, subprocess.CompletedProcess]:
    """The demo graph run once per pytest session with the default profile (both workflow test
    modules use the same run); the emulator it started is stopped at the end of the session."""
    if "run" not in _SHARED:
        wd = make_workflow(tmp_path_factory.mktemp("demo_workflow") / "wf")
        request.session.config.add_cleanup(lambda: stop_emulator(wd / EMULATOR_ROOT))
        proc = snakemake(wd, "results/demo/metrics.json")
        _SHARED["run"] = (wd, proc)
    wd, proc = _SHARED["run"]
    assert proc.returncode == 0, describe(proc, wd)
    return wd, proc
