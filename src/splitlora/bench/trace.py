"""Instrumenting an algorithm built by the engine, without changing the engine.

* :func:`instrument_streams` puts every party's batch stream behind a :class:`CountingStream`
  that counts input tokens and moves batches to the benchmark's device.
* :class:`TracingLink` is the in-process link that also records each message's size and client.
* :class:`StepTracer` counts the FLOPs of each party call (``torch.utils.flop_counter``) and
  turns one ``algo.step`` into a :class:`~splitlora.bench.latency.StepTrace`.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.batching import BatchStream
from ..runtime.client import SplitClient
from ..runtime.server import SplitServer
from ..runtime.whole import WholeModelParty
from ..transport.inprocess import InProcessLink
from ..transport.messages import LABEL_WIRE_DTYPE, MASK_WIRE_DTYPE, state_nbytes
from .latency import ClientWork, StepTrace


class CountingStream:
    """Wraps a :class:`BatchStream`: counts tokens and moves each batch to ``device``.

    ``input_tokens`` counts real (attention-mask) tokens, ``padded_tokens`` the positions computed,
    ``samples`` the rows.
    """

    def __init__(self, stream, device: str = "cpu"):
        self.stream, self.device = stream, torch.device(device)
        self.input_tokens = self.padded_tokens = self.samples = 0
        self._ahead = None

    def peek(self) -> dict:
        """The batch the next ``next()`` returns (on the CPU, not counted yet)."""
        if self._ahead is None:
            self._ahead = next(self.stream)
        return self._ahead

    def __next__(self):
        batch, self._ahead = (self._ahead, None) if self._ahead is not None else (next(self.stream), None)
        mask = batch["attention_mask"]
        self.input_tokens += int(mask.sum())
        self.padded_tokens += mask.numel()
        self.samples += mask.shape[0]
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def __iter__(self):
        return self

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _objects(algo):
    """The parties and streams an algorithm holds (attributes and lists of them)."""
    for name, value in list(vars(algo).items()):
        if isinstance(value, list):
            for i, item in enumerate(value):
                yield value, i, item
        else:
            yield algo, name, value


def instrument_streams(algo, device: str = "cpu") -> list[CountingStream]:
    """Wrap every batch stream of ``algo`` (in place); returns the wrappers (one per stream)."""
    wrapped: dict[int, CountingStream] = {}

    def wrap(stream):
        if id(stream) not in wrapped:
            wrapped[id(stream)] = CountingStream(stream, device)
        return wrapped[id(stream)]

    for holder, key, obj in _objects(algo):
        if isinstance(obj, BatchStream):
            if isinstance(holder, list):
                holder[key] = wrap(obj)
            else:
                setattr(holder, key, wrap(obj))
        elif isinstance(getattr(obj, "stream", None), BatchStream):
            obj.stream = wrap(obj.stream)
    return list(wrapped.values())


class TokenCounter:
    """Sum of the counters of several streams (one algorithm's)."""

    def __init__(self, streams: list[CountingStream]):
        self.streams = streams

    @property
    def input_tokens(self) -> int:
        return sum(s.input_tokens for s in self.streams)

    @property
    def padded_tokens(self) -> int:
        return sum(s.padded_tokens for s in self.streams)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.streams)


class TracingLink(InProcessLink):
    """:class:`InProcessLink` that also records ``(kind, client_id, bytes)`` for each message."""

    def __init__(self, wire_dtype: str = "fp32"):
        super().__init__(wire_dtype)
        self.messages: list[tuple[str, int, int]] = []

    def up(self, msg):
        before = self.bytes_up
        out = super().up(msg)
        self.messages.append(("up", msg.client_id, self.bytes_up - before))
        return out

    def down(self, msg):
        before = self.bytes_down
        out = super().down(msg)
        self.messages.append(("down", msg.client_id, self.bytes_down - before))
        return out

    def upload(self, msg):
        out = super().upload(msg)
        self.messages.append(("sync_up", msg.client_id, state_nbytes(msg.state)))
        return out

    def broadcast(self, state, receivers):
        out = super().broadcast(state, receivers)
        self.messages.extend(("sync_down", -1, state_nbytes(state)) for _ in range(receivers))
        return out


def activation_bytes(batch: int, length: int, hidden: int, itemsize: int) -> tuple[int, int]:
    """Bytes of one client's activations up (hidden, mask, labels) and gradient down: the formula."""
    up = batch * length * (hidden * itemsize + MASK_WIRE_DTYPE.itemsize + LABEL_WIRE_DTYPE.itemsize)
    return up, batch * length * hidden * itemsize


def _next_shape(party) -> tuple | None:
    """Shape of the batch ``party`` will take next, if its stream can tell (a :class:`CountingStream`)."""
    stream = getattr(party, "stream", None)
    if isinstance(stream, CountingStream):
        return tuple(stream.peek()["input_ids"].shape)
    return None


class StepTracer:
    """Counts FLOPs of every party call and message bytes of every step of ``algo``.

    Use: ``tracer.begin(); algo.step(t); trace = tracer.end(samples, tokens)``. With
    ``count_flops=False`` only bytes are traced.

    The FLOPs of a call depend only on the shapes it computes on (LoRA dropout aside, which adds no
    matmuls), and counting costs 30-70% of a CPU step, so each (call kind, input shapes) is counted
    once, on the first call with those shapes, and reused after.
    """

    def __init__(self, algo, link: TracingLink, count_flops: bool = True):
        self.algo, self.link, self.count_flops = algo, link, count_flops
        self.flop_cache: dict[tuple, float] = {}
        self._calls: list[tuple[str, int, float]] = []
        self._seen: set[int] = set()
        self._wrap_all()

    # ---- wrapping ------------------------------------------------------------------------------
    def _wrap_all(self) -> None:
        for _, _, obj in _objects(self.algo):
            if id(obj) in self._seen:
                continue
            self._seen.add(id(obj))
            if isinstance(obj, SplitClient):
                self._wrap(obj, "forward", "fwd", lambda o, a: o.client_id, lambda o, a: _next_shape(o))
                self._wrap(obj, "backward", "bwd", lambda o, a: a[0].client_id, lambda o, a: tuple(a[0].grad.shape))
            elif isinstance(obj, SplitServer):
                self._wrap(obj, "process", "server", lambda o, a: [u.client_id for u in a[0]],
                           lambda o, a: tuple(tuple(u.hidden.shape) for u in a[0]))
            elif isinstance(obj, WholeModelParty):
                self._wrap(obj, "train_step", "whole", lambda o, a: o.client_id, lambda o, a: _next_shape(o))

    def _wrap(self, obj, method: str, kind: str, who, shape) -> None:
        fn = getattr(obj, method)
        tracer = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            client = who(obj, args)
            if not tracer.count_flops:
                result = fn(*args, **kwargs)
                tracer._calls.append((kind, client, 0.0))
                return result
            key = (kind, shape(obj, args))
            if key[1] is not None and key in tracer.flop_cache:
                result = fn(*args, **kwargs)
            else:
                with FlopCounterMode(display=False) as counter:
                    result = fn(*args, **kwargs)
                if key[1] is not None:
                    tracer.flop_cache[key] = float(counter.get_total_flops())
                else:
                    key = None
                    flops = float(counter.get_total_flops())
            tracer._calls.append((kind, client, tracer.flop_cache[key] if key is not None else flops))
            return result

        setattr(obj, method, wrapper)

    # ---- steps -----------------------------------------------------------------------------------
    def begin(self) -> None:
        self._calls.clear()
        self.link.messages.clear()
        self._up0, self._down0 = self.link.bytes_up, self.link.bytes_down

    def end(self, samples: int = 0, tokens: int = 0) -> StepTrace:
        name = self.algo.name
        cfg = self.algo.cfg
        step = StepTrace(algorithm=name, samples=samples, tokens=tokens,
                         batched_server=(name == "splitlora" and cfg.server_mode == "batched"))
        work: dict[int, ClientWork] = {}

        def of(client: int) -> ClientWork:
            return work.setdefault(client, ClientWork(client))

        for kind, client, flops in self._calls:
            if kind == "fwd":
                of(client).fwd_flops += flops
            elif kind == "bwd":
                of(client).bwd_flops += flops
            elif kind == "server":
                clients = client  # a list: the batches of this server call
                for c in clients:
                    of(c).server_flops += flops / len(clients)
            elif kind == "whole":
                if name == "cen":
                    step.server_whole_flops += flops
                else:
                    of(client).whole_flops += flops
        traced_up = traced_down = 0
        for kind, client, nbytes in self.link.messages:
            if kind == "up":
                of(client).up_bytes += nbytes
                traced_up += nbytes
            elif kind == "down":
                of(client).down_bytes += nbytes
                traced_down += nbytes
            elif kind == "sync_up":
                step.sync_up_bytes.append(nbytes)
                traced_up += nbytes
            elif kind == "sync_down":
                step.sync_down_bytes.append(nbytes)
                traced_down += nbytes
        # Bytes counted on the link outside its methods (sl's hand-over of the client adapter and
        # optimiser state): one message up from the old client, one down to the new one.
        rest_up = self.link.bytes_up - self._up0 - traced_up
        rest_down = self.link.bytes_down - self._down0 - traced_down
        if rest_up > 0:
            step.sync_up_bytes.append(rest_up)
        if rest_down > 0:
            step.sync_down_bytes.append(rest_down)
        step.clients = [work[c] for c in sorted(work)]
        return step
