"""The self-generated task behind the embedded CPU demo (``configs/demo_cpu``).

Three small string tasks, mixed in equal parts, each with a gold answer computed from the prompt:

- ``reverse: gjbe``  -> ``ebjg``   (reverse 3-6 letters drawn from a-j)
- ``sort: dbca``     -> ``abcd``   (sort them)
- ``add: 37+48``     -> ``85``     (add two numbers below 100)

They are short (a prompt renders to at most 22 tokens, a response to at most 7 with EOS) and the demo's 0.4M-parameter
decoder learns them only partly in a few hundred SFT steps (greedy on the test prompts, lr 3e-3: gold score 0.38 and 9%
exact after 200 steps at batch 16, 0.44 and 17% after 150 steps at batch 32; sorting best, addition worst), which
leaves room for the IRL rounds to improve a graded score.

``gold_score(prompt, response)`` is exact for any response string: the number of positions where the (whitespace-
stripped) response agrees with the gold answer, divided by the longer of the two lengths. It is 1.0 exactly on the gold
answer, 0.0 on an empty response, and for a response of the gold answer's length it is the fraction of correct
characters; extra or missing characters cost like wrong ones.

``build_demo_assets(out_dir)`` writes everything the demo needs, without network: the demonstrations (UltraChat
``messages`` format), held-out preference pairs (UltraFeedback-binarized format; chosen = gold, rejected = gold with one
or two characters changed), a character-level tokenizer with a zephyr-like chat template, and a random-init tiny Llama
saved with ``jaxalign.models.save_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

TASK_NAME = "reverse_sort_add"
KINDS = ("reverse", "sort", "add")
FORMAT_VERSION = 1
ARGS_FILE = "demo_task.json"

LETTERS = string.ascii_lowercase
DIGITS = string.digits

# Special tokens; role markers are single tokens so the chat template tokenises the same whole or in pieces.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_PATTERNS = {
    "reverse": re.compile(r"reverse: ([a-z]{1,16})(?![a-z])"),
    "sort": re.compile(r"sort: ([a-z]{1,16})(?![a-z])"),
    "add": re.compile(r"add: (\d{1,4})\+(\d{1,4})(?!\d)"),
}


# ------------------------------------------------------------------------------------------------------ the task
def _prompt_text(prompt: Any) -> str:
    """The user text of ``prompt``: a string, or a list of chat messages (the last user turn is taken)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        for m in reversed(prompt):
            role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
            content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            if role == "user" and isinstance(content, str):
                return content
    raise ValueError(f"not a demo-task prompt: {prompt!r}")


def parse_prompt(prompt: Any) -> tuple[str, tuple[str, ...]]:
    """``(kind, arguments)`` of a task prompt (``"reverse: abc"`` -> ``("reverse", ("abc",))``); raises ValueError.

    The pattern is searched for, so a prompt rendered through the chat template is understood too.
    """
    text = _prompt_text(prompt)
    found = [(m.start(), kind, m.groups()) for kind, pat in _PATTERNS.items() if (m := pat.search(text))]
    if not found:
        raise ValueError(f"not a demo-task prompt (expected 'reverse: <letters>', 'sort: <letters>' or "
                         f"'add: <a>+<b>'): {text[:80]!r}")
    _, kind, args = min(found)
    return kind, tuple(args)


def gold_answer(prompt: Any) -> str:
    """The correct response to a task prompt."""
    kind, args = parse_prompt(prompt)
    if kind == "reverse":
        return args[0][::-1]
    if kind == "sort":
        return "".join(sorted(args[0]))
    return str(int(args[0]) + int(args[1]))


def score_against(gold: str, response: Any) -> float:
    """Per-position agreement of ``response`` (whitespace-stripped) with ``gold``, over the longer length."""
    if not isinstance(response, str):
        return 0.0
    response = response.strip()
    longest = max(len(gold), len(response))
    if longest == 0:
        return 1.0
    matches = sum(a == b for a, b in zip(gold, response))
    return matches / longest


def gold_score(prompt: Any, response: Any) -> float:
    """Exact graded score in [0, 1] of ``response`` to ``prompt`` (1.0 iff it equals the gold answer after stripping
    surrounding whitespace). Never raises on the response; raises ValueError if ``prompt`` is not a task prompt."""
    return score_against(gold_answer(prompt), response)


def mean_gold_score(prompts: Iterable[Any], responses: Iterable[Any]) -> dict[str, float]:
    """``{"gold_score": mean, "exact_match": fraction, "gold_score/<kind>": mean per kind}`` over paired lists."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    per_kind: dict[str, list[float]] = {}
    scores, exact = [], []
    for p, r in zip(prompts, responses):
        gold = gold_answer(p)
        s = score_against(gold, r)
        scores.append(s)
        exact.append(float(s == 1.0))
        per_kind.setdefault(parse_prompt(p)[0], []).append(s)
    out = {"gold_score": sum(scores) / max(len(scores), 1), "exact_match": sum(exact) / max(len(exact), 1)}
    out.update({f"gold_score/{k}": sum(v) / len(v) for k, v in sorted(per_kind.items())})
    return out


# ------------------------------------------------------------------------------------------------------ the data
def make_prompt(rng: random.Random, kind: str, *, min_letters: int = 3, max_letters: int = 6,
                alphabet: str = LETTERS, max_addend: int = 99) -> str:
    if kind in ("reverse", "sort"):
        n = rng.randint(min_letters, max_letters)
        return f"{kind}: " + "".join(rng.choice(alphabet) for _ in range(n))
    if kind == "add":
        return f"add: {rng.randint(0, 99)}+{rng.randint(0, max_addend)}"
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def corrupt(gold: str, rng: random.Random, kind: str, alphabet: str | None = None) -> str:
    """A plausible wrong answer: ``gold`` with one or two characters changed (or two neighbours swapped).

    Substitutes come from ``alphabet`` (default: digits for ``add``, else the letters ``gold`` is made of plus their
    neighbours in the alphabet), so a wrong answer never gives itself away by a character the task never uses.
    """
    if alphabet is None:
        if kind == "add":
            alphabet = DIGITS
        else:
            near = {LETTERS[j] for c in gold if c in LETTERS
                    for j in range(max(LETTERS.index(c) - 1, 0), min(LETTERS.index(c) + 2, len(LETTERS)))}
            alphabet = "".join(sorted(near | set(gold)))
    chars = list(gold)
    swappable = [i for i in range(len(chars) - 1) if chars[i] != chars[i + 1]]
    if swappable and rng.random() < 0.3:
        i = rng.choice(swappable)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    else:
        for i in rng.sample(range(len(chars)), min(len(chars), rng.choice((1, 2)))):
            chars[i] = rng.choice([c for c in alphabet if c != chars[i]])
    out = "".join(chars)
    assert out != gold
    return out


def _messages_row(prompt: str, i: int, split: str) -> dict:
    return {
        "prompt": prompt,
        "prompt_id": f"{split}-{i}",
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": gold_answer(prompt)}],
    }


def _pref_row(prompt: str, i: int, rng: random.Random, alphabet: str) -> dict:
    kind, _ = parse_prompt(prompt)
    gold = gold_answer(prompt)
    bad = corrupt(gold, rng, kind, None if kind == "add" else alphabet)
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "prompt_id": f"heldout-{i}",
        "chosen": [user, {"role": "assistant", "content": gold}],
        "rejected": [user, {"role": "assistant", "content": bad}],
        "score_chosen": 1.0,
        "score_rejected": score_against(gold, bad),
    }


def generate_prompts(n: int, rng: random.Random, kinds: Sequence[str] = KINDS, **kw) -> list[str]:
    """``n`` distinct prompts, the ``kinds`` in turn (equal shares)."""
    seen: set[str] = set()
    out: list[str] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct prompts with {kw}")
        p = make_prompt(rng, kinds[len(out) % len(kinds)], **kw)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(vocab_multiple: int = 64):
    """A character-level ``PreTrainedTokenizerFast`` (printable ASCII + special tokens, padded with unused special
    tokens to a multiple of ``vocab_multiple`` so that every id the model can emit decodes) with the chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))  # covers every character of the task text
    n_base = len(SPECIAL_TOKENS) + len(chars)
    n_total = -(-n_base // vocab_multiple) * vocab_multiple
    fillers = [f"<unused{i}>" for i in range(n_total - n_base)]
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + chars + fillers)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in list(SPECIAL_TOKENS) + fillers])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


# ------------------------------------------------------------------------------------------------------ assets
@dataclasses.dataclass(frozen=True)
class DemoAssets:
    """Where ``build_demo_assets`` put things."""

    root: Path
    model_dir: Path
    tokenizer_dir: Path
    train_file: Path
    test_file: Path
    heldout_prefs_file: Path
    task: str = TASK_NAME
    args: dict = dataclasses.field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.train_file.parent


def _assets(root: Path, args: dict) -> DemoAssets:
    return DemoAssets(
        root=root,
        model_dir=root / "model",
        tokenizer_dir=root / "tokenizer",
        train_file=root / "data" / "train.jsonl",
        test_file=root / "data" / "test.jsonl",
        heldout_prefs_file=root / "data" / "heldout_prefs.jsonl",
        task=TASK_NAME,
        args=args,
    )


def _complete(a: DemoAssets) -> bool:
    files = (a.train_file, a.test_file, a.heldout_prefs_file, a.model_dir / "config.json",
             a.tokenizer_dir / "tokenizer.json", a.tokenizer_dir / "tokenizer_config.json")
    return all(f.is_file() for f in files) and any(a.model_dir.glob("*.safetensors"))


def build_demo_assets(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 600,
    n_test: int = 150,
    n_heldout: int = 150,
    min_letters: int = 3,
    max_letters: int = 6,
    alphabet_size: int = 10,
    max_addend: int = 99,
    kinds: str = ",".join(KINDS),
    hidden_size: int = 128,
    intermediate_size: int = 384,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 128,
    force: bool = False,
) -> DemoAssets:
    """Write the demo's data, tokenizer and random-init model under ``out_dir`` and return their paths.

    Idempotent: the arguments are recorded in ``out_dir/demo_task.json`` (written last); a folder already built with
    the same arguments is reused as is, one built with others (or left half-written) is rebuilt. Held-out pairs use
    the test prompts (cycling if ``n_heldout > n_test``), never training prompts.
    """
    root = Path(out_dir)
    args = dict(
        version=FORMAT_VERSION, task=TASK_NAME, seed=seed, n_train=n_train, n_test=n_test, n_heldout=n_heldout,
        min_letters=min_letters, max_letters=max_letters, alphabet_size=alphabet_size,
        max_addend=max_addend, kinds=kinds, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
    )
    if n_train < 1 or n_test < 1 or n_heldout < 0:
        raise ValueError(f"need n_train >= 1, n_test >= 1, n_heldout >= 0; got {n_train}, {n_test}, {n_heldout}")
    if not 1 <= min_letters <= max_letters <= 16:
        raise ValueError(f"need 1 <= min_letters <= max_letters <= 16; got {min_letters}, {max_letters}")
    if not 2 <= alphabet_size <= 26 or not 0 <= max_addend <= 9999:
        raise ValueError(f"need 2 <= alphabet_size <= 26 and 0 <= max_addend <= 9999; got {alphabet_size}, "
                         f"{max_addend}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size {hidden_size} must divide by num_heads {num_heads}, and num_heads by "
                         f"num_kv_heads {num_kv_heads}")
    kind_list = tuple(k.strip() for k in kinds.split(","))
    if not kind_list or any(k not in KINDS for k in kind_list):
        raise ValueError(f"kinds must be a comma-separated subset of {KINDS}; got {kinds!r}")
    assets = _assets(root, args)
    record = root / ARGS_FILE
    if not force and record.is_file() and _complete(assets):
        try:
            if json.loads(record.read_text()) == args:
                return assets
        except json.JSONDecodeError:
            pass

    # (Re)build from scratch; the argument record goes last so a half-written folder is never reused.
    record.unlink(missing_ok=True)
    for sub in ("data", "tokenizer", "model"):
        shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    prompts = generate_prompts(n_train + n_test, rng, kind_list, min_letters=min_letters, max_letters=max_letters,
                               alphabet=LETTERS[:alphabet_size], max_addend=max_addend)
    rng.shuffle(prompts)
    train, test = prompts[:n_train], prompts[n_train:]
    _write_jsonl(assets.train_file, (_messages_row(p, i, "train") for i, p in enumerate(train)))
    _write_jsonl(assets.test_file, (_messages_row(p, i, "test") for i, p in enumerate(test)))
    pref_rng = random.Random(seed + 1)
    _write_jsonl(assets.heldout_prefs_file,
                 (_pref_row(test[i % len(test)], i, pref_rng, LETTERS[:alphabet_size]) for i in range(n_heldout)))

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(assets.tokenizer_dir))

    from jaxalign.models import ModelConfig

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        sliding_windows=(None,) * num_layers,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    save_random_model(cfg, assets.model_dir, seed=seed)
    record.write_text(json.dumps(args, indent=1) + "\n")
    return assets


def save_random_model(cfg, folder: str | Path, *, seed: int = 0, std: float = 0.02) -> Path:
    """Save a random-init ``Decoder`` for ``cfg`` with ``jaxalign.models.save_pretrained``.

    Same initialisation as ``jaxalign.models.init_params`` (normal(0, std) matrices, ones for norm scales, zeros for
    biases) but drawn with numpy: on a busy CPU, compiling a JAX random op per parameter shape costs tens of seconds.
    """
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.models import Decoder, param_shapes, save_pretrained

    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in sorted(param_shapes(cfg).items()):
        if name in ("final_norm", "attn_norm", "mlp_norm", "q_norm", "k_norm"):
            value = np.ones(shape, np.float32)
        elif name.startswith("b") or name.endswith("_bias"):
            value = np.zeros(shape, np.float32)
        else:
            value = (std * rng.standard_normal(shape)).astype(np.float32)
        params[name] = jnp.asarray(value, cfg.param_dtype)
    return save_pretrained(Decoder(cfg, params), folder)
