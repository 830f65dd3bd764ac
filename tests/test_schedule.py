"""The schedules alone: what crosses between the server and each client, in which order, for every
algorithm and both split shapes, against a fake grid and a fake server (no model, milliseconds)."""

from __future__ import annotations

import pytest
import torch

from splitlora.algorithms.base import sampled
from splitlora.config import RunConfig
from splitlora.messages import (Activations, AdapterUpdate, Backward, Forward, HandIn, HandOut, Handover, Load,
                                LocalStep, StepDone, Sync, Tail, TailGrad, Upload)
from splitlora.registry import ALGORITHMS
from splitlora.runtime.grid import ClientInfo, Done, Traffic
from splitlora.runtime.server import Refused

STATE = {"lora_A": torch.zeros(2, 2)}  # the client side's adapter
SERVER_STATE = {"server_lora_A": torch.zeros(2, 2)}


class FakeGrid:
    """Answers every command at once with a well-formed reply and records ``(client, command, step)``."""

    min_clients = 1

    def __init__(self, n: int, whole: bool = False):
        self.clients = [ClientInfo(str(i), i, 10 + i) for i in range(n)]
        self.uploaded = {**STATE, **SERVER_STATE} if whole else STATE  # what a client's adapter holds
        self.traffic = Traffic()
        self.log: list[tuple[str, str, int | None]] = []

    def admit(self, step, boundary, welcome):
        for c in self.clients:
            if not any(name == c.name and kind == "Sync" for name, kind, _ in self.log):
                self._record(c, welcome(c))
        return list(self.clients)

    def _record(self, c, cmd):
        self.log.append((c.name, type(cmd).__name__, getattr(cmd, "step", getattr(cmd, "round", None))))

    def ask(self, c, cmd):
        self._record(c, cmd)
        h = torch.zeros(1, 3, 2)
        reply = {Forward: lambda: Activations(cmd.step, h, torch.ones(1, 3), None),
                 Tail: lambda: TailGrad(cmd.step, h, 1.0, 2),
                 LocalStep: lambda: StepDone(cmd.step, 1.0, 2),
                 Upload: lambda: AdapterUpdate(cmd.round, {k: v + 1 for k, v in self.uploaded.items()}, c.num_samples),
                 HandOut: lambda: Handover(dict(STATE), dict(STATE), dict(STATE), 1)}[type(cmd)]()
        return Done(reply)

    def send(self, c, cmd):
        self._record(c, cmd)

    def alive(self, c):
        return True

    def drop(self, c, reason):
        raise AssertionError(f"{c.name} dropped: {reason}")

    def peek(self, c):
        return dict(STATE)


class FakeServer:
    """The main server's interface, answering at once (two-part: ``step``; U-shape: ``forward``/``backward``)."""

    def __init__(self, cfg):
        self.u_shape = cfg.u_shape
        self.optimizer = type("Opt", (), {"lr": 1e-3})()

    def lora_state(self):
        return dict(SERVER_STATE)

    def step(self, ups):
        return {c: Backward(a.step, a.hidden, 1.0, 2) for c, a in ups}, Refused()

    def forward(self, ups):
        return {c: Tail(a.step, a.hidden) for c, a in ups}, Refused()

    def backward(self, grads):
        return {c: Backward(g.step, g.grad) for c, g in grads.items()}, Refused()


class FakeSource:
    def initial_state(self):
        return {**STATE, **SERVER_STATE}


def run(algorithm: str, **overrides) -> list[tuple[str, str, int | None]]:
    """Run the whole schedule of ``algorithm`` (as the loop does) and return what crossed, in order."""
    base = dict(algorithm=algorithm, model="tiny-gpt2", clients=2, steps=4, aggregate_every=2)
    cfg = RunConfig.from_dict({**base, **overrides})
    cls = ALGORITHMS[algorithm]

    class Scheduled(cls):
        def make_server(self, total_steps):
            return FakeServer(self.cfg)

    grid = FakeGrid(cls.parties(cfg), whole=cls.whole_clients)
    algo = Scheduled(cfg, FakeSource(), grid)
    algo.join(0)
    for t in range(cfg.steps):
        assert algo.step(t).ran
    algo.finish(cfg.steps)
    return grid.log


def steps(log, *clients):
    return [(c, kind, s) for c, kind, s in log if c in clients]


JOIN = [("0", "Sync", 0), ("1", "Sync", 0)]


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_splitlora_two_part(mode):
    log = run("splitlora", server_mode=mode)
    # per step: every client's Forward is issued first (remote clients work in parallel), then the dL/dh back
    step = lambda t: [("0", "Forward", t), ("1", "Forward", t), ("0", "Backward", t), ("1", "Backward", t)]
    fedavg = lambda r: [("0", "Upload", r), ("1", "Upload", r), ("0", "Load", r + 1), ("1", "Load", r + 1)]
    assert log == JOIN + step(0) + step(1) + fedavg(0) + step(2) + step(3) + fedavg(1)


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_splitlora_u_shape(mode):
    log = run("splitlora", server_mode=mode, split_shape="u-shape", tail_layers=1)
    if mode == "batched":  # one server step over both clients' batches
        step = lambda t: [("0", "Forward", t), ("1", "Forward", t), ("0", "Tail", t), ("1", "Tail", t),
                          ("0", "Backward", t), ("1", "Backward", t)]
    else:  # asked together, served one batch at a time
        step = lambda t: [("0", "Forward", t), ("1", "Forward", t), ("0", "Tail", t), ("0", "Backward", t),
                          ("1", "Tail", t), ("1", "Backward", t)]
    fedavg = lambda r: [("0", "Upload", r), ("1", "Upload", r), ("0", "Load", r + 1), ("1", "Load", r + 1)]
    assert log == JOIN + step(0) + step(1) + fedavg(0) + step(2) + step(3) + fedavg(1)


@pytest.mark.parametrize("shape", [{}, {"split_shape": "u-shape", "tail_layers": 1}])
def test_sl_turns_hand_the_adapter_on(shape):
    log = run("sl", **shape)
    tail = [("Tail",)] if shape else []
    step = lambda c, t: [(c, "Forward", t), *[(c, "Tail", t) for _ in tail], (c, "Backward", t)]
    assert log == (JOIN + [("0", "HandIn", 0)] + step("0", 0) + step("0", 1) + [("0", "HandOut", 1)]
                   + [("1", "HandIn", 2)] + step("1", 2) + step("1", 3) + [("1", "HandOut", 3)])


def test_fed_local_steps_and_fedavg():
    log = run("fed")
    step = lambda t: [("0", "LocalStep", t), ("1", "LocalStep", t)]
    fedavg = lambda r: [("0", "Upload", r), ("1", "Upload", r), ("0", "Load", r + 1), ("1", "Load", r + 1)]
    assert log == JOIN + step(0) + step(1) + fedavg(0) + step(2) + step(3) + fedavg(1)


def test_cen_is_one_party_that_never_averages():
    log = run("cen", clients=3)
    assert log == [("0", "Sync", 0)] + [("0", "LocalStep", t) for t in range(4)]


def test_a_partial_last_round_is_averaged_at_the_end():
    log = run("fed", steps=3)
    assert log[-4:] == [("0", "Upload", 1), ("1", "Upload", 1), ("0", "Load", 2), ("1", "Load", 2)]


@pytest.mark.parametrize("algorithm", ["splitlora", "fed"])
def test_clients_per_round_samples_a_seeded_subset(algorithm):
    n, m, every, total = 6, 2, 2, 8
    log = run(algorithm, clients=n, clients_per_round=m, aggregate_every=every, steps=total, seed=3)
    work = "Forward" if algorithm == "splitlora" else "LocalStep"
    rounds = [sorted(sampled(RunConfig(clients=n, clients_per_round=m, seed=3), b)) for b in range(0, total, every)]
    assert all(len(r) == m for r in rounds) and len({tuple(r) for r in rounds}) > 1  # varies by round
    for r, chosen in enumerate(rounds):
        for t in range(r * every, (r + 1) * every):
            assert sorted(int(c) for c, kind, s in log if kind == work and s == t) == chosen
        assert sorted(int(c) for c, kind, s in log if kind == "Upload" and s == r) == chosen
    # a sampled client that missed the last average gets it before it works
    for name in map(str, range(n)):
        mine = [(kind, s) for c, kind, s in log if c == name and kind in ("Load", "Upload", work)]
        holds = 0
        for kind, s in mine:
            if kind == "Load":
                holds = s
            elif kind == "Upload":
                assert holds == s, (name, mine)  # it trained from the current average
    assert RunConfig(clients=n, clients_per_round=m, seed=3).clients_per_round == m


def test_sampled_clients_are_the_same_for_anyone_who_asks():
    cfg = RunConfig(clients=100, clients_per_round=10, seed=1)
    assert sampled(cfg, 5) == sampled(RunConfig(clients=100, clients_per_round=10, seed=1), 5)
    assert sampled(cfg, 5) != sampled(cfg, 10)
    assert len(sampled(cfg, 0)) == 10 and sampled(RunConfig(clients=4), 0) == {0, 1, 2, 3}
    # what a client drew is what the accountant counts: its batches over the sampled rounds
    cls = ALGORITHMS["fed"]
    total = RunConfig(clients=4, clients_per_round=2, aggregate_every=3, steps=10, seed=2)
    drawn = [cls.batches_drawn(total, i, 10) for i in range(4)]
    assert sum(drawn) == 2 * 10  # two clients per step
