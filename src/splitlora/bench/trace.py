"""Observing an algorithm built by the engine through its public hooks (nothing is patched).

* :class:`TokenCounter` hooks every client's work and counts the input tokens, padded positions and
  rows of the batches it trains on.
* :class:`StepTracer` hooks every party's work (``runtime.hooks``) to count FLOPs
  (``torch.utils.flop_counter``) and observes the grid's messages to count bytes, and turns one
  ``algo.step`` into a :class:`StepTrace`: what each party computed and what crossed, the input of
  :mod:`splitlora.experiments.latency`.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

from torch.utils.flop_counter import FlopCounterMode

from ..messages import (LABEL_WIRE_DTYPE, MASK_WIRE_DTYPE, Activations, AdapterUpdate, Backward, HandIn, Handover,
                        Load, Tail, TailGrad)
from ..runtime.hooks import Work


@dataclass
class ClientWork:
    """What one client (or fed party) did in one step. FLOPs are counted, bytes are on the wire."""

    client: int
    fwd_flops: float = 0.0  # split: client forward to the cut
    bwd_flops: float = 0.0  # split: client backward from the cut (and its optimiser step)
    whole_flops: float = 0.0  # fed: the whole local step on the client
    server_flops: float = 0.0  # split: the server's forward/backward for this client's batch (U: forward)
    tail_flops: float = 0.0  # U-shape: the client's tail, loss and backward to h_(L-T)
    server_bwd_flops: float = 0.0  # U-shape: the server's backward for this client's batch
    up_bytes: int = 0  # split: activations, mask and labels
    down_bytes: int = 0  # split: gradient at the cut
    mid_down_bytes: int = 0  # U-shape: h_(L-T) down
    mid_up_bytes: int = 0  # U-shape: dL/dh_(L-T) up


@dataclass
class StepTrace:
    """One training step of one algorithm, as measured: where each piece of work ran and what crossed
    (``experiments.latency`` turns it into simulated seconds)."""

    algorithm: str  # a label
    clients: list[ClientWork] = field(default_factory=list)
    server_whole_flops: float = 0.0  # cen: the whole step, run by the server
    sync_up_bytes: list[int] = field(default_factory=list)  # one entry per sending client
    sync_down_bytes: list[int] = field(default_factory=list)  # one entry per receiving client
    pooled: bool = False  # one party trained on everyone's rows (cen): the server ran the whole step
    whole_clients: bool = False  # every client ran the whole model (fed): no cut, nothing crossed per step
    batched_server: bool = False  # server_mode "batched": one server call for all clients
    u_shape: bool = False  # the U-shaped split: a second round trip per client batch
    samples: int = 0
    tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "StepTrace":
        raw = dict(raw)
        raw["clients"] = [ClientWork(**c) for c in raw.get("clients", [])]
        return cls(**raw)

    # totals, for tables
    @property
    def client_flops(self) -> float:
        return sum(c.fwd_flops + c.bwd_flops + c.tail_flops + c.whole_flops for c in self.clients)

    @property
    def server_flops(self) -> float:
        return self.server_whole_flops + sum(c.server_flops + c.server_bwd_flops for c in self.clients)

    @property
    def bytes_up(self) -> int:
        return sum(c.up_bytes + c.mid_up_bytes for c in self.clients) + sum(self.sync_up_bytes)

    @property
    def bytes_down(self) -> int:
        return sum(c.down_bytes + c.mid_down_bytes for c in self.clients) + sum(self.sync_down_bytes)


def _parties(algo, grid):
    apps = list(getattr(grid, "apps", {}).values())
    server = getattr(algo, "server", None)
    return apps, server


class TokenCounter:
    """Input (attention-mask) tokens, padded positions and rows of every batch ``apps`` train on."""

    def __init__(self, apps):
        self.input_tokens = self.padded_tokens = self.samples = 0
        for app in apps:
            app.hooks.append(self._hook)

    @contextlib.contextmanager
    def _hook(self, work: Work):
        if work.input_tokens is not None:
            self.input_tokens += work.input_tokens
            self.padded_tokens += work.shape[0] * work.shape[1]
            self.samples += work.samples
        yield


def activation_bytes(batch: int, length: int, hidden: int, itemsize: int, labels: bool = True) -> tuple[int, int]:
    """Bytes of one client's activations up (hidden, mask, labels) and gradient down: the formula."""
    up = batch * length * (hidden * itemsize + MASK_WIRE_DTYPE.itemsize + (LABEL_WIRE_DTYPE.itemsize if labels else 0))
    return up, batch * length * hidden * itemsize


class StepTracer:
    """Counts FLOPs of every party's work and message bytes of every step of ``algo``.

    Use: ``tracer.begin(); algo.step(t); trace = tracer.end(samples, tokens)``. With
    ``count_flops=False`` only bytes are traced.

    The FLOPs of a piece of work depend only on the shapes it computes on (LoRA dropout aside, which
    adds no matmuls), and counting costs 30-70% of a CPU step, so each (kind, shape) is counted once,
    on the first call with those shapes, and reused after.
    """

    def __init__(self, algo, grid, count_flops: bool = True):
        self.algo, self.grid, self.count_flops = algo, grid, count_flops
        self.flop_cache: dict[tuple, float] = {}
        self._calls: list[tuple[str, tuple[str, ...], float]] = []
        self._messages: list[tuple[str, str, object, int]] = []
        apps, server = _parties(algo, grid)
        for party in [*apps, *([server] if server is not None else [])]:
            party.hooks.append(self._hook)
        grid.observers.append(lambda direction, client, msg, nbytes: self._messages.append((direction, client, msg,
                                                                                             nbytes)))

    @contextlib.contextmanager
    def _hook(self, work: Work):
        who = work.clients if work.party == "server" else (work.party,)
        key = (work.kind, work.shape)
        if not self.count_flops:
            yield
            self._calls.append((work.kind, who, 0.0))
        elif key in self.flop_cache:
            yield
            self._calls.append((work.kind, who, self.flop_cache[key]))
        else:
            with FlopCounterMode(display=False) as counter:
                yield
            self.flop_cache[key] = float(counter.get_total_flops())
            self._calls.append((work.kind, who, self.flop_cache[key]))

    # ---- steps -----------------------------------------------------------------------------------
    def begin(self) -> None:
        self._calls.clear()
        self._messages.clear()

    def end(self, samples: int = 0, tokens: int = 0) -> StepTrace:
        algo, cfg = self.algo, self.algo.cfg
        step = StepTrace(algorithm=algo.name, samples=samples, tokens=tokens, pooled=algo.pools_data,
                         whole_clients=algo.whole_clients and not algo.pools_data,
                         batched_server=cfg.server_mode == "batched", u_shape=cfg.u_shape)
        work: dict[str, ClientWork] = {}

        def of(client: str) -> ClientWork:
            return work.setdefault(client, ClientWork(int(client) if client.isdigit() else len(work)))

        for kind, who, flops in self._calls:
            if kind in ("server", "server_bwd"):
                for c in who:
                    if kind == "server":
                        of(c).server_flops += flops / len(who)
                    else:
                        of(c).server_bwd_flops += flops / len(who)
            elif kind == "whole":
                if algo.pools_data:
                    step.server_whole_flops += flops
                else:
                    of(who[0]).whole_flops += flops
            else:
                field = {"fwd": "fwd_flops", "bwd": "bwd_flops", "tail": "tail_flops"}[kind]
                setattr(of(who[0]), field, getattr(of(who[0]), field) + flops)
        for direction, client, msg, nbytes in self._messages:
            if isinstance(msg, Activations):
                of(client).up_bytes += nbytes
            elif isinstance(msg, Backward):
                of(client).down_bytes += nbytes
            elif isinstance(msg, Tail):
                of(client).mid_down_bytes += nbytes
            elif isinstance(msg, TailGrad):
                of(client).mid_up_bytes += nbytes
            elif isinstance(msg, (AdapterUpdate, Handover)) and nbytes:
                step.sync_up_bytes.append(nbytes)
            elif isinstance(msg, (Load, HandIn)) and nbytes:
                step.sync_down_bytes.append(nbytes)
        if not algo.pools_data:
            step.clients = [work[c] for c in sorted(work, key=lambda c: work[c].client)]
        return step
