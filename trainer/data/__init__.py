"""Data: MiniOneRec readers and validation, prompts, the SID tokenizer, the synthetic generator, batching."""

# The files a tokenizer directory holds, as every stage copies and hands them on. Defined here,
# free of heavy imports, because the workflow's rules read it on every `snakemake` start.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
