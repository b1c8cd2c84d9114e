"""Rule metrics: results/{ds}/metrics.json and the report's plots."""
from trainer.cli import run_rule

i = snakemake.input
run_rule(snakemake, "metrics", dataset=snakemake.wildcards.ds, rl_eval=i.rl_eval, sft_eval=i.sft_eval,
         rl_predictions=i.rl_predictions, sft_predictions=i.sft_predictions, data=snakemake.params.data,
         crosscheck=i.crosscheck, sft_crosscheck=i.sft_crosscheck, receipt=i.receipt, rl_run=i.rl_run,
         sft_run=i.sft_run, rl_curves=i.rl_curves, out=snakemake.output.metrics,
         plots=snakemake.params.plots)
