"""A memory probe: one configuration in a fresh process, reporting its peak memory as JSON.

Run as ``python -m splitlora.bench.memproc '{"role": "client", "model": "smollm2-135m", "cut": 2}'``.
The last line of stdout is ``MEMPROBE {json}``.

Roles, named after what the process holds (:data:`ROLES`):

* ``whole``: the whole model with one LoRA, one party training on the pooled rows (the engine's
  algorithm whose party pools the data);
* ``simulation``: the in-process split simulation, ``clients`` simulated clients sharing one base
  model, and the server (the engine's split algorithm in which every client steps);
* ``client``: only the client side (embeddings and blocks 0..K-1 with LoRA), trained against a fake
  upstream gradient;
* ``server``: only the server side, fed random activations.

The algorithm a role runs is chosen by its attributes in the registry (:func:`role_algorithm`); the
names of those algorithms are accepted as the old names of ``whole`` and ``simulation``. Every role
loads exactly the weights it holds (:mod:`splitlora.models.lean`), so no whole-model load transient
is in its peak.

Memory reported:

* ``peak_rss_mib``: the process's peak resident set (``VmHWM``, else ``ru_maxrss``); on Linux also
  ``load_peak_rss_mib`` (up to the part being loaded) and ``train_peak_rss_mib`` (the steps after);
* ``baseline_rss_mib``: resident set after imports, tokenizer and data, before any weight is read:
  the interpreter, torch and transformers (the same for every role);
* ``peak_above_baseline_mib``: the difference: what this role's model, adapters, optimiser and
  activations cost;
* the tensor accounting: unique bytes of weights held, LoRA + AdamW state bytes, and the peak bytes of
  tensors saved for backward (activations) alive at one time;
* on CUDA, ``cuda_peak_mib`` (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

from ..device import peak_rss_mib, reset_peak_rss, rss_mib

PREFIX = "MEMPROBE "

ROLES = ("whole", "simulation", "client", "server")
LABELS = {"whole": "whole model"}  # a role as a table shows it (others: the role itself)


def role_algorithm(role: str) -> str:
    """The registered algorithm whose parties a ``role``'s process holds: for ``whole``, the first whose
    one party holds the whole model and pools the data; for the split roles, the first that splits the
    model (a server part) with every client stepping at every step."""
    from ..registry import ALGORITHMS

    if role == "whole":
        fits = lambda a: a.whole_clients and a.pools_data  # noqa: E731
    else:
        fits = lambda a: a.holds_server_part and not a.whole_clients and a.every_client_steps  # noqa: E731
    found = next((name for name in ALGORITHMS if fits(ALGORITHMS[name])), None)
    if found is None:
        raise ValueError(f"no registered algorithm runs the memory probe's {role!r} role")
    return found


def canonical_role(role: str) -> str:
    """``role``, or the role an older name (the algorithm it ran) stands for."""
    if role in ROLES:
        return role
    old = {role_algorithm(r): r for r in ("whole", "simulation")}
    if role not in old:
        raise ValueError(f"memory probe role must be one of {', '.join(ROLES)} (got {role!r})")
    return old[role]


@dataclass
class ProbeSpec:
    role: str = "whole"  # one of ROLES
    model: str = "tiny-gpt2"
    cut: int = 2
    clients: int = 1
    batch_size: int = 8
    max_length: int = 128
    warmup: int = 1
    steps: int = 2
    threads: int = 0
    device: str = "cpu"
    seed: int = 0
    server_mode: str = "sequential"
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    quantize: str | None = None
    data: str = "synthetic"  # or a data file (e.g. bench.common.full_length_rows for full batches)

    def __post_init__(self):
        self.role = canonical_role(self.role)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "splitlora.bench.memproc", json.dumps(asdict(self), separators=(",", ":"))]


class SavedTensorMeter:
    """Peak bytes of tensors autograd saves for backward that are alive at once (weights excluded)."""

    def __init__(self, exclude_ptrs: set[int]):
        self.exclude = exclude_ptrs
        self.alive: dict[int, list[int]] = {}  # storage ptr -> [nbytes, live tensor count]
        self.current = self.peak = 0

    def pack(self, t):
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or ptr == 0:
            return t
        entry = self.alive.get(ptr)
        if entry is None:
            entry = self.alive[ptr] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)
        return t

    def _release(self, ptr: int) -> None:
        entry = self.alive.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self.alive[ptr]

    @staticmethod
    def unpack(t):
        return t


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _modules_and_optimizers(obj, depth: int = 0, seen=None):
    """nn.Modules (parts) and torch optimisers reachable from an engine object."""
    import torch
    from torch import nn

    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 5:
        return [], []
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        return [obj], []
    if isinstance(obj, torch.optim.Optimizer):
        return [], [obj]
    mods, opts = [], []
    if isinstance(obj, (list, tuple)):
        values = obj if len(obj) <= 256 else []  # parties, not data
    else:
        values = vars(obj).values() if hasattr(obj, "__dict__") else []
    for v in values:
        if isinstance(v, (list, tuple, nn.Module, torch.optim.Optimizer)) or hasattr(v, "__dict__"):
            if isinstance(v, (str, bytes, int, float)):
                continue
            m, o = _modules_and_optimizers(v, depth + 1, seen)
            mods += m
            opts += o
    return mods, opts


def run_probe(spec: ProbeSpec) -> dict:
    import torch

    from ..algorithms import ALGORITHMS
    from ..config import RunConfig
    from ..data import prepare_data
    from ..device import setup_torch
    from ..messages import Backward, Forward
    from ..models.lean import lean_part, lean_skeleton
    from ..models.loading import LoadedModel
    from ..models.parts import LeanModel, SharedModel
    from ..runtime.client import ClientApp
    from ..runtime.server import SplitServer
    from ..simulation.run import client_apps
    from ..simulation.inprocess import InProcessGrid
    from .harness import quiet_transformers
    from .trace import TokenCounter

    quiet_transformers()
    cuda = spec.device.startswith("cuda")
    algorithm = role_algorithm(spec.role)
    cfg = RunConfig(algorithm=algorithm, model=spec.model, clients=spec.clients, cut_layer=spec.cut,
                    batch_size=spec.batch_size, max_length=spec.max_length, steps=max(spec.warmup, 1) + spec.steps,
                    threads=spec.threads, seed=spec.seed, server_mode=spec.server_mode, device=spec.device,
                    dtype=spec.dtype, gradient_checkpointing=spec.gradient_checkpointing,
                    quantize=spec.quantize, data=spec.data).validate()
    setup_torch(cfg.seed, cfg.threads)
    if spec.role in ("whole", "simulation"):
        meta_model, tok, index = lean_skeleton(spec.model)
        data = prepare_data(cfg, tok)
        baseline = rss_mib()
        if cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        whole = lean_part(meta_model, index, "whole", spec.cut).to(spec.device)
        weights_rss = rss_mib() - baseline
        source = SharedModel(LoadedModel(whole, tok, str(index.model_dir)), cfg, spec.device)
        grid = InProcessGrid(client_apps(cfg, source, data, spec.device), cfg.wire_dtype)
        algo = ALGORITHMS[algorithm](cfg, source, grid, spec.device)
        algo.join(0)
        counter = TokenCounter(grid.apps.values())
        step = algo.step
        holders = [algo, list(grid.apps.values())]
    else:
        # One side alone, read lean as `splitlora client` / `splitlora serve` read it (their imports too).
        import splitlora.transport.remote_client  # noqa: F401
        import splitlora.transport.serve  # noqa: F401

        source = LeanModel(spec.model, cfg)
        data = prepare_data(cfg, source.tokenizer)
        baseline = rss_mib()
        if cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        side = spec.role
        part = source.lora_part(side, state={}, device=spec.device)
        weights_rss = rss_mib() - baseline
        hidden_size = source.config.hidden_size
        if side == "client":
            app = ClientApp("0", 0, part, data.train, cfg, False, source.pad_id, source.num_blocks)
            counter = TokenCounter([app])

            def step(t):
                up = app.handle(Forward(t))
                app.handle(Backward(t, torch.randn_like(up.hidden) * 1e-3))
            holders = app
        else:
            from ..data.batching import BatchStream
            from ..messages import Activations

            server = SplitServer(part, cfg, cfg.steps)
            stream = BatchStream(data.train, cfg.batch_size, source.pad_id, seed=(cfg.seed, 0))
            counter = TokenCounter([])  # counted by hand: the server sees the masks, not a client's work

            def step(t):
                batch = next(stream)
                b, n = batch["input_ids"].shape
                counter.input_tokens += int(batch["attention_mask"].sum())
                hidden = torch.randn(b, n, hidden_size, device=spec.device)
                server.step([("0", Activations(t, hidden, batch["attention_mask"].to(spec.device),
                                                batch["labels"].to(spec.device)))])
            holders = server

    def count():
        return counter.input_tokens

    # Loading has its own peak (a block read before it is cast or quantized): kept apart from training's.
    load_peak = peak_rss_mib()
    phases = reset_peak_rss()
    modules, optimizers = _modules_and_optimizers(holders)
    weights = _storages(t for m in modules for t in (*m.parameters(), *m.buffers()) if not t.requires_grad)
    meter = SavedTensorMeter(set(weights))
    for t in range(max(spec.warmup, 1)):  # activations are metered on the warm-up step(s)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            step(t)
    tokens0 = count()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for t in range(max(spec.warmup, 1), max(spec.warmup, 1) + spec.steps):  # timed: without the meter's hooks
        step(t)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = count() - tokens0
    lora = _storages(t for m in modules for t in m.parameters() if t.requires_grad)
    opt_state = _storages(v for o in optimizers for st in o.state.values() for v in st.values()
                          if isinstance(v, torch.Tensor))
    train_peak = peak_rss_mib()
    peak = max(load_peak, train_peak) if phases else train_peak
    out = {
        "spec": asdict(spec),
        "peak_rss_mib": peak,
        "load_peak_rss_mib": load_peak if phases else None,
        "train_peak_rss_mib": train_peak if phases else None,
        "baseline_rss_mib": baseline,
        "peak_above_baseline_mib": peak - baseline,
        "weights_rss_mib": weights_rss,
        "weights_mib": sum(weights.values()) / 2**20,
        "lora_mib": sum(lora.values()) / 2**20,
        "optimizer_mib": sum(opt_state.values()) / 2**20,
        "activations_peak_mib": meter.peak / 2**20,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "threads": torch.get_num_threads(),
    }
    out["tensors_mib"] = out["weights_mib"] + out["lora_mib"] + out["optimizer_mib"] + out["activations_peak_mib"]
    if cuda:
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(argv) != 1:
        print("usage: python -m splitlora.bench.memproc '{json spec}'", file=sys.stderr)
        return 2
    spec = ProbeSpec(**json.loads(argv[0]))
    result = run_probe(spec)
    print(PREFIX + json.dumps(result), flush=True)
    return 0


def probe(spec: ProbeSpec, timeout: float | None = None) -> dict:
    """Run ``spec`` in a fresh process; returns its result with ``command`` (the probe's command line)."""
    import shlex
    import subprocess

    argv = spec.argv()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe {spec.role}/{spec.model} failed (exit {proc.returncode}): {tail}")
    result = json.loads(lines[-1][len(PREFIX):])
    result["probe_command"] = "python -m splitlora.bench.memproc " + shlex.quote(argv[-1])
    return result


def probe_all(specs: list[ProbeSpec], jobs: int = 1) -> list[dict]:
    """:func:`probe` each spec, ``jobs`` processes at a time (1 = one after the other, for clean timings)."""
    if jobs <= 1 or len(specs) <= 1:
        return [probe(s) for s in specs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(probe, specs))


if __name__ == "__main__":
    sys.exit(main())
