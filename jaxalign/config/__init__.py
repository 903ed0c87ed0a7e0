"""Experiment configs: one YAML file per recipe, typed by dataclasses, overridable as ``key=value``.

    python launch/tpu_run.py --config ultrachat_dil policy.learning_rate=3e-7 mesh.fsdp=8

Every key has a type and a default (:mod:`jaxalign.config.schema`); unknown keys are rejected with the closest valid
names, values are parsed with YAML and checked against the field's type (:mod:`jaxalign.config.loading`), and
:func:`validate` checks the combination (phase order, paths) before anything is compiled
(:mod:`jaxalign.config.checks`). Where recipes live and how one is read: :mod:`jaxalign.config.paths`; the LoRA
section: :mod:`jaxalign.config.lora`.
"""
from jaxalign.config.checks import ConfigError, validate
from jaxalign.config.loading import dump, from_dict, load, section_fingerprint, to_dict, valid_keys
from jaxalign.config.lora import Lora
from jaxalign.config.paths import CONFIG_DIR, parse_override, read_recipe, resolve_config_path
from jaxalign.config.schema import (Config, Data, Dataset, Eval, Export, Mesh, Model, Policy, Reliability, Reward, Run,
                                    Sample, Sft, Train)

__all__ = ["CONFIG_DIR", "Config", "ConfigError", "Data", "Dataset", "Eval", "Export", "Lora", "Mesh", "Model", "Policy",
           "Reliability", "Reward", "Run", "Sample", "Sft", "Train", "dump", "from_dict", "load", "parse_override", "read_recipe",
           "resolve_config_path", "section_fingerprint", "to_dict", "valid_keys", "validate"]
