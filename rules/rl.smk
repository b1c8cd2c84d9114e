RL_FILES = ["sft_state_rl_last.msgpack", "run_summary.json", *TOKENIZER_FILES]


rule rl_train:
    message:
        where("rl_train", "train")
    input:
        data=rules.prepare_data.output,
        sft=expand("runs/{{ds}}/sft/{name}", name=SFT_FILES),
        sft_best="runs/{ds}/sft/sft_best.msgpack",
        configs=stage_files("rl"),
    output:
        expand("runs/{{ds}}/rl/{name}", name=RL_FILES),
        curves="runs/{ds}/rl/metrics.jsonl",
    params:
        trainer_args=trainer_args("rl"),
        layers=stage_digest("rl"),
        data=lambda w, input: parent(input.data[0]),
        out=lambda w, output: parent(output[0]),
        sft=lambda w, input: parent(input.sft_best),
    resources:
        tpu="train",
    retries: 2  # a killed or preempted run resumes from its durable train state
    log:
        "logs/rl_train/{ds}.log",
    benchmark:
        "benchmarks/rl_train/{ds}.tsv"
    script:
        "../workflow/scripts/rl_train.py"
