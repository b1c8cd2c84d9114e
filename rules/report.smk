rule metrics:
    message:
        where("metrics")
    input:
        rl_eval="results/{ds}/rl/run_summary.json",
        sft_eval="results/{ds}/sft/run_summary.json",
        rl_predictions="results/{ds}/rl/eval_predictions.json",
        sft_predictions="results/{ds}/sft/eval_predictions.json",
        data=rules.prepare_data.output,  # the train split fits the popularity floor
        crosscheck="results/{ds}/rl/calc_crosscheck.json",
        sft_crosscheck="results/{ds}/sft/calc_crosscheck.json",
        receipt=rules.gcs_copy.output.receipt,
        rl_run="runs/{ds}/rl/run_summary.json",
        sft_run="runs/{ds}/sft/run_summary.json",
        rl_curves=rules.rl_train.output.curves,
    output:
        metrics="results/{ds}/metrics.json",
        curves=report("results/{ds}/plots/rl_curves.png", category="{ds}", caption="captions/rl_curves.rst"),
        topk=report("results/{ds}/plots/rl_vs_sft.png", category="{ds}", caption="captions/rl_vs_sft.rst"),
    params:
        plots=lambda w, output: parent(output.curves),
        data=lambda w, input: parent(input.data[0]),
    log:
        "logs/metrics/{ds}.log",
    script:
        "../workflow/scripts/metrics.py"
