# The SFT best: trained here (rule sft), or the user's Hugging Face checkpoint (config
# sft_import: {DS: DIR}, rule sft_import). Each dataset is produced by exactly one of the two.
SFT_FILES = ["sft_best.msgpack", "run_summary.json", *TOKENIZER_FILES]
IMPORTED = "|".join(config.get("sft_import") or {}) or "(?!)"  # (?!) matches nothing
TRAINED = "|".join(d for d in config["datasets"] if d not in (config.get("sft_import") or {})) or "(?!)"


def import_args(w):
    """The dataset's base.yaml and overrides.sft: sft.yaml describes training from scratch, which
    an import does not do (its model.* would contradict the checkpoint)."""
    return ["--config", stage_configs(config, w.ds, "sft")[0]] + [
        a for o in config["overrides"].get("sft", []) for a in ("--set", o)]


rule sft:
    message:
        where("sft", "train")
    input:
        data=rules.prepare_data.output,
        configs=stage_files("sft"),
    output:
        expand("runs/{{ds}}/sft/{name}", name=SFT_FILES),
    params:
        trainer_args=trainer_args("sft"),
        layers=stage_digest("sft"),
        data=lambda w, input: parent(input.data[0]),
        out=lambda w, output: parent(output[0]),
    wildcard_constraints:
        ds=TRAINED,
    resources:
        tpu="train",
    retries: 2  # a killed or preempted run resumes from its durable train state
    log:
        "logs/sft/{ds}.log",
    benchmark:
        "benchmarks/sft/{ds}.tsv"
    script:
        "../workflow/scripts/sft.py"


# Runs where the checkpoint directory is (this machine), on one process; the catalog's SID tokens
# and any model.* of the dataset's base.yaml are checked against the checkpoint before RL starts.
rule sft_import:
    message:
        where("sft_import")
    input:
        data=rules.prepare_data.output,
        configs=lambda w: [] if DEFAULT_STORAGE else stage_configs(config, w.ds, "sft")[:1],
    output:
        expand("runs/{{ds}}/sft/{name}", name=SFT_FILES),
    params:
        trainer_args=import_args,
        layers=stage_digest("sft"),
        hf_dir=lambda w: config["sft_import"][w.ds],
        data=lambda w, input: parent(input.data[0]),
        out=lambda w, output: parent(output[0]),
    wildcard_constraints:
        ds=IMPORTED,
    log:
        "logs/sft_import/{ds}.log",
    benchmark:
        "benchmarks/sft_import/{ds}.tsv"
    script:
        "../workflow/scripts/sft_import.py"
