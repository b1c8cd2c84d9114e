DATA_FILES = ["train.csv", "valid.csv", "test.csv", "info.txt", "index.json", "item.json"]


rule prepare_data:
    message:
        where("prepare_data")
    output:
        expand("data/{{ds}}/{name}", name=DATA_FILES),
    params:
        source_args=lambda w: prepare_data_args(config, w.ds),
        out=lambda w, output: parent(output[0]),
    log:
        "logs/prepare_data/{ds}.log",
    benchmark:
        "benchmarks/prepare_data/{ds}.tsv"
    retries: 2  # the MiniOneRec download, when files are missing
    script:
        "../workflow/scripts/prepare_data.py"
