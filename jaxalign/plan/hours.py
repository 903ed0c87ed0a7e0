"""What a round costs: the sampling phases' bytes read per decode step, HBM roofline fraction, tokens/s and hours,
and a recipe round's total (sample + reward + policy + eval) from the compiled phases' estimated step times.

Everything here is arithmetic on the compiled rows (:class:`jaxalign.plan.phases.PhaseRow`) and the config; nothing is
compiled. The assumptions are the printed ones (:data:`ASSUMPTIONS`):

- every response runs to ``max_new_tokens`` (the decode loop stops early only when all rows of a batch stop, so this is
  an upper bound) and every prompt fills the prompt bucket;
- a decode step reads, per chip, the compute-dtype weights it multiplies with (all of them under FSDP: they are gathered
  each step; 1 / tensor of them with a tensor axis) and its shard of the KV cache, every slot (the kernels attend over
  the whole static cache): ``bytes = 2 N_matmul c / t + KV / (b t_kv)``, with ``KV = KV(B, P) + KV(B N, S - P)``
  in the sampler's shared-prefix layout (N > 1: a prompt's slots are read once per group) and ``KV(B N, S)``
  otherwise. The compiled program's
  ``cost_analysis()`` counts the layer scan's body once and the TPU HLO carries no per-instruction byte counts, so the
  bytes come from this arithmetic (the column says so), not from the compiler;
- HBM roofline fraction = (bytes / HBM bandwidth) / the compiler's compute estimate for the step, and / the estimated
  step (max of compute and collectives) in brackets;
- forward passes outside a train step (the RM scoring the samples, a precomputed reference) run at the FLOP rate of the
  compiled step of the same model (the reward step for the RM, the policy step for the reference).
"""
from __future__ import annotations

import dataclasses
import math

ASSUMPTIONS = ("responses run to max_new_tokens and prompts fill the prompt bucket (an upper bound: the loop ends "
               "early only when a whole batch has stopped); bytes read per decode step = the compute-dtype weights "
               "each chip multiplies with (gathered under FSDP) + its KV-cache shard, every slot, a shared prompt's "
               "slots once per group (arithmetic: cost_analysis() counts the scanned layer once); HBM roofline = "
               "those bytes / HBM bandwidth, as a fraction of the compiler's compute estimate (of the est. step in "
               "brackets); forward passes outside a step (RM scoring, a precomputed reference) at the FLOP rate of "
               "that model's compiled train step")


# ---- decode: bytes read per step --------------------------------------------------------------------------------

def decode_bytes_read(mcfg, prompts: int, samples: int, prompt_len: int, cache_len: int, mesh,
                      cache_dtype=None, shared_prefix: bool = True) -> dict[str, float]:
    """Bytes one chip reads from HBM per decode step (module docstring): weights + its KV-cache shard.

    The KV read follows the sampler's layout (``jaxalign.sampling.memory.sampling_bytes_per_device``): with the shared
    prefix (``samples > 1``) each prompt's ``prompt_len`` slots once and each row's ``cache_len - prompt_len`` new
    slots, else ``prompts x samples`` rows of ``cache_len`` slots."""
    import jax.numpy as jnp

    from jaxalign.flops import matmul_params
    from jaxalign.sampling.memory import kv_cache_bytes, kv_head_shards
    from jaxalign.sharding import batch_shards

    tensor = mesh.shape.get("tensor", 1) if mesh is not None else 1
    weights = matmul_params(mcfg) * jnp.dtype(mcfg.dtype).itemsize / tensor
    rows = prompts * samples
    if shared_prefix and samples > 1:
        kv = (kv_cache_bytes(mcfg, prompts, prompt_len, cache_dtype)
              + kv_cache_bytes(mcfg, rows, cache_len - prompt_len, cache_dtype))
    else:
        kv = kv_cache_bytes(mcfg, rows, cache_len, cache_dtype)
    kv /= batch_shards(mesh) * kv_head_shards(mcfg, mesh)
    return {"weights": weights, "kv": kv, "total": weights + kv}


# ---- sampling: tokens/s and hours -------------------------------------------------------------------------------

def generation_seconds(batches: int, prefill_s: float, decode_s: float, max_new: int, prefills: int = 1) -> float:
    """``batches x (prefills x prefill + (max_new - 1) x decode step)``: the prefill samples the first token."""
    return batches * (prefills * prefill_s + (max_new - 1) * decode_s)


@dataclasses.dataclass
class SamplingEstimate:
    label: str  # "sample" | "eval sampling"
    prompts: int  # prompts of the phase (per round)
    samples: int  # N
    batch: int  # prompts per batch
    rows: int  # batch x N
    max_new: int
    bytes_read: dict
    roofline: float | None  # HBM time / the compiler's compute estimate
    roofline_step: float | None  # HBM time / est. step
    tokens_per_s: float | None  # generated tokens per second, the whole slice
    seconds: float | None
    negatives_s: float = 0.0  # IRL / AfD: the one extra sample per prompt (sample.negative_temperature)


def sampling_estimate(pre, dec, sl, cfg) -> SamplingEstimate | None:
    """The estimate for one sampling phase from its prefill and decode rows (``pre.info`` holds the shapes)."""
    i = pre.info
    if not i:
        return None
    hbm_s = i["bytes_read"]["total"] / sl.hbm_bw
    ok = dec.step_s is not None and pre.step_s is not None
    est = SamplingEstimate(
        i["label"], i["prompts"], i["samples"], i["batch"], i["batch"] * i["samples"], i["max_new"], i["bytes_read"],
        hbm_s / dec.compute_s if ok else None, hbm_s / dec.step_s if ok else None,
        i["batch"] * i["samples"] / dec.step_s if ok else None,
        generation_seconds(math.ceil(i["prompts"] / i["batch"]), pre.step_s, dec.step_s, i["max_new"]) if ok else None)
    if ok and i["label"] == "sample" and negatives_drawn(cfg):  # 1 sample per prompt, rows = batch x N prompts
        est.negatives_s = generation_seconds(math.ceil(i["prompts"] / est.rows), pre.step_s, dec.step_s,
                                             i["max_new"], prefills=i["samples"])
    return est


def negatives_drawn(cfg) -> bool:
    """The sample phase also draws one response per prompt apart (IRL's near-greedy negatives, AfD's initial model)."""
    return cfg.run.method == "afd" or (cfg.run.method == "irl" and cfg.sample.negative_temperature >= 0)


# ---- a round ----------------------------------------------------------------------------------------------------

def forward_seconds(train_row, mcfg, sequences: float, seq_len: int, devices: int, *, lm_head: bool) -> float:
    """Seconds for ``sequences`` forward passes of ``seq_len`` tokens at the compiled train step's FLOP rate."""
    from jaxalign.flops import flops_per_token

    fwd = flops_per_token(mcfg, seq_len, backward=False) - (0 if lm_head else 2 * mcfg.hidden_size * mcfg.vocab_size)
    return sequences * seq_len * fwd / devices / (train_row.flops / train_row.step_s)


def round_items(cfg, mcfg, rows, sl, round_: int = 1) -> list[tuple[str, str, float]]:
    """``(item, how counted, seconds)`` of round ``round_`` of a sampling recipe, from the planned rows; the last item
    is the total (the sum of the others). Items whose rows were not planned (or did not compile) are left out."""
    by = {r.phase: r for r in rows}
    n_dev = len(sl.devices)
    T = cfg.data.max_length
    out: list[tuple[str, str, float]] = []

    def sampling(label: str, item: str) -> int:
        pre, dec = by.get(f"{label}: prefill"), by.get(f"{label}: decode")
        est = sampling_estimate(pre, dec, sl, cfg) if pre is not None and dec is not None else None
        if est is None or est.seconds is None:
            return 0
        out.append((item, f"{math.ceil(est.prompts / est.batch)} batch(es) of {est.batch} prompts x {est.samples} x "
                          f"(prefill + {est.max_new - 1} decode steps)", est.seconds))
        if est.negatives_s:
            out.append(("sample: negatives", f"{est.prompts} prompts x 1, {est.rows} rows per batch",
                        est.negatives_s))
        return est.prompts

    prompts = sampling("sample", "sample: draws")
    if "sample: decode" in by and not prompts:  # the sample phase did not compile: no round total to give
        return []
    reward, policy = by.get("reward"), by.get("policy")
    if reward is not None and reward.step_s and prompts:
        pairs = prompts * (round_ if cfg.reward.accumulate_pairs else 1)
        steps = math.ceil(pairs / cfg.reward.batch_size) * cfg.reward.epochs
        out.append(("reward", f"{pairs} pairs / {cfg.reward.batch_size} = {steps} steps", steps * reward.step_s))
    if policy is not None and policy.step_s and prompts and cfg.policy.kind == "pairs":
        n = cfg.policy.num_samples
        if cfg.policy.pairs == "best_of_n" and reward is not None and reward.step_s:
            out.append(("policy: RM scores the samples", f"{prompts} x {n} sequences of {T} tok, forward",
                        forward_seconds(reward, mcfg, prompts * n, T, n_dev, lm_head=False)))
        if cfg.policy.precompute_reference:
            out.append(("policy: reference log-probs", f"{2 * prompts} sequences of {T} tok, forward",
                        forward_seconds(policy, mcfg, 2 * prompts, T, n_dev, lm_head=True)))
        steps = math.ceil(prompts / cfg.policy.batch_size) * cfg.policy.epochs
        out.append(("policy", f"{prompts} pairs / {cfg.policy.batch_size} = {steps} steps", steps * policy.step_s))
    if sampling("eval sampling", "eval: sampling") and reward is not None and reward.step_s:
        seqs = 2 * cfg.eval.num_prompts + 2 * (cfg.data.eval_prefs.limit if cfg.data.eval_prefs.source else 0)
        out.append(("eval: RM scoring", f"{seqs} sequences (answers, SFT answers, held-out pairs), forward",
                    forward_seconds(reward, mcfg, seqs, T, n_dev, lm_head=False)))
    if out:
        out.append((f"round {round_} total", "sum of the above", sum(o[2] for o in out)))
    return out


def format_sampling(cfg, sl, rows) -> str:
    """The sampling phases' table: decode batch, bytes read, roofline, tokens/s and hours."""
    by = {r.phase: r for r in rows}
    lines = []
    for label in ("sample", "eval sampling"):
        pre, dec = by.get(f"{label}: prefill"), by.get(f"{label}: decode")
        est = sampling_estimate(pre, dec, sl, cfg) if pre is not None and dec is not None else None
        if est is None:
            continue
        i, b = pre.info, est.bytes_read
        unshared = (f"{i['unshared_batch']} x {est.samples}" if i.get("unshared_batch") else "-")
        pct = "-" if est.roofline is None else f"{100 * est.roofline:.1f}% ({100 * est.roofline_step:.1f}%)"
        hours = "-" if est.seconds is None else f"{(est.seconds + est.negatives_s) / 3600:.2f}"
        lines.append("| " + " | ".join([
            label, f"{est.batch} x {est.samples} = {est.rows} ({i['batch_source']})",
            f"{i['largest_batch']} x {est.samples}" if i.get("largest_batch") else "-", unshared,
            f"{b['total'] / 1e9:.2f} = {b['weights'] / 1e9:.2f} + {b['kv'] / 1e9:.2f} (arithmetic)",
            f"{1e3 * b['total'] / sl.hbm_bw:.3g}", _g(dec.compute_s, 1e3), _g(dec.step_s, 1e3), pct,
            _g(est.tokens_per_s), f"{est.prompts} x {est.samples} x {est.max_new}"
            + (" (+ negatives x 1)" if est.negatives_s else ""), hours]) + " |")
    if not lines:
        return ""
    cols = ("sampling", "decode batch: prompts x N = rows", "largest that fits", "fits, prompt KV repeated per sample",
            "GB read / step / chip = weights + KV", "HBM ms", "compute ms", "est. step ms", "HBM roofline",
            "tokens/s (slice)", "tokens (prompts x N x new)", "est. hours")
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + lines)


def _g(x, scale: float = 1.0) -> str:
    return "-" if x is None else f"{x * scale:.4g}"


def format_rounds(cfg, mcfg, rows, sl) -> str:
    """The per-round table of a sampling recipe with rounds (IRL, SPIN): one column per round."""
    rounds = cfg.run.num_rounds()
    per = [round_items(cfg, mcfg, rows, sl, k) for k in range(1, rounds + 1)]
    if not per[0]:
        return ""
    head = ["item", "how counted (round 1)"] + [f"round {k} h" for k in range(1, rounds + 1)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, (item, how, _) in enumerate(per[0]):
        name = "round total" if j == len(per[0]) - 1 else item
        lines.append("| " + " | ".join([name, how] + [f"{p[j][2] / 3600:.2f}" if j < len(p) else "-"
                                                      for p in per]) + " |")
    total = sum(p[-1][2] for p in per)
    return "\n".join(lines) + f"\n\n**{rounds} round(s): {total / 3600:.1f} h on {sl.name}** (assumptions: " \
                              f"{ASSUMPTIONS})"
