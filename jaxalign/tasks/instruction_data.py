"""Build the ``instruction_following`` task's data from real prompts and answers (any format jaxalign reads).

Each single-turn row gets one verifiable instruction (:mod:`jaxalign.tasks.instructions`) appended to its prompt, and
its real answer is made to follow it by that instruction's stated program. The rules, fixed before any run:

- **the answer's content**: its first paragraph (text before the first blank or list line), split into sentences;
  the leading sentences that fit in :data:`MAX_CHARS` characters (at least one; the last one complete). Rows whose
  first sentence is longer, shorter than 4 words, or whose answer holds code or a URL are skipped; so are prompts
  over :data:`MAX_PROMPT_CHARS` characters (short sequences keep a CPU run affordable);
- **the instruction**: rows are shuffled with the seed; each takes the least-dealt instruction so far that applies to
  it (``three_bullets`` needs three sentences), ties broken in the registry's order;
- **the demonstration** = ``instruction.apply(sentences)``, the content of the human / GPT-4 answer unchanged apart
  from what the instruction asks (lower case, commas removed, the phrase appended, quotes, a JSON wrapper, bullets).

Written as UltraChat ``messages`` rows (``{"prompt", "prompt_id", "instruction", "messages"}``):

    python -m jaxalign.tasks.instruction_data --train alpaca.jsonl hh_helpful.jsonl --eval alpaca_eval.jsonl \\
        --out data/instructions

``--train`` / ``--eval`` take anything ``data.train.source`` takes (hub ids included: ``tatsu-lab/alpaca_eval``,
``Anthropic/hh-rlhf`` with ``--format hh``); ``--eval`` rows are held out (their prompts answer the eval phase).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from jaxalign.data.sources import load_records
from jaxalign.tasks.instructions import INSTRUCTIONS, sentences

MAX_CHARS = 300
MAX_PROMPT_CHARS = 400
MIN_WORDS = 4
_LIST_LINE = re.compile(r"\n\s*(?:\d+[.)]|[-*\u2022])\s")
_SKIP = ("```", "http://", "https://", "www.")


def content_sentences(answer: str) -> list[str] | None:
    """The answer's leading sentences within MAX_CHARS (None: the row is skipped)."""
    if any(s in answer for s in _SKIP):
        return None
    first = re.split(r"\n\s*\n", answer.strip(), maxsplit=1)[0]
    if _LIST_LINE.match("\n" + first):  # an answer that starts with a list has no prose to keep
        return None
    text = " ".join(_LIST_LINE.split(first, maxsplit=1)[0].split())
    out: list[str] = []
    for s in sentences(text):
        if len(" ".join(out + [s])) > MAX_CHARS:
            break
        out.append(s)
    if not out or len(out[0].split()) < MIN_WORDS or out[-1][-1] not in ".!?\"'":
        return None
    return out


def build_rows(records, seed: int, prefix: str) -> list[dict]:
    """``messages`` rows with an instruction each, from single-turn records with a demonstration."""
    eligible = []
    for r in records:
        if len(r.prompt) != 1 or r.prompt[0].role != "user" or not r.demonstration:
            continue
        prompt = r.prompt[0].content.strip()
        content = content_sentences(r.demonstration)
        if content is not None and 0 < len(prompt) <= MAX_PROMPT_CHARS:
            eligible.append((prompt, content))
    random.Random(seed).shuffle(eligible)
    dealt = dict.fromkeys(INSTRUCTIONS, 0)
    rows = []
    for i, (prompt, content) in enumerate(eligible):
        # the least-dealt instruction that applies (ties: the registry's order), so the mix stays balanced
        ins, demo = min(((INSTRUCTIONS[n], INSTRUCTIONS[n].apply(content)) for n in dealt),
                        key=lambda x: (x[1] is None, dealt[x[0].name]))
        dealt[ins.name] += 1
        text = f"{prompt} {ins.sentence}"
        rows.append({"prompt_id": f"{prefix}_{i}", "prompt": text, "instruction": ins.name,
                     "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": demo}]})
    return rows


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(train_sources: list[str], eval_sources: list[str], out: Path, *, seed: int = 0,
          fmt: str = "auto") -> dict[str, int]:
    """Write ``out/train.jsonl`` and ``out/eval.jsonl``; returns their row counts (and each instruction's)."""
    def records(sources):
        return [r for s in sources for r in load_records(s, format=fmt)[0]]

    train = build_rows(records(train_sources), seed, "train")
    held = build_rows(records(eval_sources), seed + 1, "eval")
    seen = {r["prompt"] for r in train}
    held = [r for r in held if r["prompt"] not in seen]
    write(train, out / "train.jsonl")
    write(held, out / "eval.jsonl")
    counts = {"train": len(train), "eval": len(held)}
    for name in INSTRUCTIONS:
        counts[f"train_{name}"] = sum(r["instruction"] == name for r in train)
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", nargs="+", required=True, help="demonstration sources (files, folders or hub ids)")
    ap.add_argument("--eval", nargs="+", required=True, help="held-out sources: the eval phase's prompts")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="auto", help="the sources' format (auto, messages, hh, ...)")
    a = ap.parse_args(argv)
    print(json.dumps(build(a.train, a.eval, a.out, seed=a.seed, fmt=a.format)))


if __name__ == "__main__":
    main()
