"""`recipe: minionerec`: the presets' resolved hyperparameters equal upstream's, read from
../shared/minionerec-upstream (rl.sh, rl.py, sft.sh, sft.py; HF TrainingArguments for what
those leave at the library default), and each preset trains on a 4-process slice."""
from __future__ import annotations

import ast
import math
import os
import re
from pathlib import Path

import pytest

from tests.rl_helpers import BASE_CONFIG, launch, metrics_rows, rl_base, summary, wait_all  # noqa: F401
from trainer.config import ConfigError, load_config

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "minionerec-upstream"
if not UPSTREAM.is_dir():
    UPSTREAM = Path("/work/shared/minionerec-upstream")
needs_upstream = pytest.mark.skipif(not (UPSTREAM / "rl.sh").is_file(), reason="upstream MiniOneRec files absent")


def _shell_args(path: Path) -> dict[str, str]:
    """`--key value` pairs of a launcher script."""
    return dict(re.findall(r"--(\w+)\s+([^\s\\]+)", path.read_text()))


def _py(path: Path):
    return ast.parse(path.read_text())


def _call_kwargs(tree, name: str) -> dict:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
            return {k.arg: k.value for k in node.keywords}
    raise AssertionError(f"no call to {name}")


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _train_defaults(tree) -> dict:
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    args = fn.args.args[-len(fn.args.defaults):]
    return {a.arg: _literal(d) for a, d in zip(args, fn.args.defaults)}


def _assigned(tree, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return _literal(node.value)
    raise AssertionError(f"no assignment to {name}")


def _shell_value(text: str):
    return {"True": True, "False": False}.get(text, _literal(ast.parse(text, mode="eval").body)
                                            if re.fullmatch(r"[-+.\deE]+", text) else text)


def _hf_default(field: str):
    import transformers

    return transformers.TrainingArguments.__dataclass_fields__[field].default


def upstream_rl() -> dict:
    sh = {k: _shell_value(v) for k, v in _shell_args(UPSTREAM / "rl.sh").items()}
    tree = _py(UPSTREAM / "rl.py")
    cfg = {k: _literal(v) for k, v in _call_kwargs(tree, "GRPOConfig").items()}
    per_step = sh["train_batch_size"] * sh["num_processes"] * sh["gradient_accumulation_steps"] // sh["num_generations"]
    scheduler = {"cosine": "warmup_cosine", "linear": "warmup_linear"}[cfg["lr_scheduler_type"]]
    return {
        "optimizer": "adamw" if "adamw" in cfg["optim"] else cfg["optim"],
        "learning_rate": sh["learning_rate"], "lr_schedule": scheduler, "warmup_ratio": cfg["warmup_ratio"],
        "clip_norm": cfg["max_grad_norm"], "weight_decay": _hf_default("weight_decay"),
        "kl_coef": sh["beta"], "num_generations": sh["num_generations"], "beam_rollouts": sh["beam_search"],
        "prompts_per_step": per_step, "reward": sh["reward_type"], "epochs": sh["num_train_epochs"],
        "sync_ref_model": sh["sync_ref_model"], "seed": _train_defaults(tree)["seed"],
        "tasks": _train_datasets(UPSTREAM / "rl.py"),
    }


def upstream_sft() -> dict:
    sh = {k: _shell_value(v) for k, v in _shell_args(UPSTREAM / "sft.sh").items()}
    tree = _py(UPSTREAM / "sft.py")
    defaults = _train_defaults(tree)
    args = {k: _literal(v) for k, v in _call_kwargs(tree, "TrainingArguments").items()}
    return {
        "optimizer": "adamw" if "adamw" in args["optim"] else args["optim"],
        "learning_rate": sh.get("learning_rate", defaults["learning_rate"]),
        "lr_schedule": {"linear": "warmup_linear", "cosine": "warmup_cosine"}[str(_hf_default("lr_scheduler_type"))
                                                                               .split(".")[-1].lower()],
        "warmup_steps": args["warmup_steps"], "clip_norm": _hf_default("max_grad_norm"),
        "weight_decay": _hf_default("weight_decay"), "batch_size": sh["batch_size"],
        "epochs": sh.get("num_epochs", defaults["num_epochs"]), "eval_every": _assigned(tree, "eval_step"),
        "early_stopping_patience": _literal(_call_kwargs(tree, "EarlyStoppingCallback")["early_stopping_patience"]),
        "seed": sh["seed"], "max_len": defaults["cutoff_len"],
    }


def resolved(stage: str, tmp_path: Path) -> dict:
    """What a user's stage YAML holding only `recipe: minionerec` resolves to."""
    yaml_file = tmp_path / f"{stage}.yaml"
    yaml_file.write_text("recipe: minionerec\n")
    return load_config([yaml_file], stage=stage)


def ours_rl(c: dict) -> dict:
    opt = c["train"]["optimizer"]
    return {
        "optimizer": opt["name"], "learning_rate": opt["lr_schedule"]["peak_value"],
        "lr_schedule": opt["lr_schedule"]["type"], "warmup_ratio": opt["lr_schedule"]["warmup_ratio"],
        "clip_norm": opt["clip_norm"], "weight_decay": opt["weight_decay"], "kl_coef": c["rl"]["kl_coef"],
        "num_generations": c["rollout"]["n"], "beam_rollouts": c["rollout"]["mode"] == "beam",
        "prompts_per_step": c["rollout"]["batch_size"], "reward": c["rl"]["reward"], "epochs": c["epochs"],
        "sync_ref_model": c["rl"]["sync_ref_model"], "seed": c["seed"],
        "tasks": [{"rl_next_item": "SidDataset", "rl_title2sid": "RLTitle2SidDataset",
                   "rl_seq_title2sid": "RLSeqTitle2SidDataset"}[t] for t in c["rl"]["tasks"]],
    }


def ours_sft(c: dict) -> dict:
    opt, s = c["train"]["optimizer"], c["sft"]
    return {
        "optimizer": opt["name"], "learning_rate": opt["lr_schedule"]["peak_value"],
        "lr_schedule": opt["lr_schedule"]["type"], "warmup_steps": opt["lr_schedule"]["warmup_steps"],
        "clip_norm": opt["clip_norm"], "weight_decay": opt["weight_decay"], "batch_size": s["batch_size"],
        "epochs": s["epochs"], "eval_every": s["eval_every"], "early_stopping_patience": s["early_stopping_patience"],
        "seed": c["seed"], "max_len": c["data"]["max_prompt_len"],
    }


def _compare(title: str, ours: dict, theirs: dict) -> None:
    print(f"\n{title}\n{'key':<26}{'sidrl (resolved)':<34}upstream")
    for k in theirs:
        print(f"{k:<26}{ours.get(k)!s:<34}{theirs[k]}{'' if ours.get(k) == theirs[k] else '   <-- DRIFT'}")
    drift = {k: (ours.get(k), v) for k, v in theirs.items() if ours.get(k) != v}
    assert not drift, f"{title}: preset drifted from upstream: {drift}"


@needs_upstream
def test_rl_preset_matches_upstream(tmp_path):
    _compare("RL: recipe minionerec vs rl.sh/rl.py", ours_rl(resolved("rl", tmp_path)), upstream_rl())


def _train_datasets(path: Path) -> list[str]:
    """The dataset classes a script appends to train_datasets, in order (commented-out lines excluded)."""
    text = path.read_text()
    names = dict(re.findall(r"^\s*(train_data\d+) = (\w+)\(", text, re.M))
    return [names[v] for v in re.findall(r"^\s*train_datasets\.append\((train_data\d+)\)", text, re.M)]


@needs_upstream
def test_sft_preset_matches_upstream(tmp_path):
    c = resolved("sft", tmp_path)
    _compare("SFT: recipe minionerec vs sft.sh/sft.py", ours_sft(c), upstream_sft())
    theirs = _train_datasets(UPSTREAM / "sft.py")
    ours = {"next_item": "SidSFTDataset", "title2sid": "SidItemFeatDataset", "sid2title": "SidItemFeatDataset",
            "sid_history2title": "FusionSeqRecDataset", "title_history2title": "SFTData",
            "title_history2sid": "TitleHistory2SidSFTDataset"}
    assert list(dict.fromkeys(ours[t] for t in c["sft"]["tasks"])) == theirs


PRESET_1P5B = Path(__file__).resolve().parents[1] / "config/trainer/qwen2.5-1.5b"


@needs_upstream
def test_1p5b_preset_runs_upstreams_recipe_unchanged():
    """What the real-path operator runs on the v6e-16: the recipe with upstream's update batches
    (sft.sh's 1,024 sequences, rl.sh's 64 prompts per optimizer step), not a memory-driven variant."""
    rl = load_config([PRESET_1P5B / "base.yaml", PRESET_1P5B / "rl.yaml"], stage="rl")
    _compare("RL: config/trainer/qwen2.5-1.5b vs rl.sh/rl.py", ours_rl(rl), upstream_rl())
    sft = load_config([PRESET_1P5B / "base.yaml", PRESET_1P5B / "sft.yaml"], stage="sft")
    _compare("SFT: config/trainer/qwen2.5-1.5b vs sft.sh/sft.py", ours_sft(sft), upstream_sft())


def test_files_override_the_recipe_and_unknown_names_fail(tmp_path):
    f = tmp_path / "rl.yaml"
    f.write_text("recipe: minionerec\nrl: {kl_coef: 0.5}\n")
    c = load_config([f], ["rollout.n=4"], stage="rl")
    assert c["rl"]["kl_coef"] == 0.5 and c["rollout"]["n"] == 4 and c["train"]["optimizer"]["clip_norm"] == 0.3
    assert load_config([f], stage="eval")["train"]["optimizer"]["name"] == "lion"  # no eval preset: defaults
    with pytest.raises(ConfigError, match="recipe: unknown 'minirec'.*minionerec"):
        load_config(None, ["recipe=minirec"], stage="rl")


def test_hf_step_counts(tmp_path):
    from trainer.rl.loop import total_steps
    from trainer.train.sft import resolve_schedule

    c = resolved("rl", tmp_path)
    assert total_steps(c, 1000) == 2 * (1000 // 64)
    s = resolved("sft", tmp_path)["sft"]
    steps, every = resolve_schedule(s, 50_000)
    assert steps == 10 * (50_000 // 1024) and every == math.ceil(steps * 0.05)


# ------------------------------------------------------------------ the presets on a 4-process slice

pytestmark_multi = pytest.mark.skipif(os.environ.get("SKIP_MULTIPROCESS") == "1", reason="SKIP_MULTIPROCESS=1")
TIMEOUT_S = 600


def _stage_yaml(tmp_path: Path, name: str) -> Path:
    f = tmp_path / name
    f.write_text("recipe: minionerec\n")
    return f


def _run4(tmp_path: Path, argv: list[str]) -> None:
    followers = [tmp_path / f"p{i}" for i in range(1, 4)]
    for d in followers:
        d.mkdir()
    wait_all(launch(argv, tmp_path, followers, tmp_path / "logs"), TIMEOUT_S, tmp_path / "logs")
    for d in followers:
        assert os.listdir(d) == []


@pytestmark_multi
def test_sft_preset_smoke_on_four_processes(tmp_path, rl_base):  # noqa: F811
    out = tmp_path / "sft"
    # a tenth of an epoch: 6 steps of 64 over all six tasks, validated every step (5%, rounded up)
    sets = ["sft.epochs=0.1", "sft.batch_size=64", "sft.eval_samples=32", "data.category=items", f"output_dir={out}"]
    argv = ["sft", "--config", str(BASE_CONFIG), "--config", str(_stage_yaml(tmp_path, "sft.yaml")),
            "--data", str(rl_base["data"])] + [a for s in sets for a in ("--set", s)]
    _run4(tmp_path, argv)
    s = summary(out)
    assert s["process_count"] == 4 and s["config"]["recipe"] == "minionerec"
    sched = s["optimizer"]["lr_schedule"]
    assert sched["type"] == "warmup_linear" and sched["warmup_steps"] == min(20, s["steps"])  # clamped to the run
    assert s["steps"] == round(0.1 * (s["train_sequences"] // 64))
    assert s["train_sequences"] > 4 * len(rl_base_rows(rl_base))


def rl_base_rows(base) -> list:
    from trainer.data import readers as dt

    return dt.read_split(base["data"], "train", dt.load_catalog(base["data"]))


@pytestmark_multi
def test_rl_preset_smoke_on_four_processes(tmp_path, rl_base):  # noqa: F811
    out = tmp_path / "rl"
    sets = ["epochs=null", "steps=3", "rollout.batch_size=4", "rl.ref_model_sync_steps=2", "eval_every_steps=0",
            "checkpoint_every_steps=0", f"output_dir={out}", f"init.checkpoint={rl_base['checkpoint']}",
            f"tokenizer.path={rl_base['sft']}"]
    argv = ["rl", "--config", str(BASE_CONFIG), "--config", str(_stage_yaml(tmp_path, "rl.yaml")),
            "--data", str(rl_base["data"])] + [a for s in sets for a in ("--set", s)]
    _run4(tmp_path, argv)
    s = summary(out)
    assert s["process_count"] == 4 and s["steps"] == 3 and s["config"]["recipe"] == "minionerec"
    assert s["optimizer"]["name"] == "adamw" and s["optimizer"]["clip_norm"] == 0.3
    assert s["train_prompts"] > len(rl_base_rows(rl_base))  # next-item plus the title tasks
    assert [r["step"] for r in metrics_rows(out)] == [1, 2, 3]


# ------------------------------------------------------------------ reference sync and rewards


def test_ref_sync_is_trls_mixup_every_n_steps():
    import jax.numpy as jnp

    from trainer.rl.loop import make_ref_sync

    cfg = load_config(None, ["rl.sync_ref_model=true", "rl.ref_model_sync_steps=2", "rl.ref_model_mixup_alpha=0.6"])
    sync = make_ref_sync(cfg, None)
    ref, pol = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
    assert sync(1, ref, pol) is ref  # global_step 1: 1 % 2 != 0
    mixed = sync(2, ref, pol)["w"]  # TRL: ref.mul_(1 - alpha).add_(policy, alpha=alpha)
    assert jnp.allclose(mixed, 0.4 * ref["w"] + 0.6 * pol["w"])
    assert make_ref_sync(load_config(None), None) is None
    with pytest.raises(ConfigError, match="ref_model_mixup_alpha"):
        make_ref_sync(load_config(None, ["rl.sync_ref_model=true", "rl.ref_model_mixup_alpha=1.5"]), None)


def test_ranking_only_is_upstreams_ndcg_rule_reward():
    import jax.numpy as jnp
    import numpy as np

    from trainer.rl import reward

    sid_index = jnp.array([[3, 8, 5, 1], [0, 2, 4, 6]])
    r = np.asarray(reward.get("ranking_only")(sid_index, jnp.array([8, 9])))
    w = np.array([-1.0 / math.log2(i + 2) for i in range(4)])
    w = -w / w.sum()  # upstream: ndcg_rewards = [-elm / sum(ndcg_rewards)], i.e. negative weights
    np.testing.assert_allclose(r[0], [w[0], 0.0, w[2], w[3]], rtol=1e-6)
    assert (r[1] == 0).all()  # no target in the group: all zero


def test_semantic_reward_reads_minionerec_npy(tmp_path):
    import jax.numpy as jnp
    import numpy as np

    from trainer.errors import DataError
    from trainer.data.readers import Catalog
    from trainer.rl import reward

    # items 0,1,2 in info.txt order; items 1 and 2 share a SID: upstream's item2id keeps the last line
    cat = Catalog(sids=["<a_0><b_0><c_0>", "<a_1><b_0><c_0>"],
                  sid_to_items={"<a_0><b_0><c_0>": ["0"], "<a_1><b_0><c_0>": ["1", "2"]},
                  item_to_sid={"0": "<a_0><b_0><c_0>", "1": "<a_1><b_0><c_0>", "2": "<a_1><b_0><c_0>"},
                  titles={"0": "a", "1": "b", "2": "c"})
    emb = np.array([[1.0, 0.0], [5.0, 5.0], [0.0, 2.0]], np.float32)
    np.save(tmp_path / "emb.npy", emb)
    table = reward.load_sid_embeddings(tmp_path / "emb.npy", cat)
    np.testing.assert_allclose(table, [[1.0, 0.0], [0.0, 1.0]])
    fn = reward.get("semantic", table)
    r = np.asarray(fn(jnp.array([[0, 1]]), jnp.array([1])))
    np.testing.assert_allclose(r, [[0.0, 1.0]], atol=1e-6)  # cos(item0, item2) = 0, cos(item2, item2) = 1
    with pytest.raises(ConfigError, match="rl.item_embeddings"):
        reward.get("semantic")
    np.save(tmp_path / "short.npy", emb[:2])
    with pytest.raises(DataError, match="at least the 3 items"):
        reward.load_sid_embeddings(tmp_path / "short.npy", cat)
