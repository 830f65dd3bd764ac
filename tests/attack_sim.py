"""Shared helpers of the in-process attack tests: a malicious ClientApp driven by the same algorithm code.

A run here is :func:`splitlora.runtime.loop.run_loop` over a grid of simulated clients, one of which may be
:class:`Malicious`: it runs the honest client's code and then rewrites its replies (or its claimed
sample count). The grid drops a client the algorithm refuses (as the deployed grid does) instead of
failing the run (as the simulation does for its trusted clients).

The bounded-influence yardstick (DESIGN.md, threat model): for a config with ``n`` client slots,

* ``honest_only``: the ``n - 1`` honest clients alone (indices 0..n-2, the data split of ``n``);
* ``honest_extra``: all ``n`` clients honest;
* ``attacked``: the ``n - 1`` honest clients and an attacker at index n-1.

``d_extra = dist(honest_extra, honest_only)`` is what one more honest client moves the result;
an attack is bounded when ``dist(attacked, honest_only) <= BOUND * d_extra``.
"""

from __future__ import annotations

from typing import Callable

import torch

from splitlora.algorithms import ALGORITHMS
from splitlora.data import prepare_data
from splitlora.device import setup_torch
from splitlora.models.parts import SharedModel
from splitlora.runtime.grid import Done
from splitlora.runtime.loop import run_loop
from splitlora.simulation.run import client_apps
from splitlora.simulation.inprocess import InProcessGrid

BOUND = 2.0  # the stated multiple of one extra honest client's influence


def max_abs_diff(a: dict, b: dict, keys=None) -> float:
    """The largest elementwise distance over ``keys`` (all of them by default)."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in (keys or a))


class Malicious:
    """A simulated client that runs the honest code, then ``tamper(command, reply, app)`` rewrites its reply.

    ``declare``: the sample count it claims (its FedAvg weight claim).
    """

    def __init__(self, app, tamper: Callable | None = None, declare: int | None = None):
        self.app, self.tamper = app, tamper
        self.name, self.index = app.name, app.index
        self.num_samples = declare if declare is not None else app.num_samples
        self.seen: dict = {}  # what the server last sent it: "state" (an average), "handover"

    def handle(self, command):
        state = getattr(command, "state", None)
        if state is not None:
            self.seen["state"] = {k: v.clone() for k, v in state.items()}
        if getattr(command, "handover", None) is not None:
            self.seen["handover"] = command.handover
        reply = self.app.handle(command)
        if self.tamper is not None and reply is not None:
            reply = self.tamper(command, reply, self)
        if hasattr(reply, "num_samples"):
            reply.num_samples = self.num_samples
        return reply

    def lora_state(self):
        return self.app.lora_state()


class AttackGrid(InProcessGrid):
    """The in-process grid, but a refused client is dropped (as over gRPC), not a failed run."""

    def __init__(self, apps, wire_dtype: str = "fp32", min_clients: int = 1):
        super().__init__(apps, wire_dtype)
        self.min_clients = min_clients
        self.dropped: dict[str, str] = {}
        self.sent: list[tuple[str, object]] = []  # (client, command) of every command, in order

    def admit(self, step, boundary, welcome):
        return [c for c in super().admit(step, boundary, welcome) if c.name not in self.dropped]

    def ask(self, client, command):
        self.sent.append((client.name, command))
        if client.name in self.dropped:
            return Done(None)
        return super().ask(client, command)

    def send(self, client, command):
        self.sent.append((client.name, command))
        if client.name not in self.dropped:
            super().send(client, command)

    def alive(self, client) -> bool:
        return client.name not in self.dropped

    def drop(self, client, reason: str) -> None:
        self.dropped.setdefault(client.name, reason)


class Events:
    """A metrics sink that keeps the records (run_loop writes rows and events to it)."""

    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == name]


def run(cfg, loaded, indices=None, attackers: dict | None = None, min_clients: int = 1, grid_cls=AttackGrid):
    """Run ``cfg`` in process with the clients of ``indices`` (all by default); ``attackers`` maps a
    client index to ``(tamper, declare)`` or a ready :class:`Malicious` factory ``fn(app)``.
    Returns ``(final adapter state, grid, events)``."""
    setup_torch(cfg.seed, 1)
    source = SharedModel(loaded, cfg, "cpu")
    data = prepare_data(cfg, source.tokenizer)
    apps = client_apps(cfg, source, data, "cpu", indices if indices is not None else range(cfg.clients))
    attackers = attackers or {}
    apps = [attackers[a.index](a) if a.index in attackers else a for a in apps]
    grid = grid_cls(apps, cfg.wire_dtype, min_clients)
    algo = ALGORITHMS[cfg.algorithm](cfg, source, grid, "cpu")
    log = Events()
    run_loop(cfg, algo, log, progress=False)
    return {k: v.clone() for k, v in algo.adapter_state().items()}, grid, log


class Yardstick:
    """The honest-only and honest-extra runs of one config, computed once."""

    def __init__(self, cfg, loaded, keys=None, attackers: int = 1):
        """``keys``: measure only these adapter tensors (e.g. the averaged client side, where the
        extra client's server-side batches would otherwise dominate the yardstick). ``attackers``: the
        last slots an attack takes (colluders); the honest-only run leaves them all out, the honest-extra
        run adds one honest client to it."""
        self.cfg, self.loaded, self.slots = cfg, loaded, attackers
        n = cfg.clients
        self.honest_only, _, self.log_only = run(cfg, loaded, indices=range(n - attackers))
        self.honest_extra, _, self.log_extra = run(cfg, loaded, indices=range(n - attackers + 1))
        self.keys = keys(self.honest_only) if callable(keys) else keys
        self.d_extra = max_abs_diff(self.honest_extra, self.honest_only, self.keys)

    def attack(self, make, min_clients: int = 1):
        """``(distance of the attacked run from honest_only, grid, events)``; ``make(app)`` builds the
        attacker in each of the last ``attackers`` client slots."""
        n = self.cfg.clients
        attackers = {i: make for i in range(n - self.slots, n)}
        state, grid, log = run(self.cfg, self.loaded, attackers=attackers, min_clients=min_clients)
        for v in state.values():
            assert torch.isfinite(v).all()
        return max_abs_diff(state, self.honest_only, self.keys), grid, log


def client_side(state: dict) -> list[str]:
    """The averaged keys of a split run: the client side's (blocks below the cut)."""
    return [k for k in state if any(f".h.{i}." in k or f".layers.{i}." in k for i in range(2))]


# ---- attacks on an upload (FedAvg) ---------------------------------------------------------------

def on_upload(rewrite: Callable, declare: int | None = None):
    """An attacker that replaces its adapter upload with ``rewrite(honest_state, current_average)``."""
    from splitlora.messages import AdapterUpdate

    def tamper(command, reply, me):
        if isinstance(reply, AdapterUpdate):
            reply.state = rewrite(reply.state, me.seen["state"])
        return reply
    return lambda app: Malicious(app, tamper, declare)


def scaled(factor: float):
    """The honest update scaled by ``factor`` (in the honest direction: drift)."""
    return lambda state, avg: {k: avg[k] + factor * (state[k] - avg[k]) for k in state}


def zeros(state, avg):
    return {k: torch.zeros_like(v) for k, v in state.items()}


def echo(state, avg):
    """The current average back: cancels the honest clients' learning in a plain mean."""
    return {k: v.clone() for k, v in avg.items()}


# ---- attacks on an sl hand-over --------------------------------------------------------------------

def on_handover(rewrite: Callable):
    """An ``sl`` attacker that replaces its hand-back with ``rewrite(handover, me)``."""
    from splitlora.messages import Handover

    def tamper(command, reply, me):
        return rewrite(reply, me) if isinstance(reply, Handover) else reply
    return lambda app: Malicious(app, tamper)


def on_tail(factor: float):
    """A U-shape attacker that scales its tail gradient dL/dh_(L-T) by ``factor``."""
    from splitlora.messages import TailGrad

    def tamper(command, reply, me):
        if isinstance(reply, TailGrad):
            reply.grad = reply.grad * factor
        return reply
    return lambda app: Malicious(app, tamper)
