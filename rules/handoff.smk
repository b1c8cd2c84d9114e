EVAL_COPY_FILES = ["sft_state_rl_last.msgpack", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def emulator_flag(w=None):
    root = config["handoff"].get("emulator_root")
    return f"--emulator-root {root}" if root else ""


rule gcs_copy:
    message:
        where("gcs_copy")
    input:
        expand("runs/{{ds}}/rl/{name}", name=RL_FILES),
    output:
        "handoff/{ds}/gcs_copy.json",
    params:
        uri=lambda w: f"{config['handoff']['uri'].rstrip('/')}/{w.ds}",
        flags=lambda w: " ".join(filter(None, [emulator_flag(), "--overwrite" if config["handoff"].get("overwrite") else "",
                                               f"--workers {config['handoff'].get('workers', 4)}"])),
    log:
        "logs/gcs_copy/{ds}.log",
    benchmark:
        "benchmarks/gcs_copy/{ds}.tsv"
    shell:
        "{PY} -m trainer handoff-upload --files {input} --uri {params.uri} --receipt {output} {params.flags} > {log} 2>&1"


# A deleted eval copy is, like any Snakemake intermediate, not fetched again while everything after
# it is up to date; `snakemake workdir/checkpoints/DS/sft_state_rl_last.msgpack` (or
# `--forcerun eval_copy`) downloads it again without retraining. An edited or corrupted copy is
# newer than the evaluation, so evaluate reruns and refuses it (it checks the copy against the receipt).
rule eval_copy:
    message:
        where("eval_copy")
    input:
        "handoff/{ds}/gcs_copy.json",
    output:
        expand("workdir/checkpoints/{{ds}}/{name}", name=EVAL_COPY_FILES),
    params:
        flags=emulator_flag,
        names=" ".join(EVAL_COPY_FILES),
        dest=lambda w, output: parent(output[0]),
    log:
        "logs/eval_copy/{ds}.log",
    benchmark:
        "benchmarks/eval_copy/{ds}.tsv"
    shell:
        "{PY} -m trainer handoff-download --receipt {input} --name {params.names}"
        " --dest {params.dest} {params.flags} > {log} 2>&1"
