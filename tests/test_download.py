"""The pinned MiniOneRec download: git blob ids, the real pins, and a file:// mirror laid out like
the repository (BASE/COMMIT/PATH). Nothing here needs the internet."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.upstream_oracle import AMAZON, UPSTREAM_CALC
from trainer.cli import main as cli_main
from trainer.data import pinned, prepare_data, synthetic
from trainer.errors import DataError

REPO = Path(__file__).resolve().parents[1]
PIN = "81b4ba9811cfb152cf161f1c486fe516510d081e"  # ../shared/minionerec-upstream/README.md
PINS = REPO / "config" / "minionerec_pins.yaml"
NAME = "Office_Products"


def test_git_blob_id_is_what_git_computes(tmp_path):
    f = tmp_path / "x.csv"
    f.write_bytes(b"user_id,item\nA1,\xe2\x82\xac\n")
    git = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True)
    if git.returncode == 0:
        assert pinned.git_blob_id(f.read_bytes()) == git.stdout.strip()
    assert pinned.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `echo hello | git hash-object --stdin`


def test_real_pins_cover_every_file_and_match_the_shared_copies():
    """config/minionerec_pins.yaml is for the configured commit, pins every file prepare_data reads
    (train split included) and calc.py, and the shared copies have exactly those blob ids."""
    pins = pinned.load_pins(PINS, PIN)
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert cfg["minionerec_download"]["commit"] == PIN and cfg["train_from"] == "train"
    for name in ("Office_Products", "Industrial_and_Scientific"):
        for f in prepare_data.needed_files(Path("/x"), name, "train").values():
            assert f"data/Amazon/{f.relative_to('/x')}" in pins
    assert pins["data/Amazon/train/Office_Products_5_2016-10-2018-11.csv"] == "a9b4781fc41c41358981df034662d3cf3ccb6f90"
    shared = [(rel, AMAZON.parent.parent / rel) for rel in pins if rel.startswith("data/")]
    shared += [("calc.py", UPSTREAM_CALC)]
    present = [(rel, p) for rel, p in shared if p.is_file()]
    if not present:
        pytest.skip("../shared copies not present")
    for rel, path in present:
        assert pinned.git_blob_id(path.read_bytes()) == pins[rel], rel


def test_raw_github_url_at_pinned_commit():
    url = pinned.raw_url("https://github.com/AkaliKong/MiniOneRec", PIN, "data/Amazon/valid/a.csv")
    assert url == f"https://raw.githubusercontent.com/AkaliKong/MiniOneRec/{PIN}/data/Amazon/valid/a.csv"
    assert pinned.raw_url("https://github.com/AkaliKong/MiniOneRec.git/", PIN, "calc.py") == url.rsplit(
        "/data/", 1)[0] + "/calc.py"
    assert pinned.raw_url("file:///mirror", PIN, "calc.py") == f"file:///mirror/{PIN}/calc.py"
    with pytest.raises(DataError, match="OWNER/REPO"):
        pinned.raw_url("https://github.com/AkaliKong", PIN, "x")


def mirror(tmp_path: Path) -> tuple[str, Path, dict[str, str]]:
    """A file:// mirror laid out like the repository at PIN (BASE/PIN/data/Amazon/..., train split
    included) holding a small synthetic dataset under MiniOneRec's names, and a pin file for it."""
    gen = tmp_path / "gen"
    synthetic.generate(gen, 40, 60, 4, 0)
    src = {"train": "train.csv", "valid": "valid.csv", "test": "test.csv", "info": "info.txt",
           "index": "index.json", "item": "item.json"}
    base = tmp_path / "mirror"
    pins = {}
    for key, path in prepare_data.needed_files(base / PIN / "data/Amazon", NAME, "train").items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((gen / src[key]).read_bytes())
        pins[str(path.relative_to(base / PIN))] = pinned.git_blob_id(path.read_bytes())
    pin_file = tmp_path / "pins.yaml"
    pin_file.write_text(yaml.safe_dump({"commit": PIN, "files": pins}))
    return base.as_uri(), pin_file, pins


def test_download_keeps_verified_files_train_split_included(tmp_path):
    base, pin_file, pins = mirror(tmp_path)
    out = tmp_path / "cache"
    rels = sorted(r.removeprefix("data/Amazon/") for r in pins)
    assert "train/Office_Products_5_2016-10-2018-11.csv" in rels
    written = prepare_data.download_minionerec(out, rels, base, PIN, pinned.load_pins(pin_file, PIN))
    assert sorted(str(p.relative_to(out)) for p in written) == rels
    assert all(pinned.git_blob_id((out / r).read_bytes()) == pins["data/Amazon/" + r] for r in rels)
    calls = []  # present files are not fetched again
    assert prepare_data.download_minionerec(out, rels, base, PIN, pins, fetch=calls.append) == [] and calls == []


def test_download_rejects_a_tampered_file_naming_both_ids(tmp_path):
    base, _, pins = mirror(tmp_path)
    rel = "test/Office_Products_5_2016-10-2018-11.csv"
    served = Path(base.removeprefix("file://")) / PIN / "data/Amazon" / rel
    served.write_bytes(served.read_bytes().replace(b"<a_", b"<a_1", 1))  # one byte more on the mirror
    out = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        prepare_data.download_minionerec(out, [rel], base, PIN, pins)
    msg = str(err.value)
    assert pinned.git_blob_id(served.read_bytes()) in msg and pins["data/Amazon/" + rel] in msg
    assert f"{PIN}/data/Amazon/{rel}" in msg and "nothing was written" in msg
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_download_errors_name_what_to_fix(tmp_path):
    base, pin_file, pins = mirror(tmp_path)
    with pytest.raises(DataError, match="no pinned git blob id for 'data/Amazon/train/x.csv'"):
        prepare_data.download_minionerec(tmp_path / "r", ["train/x.csv"], base, PIN, pins)
    with pytest.raises(DataError, match=r"pins are for commit .* asks for commit 0{40}"):
        pinned.load_pins(pin_file, "0" * 40)
    with pytest.raises(pinned.FetchError, match="downloading file://.*failed"):
        prepare_data.download_minionerec(tmp_path / "r", sorted(r.removeprefix("data/Amazon/") for r in pins),
                                         base, "1" * 40, pins)


def test_prepare_data_cli_fills_missing_files_from_the_download(tmp_path, capsys):
    """A root with only some files (like ../shared: no train split): the rest come from the pinned
    download, nothing is written into the root, and train.csv is the train split."""
    base, pin_file, pins = mirror(tmp_path)
    root = tmp_path / "partial/Amazon"
    amazon = Path(base.removeprefix("file://")) / PIN / "data/Amazon"
    for rel in ("valid/Office_Products_5_2016-10-2018-11.csv", "info/Office_Products_5_2016-10-2018-11.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((amazon / rel).read_bytes())
    before = sorted(root.rglob("*"))
    cache = tmp_path / "cache"
    assert cli_main(["prepare-data", "--out", str(tmp_path / "out"), "--minionerec-root", str(root), "--name", "office",
                     "--download-commit", PIN, "--download-repo", base, "--pins", str(pin_file),
                     "--cache-dir", str(cache)]) == 0, capsys.readouterr().err
    assert sorted(root.rglob("*")) == before
    assert not (cache / PIN / "data/Amazon/valid").exists()  # present files are not downloaded
    assert (tmp_path / "out/train.csv").read_bytes() == (amazon / "train/Office_Products_5_2016-10-2018-11.csv").read_bytes()
