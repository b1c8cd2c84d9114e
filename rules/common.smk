# Shared helpers for the rules: dataset lookup, trainer config layers, placement messages.
# Paths of artifacts are always taken from input/output (never spelled out again): with a default
# storage provider (profiles/tpu: GCS) they live under .snakemake/storage/..., not data/ or runs/.
import hashlib
import os
from pathlib import Path

from snakemake_executor_plugin_tpu.slices import placement
from trainer.data import TOKENIZER_FILES
from trainer.ops.workflow_config import check_workflow_config, crosscheck_args, prepare_data_args, stage_configs

check_workflow_config(config)  # every dataset's trainer configs load: bad keys fail before any job

wildcard_constraints:
    ds="|".join(config["datasets"]),
    model="rl|sft",


# With a default storage provider every input is an object there, but the trainer YAML layers are
# files of the checkout, and local() inputs would pin their jobs to this machine (no shared fs).
DEFAULT_STORAGE = workflow.storage_settings.default_storage_provider is not None


def stage_files(stage):
    """Input function: the trainer YAML layers of a stage (base.yaml + STAGE.yaml); none with a default
    storage provider, where stage_digest() alone reruns the stage when they change."""
    if DEFAULT_STORAGE:
        return lambda w: []
    return lambda w: stage_configs(config, w.ds, stage)


def stage_digest(stage):
    """Params function: digest of the stage's YAML layers (a changed param reruns the stage)."""
    def digest(w):
        h = hashlib.sha256()
        for f in stage_configs(config, w.ds, stage):
            h.update(Path(f).read_bytes())
        return h.hexdigest()[:16]
    return digest


def trainer_args(stage):
    """Params function: --config FILE ... --set KEY=VALUE ... of a stage's trainer command (an
    override change reruns that stage)."""
    def args(w):
        files = [a for f in stage_configs(config, w.ds, stage) for a in ("--config", f)]
        return files + durable_state(stage, w) + [a for o in config["overrides"].get(stage, []) for a in ("--set", o)]
    return args


def durable_state(stage, w):
    """Training keeps its resumable state under train_state.uri (GCS in the TPU profile, so a rerun on
    a new VM resumes); null: the run directory."""
    uri = (config.get("train_state") or {}).get("uri")
    if not uri or stage not in ("sft", "rl"):
        return []
    return ["--set", f"train.checkpoint.dir={uri.rstrip('/')}/{w.ds}/{stage}"]


def parent(path):
    """Directory of an input/output file (where it really is, default storage included)."""
    return os.path.dirname(str(path)) or "."


def where(rule_name, slice_id=None, per_model=False):
    """Rule message naming the job (`evaluate office/rl`) and where it runs (shown by `snakemake -n`)."""
    job = "{wildcards.ds}/{wildcards.model}" if per_model else "{wildcards.ds}"
    return f"{rule_name} {job}: " + placement(config.get("slices", {}), slice_id)
