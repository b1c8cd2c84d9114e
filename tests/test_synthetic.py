"""Synthetic generator: deterministic bytes, MiniOneRec layout, and learnable next-item structure."""
from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from trainer.data import readers as data
from trainer.data import synthetic
from trainer.config import ConfigError

FILES = ("train.csv", "valid.csv", "test.csv", "info.txt", "index.json", "item.json")
SIZES = dict(num_items=120, num_users=400, num_groups=8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    synthetic.generate(d, seed=0, **SIZES)
    cat = data.load_catalog(d)
    return d, cat, {s: data.read_split(d, s, cat) for s in data.SPLITS}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, dataset):
    d0 = dataset[0]
    synthetic.generate(tmp_path / "again", seed=0, **SIZES)
    synthetic.generate(tmp_path / "other", seed=1, **SIZES)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (d0 / name).read_bytes(), name
    assert (tmp_path / "other" / "train.csv").read_bytes() != (d0 / "train.csv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(FILES)  # no temp files left


def test_sids_spell_group_subcluster_and_title(dataset):
    _, cat, _ = dataset
    assert len(cat.item_to_sid) == 120 and len(cat.sids) == 120  # every item its own SID
    groups = Counter()
    for item_id, sid in cat.item_to_sid.items():
        a, b, c = (int(x) for x in re.fullmatch(r"<a_(\d+)><b_(\d+)><c_(\d+)>", sid).groups())
        title = cat.titles[item_id]
        assert title.startswith(f"Group{a} ") and title.endswith(f" {c}")
        groups[a] += 1
    assert sorted(groups) == list(range(8)) and set(groups.values()) == {15}
    # Items of one sub-cluster share the `<a_*><b_*>` prefix and the noun of their title.
    nouns = defaultdict(set)
    for item_id, sid in cat.item_to_sid.items():
        nouns[sid[: sid.index("<c_")]].add(cat.titles[item_id].split()[1])
    assert all(len(n) == 1 for n in nouns.values())


def test_leave_one_out_splits(dataset):
    _, _, splits = dataset
    valid = {ex.user_id: ex for ex in splits["valid"]}
    test = {ex.user_id: ex for ex in splits["test"]}
    assert len(valid) == len(test) == len(splits["test"]) == 400  # one valid and one test row per user
    train_by_user = defaultdict(list)
    for ex in splits["train"]:
        train_by_user[ex.user_id].append(ex)
    assert set(train_by_user) == set(test)
    for user, t in test.items():
        v = valid[user]
        # test history = valid history + valid target (capped at 10 like MiniOneRec's files)
        assert t.history_sids == (v.history_sids + [v.target_sid])[-10:]
        last_train = train_by_user[user][-1]
        assert v.history_sids == (last_train.history_sids + [last_train.target_sid])[-10:]
        assert all(1 <= len(ex.history_sids) <= 10 for ex in train_by_user[user])


def bigram_hr(train: list[data.Example], evals: list[data.Example], k: int) -> float:
    """HR@k of ranking next items by how often they followed the last history item in train."""
    follows: dict[str, Counter] = defaultdict(Counter)
    for ex in train:
        follows[ex.history_sids[-1]][ex.target_sid] += 1
    popular = data.popularity_ranking(train)
    hits = 0
    for ex in evals:
        ranked = [s for s, _ in follows[ex.history_sids[-1]].most_common()]
        ranked += [s for s in popular if s not in ranked]
        hits += ex.target_sid in ranked[:k]
    return hits / len(evals)


def test_next_item_learnable_well_above_popularity(dataset):
    _, _, splits = dataset
    pop = data.popularity_baseline(splits["train"], splits["valid"], 10)["hr"]
    markov = bigram_hr(splits["train"], splits["valid"], 10)
    assert pop > 0.05  # popularity is a real bar, not zero
    assert markov >= 3 * pop, (markov, pop)
    assert bigram_hr(splits["train"], splits["test"], 10) >= 3 * pop


@pytest.mark.parametrize("sizes, key", [
    (dict(num_items=10, num_users=5, num_groups=0), "synthetic.num_groups"),
    (dict(num_items=5, num_users=5, num_groups=3), "synthetic.num_items"),
    (dict(num_items=10, num_users=0, num_groups=2), "synthetic.num_users"),
])
def test_bad_sizes_name_the_key(tmp_path, sizes, key):
    with pytest.raises(ConfigError, match=key):
        synthetic.generate(tmp_path, seed=0, **sizes)
    assert not any(tmp_path.iterdir())


def test_tiny_sizes_still_valid(tmp_path):
    synthetic.generate(tmp_path, num_items=2, num_users=1, num_groups=1, seed=3)
    cat = data.load_catalog(tmp_path)
    assert [len(data.read_split(tmp_path, s, cat)) for s in ("valid", "test")] == [1, 1]
    assert len(data.read_split(tmp_path, "train", cat)) >= 2
