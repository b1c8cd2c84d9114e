"""Training tasks as (prompt, answer) samples, in upstream MiniOneRec's wording (data.py).

`sft_samples(names, ...)` serves `sft.tasks`, `rl_samples(names, ...)` serves `rl.tasks`. SFT
prompts carry the instruction header (prompts.make_prompt); the `rl_*` tasks are upstream's RL
datasets, whose prompts are the bare `### User Input:` block (rl.py applies no template), so
their instruction block is empty. The answer is a SID, or a title (text) for the SFT tasks that
teach the model its items' names.
"""
from __future__ import annotations

import ast
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config import ConfigError
from trainer.data import prompts
from trainer.data.readers import INDEX_FILE, ITEM_FILE, Catalog, Example, load_alignment_pairs
from trainer.errors import DataError
from trainer.io_utils import read_json

# rl.py: RLSeqTitle2SidDataset(train_file, sample=10000).
SEQ_TITLE2SID_SAMPLES = 10000
# SFTData's instructions (one drawn per row with random.randint after random.seed(seed)); the
# wording, typos included, is upstream's.
TITLE_HISTORY_INSTRUCTIONS = (
    "Given a list of {c} the user recetenly enjoy, please write a new {c} that the user may bought",
    "Considering the {c} that has recently captured the user's interest, kindly create a compilation of other "
    "{c} that the user might have played prior to this.",
    "Based on the user's current gaming preference, please draft a list of potential {c} they may have "
    "experienced beforehand.",
    "Reflecting on the {c} the user has taken pleasure in recently, we request that you formulate a list of {c} "
    "that may have preceded the user's current enjoyment.",
    "In light of the recent gaming enjoyment expressed by the user, please assemble a list of {c} that could "
    "potentially include past titles the user has engaged with.",
    "Taking into account the {c} that has lately provided enjoyment to the user, please put together an "
    "inventory of {c} the user might have explored previously.",
    "Given the user's newfound enjoyment of a particular {c}, would you kindly generate a roster of other {c} "
    "that might resonate with their past gaming experiences?",
    "In response to the user's recent fondness for a specific {c}, we seek your assistance in listing possible "
    "{c} the user may have delighted in earlier.",
    "With respect to the {c} currently enjoyed by the user, please compile a suggestive list of {c} they may "
    "have played in the past.",
    "Bearing in mind the {c} that the user has recently been enthralled by, please construct a catalog of other "
    "{c} that the user potentially partook in beforehand.",
    "In relation to the user's recent entertainment with a given {c}, it would be appreciated if you could "
    "curate a list of {c} that might form part of the user's previous gaming history.",
)


@dataclass(frozen=True)
class Sample:
    prompt: prompts.Prompt
    sid: str | None = None  # the answer when it is an item's SID
    text: str | None = None  # the answer when it is text (a title), without the trailing newline


def rl_prompt(user_input: str) -> prompts.Prompt:
    """Upstream's RL prompt: the user-input block alone, open at `### Response:`."""
    return prompts.Prompt("", f"### User Input: \n{user_input}\n\n### Response:\n")


class ItemText:
    """Titles and descriptions from item.json, keyed as upstream keys them (index.json order,
    the last item winning when several share a SID or a title)."""

    def __init__(self, data_dir: str | Path, catalog: Catalog):
        hint = "rerun `python -m trainer prepare-data` for this dataset"
        items = read_json(Path(data_dir) / ITEM_FILE, DataError, hint)
        index = read_json(Path(data_dir) / INDEX_FILE, DataError, hint)
        self.sid2title: dict[str, str] = {}
        self.title2sid: dict[str, str] = {}
        self.description2sid: dict[str, str] = {}
        for item_id in index:
            feat = items.get(item_id)
            if not isinstance(feat, dict) or item_id not in catalog.item_to_sid:
                continue
            sid, title = catalog.item_to_sid[item_id], str(feat.get("title", ""))
            self.sid2title[sid] = title
            self.title2sid[title] = sid
            desc = _first_description(feat.get("description"))
            if desc:
                self.description2sid[desc] = sid


def _first_description(desc) -> str:
    """RLTitle2SidDataset's reading: a "['a', ...]" string becomes its first entry."""
    if not isinstance(desc, str):
        return ""
    if desc.startswith("['") and desc.endswith("']"):
        try:
            parsed = ast.literal_eval(desc)
            desc = str(parsed[0]) if parsed else desc
        except (ValueError, SyntaxError):
            pass
    return desc.strip() and desc


def _quoted(titles) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def _need_category(category: str | None, task: str) -> str:
    if not category:
        raise ConfigError(f"sft.tasks: '{task}' names the item category in its prompt; set data.category "
                          "(upstream: 'office products', 'industrial and scientific items')")
    return category


def _title_history2title(train: list[Example], category: str, seed: int) -> list[Sample]:
    rng = random.Random(seed)  # SFTData: random.seed(seed), then one randint per row in order
    out = []
    for ex in train:
        instruction = TITLE_HISTORY_INSTRUCTIONS[rng.randint(0, len(TITLE_HISTORY_INSTRUCTIONS) - 1)]
        history = ",\t".join(f'"{t}"' for t in ex.history_titles)
        # SFTData closes the instruction with "\n \n" where the other tasks have "\n\n".
        prompt = prompts.Prompt(f"{prompts.HEADER}### Instruction:\n{instruction.format(c=category)}\n \n",
                                f"### User Input: \nThe user has palyed the following {category}s before: {history}"
                                "\n\n### Response:\n")
        out.append(Sample(prompt, text=f'"{ex.target_title}"'))
    return out


def sft_samples(names: list[str], data_dir, catalog: Catalog, train: list[Example], category: str | None,
                seed: int) -> list[Sample]:
    """The SFT training samples of the tasks `names` (sft.tasks), task after task."""
    unknown = [n for n in names if n not in SFT_TASKS]
    if unknown or not names:
        raise ConfigError(f"sft.tasks: unknown {unknown or names}; valid: {', '.join(SFT_TASKS)}")
    text = ItemText(data_dir, catalog) if {"sid2title", "sid_history2title"} & set(names) else None
    out: list[Sample] = []
    for name in names:
        if name == "next_item":  # SidSFTDataset
            out += [Sample(prompts.sequential_prompt(e.history_sids), sid=e.target_sid) for e in train]
        elif name == "history_prefixes":  # not upstream's: every earlier step of each history
            out += [Sample(prompts.sequential_prompt(e.history_sids[:k]), sid=e.history_sids[k])
                    for e in train for k in range(1, len(e.history_sids))]
        elif name == "title2sid":  # SidItemFeatDataset, title -> SID half
            out += [Sample(prompts.alignment_prompt(t), sid=s) for t, s in load_alignment_pairs(catalog)]
        elif name == "sid2title":  # SidItemFeatDataset, SID -> title half
            out += [Sample(prompts.make_prompt(prompts.ALIGNMENT_INSTRUCTION, f'What is the title of item "{s}"?'),
                           text=t) for s, t in text.sid2title.items()]
        elif name == "sid_history2title":  # FusionSeqRecDataset (title variant)
            out += [Sample(prompts.make_prompt(
                "Can you recommend the next item for the user based on their interaction history?",
                f"The user has sequentially interacted with items {', '.join(e.history_sids)}. Can you recommend "
                "the next item for him? Tell me the title of the item"),
                text=text.sid2title.get(e.target_sid, e.target_sid)) for e in train]
        elif name == "title_history2title":  # SFTData
            out += _title_history2title(train, _need_category(category, name), seed)
        elif name == "title_history2sid":  # TitleHistory2SidSFTDataset
            c = _need_category(category, name)
            out += [Sample(prompts.make_prompt(
                "Based on the user's historical interaction with item titles, predict the semantic ID of the next "
                "item they may expect.",
                f"The user has interacted with the following {c} items in chronological order: "
                f"{_quoted(e.history_titles)}. Can you predict the next item the user may expect?"), sid=e.target_sid)
                for e in train]
    return out


def rl_samples(names: list[str], data_dir, catalog: Catalog, train: list[Example], seed: int) -> list[Sample]:
    """The RL prompts of the tasks `names` (rl.tasks) with their target SIDs, task after task."""
    unknown = [n for n in names if n not in RL_TASKS]
    if unknown or not names:
        raise ConfigError(f"rl.tasks: unknown {unknown or names}; valid: {', '.join(RL_TASKS)}")
    out: list[Sample] = []
    for name in names:
        if name == "next_item":  # the SFT/eval wording (prompts.sequential_prompt)
            out += [Sample(prompts.sequential_prompt(e.history_sids), sid=e.target_sid) for e in train]
        elif name == "rl_next_item":  # SidDataset
            out += [Sample(rl_prompt(prompts.sequential_user_input(e.history_sids)), sid=e.target_sid) for e in train]
        elif name == "rl_title2sid":  # RLTitle2SidDataset: title -> SID, then description -> SID
            # (upstream's prompt also carries the answer after "### Response:\n", a leak we leave out,
            # and keeps blank descriptions, which we drop)
            text = ItemText(data_dir, catalog)
            out += [Sample(rl_prompt(prompts.alignment_user_input(t)), sid=s) for t, s in text.title2sid.items()]
            out += [Sample(rl_prompt(f'An item can be described as follows: "{d}". Which item is it describing?'),
                           sid=s) for d, s in text.description2sid.items()]
        elif name == "rl_seq_title2sid":  # RLSeqTitle2SidDataset(sample=10000)
            rows = train
            if len(train) > SEQ_TITLE2SID_SAMPLES:
                pick = np.random.default_rng(seed).choice(len(train), SEQ_TITLE2SID_SAMPLES, replace=False)
                rows = [train[i] for i in sorted(pick)]
            out += [Sample(rl_prompt(f"Given the title sequence of user historical interactive items: "
                                     f"{_quoted(e.history_titles)}, can you recommend a suitable next item for "
                                     "the user?"), sid=e.target_sid) for e in rows]
    return out


SFT_TASKS = ("next_item", "history_prefixes", "title2sid", "sid2title", "sid_history2title", "title_history2title",
             "title_history2sid")
RL_TASKS = ("next_item", "rl_next_item", "rl_title2sid", "rl_seq_title2sid")
