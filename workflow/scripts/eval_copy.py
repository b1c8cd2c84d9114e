"""Rule eval_copy: download the local eval copy pinned to the receipt's generations."""
from trainer.cli import run_rule

run_rule(snakemake, "handoff-download", receipt=snakemake.input.receipt, name=snakemake.params.names,
         dest=snakemake.params.dest, emulator_root=snakemake.params.emulator_root)
