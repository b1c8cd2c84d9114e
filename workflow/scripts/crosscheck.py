"""Rule crosscheck: recompute the metrics with MiniOneRec's calc.py (upstream's, pinned) and compare."""
from trainer.cli import run_rule

run_rule(snakemake, "crosscheck", *snakemake.params.args, predictions=snakemake.input.predictions,
         summary=snakemake.input.summary, info=snakemake.input.info, data=snakemake.params.data,
         out=snakemake.output[0], failed_report=snakemake.params.failed_report)
