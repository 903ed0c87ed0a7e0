"""Format detection and normalisation into Record: every supported format, and hostile rows as counted skips."""
import pytest

from jaxalign.data.formats import Message, Record, Skip, check_format, detect_format, normalize_row, normalize_rows
from jaxalign.data.report import DataError, DataReport

U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_messages_format_keeps_earlier_turns_in_prompt():
    row = {"prompt": "q1", "messages": msgs((S, "be brief"), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"))}
    rec = normalize_row(row, 3, "messages", source="f")
    assert isinstance(rec, Record)
    assert rec.prompt == (Message(S, "be brief"), Message(U, "q1"), Message(A, "a1"), Message(U, "q2"))
    assert rec.chosen == "a2" and rec.rejected is None and rec.index == 3 and rec.id == "f:3"
    assert rec.conversation(rec.chosen)[-1] == Message(A, "a2")


def test_trailing_user_turn_is_dropped_and_counted():
    report = DataReport()
    rows = [{"messages": msgs((U, "q"), (A, "a"), (U, "follow-up with no answer"))}]
    (rec,) = normalize_rows(rows, report=report)
    assert rec.chosen == "a" and rec.prompt == (Message(U, "q"),)
    assert report.changes["trailing_turns_dropped"] == 1 and report.skipped == 0


def test_ultrafeedback_style_lists():
    row = {
        "prompt": "q",
        "chosen": msgs((U, "q"), (A, "good")),
        "rejected": msgs((U, "q"), (A, "bad")),
        "messages": msgs((U, "q"), (A, "good")),
    }
    assert detect_format(row) == "preference"
    rec = normalize_row(row, 0, "preference")
    assert rec.prompt == (Message(U, "q"),) and rec.chosen == "good" and rec.rejected == "bad" and rec.is_pair


def test_preference_strings_and_explicit_prompt_lists():
    rec = normalize_row({"prompt": "q", "chosen": "good", "rejected": "bad"}, 0, "preference")
    assert rec.prompt == (Message(U, "q"),) and (rec.chosen, rec.rejected) == ("good", "bad")
    row = {"prompt": msgs((S, "sys"), (U, "q")), "chosen": msgs((A, "good")), "rejected": msgs((A, "bad"))}
    rec = normalize_row(row, 0, "preference")
    assert rec.prompt == (Message(S, "sys"), Message(U, "q")) and rec.chosen == "good"


def test_hh_strings_common_prefix_prompt():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Fine, thanks."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Fine. Go away."
    row = {"chosen": chosen, "rejected": rejected}
    assert detect_format(row, row) == "hh"
    rec = normalize_row(row, 0, "hh")
    assert rec.prompt == (Message(U, "hi"), Message(A, "hello"), Message(U, "how are you?"))
    # The common prefix runs into "Fine" - the prompt must still stop at the last assistant marker.
    assert rec.chosen == "Fine, thanks." and rec.rejected == "Fine. Go away."


def test_hh_prompt_column_form():
    row = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}
    rec = normalize_row(row, 0, "preference")
    assert rec.prompt == (Message(U, "hi"),) and rec.chosen == " hello"


def test_spin_summarization_prompt_completion():
    spin = {"real": msgs((U, "q"), (A, "human answer")), "generated": msgs((U, "q"), (A, "model answer"))}
    assert detect_format(spin) == "spin"
    rec = normalize_row(spin, 0, "spin")
    assert (rec.chosen, rec.rejected) == ("human answer", "model answer")

    tldr = {"query": "SUBREDDIT: r/x\nPOST: long story\nTL;DR:", "reference_response": " short story"}
    assert detect_format(tldr) == "summarization"
    rec = normalize_row(tldr, 0, "summarization")
    assert rec.reference == "short story" and rec.chosen is None and rec.demonstration == "short story"
    assert rec.prompt == (Message(U, tldr["query"]),)
    assert detect_format({"prompt": "x", "summary": "y"}) == "summarization"

    pc = {"prompt": "q", "completion": "a"}
    assert detect_format(pc) == "prompt_completion"
    assert normalize_row(pc, 0, "prompt_completion").chosen == "a"


def test_unknown_columns_error_names_columns_and_formats():
    with pytest.raises(DataError) as err:
        detect_format(["question", "answer_text"])
    message = str(err.value)
    assert "['answer_text', 'question']" in message
    for fmt in ("messages", "preference", "hh", "spin", "summarization", "prompt_completion"):
        assert fmt in message
    with pytest.raises(DataError, match="needs the column"):
        check_format("messages", ["prompt", "chosen"])
    with pytest.raises(DataError, match="Unknown data format"):
        check_format("sharegpt", ["conversations"])
    with pytest.raises(DataError, match=r"\['question'\]"):
        normalize_rows([{"question": "q"}])


@pytest.mark.parametrize(
    "row, reason, where",
    [
        ({"messages": msgs((U, "q"), ("tool", "x"), (A, "a"))}, "bad_role", "messages[1]"),
        ({"messages": msgs((U, "q"), ("Assistant", "a"))}, "bad_role", "messages[1]"),
        ({"messages": [{"content": "q"}, {"role": A, "content": "a"}]}, "missing_role", "messages[0]"),
        ({"messages": msgs((U, ""), (A, "a"))}, "empty_content", "messages[0].content"),
        ({"messages": msgs((U, "q"), (A, "  \n"))}, "empty_content", "messages[1].content"),
        ({"messages": [{"role": U, "content": 7}, {"role": A, "content": "a"}]}, "non_string_content", "messages[0]"),
        ({"messages": [{"role": U, "content": ["q"]}, {"role": A, "content": "a"}]}, "non_string_content", ""),
        ({"messages": [{"role": U}, {"role": A, "content": "a"}]}, "missing_content", "messages[0].content"),
        ({"messages": msgs((U, "q"), (U, "q again"))}, "no_assistant_turn", "messages"),
        ({"messages": msgs((U, "q"), (U, "again"), (A, "a"))}, "roles_not_alternating", "messages[1]"),
        ({"messages": msgs((A, "hello"), (U, "q"), (A, "a"))}, "roles_not_alternating", "messages[0]"),
        ({"messages": msgs((U, "q"), (S, "late"), (A, "a"))}, "misplaced_system", "messages[1]"),
        ({"messages": []}, "empty_conversation", "messages"),
        ({"messages": "hello"}, "bad_messages", "messages"),
        ({"messages": [[{"role": U, "content": "q"}]]}, "bad_message", "messages[0]"),
        ({"messages": msgs((U, "\ud800"), (A, "a"))}, "invalid_unicode", "messages[0]"),
        ({"messages": None}, "bad_messages", "messages"),
    ],
)
def test_hostile_message_rows_are_skips_naming_the_field(row, reason, where):
    result = normalize_row(row, 5, "messages")
    assert isinstance(result, Skip), result
    assert result.reason == reason and where in result.detail


@pytest.mark.parametrize(
    "row, reason",
    [
        (
            {"prompt": "q", "chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "other"), (A, "b"))},
            "prompt_mismatch",
        ),
        ({"prompt": "q", "chosen": msgs((U, "q"), (A, "a")), "rejected": None}, "missing_response"),
        ({"prompt": "q", "chosen": msgs((U, "q"), (A, "a")), "rejected": "b"}, "bad_messages"),
        ({"chosen": "plain text", "rejected": "other"}, "missing_prompt"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:  "}, "empty_content"),
        ({"chosen": msgs((A, "a")), "rejected": msgs((A, "b"))}, "missing_prompt"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_content"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "bad_messages"),
    ],
)
def test_hostile_pair_rows(row, reason):
    result = normalize_row(row, 0, "preference")
    assert isinstance(result, Skip) and result.reason == reason, result


def test_hh_format_rejects_non_hh_rows():
    for row in ({"chosen": "plain text", "rejected": "other"}, {"chosen": ["x"], "rejected": "y"}):
        result = normalize_row(row, 0, "hh")
        assert isinstance(result, Skip) and result.reason == "hh_unparsable", result


def test_hh_pair_diverging_before_final_turn_is_skipped():
    row = {
        "chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more\n\nAssistant: b",
        "rejected": "\n\nHuman: q\n\nAssistant: other",
    }
    result = normalize_row(row, 0, "hh")
    assert isinstance(result, Skip) and result.reason == "hh_multi_turn_response"


def test_every_row_is_a_record_or_a_counted_skip():
    rows = [
        {"messages": msgs((U, "q"), (A, "a"))},
        {"messages": msgs((U, "q"), ("robot", "a"))},
        {"messages": msgs((U, ""), (A, "a"))},
        "not a row",
        {"messages": msgs((U, "q"), (A, "a"))},
    ]
    report = DataReport(name="planted")
    records = normalize_rows(rows, "messages", report=report)
    assert [r.index for r in records] == [0, 4]
    assert report.rows_read == 5 and report.skipped == 3
    assert dict(report.skips) == {"bad_role": 1, "empty_content": 1, "bad_row": 1}
    assert report.examples["skip:bad_role"][0][0] == 1
    text = report.summary()
    assert "bad_role" in text and "row 1" in text
    assert report.to_dict()["skipped"]["bad_row"] == 1
