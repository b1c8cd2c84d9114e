"""Rule evaluate: constrained beam-search eval of the RL or SFT checkpoint on the eval slice."""
from trainer.cli import run_rule

run_rule(snakemake, "eval", data=snakemake.params.data, checkpoint=snakemake.input.ckpt,
         tokenizer=snakemake.params.tokenizer, out=snakemake.params.out, receipt=snakemake.input.get("receipt"))
