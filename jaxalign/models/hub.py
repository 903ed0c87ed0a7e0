"""The Hugging Face Hub both ways: which files of a model repository to download, and pushing a phase's model folder.

Contract:

- ``model_files(repo_files)`` picks, from a repository's file list, everything a model folder needs at its top level
  (``config.json``, ``generation_config.json``, tokenizer files of every kind, ``chat_template.jinja``) and exactly one
  copy of the weights: transformers' ``model*.safetensors`` (sharded or not), else any ``*.safetensors``. The other
  copies a repository often carries (``pytorch_model*.bin``, ``consolidated.safetensors`` / ``*.pth``, ``tf_model.h5``,
  ``flax_model.msgpack``, GGUF files, ``original/``) are left out; a repository without safetensors is refused before
  anything is downloaded, since jaxalign reads nothing else.
- ``download_model(repo_id)`` fetches those files with ``snapshot_download``; without a file list (offline, warm
  cache) it falls back to name patterns that describe the same selection.
- ``push_to_hub(folder, repo_id)`` creates the repository if needed and uploads the folder in one commit;
  ``hub_repo_id("{user}/{run}-{phase}", run=..., phase=...)`` fills a per-phase repository name.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from jaxalign.models.config import ModelConfigError

# Tokenizer files of every kind transformers reads: fast (tokenizer.json), sentencepiece (*.model), BPE
# (vocab.json + merges.txt), WordPiece (vocab.txt), tiktoken, and the template transformers >= 4.43 writes apart.
_TOKENIZER_FILE = re.compile(r"tokenizer.*|.*\.jinja|merges\.txt|vocab\..*|.*\.model|.*\.tiktoken")
# Index files of the weight copies we do not download: their shards are not there, so leave the index out as well.
_OTHER_INDEX = re.compile(r".*\.(bin|h5|msgpack|pt|pth|ckpt)\.index\.json")
# The offline fallback: the same selection as shell patterns (cannot see which weight copies exist).
FALLBACK_PATTERNS = ("*.json", "model*.safetensors", "tokenizer*", "*.jinja", "merges.txt", "vocab.*", "*.model",
                     "*.tiktoken")


def model_files(repo_files: Iterable[str]) -> list[str]:
    """The files of a hub model repository to download (see the module docstring); raises ``ModelConfigError``
    when it holds no safetensors weights."""
    top = sorted(f for f in set(repo_files) if "/" not in f)
    weights = [f for f in top if f.endswith(".safetensors")]
    # transformers names its weights model.safetensors / model-0000k-of-0000n.safetensors; Mistral's repositories
    # also carry consolidated.safetensors, the same weights again in another layout.
    weights = [f for f in weights if f.startswith("model")] or weights
    if not weights:
        others = [f for f in top if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt"))]
        raise ModelConfigError(
            f"the repository has no *.safetensors weights (it holds {others or 'no weights at top level'}); jaxalign "
            "reads safetensors only. Convert once with transformers: from_pretrained(...).save_pretrained(folder) "
            "writes safetensors, then pass that folder."
        )
    meta = [f for f in top if (f.endswith(".json") and not _OTHER_INDEX.fullmatch(f)) or _TOKENIZER_FILE.fullmatch(f)]
    return sorted(set(meta) | set(weights))


def download_model(repo_id: str, *, revision: str | None = None) -> Path:
    """Download a hub model repository's needed files (``model_files``) and return the snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception:  # offline or unreachable: a warm cache still serves the snapshot through the patterns
        files = None
    patterns = list(FALLBACK_PATTERNS) if files is None else model_files(files)
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def hub_repo_id(template: str, *, run: str, phase: str, user: str | None = None) -> str:
    """Fill ``{user}``, ``{run}`` and ``{phase}`` in a repository name template; phase paths such as ``r1/policy``
    become ``r1-policy`` (a repository name has one slash). ``{user}`` defaults to the logged-in account."""
    if "{user}" in template and user is None:
        from huggingface_hub import HfApi

        user = HfApi().whoami()["name"]

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")

    repo_id = template.format(user=user or "", run=clean(run), phase=clean(phase))
    if repo_id.count("/") > 1 or not all(repo_id.split("/")):
        raise ValueError(f"hub id template {template!r} gave {repo_id!r}, expected 'owner/name' or 'name'")
    return repo_id


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload ``folder`` in one commit; returns the
    commit URL. Private by default: a run's models are not published by surprise."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json) — nothing to push")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message or f"jaxalign: upload {folder.name}")
    return str(getattr(info, "commit_url", info))
