"""``report.md`` with PNG plots, rewritten after every phase: people would rather look than read."""
from __future__ import annotations

import io
import json
from typing import Any

import matplotlib
from etils import epath

from jaxalign import config as config_lib
from jaxalign.metrics import read_metrics
from jaxalign.pipeline.context import RunContext

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

PHASE_KEYS = ("steps", "loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies", "tokens_per_second",
              "gold")
ROUND_KEYS = ("gold", "rm_heldout_accuracy", "rm_demo_vs_sample_accuracy", "rm_win_rate_vs_sft", "bon_gold", "bon_rm_win_rate_vs_sft",
              "answer_length")


def _done(ctx: RunContext) -> list[dict]:
    return [info for info in (ctx.workdir.done(phase) for phase in ctx.phases) if info]


def round_table(ctx: RunContext) -> list[dict[str, Any]]:
    """One row per round (0 = SFT): eval metrics, the round's training metrics, tokens/s and time."""
    rows: dict[int, dict[str, Any]] = {}
    for info in _done(ctx):
        r = rows.setdefault(info["round"], {"round": info["round"], "seconds": 0.0})
        r["seconds"] += info["seconds"]
        m = info["metrics"]
        if info["kind"] == "eval":
            r.update({k: m[k] for k in ROUND_KEYS if k in m})
        elif info["kind"] == "reward":
            r["rm_train_accuracy"] = m.get("rewards/accuracies")
            r["rm_tokens_per_second"] = m.get("tokens_per_second")
        elif info["kind"] in ("policy", "sft"):
            r[f"{info['kind']}_loss"] = m.get("loss")
            r[f"{info['kind']}_tokens_per_second"] = m.get("tokens_per_second")
            # pair objectives log rewards/accuracies; on-policy steps the RM score of their fresh samples and the KL
            for key, name in (("rewards/accuracies", "policy_reward_accuracy"), ("objective/scores", "policy_scores"),
                              ("objective/kl", "policy_kl")):
                if info["kind"] == "policy" and key in m:
                    r[name] = m[key]
        elif info["kind"] == "sample":
            r["sample_tokens_per_second"] = m.get("tokens_per_second")
    return [rows[k] for k in sorted(rows)]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _save(fig, path: epath.Path) -> None:
    # rendered in memory and written through epath: the work directory may be a bucket
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def _plots(ctx: RunContext, table: list[dict]) -> list[str]:
    out_dir = ctx.workdir.plots
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    keys = [k for k in ROUND_KEYS[:3] if any(k in r for r in table)]
    if keys:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            xs = [r["round"] for r in table if k in r]
            ax.plot(xs, [r[k] for r in table if k in r], marker="o", label=k)
        ax.set_xlabel("round (0 = SFT)")
        ax.set_xticks([r["round"] for r in table])
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("per-round evaluation")
        fig.tight_layout()
        _save(fig, out_dir / "rounds.png")
        made.append("plots/rounds.png")
    curves = []
    for phase in ctx.phases:
        logged = read_metrics(ctx.workdir.phase(phase) / "tb", latest_only=True)
        rows = [r for r in logged if r.get("split") == "train"]
        if rows:
            curves.append((phase.name, rows, [r for r in logged if r.get("split") == "eval"]))
    if curves:
        onpolicy = any("objective/scores" in rows[0] for _, rows, _ in curves)
        fig, axes = plt.subplots(1, 3 if onpolicy else 2, figsize=(15 if onpolicy else 10, 3.5))
        for name, rows, evals in curves:
            line, = axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
            acc = [(r["step"], r["rewards/accuracies"]) for r in rows if "rewards/accuracies" in r]
            if acc:
                axes[1].plot(*zip(*acc), color=line.get_color(), label=name)
            # held-out evaluations (TRL's eval_loss, eval_rewards/accuracies): markers on the same colour
            for ax, key in ((axes[0], "loss"), (axes[1], "rewards/accuracies")):
                points = [(r["step"], r[key]) for r in evals if key in r]
                if points:
                    ax.plot(*zip(*points), linestyle="--", marker="o", color=line.get_color(),
                            label=f"{name} eval_{key}")
            scores = [(r["step"], r["objective/scores"]) for r in rows if "objective/scores" in r]
            if scores:
                axes[2].plot(*zip(*scores), color=line.get_color(), label=name)
        if onpolicy:
            axes[2].set_title("objective/scores (RM score of fresh samples, normalised)")
        axes[0].set_title("loss (train; eval dashed)")
        axes[1].set_title("rewards/accuracies (train; eval dashed)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # (no accuracy curve before a reward / policy phase)
                ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, out_dir / "curves.png")
        made.append("plots/curves.png")
    return made


def _samples_table(ctx: RunContext) -> str:
    evals = []
    for phase in ctx.phases:
        f = ctx.workdir.eval_file(phase)
        if phase.kind == "eval" and f.is_file():
            evals.append((phase.round, json.loads(f.read_text())))
    if not evals:
        return ""
    n = min(ctx.cfg.eval.table_rows, len(evals[0][1]["prompts"]))
    cols = ["prompt", "demonstration"] + [("SFT" if r == 0 else f"round {r}") for r, _ in evals]
    clean = lambda s: str(s).replace("|", "\\|").replace("\n", " ")[:160]  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i in range(n):
        first = evals[0][1]
        cells = [first["prompts"][i], first["demonstrations"][i]] + [e["answers"][i] for _, e in evals]
        lines.append("| " + " | ".join(clean(c) for c in cells) + " |")
    return "\n".join(lines)


def summary(ctx: RunContext) -> str:
    lines = ["Run summary (counted skips and changes):"]
    for rep in ctx.data_reports:
        lines.append("  " + rep.summary().replace("\n", "\n  "))
    for k, v in sorted(ctx.counters.items()):
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def outputs(ctx: RunContext) -> str:
    """The run's last lines: where the last trained model (and its PEFT adapter), the report and the curves are."""
    root = ctx.workdir.root
    lines = []
    trained = [p for p in ctx.phases if p.kind in ("sft", "reward", "policy") and ctx.workdir.done(p)]
    if trained:
        folder = ctx.workdir.phase(trained[-1])
        head = "AutoModelForSequenceClassification" if trained[-1].kind == "reward" else "AutoModelForCausalLM"
        lines.append(f"[jaxalign] final model ({trained[-1].name}): {folder / 'model'}  "
                     f"(transformers: {head}.from_pretrained(that folder))")
        if (folder / "adapter").exists():
            lines.append(f"[jaxalign] its LoRA adapter for PEFT: {folder / 'adapter'}")
    lines.append(f"[jaxalign] report: {root / 'report.md'}; curves: tensorboard --logdir {root / 'phases'}")
    return "\n".join(lines)


def write_report(ctx: RunContext) -> epath.Path:
    table = round_table(ctx)
    plots = _plots(ctx, table)
    keys = ["round"] + [k for k in ("gold", "rm_heldout_accuracy", "rm_demo_vs_sample_accuracy",
                                    "rm_win_rate_vs_sft", "bon_gold",
                                    "bon_rm_win_rate_vs_sft", "rm_train_accuracy",
                                    "policy_loss", "policy_reward_accuracy", "policy_scores", "policy_kl", "sft_loss", "answer_length",
                                    "sample_tokens_per_second", "policy_tokens_per_second", "seconds")
                        if any(k in r for r in table)]
    phases = _done(ctx)
    parts = [
        f"# jaxalign run: {ctx.cfg.run.name} ({ctx.cfg.run.method})",
        f"Work directory `{ctx.workdir.root}`; {len(phases)} of {len(ctx.phases)} phases finished; "
        f"total {sum(x['seconds'] for x in phases):.0f} s.",
        "## Rounds", _table(table, keys),
        *[f"![{x}]({x})" for x in plots],
        "## Phases",
        _table([{"phase": x["phase"], "kind": x["kind"], "seconds": x["seconds"],
                 **{k: v for k, v in x["metrics"].items() if k in PHASE_KEYS}}
                for x in phases], ["phase", "kind", "seconds", *PHASE_KEYS]),
        "## Samples", _samples_table(ctx) or "(no evaluation yet)",
        "## Data and skips", "```\n" + summary(ctx) + "\n```",
        "## Config", "```yaml\n" + config_lib.dump(ctx.cfg) + "```",
    ]
    out = ctx.workdir.report
    out.write_text("\n\n".join(parts) + "\n")
    return out
