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
    resources:
        tpu="train",
    log:
        "logs/rl_train/{ds}.log",
    benchmark:
        "benchmarks/rl_train/{ds}.tsv"
    shell:
        "{PY} -m trainer rl {params.args} --data data/{wildcards.ds} --set output_dir=runs/{wildcards.ds}/rl"
        " --set init.checkpoint=runs/{wildcards.ds}/sft/sft_best.msgpack --set tokenizer.path=runs/{wildcards.ds}/sft"
        " > {log} 2>&1"
