"""Dataset readers, their validation errors, the popularity bar and the prepare-data command."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainer.data import readers as data
from trainer.cli import main as cli_main
from trainer.errors import DataError
from trainer.data.prepare_data import import_minionerec, minionerec_sources

AMAZON = Path("/work/shared/minionerec-data/data/Amazon")
HEADER = "user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid\n"

# Three items; items 1 and 2 share one SID (as real MiniOneRec catalogs do).
INFO = ("<a_1><b_2><c_3>\tRed pen\t0\n"
        "<a_4><b_5><c_6>\tBlue pen\t1\n"
        "<a_4><b_5><c_6>\tBlue pen, 2-pack\t2\n")
INDEX = {"0": ["<a_1>", "<b_2>", "<c_3>"], "1": ["<a_4>", "<b_5>", "<c_6>"], "2": ["<a_4>", "<b_5>", "<c_6>"]}
GOOD_ROWS = (
    "u1,['Red pen'],Blue pen,[0],1,['<a_1><b_2><c_3>'],<a_4><b_5><c_6>\n"
    "u2,\"['Red pen', 'Blue pen']\",Red pen,\"[0, 1]\",0,\"['<a_1><b_2><c_3>', '<a_4><b_5><c_6>']\",<a_1><b_2><c_3>\n"
)


def write_dataset(d: Path, info: str = INFO, index: dict | str = INDEX, rows: str = GOOD_ROWS,
                  header: str = HEADER) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "info.txt").write_text(info)
    (d / "index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    (d / "item.json").write_text(json.dumps({k: {"title": "t"} for k in INDEX}))
    for split in data.SPLITS:
        (d / f"{split}.csv").write_text(header + rows)
    return d


def ex(history: list[str], target: str) -> data.Example:
    return data.Example("u", history, target, ["t"] * len(history), "t")


# --- catalog -----------------------------------------------------------------------------------

def test_catalog_distinct_sids_and_shared_items(tmp_path):
    cat = data.load_catalog(write_dataset(tmp_path))
    assert cat.sids == ["<a_1><b_2><c_3>", "<a_4><b_5><c_6>"]
    assert cat.sid_to_items["<a_4><b_5><c_6>"] == ["1", "2"]
    assert cat.item_to_sid == {"0": "<a_1><b_2><c_3>", "1": "<a_4><b_5><c_6>", "2": "<a_4><b_5><c_6>"}
    assert cat.titles["2"] == "Blue pen, 2-pack"
    assert cat.sid_index["<a_4><b_5><c_6>"] == 1 and len(cat) == 2
    assert "<a_1><b_2><c_3>" in cat and "<a_9><b_9><c_9>" not in cat
    assert cat.sid_title("<a_4><b_5><c_6>") == "Blue pen"
    assert data.code_tokens(cat.sids) == ["<a_1>", "<a_4>", "<b_2>", "<b_5>", "<c_3>", "<c_6>"]


def test_code_tokens_sorted_numerically():
    assert data.code_tokens(["<a_10><b_0><c_0>", "<a_9><b_0><c_0>"])[:2] == ["<a_9>", "<a_10>"]


@pytest.mark.parametrize("info, message", [
    ("<a_1><b_2><c_3>\tRed pen\t0\n<a_4><b_5><c_6>\tBlue pen\n", r"info\.txt: line 2: expected 3 tab-separated"),
    ("<a_1><b_2><c_3>\tRed pen\t0\n<a_4><b_5>\tBlue pen\t1\n", r"info\.txt: line 2: SID '<a_4><b_5>' does not match"),
    ("<a_1><b_2><c_3>\tRed pen\t0\n<a_4><b_5><c_6>\tBlue pen\t0\n", r"line 2: item_id '0' already listed on line 1"),
    ("", r"info\.txt: no items"),
])
def test_catalog_info_errors(tmp_path, info, message):
    write_dataset(tmp_path, info=info)
    with pytest.raises(DataError, match=message):
        data.load_catalog(tmp_path)


@pytest.mark.parametrize("index, message", [
    ({**INDEX, "1": ["<a_4>", "<b_5>"]}, r"index\.json: key '1': expected 3 code tokens"),
    ({**INDEX, "1": ["<a_4>", "<c_5>", "<b_6>"]}, r"index\.json: key '1': expected 3 code tokens"),
    ({**INDEX, "2": ["<a_4>", "<b_5>", "<c_7>"]},
     r"key '2': SID <a_4><b_5><c_7> disagrees with <a_4><b_5><c_6> on .*info\.txt line 3"),
    ({**INDEX, "9": ["<a_4>", "<b_5>", "<c_6>"]}, r"key '9' is not an item of"),
    ({"0": INDEX["0"], "1": INDEX["1"]}, r"no entry for item_id '2' \(listed on .*info\.txt line 3\)"),
    ("{not json", r"index\.json: not valid JSON"),
])
def test_catalog_index_errors(tmp_path, index, message):
    write_dataset(tmp_path, index=index)
    with pytest.raises(DataError, match=message):
        data.load_catalog(tmp_path)


def test_catalog_missing_file_is_named(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(DataError, match=r"index\.json: SID index file not found.*prepare-data"):
        data.load_catalog(tmp_path)


# --- splits ------------------------------------------------------------------------------------

def test_read_split_parses_rows(tmp_path):
    cat = data.load_catalog(write_dataset(tmp_path))
    rows = data.read_split(tmp_path, "valid", cat)
    assert rows[1] == data.Example(user_id="u2", history_sids=["<a_1><b_2><c_3>", "<a_4><b_5><c_6>"],
                                   target_sid="<a_1><b_2><c_3>", history_titles=["Red pen", "Blue pen"],
                                   target_title="Red pen")
    assert rows[0].target_sid == "<a_4><b_5><c_6>" and rows[0].history_titles == ["Red pen"]


def test_read_split_max_history_keeps_last_items(tmp_path):
    cat = data.load_catalog(write_dataset(tmp_path))
    row = data.read_split(tmp_path, "train", cat, max_history=1)[1]
    assert row.history_sids == ["<a_4><b_5><c_6>"] and row.history_titles == ["Blue pen"]
    with pytest.raises(DataError, match="max_history must be >= 1"):
        data.read_split(tmp_path, "train", cat, max_history=0)


def test_read_split_keeps_text_ids_as_text(tmp_path):
    write_dataset(tmp_path, rows="007,['NA'],NA,[0],1,['<a_1><b_2><c_3>'],<a_4><b_5><c_6>\n")
    row = data.read_split(tmp_path, "test", data.load_catalog(tmp_path))[0]
    assert row.user_id == "007" and row.history_titles == ["NA"] and row.target_title == "NA"


BAD_ROWS = [
    # (rows, message): the message must name the row/line and the column.
    ("u1,['Red pen'],Blue pen,[0],1,\"['<a_1><b_2><c_3>'\",<a_4><b_5><c_6>\n",
     r"row 1 \(line 2\), column 'history_item_sid': not a Python-literal list"),
    ("u1,['Red pen'],Blue pen,[0],1,'<a_1><b_2><c_3>',<a_4><b_5><c_6>\n",
     r"row 1 \(line 2\), column 'history_item_sid': expected a list"),
    (GOOD_ROWS + "u3,\"['Red pen', 'Blue pen']\",Red pen,[0],0,\"['<a_1><b_2><c_3>', '<a_4><b_5><c_6>']\",<a_1><b_2><c_3>\n",
     r"row 3 \(line 4\), column 'history_item_id': 1 entries but 'history_item_sid' has 2"),
    ("u1,\"['Red pen', 'x']\",Blue pen,[0],1,['<a_1><b_2><c_3>'],<a_4><b_5><c_6>\n",
     r"row 1 \(line 2\), column 'history_item_title': 2 entries"),
    ("u1,['Red pen'],Blue pen,[0],1,['<a_7><b_2><c_3>'],<a_4><b_5><c_6>\n",
     r"row 1 \(line 2\), column 'history_item_sid': SID '<a_7><b_2><c_3>' is not in the catalog"),
    (GOOD_ROWS + "u1,['Red pen'],Blue pen,[0],1,['<a_1><b_2><c_3>'],<a_4><b_5><c_0>\n",
     r"row 3 \(line 4\), column 'item_sid': SID '<a_4><b_5><c_0>' is not in the catalog"),
]


@pytest.mark.parametrize("rows, message", BAD_ROWS)
def test_read_split_row_errors(tmp_path, rows, message):
    write_dataset(tmp_path, rows=rows)
    cat = data.load_catalog(tmp_path)
    with pytest.raises(DataError, match=r"valid\.csv: " + message):
        data.read_split(tmp_path, "valid", cat)


def test_read_split_missing_column(tmp_path):
    header = HEADER.replace(",history_item_id", "")
    rows = "u1,['Red pen'],Blue pen,1,['<a_1><b_2><c_3>'],<a_4><b_5><c_6>\n"
    write_dataset(tmp_path, rows=rows, header=header)
    with pytest.raises(DataError, match=r"test\.csv: missing column\(s\) \['history_item_id'\]"):
        data.read_split(tmp_path, "test", data.load_catalog(tmp_path))


def test_read_split_missing_file_and_unknown_split(tmp_path):
    cat = data.load_catalog(write_dataset(tmp_path))
    (tmp_path / "train.csv").unlink()
    with pytest.raises(DataError, match=r"train\.csv: split CSV not found"):
        data.read_split(tmp_path, "train", cat)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        data.read_split(tmp_path, "dev", cat)


# --- tasks and baseline ------------------------------------------------------------------------

def test_alignment_pairs_one_per_title(tmp_path):
    info = INFO + "<a_1><b_2><c_3>\tBlue pen\t3\n"  # duplicate title with another SID: last kept (upstream)
    index = {**INDEX, "3": ["<a_1>", "<b_2>", "<c_3>"]}
    cat = data.load_catalog(write_dataset(tmp_path, info=info, index=index))
    assert data.load_alignment_pairs(cat) == [
        ("Red pen", "<a_1><b_2><c_3>"), ("Blue pen", "<a_1><b_2><c_3>"), ("Blue pen, 2-pack", "<a_4><b_5><c_6>")]


def test_popularity_baseline_hand_computed():
    a, b, c, d = "<a_1><b_0><c_0>", "<a_2><b_0><c_0>", "<a_3><b_0><c_0>", "<a_4><b_0><c_0>"
    train = [ex([a], b), ex([a], b), ex([a], b), ex([a], c), ex([a], c), ex([a], d)]  # b > c > d
    evals = [ex([a], b), ex([a], c), ex([a], d), ex([a], a)]
    got = data.popularity_baseline(train, evals, k=2)
    assert got["hr"] == pytest.approx(2 / 4)
    assert got["ndcg"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(3)) / 4)
    assert data.popularity_baseline(train, evals, k=3)["hr"] == pytest.approx(3 / 4)
    # Ties are broken by first appearance, so the ranking is deterministic.
    assert data.popularity_ranking([ex([a], c), ex([a], b)]) == [c, b]
    with pytest.raises(DataError, match="non-empty"):
        data.popularity_baseline([], evals, 2)


# --- prepare-data ------------------------------------------------------------------------------

def test_prepare_data_synthetic_cli(tmp_path):
    out = tmp_path / "ds"
    rc = cli_main(["prepare-data", "--out", str(out), "--synthetic", "--set", "synthetic.num_items=24",
                   "--set", "synthetic.num_users=30", "--set", "synthetic.num_groups=3"])
    assert rc == 0
    cat = data.load_catalog(out)
    assert len(cat.item_to_sid) == 24
    assert len(data.read_split(out, "test", cat)) == 30


def test_prepare_data_minionerec_from_fixture(tmp_path):
    """The MiniOneRec layout is found under its own names and copied byte for byte."""
    root = tmp_path / "Amazon"
    src = minionerec_sources(root, "Office_Products")
    for p in src.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    src["info"].write_text(INFO)
    src["index"].write_text(json.dumps(INDEX))
    src["item"].write_text(json.dumps({k: {"title": f"T{k}", "description": "long"} for k in INDEX}))
    for split in ("valid", "test"):
        src[split].write_text(HEADER + GOOD_ROWS)
    out = tmp_path / "out"

    rc = cli_main(["prepare-data", "--out", str(out), "--minionerec-root", str(root), "--name", "office"])
    assert rc == 2 and not out.exists()  # no train split: refused before writing anything

    info = import_minionerec(out, root, "office", train_from="valid")
    assert info["train_rows"] == 2 and info["num_sids"] == 2
    assert (out / "train.csv").read_bytes() == src["valid"].read_bytes()
    assert (out / "info.txt").read_bytes() == src["info"].read_bytes()
    # titles and descriptions kept (rl_title2sid reads descriptions); other fields dropped
    assert json.loads((out / "item.json").read_text()) == {k: {"title": f"T{k}", "description": "long"} for k in INDEX}


def test_prepare_data_missing_file_message(tmp_path, capsys):
    rc = cli_main(["prepare-data", "--out", str(tmp_path / "o"), "--minionerec-root", str(tmp_path),
                   "--name", "Office_Products", "--train-from", "valid"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "valid/Office_Products_5_2016-10-2018-11.csv: MiniOneRec valid file for Office_Products not found" in err


def test_prepare_data_bad_source_writes_nothing(tmp_path):
    root = tmp_path / "Amazon"
    src = minionerec_sources(root, "X")
    for p in src.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    src["info"].write_text(INFO)
    src["index"].write_text(json.dumps(INDEX))
    src["item"].write_text("{}")
    for split in ("train", "valid"):
        src[split].write_text(HEADER + GOOD_ROWS)
    src["test"].write_text(HEADER + BAD_ROWS[4][0])
    with pytest.raises(DataError, match=r"test/X_5_2016-10-2018-11\.csv: row 1 .*not in the catalog"):
        import_minionerec(tmp_path / "out", root, "X")
    assert not (tmp_path / "out").exists()


# --- real MiniOneRec files (skipped where the shared data is absent) ---------------------------

office = pytest.mark.skipif(not (AMAZON / "info" / "Office_Products_5_2016-10-2018-11.txt").is_file(),
                            reason="MiniOneRec Office_Products data not present")


@office
def test_real_office_catalog_and_splits(tmp_path):
    info = import_minionerec(tmp_path, AMAZON, "Office_Products", train_from="valid")
    assert info["num_items"] == 3459 and info["num_sids"] < info["num_items"]  # some items share SIDs
    cat = data.load_catalog(tmp_path)
    assert all(data.SID_RE.fullmatch(s) for s in cat.sids)
    rows = data.read_split(tmp_path, "test", cat, max_history=3)
    assert len(rows) == info["test_rows"] and all(1 <= len(r.history_sids) <= 3 for r in rows)
    assert rows[0].user_id == "A1179" and rows[0].target_sid == "<a_183><b_194><c_122>"
    pop = data.popularity_baseline(data.read_split(tmp_path, "train", cat), rows, 10)
    assert 0.0 < pop["hr"] < 0.5
