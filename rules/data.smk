DATA_FILES = ["train.csv", "valid.csv", "test.csv", "info.txt", "index.json", "item.json"]


def prepare_args(w):
    ds = config["datasets"][w.ds]
    if ds["source"] == "synthetic":
        return "--synthetic " + " ".join(f"--set synthetic.{k}={v}" for k, v in ds.get("synthetic", {}).items())
    return (f"--minionerec-root {config['data_root']} --name {ds['name']} "
            f"--train-from {config.get('train_from', 'train')}")


rule prepare_data:
    message:
        where("prepare_data")
    output:
        expand("data/{{ds}}/{name}", name=DATA_FILES),
    params:
        args=prepare_args,
    log:
        "logs/prepare_data/{ds}.log",
    benchmark:
        "benchmarks/prepare_data/{ds}.tsv"
    shell:
        "{PY} -m trainer prepare-data --out data/{wildcards.ds} {params.args} > {log} 2>&1"
