"""Rule rl_train: GRPO-style RL from the SFT best on the train slice."""
from trainer.cli import run_rule

run_rule(snakemake, "rl", "--set", f"output_dir={snakemake.params.out}",
         "--set", f"init.checkpoint={snakemake.input.sft_best}", "--set", f"tokenizer.path={snakemake.params.sft}",
         data=snakemake.params.data)
