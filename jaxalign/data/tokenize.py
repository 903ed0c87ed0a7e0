"""Records -> token ids through the tokenizer's chat template, with completion-only loss masks.

Contract:

- Every sequence is ``prompt_ids + response_ids``, where ``prompt_ids`` is exactly what the sampler is given (it ends
  with the template's generation prompt) and the response ends with EOS. ``mask[t]`` is True iff token ``t`` belongs to
  an assistant turn being trained on (its text and its closing EOS), aligned with the ids (shifting to targets is the
  loss's job). SFT trains every assistant turn of a conversation; pairs train only the final response.
- BOS appears exactly once at the front when the tokenizer uses one: it is prepended only if the rendered template does
  not already hold it and the tokenizer adds it under ``add_special_tokens=True`` (the zephyr template adds no
  BOS while zephyr training tokenised with special tokens, so it gets one). EOS closes every assistant turn exactly
  once: where the template already ends the turn with ``eos_token`` nothing is added.
- Technique: render progressively (the conversation up to each assistant turn with ``add_generation_prompt=True``,
  then through that turn; the turn is the suffix), tokenise each segment with ``add_special_tokens=False`` in the
  context of the previous segment so that the concatenation matches how the whole text tokenises (SentencePiece
  tokenizers would otherwise put a spurious word-start marker on every segment).
- Truncation: with ``max_prompt_length`` the prompt keeps its END (BOS stays in front); with ``max_length`` the
  response keeps its START. A row whose prompt leaves no room for a response token is skipped; truncated rows are
  counted. Message contents that contain a special-token string (e.g. a literal ``</s>``) would be encoded as control
  tokens, so such rows are skipped and counted instead of silently corrupting the EOS layout.
- Where a response ends (``completion_end``): ``"eos"`` (the default) ends it with its closing EOS, the template's
  trailing glue (zephyr's newline after ``</s>``) left out, so a demonstration ends exactly as a sampled response
  does; ``"template"`` trains everything the template renders after the prompt, trailing glue included, as TRL's
  DPOTrainer / RewardTrainer / SFTTrainer (1.x) tokenise conversational data; sampled responses then get the same
  glue after their EOS (``encode_sampled``), so demonstrations and samples still end alike.
- ``encode`` returns an ``EncodedRecord`` or a ``Skip``; it never raises on row content. A tokenizer without a chat
  template raises ``DataError`` when the encoder is built, unless ``chat_template`` names one explicitly.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import jinja2
import numpy as np

from jaxalign.data.formats import Message, Record, Skip
from jaxalign.data.report import DataError, DataReport

TASKS = ("sft", "pairs", "prompt")
COMPLETION_ENDS = ("eos", "template")

# Built-in templates for tokenizers that ship none; used only when asked for by name.
FALLBACK_TEMPLATES = {
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
        "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


@dataclasses.dataclass(frozen=True)
class EncodedSequence:
    """Full sequence ``ids`` (int32 [T]) and its loss ``mask`` (bool [T], True on trained assistant tokens)."""

    ids: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class EncodedRecord:
    """A record after tokenisation. ``prompt_ids`` is a prefix of both sequences; ``changes`` lists truncations."""

    row_id: int
    record_id: str
    prompt_ids: np.ndarray
    chosen: EncodedSequence | None = None
    rejected: EncodedSequence | None = None
    changes: tuple[tuple[str, str], ...] = ()


class _TokenSkip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.skip = Skip(reason, detail)


def resolve_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """The template to render with: ``chat_template`` (a name from ``FALLBACK_TEMPLATES`` or a Jinja string) if
    given, else the tokenizer's own; raises ``DataError`` when there is none."""
    if chat_template:
        return FALLBACK_TEMPLATES.get(chat_template, chat_template)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chat models are trained with
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"The tokenizer {name!r} has no chat template, and jaxalign renders every example through one (the loss "
            "masks come from it). Use the tokenizer of a chat/instruct model, or choose a template explicitly with "
            f"chat_template=<Jinja string> or one of the built-in names {sorted(FALLBACK_TEMPLATES)}."
        )
    return template


class ChatEncoder:
    """Tokenises records with a chat template; see the module docstring for the contract.

    ``tokenizer`` is a transformers tokenizer. ``max_length`` bounds every full sequence, ``max_prompt_length`` the
    prompt (both optional). ``pad_id`` is the tokenizer's pad token, else EOS.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        chat_template: str | None = None,
        completion_end: str = "eos",
    ):
        if completion_end not in COMPLETION_ENDS:
            raise DataError(f"completion_end={completion_end!r}: choose one of {', '.join(COMPLETION_ENDS)}.")
        self.completion_end = completion_end
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)
        if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
            raise DataError(f"The tokenizer {tokenizer.name_or_path!r} has no EOS token; responses cannot be closed.")
        if max_length is not None and max_length < 2:
            raise DataError(f"max_length={max_length} leaves no room for a prompt and a response token.")
        if max_prompt_length is not None and max_prompt_length < 1:
            raise DataError(f"max_prompt_length={max_prompt_length} must be at least 1.")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise DataError(
                f"max_prompt_length={max_prompt_length} must be smaller than max_length={max_length} "
                "so that at least one response token fits."
            )
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.eos_token: str = tokenizer.eos_token
        self.eos_id: int = int(tokenizer.eos_token_id)
        self.bos_token: str | None = tokenizer.bos_token
        self.bos_id: int | None = None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
        self.pad_id: int = self.eos_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
        self._adds_bos = self._tokenizer_adds_bos()
        specials = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
        specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        # Longest first so that the reported token is the whole one, not a prefix of it.
        self._special_re = (
            re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))) if specials else None
        )

    def _tokenizer_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        with_special = self._ids("a", add_special_tokens=True)
        return with_special[:1] == [self.bos_id] and self._ids("a")[:1] != [self.bos_id]

    # ------------------------------------------------------------------------------------------------ primitives
    def _ids(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])

    def _ids_after(self, context: str, text: str) -> list[int]:
        """Ids of ``text`` as it tokenises right after ``context`` (falls back to ``text`` alone at a merge)."""
        if not context:
            return self._ids(text)
        before = self._ids(context)
        both = self._ids(context + text)
        if both[: len(before)] == before:
            return both[len(before):]
        # A token would straddle the boundary: the prompt must stay a clean prefix, so tokenise the segment alone.
        return self._ids(text)

    def _render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            [m.as_dict() for m in messages],
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        if not isinstance(text, str):
            raise _TokenSkip("template_error", f"the chat template rendered {type(text).__name__}, not text")
        return text

    def _turn(self, span: str) -> tuple[str, int]:
        """(assistant turn text through its EOS, length of the rendered text it covers); trailing glue excluded."""
        i = span.find(self.eos_token)
        if i >= 0:
            return span[: i + len(self.eos_token)], i + len(self.eos_token)
        body = span.rstrip()
        return body + self.eos_token, len(body)

    # ---------------------------------------------------------------------------------------------------- layout
    def _prompt_segments(self, prompt: Sequence[Message]) -> tuple[list[tuple[str, bool]], str]:
        """Text segments of the prompt as (text, is_assistant_turn), ending with the generation prompt, plus the
        rendered prompt text (needed to find the response's suffix)."""
        segments: list[tuple[str, bool]] = []
        done, covered = "", 0  # rendered text so far; how much of it the segments already hold
        for a in [i for i, m in enumerate(prompt) if m.role == "assistant"]:
            pre, post = self._render(prompt[:a], True), self._render(prompt[: a + 1], False)
            self._check_prefix(done, pre, a)
            self._check_prefix(pre, post, a)
            segments.append((pre[covered:], False))
            text, length = self._turn(post[len(pre):])
            segments.append((text, True))
            done, covered = post, len(pre) + length
        final = self._render(prompt, True)
        self._check_prefix(done, final, len(prompt))
        segments.append((final[covered:], False))
        return segments, final

    def _response_text(self, prompt: Sequence[Message], rendered_prompt: str, response: str) -> str:
        post = self._render(tuple(prompt) + (Message("assistant", response),), False)
        self._check_prefix(rendered_prompt, post, len(prompt))
        if self.completion_end == "template":
            return post[len(rendered_prompt):]
        return self._turn(post[len(rendered_prompt):])[0]

    @staticmethod
    def _check_prefix(prefix: str, text: str, turn: int) -> None:
        if not text.startswith(prefix):
            raise _TokenSkip(
                "template_not_prefix_stable",
                f"rendering through message {turn} changes the text of the earlier turns, so the loss mask cannot be "
                "derived by rendering progressively",
            )

    def _check_contents(self, named: Iterable[tuple[str, str]]) -> None:
        if self._special_re is None:
            return
        for where, content in named:
            found = self._special_re.search(content)
            if found:
                raise _TokenSkip(
                    "special_token_in_content",
                    f"{where} contains the special token {found.group()!r}, which would be encoded as a control token",
                )

    def _prompt_part(
        self, prompt: Sequence[Message], train_earlier_turns: bool
    ) -> tuple[np.ndarray, np.ndarray, str, str]:
        """(prompt ids ending with the generation prompt, their mask, the last segment's text as tokenisation
        context for the response, the rendered prompt)."""
        segments, rendered = self._prompt_segments(prompt)
        ids: list[int] = []
        mask: list[bool] = []
        context = ""
        for text, is_turn in segments:
            piece = self._ids_after(context, text)
            ids += piece
            mask += [is_turn and train_earlier_turns] * len(piece)
            context = text or context
        # Token-level test, not text: a template may emit BOS after leading whitespace, and contents cannot hold it.
        if self._adds_bos and self.bos_id not in ids:
            ids, mask = [self.bos_id] + ids, [False] + mask
        if mask:
            mask[0] = False  # never a target; keeps packed documents from scoring the next document's first token
        return np.asarray(ids, np.int32), np.asarray(mask, bool), context, rendered

    # ---------------------------------------------------------------------------------------------------- public
    def encode_prompt(self, prompt: Sequence[Message]) -> np.ndarray | Skip:
        """Prompt ids for the sampler (ending with the generation prompt, left-truncated to ``max_prompt_length``),
        or a ``Skip``. Same ids as ``encode(record, "prompt").prompt_ids``."""
        record = Record(index=-1, id="prompt", prompt=tuple(prompt))
        result = self.encode(record, "prompt")
        return result if isinstance(result, Skip) else result.prompt_ids

    def encode(self, record: Record, task: str = "sft") -> EncodedRecord | Skip:
        """Tokenise one record for ``task``: ``"sft"`` (the demonstration, every assistant turn trained), ``"pairs"``
        (chosen and rejected, final turn trained) or ``"prompt"`` (prompt ids only, for sampling)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        try:
            return self._encode(record, task)
        except _TokenSkip as skip:
            return skip.skip
        except jinja2.TemplateError as err:  # the template's own raise_exception(...) lands here
            return Skip("template_error", f"the chat template rejected the conversation: {err}")

    def _encode(self, record: Record, task: str) -> EncodedRecord | Skip:
        if task == "pairs" and not record.is_pair:
            return Skip("not_a_pair", "the record has no chosen/rejected pair")
        responses = {"sft": [record.demonstration], "pairs": [record.chosen, record.rejected], "prompt": []}[task]
        if task == "sft" and record.demonstration is None:
            return Skip("no_response", "the record has neither chosen nor reference response")
        names = {"sft": ["response"], "pairs": ["chosen", "rejected"], "prompt": []}[task]
        self._check_contents(
            [(f"prompt[{i}]", m.content) for i, m in enumerate(record.prompt)] + list(zip(names, responses))
        )
        prompt_ids, prompt_mask, context, rendered = self._prompt_part(record.prompt, task == "sft")
        changes = []
        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            keep = self.max_prompt_length
            head = 1 if keep > 1 and self.bos_id is not None and prompt_ids[0] == self.bos_id else 0
            # The end holds the latest turns and the generation prompt; BOS stays in front.
            prompt_ids = np.concatenate([prompt_ids[:head], prompt_ids[len(prompt_ids) - (keep - head):]])
            prompt_mask = np.concatenate([prompt_mask[:head], prompt_mask[len(prompt_mask) - (keep - head):]])
            prompt_mask[0] = False
            changes.append(("prompt_truncated", f"prompt cut to its last {keep} tokens"))
        if self.max_length is not None and len(prompt_ids) >= self.max_length:
            return Skip("prompt_too_long", f"prompt has {len(prompt_ids)} tokens, max_length={self.max_length}")
        sequences = []
        truncated = False
        for response in responses:
            response_ids = np.asarray(
                self._ids_after(context, self._response_text(record.prompt, rendered, response)), np.int32
            )
            if self.max_length is not None and len(prompt_ids) + len(response_ids) > self.max_length:
                response_ids = response_ids[: self.max_length - len(prompt_ids)]
                truncated = True
            sequences.append(
                EncodedSequence(
                    np.concatenate([prompt_ids, response_ids]).astype(np.int32),
                    np.concatenate([prompt_mask, np.ones(len(response_ids), bool)]),
                )
            )
        if truncated:
            changes.append(("response_truncated", f"response cut to fit max_length={self.max_length}"))
        chosen = sequences[0] if sequences else None
        rejected = sequences[1] if len(sequences) > 1 else None
        return EncodedRecord(record.index, record.id, prompt_ids, chosen, rejected, tuple(changes))

    def end_of_turn_ids(self) -> tuple[int, ...]:
        """The ids that end an assistant turn, for a generation config's ``eos_token_id``: EOS (which closes every
        trained turn, see ``_turn``) plus the first special token the template writes after an assistant message
        (``<|im_end|>`` for ChatML, ``</s>`` for zephyr), which a chat model emits first and must stop at."""
        ids = [self.eos_id]
        tail = self._text_after_a_reply()
        specials = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        specials |= {i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if t.special}
        first = next((i for i in self._ids(tail) if i in specials), None)
        if first is not None and first not in ids:
            ids.append(int(first))
        return tuple(ids)

    def _text_after_a_reply(self) -> str:
        """What the template renders after the content of a final assistant message (``"</s>\\n"`` for zephyr)."""
        marker = "jaxalign end-of-turn probe"
        try:
            text = self._render((Message("user", "hi"), Message("assistant", marker)), False)
        except (_TokenSkip, jinja2.TemplateError):
            return ""
        return text[text.rfind(marker) + len(marker):] if marker in text else ""

    def trailing_glue_ids(self) -> list[int]:
        """With ``completion_end="template"``: the ids the template renders after a final assistant turn's EOS
        (zephyr: a newline), which ``encode`` trains on dataset responses; empty with ``"eos"``."""
        if self.completion_end != "template":
            return []
        tail = self._text_after_a_reply()
        at = tail.find(self.eos_token)
        return self._ids_after(self.eos_token, tail[at + len(self.eos_token):]) if at >= 0 else []

    def encode_sampled(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> EncodedSequence:
        """The training sequence for a sampled response: ``prompt_ids + response_ids + [eos]``, masked on the
        response and EOS, consistent with ``encode``. ``response_ids`` comes from the sampler without EOS (one at its
        end is not doubled); the response is cut to ``max_length`` like dataset responses."""
        prompt = np.asarray(prompt_ids, np.int32)
        response = [int(t) for t in response_ids]
        if not response or response[-1] != self.eos_id:
            response.append(self.eos_id)
        response += self.trailing_glue_ids()
        if self.max_length is not None:
            response = response[: max(0, self.max_length - len(prompt))]
        ids = np.concatenate([prompt, np.asarray(response, np.int32)])
        mask = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(response), bool)])
        return EncodedSequence(ids, mask)


# ------------------------------------------------------------------------------------------------------- examples
def sft_example(encoded: EncodedRecord) -> dict[str, np.ndarray]:
    """``{"input_ids", "loss_mask", "row_id"}`` for an SFT-encoded record."""
    return {
        "input_ids": encoded.chosen.ids,
        "loss_mask": encoded.chosen.mask,
        "row_id": np.int32(encoded.row_id),
    }


def pair_example(encoded: EncodedRecord) -> dict[str, np.ndarray]:
    """``{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "prompt_ids", "row_id"}`` for a pair."""
    return {
        "chosen_ids": encoded.chosen.ids,
        "chosen_mask": encoded.chosen.mask,
        "rejected_ids": encoded.rejected.ids,
        "rejected_mask": encoded.rejected.mask,
        "prompt_ids": encoded.prompt_ids,
        "row_id": np.int32(encoded.row_id),
    }


def encode_records(
    records: Iterable[Record], encoder: ChatEncoder, task: str, report: DataReport | None = None
) -> list[EncodedRecord]:
    """Encode every record for ``task``, counting skips and truncations in ``report`` (``report.kept`` is set)."""
    report = report if report is not None else DataReport()
    out = []
    for record in records:
        result = encoder.encode(record, task)
        if isinstance(result, Skip):
            report.skip(record.index, result.reason, result.detail)
            continue
        for kind, detail in result.changes:
            report.change(record.index, kind, detail)
        out.append(result)
    report.kept = len(out)
    return out


def sft_examples(records: Iterable[Record], encoder: ChatEncoder, report: DataReport | None = None) -> list[dict]:
    """SFT examples for the loader (see ``sft_example``), skips and truncations counted in ``report``."""
    return [sft_example(e) for e in encode_records(records, encoder, "sft", report)]


def pair_examples(records: Iterable[Record], encoder: ChatEncoder, report: DataReport | None = None) -> list[dict]:
    """Pair examples for the loader (see ``pair_example``), skips and truncations counted in ``report``."""
    return [pair_example(e) for e in encode_records(records, encoder, "pairs", report)]
