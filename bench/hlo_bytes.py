"""Where a scale-plan program's HBM bytes go: its compiled instructions ranked by bytes moved.

    python bench/hlo_bytes.py [--program eval_beam] [--num-layers 28] [--target cpu|tpu] [--top 25]
                              [--which scanned|unrolled] [--dump PREFIX]

Compiles one of bench/scale_plan.py's programs (the same function, shapes and shardings; `--target
tpu` needs libtpu, see scale_plan) and ranks its HBM traffic (bench/hlo_traffic.py: loop bodies
times their trip count, slices and in-place updates by the part they touch) by the line of this
project's code each instruction comes from, so the ranking names the Python line to change. By
default the real, scanned program; `--which unrolled` ranks the unrolled twin whose XLA cost
analysis the plan's `bytes_accessed` reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_plan  # noqa: E402  (sets XLA_FLAGS before jax is imported)

import jax  # noqa: E402

from hlo_traffic import ranked_bytes  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--program", default="eval_beam", choices=scale_plan.ALL)
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's 28 (faster compiles)")
    p.add_argument("--target", choices=("cpu", "tpu"), default="cpu")
    p.add_argument("--which", choices=("scanned", "unrolled"), default="scanned")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dump", default=None, help="also write the ranked program's optimized HLO text to DUMP.<which>.hlo")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra preset override key=value")
    args = p.parse_args(argv)
    plan = ["--programs", args.program, "--target", args.target, "--cost", args.which]
    plan += (["--num-layers", str(args.num_layers)] if args.num_layers else []) + sum((["--set", s] for s in args.overrides), [])
    compiled, real_compile = {}, jax.stages.Lowered.compile

    def keep(self, *a, **k):  # the plan compiles the scanned program, then (--cost unrolled) its twin
        c = real_compile(self, *a, **k)
        compiled["unrolled" if "scanned" in compiled else "scanned"] = c
        return c

    jax.stages.Lowered.compile = keep
    try:
        line = next(l for l in scale_plan.main(plan) if l.get("program") == args.program)
    finally:
        jax.stages.Lowered.compile = real_compile
    text = compiled[args.which].as_text()
    if args.dump:
        Path(f"{args.dump}.{args.which}.hlo").write_text(text)
    rows, total = ranked_bytes(text)
    summary = {"bench": "hlo_bytes", "program": args.program, "layers": line["layers"], "target": args.target,
               "ranked": args.which, "hbm_bytes": total, "xla_bytes_accessed": line["bytes_accessed"],
               "top": [{"source": k, "bytes": b, "executions": n} for k, b, n in rows[: args.top]]}
    print(json.dumps({k: v for k, v in summary.items() if k != "top"}))
    for r in summary["top"]:
        print(f"{r['bytes'] / 1e9:9.3f} GB {100 * r['bytes'] / total:5.1f}%  x{r['executions']:<4d} {r['source']}")
    return summary


if __name__ == "__main__":
    main()
