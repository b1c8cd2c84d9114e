"""Prompt text in MiniOneRec's format, shared by SFT, RL rollouts and evaluation.

Every example is an Alpaca-style header + `### Instruction:` block, then a `### User Input:` block
ending in the open `### Response:` line; the model answers with the SID and a newline. A `Prompt`
keeps the two blocks apart because upstream encodes them separately and concatenates the ids
(trainer.data.tokenizer.encode_prompt does the same). Wordings, as upstream's data.py writes them:
- `sft` (SidSFTDataset; SFT and RL): "The user has interacted with items ... in chronological order. ..."
- `minionerec` (EvalSidDataset, what upstream's evaluate.py scores): "Can you predict the next
  possible item the user may expect, given the following chronological interaction history: ..."
`eval.prompt` picks the evaluation wording (default `minionerec`, comparable with upstream's numbers).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

# The header ends with "request. " (trailing space) exactly as upstream writes it.
HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n\n"
)
SEQUENTIAL_INSTRUCTION = "Can you predict the next possible item that the user may expect?"
ALIGNMENT_INSTRUCTION = "Answer the question about item identification."
EVAL_PROMPTS = ("minionerec", "sft")  # values of eval.prompt


class Prompt(NamedTuple):
    instruction: str  # header + instruction block (upstream: encoded with bos=True)
    user_input: str   # `### User Input:` block through the open `### Response:\n` line

    @property
    def text(self) -> str:
        return self.instruction + self.user_input


def sequential_user_input(history_sids: Sequence[str]) -> str:
    """The `### User Input:` text of the next-item task in SFT wording (SidSFTDataset)."""
    history = ", ".join(history_sids)
    return (f"The user has interacted with items {history} in chronological order. "
            "Can you predict the next possible item that the user may expect?")


def eval_user_input(history_sids: Sequence[str]) -> str:
    """The `### User Input:` text upstream's evaluate.py scores (EvalSidDataset)."""
    return ("Can you predict the next possible item the user may expect, given the following "
            "chronological interaction history: " + ", ".join(history_sids))


def alignment_user_input(title: str) -> str:
    """The `### User Input:` text of the title -> SID item-alignment task."""
    return f"Which item has the title: {title}?"


def make_prompt(instruction: str, user_input: str) -> Prompt:
    """"### User Input: " keeps upstream's trailing space before the newline."""
    return Prompt(f"{HEADER}### Instruction:\n{instruction}\n\n",
                  f"### User Input: \n{user_input}\n\n### Response:\n")


def sequential_prompt(history_sids: Sequence[str], wording: str = "sft") -> Prompt:
    """The next-item prompt in `wording` (one of EVAL_PROMPTS)."""
    if wording == "sft":
        return make_prompt(SEQUENTIAL_INSTRUCTION, sequential_user_input(history_sids))
    if wording == "minionerec":
        return make_prompt(SEQUENTIAL_INSTRUCTION, eval_user_input(history_sids))
    raise ValueError(f"prompt wording {wording!r}: expected one of {EVAL_PROMPTS}")


def alignment_prompt(title: str) -> Prompt:
    return make_prompt(ALIGNMENT_INSTRUCTION, alignment_user_input(title))


def response_text(sid: str) -> str:
    """What the model must emit after the prompt: the SID then a newline (EOS follows in SFT)."""
    return sid + "\n"


def sequential_messages(history_sids: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages that CHAT_TEMPLATE renders (with add_generation_prompt) to sequential_prompt."""
    return [{"role": "user", "content": sequential_user_input(history_sids)}]


def alignment_messages(title: str) -> list[dict[str, str]]:
    """Chat messages that CHAT_TEMPLATE renders to alignment_prompt: the system turn is the instruction."""
    return [{"role": "system", "content": ALIGNMENT_INSTRUCTION},
            {"role": "user", "content": alignment_user_input(title)}]


# Jinja chat template (saved as chat_template.jinja) so `tokenizer.apply_chat_template` users get
# the same text: a system message replaces the instruction line (default: the sequential task),
# each user turn becomes a `### User Input:` block, an assistant turn is its content then EOS.
# Built from the constants above so the two can never drift apart.
def _jinja_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


CHAT_TEMPLATE = (
    "{%- set ns = namespace(instruction=" + _jinja_literal(SEQUENTIAL_INSTRUCTION) + ") -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.instruction = m['content'] -%}{%- endfor -%}"
    "{{- " + _jinja_literal(HEADER + "### Instruction:\n") + " + ns.instruction + '\\n\\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '### User Input: \\n' + m['content'] + '\\n\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '### Response:\\n' + m['content'] + (eos_token if eos_token is defined else '') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)
