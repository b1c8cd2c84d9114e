"""Rule sft_import: take the user's Hugging Face checkpoint (config sft_import.DS) as the SFT best."""
from trainer.cli import run_rule

run_rule(snakemake, "import-hf", snakemake.params.hf_dir, out=snakemake.params.out, data=snakemake.params.data)
