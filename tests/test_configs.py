"""Every recipe in configs/ loads, validates and plans; the recipes say what their sources say; overrides are typed,
unknown keys get suggestions, and fuzzed ``key=value`` strings either load or raise ConfigError — nothing else."""
from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxalign import config as config_lib
from jaxalign.config import CONFIG_DIR, ConfigError
from jaxalign.pipeline.phases import plan

ALL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
RECIPES_7B = ("ultrachat_dil", "ultrachat_irl", "ultrachat_spin", "ultrachat_dpo")


def test_the_recipes_exist():
    assert {"demo_cpu", "colab_smoke", "hh_afd", "tldr_irl", *RECIPES_7B} <= set(ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_loads_validates_and_plans(name):
    cfg = config_lib.load(name)
    phases = plan(cfg)
    assert phases and phases[-1].kind == "eval"
    assert cfg.run.name == name  # the default work directory is runs/<name>
    # the dump of a resolved config (run.yaml, the report) is itself a valid recipe that resolves to the same thing
    again = config_lib.from_dict(yaml.safe_load(config_lib.dump(cfg)), "dump")
    assert again == cfg
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    assert text.lstrip().startswith("#"), "a recipe starts with a comment saying what it is and where it comes from"


@pytest.mark.parametrize("name", RECIPES_7B)
def test_7b_recipes_shard_over_every_chip(name):
    cfg = config_lib.load(name)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat) == ("bfloat16", "float32", "full")
    assert not cfg.sft.enabled  # every 7B recipe starts from an SFT checkpoint
    for section in ("reward", "policy"):
        t = getattr(cfg, section)
        assert t.batch_size % t.accum_steps == 0 and (t.batch_size // t.accum_steps) % 4 == 0  # v5p-8: 4 chips
    assert "--plan" in (CONFIG_DIR / f"{name}.yaml").read_text()


def test_dil_recipe_is_the_papers():
    c = config_lib.load("ultrachat_dil")
    assert c.run.method == "dil" and [p.name for p in plan(c)] == ["eval0", "r1/policy", "r1/eval"]
    assert c.model.path == "alignment-handbook/zephyr-7b-sft-full"
    assert (c.data.train.source, c.data.train.split) == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert c.data.eval_prompts.split == "test_prefs"
    assert (c.data.max_length, c.data.max_prompt_length) == (1024, 512)
    p = c.policy
    assert (p.objective, p.reduce, p.pairs, p.reference) == ("dil_lsif", "mean", "dataset", "sft")
    assert (p.learning_rate, p.batch_size, p.epochs, p.schedule, p.warmup_ratio, p.optimizer) == (
        5e-7, 128, 1, "cosine", 0.1, "adamw")


def test_irl_recipe_is_the_papers():
    c = config_lib.load("ultrachat_irl")
    assert c.run.method == "irl" and c.run.rounds == 2
    assert c.model.path == "HuggingFaceH4/mistral-7b-sft-beta"
    assert (c.data.train.source, c.data.train.split) == ("HuggingFaceH4/ultrachat_200k", "train_sft")
    assert c.reward.reinit_each_round and c.reward.accumulate_pairs
    assert (c.policy.objective, c.policy.beta, c.policy.pairs, c.policy.pair_rule) == ("dpo", 0.1, "best_of_n",
                                                                                      "max_min")
    assert c.policy.num_samples >= 2 and c.sample.temperature > 0.5  # best-of-N needs diverse samples
    names = [p.name for p in plan(c)]
    assert names.index("r1/reward") < names.index("r1/policy") < names.index("r2/sample")


def test_spin_dpo_tldr_afd_colab():
    spin = config_lib.load("ultrachat_spin")
    assert (spin.policy.pairs, spin.policy.reference, spin.policy.objective) == ("demo_vs_sample", "previous", "dpo")
    assert 2 <= spin.run.rounds <= 4 and "reward" not in {p.kind for p in plan(spin)}
    dpo = config_lib.load("ultrachat_dpo")
    assert (dpo.policy.objective, dpo.policy.beta, dpo.policy.pairs) == ("dpo", 0.1, "dataset")
    tldr = config_lib.load("tldr_irl")
    assert tldr.model.path.startswith("EleutherAI/pythia-1b") and tldr.data.train.format == "summarization"
    assert tldr.sft.enabled and tldr.sample.max_new_tokens == 53 and "PPO" in (CONFIG_DIR / "tldr_irl.yaml").read_text()
    afd = config_lib.load("hh_afd")
    assert afd.run.method == "afd" and afd.data.train.format == "hh" and afd.data.train.source == "Anthropic/hh-rlhf"
    assert [p.kind for p in plan(afd)] == ["sft", "eval", "sample", "reward", "eval"]
    assert {afd.data.train.data_dir, afd.data.eval_prompts.data_dir, afd.data.eval_prefs.data_dir} == {"harmless-base"}
    assert afd.reward.loss == "afd_discriminator" and afd.eval.best_of_n > 1
    colab = config_lib.load("colab_smoke")
    assert colab.run.rounds == 1 and colab.data.train.limit and colab.model.path == "Qwen/Qwen2.5-0.5B-Instruct"


def test_tldr_template_renders_query_space_summary_eos(shared_data):
    """The plain template of tldr_irl (Pythia has none): prompt verbatim, ' ' + summary + EOS, no generation prompt."""
    from transformers import AutoTokenizer

    from jaxalign.data.formats import Message, Record
    from jaxalign.data.tokenize import ChatEncoder

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    enc = ChatEncoder(tok, chat_template=config_lib.load("tldr_irl").data.chat_template)
    query = "SUBREDDIT: r/test\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"
    out = enc.encode(Record(0, "0", (Message("user", query),), reference="a short summary"), task="sft")
    assert tok.decode(out.prompt_ids) == query
    assert tok.decode(out.chosen.ids[out.chosen.mask]) == " a short summary" + tok.eos_token


# ---- overrides -------------------------------------------------------------------------------------------------

def test_unknown_key_is_rejected_with_suggestions():
    with pytest.raises(ConfigError, match=r"key 'policy.learnig_rate'.*Did you mean policy\.learning_rate"):
        config_lib.load("ultrachat_dil", ["policy.learnig_rate=1e-6"])
    with pytest.raises(ConfigError, match="Did you mean"):
        config_lib.load("ultrachat_dil", ["polcy.beta=0.1"])
    with pytest.raises(ConfigError, match="is a section"):
        config_lib.load("ultrachat_dil", ["policy=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        config_lib.load("ultrachat_dil", ["policy.beta"])
    with pytest.raises(ConfigError, match="Available: .*ultrachat_dil"):
        config_lib.load("ultrachat_dli")


def test_override_values_are_typed():
    c = config_lib.load("ultrachat_dil", ["policy.learning_rate=3e-7", "run.name=0.10", "data.train.split=on",
                                          "data.train.limit=100", "run.show_progress=false", "model.path=2024-01-01"])
    assert c.policy.learning_rate == 3e-7 and isinstance(c.policy.learning_rate, float)
    assert (c.run.name, c.data.train.split, c.model.path) == ("0.10", "on", "2024-01-01")  # strings stay as typed
    assert c.data.train.limit == 100 and c.run.show_progress is False
    for bad, match in [("data.train.limit=ten", "should be of type int"), ("run.show_progress=maybe", "type bool"),
                       ("policy.batch_size=2.5", "type int"), ("policy.objective=dpoo", "choose one of"),
                       ("policy.pairs=random", "best_of_n"), ("model.dtype=fp8", "bfloat16"),
                       ("policy.learning_rate=nan", "finite"), ("policy.learning_rate=0", "> 0"),
                       ("sample.top_p=1.5", "<= 1"), ("mesh.fsdp=0", "-1 for all remaining"),
                       ("data.max_prompt_length=2000", "leave room"), ("policy.beta=-3", "> 0, or -1")]:
        with pytest.raises(ConfigError, match=match):
            config_lib.load("ultrachat_dil", [bad])
    with pytest.raises(ConfigError, match="multiple of policy.accum_steps"):
        config_lib.load("ultrachat_dil", ["policy.batch_size=100", "policy.accum_steps=3"])
    with pytest.raises(ConfigError, match="at least 2 samples"):
        config_lib.load("ultrachat_irl", ["policy.num_samples=1"])


def test_phase_orders_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="policy before any reward model"):
        plan(config_lib.load("ultrachat_irl", ["run.phases=sample,policy,reward,eval"]))
    with pytest.raises(ConfigError, match="'sample' must come before 'reward'"):
        plan(config_lib.load("ultrachat_irl", ["run.phases=reward,sample,policy,eval"]))
    with pytest.raises(ConfigError, match="not a round phase"):
        plan(config_lib.load("ultrachat_irl", ["run.phases=sample,reward,polcy,eval"]))
    with pytest.raises(ConfigError, match="policy.pairs=dataset"):
        plan(config_lib.load("ultrachat_dil", ["policy.pairs=best_of_n"]))
    with pytest.raises(ConfigError, match="SPIN has no reward model"):
        plan(config_lib.load("ultrachat_spin", ["policy.pairs=best_of_n"]))


# ---- fuzz ------------------------------------------------------------------------------------------------------

FUZZ_EXAMPLES = 400
VALID_KEYS = config_lib.valid_keys()
EDGE_VALUES = ["", " ", "null", "~", "true", "no", "on", "0", "-1", "1e-3", "5e-7", "1.0e-3", ".nan", ".inf", "-.inf",
               "1_000", "0x1f", "0o17", "2024-01-01", "2024-13-45", "2001-02-30 25:61:61", "[1, 2]", "{a: 1}", "[",
               "{a: 1", "'quoted'", '"dq"', "!!binary xx", "!!timestamp x", "!!int 3.5", "!!float abc",
               "!!python/name:os.system", "&a [*a]", "- - -", "?", "a=b=c", "=", "\x00", "\ud800", "🙂", "1" * 400,
               "sample,reward,policy,eval", "sample,policy,reward,eval", "policy,eval", "dil_lsif", "dpo",
               "best_of_n", "dataset", "demo_vs_sample", "previous", "bfloat16", "full", "hh", "auto"]


def _mutate(key: str, data) -> str:
    how = data.draw(st.sampled_from(["keep", "drop", "double", "swap", "upper", "dots", "prefix"]))
    if how == "keep" or len(key) < 3:
        return key
    i = data.draw(st.integers(0, len(key) - 2))
    return {"drop": key[:i] + key[i + 1:], "double": key[:i] + key[i] + key[i:],
            "swap": key[:i] + key[i + 1] + key[i] + key[i + 2:], "upper": key.upper(), "dots": key.replace(".", ".."),
            "prefix": "x." + key}[how]


@st.composite
def override(draw):
    kind = draw(st.sampled_from(["valid", "valid", "valid", "mutated", "random"]))
    if kind == "random":
        key = draw(st.text(max_size=30))
    else:
        key = draw(st.sampled_from(VALID_KEYS))
        if kind == "mutated":
            key = _mutate(key, _Drawer(draw))
    value = draw(st.one_of(st.sampled_from(EDGE_VALUES), st.text(max_size=40),
                           st.integers(-2**70, 2**70).map(str),
                           st.floats(allow_nan=True, allow_infinity=True).map(repr)))
    sep = draw(st.sampled_from(["=", "=", "=", " = ", "==", ""]))
    return f"{key}{sep}{value}"


class _Drawer:
    """Adapts a composite's ``draw`` to the ``data.draw`` interface used by _mutate."""

    def __init__(self, draw):
        self.draw = draw


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.sampled_from(ALL_CONFIGS), overrides=st.lists(override(), min_size=1, max_size=4))
def test_fuzzed_overrides_load_or_raise_config_error(name, overrides):
    """400 derandomized examples: 1-4 overrides on a random recipe, keys valid / mutated (typos, case, dots) / random
    text, values from YAML edge cases (dates out of range, tags, anchors, NaN, huge ints, unbalanced brackets), random
    text and numbers. ``load`` (typing + validation) and ``plan`` either succeed or raise ConfigError; a loaded config
    dumps to YAML that loads back equal."""
    try:
        cfg = config_lib.load(name, overrides)
        plan(cfg)
    except ConfigError as e:
        assert str(e)  # a message, never an empty error
        return
    again = config_lib.from_dict(yaml.safe_load(config_lib.dump(cfg)), "dump")
    assert again == cfg  # (validation leaves no NaN in a loaded config, so equality is exact)


def test_the_reward_method_rounds_are_checked():
    """run.method=reward (a Bradley-Terry reward model on given pairs) is one 'reward' phase, with an optional 'eval':
    a sample or policy phase, or a phase name that does not exist, is refused before anything runs."""
    cfg = config_lib.load("hh_helpful_prefs", ["run.method=reward"])
    assert cfg.run.round_phases(cfg.policy.kind) == ["reward"] and cfg.run.num_rounds() == 1
    assert config_lib.load("hh_helpful_prefs", ["run.method=reward", "run.phases=reward,eval"])
    for phases, message in (("sample,reward", "no sample or policy phase"), ("reward,policy", "no sample or policy"),
                            ("reward,foo", "'foo' is not a round phase"), ("eval", "its round is 'reward'")):
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.load("hh_helpful_prefs", ["run.method=reward", f"run.phases={phases}"])
