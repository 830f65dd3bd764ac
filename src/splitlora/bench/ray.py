"""The Ray backend's cost: throughput vs number of client actors, against the in-process engine.

For each model and each number of clients N (1, 2, 4, 8) the same ``splitlora`` run is built twice on
this machine: in process (every party in this process, :class:`~splitlora.simulation.inprocess.InProcessGrid`)
and on a local Ray cluster (N client actors, each hosting one :class:`~splitlora.runtime.client.ClientApp`;
:class:`~splitlora.simulation.ray_grid.RayGrid`). The server and the algorithm run in this process
in both (as they do in the server actor), so the difference per step is the engine's: Ray's task
submission, serialisation and object transfers, and, where cores allow it, the clients' parallel
work. After a warm-up, timed blocks alternate between the two in ABBA order.

Also measured: a bare actor round trip (``ping``: one task, one result), each actor's peak resident
memory (its own copy of the base weights, its client's LoRA, optimiser state and data), and the
fixed costs of a run (cluster start, actors start). Every party uses ``threads`` torch threads (Ray
gives an actor as many as it reserved CPUs, at least 1; the in-process run is set to the same), so
on a 2-core machine no speed-up is expected: the point is the engine's cost per step.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field

from ..config import RayOptions, RunConfig
from .common import BenchResult, Options, Table, apply_sets, log, median, pyplot, save_figure

NAME = "ray"


@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: ["tiny-gpt2", "gpt2-small"])
    client_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 4
    max_length: int = 64
    server_mode: str = "sequential"
    aggregate_every: int = 5
    warmup_steps: int = 1
    block_steps: int = 2
    repeats: int = 3
    threads: int = 1  # torch threads of every party (Ray's default for a 1-CPU actor)
    pings: int = 30

    @classmethod
    def quick(cls) -> "Settings":
        return cls(models=["tiny-gpt2"], client_counts=[1, 2], batch_size=2, max_length=48, block_steps=1,
                   repeats=1, pings=10)


class _Tokens:
    """Input tokens the clients sent up (attention-mask tokens), counted on the grid."""

    def __init__(self):
        self.n = 0

    def __call__(self, direction, client, message, nbytes):
        mask = getattr(message, "attention_mask", None)
        if direction == "up" and mask is not None:
            self.n += int(mask.sum())


@dataclass
class _Engine:
    algo: object
    grid: object
    tokens: _Tokens
    t: int = 0

    def block(self, steps: int) -> dict:
        tokens0 = self.tokens.n
        t0 = time.perf_counter()
        for _ in range(steps):
            self.algo.step(self.t)
            self.t += 1
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "step_s": wall / steps, "tokens": self.tokens.n - tokens0,
                "tok_s": (self.tokens.n - tokens0) / wall}


def _config(model: str, n: int, s: Settings, opts: Options) -> RunConfig:
    total = s.warmup_steps + s.repeats * 2 * s.block_steps + 1
    return RunConfig(algorithm="splitlora", model=model, clients=n, batch_size=s.batch_size,
                     max_length=s.max_length, steps=total, aggregate_every=s.aggregate_every,
                     server_mode=s.server_mode, synthetic_examples=max(600, 40 * n * s.batch_size),
                     threads=s.threads, device=opts.device).validate()


def _in_process(cfg: RunConfig, loaded, opts: Options) -> _Engine:
    from .harness import build

    built = build(cfg, loaded, opts.device)
    tokens = _Tokens()
    built.grid.observers.append(tokens)
    return _Engine(built.algo, built.grid, tokens)


def _on_ray(cfg: RunConfig, loaded, s: Settings, opts: Options):
    """(engine, actors, seconds to start them) with N client actors and the server here."""
    from ..algorithms import ALGORITHMS
    from ..device import setup_torch
    from ..models.parts import SharedModel
    from ..simulation.ray_backend import start_clients
    from ..simulation.ray_grid import RayGrid

    ray_opts = RayOptions(backend="ray", client_cpus=0.01, server_cpus=0.0, timeout=600.0).validate(cfg)
    t0 = time.perf_counter()
    actors, hosts, clients = start_clients(cfg, ray_opts)
    started = time.perf_counter() - t0
    setup_torch(cfg.seed, cfg.threads)
    grid = RayGrid(hosts, clients, cfg.wire_dtype, ray_opts.timeout)
    tokens = _Tokens()
    grid.observers.append(tokens)
    algo = ALGORITHMS[cfg.algorithm](cfg, SharedModel(loaded, cfg, opts.device), grid, opts.device)
    algo.join(0)
    return _Engine(algo, grid, tokens), actors, started


def _ping_ms(ray, actors, n: int) -> float:
    times = []
    for _ in range(n):
        for a in actors:
            t0 = time.perf_counter()
            ray.get(a.memory.remote())
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(model: str, n: int, s: Settings, opts: Options) -> dict:
    import ray

    from ..simulation.ray_backend import stop_actors
    from .harness import loaded_model
    from ..device import rss_mib

    loaded = loaded_model(model, opts.device)
    cfg = _config(model, n, s, opts)
    local = _in_process(cfg, loaded, opts)
    remote, actors, start_s = _on_ray(cfg, loaded, s, opts)
    try:
        for e in (local, remote):
            e.block(s.warmup_steps)
        blocks = {"inprocess": [], "ray": []}
        for r in range(s.repeats):
            order = [("inprocess", local), ("ray", remote)]
            for name, e in (order if r % 2 == 0 else order[::-1]):  # ABBA
                blocks[name].append(e.block(s.block_steps))
        ping = _ping_ms(ray, actors, s.pings)
        memory = ray.get([a.memory.remote() for a in actors])
    finally:
        stop_actors(actors)
    step = {k: median([b["step_s"] for b in v]) for k, v in blocks.items()}
    tok = {k: median([b["tok_s"] for b in v]) for k, v in blocks.items()}
    actor_peak = [m["peak_rss_mib"] for m in memory]
    row = {"model": model, "clients": n, "actors": len(actors), "tokens_per_step": blocks["ray"][0]["tokens"] / s.block_steps,
           "inprocess_step_s": step["inprocess"], "ray_step_s": step["ray"],
           "overhead_ms": (step["ray"] - step["inprocess"]) * 1e3,
           "overhead_per_client_ms": (step["ray"] - step["inprocess"]) * 1e3 / n,
           "inprocess_tok_s": tok["inprocess"], "ray_tok_s": tok["ray"], "ratio": tok["ray"] / tok["inprocess"],
           "ping_ms": ping, "actor_peak_rss_mib": median(actor_peak), "actor_peak_rss_max_mib": max(actor_peak),
           "actors_start_s": start_s, "driver_rss_mib": rss_mib(), "blocks": blocks}
    if opts.progress:
        log(f"[ray] {model}, {n} clients: in-process {step['inprocess'] * 1e3:.0f} ms/step, ray "
            f"{step['ray'] * 1e3:.0f} ms/step ({row['overhead_ms']:+.0f} ms), ping {ping:.1f} ms, "
            f"actor peak RSS {row['actor_peak_rss_mib']:.0f} MiB")
    return row


def run(opts: Options) -> BenchResult:
    from ..simulation.ray_backend import import_ray

    ray = import_ray()
    s = apply_sets(Settings.quick() if opts.quick else Settings(), opts.sets, NAME)
    result = BenchResult(NAME, "Ray backend: throughput vs client actors, against the in-process engine", asdict(s))
    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    if started_here:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t0
    rows = []
    try:
        for model in s.models:
            for n in s.client_counts:
                row = measure(model, n, s, opts)
                row["command"] = opts.command(NAME, {"models": model, "client_counts": n})
                rows.append(row)
    finally:
        if started_here:
            ray.shutdown()
    result.tables.append(Table("", [
        ("model", "model", ""), ("clients", "clients (= actors)", "d"), ("tokens_per_step", "tokens/step", ".0f"),
        ("inprocess_step_s", "in-process s/step", ".3f"), ("ray_step_s", "Ray s/step", ".3f"),
        ("overhead_ms", "Ray - in-process ms/step", "+.0f"), ("overhead_per_client_ms", "per client batch ms", "+.1f"),
        ("inprocess_tok_s", "in-process tok/s", ",.0f"), ("ray_tok_s", "Ray tok/s", ",.0f"), ("ratio", "Ray/in-process", ".2f"),
        ("ping_ms", "actor round trip ms", ".1f"), ("actor_peak_rss_mib", "peak RSS per actor MiB", ",.0f"),
        ("actors_start_s", "actors start s", ".1f"), ("command", "command", "code")],
        [{k: v for k, v in r.items() if k != "blocks"} for r in rows]))
    result.extra["blocks"] = {f"{r['model']}/{r['clients']}": r["blocks"] for r in rows}
    result.extra["ray_init_s"] = init_s
    result.extra["ray_version"] = ray.__version__
    result.notes += [
        f"splitlora, server_mode {s.server_mode}, batch {s.batch_size} per client, max_length {s.max_length}, "
        f"synthetic data, cut layer 2, LoRA r=8; {s.threads} torch thread(s) per party; local Ray cluster of "
        f"{os.cpu_count()} CPUs started by the benchmark ({init_s:.1f} s), one client per actor.",
        f"{s.warmup_steps} warm-up step(s) each, then {s.repeats} ABBA repeats of {s.block_steps}-step blocks per "
        "engine; s/step and tok/s are medians; tokens = input (attention-mask) tokens of all clients.",
        "the server (algorithm, server part, FedAvg) runs in the benchmark's process for both engines; "
        "'Ray - in-process' is the engine's cost per step (negative: the actors' parallel client work won); "
        "'actor round trip' is one bare task and its result; 'peak RSS per actor' is the median over actors "
        "of each actor process's peak resident set (VmHWM): interpreter, torch, its own copy of the base "
        "weights, its client's LoRA, optimiser state and data.",
    ]
    result.plots.append(_plot(rows, opts))
    return result


def _plot(rows, opts: Options) -> str:
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for model in models:
        rs = [r for r in rows if r["model"] == model]
        xs = [r["clients"] for r in rs]
        line, = axes[0].plot(xs, [r["inprocess_tok_s"] for r in rs], marker="o", ls="--", label=f"{model} in-process")
        axes[0].plot(xs, [r["ray_tok_s"] for r in rs], marker="s", color=line.get_color(), label=f"{model} Ray")
        axes[1].plot(xs, [r["actor_peak_rss_mib"] for r in rs], marker="s", color=line.get_color(), label=model)
    for ax in axes:
        ax.set_xscale("log", base=2)
        xs = sorted({r["clients"] for r in rows})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("clients (one Ray actor each)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("input tokens / s (all clients)")
    axes[0].set_yscale("log")
    axes[0].set_title("throughput")
    axes[1].set_ylabel("MiB")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title("peak RSS per client actor")
    return save_figure(fig, opts, "ray")
