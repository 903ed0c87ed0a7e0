"""Tokenisation throughput: cold (1 and 2 worker processes) vs read back from the on-disk cache.

    python benchmarks/tokenization.py                   # OASST threads + a generated 20k-row UltraChat-shaped file
    python benchmarks/tokenization.py --rows 2000       # a smaller generated file
    python benchmarks/tokenization.py --num-proc 1 2 4  # more worker counts

(Named tokenization.py, not tokenize.py: a script's folder comes first on sys.path, and a benchmarks/tokenize.py would
shadow the standard library's ``tokenize`` module that ``inspect`` imports.)

Each row of the table is one call of ``jaxalign.data.cache.encode_records_cached`` with the zephyr-mistral-7b
tokenizer (the test data folder's ``tokenizers/``) and the zephyr SFT recipe's lengths (max_length 2048, prompt 1024), SFT
task. "cold" tokenises and writes a fresh cache folder; "cached" reads the folder the 1-worker run wrote. Reading and
normalising the file is not timed. rows/s = records / wall seconds; the data and the timings go to a temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(os.environ.get("JAXALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def write_ultrachat_like(path: Path, rows: int, words: list[str], seed: int = 0) -> Path:
    """UltraChat-200k-shaped rows: 1-6 user/assistant exchanges (mean ~3), user turns ~70 words, assistant turns
    ~250 words (log-normal lengths), words drawn from real text so the tokenizer sees realistic pieces."""
    rng = random.Random(seed)

    def text(mean_words: float) -> str:
        n = max(3, int(rng.lognormvariate(0, 0.6) * mean_words / 1.2))
        return " ".join(rng.choice(words) for _ in range(n))

    with path.open("w") as f:
        for i in range(rows):
            messages = []
            for _ in range(min(6, max(1, int(rng.expovariate(1 / 3)) + 1))):
                messages += [{"role": "user", "content": text(70)}, {"role": "assistant", "content": text(250)}]
            f.write(json.dumps({"prompt": messages[0]["content"], "prompt_id": str(i), "messages": messages}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows of the generated UltraChat-shaped file")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--max-prompt-length", type=int, default=1024)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from jaxalign.data import cache as cache_lib
    from jaxalign.data.report import DataReport
    from jaxalign.data.sources import load_records
    from jaxalign.data.tokenize import ChatEncoder

    cache_lib.MIN_ROWS_PER_PROC = 1  # measure the worker counts asked for, even on the small file
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "zephyr-mistral-7b")
    encoder = ChatEncoder(tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    oasst = SHARED / "sft" / "oasst_en100_all_threads_messages.jsonl"
    work = Path(tempfile.mkdtemp(prefix="jaxalign-tokenize-bench-"))
    words = [w for line in oasst.read_text().splitlines() for m in json.loads(line)["messages"]
             for w in m["content"].split()]
    ultrachat = write_ultrachat_like(work / "ultrachat_like.jsonl", args.rows, words)

    print(f"zephyr-mistral-7b tokenizer, sft, max_length {args.max_length}, max_prompt_length "
          f"{args.max_prompt_length}, {os.cpu_count()} CPUs; temp dir {work}")
    print(f"| {'data':<28} | {'rows':>6} | {'tokens':>10} | {'run':<16} | {'seconds':>8} | {'rows/s':>9} |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 12}|{'-' * 18}|{'-' * 10}|{'-' * 11}|")
    for name, path in ((oasst.name.removesuffix(".jsonl"), oasst), (f"ultrachat-like {args.rows}", ultrachat)):
        records, _ = load_records(path)
        runs = [(f"cold, num_proc {n}", n, work / f"cache-{name}-{n}") for n in args.num_proc]
        runs.append(("cached", 1, work / f"cache-{name}-{args.num_proc[0]}"))
        for label, num_proc, folder in runs:
            start = time.perf_counter()
            encoded = cache_lib.encode_records_cached(records, encoder, "sft", DataReport(), cache_dir=folder,
                                                      num_proc=num_proc)
            seconds = time.perf_counter() - start
            tokens = sum(len(e.chosen) for e in encoded)
            print(f"| {name:<28} | {len(records):>6} | {tokens:>10} | {label:<16} | {seconds:>8.2f} | "
                  f"{len(records) / seconds:>9.0f} |", flush=True)


if __name__ == "__main__":
    main()
