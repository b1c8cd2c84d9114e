"""Data: MiniOneRec readers and validation, prompts, the SID tokenizer, the synthetic generator, batching."""
