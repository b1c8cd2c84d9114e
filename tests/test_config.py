"""trainer.config: typed --set overrides, unknown keys with suggestions, YAML files."""
from __future__ import annotations

import copy

import pytest

from trainer.config import DEFAULTS, SCHEMA, ConfigError, load_config, parse_value
from trainer.errors import UserError


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-1", -1), ("0.5", 0.5), ("1e-6", 1e-6), ("5E+3", 5000.0), ("-2e3", -2000.0),
    ("true", True), ("false", False), ("null", None), ("~", None),
    ("[1, 2]", [1, 2]), ("[a, 1e-3]", ["a", 1e-3]), ("{a: 1}", {"a": 1}),
    ("hello", "hello"), ("runs/demo x", "runs/demo x"), ("gs://bucket/p", "gs://bucket/p"),
    ("'123'", "123"), ('"1e-6"', "1e-6"), ("", None),
])
def test_parse_value_types_like_yaml(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["steps=3", "rollout.n=16", "train.optimizer.lr_schedule.peak_value=1e-6",
                             "model.tie_word_embeddings=false", "init.checkpoint=runs/sft/sft_best.msgpack",
                             "eval.max_samples=null", "rl.kl_coef=0", "data.dir=a=b"])
    assert cfg["steps"] == 3 and cfg["rollout"]["n"] == 16
    assert cfg["train"]["optimizer"]["lr_schedule"]["peak_value"] == 1e-6
    assert isinstance(cfg["train"]["optimizer"]["lr_schedule"]["peak_value"], float)
    assert cfg["model"]["tie_word_embeddings"] is False
    assert cfg["init"]["checkpoint"] == "runs/sft/sft_best.msgpack"
    assert cfg["eval"]["max_samples"] is None and cfg["rl"]["kl_coef"] == 0
    assert cfg["data"]["dir"] == "a=b"  # only the first '=' separates key and value
    assert cfg["rollout"]["batch_size"] == DEFAULTS["rollout"]["batch_size"]  # siblings untouched


def test_load_config_does_not_mutate_defaults():
    before = copy.deepcopy(DEFAULTS)
    load_config(None, ["model.hidden_size=999", "rollout.n=2"])
    assert DEFAULTS == before


@pytest.mark.parametrize("assignment, suggestion", [
    ("rollout.nn=3", "rollout.n"),
    ("modle.hidden_size=8", "model.hidden_size"),
    ("train.optimizer.lr_schedul.type=constant", "train.optimizer.lr_schedule.type"),
])
def test_unknown_override_key_suggests_the_nearest(assignment, suggestion):
    with pytest.raises(ConfigError, match=rf"--set: unknown config key '{assignment.split('=')[0]}'; "
                                          rf"did you mean '{suggestion}'\?"):
        load_config(None, [assignment])


def test_override_errors():
    with pytest.raises(ConfigError, match="is a section; set one of its keys"):
        load_config(None, ["model=3"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["steps"])
    with pytest.raises(ConfigError, match="unknown config key 'steps.x'"):
        load_config(None, ["steps.x=1"])  # a leaf has no sub-keys
    with pytest.raises(ConfigError, match="unknown config key 'zzzzqqq'") as e:
        load_config(None, ["zzzzqqq=1"])
    assert "did you mean" not in str(e.value)  # no suggestion when nothing is close
    assert issubclass(ConfigError, UserError)  # the CLI prints it and exits 2


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("steps: 7\nmodel:\n  hidden_size: 32\n  rms_norm_eps: 1e-5\nrollout:\n  n: 4\n")
    cfg = load_config(path, ["rollout.n=2"])
    assert cfg["steps"] == 7 and cfg["model"]["hidden_size"] == 32 and cfg["rollout"]["n"] == 2
    assert cfg["model"]["rms_norm_eps"] == 1e-5 and isinstance(cfg["model"]["rms_norm_eps"], float)
    assert cfg["model"]["num_heads"] == DEFAULTS["model"]["num_heads"]  # deep merge keeps siblings
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == DEFAULTS


def test_yaml_unknown_key_names_file_and_suggests(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  hiden_size: 32\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown config key 'model.hiden_size'; "
                                          r"did you mean 'model.hidden_size'\?"):
        load_config(path)


def test_yaml_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: top level must be a mapping"):
        load_config(bad)
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'model' must be a mapping, got 3"):
        load_config(bad)


def test_values_must_have_the_defaults_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'steps' must be an integer >= 1, got 'abc'"):
        load_config(None, ["steps=abc"])
    with pytest.raises(ConfigError, match=r"'rl.kl_coef' must be a number >= 0, got True"):
        load_config(None, ["rl.kl_coef=true"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {steps: 1.5}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'sft.steps' must be an integer"):
        load_config(bad)
    cfg = load_config(None, ["train.optimizer.lr_schedule.peak_value=1", "train.optimizer.clip_norm=null",
                             "wandb.enabled=false"])
    assert cfg["train"]["optimizer"]["lr_schedule"]["peak_value"] == 1.0
    assert cfg["train"]["optimizer"]["clip_norm"] is None and cfg["wandb"]["enabled"] is False


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


def test_every_key_has_a_type_and_the_defaults_pass_it():
    leaves = dict(_leaves(DEFAULTS))
    assert sorted(leaves) == sorted(SCHEMA)
    for key, default in leaves.items():
        assert SCHEMA[key].check(key, default, "DEFAULTS") == default
        if default is None:
            assert SCHEMA[key].nullable, key


@pytest.mark.parametrize("assignment, message", [
    ("eval.max_samples=abc", "'eval.max_samples' must be an integer >= 1 or null, got 'abc'"),
    ("eval.max_samples=-392", "'eval.max_samples' must be an integer >= 1 or null, got -392"),
    ("eval.max_samples=0", "'eval.max_samples' must be an integer >= 1 or null, got 0"),
    ("model.head_dim=abc", "'model.head_dim' must be an integer >= 1 or null, got 'abc'"),
    ("model.vocab_size=1.5", "'model.vocab_size' must be an integer >= 1 or null, got 1.5"),
    ("train.optimizer.lr_schedule.warmup_steps=-1", "'train.optimizer.lr_schedule.warmup_steps' must be an integer >= 0"),
    ("tokenizer.path=3", "'tokenizer.path' must be a string or null, got 3"),
    ("init.checkpoint=[a]", "'init.checkpoint' must be a string or null, got ['a']"),
    ("crosscheck.tolerance=-1e-3", "'crosscheck.tolerance' must be a number >= 0, got -0.001"),
    ("crosscheck.calc_script=true", "'crosscheck.calc_script' must be a string or null, got True"),
    ("rollout.temperature=0", "'rollout.temperature' must be a number > 0, got 0"),
    ("train.optimizer.lr_schedule.warmup_ratio=1.5", "warmup_ratio' must be a number in [0, 1], got 1.5"),
    ("model.dtype=float33", "'model.dtype' must be one of 'float32', 'bfloat16', 'float16' or null, got 'float33'"),
    ("eval.split=tset", "'eval.split' must be one of 'train', 'valid', 'test', got 'tset'"),
    ("wandb.enabled=maybe", "'wandb.enabled' must be true/false or 'auto', got 'maybe'"),
    ("steps=null", "'steps' must be an integer >= 1, got None"),
    ("sft.batch_size=true", "'sft.batch_size' must be an integer >= 1, got True"),
])
def test_bad_values_name_the_key_and_the_expected_type(assignment, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [assignment])
    assert message in str(e.value)


def test_null_default_keys_take_their_declared_type():
    cfg = load_config(None, ["eval.max_samples=5", "model.head_dim=16", "model.vocab_size=300",
                             "train.optimizer.lr_schedule.warmup_steps=0", "crosscheck.python=python3",
                             "wandb.enabled=auto", "checkpoint_every_steps=0"])
    assert cfg["eval"]["max_samples"] == 5 and cfg["model"]["head_dim"] == 16
    assert cfg["train"]["optimizer"]["lr_schedule"]["warmup_steps"] == 0
