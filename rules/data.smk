DATA_FILES = ["train.csv", "valid.csv", "test.csv", "info.txt", "index.json", "item.json"]


def prepare_args(w):
    ds = config["datasets"][w.ds]
    if ds["source"] == "synthetic":
        return "--synthetic " + " ".join(f"--set synthetic.{k}={v}" for k, v in ds.get("synthetic", {}).items())
    args = (f"--minionerec-root {config['data_root']} --name {ds['name']} "
            f"--train-from {config.get('train_from', 'train')}")
    dl = config.get("minionerec_download") or {}
    if dl.get("commit"):  # files missing under data_root are fetched at this commit, sha256-checked
        args += (f" --download-commit {dl['commit']} --download-repo {dl.get('repo', 'https://github.com/AkaliKong/MiniOneRec')}"
                 f" --sha256-file {dl.get('sha256', 'config/minionerec_sha256.yaml')}")
    return args


rule prepare_data:
    message:
        where("prepare_data")
    output:
        expand("data/{{ds}}/{name}", name=DATA_FILES),
    params:
        args=prepare_args,
        out=lambda w, output: parent(output[0]),
    log:
        "logs/prepare_data/{ds}.log",
    benchmark:
        "benchmarks/prepare_data/{ds}.tsv"
    shell:
        "{PY} -m trainer prepare-data --out {params.out} {params.args} > {log} 2>&1"
