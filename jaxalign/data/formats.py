"""The dataset formats people have, normalised into one record type.

Contract:

- ``Record`` is the only thing the rest of the library sees: ``prompt`` is the tuple of chat messages before the final
  assistant turn (for multi-turn data it holds the earlier assistant turns too, so SFT can train on them), ``chosen``
  and ``rejected`` are final assistant response texts, ``reference`` a gold response kept apart from a preference pair
  (summarisation data). ``index`` is the row's position in its source, which is what batches carry as ``row_id``.
- ``normalize_row`` never raises on row content: it returns a ``Record`` or a ``Skip`` (reason key + detail naming the
  field). ``normalize_rows`` counts every ``Skip`` in a ``DataReport``. Only unusable *column sets* raise
  (``DataError``), before any row is read.
- Formats (``FORMATS``; ``detect_format`` picks one from the column names):
  ``messages`` (UltraChat: ``messages`` = [{role, content}, ...]);
  ``preference`` (``chosen`` / ``rejected`` as strings or message lists, with an optional ``prompt`` that is a string
  or message list; UltraFeedback-binarized keeps the whole conversation in ``chosen``);
  ``hh`` (Anthropic HH: ``chosen`` / ``rejected`` strings "\\n\\nHuman: ...\\n\\nAssistant: ...", the prompt is their
  longest common prefix cut at the last "\\n\\nAssistant:");
  ``spin`` (``real`` / ``generated`` message lists -> chosen / rejected);
  ``summarization`` (``query`` or ``prompt`` + ``reference_response`` / ``reference`` / ``summary`` / ``label``);
  ``prompt_completion`` (``prompt`` + ``completion``).

Contents are kept verbatim, except where the format's own syntax adds whitespace: HH turns and summarisation references
(whose leading space belongs to the raw "TL;DR:" prompt) are stripped.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

from jaxalign.data.report import DataError, DataReport

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "preference", "hh", "spin", "summarization", "prompt_completion")

_PROMPT_COLUMNS = ("prompt", "query")
_REFERENCE_COLUMNS = ("reference_response", "reference", "summary", "label")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat turn; ``role`` is one of ``ROLES`` and ``content`` a non-empty string."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclasses.dataclass(frozen=True)
class Record:
    """One normalised example.

    ``prompt`` ends with a user message, roles alternate user/assistant after an optional leading system message.
    At least one of ``chosen`` / ``reference`` is set; ``rejected`` only comes with ``chosen``.
    """

    index: int
    id: str
    prompt: tuple[Message, ...]
    chosen: str | None = None
    rejected: str | None = None
    reference: str | None = None

    @property
    def demonstration(self) -> str | None:
        """The response to imitate in SFT: ``chosen``, else ``reference``."""
        return self.chosen if self.chosen is not None else self.reference

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    def conversation(self, response: str) -> tuple[Message, ...]:
        """The prompt followed by ``response`` as the final assistant turn."""
        return self.prompt + (Message("assistant", response),)


@dataclasses.dataclass(frozen=True)
class Skip:
    """Why a row was not turned into a ``Record``: a stable ``reason`` key and a ``detail`` naming the field."""

    reason: str
    detail: str = ""


class _RowSkip(Exception):
    # Raised by the parsing helpers and caught once in normalize_row: keeps the helpers linear.
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.skip = Skip(reason, detail)


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------------------------------------- messages
def _text(value, where: str, *, strip: bool = False) -> str:
    """A usable content string, or a skip naming ``where``."""
    if value is None:
        raise _RowSkip("missing_content", f"{where} is missing")
    if not isinstance(value, str):
        raise _RowSkip("non_string_content", f"{where} is {_type_name(value)}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates survive JSON decoding but no tokenizer can encode them.
        raise _RowSkip("invalid_unicode", f"{where} is not encodable as UTF-8") from None
    if not value.strip():
        raise _RowSkip("empty_content", f"{where} is empty")
    return value.strip() if strip else value


def _message(value, where: str) -> Message:
    if not isinstance(value, Mapping):
        raise _RowSkip("bad_message", f"{where} is {_type_name(value)}, expected a {{role, content}} mapping")
    role = value.get("role")
    if role is None:
        raise _RowSkip("missing_role", f"{where} has no role")
    if not isinstance(role, str) or role not in ROLES:
        raise _RowSkip("bad_role", f"{where} has role {role!r}, expected one of {', '.join(ROLES)}")
    return Message(role, _text(value.get("content"), f"{where}.content"))


def _messages(value, where: str) -> list[Message]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _RowSkip("bad_messages", f"{where} is {_type_name(value)}, expected a list of messages")
    if len(value) == 0:
        raise _RowSkip("empty_conversation", f"{where} is an empty list")
    return [_message(m, f"{where}[{i}]") for i, m in enumerate(value)]


def _check_turn_order(messages: Sequence[Message], where: str, *, ends_with_user: bool) -> None:
    """Optional leading system message, then user/assistant alternating from a user turn."""
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise _RowSkip("misplaced_system", f"{where}[{i}] is a system message after the first turn")
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    if not turns:
        raise _RowSkip("no_user_turn", f"{where} has no user turn")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            offset = len(messages) - len(turns)
            raise _RowSkip(
                "roles_not_alternating", f"{where}[{i + offset}] is {m.role!r} where {expected!r} was expected"
            )
    if ends_with_user and turns[-1].role != "user":
        raise _RowSkip("roles_not_alternating", f"{where} does not end with a user turn")


def _split_conversation(value, where: str) -> tuple[tuple[Message, ...], str, int]:
    """(messages before the last assistant turn, last assistant content, number of trailing turns dropped)."""
    messages = _messages(value, where)
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        raise _RowSkip("no_assistant_turn", f"{where} has no assistant turn")
    _check_turn_order(messages[: last + 1], where, ends_with_user=False)
    return tuple(messages[:last]), messages[last].content, len(messages) - last - 1


# ----------------------------------------------------------------------------------------------------------------- HH
def _parse_hh(text: str, where: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> messages; the text must start with a turn marker."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _RowSkip("hh_unparsable", f"{where} does not start with '\\n\\nHuman:' turns")
    # re.split with one group alternates [before, role, text, role, text, ...].
    return [
        Message(_HH_ROLES[role], _text(body, f"{where} turn {i // 2}", strip=True))
        for i, (role, body) in enumerate(zip(parts[1::2], parts[2::2]))
    ]


def _hh_prompt(text: str, where: str) -> tuple[Message, ...]:
    """An HH prompt string, which ends with the '\\n\\nAssistant:' generation marker."""
    body = text.rstrip()
    if body.endswith(_HH_ASSISTANT.strip()):
        body = body[: body.rfind(_HH_ASSISTANT.strip())].rstrip()
    messages = _parse_hh("\n\n" + body.lstrip("\n"), where)
    _check_turn_order(messages, where, ends_with_user=True)
    return tuple(messages)


def _hh_pair(chosen: str, rejected: str) -> tuple[tuple[Message, ...], str, str]:
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    # The common prefix may run into the responses when they start alike: cut back to the last assistant marker
    # that lies wholly inside it.
    cut = chosen.rfind(_HH_ASSISTANT, 0, n)
    if cut < 0:
        raise _RowSkip("hh_unparsable", "chosen and rejected share no '\\n\\nAssistant:' turn")
    prompt = _parse_hh(chosen[:cut], "prompt (common prefix of chosen and rejected)")
    _check_turn_order(prompt, "prompt", ends_with_user=True)
    responses = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        tail = text[cut + len(_HH_ASSISTANT):]
        if _HH_TURN.search(tail):
            raise _RowSkip("hh_multi_turn_response", f"{name} continues past the final assistant turn")
        responses.append(_text(tail, f"{name} final assistant turn", strip=True))
    return tuple(prompt), responses[0], responses[1]


# ------------------------------------------------------------------------------------------------------------ prompts
def _prompt(value, where: str) -> tuple[Message, ...]:
    """A prompt given as a plain string (one user turn), an HH-style string, or a message list."""
    if isinstance(value, str):
        if value.lstrip(" ").startswith(("\n\nHuman:", "Human:")):
            return _hh_prompt(value, where)
        return (Message("user", _text(value, where)),)
    messages = _messages(value, where)
    _check_turn_order(messages, where, ends_with_user=True)
    return tuple(messages)


def _response(value, where: str, *, strip: bool = False) -> str:
    """A response given as a string or as a list holding exactly one assistant message."""
    if isinstance(value, str) or value is None:
        return _text(value, where, strip=strip)
    messages = _messages(value, where)
    if len(messages) != 1 or messages[0].role != "assistant":
        raise _RowSkip("bad_response", f"{where} must be a string or a single assistant message")
    return messages[0].content


def _prompt_value(row: Mapping):
    for key in _PROMPT_COLUMNS:
        if row.get(key) is not None:
            return key, row[key]
    return None, None


def _pair(row: Mapping, good: str, bad: str, *, hh: bool, trailing: list) -> tuple:
    c, r = row.get(good), row.get(bad)
    key, prompt_value = _prompt_value(row)
    if isinstance(c, str) and isinstance(r, str):
        if prompt_value is None:
            if not hh and not c.lstrip(" ").startswith("\n\nHuman:"):
                raise _RowSkip("missing_prompt", f"{good}/{bad} are strings but the row has no prompt")
            return _hh_pair(c, r)
        return _prompt(prompt_value, key), _text(c, good), _text(r, bad)
    if hh:
        raise _RowSkip("hh_unparsable", f"{good} is {_type_name(c)} and {bad} is {_type_name(r)}, expected strings")
    for name, v in ((good, c), (bad, r)):
        if v is None:
            raise _RowSkip("missing_response", f"{name} is missing")
        if isinstance(v, str) or not isinstance(v, Sequence):
            raise _RowSkip("bad_messages", f"{good} is {_type_name(c)} but {bad} is {_type_name(r)}")
    c_msgs, r_msgs = _messages(c, good), _messages(r, bad)
    if all(m.role == "assistant" for m in c_msgs + r_msgs):
        # TRL's explicit-prompt form: the prompt lives in its own column, the lists hold only the answers.
        if prompt_value is None:
            raise _RowSkip("missing_prompt", f"{good}/{bad} hold only assistant turns and the row has no prompt")
        return _prompt(prompt_value, key), _response(c, good), _response(r, bad)
    c_prompt, c_text, c_trail = _split_conversation(c, good)
    r_prompt, r_text, r_trail = _split_conversation(r, bad)
    if c_prompt != r_prompt:
        raise _RowSkip("prompt_mismatch", f"{good} and {bad} differ before their final assistant turn")
    if not c_prompt:
        raise _RowSkip("no_user_turn", f"{good} has no turn before the assistant")
    _check_turn_order(c_prompt, good, ends_with_user=True)
    trailing.append(c_trail + r_trail)
    return c_prompt, c_text, r_text


# ---------------------------------------------------------------------------------------------------------- the rows
def detect_format(columns: Iterable[str], sample: Mapping | None = None) -> str:
    """The format implied by the column names (``sample``, a first row, separates HH strings from message lists).

    Raises ``DataError`` naming the columns found and the formats expected when nothing matches.
    """
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        no_prompt = not cols & set(_PROMPT_COLUMNS)
        if no_prompt and (sample is None or isinstance(sample.get("chosen"), str)):
            return "hh"
        return "preference"
    if {"real", "generated"} <= cols:
        return "spin"
    if "messages" in cols:
        return "messages"
    if cols & set(_PROMPT_COLUMNS) and "completion" in cols:
        return "prompt_completion"
    if cols & set(_PROMPT_COLUMNS) and cols & set(_REFERENCE_COLUMNS):
        return "summarization"
    raise DataError(
        f"Cannot tell the dataset format from its columns {sorted(cols)}. Expected one of: "
        "messages (a `messages` column of [{role, content}] lists, as UltraChat); "
        "preference (`chosen` + `rejected`, strings or message lists, optional `prompt`, as UltraFeedback binarized); "
        "hh (`chosen` + `rejected` strings in Anthropic's '\\n\\nHuman: ... \\n\\nAssistant: ...' form); "
        "spin (`real` + `generated` message lists); "
        "summarization (`query` or `prompt` + `reference_response` / `reference` / `summary` / `label`); "
        "prompt_completion (`prompt` + `completion`). Rename the columns or pass format=... explicitly."
    )


_REQUIRED = {
    "messages": (("messages",),),
    "preference": (("chosen",), ("rejected",)),
    "hh": (("chosen",), ("rejected",)),
    "spin": (("real",), ("generated",)),
    "summarization": (_PROMPT_COLUMNS, _REFERENCE_COLUMNS),
    "prompt_completion": (_PROMPT_COLUMNS, ("completion",)),
}


def check_format(fmt: str, columns: Iterable[str], sample: Mapping | None = None) -> str:
    """Resolve ``"auto"`` or validate an explicit format against the columns; raises ``DataError`` on mismatch."""
    cols = list(columns)
    if fmt == "auto":
        return detect_format(cols, sample)
    if fmt not in FORMATS:
        raise DataError(f"Unknown data format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}.")
    missing = [" or ".join(f"`{c}`" for c in alts) for alts in _REQUIRED[fmt] if not set(alts) & set(cols)]
    if missing:
        raise DataError(
            f"Format {fmt!r} needs the column(s) {', '.join(missing)}, but the dataset has {sorted(cols)}. "
            "Pass format='auto' to detect it, or rename the columns."
        )
    return fmt


def normalize_row(row, index: int, fmt: str, *, source: str = "") -> Record | Skip:
    """Turn one raw row into a ``Record``, or say why not. Never raises on row content.

    ``fmt`` is one of ``FORMATS`` (resolve ``"auto"`` with ``check_format`` first). Turns after the last assistant turn
    are dropped; ``normalize_rows`` counts that as a change.
    """
    record, _ = _normalize(row, index, fmt, source)
    return record


def _normalize(row, index: int, fmt: str, source: str) -> tuple[Record | Skip, int]:
    if not isinstance(row, Mapping):
        return Skip("bad_row", f"row is {_type_name(row)}, expected a mapping of columns"), 0
    trailing: list[int] = []
    try:
        chosen = rejected = reference = None
        if fmt == "messages":
            prompt, chosen, dropped = _split_conversation(row.get("messages"), "messages")
            if not prompt:
                raise _RowSkip("no_user_turn", "messages has no turn before the assistant")
            _check_turn_order(prompt, "messages", ends_with_user=True)
            trailing.append(dropped)
        elif fmt in ("preference", "hh"):
            prompt, chosen, rejected = _pair(row, "chosen", "rejected", hh=fmt == "hh", trailing=trailing)
        elif fmt == "spin":
            prompt, chosen, rejected = _pair(row, "real", "generated", hh=False, trailing=trailing)
        elif fmt == "summarization":
            key, value = _prompt_value(row)
            prompt = _prompt(value, key or "query")
            ref_key = next((k for k in _REFERENCE_COLUMNS if row.get(k) is not None), _REFERENCE_COLUMNS[0])
            reference = _response(row.get(ref_key), ref_key, strip=True)
        elif fmt == "prompt_completion":
            key, value = _prompt_value(row)
            prompt = _prompt(value, key or "prompt")
            chosen = _response(row.get("completion"), "completion")
        else:
            raise DataError(f"Unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}.")
    except _RowSkip as skip:
        return skip.skip, 0
    record_id = f"{source}:{index}" if source else str(index)
    return Record(index, record_id, prompt, chosen, rejected, reference), sum(trailing)


def normalize_rows(
    rows: Iterable,
    fmt: str = "auto",
    *,
    columns: Iterable[str] | None = None,
    report: DataReport | None = None,
    source: str = "",
    start_index: int = 0,
) -> list[Record]:
    """Normalise ``rows`` (mappings of column -> value) into records, counting every skip in ``report``.

    ``fmt="auto"`` detects the format from ``columns`` (default: the first row's keys). Row indices start at
    ``start_index`` and are what skips and records refer to.
    """
    report = report if report is not None else DataReport(name=source or "data")
    rows = iter(rows)
    first = next(rows, _END)
    if first is _END:
        return []
    if fmt == "auto" or columns is not None:
        cols = list(columns) if columns is not None else (list(first) if isinstance(first, Mapping) else [])
        fmt = check_format(fmt, cols, first if isinstance(first, Mapping) else None)
    records = []
    for offset, row in enumerate(_chain(first, rows)):
        index = start_index + offset
        report.rows_read += 1
        result, dropped = _normalize(row, index, fmt, source)
        if isinstance(result, Skip):
            report.skip(index, result.reason, result.detail)
            continue
        if dropped:
            report.change(index, "trailing_turns_dropped", f"{dropped} turn(s) after the last assistant turn")
        records.append(result)
    return records


_END = object()  # a row may itself be None, so "no rows" needs its own marker


def _chain(first, rest):
    yield first
    yield from rest
