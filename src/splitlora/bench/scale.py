"""Scale in clients: throughput and peak memory of ``splitlora`` with 1..16 simulated clients.

Each configuration runs in a fresh process (:mod:`splitlora.bench.memproc`), so its peak memory is
its own. All simulated clients share the frozen base weights (the engine's parts are skeleton copies
that share tensors); each adds only its LoRA tensors, optimiser state and a batch stream. With
``server_mode: sequential`` one client's round trip finishes before the next starts, so activations
do not grow with the number of clients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .common import BenchResult, Options, Table, Target, apply_sets, log, pyplot, save_figure
from .memproc import ProbeSpec, probe_all, role_algorithm

NAME = "scale"


@dataclass
class Settings:
    model: str = "smollm2-135m"
    client_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    batch_size: int = 4
    max_length: int = 128
    warmup_steps: int = 1
    steps: int = 2  # timed steps, at least...
    min_timed_batches: int = 8  # ...enough for this many client batches (few clients: more steps)
    server_mode: str = "sequential"
    parallel_probes: int = 1  # probes at a time (>1 only for smoke runs: concurrent probes share the CPU)
    target_max_memory_ratio: float = 1.5

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny-gpt2", client_counts=[1, 3], batch_size=2, max_length=64, steps=1,
                   min_timed_batches=2, parallel_probes=2)


def memory_key(opts: Options) -> tuple[str, str]:
    """Which measurement is "peak memory": GPU allocator peak on CUDA, else peak RSS above baseline."""
    if opts.device.startswith("cuda"):
        return "cuda_peak_mib", "CUDA peak allocated"
    return "peak_above_baseline_mib", "peak RSS above baseline"


def run(opts: Options) -> BenchResult:
    s = apply_sets(Settings.quick() if opts.quick else Settings(), opts.sets, NAME)
    result = BenchResult(NAME, f"Scale in clients: {role_algorithm('simulation')} with "
                               f"{', '.join(map(str, s.client_counts))} simulated clients ({s.model})", asdict(s))
    key, label = memory_key(opts)
    specs = [ProbeSpec(role="simulation", model=s.model, clients=n, batch_size=s.batch_size,
                       max_length=s.max_length, warmup=s.warmup_steps,
                       steps=max(s.steps, math.ceil(s.min_timed_batches / n)), threads=opts.threads,
                       device=opts.device, server_mode=s.server_mode) for n in s.client_counts]
    rows = []
    for n, r in zip(s.client_counts, probe_all(specs, s.parallel_probes)):
        rows.append({"clients": n, **{k: v for k, v in r.items() if k != "spec"},
                     "tokens_per_s_per_client": (r["tokens_per_s"] or 0) / n,
                     "command": opts.command(NAME, {"client_counts": n})})
        if opts.progress:
            log(f"[scale] {n} clients: {r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss_mib']:.0f} MiB "
                f"({r['peak_above_baseline_mib']:.0f} above baseline)")
    base = rows[0]
    for row in rows:
        row["memory_vs_1"] = row[key] / base[key] if base[key] else None
        row["rss_vs_1"] = row["peak_rss_mib"] / base["peak_rss_mib"]
    last = rows[-1]
    result.targets.append(Target(f"{label} at {last['clients']} clients / at {base['clients']}", last["memory_vs_1"],
                                 s.target_max_memory_ratio, "<=", note=f"total peak RSS ratio {last['rss_vs_1']:.3f}"))
    cols = [("clients", "clients", "d"), ("tokens_per_s", "tok/s (all clients)", ",.0f"),
            ("peak_rss_mib", "peak RSS MiB", ",.0f"), ("peak_above_baseline_mib", "above baseline MiB", ",.0f"),
            ("weights_mib", "weights MiB", ",.0f"), ("lora_mib", "LoRA MiB", ",.2f"),
            ("optimizer_mib", "AdamW MiB", ",.2f"), ("activations_peak_mib", "activations MiB", ",.0f"),
            ("memory_vs_1", "memory vs 1 client", ".3f")]
    if key == "cuda_peak_mib":
        cols.insert(4, ("cuda_peak_mib", "CUDA peak MiB", ",.0f"))
    result.tables.append(Table("", cols + [("command", "command", "code")], rows))
    result.tables.append(Table("Probe commands (one fresh process per row)",
                               [("clients", "clients", "d"), ("probe_command", "probe", "code")], rows))
    result.notes += [
        f"batch {s.batch_size} per client, max_length {s.max_length}, synthetic data, cut layer 2, LoRA r=8, "
        f"server_mode {s.server_mode}; {s.warmup_steps} warm-up step(s), then max({s.steps}, "
        f"{s.min_timed_batches}/clients) timed steps; tok/s counts input tokens of all clients.",
        "baseline = resident memory after imports, tokenizer and data, before any weight is read "
        "(interpreter + torch + transformers); 'above baseline' is what the run itself costs.",
        "weights are loaded once and shared by every simulated client; LoRA and AdamW state grow with "
        "the number of clients; activations are those of one round trip (client + server graphs).",
    ]
    result.plots.append(_plot(rows, key, label, s, opts))
    return result


def _plot(rows, key, label, s: Settings, opts: Options) -> str:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [r["clients"] for r in rows]
    a1.plot(xs, [r["tokens_per_s"] for r in rows], marker="o")
    a1.set_xscale("log", base=2)
    a1.set_xticks(xs, [str(x) for x in xs])
    a1.set_xlabel("simulated clients")
    a1.set_ylabel("input tokens / s (all clients)")
    a1.set_title("throughput")
    a2.plot(xs, [r[key] for r in rows], marker="o", label=label)
    a2.plot(xs, [r["peak_rss_mib"] for r in rows], marker="s", label="total peak RSS")
    a2.axhline(rows[0][key] * s.target_max_memory_ratio, ls="--", c="grey", lw=1, label=f"{s.target_max_memory_ratio}x of 1 client")
    a2.set_xscale("log", base=2)
    a2.set_xticks(xs, [str(x) for x in xs])
    a2.set_xlabel("simulated clients")
    a2.set_ylabel("MiB")
    a2.set_ylim(bottom=0)
    a2.set_title("peak memory")
    a2.legend(fontsize=7)
    fig.suptitle(f"splitlora, {s.model}, batch {s.batch_size}/client", fontsize=10)
    return save_figure(fig, opts, "scale")
