"""The run context: everything a phase needs, built once before the first phase, checked before anything compiles.

:func:`build_context` resolves the model and tokenizer, reads and tokenises the data, builds the mesh and checks that
every training phase's batch divides over it. Each phase module then gets the same typed :class:`RunContext` (as
tunix passes typed ``TrainingInput``s): ``sft.run(ctx, phase)``, ``sample.run(ctx, phase)``, ...
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from transformers import AutoTokenizer

from jaxalign import config as config_lib
from jaxalign import sharding
from jaxalign.config import Config, ConfigError
from jaxalign.data.cache import encode_records_cached
from jaxalign.data.loader import length_buckets
from jaxalign.data.report import DataReport
from jaxalign.data.sources import load_records
from jaxalign.data.tokenize import ChatEncoder, EncodedRecord, encode_records, pair_example, sft_example
from jaxalign.models.config import ModelConfig, load_config
from jaxalign.models.hf_io import resolve_model_folder
from jaxalign.models.lora import LoraConfig
from jaxalign.tasks import Scorer, get_scorer
from jaxalign.tasks.demo import build_demo_assets
from jaxalign.pipeline.hosts import barrier, process_zero_first
from jaxalign.pipeline.phases import Phase
from jaxalign.pipeline.workdir import WorkDir
from jaxalign.rules import GIVEN_PAIRS_METHODS
from jaxalign.storage import cache_root, is_remote


@dataclasses.dataclass
class RunContext:
    cfg: Config
    workdir: WorkDir
    phases: list[Phase]  # the whole run, in order
    mesh: Mesh
    model_cfg: ModelConfig  # the architecture every phase trains and samples (compute dtype, remat applied)
    tokenizer: Any
    encoder: ChatEncoder  # chat template, length limits, EOS / pad ids
    train: list[EncodedRecord]  # data.train, tokenised (demonstrations, or preference pairs for dil / dpo)
    eval_records: list[Any]  # data.eval_prompts (default: data.train), the first eval.num_prompts
    eval_prefs: list[Any]  # data.eval_prefs: held-out preference pairs (may be empty)
    buckets: tuple[int, ...]  # padded sequence lengths the train steps compile for
    heldout_pairs: list[dict]  # eval_prefs as pair examples (reward / policy phases' held-out metrics, RM accuracy)
    heldout_sft: list[dict]  # data.eval_prompts' demonstrations as SFT examples (the SFT phase's held-out loss)
    lora: LoraConfig | None = None  # model.lora: training phases train adapters on a frozen base (None: full)
    scorer: Scorer | None = None  # data.gold_metric's program (eval's gold; policy.reward=gold), None without one
    data_reports: list[DataReport] = dataclasses.field(default_factory=list)
    counters: dict[str, int] = dataclasses.field(default_factory=dict)  # counted skips, reported in the summary

    @property
    def demonstrations(self) -> list[EncodedRecord]:
        """Training rows with a chosen response: the prompts the sample phase answers, each with its demonstration."""
        return [e for e in self.train if e.chosen is not None]

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


def _cache_dir(cfg: Config, workdir: WorkDir) -> Path | None:
    """data.cache: the tokenised-data cache is a local folder (a bucket work directory caches under the local cache
    root, ``JAXALIGN_CACHE_DIR`` or ~/.cache/jaxalign)."""
    if cfg.data.cache == "off":
        return None
    if cfg.data.cache != "auto":
        return Path(cfg.data.cache)
    return cache_root() / "tokenized" if is_remote(workdir.root) else Path(workdir.root) / "cache" / "tokenized"


def _read(ds, key: str, reports: list[DataReport]):
    records, report = load_records(ds.source, split=ds.split, name=ds.name or None, format=ds.format,
                                   limit=ds.limit or None, data_dir=ds.data_dir or None)
    report.name = f"{key} ({ds.source}:{ds.split})"
    reports.append(report)
    return records


def build_context(cfg: Config, workdir: WorkDir, phases: list[Phase], *, force: bool = False) -> RunContext:
    """Everything that can be wrong with the inputs is found here (ConfigError / DataError / ModelConfigError), before
    anything compiles; writes ``run.yaml`` once it all checks out."""
    workdir.check_owner(cfg, force=force)
    # the mesh and batch checks need no model and no data: refuse them before anything (demo assets, the
    # tokenisation cache) is written
    try:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"{e} (jax platform: {jax.devices()[0].platform})") from None
    _check_batches(cfg, phases, mesh)
    if cfg.run.demo_task:
        # the assets are a deterministic function of the seed, and the tokenizer / data readers want local files: a
        # bucket work directory gets them built in each host's local cache instead (rebuilt identically anywhere)
        where = cache_root() / f"demo_assets-seed{cfg.run.seed}" if is_remote(workdir.root) else workdir.assets
        assets = process_zero_first(lambda: build_demo_assets(where, seed=cfg.run.seed), "jaxalign: demo assets built")
        cfg.model.path = cfg.model.path or str(assets.model_dir)
        cfg.model.tokenizer = cfg.model.tokenizer or str(assets.tokenizer_dir)
        cfg.data.train.source = cfg.data.train.source or str(assets.train_file)
        cfg.data.eval_prompts.source = cfg.data.eval_prompts.source or str(assets.test_file)
        cfg.data.eval_prefs.source = cfg.data.eval_prefs.source or str(assets.heldout_prefs_file)
        cfg.data.gold_metric = cfg.data.gold_metric or "demo"
    if not cfg.model.path:
        raise ConfigError("model.path is empty: give a hub id or a local folder with config.json and safetensors.")
    workdir.base_model = resolve_model_folder(cfg.model.path)
    model_cfg = load_config(workdir.base_model, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            remat=cfg.model.remat)
    tok_path = cfg.model.tokenizer or str(workdir.base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    except Exception as e:
        raise ConfigError(f"model.tokenizer={tok_path!r}: could not load a tokenizer ({type(e).__name__}: "
                          f"{e}).") from None
    encoder = ChatEncoder(tokenizer, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                          chat_template=cfg.data.chat_template or None, completion_end=cfg.data.completion_end)
    if model_cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"{workdir.base_model}: vocab_size {model_cfg.vocab_size} is smaller than the "
                          f"tokenizer's {len(tokenizer)} tokens ({tok_path}).")
    reports: list[DataReport] = []
    train_records = _read(cfg.data.train, "data.train", reports)
    if not train_records:
        raise ConfigError(f"data.train ({cfg.data.train.source}): no usable rows (see the data report).")
    eval_all = _read(cfg.data.eval_prompts, "data.eval_prompts", reports) if cfg.data.eval_prompts.source else []
    eval_records = (eval_all if cfg.data.eval_prompts.source else train_records)[: cfg.eval.num_prompts]
    eval_prefs = _read(cfg.data.eval_prefs, "data.eval_prefs", reports) if cfg.data.eval_prefs.source else []
    report = DataReport(name="data.train (tokenised)")
    task = "pairs" if cfg.run.method in GIVEN_PAIRS_METHODS else "sft"
    train = encode_records_cached(train_records, encoder, task, report, cache_dir=_cache_dir(cfg, workdir),
                                  num_proc=cfg.data.num_proc)
    reports.append(report)
    if not train:
        raise ConfigError("data.train: every row was dropped when tokenising (see the data report).")
    limit = cfg.eval.heldout_limit
    heldout = encode_records(eval_prefs, encoder, "pairs", DataReport(name="eval_prefs")) if eval_prefs else []
    heldout_pairs = [pair_example(e) for e in heldout if e.rejected is not None][:limit]
    demos = encode_records(eval_all[:limit], encoder, "sft", DataReport(name="eval_prompts"))
    heldout_sft = [sft_example(e) for e in demos if e.chosen is not None][:limit]
    (workdir.root / "phases").mkdir(parents=True, exist_ok=True)
    barrier("jaxalign: context built")  # every process has read run.yaml (check_owner) before process 0 rewrites it
    if jax.process_index() == 0:
        workdir.run_yaml.write_text(config_lib.dump(cfg))
    return RunContext(cfg=cfg, workdir=workdir, phases=phases, mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer,
                      encoder=encoder, train=train, eval_records=eval_records, eval_prefs=eval_prefs,
                      buckets=length_buckets(cfg.data.max_length, min_length=min(64, cfg.data.max_length)),
                      heldout_pairs=heldout_pairs, heldout_sft=heldout_sft, data_reports=reports,
                      lora=cfg.model.lora.build(),
                      scorer=get_scorer(cfg.data.gold_metric) if cfg.data.gold_metric else None)


def _check_batches(cfg: Config, phases: list[Phase], mesh: Mesh) -> None:
    """Every training phase's micro-batches are split over the mesh's batch shards: refuse a size that does not divide
    now, not after the phases before it have run."""
    kinds = {p.kind for p in phases}
    for kind in ("sft", "reward", "policy"):
        section = getattr(cfg, kind)
        problem = sharding.batch_split_problem(kind, section.batch_size, section.accum_steps, mesh)
        if kind in kinds and problem:
            raise ConfigError(problem)
