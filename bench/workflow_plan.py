"""Benchmark: how long Snakemake takes to plan the workflow, with nothing to run.

    python bench/workflow_plan.py [--workdir DIR] [--repeats 3] [--config KEY=VALUE ...]

Times, as the wall clock of the whole `python -m snakemake` process (what a user waits for):
  plan_office_s      `snakemake -n results/office/metrics.json` (a full plan of the real-data graph;
                     nothing exists yet for office in a fresh checkout)          goal < 2 s
  uptodate_demo_s    `snakemake results/demo/metrics.json` when every output is already up to date
                     ("Nothing to be done")                                       goal < 3 s
The second needs a completed demo run in --workdir (default: the repository root; run
`snakemake results/demo/metrics.json` there first); it is reported as null otherwise.
Each command runs --repeats times; the best and the median are printed as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS_S = {"plan_office_s": 2.0, "uptodate_demo_s": 3.0}


def timed(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    env["PYTHONPATH"] = str(REPO)  # the executor plugin is found on sys.path by module name
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - t0, proc


def measure(cmd: list[str], cwd: Path, repeats: int, expect: str) -> dict:
    times = []
    for _ in range(repeats):
        seconds, proc = timed(cmd, cwd)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or expect not in out:
            raise SystemExit(f"`{' '.join(cmd)}` in {cwd} did not {expect!r} (exit {proc.returncode}):\n{out[-3000:]}")
        times.append(seconds)
    return {"best": round(min(times), 3), "median": round(statistics.median(times), 3), "runs": len(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(REPO), help="workflow directory (default: the repository root)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                   help="passed to snakemake --config (the same values the demo run in --workdir used)")
    args = p.parse_args()
    wd = Path(args.workdir).resolve()
    snake = [sys.executable, "-m", "snakemake"]
    cfg = ["--config", *args.config] if args.config else []  # last: --config takes every word after it

    result: dict = {"workdir": str(wd), "goals_s": GOALS_S}
    result["plan_office_s"] = measure(snake + ["-n", "results/office/metrics.json"] + cfg, wd, args.repeats,
                                      "metrics")
    # Never start real jobs from a benchmark: time the rerun only when a dry run says it is a no-op.
    _, dry = timed(snake + ["-n", "results/demo/metrics.json"] + cfg, wd)
    if dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr:
        result["uptodate_demo_s"] = measure(snake + ["results/demo/metrics.json"] + cfg, wd, args.repeats,
                                            "Nothing to be done")
    else:
        result["uptodate_demo_s"] = None
        result["note"] = (f"results/demo/metrics.json in {wd} is missing or not up to date: run "
                          "`snakemake results/demo/metrics.json` there first")
    result["meets_goals"] = all(result[k] is None or result[k]["median"] < goal for k, goal in GOALS_S.items())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
