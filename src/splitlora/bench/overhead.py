"""Split overhead: training throughput of ``splitlora`` with 1 client vs ``cen``, side by side.

Both algorithms are built in one process on one loaded model, with the same config, batch and data
(their batch streams have the same seed, so block k of one sees the same batches as block k of the
other). After a warm-up, timed blocks of ``block_steps`` steps alternate between the two, in ABBA
order, so that machine noise and drift hit both equally. Throughput is input tokens (attention-mask
tokens) per second of wall time; the CPU time of each block is recorded as well (less sensitive to
other load on the machine). The ratio is reported as ratio of medians and as the median of the
per-repeat (paired) ratios.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import RunConfig
from .common import BenchResult, Options, Table, Target, apply_sets, log, median, pyplot, save_figure, spread
from .harness import build, loaded_model, synchronize

PAIR = ("cen", "splitlora")  # the whole model on one party, and the split it is compared with

NAME = "overhead"


@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m", "gpt2-small"])
    batch_size: int = 8
    max_length: int = 128
    warmup_steps: int = 2
    block_steps: int = 2
    repeats: int = 5
    aggregate_every: int = 5
    target_min_ratio: float = 0.95

    @classmethod
    def quick(cls) -> "Settings":
        return cls(models=["tiny-gpt2"], batch_size=2, max_length=64, warmup_steps=1, block_steps=1, repeats=3)


def _block(built, steps: int, t0: int, device: str) -> dict:
    tokens0, completion = built.tokens.input_tokens, 0
    synchronize(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for t in range(t0, t0 + steps):
        completion += built.algo.step(t).tokens
    synchronize(device)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    tokens = built.tokens.input_tokens - tokens0
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "completion_tokens": completion,
            "tok_s": tokens / wall, "tok_cpu_s": tokens / cpu if cpu > 0 else None}


def measure_model(model: str, s: Settings, opts: Options) -> dict:
    loaded = loaded_model(model, opts.device)
    total = s.warmup_steps + s.repeats * s.block_steps + 1
    built = {}
    for algo in PAIR:
        cfg = RunConfig(algorithm=algo, model=model, clients=1, batch_size=s.batch_size, max_length=s.max_length,
                        steps=total, aggregate_every=s.aggregate_every, threads=opts.threads,
                        device=opts.device).validate()
        built[algo] = build(cfg, loaded, opts.device)
    t = {a: 0 for a in built}
    for algo, b in built.items():  # warm-up (allocator, first-call overheads)
        _block(b, s.warmup_steps, 0, opts.device)
        t[algo] = s.warmup_steps
    blocks: dict[str, list[dict]] = {a: [] for a in built}
    order = PAIR
    for r in range(s.repeats):
        for algo in (order if r % 2 == 0 else order[::-1]):  # ABBA
            blocks[algo].append(_block(built[algo], s.block_steps, t[algo], opts.device))
            t[algo] += s.block_steps
        if opts.progress:
            log(f"[overhead] {model}: repeat {r + 1}/{s.repeats}: "
                + ", ".join(f"{a} {blocks[a][-1]['tok_s']:.0f} tok/s" for a in PAIR))
    base, split = PAIR
    paired = [sp["tok_s"] / c["tok_s"] for sp, c in zip(blocks[split], blocks[base])]
    paired_cpu = [sp["tok_cpu_s"] / c["tok_cpu_s"] for sp, c in zip(blocks[split], blocks[base])
                  if sp["tok_cpu_s"] and c["tok_cpu_s"]]
    med = {a: median([b["tok_s"] for b in blocks[a]]) for a in blocks}
    med_cpu = {a: median([b["tok_cpu_s"] for b in blocks[a]]) for a in blocks}
    n_params = sum(p.numel() for p in loaded.model.parameters())
    del built
    return {
        "model": model, "params_m": n_params / 1e6, f"{base}_tok_s": med[base], f"{split}_tok_s": med[split],
        "ratio": med[split] / med[base], "paired_ratio": median(paired),
        "ratio_cpu": (med_cpu[split] / med_cpu[base]) if med_cpu[base] and med_cpu[split] else None,
        "paired_ratio_cpu": median(paired_cpu),
        f"{base}_spread": spread([b["tok_s"] for b in blocks[base]]),
        f"{split}_spread": spread([b["tok_s"] for b in blocks[split]]),
        "tokens_per_step": blocks[base][0]["tokens"] / s.block_steps,
        "blocks": blocks,
    }


def run(opts: Options) -> BenchResult:
    s = Settings.quick() if opts.quick else Settings()
    s = apply_sets(s, opts.sets, NAME)
    result = BenchResult(NAME, "Split overhead: splitlora (1 client) vs cen throughput", asdict(s))
    rows = []
    for model in s.models:
        row = measure_model(model, s, opts)
        row["command"] = opts.command(NAME, {"models": model})
        rows.append(row)
        result.targets.append(Target(f"{model}: splitlora/cen tokens/s", row["ratio"], s.target_min_ratio, ">=",
                                     note=f"paired {row['paired_ratio']:.3f}; CPU-time ratio "
                                          f"{row['ratio_cpu']:.3f}" if row["ratio_cpu"] else ""))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result.tables.append(Table("", [
        ("model", "model", ""), ("params_m", "params (M)", ".1f"), ("tokens_per_step", "tokens/step", ".0f"),
        ("cen_tok_s", "cen tok/s", ",.0f"), ("splitlora_tok_s", "splitlora tok/s", ",.0f"),
        ("ratio", "ratio", ".3f"), ("paired_ratio", "paired ratio", ".3f"), ("ratio_cpu", "CPU-time ratio", ".3f"),
        ("cen_spread", "cen ±", ".1%"), ("splitlora_spread", "splitlora ±", ".1%"), ("command", "command", "code")],
        [{k: v for k, v in r.items() if k != "blocks"} for r in rows]))
    result.extra["blocks"] = {r["model"]: r["blocks"] for r in rows}
    result.notes += [
        f"batch {s.batch_size}, max_length {s.max_length}, synthetic E2E-style data, LoRA r=8 on both sides, "
        f"cut layer 2, FedAvg every {s.aggregate_every} steps (1 client: a no-op average, still paid for).",
        f"{s.warmup_steps} warm-up steps each, then {s.repeats} repeats of {s.block_steps}-step blocks, "
        "alternating ABBA; tokens = input (attention-mask) tokens; ± = half the range of the repeats.",
        "ratio = median splitlora tok/s / median cen tok/s; paired = median of per-repeat ratios; "
        "CPU-time ratio uses process CPU seconds instead of wall seconds.",
    ]
    result.plots.append(_plot(rows, opts))
    return result


def _plot(rows, opts: Options) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(rows))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["cen_tok_s"] for r in rows], w, label="cen")
    ax.bar([i + w / 2 for i in x], [r["splitlora_tok_s"] for r in rows], w, label="splitlora (1 client)")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ratio']:.2f}x", (i + w / 2, r["splitlora_tok_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [r["model"] for r in rows])
    ax.set_ylabel("input tokens / s")
    ax.set_title("Split overhead (median of repeats)")
    ax.legend()
    return save_figure(fig, opts, "overhead")
