"""Runs the phases of a recipe in a work directory: skip what is finished, resume what is not, refuse what changed.

Work directory layout::

    run.yaml                     the resolved config of the run that owns this directory
    phases/<phase>/done.json     completion marker: fingerprint, metrics, wall time
    phases/<phase>/checkpoints/  orbax (resumable training state)      phases/<phase>/tb/  tensorboard + metrics.jsonl
    phases/<phase>/model/        the phase's final model as HF safetensors (what later phases and users read)
    phases/rK_sample/samples.json, phases/*eval*/eval.json
    report.md, plots/*.png
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign import config as config_lib
from jaxalign import sharding
from jaxalign.config import Config, ConfigError
from jaxalign.pipeline.phases import SECTIONS, Phase, plan, policy_objective


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a process killed at any moment leaves either the old file or the new one
    (a torn done.json would otherwise make the next run fail to read it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Pipeline:
    def __init__(self, cfg: Config, workdir: str | Path | None = None, *, force: bool = False):
        self.cfg = cfg
        self.workdir = Path(workdir or cfg.run.workdir or f"runs/{cfg.run.name}").absolute()
        self.force = force
        self.phases = plan(cfg)
        self.counters: dict[str, int] = {}
        self.data_reports: list[Any] = []

    # ---- set-up: everything that can be wrong is found here, before anything compiles -------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        self._check_workdir()
        if cfg.run.demo_task:
            from jaxalign.pipeline.demo_task import build_demo_assets

            assets = build_demo_assets(self.workdir / "assets", seed=cfg.run.seed)
            cfg.model.path = cfg.model.path or str(assets.model_dir)
            cfg.model.tokenizer = cfg.model.tokenizer or str(assets.tokenizer_dir)
            cfg.data.train.source = cfg.data.train.source or str(assets.train_file)
            cfg.data.eval_prompts.source = cfg.data.eval_prompts.source or str(assets.test_file)
            cfg.data.eval_prefs.source = cfg.data.eval_prefs.source or str(assets.heldout_prefs_file)
            cfg.data.gold_metric = cfg.data.gold_metric or "demo"
        if not cfg.model.path:
            raise ConfigError("model.path is empty: give a hub id or a local folder with config.json and safetensors.")
        from transformers import AutoTokenizer

        from jaxalign.data.tokenize import ChatEncoder
        from jaxalign.models.config import load_config
        from jaxalign.models.hf_io import resolve_model_folder

        self.model_dir = resolve_model_folder(cfg.model.path)
        self.model_cfg = load_config(self.model_dir, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                     remat=cfg.model.remat)
        tok_path = cfg.model.tokenizer or str(self.model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        except Exception as e:
            raise ConfigError(f"model.tokenizer={tok_path!r}: could not load a tokenizer ({type(e).__name__}: "
                              f"{e}).") from None
        self.encoder = ChatEncoder(self.tokenizer, max_length=cfg.data.max_length,
                                   max_prompt_length=cfg.data.max_prompt_length,
                                   chat_template=cfg.data.chat_template or None)
        self.pad_id = self.encoder.pad_id
        if self.model_cfg.vocab_size < len(self.tokenizer):
            raise ConfigError(f"{self.model_dir}: vocab_size {self.model_cfg.vocab_size} is smaller than the "
                              f"tokenizer's {len(self.tokenizer)} tokens ({tok_path}).")
        self.train_records = self._records(cfg.data.train, "data.train")
        if not self.train_records:
            raise ConfigError(f"data.train ({cfg.data.train.source}): no usable rows (see the data report).")
        self.eval_records = (self._records(cfg.data.eval_prompts, "data.eval_prompts")
                             if cfg.data.eval_prompts.source else self.train_records)[: cfg.eval.num_prompts]
        self.eval_prefs = self._records(cfg.data.eval_prefs, "data.eval_prefs") if cfg.data.eval_prefs.source else []
        task = "pairs" if cfg.run.method in ("dil", "dpo") else "sft"
        from jaxalign.data.report import DataReport
        from jaxalign.data.tokenize import encode_records

        report = DataReport(name="data.train (tokenised)")
        self.train_encoded = encode_records(self.train_records, self.encoder, task, report)
        self.data_reports.append(report)
        if not self.train_encoded:
            raise ConfigError("data.train: every row was dropped when tokenising (see the data report).")
        self.buckets = self._buckets(cfg.data.max_length)
        try:
            self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        except ValueError as e:
            raise ConfigError(f"{e} (jax platform: {jax.devices()[0].platform})") from None
        self._check_batches()
        (self.workdir / "phases").mkdir(parents=True, exist_ok=True)
        (self.workdir / "run.yaml").write_text(config_lib.dump(cfg))

    def _check_batches(self) -> None:
        """Every training phase's global batch is split over the mesh's batch shards: refuse a size that does not
        divide now, not after the phases before it have run."""
        shards = sharding.batch_shards(self.mesh)
        kinds = {p.kind for p in self.phases}
        for section, kind in (("sft", "sft"), ("reward", "reward"), ("policy", "policy")):
            size = getattr(self.cfg, section).batch_size
            if kind in kinds and size % shards:
                raise ConfigError(
                    f"{section}.batch_size={size} does not divide over the {shards} batch shards of the mesh "
                    f"(mesh.data x mesh.fsdp = {dict(self.mesh.shape)}); use a multiple of {shards}.")

    def _check_workdir(self) -> None:
        saved = self.workdir / "run.yaml"
        if not saved.is_file():
            return
        import yaml

        old = yaml.safe_load(saved.read_text()) or {}
        old_run = old.get("run", {})
        if (old_run.get("name"), old_run.get("method")) != (self.cfg.run.name, self.cfg.run.method) and not self.force:
            raise ConfigError(
                f"{self.workdir} holds a different run (name={old_run.get('name')!r}, method={old_run.get('method')!r}"
                f"); choose another --workdir, or pass --force to reuse it (finished phases are then redone).")

    def _records(self, ds, key: str):
        from jaxalign.data.sources import load_records

        records, report = load_records(ds.source, split=ds.split, name=ds.name or None, format=ds.format,
                                       limit=ds.limit or None, data_dir=ds.data_dir or None)
        report.name = f"{key} ({ds.source}:{ds.split})"
        self.data_reports.append(report)
        return records

    @staticmethod
    def _buckets(max_length: int) -> tuple[int, ...]:
        from jaxalign.data.loader import length_buckets

        return length_buckets(max_length, min_length=min(64, max_length))

    # ---- phase bookkeeping --------------------------------------------------------------------------------------
    def phase_dir(self, phase: Phase | str) -> Path:
        name = phase.dir_name if isinstance(phase, Phase) else phase.replace("/", "_")
        return self.workdir / "phases" / name

    def fingerprint(self, phase: Phase) -> str:
        return config_lib.section_fingerprint(self.cfg, "model", "data", "mesh", *SECTIONS[phase.kind]) + \
            f"-seed{self.cfg.run.seed}"

    def done(self, phase: Phase) -> dict | None:
        marker = self.phase_dir(phase) / "done.json"
        return json.loads(marker.read_text()) if marker.is_file() else None

    def run(self) -> dict[str, Any]:
        from jaxalign.pipeline import report as report_lib

        self.prepare()
        redo_from = None
        for i, phase in enumerate(self.phases):
            info = self.done(phase)
            if info and info["fingerprint"] != self.fingerprint(phase):
                if not self.force:
                    raise ConfigError(
                        f"phase {phase.name} finished with different settings (sections "
                        f"{', '.join(('model', 'data', 'mesh') + SECTIONS[phase.kind])}); re-run with the original "
                        f"config, use another --workdir, or pass --force to redo it and every later phase.")
                redo_from = i
                break
        if redo_from is not None:
            for phase in self.phases[redo_from:]:
                shutil.rmtree(self.phase_dir(phase), ignore_errors=True)
        for phase in self.phases:
            if self.done(phase):
                print(f"[jaxalign] {phase.name}: finished earlier, skipped")
                continue
            print(f"[jaxalign] {phase.name}: {phase.kind} (round {phase.round})")
            t0 = time.time()
            self.phase_dir(phase).mkdir(parents=True, exist_ok=True)
            metrics = getattr(self, f"_run_{phase.kind}")(phase) or {}
            info = {"phase": phase.name, "kind": phase.kind, "round": phase.round, "fingerprint":
                    self.fingerprint(phase), "seconds": time.time() - t0, "metrics": metrics}
            if jax.process_index() == 0:
                _write_atomic(self.phase_dir(phase) / "done.json", json.dumps(info, indent=2))
                report_lib.write_report(self)
        summary = report_lib.summary(self)
        print(summary)
        return report_lib.round_table(self)

    # ---- models -------------------------------------------------------------------------------------------------
    def _load_policy(self, folder: Path):
        from jaxalign.models.hf_io import read_params

        return read_params(folder, self.model_cfg, mesh=self.mesh)

    def sft_dir(self) -> Path:
        d = self.phase_dir("sft") / "model"
        return d if d.is_dir() else self.model_dir

    def policy_dir(self, round_: int) -> Path:
        """The policy after round ``round_`` (round 0: the SFT model)."""
        for k in range(round_, 0, -1):
            d = self.phase_dir(f"r{k}/policy") / "model"
            if d.is_dir():
                return d
        return self.sft_dir()

    def _save_model(self, params, phase: Phase, reward: bool = False) -> Path:
        """Write the phase's final model as HF safetensors (every process joins the gather; process 0 writes)."""
        from jaxalign.models import Decoder, RewardModel, save_pretrained

        out = self.phase_dir(phase) / "model"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            params = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in params.items()}
        if jax.process_index() == 0:
            save_pretrained((RewardModel if reward else Decoder)(self.model_cfg, dict(params)), out)
        return out

    def _train(self, kind, params, examples, phase: Phase, section, step_cfg, ref_params=None):
        from jaxalign.train.optim import OptimConfig
        from jaxalign.train.run import PhaseSettings, train

        s = section
        optim = OptimConfig(name=s.optimizer, learning_rate=s.learning_rate, schedule=s.schedule,
                            warmup_ratio=s.warmup_ratio, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm)
        rel = self.cfg.reliability
        settings = PhaseSettings(global_batch_size=s.batch_size, num_epochs=s.epochs, max_steps=s.max_steps,
                                 seed=self.cfg.run.seed + 1000 * phase.round, save_every=s.save_every,
                                 keep_checkpoints=rel.keep_checkpoints, async_checkpointing=rel.async_checkpointing,
                                 skip_nonfinite=rel.skip_nonfinite, pack=getattr(s, "pack", False),
                                 show_progress=self.cfg.run.show_progress)
        if len(examples) < s.batch_size:
            raise ConfigError(f"phase {phase.name}: {len(examples)} examples do not fill one batch of "
                              f"{phase.kind if kind != 'preference' else 'policy'}.batch_size={s.batch_size}.")
        return train(kind=kind, cfg=self.model_cfg, params=params, examples=examples, phase_dir=self.phase_dir(phase),
                     mesh=self.mesh, step_cfg=step_cfg, optim=optim, settings=settings, pad_id=self.pad_id,
                     buckets=self.buckets, ref_params=ref_params, counters=self.counters, name=phase.name)

    def _final_metrics(self, phase: Phase) -> dict[str, float]:
        from jaxalign.metrics import read_metrics

        # latest_only: a resumed phase re-logs the steps after its last checkpoint; count each step once
        rows = [r for r in read_metrics(self.phase_dir(phase) / "tb", latest_only=True) if r.get("split") == "train"]
        if not rows:
            return {}
        last = rows[-1]
        out = {k: last[k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in last}
        out["tokens_per_second"] = float(np.mean([r["tokens_per_second"] for r in rows[1:] or rows]))
        out["steps"] = len(rows)
        return out

    # ---- phases -------------------------------------------------------------------------------------------------
    def _run_sft(self, phase: Phase):
        from jaxalign.data.tokenize import sft_example
        from jaxalign.train.steps import StepConfig

        examples = [sft_example(e) for e in self.train_encoded if e.chosen is not None]
        params = self._load_policy(self.model_dir)
        params = self._train("sft", params, examples, phase, self.cfg.sft,
                             StepConfig("sft", accum_steps=self.cfg.sft.accum_steps))
        self._save_model(params, phase)
        return self._final_metrics(phase)

    def _generate(self, params, prompts, *, num_samples, temperature, max_new_tokens, seed):
        from jaxalign.sampling import generate_from_params

        s = self.cfg.sample
        return generate_from_params(params, self.model_cfg, prompts, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=s.top_p if temperature > 0 else 1.0,
                                    top_k=s.top_k if temperature > 0 else 0, seed=seed, num_samples=num_samples,
                                    mesh=self.mesh, batch_size=s.batch_size or None,
                                    show_progress=self.cfg.run.show_progress)

    def sample_prompts(self) -> list[Any]:
        encoded = [e for e in self.train_encoded if e.chosen is not None]
        return encoded[: self.cfg.sample.limit] if self.cfg.sample.limit else encoded

    def _run_sample(self, phase: Phase):
        cfg = self.cfg
        prompts = self.sample_prompts()
        n = cfg.policy.num_samples if cfg.policy.pairs == "best_of_n" and cfg.run.method != "afd" else 1
        params = self._load_policy(self.policy_dir(phase.round - 1))
        res = self._generate(params, [e.prompt_ids.tolist() for e in prompts], num_samples=n,
                             temperature=cfg.sample.temperature, max_new_tokens=cfg.sample.max_new_tokens,
                             seed=cfg.run.seed * 7919 + phase.round)
        out = {"row_ids": [e.row_id for e in prompts], "num_samples": n, "samples": res.grouped_tokens}
        metrics = {"tokens_per_second": res.stats.tokens_per_s, "samples": len(res.tokens),
                   "mean_length": float(np.mean([len(t) for t in res.tokens]))}
        if cfg.run.method == "afd":  # Init-SFT: negatives from the initial model
            init = self._load_policy(self.model_dir)
            neg = self._generate(init, [e.prompt_ids.tolist() for e in prompts], num_samples=1,
                                 temperature=cfg.sample.temperature, max_new_tokens=cfg.sample.max_new_tokens,
                                 seed=cfg.run.seed * 7919 + 104729)
            out["negatives"] = neg.grouped_tokens
        elif cfg.run.method == "irl" and cfg.sample.negative_temperature >= 0:
            # the reward model's rejected responses, sampled apart from the best-of-N candidates (IRL authors: 0.01)
            neg = self._generate(params, [e.prompt_ids.tolist() for e in prompts], num_samples=1,
                                 temperature=cfg.sample.negative_temperature,
                                 max_new_tokens=cfg.sample.max_new_tokens, seed=cfg.run.seed * 7919 + phase.round + 1)
            out["negatives"] = neg.grouped_tokens
        if jax.process_index() == 0:
            (self.phase_dir(phase) / "samples.json").write_text(json.dumps(out))
        return metrics

    def _samples(self, round_: int) -> dict:
        return json.loads((self.phase_dir(f"r{round_}/sample") / "samples.json").read_text())

    def _pair(self, enc, chosen_seq, rejected_seq) -> dict:
        return {"chosen_ids": chosen_seq.ids, "chosen_mask": chosen_seq.mask, "rejected_ids": rejected_seq.ids,
                "rejected_mask": rejected_seq.mask, "prompt_ids": enc.prompt_ids, "row_id": np.int32(enc.row_id)}

    def _strip_eos(self, tokens):
        return [t for t in tokens if t != self.encoder.eos_id]

    def _reward_pairs(self, round_: int) -> list[dict]:
        by_row = {e.row_id: e for e in self.train_encoded}
        rounds = range(1, round_ + 1) if self.cfg.reward.accumulate_pairs else [round_]
        pairs = []
        for k in rounds:
            s = self._samples(k)
            for i, row in enumerate(s["row_ids"]):
                enc = by_row[row]
                if self.cfg.run.method == "afd":
                    pos = self.encoder.encode_sampled(enc.prompt_ids, self._strip_eos(s["samples"][i][0]))
                    neg = self.encoder.encode_sampled(enc.prompt_ids, self._strip_eos(s["negatives"][i][0]))
                    pairs.append(self._pair(enc, pos, neg))
                else:  # IRL: the demonstration is chosen, the policy's own sample rejected
                    sample = (s["negatives"] if "negatives" in s else s["samples"])[i][0]
                    own = self.encoder.encode_sampled(enc.prompt_ids, self._strip_eos(sample))
                    pairs.append(self._pair(enc, enc.chosen, own))
        return pairs

    def reward_dir(self, round_: int) -> Path | None:
        d = self.phase_dir(f"r{round_}/reward") / "model"
        return d if d.is_dir() else None

    def _run_reward(self, phase: Phase):
        from jaxalign.models.reward import RewardModel
        from jaxalign.train.steps import StepConfig

        cfg = self.cfg
        init_dir = (self.reward_dir(phase.round - 1) if not cfg.reward.reinit_each_round and phase.round > 1
                    else None) or Path(cfg.model.reward_path or self.sft_dir())
        rm = RewardModel.from_pretrained(init_dir, mesh=self.mesh, seed=cfg.run.seed + phase.round,
                                         dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                         remat=cfg.model.remat)
        pairs = self._reward_pairs(phase.round)
        params = self._train("reward", rm.param_dict(), pairs, phase, cfg.reward,
                             StepConfig("reward", accum_steps=cfg.reward.accum_steps, margin=cfg.reward.margin,
                                        center_coef=cfg.reward.center_coef, reward_loss=cfg.reward.loss))
        self._save_model(params, phase, reward=True)
        # normalise scores by the RM's mean / std on the training demonstrations (as the IRL authors do)
        demos = [e.chosen for e in self.sample_prompts()]
        scores = self._score(params, [d.ids for d in demos])
        norm = {"mean": float(np.mean(scores)), "std": float(np.std(scores) + 1e-6)}
        (self.phase_dir(phase) / "normalization.json").write_text(json.dumps(norm))
        return {**self._final_metrics(phase), "demo_score_mean": norm["mean"], "demo_score_std": norm["std"]}

    def _score(self, rm_params, sequences, batch: int = 32) -> np.ndarray:
        """RM scores of token sequences (prompt + response), right-padded in buckets."""
        from jaxalign.data.loader import bucket_for
        from jaxalign.train.steps import make_eval_rewards

        fn = make_eval_rewards(self.model_cfg, self.mesh)
        shards = sharding.batch_shards(self.mesh)
        batch = max(shards, (batch // shards) * shards)
        out = []
        for i in range(0, len(sequences), batch):
            chunk = [np.asarray(s, np.int32) for s in sequences[i:i + batch]]
            n = len(chunk)
            chunk += [chunk[-1]] * (batch - n)
            length = bucket_for(max(len(s) for s in chunk), self.buckets + (max(len(s) for s in chunk),))
            ids = np.full((batch, length), self.pad_id, np.int32)
            attn = np.zeros((batch, length), np.int32)
            for j, s in enumerate(chunk):
                ids[j, :len(s)], attn[j, :len(s)] = s, 1
            dev = sharding.shard_batch({"ids": ids, "attn": attn}, self.mesh)
            out.append(np.asarray(jax.device_get(fn(rm_params, dev["ids"], dev["attn"])))[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def _policy_pairs(self, phase: Phase) -> list[dict]:
        cfg = self.cfg
        if cfg.policy.pairs == "dataset":
            from jaxalign.data.tokenize import pair_example

            return [pair_example(e) for e in self.train_encoded if e.rejected is not None]
        by_row = {e.row_id: e for e in self.train_encoded}
        s = self._samples(phase.round)
        if cfg.policy.pairs == "demo_vs_sample":
            return [self._pair(by_row[row], by_row[row].chosen,
                               self.encoder.encode_sampled(by_row[row].prompt_ids, self._strip_eos(s["samples"][i][0])))
                    for i, row in enumerate(s["row_ids"])]
        # best_of_n: score the N samples with this round's RM, pick pairs by the configured rule
        import jax.numpy as jnp

        from jaxalign.losses import PAIR_RULES
        from jaxalign.models.hf_io import read_params

        rm_params = read_params(self.reward_dir(phase.round), self.model_cfg, mesh=self.mesh, include_lm_head=False)
        rm_params["score"] = jnp.asarray(np.asarray(self._rm_score_weight(phase.round)))
        seqs, index = [], []
        for i, row in enumerate(s["row_ids"]):
            for j, sample in enumerate(s["samples"][i]):
                seqs.append(self.encoder.encode_sampled(by_row[row].prompt_ids, self._strip_eos(sample)))
                index.append((i, j))
        scores = self._score(rm_params, [q.ids for q in seqs]).reshape(len(s["row_ids"]), s["num_samples"])
        if cfg.policy.pair_rule not in PAIR_RULES:
            raise ConfigError(f"policy.pair_rule={cfg.policy.pair_rule!r}; choose {', '.join(PAIR_RULES)}.")
        key = jax.random.PRNGKey(cfg.run.seed + phase.round)
        ci, ri = PAIR_RULES[cfg.policy.pair_rule](jnp.asarray(scores), key)
        ci, ri = np.asarray(ci), np.asarray(ri)
        n = s["num_samples"]
        return [self._pair(by_row[row], seqs[i * n + ci[i]], seqs[i * n + ri[i]])
                for i, row in enumerate(s["row_ids"]) if ci[i] != ri[i]]

    def _rm_score_weight(self, round_: int):
        from jaxalign.models.hf_io import SafetensorsCheckpoint

        return SafetensorsCheckpoint(self.reward_dir(round_)).get("score.weight").reshape(-1).astype(self.model_cfg.param_dtype)

    def _run_policy(self, phase: Phase):
        from jaxalign.train.steps import StepConfig

        cfg = self.cfg
        pairs = self._policy_pairs(phase)
        init_dir = self.policy_dir(phase.round - 1)
        params = self._load_policy(init_dir)
        ref_dir = init_dir if cfg.policy.reference == "previous" else self.sft_dir()
        if cfg.policy.reference not in ("sft", "previous"):
            raise ConfigError(f"policy.reference={cfg.policy.reference!r}; choose sft or previous.")
        objective, overrides = policy_objective(cfg)
        ref_params = self._load_policy(ref_dir) if objective.uses_reference else None
        mode = "params" if objective.uses_reference else "none"
        if ref_params is not None and cfg.policy.precompute_reference:
            from jaxalign.train.reference import precompute_reference_logps

            micro = cfg.policy.batch_size // cfg.policy.accum_steps
            pairs = precompute_reference_logps(ref_params, self.model_cfg, pairs, reduce=objective.reduce,
                                               mesh=self.mesh, batch_size=micro, pad_id=self.pad_id,
                                               buckets=self.buckets, cache_dir=self.phase_dir(phase) / "reference")
            ref_params, mode = None, "precomputed"  # the weights leave the devices before training starts
        step_cfg = StepConfig("preference", accum_steps=cfg.policy.accum_steps, objective=cfg.policy.objective,
                              objective_args=tuple(sorted(overrides.items())), reference=mode)
        params = self._train("preference", params, pairs, phase, cfg.policy, step_cfg, ref_params=ref_params)
        self._save_model(params, phase)
        return {**self._final_metrics(phase), "pairs": len(pairs)}

    def _run_eval(self, phase: Phase):
        from jaxalign.pipeline.evaluate import evaluate

        return evaluate(self, phase)
