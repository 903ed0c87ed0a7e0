"""The gold programs: the verifiable-instruction checks accept what follows an instruction and reject what does not,
the task's demonstrations (built from real answers) all pass, corrupted ones fail, and the registry the eval phase
reads names both tasks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxalign.config import ConfigError, load as load_config
from jaxalign.tasks import SCORERS, get_scorer
from jaxalign.tasks.instruction_data import build, content_sentences
from jaxalign.tasks.instructions import END_PHRASE, INSTRUCTIONS, grade, instruction_of, sentences

ANSWER = ["Plants absorb water through their roots, and move it upward.", "Leaves lose it by transpiration.",
          "Some of it is split during photosynthesis."]


def prompt(name: str) -> str:
    return f"Explain how plants use the water they absorb. {INSTRUCTIONS[name].sentence}"


@pytest.mark.parametrize("name", list(INSTRUCTIONS))
def test_a_demonstration_follows_its_instruction(name):
    demo = INSTRUCTIONS[name].apply(ANSWER)
    assert grade(prompt(name), demo) == {"gold": 1.0, "strict": 1.0, "guard": 1.0}
    # the untouched answer breaks every instruction (it has capitals, a comma, no phrase / quotes / JSON / bullets)
    assert grade(prompt(name), " ".join(ANSWER))["strict"] == 0.0


@pytest.mark.parametrize("name, answer, strict", [
    ("lowercase", "all lower case here, fine.", 1.0),
    ("lowercase", "almost all lower case, but One.", 0.0),
    ("lowercase", "1234 5678", 0.0),  # no letter at all is not an answer in lower case
    ("no_comma", "No comma anywhere in this answer.", 1.0),
    ("no_comma", "One comma, here.", 0.0),
    ("end_phrase", f"Water moves up the stem. {END_PHRASE}", 1.0),
    ("end_phrase", f"Water moves up the stem. {END_PHRASE.lower()}  ", 1.0),  # IFEval compares lower-cased
    ("end_phrase", f"{END_PHRASE} Water moves up the stem.", 0.0),
    ("quotation", '"Water moves up the stem."', 1.0),
    ("quotation", '"Water moves up the stem.', 0.0),
    ("json_answer", '{"answer": "Water moves up the stem."}', 1.0),
    ("json_answer", '```json\n{"answer": "Water moves up the stem."}\n```', 1.0),
    ("json_answer", '{"reply": "Water moves up the stem."}', 0.0),
    ("json_answer", '{"answer": "Water moves up the stem."', 0.0),
    ("three_bullets", "* one thing here\n* two things here\n- three things here", 1.0),
    ("three_bullets", "* one thing here\n* two things here", 0.0),
    ("three_bullets", "* a\n* b\n* c\n* d", 0.0),
])
def test_strict_checks(name, answer, strict):
    assert grade(prompt(name), answer)["strict"] == strict


def test_the_guard_rejects_non_answers_that_follow_the_letter():
    assert grade(prompt("no_comma"), "Yes.")["gold"] == 0.0  # too short to be an answer
    assert grade(prompt("no_comma"), "the the the the the the the the the the")["gold"] == 0.0  # a loop
    assert grade(prompt("quotation"), '"ok"') == {"gold": 0.0, "strict": 1.0, "guard": 0.0}
    assert grade(prompt("end_phrase"), END_PHRASE)["guard"] == 0.0  # the phrase alone has no content
    assert grade(prompt("json_answer"), '{"answer": ""}')["gold"] == 0.0


def test_the_instruction_is_read_from_the_prompt_even_inside_a_chat_template():
    rendered = f"<|im_start|>user\n{prompt('quotation')}<|im_end|>\n<|im_start|>assistant\n"
    assert instruction_of(rendered).name == "quotation"
    with pytest.raises(ValueError, match="no verifiable instruction"):
        grade("What is the capital of France?", "Paris.")


def test_sentences_and_content():
    assert sentences("A b c. D e f? G h!") == ["A b c.", "D e f?", "G h!"]
    assert content_sentences("Short answer here, truly.\n\nA second paragraph.") == ["Short answer here, truly."]
    assert content_sentences("Intro words are here:\n1. first\n2. second") is None  # ends mid-sentence
    assert content_sentences("1. a list\n2. only") is None
    assert content_sentences("See https://example.com for more details here.") is None
    long = " ".join(["This sentence has exactly seven words here."] * 10)
    assert sum(len(s) + 1 for s in content_sentences(long)) <= 301


def test_scorer_registry():
    assert {"demo", "instructions"} <= set(SCORERS)
    s = get_scorer("instructions")
    m = s.metrics([prompt("quotation")] * 2, ['"Water moves up the stem."', "Water moves up the stem."])
    assert m == {"gold": 0.5, "gold_strict": 0.5, "gold_guard": 1.0}
    assert get_scorer("demo").score("reverse: abc", "cba") == 1.0
    with pytest.raises(ValueError, match="registered scorers"):
        get_scorer("ifeval")


def test_policy_reward_gold_needs_a_gold_metric():
    with pytest.raises(ConfigError, match="policy.reward"):
        load_config("demo_cpu", ["policy.reward=gold", "run.demo_task=false", "data.gold_metric="])
    load_config("demo_cpu", ["policy.reward=gold", "data.gold_metric=demo", "run.phases=sample,policy,eval"])
    with pytest.raises(ConfigError, match="data.gold_metric"):
        load_config("demo_cpu", ["data.gold_metric=ifeval"])


def test_task_data_from_real_answers(shared_data, tmp_path):
    counts = build([str(shared_data / "sft" / "llamafactory_alpaca_en_demo_messages.jsonl")],
                   [str(shared_data / "sft" / "alpaca_eval_zephyr-7b-beta_messages.jsonl")], tmp_path, seed=0)
    assert counts["train"] > 300 and counts["eval"] > 200
    rows = {split: [json.loads(line) for line in open(tmp_path / f"{split}.jsonl")] for split in ("train", "eval")}
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["eval"]}
    made = [r["instruction"] for r in rows["train"]]
    dealt = {name: made.count(name) for name in INSTRUCTIONS}
    # balanced: the instructions that apply to every row are dealt equally, three_bullets where three sentences fit
    assert max(dealt.values()) - min(v for k, v in dealt.items() if k != "three_bullets") <= 1, dealt
    assert dealt["three_bullets"] >= 0.05 * len(made), dealt
    rng = np.random.default_rng(0)
    for split in ("train", "eval"):
        for r in rows[split]:
            demo = r["messages"][1]["content"]
            assert r["messages"][0]["content"] == r["prompt"] and instruction_of(r["prompt"]).name == r["instruction"]
            assert grade(r["prompt"], demo)["gold"] == 1.0, (r["instruction"], demo)
            # corrupted: the untouched-style answer (capitalised, commas back, phrase / quotes / wrapper / bullets
            # cut off) fails the strict check
            corrupt = {"lowercase": lambda d: d[:1].upper() + d[1:] if d[:1].isalpha() else "X" + d,
                       "no_comma": lambda d: d.replace(" ", ", ", 1),
                       "end_phrase": lambda d: d[: -len(END_PHRASE) - 1],
                       "quotation": lambda d: d.strip('"'),
                       "json_answer": lambda d: d[:-1],
                       "three_bullets": lambda d: d.split("\n", 1)[1]}[r["instruction"]]
            corrupted = corrupt(demo)
            assert grade(r["prompt"], corrupted)["strict"] == 0.0, (r["instruction"], corrupted)
        # and a demonstration answers its own prompt only: shuffled across instructions, most fail
        demos = [r["messages"][1]["content"] for r in rows[split]]
        shuffled = [demos[i] for i in rng.permutation(len(demos))]
        assert np.mean([grade(r["prompt"], d)["gold"] for r, d in zip(rows[split], shuffled)]) < 0.5
    # the same seed builds the same rows
    again = build([str(shared_data / "sft" / "llamafactory_alpaca_en_demo_messages.jsonl")],
                  [str(shared_data / "sft" / "alpaca_eval_zephyr-7b-beta_messages.jsonl")], tmp_path / "b", seed=0)
    assert again == counts and (tmp_path / "b" / "train.jsonl").read_text() == (tmp_path / "train.jsonl").read_text()


@pytest.mark.slow
def test_the_instructions_recipe_grades_through_the_cli(shared_data, tmp_path):
    """configs/instructions_sft on a tiny model and the task built from real answers: the eval phase looks the
    scorer up by data.gold_metric, keeps each answer's gold in eval.json and reports gold / gold_strict / gold_guard —
    all recomputed here from the answers with the gold program called directly."""
    import subprocess
    import sys

    import tiny_recipe

    data = tmp_path / "data"
    build([str(shared_data / "sft" / "llamafactory_alpaca_en_demo_messages.jsonl")],
          [str(shared_data / "sft" / "alpaca_eval_zephyr-7b-beta_messages.jsonl")], data, seed=0)
    model = tiny_recipe.make_tiny_llama(tmp_path / "model")
    work = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(tiny_recipe.LAUNCHER), "--config", "instructions_sft", "--workdir", str(work),
         f"model.path={model}", f"model.tokenizer={shared_data / tiny_recipe.TOKENIZER}",
         f"data.train.source={data / 'train.jsonl'}", f"data.eval_prompts.source={data / 'eval.jsonl'}",
         "data.train.limit=16", "sft.batch_size=8", "sft.max_steps=2", "eval.num_prompts=8",
         "eval.max_new_tokens=12", "run.show_progress=false"],
        cwd=tiny_recipe.REPO, env=tiny_recipe.subprocess_env(tmp_path / "jax_cache"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    metrics = json.loads((work / "phases" / "eval0" / "done.json").read_text())["metrics"]
    ev = json.loads((work / "phases" / "eval0" / "eval.json").read_text())
    graded = [grade(p, a) for p, a in zip(ev["prompts"], ev["answers"])]
    assert len(graded) == len(ev["gold"]) == 8
    assert ev["gold"] == [g["gold"] for g in graded]
    for part, key in (("gold", "gold"), ("strict", "gold_strict"), ("guard", "gold_guard")):
        assert metrics[key] == pytest.approx(np.mean([g[part] for g in graded]))
