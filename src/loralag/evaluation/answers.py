"""The short answer in a generation and the fact-checking verdict in it: the cleaning every evaluation
shares (`loralag eval`, `loralag bench`).
"""

from __future__ import annotations

import re

SUPPORTS, REFUTES = "SUPPORTS", "REFUTES"  # FEVER's labels, as KILT scores them

# Answers are read from their first line only, so a sequence stops there (a batch ends when all have).
# A generation that opens with a newline is thus an empty answer: the base model's are empty for 160 of the
# full run's 600 questions (159 of them QA), where it ends the line or the text at once.
ANSWER_STOP = ("\n",)

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]]{3})\.(?:\s|$)")


def clean_answer(text: str) -> str:
    """The short answer in a generation: its first non-empty line, cut at the first sentence end.

    A period ends a sentence only after 3+ lower-case letters/digits ("Paris. It" -> "Paris"), so "St. Louis"
    and "U.S. Army" stay whole."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    first = lines[0]
    m = _SENTENCE_END.search(first)
    if m:
        first = first[: m.start()]
    return first.strip().rstrip(".").strip()


def fc_label(answer: str) -> str:
    """The fact-checking verdict: SUPPORTS / REFUTES when the answer starts with one (any case), else the last one
    it names as a word (a verdict after a rationale: "Paris, so SUPPORTS"), else the answer as is."""
    head = answer.strip().upper()
    for label in (SUPPORTS, REFUTES):
        if head.startswith(label):
            return label
    named = re.findall(rf"\b({SUPPORTS}|{REFUTES})\b", head)
    return named[-1] if named else answer.strip()


def credited(answer: str, golds: list[str]) -> str:
    """The gold answer whose normalised form starts the normalised answer at a word boundary, else the answer."""
    from loralag.evaluation.kilt import normalize_answer

    a = normalize_answer(answer)
    for g in golds:
        ng = normalize_answer(g)
        if ng and (a == ng or a.startswith(ng + " ")):
            return g
    return answer
