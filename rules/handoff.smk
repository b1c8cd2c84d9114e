EVAL_COPY_FILES = ["sft_state_rl_last.msgpack", *TOKENIZER_FILES]


# Where the handoff runs is configuration: handoff.upload_on / download_on name a slice (the TPU
# profile: the train slice's host 0, which has the checkpoint, and the eval host), so the checkpoint
# never passes through the machine running Snakemake; null runs them here (the offline default).
rule gcs_copy:
    message:
        where("gcs_copy", config["handoff"].get("upload_on"))
    input:
        expand("runs/{{ds}}/rl/{name}", name=RL_FILES),
    output:
        receipt="handoff/{ds}/gcs_copy.json",
    params:
        uri=lambda w: f"{config['handoff']['uri'].rstrip('/')}/{w.ds}",
        emulator_root=config["handoff"].get("emulator_root"),
        overwrite=bool(config["handoff"].get("overwrite")),
        workers=config["handoff"].get("workers", 4),
    resources:
        tpu=config["handoff"].get("upload_on") or "none",
        tpu_hosts=1,  # host 0 alone: an upload, not a jax.distributed program
    log:
        "logs/gcs_copy/{ds}.log",
    benchmark:
        "benchmarks/gcs_copy/{ds}.tsv"
    retries: 2  # network; the upload is no-clobber and skips identical objects
    script:
        "../workflow/scripts/gcs_copy.py"


# A deleted eval copy is, like any Snakemake intermediate, not fetched again while everything after
# it is up to date; `snakemake workdir/checkpoints/DS/sft_state_rl_last.msgpack` (or
# `--forcerun eval_copy`) downloads it again without retraining. An edited or corrupted copy is
# newer than the evaluation, so evaluate reruns and refuses it (it checks the copy against the receipt).
rule eval_copy:
    message:
        where("eval_copy", config["handoff"].get("download_on"))
    input:
        receipt=rules.gcs_copy.output.receipt,
    output:
        expand("workdir/checkpoints/{{ds}}/{name}", name=EVAL_COPY_FILES),
    params:
        names=EVAL_COPY_FILES,
        dest=lambda w, output: parent(output[0]),
        emulator_root=config["handoff"].get("emulator_root"),
    resources:
        tpu=config["handoff"].get("download_on") or "none",
        tpu_hosts=1,
    log:
        "logs/eval_copy/{ds}.log",
    benchmark:
        "benchmarks/eval_copy/{ds}.tsv"
    retries: 2  # network; the download is atomic and verified
    script:
        "../workflow/scripts/eval_copy.py"
