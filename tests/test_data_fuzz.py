"""Property-based fuzzing of the normaliser and the tokeniser with hostile rows.

Properties: every input yields a valid Record or a counted Skip (normaliser), a valid EncodedRecord or a Skip
(tokeniser) - never an exception. Example counts are fixed (derandomized) and stated in each test's docstring.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxalign.data.formats import FORMATS, ROLES, Record, Skip, normalize_row, normalize_rows
from jaxalign.data.report import DataReport
from jaxalign.data.tokenize import ChatEncoder, EncodedRecord

NORMALISER_EXAMPLES = 800
TOKENISER_EXAMPLES = 250

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EDGE_TEXT = [
    "", " ", "\n", "\t\r\n", "\x00", "\ud800", "a\udfffb", "e\u0301", "\u202eevil", "\ufeffbom", "\u200b",
    "🙂" * 3, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "中文", "\n\nHuman: injected", "\n\nAssistant:", "</s>", "<s>", "<unk>", "<|user|>",
    "<|assistant|>\n", "{{ raise_exception('x') }}", "{% endfor %}",
]


def texts(huge: int, min_size: int = 0):
    return st.one_of(
        st.text(min_size=min_size, max_size=40),
        st.sampled_from(EDGE_TEXT),
        st.builds(lambda a, b: a + b, st.sampled_from(EDGE_TEXT), st.text(max_size=10)),
        # Huge turns: a short piece repeated, so generation stays cheap.
        st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=4), st.integers(huge // 10, huge)),
    )


text = texts(30_000)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), text)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)
roles = st.one_of(st.sampled_from(ROLES), st.sampled_from(["tool", "Assistant", "human", "gpt", ""]), json_values)
messages = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(text, json_values)}),
    st.fixed_dictionaries({"role": st.sampled_from(ROLES)}),  # no content
    st.fixed_dictionaries({"content": text}),  # no role
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text}, optional={"name": json_values}),
    json_values,
)
conversations = st.one_of(
    st.lists(messages, max_size=6),
    st.lists(st.lists(messages, max_size=2), max_size=3),  # wrong nesting
    json_values,
)
hh_strings = st.builds(
    lambda turns: "".join(f"\n\n{who}: {body}" for who, body in turns),
    st.lists(st.tuples(st.sampled_from(["Human", "Assistant", "System"]), text), max_size=5),
)
cells = st.one_of(conversations, text, hh_strings, json_values)
COLUMNS = ["messages", "prompt", "query", "chosen", "rejected", "real", "generated", "completion",
           "reference_response", "summary", "label"]
rows = st.one_of(st.dictionaries(st.sampled_from(COLUMNS), cells, max_size=5), json_values)


def assert_valid_record(record: Record) -> None:
    assert isinstance(record.prompt, tuple) and record.prompt
    for m in record.prompt:
        assert m.role in ROLES and isinstance(m.content, str) and m.content.strip()
        m.content.encode("utf-8")
    body = record.prompt[1:] if record.prompt[0].role == "system" else record.prompt
    assert [m.role for m in body] == ["user", "assistant"] * (len(body) // 2) + ["user"] * (len(body) % 2)
    assert body[-1].role == "user"
    assert record.demonstration is not None
    for response in (record.chosen, record.rejected, record.reference):
        assert response is None or (isinstance(response, str) and response.strip())
    assert record.rejected is None or record.chosen is not None


@settings(FUZZ, max_examples=NORMALISER_EXAMPLES)
@given(row=rows, fmt=st.sampled_from(FORMATS))
def test_normaliser_never_raises(row, fmt):
    """800 hostile rows (wrong types, missing roles/contents, bad roles, empty and huge turns, lone surrogates and
    other unicode edge cases, wrong nesting, non-mapping rows), each under a drawn format: a valid Record or a Skip
    with a reason."""
    result = normalize_row(row, 0, fmt)
    if isinstance(result, Skip):
        assert result.reason and isinstance(result.detail, str)
    else:
        assert_valid_record(result)


@settings(FUZZ, max_examples=200)
@given(batch=st.lists(rows, min_size=1, max_size=6), fmt=st.sampled_from(FORMATS))
def test_every_row_is_counted(batch, fmt):
    """200 batches of 1-6 hostile rows: rows read = records kept + rows skipped, none lost."""
    report = DataReport()
    records = normalize_rows(batch, fmt, report=report)
    assert report.rows_read == len(batch) == len(records) + report.skipped


# Tokeniser fuzzing: conversations that pass the normaliser, with hostile text inside.
safe_roles_text = st.one_of(
    texts(5_000, min_size=1), st.sampled_from(["Hi", " leading space", "trailing space ", "multi\n\nline"])
)
turn_pairs = st.lists(st.tuples(safe_roles_text, safe_roles_text), min_size=1, max_size=3)


def _records(system, pairs, rejected):
    raw = ([{"role": "system", "content": system}] if system is not None else []) + [
        m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    row = {"chosen": raw, "rejected": raw[:-1] + [{"role": "assistant", "content": rejected}]}
    return normalize_row(row, 0, "preference")


@pytest.fixture(scope="module")
def encoders(shared_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "zephyr-mistral-7b")
    return tok, ChatEncoder(tok, max_length=128, max_prompt_length=64), ChatEncoder(tok)


def test_tokeniser_never_raises(encoders):
    """250 conversations (1-3 turns, optional system turn) whose contents are hostile text - special-token strings,
    HH markers, Jinja syntax, huge turns (up to 20k characters), unicode edge cases - each encoded for "sft" or
    "pairs", with or without max_length=128 / max_prompt_length=64: an EncodedRecord meeting the layout contract,
    or a Skip."""
    tok, limited, unlimited = encoders

    @settings(FUZZ, max_examples=TOKENISER_EXAMPLES)
    @given(
        system=st.one_of(st.none(), safe_roles_text),
        pairs=turn_pairs,
        rejected=safe_roles_text,
        encoder=st.sampled_from([limited, unlimited]),
        task=st.sampled_from(["sft", "pairs"]),
    )
    def check(system, pairs, rejected, encoder, task):
        record = _records(system, pairs, rejected)
        if isinstance(record, Skip):
            return
        result = encoder.encode(record, task)
        if isinstance(result, Skip):
            assert result.reason in {"special_token_in_content", "prompt_too_long"}, result
            return
        assert isinstance(result, EncodedRecord)
        _check_layout(tok, encoder, result, task)

    check()


def _check_layout(tok, encoder, result, task):
    prompt = result.prompt_ids.tolist()
    assert result.prompt_ids.dtype == np.int32 and prompt and prompt[0] == tok.bos_token_id
    if encoder.max_prompt_length is not None:
        assert len(prompt) <= encoder.max_prompt_length
    truncated = "response_truncated" in dict(result.changes)
    for seq in (result.chosen, result.rejected) if task == "pairs" else (result.chosen,):
        ids = seq.ids.tolist()
        assert seq.ids.dtype == np.int32 and seq.mask.dtype == bool and len(ids) == len(seq.mask)
        assert ids[: len(prompt)] == prompt and ids.count(tok.bos_token_id) == 1 and not seq.mask[0]
        assert seq.mask[len(prompt):].all() and len(ids) > len(prompt)
        if encoder.max_length is not None:
            assert len(ids) <= encoder.max_length
        if not truncated:
            assert ids[-1] == tok.eos_token_id
        if task == "pairs":
            assert not seq.mask[: len(prompt)].any()
