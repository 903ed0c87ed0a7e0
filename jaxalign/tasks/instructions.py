"""Verifiable instructions in the style of IFEval ("Instruction-Following Evaluation for Large Language Models",
Zhou et al. 2023, arXiv 2311.07911): each one a sentence appended to a real prompt, a program that checks an answer
against it (IFEval's strict check), and a program that makes a real answer satisfy it.

The ``instruction_following`` task (``configs/instructions_*.yaml``, docs/results.md) builds its demonstrations with
:func:`Instruction.apply` and grades the policy's greedy answers with :func:`gold`, whose rules are fixed here:

- **strict**: the prompt's one instruction (found by its sentence, so a prompt carries its own label) is followed, as
  IFEval checks it: ``lowercase`` — no capital letter and at least one letter; ``no_comma`` — no ``,``;
  ``end_phrase`` — the stripped answer ends with :data:`END_PHRASE` (case-insensitive, as IFEval); ``quotation`` —
  starts and ends with ``"``; ``json_answer`` — parses as a JSON object (optionally inside markdown fences) with a
  string under ``"answer"``; ``three_bullets`` — exactly three lines starting with ``* `` or ``- `` (IFEval counts
  markdown bullets with those regexes).
- **guard** (the answer is still an answer): its content — the answer without the instruction's scaffolding (the
  phrase, the quotes, the JSON wrapper, the bullet marks) — has at least :data:`MIN_WORDS` words, and at least
  :data:`MIN_DISTINCT` of its words are distinct (a repetition loop fails).
- ``gold = strict and guard`` (1 or 0 per answer); the eval phase reports its mean and the two parts.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable

END_PHRASE = "Is there anything else I can help with?"
MIN_WORDS = 4
MIN_DISTINCT = 0.4

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
_BULLET = re.compile(r"^\s*[*-]\s+(.*\S)\s*$")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def sentences(text: str) -> list[str]:
    """Sentence split on ``.``, ``!`` or ``?`` followed by white space and a capital, digit or quote."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _json_answer(text: str) -> str | None:
    body = text.strip()
    fenced = _FENCE.match(body)
    try:
        obj = json.loads(fenced.group(1) if fenced else body)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("answer"), str):
        return obj["answer"]
    return None


def _bullets(text: str) -> list[str]:
    return [m.group(1) for line in text.strip().splitlines() if (m := _BULLET.match(line))]


def _no_comma(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    return re.sub(r"\s*,\s*", " ", text).strip()


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One verifiable instruction: its sentence in the prompt, how a demonstration is made to follow it, the strict
    check, and the content left once its scaffolding is removed (what the guard reads)."""

    name: str
    sentence: str
    make: Callable[[list[str]], str | None]  # the answer's sentences -> the demonstration (None: not applicable)
    follows: Callable[[str], bool]
    content: Callable[[str], str]

    def apply(self, answer_sentences: list[str]) -> str | None:
        return self.make(answer_sentences)


INSTRUCTIONS: dict[str, Instruction] = {i.name: i for i in (
    Instruction(
        "lowercase",
        "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
        make=lambda s: " ".join(s).lower(),
        follows=lambda a: a == a.lower() and any(c.isalpha() for c in a),
        content=lambda a: a),
    Instruction(
        "no_comma",
        "In your entire response, refrain from the use of any commas.",
        make=lambda s: _no_comma(" ".join(s)),
        follows=lambda a: "," not in a,
        content=lambda a: a),
    Instruction(
        "end_phrase",
        f"Finish your response with this exact phrase: {END_PHRASE} No other words should follow this phrase.",
        make=lambda s: " ".join(s) + "\n\n" + END_PHRASE,
        follows=lambda a: a.strip().lower().endswith(END_PHRASE.lower()),
        content=lambda a: a.strip()[: len(a.strip()) - len(END_PHRASE)] if a.strip().lower().endswith(
            END_PHRASE.lower()) else a),
    Instruction(
        "quotation",
        "Wrap your entire response with double quotation marks.",
        make=lambda s: '"' + " ".join(s) + '"',
        follows=lambda a: len(a.strip()) > 1 and a.strip()[0] == '"' and a.strip()[-1] == '"',
        content=lambda a: a.strip().strip('"')),
    Instruction(
        "json_answer",
        'Wrap your entire answer in a JSON object with the single key "answer".',
        make=lambda s: json.dumps({"answer": " ".join(s)}),
        follows=lambda a: _json_answer(a) is not None,
        content=lambda a: _json_answer(a) or a),
    Instruction(
        "three_bullets",
        "Your answer must contain exactly 3 bullet points. Use the markdown bullet points such as:\n* This is point 1.",
        make=lambda s: "\n".join("* " + x for x in s[:3]) if len(s) >= 3 else None,
        follows=lambda a: len(_bullets(a)) == 3,
        content=lambda a: " ".join(_bullets(a)) or a),
)}


def instruction_of(prompt: str) -> Instruction | None:
    """The instruction whose sentence the prompt carries (the last one, if several), or None."""
    found = [(prompt.rfind(i.sentence), i) for i in INSTRUCTIONS.values() if i.sentence in prompt]
    return max(found, key=lambda x: x[0])[1] if found else None


def guard(content: str) -> bool:
    words = re.findall(r"\w+", content.lower())
    return len(words) >= MIN_WORDS and len(set(words)) >= MIN_DISTINCT * len(words)


def grade(prompt: str, answer: str) -> dict[str, float]:
    """``{"gold", "strict", "guard"}`` for one answer (each 0.0 or 1.0); ValueError when the prompt has no
    instruction."""
    ins = instruction_of(prompt)
    if ins is None:
        raise ValueError(f"no verifiable instruction in the prompt {prompt[:200]!r}")
    strict = ins.follows(answer)
    ok = guard(ins.content(answer))
    return {"gold": float(strict and ok), "strict": float(strict), "guard": float(ok)}


def gold(prompt: str, answer: str) -> float:
    return grade(prompt, answer)["gold"]
