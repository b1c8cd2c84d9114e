"""Rule prepare_data: write data/{ds}/ (synthetic, or MiniOneRec's files normalised)."""
from trainer.cli import run_rule

run_rule(snakemake, "prepare-data", *snakemake.params.source_args, out=snakemake.params.out)
