"""Rule gcs_copy: no-clobber upload of rl_last to GCS, checksums verified, receipt written."""
from trainer.cli import run_rule

run_rule(snakemake, "handoff-upload", files=list(snakemake.input), uri=snakemake.params.uri,
         receipt=snakemake.output.receipt, emulator_root=snakemake.params.emulator_root,
         overwrite=snakemake.params.overwrite, workers=snakemake.params.workers)
