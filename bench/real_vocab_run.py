"""A non-toy multi-process run on this CPU: Qwen2.5's real vocabulary, a few layers, 4 processes.

    python bench/real_vocab_run.py --work /tmp/rv [--code DIR --label before] [--hidden 512 --layers 4]

Builds once under --work: the real Office_Products data (MiniOneRec's files), a tokenizer of
Qwen2.5's exact size (151,665 tokens; built locally, there is no HF hub here, see
tests/hf_helpers.py) with the Office SID codes added by `add_tokens`, and a random-weight
`Qwen2ForCausalLM` grown with `resize_token_embeddings` and saved by `save_pretrained` as bf16
safetensors. Then runs the code in --code (default: this checkout) as the workflow does:
import-hf, RL for 2 steps and eval of 32 test rows, each as 4 jax.distributed processes on
loopback (followers in empty directories). Prints one JSON line per phase with every process's
peak resident memory (ru_maxrss from wait4) and the wall time.

`--code` pointing at an older checkout (e.g. `git archive c9245c1`) measures the code before
weights were sent array by array; that code cannot take the model from the checkpoint, so the
model.* keys are passed explicitly for it (`--label before`), and its import runs on 1 process
(its followers would wait for a command that never comes).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OFFICE = Path("/work/shared/minionerec-data/data/Amazon")


def build_inputs(work: Path, hidden: int, layers: int) -> dict:
    """Data + HF checkpoint under `work` (kept between runs)."""
    from tests.hf_helpers import QWEN25_LEN, qwen25_sized_tokenizer, save_sid_checkpoint
    from trainer.data.readers import code_tokens, load_catalog

    data, hf = work / "data", work / "hf"
    if not (data / "info.txt").is_file():
        _run([sys.executable, "-m", "trainer", "prepare-data", "--minionerec-root", str(OFFICE), "--name",
              "Office_Products", "--train-from", "valid", "--out", str(data)], REPO, {"PYTHONPATH": str(REPO)})
    codes = code_tokens(load_catalog(data).sids)
    if not (hf / "config.json").is_file():
        save_sid_checkpoint(hf, qwen25_sized_tokenizer(), codes, hidden=hidden, intermediate=2 * hidden,
                            layers=layers, heads=hidden // 64, kv_heads=2, rope_theta=1e6, tied=True,
                            dtype="bfloat16")
    cfg = json.loads((hf / "config.json").read_text())
    return {"data": data, "hf": hf, "vocab_size": cfg["vocab_size"], "qwen25_len": QWEN25_LEN, "codes": len(codes),
            "hf_config": cfg}


def _run(argv, cwd, env):
    subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argv: list[str], code: Path, work: Path, phase: str, n: int, timeout_s: float = 3600) -> dict:
    """`python -m trainer ARGV` on n processes (process 0 in `work`); peak RSS of each, in MiB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    env.update({"PYTHONPATH": str(code), "JAX_PLATFORMS": "cpu"})
    port = _free_port()
    logs = work / "logs" / phase
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        cwd = work if i == 0 else work / "followers" / f"{phase}{i}"
        cwd.mkdir(parents=True, exist_ok=True)
        penv = dict(env)
        if n > 1:
            penv.update({"TRAINER_COORDINATOR": f"127.0.0.1:{port}", "TRAINER_NUM_PROCESSES": str(n),
                         "TRAINER_PROCESS_ID": str(i)})
        cmd = [sys.executable, "-m", "trainer", *(argv if i == 0 else ["follow"])]
        with open(logs / f"p{i}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=penv, stdout=log, stderr=subprocess.STDOUT))
    t0, rss, codes = time.time(), [None] * n, [None] * n
    pending = {p.pid: i for i, p in enumerate(procs)}
    while pending:
        pid, status, usage = os.wait4(-1, 0)
        if pid in pending:
            i = pending.pop(pid)
            rss[i], codes[i] = round(usage.ru_maxrss / 1024, 1), os.waitstatus_to_exitcode(status)
            procs[i].returncode = codes[i]
        if time.time() - t0 > timeout_s:
            for p in procs:
                p.kill()
    if any(codes):
        tail = (logs / f"p{codes.index(next(c for c in codes if c))}.log").read_text()[-3000:]
        raise SystemExit(f"{phase}: exit codes {codes}\n{tail}")
    return {"phase": phase, "processes": n, "peak_rss_mib": rss, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose trainer runs (default: this one)")
    p.add_argument("--label", default="after", help="'before': code without model config in checkpoints")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--procs", type=int, default=4)
    args = p.parse_args()
    work = args.work.absolute()
    inputs = build_inputs(work, args.hidden, args.layers)
    run_dir = work / args.label
    sft, rl, ev = run_dir / "sft", run_dir / "rl", run_dir / "eval"
    model_sets = []
    if args.label == "before":  # that code reads the model from model.*, and widens bf16 to fp32
        c = inputs["hf_config"]
        model_sets = [f"model.hidden_size={c['hidden_size']}", f"model.intermediate_size={c['intermediate_size']}",
                      f"model.num_layers={c['num_hidden_layers']}", f"model.num_heads={c['num_attention_heads']}",
                      f"model.num_kv_heads={c['num_key_value_heads']}", "model.rope_theta=1000000.0",
                      "model.tie_word_embeddings=true", f"model.max_position_embeddings={c['max_position_embeddings']}"]
    sets = lambda *s: [a for x in (*s, *model_sets) for a in ("--set", x)]
    common = ["data.max_prompt_len=160", "data.max_history=10"]
    print(json.dumps({"label": args.label, "code": str(args.code), "vocab_size": inputs["vocab_size"],
                      "qwen25_tokenizer_len": inputs["qwen25_len"], "sid_codes": inputs["codes"],
                      "hidden": args.hidden, "layers": args.layers, "dtype": "bfloat16 (safetensors)"}), flush=True)
    import_argv = ["import-hf", str(inputs["hf"]), "--out", str(sft)]
    if args.label != "before":
        import_argv += ["--data", str(inputs["data"])]
    phases = [
        ("import", import_argv, 1 if args.label == "before" else args.procs),
        ("rl", ["rl", "--data", str(inputs["data"]), *sets(*common, f"output_dir={rl}", f"init.checkpoint={sft}/sft_best.msgpack",
                f"tokenizer.path={sft}", "steps=2", "rollout.batch_size=8", "rollout.n=8", "checkpoint_every_steps=0",
                "eval_every_steps=0")], args.procs),
        ("eval", ["eval", "--data", str(inputs["data"]), "--checkpoint", f"{rl}/sft_state_rl_last.msgpack",
                  "--tokenizer", str(rl), "--out", str(ev),
                  *sets(*common, "eval.max_samples=32", "eval.num_beams=20", "eval.batch_size=8")], args.procs),
    ]
    for name, argv, n in phases:
        row = run_processes(argv, args.code, work, f"{args.label}_{name}", n)
        print(json.dumps({"label": args.label, **row}), flush=True)
    summary = json.loads((ev / "run_summary.json").read_text())
    print(json.dumps({"label": args.label, "eval_rows": summary.get("n"), "hr@10": summary.get("eval/hr@10"),
                      "invalid": summary.get("eval/invalid_prediction_count"),
                      "backend": summary.get("backend"), "process_count": summary.get("process_count")}), flush=True)


if __name__ == "__main__":
    main()
