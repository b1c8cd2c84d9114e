"""Checks of the Snakemake config at workflow start (before any job runs).

Kept free of JAX imports: `snakemake -n` parses this on every invocation.
"""
from __future__ import annotations

from pathlib import Path

from trainer.config import ConfigError, load_config

STAGES = ("sft", "rl", "eval")
DOWNLOAD_REPO = "https://github.com/AkaliKong/MiniOneRec"  # = trainer.data.pinned.DEFAULT_REPO (no import: fast -n)
PINS = "config/minionerec_pins.yaml"
DOWNLOAD_CACHE = "workdir/minionerec"  # downloads, laid out like the repository: COMMIT/PATH


def stage_configs(config: dict, ds: str, stage: str) -> list[str]:
    """The trainer YAML layers of a stage: DIR/base.yaml then DIR/STAGE.yaml."""
    root = Path(config["datasets"][ds]["trainer"])
    return [str(root / "base.yaml"), str(root / f"{stage}.yaml")]


_YAML_TYPES = {"boolean": (bool,), "integer": (int,), "number": (int, float), "null": (type(None),)}


def coerce_cli_scalars(config, schema: dict):
    """Give strings from `snakemake --config` the type the schema asks for, in place.

    Snakemake reads nested --config values with YAML's BaseLoader, so every scalar inside a
    mapping arrives as a string: `--config handoff='{overwrite: true}'` gives 'true', which the
    schema would reject. A string is converted (by YAML's usual rules) only where the schema does
    not allow strings and the converted value has an allowed type; anything else is left for
    validation to report.
    """
    if isinstance(config, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in config.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                config[key] = coerce_cli_scalars(value, sub)
        return config
    if isinstance(config, list) and isinstance(schema.get("items"), dict):
        return [coerce_cli_scalars(v, schema["items"]) for v in config]
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if isinstance(config, str) and types and "string" not in types:
        import yaml

        try:
            value = yaml.safe_load(config)
        except yaml.YAMLError:
            return config
        if isinstance(value, str) and "number" in types:  # YAML 1.1 reads '1e-5' as a string
            try:
                value = float(value)
            except ValueError:
                return config
        allowed = tuple(t for name in types for t in _YAML_TYPES.get(name, ()))
        if isinstance(value, allowed) and not (isinstance(value, bool) and "boolean" not in types):
            return value
    return config


def prepare_data_args(config: dict, ds: str) -> list[str]:
    """`prepare-data` arguments for dataset `ds`: the synthetic generator's settings, or where
    MiniOneRec's files are and the pinned download that fills in missing ones."""
    spec = config["datasets"][ds]
    if spec["source"] == "synthetic":
        sets = [f"synthetic.{k}={v}" for k, v in spec.get("synthetic", {}).items()]
        return ["--synthetic", *(a for s in sets for a in ("--set", s))]
    args = ["--minionerec-root", config["data_root"], "--name", spec["name"],
            "--train-from", config.get("train_from", "train")]
    return args + _download_args(config)


def _download_args(config: dict) -> list[str]:
    """The pinned download (files missing locally are fetched at this commit, git blob ids checked)."""
    dl = config.get("minionerec_download") or {}
    if not dl.get("commit"):
        return []
    return ["--download-commit", dl["commit"], "--download-repo", dl.get("repo", DOWNLOAD_REPO),
            "--pins", dl.get("pins", PINS), "--cache-dir", DOWNLOAD_CACHE]


def crosscheck_args(config: dict) -> list[str]:
    """`crosscheck` arguments: the crosscheck.* settings, and where upstream's calc.py comes from
    (a verified local copy under upstream_root, else the pinned download)."""
    settings = [a for k, v in (config.get("crosscheck") or {}).items() if v is not None
                for a in ("--set", f"crosscheck.{k}={v}")]
    upstream = _download_args(config)
    if upstream and config.get("upstream_root"):
        upstream += ["--upstream-root", config["upstream_root"]]
    return settings + upstream


def check_workflow_config(config: dict) -> None:
    """Every dataset's trainer config must load for every stage, overrides included."""
    overrides = config.get("overrides", {})
    for ds, spec in config["datasets"].items():
        if spec["source"] == "minionerec" and not spec.get("name"):
            raise ConfigError(f"config: datasets.{ds}.name is required for source minionerec "
                              "(e.g. Office_Products)")
        for stage in STAGES:
            files = stage_configs(config, ds, stage)
            try:
                load_config(files, overrides.get(stage, []), stage)
            except ConfigError as e:
                raise ConfigError(f"config: datasets.{ds}.trainer={spec['trainer']} stage {stage} "
                                  f"({', '.join(files)}; overrides.{stage}): {e}") from None
