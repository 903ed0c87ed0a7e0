"""Tiny stand-ins for the real recipes' model and data, so configs/ultrachat_* and colab_smoke run end to end on CPU
through the same ``key=value`` overrides a user would type:

    python launch/tpu_run.py --config ultrachat_dil model.path=TINY model.tokenizer=ZEPHYR \
        data.train.source=prefs_train.jsonl data.train.split=train ...

- ``make_tiny_llama``: a random-init Llama with the Mistral tokenizer's 32000-token vocabulary (hidden 32, 2 layers),
  written by ``jaxalign.models.save_pretrained``; parameters are drawn with numpy (``demo_task.save_random_model``)
  so making it costs no JAX compilation.
- ``write_slices``: small local jsonl slices of the shared real data in the recipes' formats — UltraChat ``messages``
  demonstrations and UltraFeedback-binarized-like preference pairs.
- ``recipe_overrides``: the overrides that swap a recipe's model and datasets for those and shrink its sizes
  (max length 128, a handful of steps), leaving the recipe's method, objective, phases, dtypes, remat and mesh as they
  are.
- ``subprocess_env``: the environment for a launcher subprocess: CPU, a few virtual devices, and a persistent JAX
  compilation cache shared by the test session (later runs of the same shapes skip XLA compilation).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "tpu_run.py"
TOKENIZER = "tokenizers/zephyr-mistral-7b"  # under the shared data folder: Mistral tokenizer + zephyr chat template
SFT_SOURCE = "sft/oasst_en100_top1_messages.jsonl"  # UltraChat `messages` format
PREF_SOURCE = "preference/oasst_en100_rank_pairs.jsonl"  # UltraFeedback-binarized-like pairs

TINY = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, max_position_embeddings=256)


def make_tiny_llama(folder: str | Path, *, seed: int = 0, **overrides) -> Path:
    """A random-init tiny Llama in ``folder`` (config.json + model.safetensors) for the zephyr/Mistral tokenizer."""
    from jaxalign.models import ModelConfig
    from jaxalign.tasks.demo import save_random_model

    kw = {**TINY, **overrides}
    cfg = ModelConfig(model_type="llama", sliding_windows=(None,) * kw["num_layers"], pad_token_id=2,
                      bos_token_id=1, eos_token_id=2, **kw)
    save_random_model(cfg, folder, seed=seed)
    return Path(folder)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_slices(shared: Path, out: str | Path, *, n_train: int = 48, n_test: int = 16) -> dict[str, Path]:
    """Local jsonl slices (train / test for demonstrations and for preference pairs) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sft, prefs = _rows(shared / SFT_SOURCE), _rows(shared / PREF_SOURCE)
    return {
        "sft_train": _write(out / "sft_train.jsonl", sft[:n_train]),
        "sft_test": _write(out / "sft_test.jsonl", sft[n_train:n_train + n_test]),
        "prefs_train": _write(out / "prefs_train.jsonl", prefs[:n_train]),
        "prefs_test": _write(out / "prefs_test.jsonl", prefs[n_train:n_train + n_test]),
    }


def _shrink(section: str, batch: int = 8, accum: int = 2, steps: int = 2) -> list[str]:
    return [f"{section}.batch_size={batch}", f"{section}.accum_steps={accum}", f"{section}.max_steps={steps}",
            f"{section}.save_every=1"]


def recipe_overrides(name: str, model_dir: Path, tokenizer_dir: Path, slices: dict[str, Path]) -> list[str]:
    """``key=value`` overrides that run recipe ``name`` on the tiny model and the local slices in a few steps."""
    common = [f"model.path={model_dir}", f"model.tokenizer={tokenizer_dir}", "data.max_length=128",
              "data.max_prompt_length=64", "eval.num_prompts=8", "eval.max_new_tokens=8", "sample.max_new_tokens=8",
              "sample.batch_size=8", "run.show_progress=false"]
    if name in ("ultrachat_dil", "ultrachat_dpo"):  # preference pairs; prompts for the answers from the test pairs
        return common + [f"data.train.source={slices['prefs_train']}", "data.train.split=train",
                         "data.train.limit=32", f"data.eval_prompts.source={slices['prefs_test']}",
                         "data.eval_prompts.split=train"] + _shrink("policy")
    if name in ("ultrachat_irl", "colab_smoke", "ultrachat_spin"):  # demonstrations; held-out pairs for the RM
        out = common + [f"data.train.source={slices['sft_train']}", "data.train.split=train", "data.train.limit=32",
                        f"data.eval_prompts.source={slices['sft_test']}", "data.eval_prompts.split=train",
                        "sample.limit=16", "policy.num_samples=2"] + _shrink("policy") + _shrink("reward")
        if name != "ultrachat_spin":
            out += [f"data.eval_prefs.source={slices['prefs_test']}", "data.eval_prefs.split=train"]
        return out
    raise KeyError(f"no tiny overrides for recipe {name!r}")


def subprocess_env(cache_dir: str | Path | None = None, devices: int = 2) -> dict[str, str]:
    """Environment for a ``launch/tpu_run.py`` subprocess on CPU with ``devices`` virtual devices."""
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env
