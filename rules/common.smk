# Shared helpers for the rules: dataset lookup, trainer config layers, overrides.
import sys

from snakemake_executor_plugin_tpu.slices import placement
from trainer.workflow_config import check_workflow_config, stage_configs

PY = sys.executable  # the interpreter running Snakemake runs every trainer command

check_workflow_config(config)  # every dataset's trainer configs load: bad keys fail before any job

wildcard_constraints:
    ds="|".join(config["datasets"]),


def stage_files(stage):
    """Input function: the trainer YAML layers of a stage (base.yaml + STAGE.yaml)."""
    return lambda w: stage_configs(config, w.ds, stage)


def config_args(stage):
    """--config FILE ... --set KEY=VALUE ... for a stage's trainer command (a rule param, so an
    override change reruns that stage)."""
    def args(w):
        files = " ".join(f"--config {f}" for f in stage_configs(config, w.ds, stage))
        sets = " ".join(f"--set '{o}'" for o in config["overrides"].get(stage, []))
        return f"{files} {sets}".strip()
    return args


def where(rule_name, slice_id=None):
    """Rule message naming where the job runs (shown by `snakemake -n`)."""
    return f"{rule_name} {{wildcards.ds}}: " + placement(config.get("slices", {}), slice_id)
