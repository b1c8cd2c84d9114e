rule metrics:
    message:
        where("metrics")
    input:
        rl_eval="results/{ds}/run_summary.json",
        sft_eval="results/{ds}/sft/run_summary.json",
        crosscheck="results/{ds}/calc_crosscheck.json",
        sft_crosscheck="results/{ds}/sft/calc_crosscheck.json",
        receipt="handoff/{ds}/gcs_copy.json",
        rl_run="runs/{ds}/rl/run_summary.json",
        sft_run="runs/{ds}/sft/run_summary.json",
        rl_curves="runs/{ds}/rl/metrics.jsonl",
        eval_copy="workdir/checkpoints/{ds}/sft_state_rl_last.msgpack",
    output:
        metrics="results/{ds}/metrics.json",
        curves=report("results/{ds}/plots/rl_curves.png", category="{ds}", caption="captions/rl_curves.rst"),
        topk=report("results/{ds}/plots/rl_vs_sft.png", category="{ds}", caption="captions/rl_vs_sft.rst"),
    params:
        plots=lambda w, output: parent(output.curves),
    log:
        "logs/metrics/{ds}.log",
    shell:
        "{PY} -m trainer metrics --dataset {wildcards.ds} --rl-eval {input.rl_eval} --sft-eval {input.sft_eval}"
        " --crosscheck {input.crosscheck} --sft-crosscheck {input.sft_crosscheck} --receipt {input.receipt}"
        " --rl-run {input.rl_run} --sft-run {input.sft_run} --rl-curves {input.rl_curves}"
        " --eval-copy {input.eval_copy} --out {output.metrics} --plots {params.plots} > {log} 2>&1"
