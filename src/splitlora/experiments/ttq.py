"""Time to quality under a latency model: validation loss vs simulated wall time for cen, fed, sl, splitlora.

Every algorithm trains on the same E2E training data (devset; the clients' shares are an iid split
of it, ``cen`` gets all of it) for the same number of training samples, and is validated on the same
fixed set of test-set MRs. Per step, FLOPs of each party are counted on the real step
(``torch.utils.flop_counter``) and bytes are traced on the link; :mod:`splitlora.experiments.latency`
turns them into simulated seconds. Sample budget per step: ``clients x batch_size`` for
``splitlora`` and ``fed`` (every client steps), the same pooled batch for ``cen``, and ``batch_size``
for ``sl`` (one client at a time, so it takes ``clients`` times as many steps).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..bench.common import BenchResult, Options, Table, apply_sets, log, pyplot, save_figure
from ..bench.harness import build, loaded_model
from ..bench.trace import StepTrace
from ..config import RunConfig
from ..data import PreparedData
from ..data.batching import encode_labelled
from ..data.e2e import Example, read_e2e_csv, synthetic_e2e
from ..data.partition import partition
from ..registry import ALGORITHMS
from ..simulation.run import Validator
from .latency import SCENARIOS, LatencyModel, time_to_target

NAME = "ttq"
ALGOS = ("cen", "fed", "sl", "splitlora", "splitlora:u-shape")  # algorithm[:split shape]


@dataclass
class Settings:
    model: str = "smollm2-135m"
    algorithms: list[str] = field(default_factory=lambda: list(ALGOS))
    clients: int = 2
    batch_size: int = 4  # per client and step
    max_length: int = 64
    cut_layer: int = 2
    samples: int = 400  # training samples per algorithm
    eval_every_samples: int = 64
    val_examples: int = 32  # fixed validation set: one reference each of this many test-set MRs
    train_examples: int = 0  # devset rows used for training (0 = all)
    aggregate_every: int = 5
    lr: float = 2e-3
    lr_warmup_steps: int = 5
    data: str = "e2e"  # e2e | synthetic
    e2e_dir: str = ""  # default: ../shared/data/e2e next to the repository ($SPLITLORA_E2E_DIR)
    target_loss: float = 0.0  # 0 = the best validation loss that every algorithm reached
    client_flops: float = LatencyModel.client_flops
    server_flops: float = LatencyModel.server_flops
    uplink_bps: float = LatencyModel.uplink_bps
    downlink_bps: float = LatencyModel.downlink_bps
    message_latency_s: float = LatencyModel.message_latency_s

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny-gpt2", batch_size=2, max_length=64, samples=16, eval_every_samples=8,
                   val_examples=6, train_examples=200, lr_warmup_steps=1, aggregate_every=2)

    def latency(self) -> LatencyModel:
        return LatencyModel(self.client_flops, self.server_flops, self.uplink_bps, self.downlink_bps,
                            self.message_latency_s)


def e2e_dir(setting: str) -> Path:
    if setting:
        return Path(setting)
    if os.environ.get("SPLITLORA_E2E_DIR"):
        return Path(os.environ["SPLITLORA_E2E_DIR"])
    repo = Path(__file__).resolve().parents[3]  # src/splitlora/experiments/ttq.py -> repository root
    for candidate in (repo.parent / "shared" / "data" / "e2e", Path.cwd().parent / "shared" / "data" / "e2e"):
        if (candidate / "devset.csv").is_file():
            return candidate
    return repo.parent / "shared" / "data" / "e2e"


def load_examples(s: Settings) -> tuple[list[Example], list[Example], str]:
    """Training examples (devset), fixed validation examples (test MRs) and a description of both."""
    if s.data == "synthetic":
        ex = synthetic_e2e(max(s.train_examples, 200) + 4 * s.val_examples, seed=0)
        mrs = sorted({e.mr for e in ex})
        val_mrs = set(mrs[:: max(len(mrs) // s.val_examples, 1)][: s.val_examples])
        val, seen = [], set()
        for e in ex:
            if e.mr in val_mrs and e.mr not in seen:
                val.append(e)
                seen.add(e.mr)
        train = [e for e in ex if e.mr not in val_mrs][: s.train_examples or None]
        return train, val, "synthetic E2E-style data (project-made)"
    root = e2e_dir(s.e2e_dir)
    dev, test = root / "devset.csv", root / "testset_w_refs.csv"
    if not dev.is_file() or not test.is_file():
        raise FileNotFoundError(f"E2E data not found: need {dev} and {test} (set --set e2e_dir=DIR or "
                                "$SPLITLORA_E2E_DIR, or --set data=synthetic)")
    train = read_e2e_csv(dev)
    if s.train_examples and s.train_examples < len(train):
        rng = np.random.default_rng(0)
        train = [train[i] for i in sorted(rng.choice(len(train), s.train_examples, replace=False))]
    tests = read_e2e_csv(test)
    first: dict[str, Example] = {}
    for e in tests:
        first.setdefault(e.mr, e)
    mrs = list(first)
    picks = [mrs[round(i * (len(mrs) - 1) / max(s.val_examples - 1, 1))] for i in range(s.val_examples)]
    val = [first[m] for m in dict.fromkeys(picks)]
    return train, val, (f"E2E: {len(train)} devset rows for training, first reference of {len(val)} test-set MRs "
                        f"(evenly spaced) for validation, from {root}")


def _prepared(cfg: RunConfig, enc_train, enc_val, train_ex, val_ex) -> PreparedData:
    indices = partition(len(enc_train), ALGORITHMS[cfg.algorithm].parties(cfg), cfg.partition, cfg.seed)
    return PreparedData(train=enc_train, val=enc_val, client_indices=indices, train_examples=train_ex,
                        val_examples=val_ex)


def _schedule(algo: str, s: Settings) -> tuple[int, int, int]:
    """(steps, eval every N steps, batch size of the config) for ``algo`` under the sample budget."""
    layout = ALGORITHMS[algo]
    per_step = s.batch_size * s.clients if layout.every_client_steps else s.batch_size
    steps = max(math.ceil(s.samples / per_step), 1)
    every = max(round(s.eval_every_samples / per_step), 1)
    batch = per_step if layout.pools_data else s.batch_size  # pooled data: all clients' rows in one batch
    return steps, every, batch


def train_one(variant: str, s: Settings, opts: Options, loaded, data_parts, evaluator, initial_loss) -> dict:
    algo, _, shape = variant.partition(":")
    steps, every, batch = _schedule(algo, s)
    cfg = RunConfig(algorithm=algo, split_shape=shape or "two-part", model=s.model, clients=s.clients, batch_size=batch, max_length=s.max_length,
                    cut_layer=s.cut_layer, steps=steps, lr=s.lr, warmup_steps=s.lr_warmup_steps,
                    aggregate_every=s.aggregate_every, threads=opts.threads, device=opts.device).validate()
    data = _prepared(cfg, *data_parts)
    b = build(cfg, loaded, opts.device, data=data, trace=True)
    traces: list[StepTrace] = []
    evals = [{"step": 0, "samples": 0, "val_loss": initial_loss, "wall_s": 0.0}]
    wall = 0.0
    losses = []
    for t in range(steps):
        samples0, tokens0 = b.tokens.samples, b.tokens.input_tokens
        b.tracer.begin()
        t0 = time.perf_counter()
        result = b.algo.step(t)
        wall += time.perf_counter() - t0
        trace = b.tracer.end(samples=b.tokens.samples - samples0, tokens=b.tokens.input_tokens - tokens0)
        traces.append(trace)
        losses.append(result.loss)
        last = t == steps - 1
        if last:
            b.tracer.begin()
            b.algo.finish(steps)  # the final FedAvg of a partial round, counted in the last step
            tail = b.tracer.end()
            trace.sync_up_bytes += tail.sync_up_bytes
            trace.sync_down_bytes += tail.sync_down_bytes
        if (t + 1) % every == 0 or last:
            val = evaluator(b.algo.adapter_state())
            evals.append({"step": t + 1, "samples": b.tokens.samples, "val_loss": val, "wall_s": wall})
            if opts.progress:
                log(f"[ttq] {variant}: step {t + 1}/{steps}, {b.tokens.samples} samples, train loss {result.loss:.3f}, "
                    f"val loss {val:.3f} ({wall:.0f}s training so far)")
    return {"algorithm": variant, "steps": steps, "batch_size": batch, "eval_every": every, "evals": evals,
            "train_losses": losses, "traces": [tr.to_dict() for tr in traces], "wall_s": wall,
            "samples": b.tokens.samples, "tokens": b.tokens.input_tokens}


def simulate(run: dict, model: LatencyModel) -> list[float]:
    """Simulated time at each of ``run``'s evaluation points (0 for the initial one)."""
    traces = [StepTrace.from_dict(t) for t in run["traces"]]
    cumulative = [0.0] + model.cumulative(traces)
    return [cumulative[e["step"]] for e in run["evals"]]


def run(opts: Options) -> BenchResult:
    s = apply_sets(Settings.quick() if opts.quick else Settings(), opts.sets, NAME)
    unknown = [a for a in s.algorithms if a not in ALGOS]
    if unknown:
        from ..errors import UserError

        raise UserError(f"ttq: unknown algorithm {unknown[0]!r} (choose from {', '.join(ALGOS)})")
    result = BenchResult(NAME, f"Time to quality under a latency model ({s.model}, {s.clients} clients)", asdict(s))
    try:
        train_ex, val_ex, data_note = load_examples(s)
    except FileNotFoundError as exc:
        if not opts.quick:
            result.skipped = f"{exc}"
            return result
        s = replace(s, data="synthetic")  # the quick smoke run does not need the real data
        result.settings = asdict(s)
        train_ex, val_ex, data_note = load_examples(s)
        result.notes.append(f"E2E data absent ({exc}); quick run on synthetic data instead")
    loaded = loaded_model(s.model, opts.device)
    base_cfg = RunConfig(model=s.model, max_length=s.max_length, cut_layer=s.cut_layer).validate()
    train_ex, enc_train = encode_labelled(train_ex, loaded.tokenizer, base_cfg.prompt_template, s.max_length)
    val_ex, enc_val = encode_labelled(val_ex, loaded.tokenizer, base_cfg.prompt_template, s.max_length)
    evaluator = Validator(loaded.model, base_cfg, enc_val, loaded.model.config.pad_token_id, opts.device)
    from ..models.lora import initial_lora_state

    initial = evaluator(initial_lora_state(loaded.model, base_cfg))
    runs = {}
    for algo in s.algorithms:
        runs[algo] = train_one(algo, s, opts, loaded, (enc_train, enc_val, train_ex, val_ex), evaluator, initial)

    # ---- the latency model -------------------------------------------------------------------
    default = s.latency()
    scenarios = {"default": default, **{k: v for k, v in SCENARIOS.items() if k != "default"}}
    best = {a: min(e["val_loss"] for e in r["evals"]) for a, r in runs.items()}
    target = s.target_loss if s.target_loss > 0 else math.ceil(max(best.values()) * 100) / 100
    rows = []
    for algo, r in runs.items():
        traces = [StepTrace.from_dict(t) for t in r["traces"]]
        n = len(traces)
        times = {name: simulate(r, m) for name, m in scenarios.items()}
        for e, ts in zip(r["evals"], times["default"]):
            e["sim_s"] = ts
        clients_per_step = [max(len(t.clients), 1) for t in traces]
        row = {
            "algorithm": algo, "steps": r["steps"], "batch": r["batch_size"], "samples": r["samples"],
            "client_gflop_per_step": sum(t.client_flops / c for t, c in zip(traces, clients_per_step)) / n / 1e9,
            "server_gflop_per_step": sum(t.server_flops for t in traces) / n / 1e9,
            "up_kib_per_step": sum(t.bytes_up for t in traces) / n / 1024,
            "down_kib_per_step": sum(t.bytes_down for t in traces) / n / 1024,
            "sim_s_per_step": default.run_time(traces) / n,
            "sim_total_s": default.run_time(traces),
            "val_first": r["evals"][0]["val_loss"], "val_last": r["evals"][-1]["val_loss"], "val_best": best[algo],
            "wall_s": r["wall_s"],
            "command": opts.command(NAME, {"algorithms": algo, "target_loss": target}),
        }
        for name in scenarios:
            row[f"ttt_{name}"] = time_to_target(times[name], [e["val_loss"] for e in r["evals"]], target)
        rows.append(row)
    result.tables.append(Table(f"Training and simulated time (default latency model); target loss {target:.2f}", [
        ("algorithm", "algorithm", ""), ("steps", "steps", "d"), ("batch", "batch", "d"),
        ("samples", "samples", "d"), ("client_gflop_per_step", "client GFLOP/step", ",.2f"),
        ("server_gflop_per_step", "server GFLOP/step", ",.2f"), ("up_kib_per_step", "up KiB/step", ",.1f"),
        ("down_kib_per_step", "down KiB/step", ",.1f"), ("sim_s_per_step", "sim s/step", ".4f"),
        ("sim_total_s", "sim total s", ",.2f"), ("val_first", "val loss start", ".3f"),
        ("val_last", "val loss end", ".3f"), ("ttt_default", f"sim s to loss {target:.2f}", ",.2f"),
        ("wall_s", "wall s (this machine)", ",.0f"), ("command", "command", "code")], rows))
    result.tables.append(Table("Simulated seconds to the target loss under other latency models", [
        ("algorithm", "algorithm", "")] + [(f"ttt_{n}", n, ",.2f") for n in scenarios], rows))
    result.tables.append(Table("Latency models", [("name", "name", ""), ("client_flops", "client FLOP/s", ".2e"),
                                                  ("server_flops", "server FLOP/s", ".2e"),
                                                  ("uplink_bps", "uplink bit/s", ".2e"),
                                                  ("downlink_bps", "downlink bit/s", ".2e"),
                                                  ("message_latency_s", "latency s/msg", ".3f")],
                               [{"name": n, **m.to_dict()} for n, m in scenarios.items()]))
    result.notes.append("simulated seconds to val loss {:.2f} (default latency model): {}".format(
        target, ", ".join(f"{r['algorithm']} " + ("not reached" if r["ttt_default"] is None else f"{r['ttt_default']:.2f} s")
                          for r in rows)))
    result.notes += [
        data_note + ".",
        f"{s.clients} clients (iid split), batch {s.batch_size} per client per step (cen: the pooled "
        f"{s.batch_size * s.clients}), {s.samples} training samples per algorithm, max_length {s.max_length}, cut "
        f"layer {s.cut_layer}, LoRA r=8 both sides, lr {s.lr}, FedAvg every {s.aggregate_every} steps "
        f"(sl: {s.aggregate_every} steps per client turn); validation every ~{s.eval_every_samples} samples.",
        ("target loss = the best validation loss that every algorithm reached, rounded up to 0.01"
         if s.target_loss <= 0 else f"target loss set to {s.target_loss}") +
        "; time to target = simulated time at the first validation at or below it.",
        "FLOPs: matmul/attention FLOPs counted by torch.utils.flop_counter.FlopCounterMode on the real steps "
        "(forward, backward through frozen weights, LoRA weight gradients; once per call kind and batch shape, "
        "then reused); elementwise ops are not counted.",
        "Simulated time excludes validation; 'wall s' is the measured training time on this machine (all parties "
        "on one CPU), for reference only.",
    ]
    result.extra["runs"] = runs
    result.extra["target_loss"] = target
    result.plots.append(_plot(runs, target, s, opts))
    return result


def _plot(runs: dict, target: float, s: Settings, opts: Options) -> str:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    positive = [e["sim_s"] for r in runs.values() for e in r["evals"] if e["sim_s"] > 0]
    floor = min(positive) / 2 if positive else 1e-3  # where t=0 is drawn on the log axis
    for algo, r in runs.items():
        ev = r["evals"]
        a1.plot([e["sim_s"] if e["sim_s"] > 0 else floor for e in ev], [e["val_loss"] for e in ev], marker="o", ms=3,
                label=algo)
        a2.plot([e["samples"] for e in ev], [e["val_loss"] for e in ev], marker="o", ms=3, label=algo)
    for ax in (a1, a2):
        ax.axhline(target, ls="--", c="grey", lw=1)
        ax.set_ylabel("validation loss")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(fontsize=8)
    a1.set_xscale("log")
    a1.set_xlabel("simulated time (s, log scale; leftmost point = start)")
    a1.set_title("loss vs simulated time (default latency model)", fontsize=9)
    a2.set_xlabel("training samples")
    a2.set_title("loss vs samples", fontsize=9)
    fig.suptitle(f"{s.model}, {s.clients} clients, batch {s.batch_size}/client; dashed: target {target:.2f}",
                 fontsize=10)
    return save_figure(fig, opts, "ttq")
