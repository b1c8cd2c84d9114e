# One evaluation per model: `rl` from the local eval copy (checked against the GCS receipt first:
# Snakemake compares only timestamps, so a corrupted copy would otherwise look "newer" and simply
# be evaluated), `sft` from the SFT best's run directory, so metrics.json reports RL against SFT.
EVAL_SOURCE = {  # model -> (checkpoint directory, checkpoint file)
    "rl": ("workdir/checkpoints/{ds}", "sft_state_rl_last.msgpack"),
    "sft": ("runs/{ds}/sft", "sft_best.msgpack"),
}


def eval_inputs(w):
    ckpt_dir, ckpt = (s.format(ds=w.ds) for s in EVAL_SOURCE[w.model])
    inputs = {"ckpt": f"{ckpt_dir}/{ckpt}",
              # every tokenizer file: with a default storage provider only declared inputs reach the job
              "tok": [f"{ckpt_dir}/{name}" for name in TOKENIZER_FILES]}
    if w.model == "rl":
        inputs["receipt"] = f"handoff/{w.ds}/gcs_copy.json"  # a plain path: default storage wraps it
    return inputs


rule evaluate:
    message:
        where("evaluate", "eval", per_model=True)
    input:
        unpack(eval_inputs),
        data=rules.prepare_data.output,
        configs=stage_files("eval"),
    output:
        predictions="results/{ds}/{model}/eval_predictions.json",
        summary="results/{ds}/{model}/run_summary.json",
    params:
        trainer_args=trainer_args("eval"),
        layers=stage_digest("eval"),
        data=lambda w, input: parent(input.data[0]),
        tokenizer=lambda w, input: parent(input.tok[0]),
        out=lambda w, output: parent(output.summary),
    resources:
        tpu="eval",
    log:
        "logs/evaluate/{ds}_{model}.log",
    benchmark:
        "benchmarks/evaluate/{ds}_{model}.tsv"
    script:
        "../workflow/scripts/evaluate.py"


rule crosscheck:
    message:
        where("crosscheck", per_model=True)
    input:
        predictions=rules.evaluate.output.predictions,
        summary=rules.evaluate.output.summary,
        info="data/{ds}/info.txt",
        data=rules.prepare_data.output,  # the split CSV the rows are checked against (and its catalog)
    output:
        "results/{ds}/{model}/calc_crosscheck.json",
    params:
        args=crosscheck_args(config),
        # Snakemake deletes a failed job's output: the report of a failed check is kept here too
        failed_report="logs/crosscheck/{ds}_{model}.failed.json",
        data=lambda w, input: parent(input.data[0]),
    log:
        "logs/crosscheck/{ds}_{model}.log",
    script:
        "../workflow/scripts/crosscheck.py"
