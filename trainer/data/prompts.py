"""Prompt text in MiniOneRec's format, shared by SFT, RL rollouts and evaluation.

MiniOneRec (SidSFTDataset / SidItemFeatDataset) builds every example as an Alpaca-style header,
a `### User Input:` block and a `### Response:` block; the model answers with the SID and a
newline. The same wording is used here for all stages so the prompts the RL policy and the
evaluator see are exactly the ones SFT trained on. (Upstream's evaluate.py rephrases the
sequential question; we keep the SFT wording everywhere on purpose.)
"""
from __future__ import annotations

from collections.abc import Sequence

# The header ends with "request. " (trailing space) exactly as upstream writes it.
HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n\n"
)
SEQUENTIAL_INSTRUCTION = "Can you predict the next possible item that the user may expect?"
ALIGNMENT_INSTRUCTION = "Answer the question about item identification."


def sequential_user_input(history_sids: Sequence[str]) -> str:
    """The `### User Input:` text of the next-item task: the history SIDs joined by ", "."""
    history = ", ".join(history_sids)
    return (f"The user has interacted with items {history} in chronological order. "
            "Can you predict the next possible item that the user may expect?")


def alignment_user_input(title: str) -> str:
    """The `### User Input:` text of the title -> SID item-alignment task."""
    return f"Which item has the title: {title}?"


def format_prompt(instruction: str, user_input: str) -> str:
    """Header, instruction, user input, then the open `### Response:` line the model completes.

    "### User Input: " keeps upstream's trailing space before the newline.
    """
    return (f"{HEADER}### Instruction:\n{instruction}\n\n"
            f"### User Input: \n{user_input}\n\n### Response:\n")


def sequential_prompt(history_sids: Sequence[str]) -> str:
    return format_prompt(SEQUENTIAL_INSTRUCTION, sequential_user_input(history_sids))


def alignment_prompt(title: str) -> str:
    return format_prompt(ALIGNMENT_INSTRUCTION, alignment_user_input(title))


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
