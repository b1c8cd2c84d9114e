"""Rule sft: train the SFT best on the train slice."""
from trainer.cli import run_rule

run_rule(snakemake, "sft", data=snakemake.params.data, set=f"output_dir={snakemake.params.out}")
