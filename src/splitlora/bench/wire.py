"""Wire: bytes per step at fp32/bf16/fp16 for both split shapes, and each algorithm deployed over
loopback gRPC vs in process.

Bytes are measured on the grid (the in-process grid counts exactly what the network carries:
activations in the wire dtype, the mask as uint8, labels as int32, gradients in the wire dtype,
adapters in fp32), traced per message, and checked against the formula: two-part
``B * T * (H * itemsize + 1 + 4)`` up and ``B * T * H * itemsize`` down per client per step;
U-shape ``B * T * (2 H * itemsize + 1)`` up (h_K, mask, dL/dh_(L-T)) and ``2 B * T * H * itemsize``
down (h_(L-T), dL/dh_K).

Each transport row runs the same config twice, alternating: ``splitlora train`` in one process, and
``splitlora serve`` + ``splitlora client`` processes on 127.0.0.1 (``run_loopback``). Both report
tokens/s of the training loop the same way (completion tokens / training seconds, start-up and
clients joining excluded).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..data.e2e import synthetic_e2e
from ..runtime.metrics import read_metrics
from ..transport.loopback import run_loopback
from ..messages import WIRE_DTYPES
from .common import BenchResult, Options, Table, Target, apply_sets, log, median, pyplot, save_figure
from .harness import build, loaded_model
from .trace import activation_bytes

NAME = "wire"


@dataclass
class Settings:
    model: str = "smollm2-135m"
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16", "fp16"])
    shapes: list[str] = field(default_factory=lambda: ["two-part", "u-shape"])
    tail_layers: int = 1
    clients: int = 1
    batch_size: int = 8
    max_length: int = 128
    steps: int = 2
    transport: bool = True
    transport_clients: int = 1
    # algorithm, or algorithm:u-shape
    transport_algorithms: list[str] = field(default_factory=lambda: ["splitlora", "sl", "fed", "splitlora:u-shape"])
    transport_steps: int = 10
    transport_repeats: int = 3
    transport_mode: str = "processes"  # run_loopback mode: processes | threads
    transport_examples: int = 400
    target_transport: float = 0.90

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny-gpt2", dtypes=["fp32", "bf16"], batch_size=2, max_length=96, steps=1,
                   transport_steps=3, transport_repeats=1, transport_examples=40, transport_mode="threads",
                   transport_algorithms=["splitlora", "splitlora:u-shape"])


def _bytes_rows(s: Settings, opts: Options) -> list[dict]:
    loaded = loaded_model(s.model, opts.device)
    hidden = loaded.model.config.hidden_size
    rows = []
    for shape in s.shapes:
        u = shape == "u-shape"
        for dtype in s.dtypes:
            cfg = RunConfig(algorithm="splitlora", model=s.model, clients=s.clients, batch_size=s.batch_size,
                            max_length=s.max_length, steps=s.steps + 1, aggregate_every=s.steps + 1,
                            wire_dtype=dtype, split_shape=shape, tail_layers=s.tail_layers, threads=opts.threads,
                            device=opts.device).validate()
            b = build(cfg, loaded, opts.device, trace=True, count_flops=False)
            ups, downs, formula_up, formula_down = [], [], [], []
            item = WIRE_DTYPES[dtype].itemsize
            for t in range(s.steps):
                b.tracer.begin()
                padded0 = b.tokens.padded_tokens
                b.algo.step(t)
                trace = b.tracer.end()
                ups.append(sum(c.up_bytes + c.mid_up_bytes for c in trace.clients))
                downs.append(sum(c.down_bytes + c.mid_down_bytes for c in trace.clients))
                positions = b.tokens.padded_tokens - padded0
                fu, fd = activation_bytes(1, positions, hidden, item, labels=not u)
                formula_up.append(fu + (positions * hidden * item if u else 0))
                formula_down.append(fd * (2 if u else 1))
            samples = b.tokens.samples
            # One aggregation round: every client uploads its client-side adapter, and gets the average back.
            b.tracer.begin()
            b.algo.finish(s.steps)
            agg = b.tracer.end()
            rows.append({
                "shape": shape, "wire_dtype": dtype, "clients": s.clients, "batch_size": s.batch_size,
                "up_per_step": sum(ups) / len(ups), "down_per_step": sum(downs) / len(downs),
                "up_per_sample": sum(ups) / max(samples, 1), "down_per_sample": sum(downs) / max(samples, 1),
                "formula_ok": ups == formula_up and downs == formula_down,
                "adapter_up_per_round": sum(agg.sync_up_bytes), "adapter_down_per_round": sum(agg.sync_down_bytes),
                "command": opts.command(NAME, {"dtypes": dtype, "shapes": shape, "transport": False}),
            })
            if opts.progress:
                log(f"[wire] {shape} {dtype}: {rows[-1]['up_per_step']:,.0f} B up, "
                    f"{rows[-1]['down_per_step']:,.0f} B down per step")
    return rows


def _write_csv(path: Path, examples) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        for ex in examples:
            w.writerow([ex.mr, ex.ref])
    return path


def _train_process(cfg: RunConfig, out: Path) -> dict:
    """``splitlora train`` in a fresh process (as the loopback's processes are); its last step's numbers."""
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "run.yaml")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "splitlora.cli", "train", "-c", str(out / "run.yaml"), "--out",
                           str(out / "run"), "--quiet"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"splitlora train exited with {proc.returncode}: {tail}")
    last = [x for x in read_metrics(out / "run") if "event" not in x][-1]
    return {"steps": last["step"], "tokens": last["tokens_total"], "seconds": last["elapsed_s"],
            "tokens_per_s": last["tokens_per_s"], "bytes_up_total": last["bytes_up_total"],
            "bytes_down_total": last["bytes_down_total"]}


def _transport(s: Settings, opts: Options) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="splitlora-wire-") as tmp:
        root = Path(tmp)
        examples = synthetic_e2e(s.transport_examples * s.transport_clients, seed=0)
        csvs = [_write_csv(root / f"client{i}.csv", examples[i::s.transport_clients])
                for i in range(s.transport_clients)]
        for variant in s.transport_algorithms:
            algorithm, _, shape = variant.partition(":")
            cfg = RunConfig(algorithm=algorithm, model=s.model, clients=s.transport_clients, batch_size=s.batch_size,
                            max_length=s.max_length, steps=s.transport_steps, threads=opts.threads,
                            device=opts.device, val_fraction=0.0, split_shape=shape or "two-part",
                            tail_layers=s.tail_layers,
                            data=str(csvs[0] if s.transport_clients == 1 else root)).validate()
            inproc, remote, raw = [], [], []
            for r in range(s.transport_repeats):
                order = ("in-process", "loopback") if r % 2 == 0 else ("loopback", "in-process")
                for which in order:
                    if which == "in-process":
                        out = _train_process(cfg, root / f"inproc-{variant}-{r}")
                        inproc.append(out["tokens_per_s"])
                        raw.append({"run": which, "repeat": r, **out})
                    else:
                        out = run_loopback(cfg, csvs, root / f"loopback-{variant}-{r}", cfg.wire_dtype,
                                           mode=s.transport_mode)
                        remote.append(out.get("tokens_per_s"))
                        raw.append({"run": which, "repeat": r, **{k: v for k, v in out.items() if k != "adapter_dir"}})
                    if opts.progress:
                        log(f"[wire] {variant} repeat {r + 1}: {which} {raw[-1]['tokens_per_s']:.1f} tok/s")
            ratio = median(remote) / median(inproc) if median(inproc) and median(remote) else None
            last_remote = next(x for x in reversed(raw) if x["run"] == "loopback")
            rows.append({"algorithm": algorithm, "shape": shape or "two-part", "model": s.model,
                         "clients": s.transport_clients, "batch_size": s.batch_size, "steps": s.transport_steps,
                         "mode": s.transport_mode, "inprocess_tok_s": median(inproc), "loopback_tok_s": median(remote),
                         "ratio": ratio, "loopback_up_per_step": last_remote.get("bytes_up_per_step"),
                         "loopback_down_per_step": last_remote.get("bytes_down_per_step"),
                         "serialised_up_per_step": last_remote.get("wire_bytes_up_per_step"),
                         "serialised_down_per_step": last_remote.get("wire_bytes_down_per_step"),
                         "runs": raw,
                         "command": opts.command(NAME, {"dtypes": "none", "transport_algorithms": variant})})
    return rows


def run(opts: Options) -> BenchResult:
    s = apply_sets(Settings.quick() if opts.quick else Settings(), opts.sets, NAME)
    result = BenchResult(NAME, f"Wire: bytes per step and transport overhead ({s.model})", asdict(s))
    rows = _bytes_rows(s, opts) if s.dtypes else []
    if rows:
        result.tables.append(Table(
            f"Bytes per step, splitlora, {s.clients} client(s), batch {s.batch_size} (per client: divide by clients)", [
                ("shape", "split", ""), ("wire_dtype", "wire dtype", ""), ("up_per_step", "up B/step", ",.0f"),
                ("down_per_step", "down B/step", ",.0f"), ("up_per_sample", "up B/sample", ",.0f"),
                ("down_per_sample", "down B/sample", ",.0f"), ("formula_ok", "= formula", ""),
                ("adapter_up_per_round", "adapter up B/round", ",.0f"),
                ("adapter_down_per_round", "adapter down B/round", ",.0f"), ("command", "command", "code")], rows))
        for r in rows:
            fp32 = next((x for x in rows if x["wire_dtype"] == "fp32" and x["shape"] == r["shape"]), None)
            r["vs_fp32"] = r["up_per_step"] / fp32["up_per_step"] if fp32 else None
    if s.transport:
        t_rows = _transport(s, opts)
        result.tables.append(Table("Transport: loopback gRPC deployment vs in-process, per algorithm", [
            ("algorithm", "algorithm", ""), ("shape", "split", ""), ("model", "model", ""),
            ("clients", "clients", "d"), ("mode", "loopback", ""),
            ("inprocess_tok_s", "in-process tok/s", ",.1f"), ("loopback_tok_s", "loopback tok/s", ",.1f"),
            ("ratio", "ratio", ".3f"), ("loopback_up_per_step", "tensor B up/step", ",.0f"),
            ("serialised_up_per_step", "serialised B up/step", ",.0f"),
            ("serialised_down_per_step", "serialised B down/step", ",.0f"), ("command", "command", "code")],
            t_rows))
        for r in t_rows:
            result.targets.append(Target(f"loopback gRPC / in-process tokens/s, {r['algorithm']} {r['shape']} "
                                         f"({s.model}, batch {s.batch_size})", r["ratio"], s.target_transport, ">="))
        result.extra["transport_runs"] = {f"{r['algorithm']}:{r['shape']}": r["runs"] for r in t_rows}
        result.notes.append(
            f"transport: {s.transport_steps} steps per run, {s.transport_repeats} repeat(s) of each, alternating, "
            "each run in fresh processes ('in-process' = one `splitlora train` process); "
            "tok/s = completion tokens / training seconds as each run's metrics.jsonl reports it (clients "
            "joining and model loading excluded); medians over repeats.")
    result.notes += [
        "two-part: up = activations (wire dtype) + attention mask (uint8) + labels (int32); down = gradient at "
        "the cut (wire dtype); '= formula' checks the measured bytes against B*T*(H*itemsize+5) and "
        "B*T*H*itemsize with T the padded batch width. U-shape: up = h_K + mask + dL/dh_(L-T), down = h_(L-T) + "
        "dL/dh_K, against B*T*(2*H*itemsize+1) and 2*B*T*H*itemsize: no labels, one more tensor each way. "
        "Adapters always travel in fp32.",
    ]
    if rows:
        result.plots.append(_plot(rows, s, opts))
    return result


def _plot(rows, s: Settings, opts: Options) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.3))
    xs = range(len(rows))
    w = 0.38
    ax.bar([i - w / 2 for i in xs], [r["up_per_step"] / 1024 for r in rows], w, label="up")
    ax.bar([i + w / 2 for i in xs], [r["down_per_step"] / 1024 for r in rows], w, label="down")
    ax.set_xticks(list(xs), [f"{r['shape']}\n{r['wire_dtype']}" for r in rows], fontsize=7)
    ax.set_ylabel("KiB per step")
    ax.set_title(f"bytes per step, {s.model}, batch {s.batch_size}")
    ax.legend(fontsize=7)
    return save_figure(fig, opts, "wire")
