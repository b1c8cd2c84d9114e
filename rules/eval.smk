# The RL checkpoint is evaluated from the local eval copy; the SFT best from its run directory,
# the same way, so metrics.json can report RL against SFT. The eval copy is first checked against
# the GCS receipt: Snakemake compares only timestamps, so a corrupted copy would otherwise look
# "newer" and simply be evaluated.
EVAL_RECEIPT = {"rl": "handoff/{ds}/gcs_copy.json", "sft": []}
EVAL_SOURCES = {
    "rl": ("workdir/checkpoints/{ds}/sft_state_rl_last.msgpack", "workdir/checkpoints/{ds}", "results/{ds}"),
    "sft": ("runs/{ds}/sft/sft_best.msgpack", "runs/{ds}/sft", "results/{ds}/sft"),
}

for _which, (_ckpt, _tok, _out) in EVAL_SOURCES.items():

    rule:
        name:
            "evaluate" if _which == "rl" else "evaluate_sft"
        message:
            where("evaluate" if _which == "rl" else "evaluate_sft", "eval")
        input:
            data=rules.prepare_data.output,
            ckpt=_ckpt,
            # every tokenizer file: with a default storage provider only declared inputs reach the job
            tok=[f"{_tok}/{name}" for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")],
            configs=stage_files("eval"),
            receipt=EVAL_RECEIPT[_which],
        output:
            predictions=_out + "/eval_predictions.json",
            summary=_out + "/run_summary.json",
        params:
            args=config_args("eval"),
            layers=stage_digest("eval"),
            data=lambda w, input: parent(input.data[0]),
            tok=lambda w, input: parent(input.tok[0]),
            out=lambda w, output: parent(output.summary),
            receipt=lambda w, input: f"--receipt {input.receipt}" if input.receipt else "",
        resources:
            tpu="eval",
        log:
            f"logs/evaluate_{_which}/{{ds}}.log",
        benchmark:
            f"benchmarks/evaluate_{_which}/{{ds}}.tsv"
        shell:
            "{PY} -m trainer eval {params.args} --data {params.data} --checkpoint {input.ckpt}"
            " --tokenizer {params.tok} --out {params.out} {params.receipt} > {log} 2>&1"

    rule:
        name:
            "crosscheck" if _which == "rl" else "crosscheck_sft"
        message:
            where("crosscheck" if _which == "rl" else "crosscheck_sft")
        input:
            predictions=_out + "/eval_predictions.json",
            summary=_out + "/run_summary.json",
            info="data/{ds}/info.txt",
        output:
            _out + "/calc_crosscheck.json",
        params:
            sets=lambda w: " ".join(
                f"--set crosscheck.{k}={v}" for k, v in config.get("crosscheck", {}).items() if v is not None),
        log:
            f"logs/crosscheck_{_which}/{{ds}}.log",
        shell:
            "{PY} -m trainer crosscheck --predictions {input.predictions} --summary {input.summary}"
            " --info {input.info} --out {output} {params.sets} > {log} 2>&1"
