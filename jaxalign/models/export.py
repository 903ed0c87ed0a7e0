"""Finish a phase's exported model folder so that transformers users can use it as they would a TRL output.

``save_pretrained`` writes the weights and ``config.json``; ``complete_export`` adds the rest:

- the tokenizer's files (``tokenizer.save_pretrained``) with the chat template the run trained with, which
  transformers writes as ``chat_template.jinja`` and ``AutoTokenizer.from_pretrained`` reads back; a tokenizer
  without a pad token is saved with EOS as its pad token (the encoder pads with it);
- ``config.json``'s ``pad_token_id`` (``AutoModelForSequenceClassification`` refuses batches of more than one row
  without it). transformers pools the rightmost token that is not the pad id, and so does jaxalign's reward head
  with the model config's ``pad_token_id``: a reward model whose config has one keeps it (where it equals EOS, both
  read the token before a closing EOS). A model config without one (zephyr, Llama-2) pooled the last real token,
  EOS included, so its export needs a pad that differs from EOS: the tokenizer's pad token when it is not EOS, else
  its unk token, else EOS (then rows must not end with EOS to score alike); the saved tokenizer pads with it;
- for causal LMs, ``generation_config.json`` whose ``eos_token_id`` lists EOS and the template's end-of-turn token
  (``<|im_end|>`` for ChatML), so ``generate`` and ``pipeline("text-generation")`` stop at the end of the reply;
- optionally the weights cast to another float dtype (``float32`` / ``bfloat16`` / ``float16``), shard by shard, in
  place; ``converted_copy`` writes the cast weights to another folder instead (for folders later phases read back).

The tokenizer passed in is not modified.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np

EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16; jax's own dependency provides it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def convert_dtype(folder: str | Path, dtype: str) -> Path:
    """Cast every floating-point tensor of the folder's ``*.safetensors`` to ``dtype`` (one file in memory at a
    time; each file is replaced atomically) and record it in ``config.json``."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    folder = Path(folder)
    target = _numpy_dtype(dtype)
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        changed = False
        for k, t in tensors.items():
            # bfloat16 is not np.floating to numpy: test by kind ('f' float, 'V' for ml_dtypes' bfloat16)
            if t.dtype != target and (np.issubdtype(t.dtype, np.floating) or t.dtype.name == "bfloat16"):
                tensors[k] = t.astype(target)
                changed = True
        total += sum(t.nbytes for t in tensors.values())
        if changed:
            tmp = path.with_suffix(".safetensors.tmp")
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2))
    _update_config(folder, {"torch_dtype": dtype, "dtype": dtype})
    return folder


def converted_copy(folder: str | Path, dest: str | Path, dtype: str) -> Path:
    """A copy of a model folder with its weights in ``dtype``, the source left as it is. Use it where later phases
    read the folder back: float32 weights rounded to bfloat16 between rounds would lose every update smaller than
    bfloat16's resolution (at DPO learning rates, most of them)."""
    import shutil

    dest = Path(dest)
    shutil.copytree(folder, dest, dirs_exist_ok=True)
    return convert_dtype(dest, dtype)


def _update_config(folder: Path, values: dict) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def reward_pad_id(tokenizer) -> int:
    """The pad id a sequence-classification export needs (see the module docstring): not EOS where possible."""
    eos = tokenizer.eos_token_id
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if candidate is not None and candidate != eos:
            return int(candidate)
    return int(eos)


def complete_export(
    folder: str | Path,
    *,
    tokenizer,
    chat_template: str | None = None,
    reward: bool = False,
    dtype: str | None = None,
    eos_token_ids: tuple[int, ...] | None = None,
) -> Path:
    """Add tokenizer, chat template, pad token, generation config and the export dtype to a ``save_pretrained`` folder.

    ``tokenizer`` is the run's transformers tokenizer; ``chat_template`` the run's ``data.chat_template`` (a built-in
    name or a Jinja string; empty = the tokenizer's own). ``reward`` marks a sequence-classification export (no
    generation config). ``eos_token_ids`` overrides the stop ids (default: EOS plus the template's end-of-turn token,
    ``ChatEncoder.end_of_turn_ids``). ``dtype`` casts the weights (``EXPORT_DTYPES``); ``None`` keeps them.
    """
    from transformers import GenerationConfig

    from jaxalign.data.tokenize import ChatEncoder

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json — call jaxalign.models.save_pretrained first")
    encoder = ChatEncoder(tokenizer, chat_template=chat_template)
    saved = copy.deepcopy(tokenizer)
    saved.chat_template = encoder.template
    pooled_with = json.loads((folder / "config.json").read_text()).get("pad_token_id") if reward else None
    pad_id = (reward_pad_id(tokenizer) if pooled_with is None else int(pooled_with)) if reward else encoder.pad_id
    saved.pad_token = saved.convert_ids_to_tokens(pad_id)
    saved.save_pretrained(str(folder))

    config_values = {"pad_token_id": pad_id}
    stop = [int(i) for i in (eos_token_ids if eos_token_ids is not None else encoder.end_of_turn_ids())]
    if not reward:
        config = json.loads((folder / "config.json").read_text())
        generation = GenerationConfig(
            bos_token_id=config.get("bos_token_id") if encoder.bos_id is None else encoder.bos_id,
            eos_token_id=stop if len(stop) > 1 else stop[0],
            pad_token_id=pad_id,
        )
        generation.save_pretrained(str(folder))
    _update_config(folder, config_values)
    if dtype is not None:
        convert_dtype(folder, dtype)
    return folder
