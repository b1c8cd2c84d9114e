# The SFT best: trained here (rule sft), or the user's Hugging Face checkpoint (config
# sft_import: {DS: DIR}, rule sft_import). Each dataset is produced by exactly one of the two.
SFT_FILES = ["sft_best.msgpack", "run_summary.json", *TOKENIZER_FILES]
IMPORTED = "|".join(config.get("sft_import") or {}) or "(?!)"  # (?!) matches nothing
TRAINED = "|".join(d for d in config["datasets"] if d not in (config.get("sft_import") or {})) or "(?!)"


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


rule sft_import:
    message:
        where("sft_import")
    output:
        expand("runs/{{ds}}/sft/{name}", name=SFT_FILES),
    params:
        hf_dir=lambda w: config["sft_import"][w.ds],
        out=lambda w, output: parent(output[0]),
    wildcard_constraints:
        ds=IMPORTED,
    log:
        "logs/sft_import/{ds}.log",
    benchmark:
        "benchmarks/sft_import/{ds}.tsv"
    script:
        "../workflow/scripts/sft_import.py"
