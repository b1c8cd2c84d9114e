SFT_FILES = ["sft_best.msgpack", "run_summary.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def sft_command(w, input, output):
    """Train an SFT best, or import the user's Hugging Face checkpoint (config sft_import.DS)."""
    hf = config.get("sft_import", {}).get(w.ds)
    out = parent(output[0])
    if hf:
        return f"{PY} -m trainer import-hf {hf} --out {out}"
    return f"{PY} -m trainer sft {config_args('sft')(w)} --data {parent(input.data[0])} --set output_dir={out}"


rule sft:
    message:
        where("sft", "train")
    input:
        data=rules.prepare_data.output,
        configs=stage_files("sft"),
    output:
        expand("runs/{{ds}}/sft/{name}", name=SFT_FILES),
    params:
        cmd=sft_command,
        layers=stage_digest("sft"),
    resources:
        tpu="train",
    log:
        "logs/sft/{ds}.log",
    benchmark:
        "benchmarks/sft/{ds}.tsv"
    shell:
        "{params.cmd} > {log} 2>&1"
