"""Checks of the Snakemake config at workflow start (before any job runs).

Kept free of JAX imports: `snakemake -n` parses this on every invocation.
"""
from __future__ import annotations

from pathlib import Path

from trainer.config import ConfigError, load_config

STAGES = ("sft", "rl", "eval")


def stage_configs(config: dict, ds: str, stage: str) -> list[str]:
    """The trainer YAML layers of a stage: DIR/base.yaml then DIR/STAGE.yaml."""
    root = Path(config["datasets"][ds]["trainer"])
    return [str(root / "base.yaml"), str(root / f"{stage}.yaml")]


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
                load_config(files, overrides.get(stage, []))
            except ConfigError as e:
                raise ConfigError(f"config: datasets.{ds}.trainer={spec['trainer']} stage {stage} "
                                  f"({', '.join(files)}; overrides.{stage}): {e}") from None
