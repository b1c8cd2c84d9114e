RL_FILES = ["sft_state_rl_last.msgpack", "run_summary.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"]


rule rl_train:
    message:
        where("rl_train", "train")
    input:
        data=rules.prepare_data.output,
        sft=rules.sft.output,
        configs=stage_files("rl"),
    output:
        expand("runs/{{ds}}/rl/{name}", name=RL_FILES),
        "runs/{ds}/rl/metrics.jsonl",
    params:
        args=config_args("rl"),
        layers=stage_digest("rl"),
        data=lambda w, input: parent(input.data[0]),
        out=lambda w, output: parent(output[0]),
        sft=lambda w, input: parent(input.sft[0]),
    resources:
        tpu="train",
    log:
        "logs/rl_train/{ds}.log",
    benchmark:
        "benchmarks/rl_train/{ds}.tsv"
    shell:
        "{PY} -m trainer rl {params.args} --data {params.data} --set output_dir={params.out}"
        " --set init.checkpoint={input.sft[0]} --set tokenizer.path={params.sft}"
        " > {log} 2>&1"
