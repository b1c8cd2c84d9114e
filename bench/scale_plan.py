"""Scale rehearsal: the Qwen2.5-1.5B preset's programs AOT-compiled for its slices, without weights.

    python bench/scale_plan.py [--programs sft_step,rl_rollout,rl_ref_logprobs,rl_update,eval_beam]
                               [--prompt-len 160] [--eval-batch 64] [--num-layers 28] [--out FILE]
                               [--target cpu|tpu]

Each program is the trainer's own jitted function (trainer.train.sft.make_steps, trainer.rl.update,
trainer.rl.rollout, trainer.decode.beam.constrained_beam_search), lowered on ShapeDtypeStructs that
carry the shardings `trainer.rl.loop` / `trainer.eval.evaluate` give the real arrays, and compiled
for virtual CPU meshes (`--xla_force_host_platform_device_count=16`): the v6e-16 train slice
(16 chips, FSDP over all of them, as config/trainer/qwen2.5-1.5b/base.yaml sets) and the v6e-8
eval host (8 chips, batch sharded, weights replicated, as predict_sid_rows places them).
`--target tpu` compiles the same programs with the TPU compiler instead, for a v6e:4x4 and a v6e:2x4
topology (libtpu's own description of those slices; no TPU needs to be attached).

One JSON line per program: per-device argument / output / alias / temp bytes (memory_analysis),
FLOPs and bytes accessed per device (cost_analysis), HBM traffic of the compiled program
(`hbm_bytes`, bench/hlo_traffic.py), compile seconds, and a v6e roofline:
    roofline_s = max(flops / 918e12, hbm_bytes / 1.64e12)     (per chip: bf16 peak, HBM)
beside ideal_s, the same roofline for the work the step cannot avoid (model FLOPs; weights read
once per forward pass, plus the prompt's KV cache once per decode step). `roofline_xla_bytes_s`
uses XLA's `bytes_accessed` instead, which counts whole buffers where the program slices them (a
layer's weights out of the stacked ones) or updates them in place. A last line projects the
full Office test eval (4,866 rows, 50 beams) on a v6e-8: ceil(4866 / eval batch) calls of the
eval program, against MLLM-JAX's measured 360 s.

Caveats: with `--target cpu` costs come from the XLA CPU compiler's view of the program (its
fusion and layouts, not TPU's); `--target tpu` gives the TPU compiler's. XLA's cost analysis
counts a while/scan body once, not once per trip, so by default (`--cost unrolled`) FLOPs and
bytes come from a second lowering and compile of the same program with the layer scan unrolled
(`Qwen2ForCausalLM.unroll_layers`); memory and compile time stay those of the real, scanned
program, and `scan_flops` keeps what the scanned program reports; `hbm_bytes` is always the scanned
program's, every trip counted (the unrolled twin copies each layer's slice of the stacked weights
before using it, traffic the real program does not have). Each line carries the analytic
FLOPs next to the compiled ones. Nothing runs on a TPU: these are compile-time figures.
"""
from __future__ import annotations

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hlo_traffic import ranked_bytes  # noqa: E402  (bench/, beside this script)
from trainer.config import load_config  # noqa: E402
from trainer.data import readers  # noqa: E402
from trainer.decode.beam import constrained_beam_search  # noqa: E402
from trainer.decode.trie import LEVELS, build_trie  # noqa: E402
from trainer.model.qwen2 import ModelConfig, Qwen2ForCausalLM, build_model, matmul_weights_in_compute_dtype  # noqa: E402
from trainer.rl import rollout, update  # noqa: E402
from trainer.train import parallel, sft  # noqa: E402
from trainer.train.optim import build_optimizer  # noqa: E402

PRESET = REPO / "config/trainer/qwen2.5-1.5b"
PEAK_FLOPS, HBM_BW, HBM_GIB = 918e12, 1.64e12, 32  # v6e per chip: bf16 dense peak, HBM bandwidth, capacity
QWEN_TOKENS = 151_665  # len(Qwen2.5 tokenizer) before MiniOneRec adds the SID tokens
OFFICE, OFFICE_TEST_ROWS, MLLM_JAX_OFFICE_S = "Office_Products", 4866, 360.0  # issue 10: MLLM-JAX, v6e-8
ALL = ("sft_step", "rl_rollout", "rl_ref_logprobs", "rl_update", "eval_beam")


def catalog(amazon: Path) -> tuple[np.ndarray, int, str]:
    """The Office catalog's SIDs as token ids, the SID tokens appended after the Qwen vocabulary
    (one per distinct code, as MiniOneRec's add_tokens does). Returns (table, vocab size, source)."""
    cat = readers.load_catalog_files(amazon / f"info/{OFFICE}_5_2016-10-2018-11.txt",
                                     amazon / f"index/{OFFICE}.index.json")
    ids = {tok: QWEN_TOKENS + i for i, tok in enumerate(readers.code_tokens(cat.sids))}
    table = np.array([[ids[t] for t in readers.split_sid(s)] for s in cat.sids], np.int32)
    return table, QWEN_TOKENS + len(ids), f"{OFFICE} ({amazon})"


def sds(x, sharding):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def abstract_model(mcfg: ModelConfig):
    """(graphdef, params as ShapeDtypeStructs): no weights are ever allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(mcfg, 0)))
    return graphdef, state.to_pure_dict()


def train_state_specs(params, tx, mesh):
    """Params and optimizer state as trainer.train.parallel lays them out (FSDP over the mesh)."""
    fsdp = mesh.shape["fsdp"]
    shard = lambda x: sds(x, NamedSharding(mesh, parallel.param_spec(x.shape, fsdp)))
    return jax.tree.map(shard, params), jax.tree.map(shard, jax.eval_shape(tx.init, params))


def shardings_of(*trees):
    return tuple(jax.tree.map(lambda x: x.sharding, t) for t in trees)


def rows_spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


# ----------------------------------------------------------------------------- analytic work

def model_counts(m: ModelConfig) -> dict:
    attn = m.hidden_size * m.num_heads * m.head_dim * 2 + 2 * m.hidden_size * m.num_kv_heads * m.head_dim
    body = m.num_layers * (attn + 3 * m.hidden_size * m.intermediate_size)
    return {"body": body, "embed": m.vocab_size * m.hidden_size,
            "kv_bytes_per_token": m.num_layers * 2 * m.num_kv_heads * m.head_dim * jnp.dtype(m.dtype).itemsize}


def forward_flops(m: ModelConfig, c: dict, rows: int, new: int, context: int, logit_rows: int) -> float:
    """Matmul FLOPs of one forward: `rows` x `new` tokens attending over `context` slots."""
    attn = 4 * m.num_layers * rows * new * context * m.num_heads * m.head_dim
    return 2 * c["body"] * rows * new + attn + 2 * m.hidden_size * m.vocab_size * logit_rows


def ideal(kind: str, m: ModelConfig, a: dict, devices: int) -> tuple[float, float]:
    """(FLOPs, bytes) per device that the step cannot avoid (bf16 weights, shared prompt cache)."""
    c = model_counts(m)
    w = (c["body"] + c["embed"]) * jnp.dtype(m.dtype).itemsize  # weights as the matmuls read them
    p, kvb = a["prompt_len"], c["kv_bytes_per_token"]
    if kind in ("eval_beam", "rl_rollout"):
        # One prefill, then a decode step per generated token but the last: a, b, c and the newline are
        # fed back (the newline's step scores EOS, which upstream's beam score includes): 5 passes.
        b, k, steps = a["rows"] // devices, a["beams"], LEVELS + 1
        flops = forward_flops(m, c, b, p, p, b) + sum(forward_flops(m, c, b * k, 1, p + s, b * k)
                                                      for s in range(1, steps + 1))
        return flops, (1 + steps) * w + b * p * kvb * (1 + steps)  # prompt KV written once, read per step
    t, n, passes = a["seq_len"], a["rows"] // devices, (3 if kind in ("sft_step", "rl_update") else 1)
    flops = passes * forward_flops(m, c, n, t, t, n * a["resp"])
    return flops, passes * w  # forward (+ backward: 2x) of the local batch; weights gathered per pass


# ----------------------------------------------------------------------------- programs

def programs(cfg_rl: dict, cfg_sft: dict, mcfg: ModelConfig, table: np.ndarray, args, train_devs, eval_devs) -> dict:
    """name -> (devices, jitted fn, abstract args, analytic parameters)."""
    train_mesh = parallel.make_mesh(cfg_rl["mesh"], train_devs)
    graphdef, params = abstract_model(mcfg)
    tx_sft, _, _ = build_optimizer(cfg_sft["train"]["optimizer"], int(cfg_sft["sft"]["steps"]))
    tx_rl, _, _ = build_optimizer(cfg_rl["train"]["optimizer"], int(cfg_rl["steps"]))
    rows = NamedSharding(train_mesh, P(parallel.BATCH_AXES))
    rep = NamedSharding(train_mesh, P())
    p = args.prompt_len
    trie = jax.tree.map(lambda x: sds(x, rep), build_trie(table))
    newline, eos = 0, 1  # any text tokens: the program does not depend on which
    out = {}

    sft_params, sft_opt = train_state_specs(params, tx_sft, train_mesh)
    bs, t_sft = int(cfg_sft["sft"]["batch_size"]), p + sft.N_RESP
    train_step, _ = sft.make_steps(graphdef, tx_sft, train_mesh)
    batch = {k: rows_spec((bs, t_sft), jnp.int32, rows) for k in ("input_ids", "attention_mask")}
    out["sft_step"] = (16, train_step, (sft_params, sft_opt, batch),
                       {"rows": bs, "seq_len": t_sft, "prompt_len": p, "resp": sft.N_RESP})

    rl_params, rl_opt = train_state_specs(params, tx_rl, train_mesh)
    b, g = int(cfg_rl["rollout"]["batch_size"]), int(cfg_rl["rollout"]["n"])
    prompts = rows_spec((b, p), jnp.int32, rows)
    def roll_fn(prm, ids, mask, trie):  # as trainer.rl.loop calls it
        with parallel.rows_over(train_mesh):
            return rollout.rollout(graphdef, prm, ids, mask, trie, cfg_rl["rollout"], newline, eos,
                                   jax.random.key(0))
    roll = jax.jit(roll_fn)
    out["rl_rollout"] = (16, roll, (rl_params, prompts, prompts, trie), {"rows": b, "beams": g, "prompt_len": p})

    logprobs, update_step = update.make_phase_fns(graphdef, tx_rl, float(cfg_rl["rl"]["clip_eps"]),
                                                  float(cfg_rl["rl"]["kl_coef"]), shardings_of(rl_params, rl_opt),
                                                  mesh=train_mesh)
    t_rl, n = p + update.N_RESP, b * g
    seqs = {"input_ids": rows_spec((n, t_rl), jnp.int32, rows), "attention_mask": rows_spec((n, t_rl), jnp.int32, rows),
            "advantages": rows_spec((n,), jnp.float32, rows)}
    if update.needs_old_logprobs(cfg_rl["rl"]["updates_per_rollout"]):
        seqs["old_logp"] = rows_spec((n, update.N_RESP), jnp.float32, rows)
    rl_work = {"rows": n, "seq_len": t_rl, "prompt_len": p, "resp": update.N_RESP}
    if update.needs_reference(cfg_rl["rl"]["kl_coef"]):
        seqs["ref_logp"] = rows_spec((n, update.N_RESP), jnp.float32, rows)
        out["rl_ref_logprobs"] = (16, logprobs, (rl_params, seqs["input_ids"], seqs["attention_mask"]), rl_work)
    out["rl_update"] = (16, update_step, (rl_params, rl_opt, seqs), rl_work)

    # v6e-8: one process, 8 local chips; predict_sid_rows replicates the weights, shards the prompts.
    eval_mesh = Mesh(np.array(eval_devs), ("data",))
    erep, erows = NamedSharding(eval_mesh, P()), NamedSharding(eval_mesh, P("data"))
    # as trainer.eval.evaluate loads them: Linear weights stored in the compute dtype
    e_params = matmul_weights_in_compute_dtype(jax.tree.map(lambda x: sds(x, erep), params), mcfg)
    e_trie = jax.tree.map(lambda x: sds(x, erep), build_trie(table))
    eb, beams = args.eval_batch, int(cfg_rl["eval"]["num_beams"])
    e_prompts = rows_spec((eb, p), jnp.int32, erows)
    beam = jax.jit(lambda prm, ids, mask, trie: constrained_beam_search(nnx.merge(graphdef, prm), ids, mask, trie,
                                                                        beams, newline, eos))
    out["eval_beam"] = (8, beam, (e_params, e_prompts, e_prompts, e_trie), {"rows": eb, "beams": beams, "prompt_len": p})
    return out


def target_devices(target: str) -> tuple[list, list]:
    """(16 train devices, 8 eval devices): virtual CPU devices, or the chips of a v6e-16 (4x4, four
    hosts) and a v6e-8 (2x4) topology, which the TPU compiler targets without any TPU attached."""
    if target == "tpu":
        from jax.experimental import topologies
        try:
            return [topologies.get_topology_desc(platform="tpu", topology_name=name).devices
                    for name in ("v6e:4x4", "v6e:2x4")]
        except Exception as e:  # no libtpu: say how to get it
            raise SystemExit(f"--target tpu: no TPU compiler ({type(e).__name__}: {e}); "
                             "install libtpu (pip install libtpu==0.0.42.1, as jax[tpu]==0.10.2 pins)") from None
    devs = jax.devices()
    if len(devs) < 16:
        raise SystemExit(f"needs 16 devices, got {len(devs)}: set XLA_FLAGS=--xla_force_host_platform_device_count=16")
    return devs[:16], devs[:8]


def flops_and_bytes(compiled) -> tuple[float, float, float | None]:
    """FLOPs, bytes accessed and, from the TPU compiler only, its own cost model's seconds."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    optimal = cost.get("optimal_seconds")
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)), optimal and float(optimal)


def measure(name: str, devices: int, fn, fargs, work: dict, mcfg: ModelConfig, unrolled_cost: bool) -> dict:
    """Compile `fn` for its memory and compile time; with `unrolled_cost`, its FLOPs/bytes from `fn`
    traced again with the layers unrolled."""
    # jit caches are keyed on (function, graphdef, shapes), which do not carry the unroll flag:
    # without cleared caches the unrolled lowering would reuse the scanned trace (and the reverse).
    jax.clear_caches()
    t, cpu = time.perf_counter(), time.process_time()
    compiled = fn.lower(*fargs).compile()
    compile_s, compile_cpu_s = time.perf_counter() - t, time.process_time() - cpu  # CPU time: robust to load
    mem = compiled.memory_analysis()
    hbm = ranked_bytes(compiled.as_text())[1]  # the real (scanned) program's traffic, every trip counted
    scan_flops, scan_bytes, optimal_s = flops_and_bytes(compiled)
    flops, bytes_accessed = scan_flops, scan_bytes
    if unrolled_cost:
        Qwen2ForCausalLM.unroll_layers = True  # read while lower() traces
        jax.clear_caches()
        try:
            flops, bytes_accessed, optimal_s = flops_and_bytes(fn.lower(*fargs).compile())
        finally:
            Qwen2ForCausalLM.unroll_layers = False
            jax.clear_caches()
    arg, outb, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    peak = arg + outb - alias + temp
    ideal_flops, ideal_bytes = ideal(name, mcfg, work, devices)
    roofline_s = max(flops / PEAK_FLOPS, hbm / HBM_BW)
    ideal_s = max(ideal_flops / PEAK_FLOPS, ideal_bytes / HBM_BW)
    return {
        "bench": "scale_plan", "program": name, "slice": "v6e-16" if devices == 16 else "v6e-8", "devices": devices,
        "layers": mcfg.num_layers, **work, "compile_s": round(compile_s, 2),
        "compile_cpu_s": round(compile_cpu_s, 2),
        "argument_bytes": arg, "output_bytes": outb, "alias_bytes": alias, "temp_bytes": temp,
        "peak_bytes": peak, "peak_gib": round(peak / 2**30, 3), "fits_32gib": peak <= HBM_GIB * 2**30,
        "cost_from": "unrolled" if unrolled_cost else "scanned", "scan_flops": scan_flops,
        "scan_bytes_accessed": scan_bytes,
        "flops": flops, "bytes_accessed": bytes_accessed, "hbm_bytes": hbm, "analytic_flops": ideal_flops,
        "roofline_s": roofline_s, "bound_by": "flops" if flops / PEAK_FLOPS >= hbm / HBM_BW else "hbm",
        "roofline_xla_bytes_s": max(flops / PEAK_FLOPS, bytes_accessed / HBM_BW),
        "ideal_s": ideal_s, "roofline_over_ideal": roofline_s / ideal_s if ideal_s else None,
        "xla_optimal_s": optimal_s,  # the TPU compiler's cost-model time (--target tpu only)
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", default=",".join(ALL))
    p.add_argument("--prompt-len", type=int, default=160,
                   help="prompt tokens (issue 14: about 160 for MiniOneRec prompts; a multiple of 8, the length bucket)")
    p.add_argument("--eval-batch", type=int, default=None, help="prompts per eval call (default: the preset's eval.batch_size)")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's 28 (compile-time scaling)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra preset override key=value")
    p.add_argument("--data-root", default=None,
                   help="MiniOneRec data/Amazon, for the Office catalog (default: config/config.yaml data_root)")
    p.add_argument("--cost", choices=("unrolled", "scanned"), default="unrolled",
                   help="where FLOPs/bytes come from: an unrolled twin of each program (counts every layer; "
                        "a second compile) or the scanned program itself (XLA counts the layer body once)")
    p.add_argument("--target", choices=("cpu", "tpu"), default="cpu",
                   help="compile for virtual CPU devices, or for v6e topologies with the TPU compiler (needs "
                        "libtpu: the `tpu` extra or `pip install libtpu==0.0.42.1`; no TPU needed)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    train_devs, eval_devs = target_devices(args.target)

    root = args.data_root or REPO / yaml.safe_load((REPO / "config/config.yaml").read_text())["data_root"]
    table, vocab, source = catalog(Path(root))
    sets = list(args.overrides) + ([f"model.num_layers={args.num_layers}"] if args.num_layers else [])
    cfg_rl = load_config([PRESET / "base.yaml", PRESET / "rl.yaml"], sets, "rl")
    cfg_sft = load_config([PRESET / "base.yaml", PRESET / "sft.yaml"], sets, "sft")
    cfg_eval = load_config([PRESET / "base.yaml", PRESET / "eval.yaml"], sets, "eval")
    cfg_rl["eval"] = cfg_eval["eval"]
    args.eval_batch = args.eval_batch or int(cfg_eval["eval"]["batch_size"])
    mcfg = ModelConfig.from_dict(cfg_rl["model"], vocab_size=vocab)
    header = {"bench": "scale_plan", "preset": str(PRESET.relative_to(REPO)), "vocab_size": vocab,
              "catalog": source, "num_sids": len(table), "params": sum(model_counts(mcfg)[k] for k in ("body", "embed")),
              "model": mcfg.to_dict(), "prompt_len": args.prompt_len, "jax": jax.__version__,
              "peak_flops_per_chip": PEAK_FLOPS, "hbm_bytes_per_s": HBM_BW, "load_avg": os.getloadavg()[0],
              "target": args.target, "device_kind": train_devs[0].device_kind}
    lines = [header]
    print(json.dumps(header), flush=True)
    for name, (devices, fn, fargs, work) in programs(cfg_rl, cfg_sft, mcfg, table, args, train_devs, eval_devs).items():
        if name not in args.programs.split(","):
            continue
        line = measure(name, devices, fn, fargs, work, mcfg, unrolled_cost=args.cost == "unrolled")
        lines.append(line)
        print(json.dumps(line), flush=True)
    ev = next((l for l in lines if l.get("program") == "eval_beam"), None)
    if ev:
        calls = math.ceil(OFFICE_TEST_ROWS / ev["rows"])
        proj = {"bench": "scale_plan", "projection": "office_test_eval_v6e-8", "rows": OFFICE_TEST_ROWS,
                "beams": ev["beams"], "batch": ev["rows"], "calls": calls,
                "projected_s": calls * ev["roofline_s"], "ideal_s": calls * ev["ideal_s"],
                "mllm_jax_measured_s": MLLM_JAX_OFFICE_S,
                "speedup_vs_mllm_jax": MLLM_JAX_OFFICE_S / (calls * ev["roofline_s"]),
                "goal_36s": calls * ev["roofline_s"] <= 36.0, "within_3x_of_ideal": ev["roofline_over_ideal"] <= 3.0}
        lines.append(proj)
        print(json.dumps(proj), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(l) + "\n" for l in lines)
    return lines


if __name__ == "__main__":
    main()
