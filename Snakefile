# sidrl: GRPO-style RL of a semantic-ID recommender, from SFT best to metrics.json.
#   snakemake results/demo/metrics.json        (offline default: synthetic data, tiny model)
#   snakemake -n results/office/metrics.json   (plan; shows where each job runs)
# Stages: prepare_data -> sft (or sft_import of an HF checkpoint) -> rl_train -> gcs_copy -> eval_copy
#         -> evaluate {rl, sft} -> crosscheck {rl, sft} -> metrics.   See README.md and docs/internals.md.
# Each rule names its files and calls one thin script in workflow/scripts/; the logic is in trainer/.
import os

import yaml
from snakemake.utils import min_version, validate

from trainer.ops.workflow_config import coerce_cli_scalars

min_version("9.0")

configfile: "config/config.yaml"


# --config nests arrive as strings ('{overwrite: true}' -> 'true'): typed by the schema first.
coerce_cli_scalars(config, yaml.safe_load(open(os.path.join(workflow.basedir, "config/schema.yaml"))))
validate(config, "config/schema.yaml")

include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/sft.smk"
include: "rules/rl.smk"
include: "rules/handoff.smk"
include: "rules/eval.smk"
include: "rules/report.smk"

# Small bookkeeping steps run where Snakemake runs, never on a slice.
localrules: prepare_data, crosscheck, metrics


rule all:
    input:
        expand("results/{ds}/metrics.json", ds=["demo"]),
    default_target: True


# The GCS emulator is reference-counted by the commands that use it (trainer/ops/gcs_emulator.py);
# a job killed while holding it (Ctrl-C, SIGKILL) leaves a stale lease, released here.
def release_emulator():
    root = config["handoff"].get("emulator_root")
    if root:
        from trainer.ops.gcs_emulator import release_orphans

        release_orphans(root)


onsuccess:
    release_emulator()


onerror:
    release_emulator()
