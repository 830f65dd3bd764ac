"""Observing an algorithm built by the engine through its public hooks (nothing is patched).

* :class:`TokenCounter` hooks every client's work and counts the input tokens, padded positions and
  rows of the batches it trains on.
* :class:`StepTracer` hooks every party's work (``runtime.hooks``) to count FLOPs
  (``torch.utils.flop_counter``) and observes the grid's messages to count bytes, and turns one
  ``algo.step`` into a :class:`~splitlora.bench.latency.StepTrace`.
"""

from __future__ import annotations

import contextlib

from torch.utils.flop_counter import FlopCounterMode

from ..messages import (LABEL_WIRE_DTYPE, MASK_WIRE_DTYPE, Activations, AdapterUpdate, Backward, HandIn, Handover,
                        Load, Tail, TailGrad)
from ..runtime.hooks import Work
from .latency import ClientWork, StepTrace


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
        name, cfg = self.algo.name, self.algo.cfg
        step = StepTrace(algorithm=name, samples=samples, tokens=tokens,
                         batched_server=(name == "splitlora" and cfg.server_mode == "batched"), u_shape=cfg.u_shape)
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
                if name == "cen":
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
        if name != "cen":
            step.clients = [work[c] for c in sorted(work, key=lambda c: work[c].client)]
        return step
