"""The latency model: simulated step times follow the documented formula, and the tracer measures
what the engine really does (FLOPs on both sides, bytes equal to the link's counters)."""

import math

import pytest

from splitlora.bench.trace import ClientWork, StepTrace
from splitlora.experiments.latency import SCENARIOS, LatencyModel, time_to_target

M = LatencyModel(client_flops=1e12, server_flops=10e12, uplink_bps=8e6, downlink_bps=16e6, message_latency_s=0.01)


def split_step(algorithm="splitlora", n=1, fwd=1e9, bwd=2e9, srv=10e9, up=1_000_000, down=1_000_000, **kw):
    clients = [ClientWork(i, fwd_flops=fwd, bwd_flops=bwd, server_flops=srv, up_bytes=up, down_bytes=down)
               for i in range(n)]
    return StepTrace(algorithm, clients, **kw)


def test_defaults_are_documented_values():
    d = LatencyModel()
    assert (d.client_flops, d.server_flops) == (4e12, 100e12)
    assert (d.uplink_bps, d.downlink_bps, d.message_latency_s) == (100e6, 100e6, 0.02)
    assert SCENARIOS["default"] == d


def test_primitives():
    assert M.client_s(2e12) == pytest.approx(2.0)
    assert M.server_s(2e12) == pytest.approx(0.2)
    assert M.up_s(1_000_000) == pytest.approx(0.01 + 1.0)  # 8 Mbit over 8 Mbit/s
    assert M.down_s(1_000_000) == pytest.approx(0.01 + 0.5)


def test_cen_is_server_compute_only():
    step = StepTrace("cen", server_whole_flops=5e12, pooled=True)
    assert M.step_time(step) == pytest.approx(0.5)


def test_fed_is_slowest_client_plus_sync():
    step = StepTrace("fed", [ClientWork(0, whole_flops=1e12), ClientWork(1, whole_flops=3e12)], whole_clients=True)
    assert M.step_time(step) == pytest.approx(3.0)
    step.sync_up_bytes = [1_000_000, 2_000_000]
    step.sync_down_bytes = [1_000_000, 1_000_000]
    assert M.sync_time(step) == pytest.approx((0.01 + 2.0) + (0.01 + 0.5))
    assert M.step_time(step) == pytest.approx(3.0 + 2.01 + 0.51)


def test_split_one_client_is_the_formula():
    step = split_step()
    want = 1e9 / 1e12 + (0.01 + 1.0) + 10e9 / 10e12 + (0.01 + 0.5) + 2e9 / 1e12
    assert M.step_time(step) == pytest.approx(want)
    # sl with one client per step follows the same schedule
    assert M.step_time(split_step("sl")) == pytest.approx(want)


def test_sequential_server_serialises_clients_batched_waits_for_all():
    one = M.step_time(split_step(n=1))
    two = M.step_time(split_step(n=2))
    # both clients arrive together; the second waits for the first's server work
    assert two == pytest.approx(one + 10e9 / 10e12)
    batched = M.step_time(split_step(n=2, batched_server=True))
    assert batched == pytest.approx(two)  # same total server work, same arrival: same end here
    # a slow first client delays a sequential server but a batched one waits for it anyway
    slow = split_step(n=2)
    slow.clients[0].fwd_flops = 5e12
    seq_t = M.step_time(slow)
    bat_t = M.step_time(StepTrace("splitlora", slow.clients, batched_server=True))
    assert seq_t == pytest.approx(5.0 + 1.01 + 2 * 0.001 + 0.51 + 0.002)  # client 1 waits behind client 0
    assert bat_t == pytest.approx(seq_t)


def test_monotone_in_every_constant():
    step = split_step(n=3)
    step.sync_up_bytes, step.sync_down_bytes = [10_000] * 3, [10_000] * 3
    base = M.step_time(step)
    assert M.with_(uplink_bps=16e6).step_time(step) < base
    assert M.with_(downlink_bps=32e6).step_time(step) < base
    assert M.with_(client_flops=2e12).step_time(step) < base
    assert M.with_(server_flops=20e12).step_time(step) < base
    assert M.with_(message_latency_s=0.1).step_time(step) > base


def test_run_time_and_cumulative():
    steps = [StepTrace("cen", server_whole_flops=1e12, pooled=True), StepTrace("cen", server_whole_flops=3e12, pooled=True)]
    assert M.cumulative(steps) == pytest.approx([0.1, 0.4])
    assert M.run_time(steps) == pytest.approx(0.4)


@pytest.mark.parametrize("field,value", [("client_flops", 0), ("server_flops", -1), ("uplink_bps", 0),
                                         ("downlink_bps", 0), ("message_latency_s", -0.1)])
def test_rejects_impossible_constants(field, value):
    with pytest.raises(ValueError, match=field):
        LatencyModel(**{field: value})


def test_the_layout_comes_from_the_trace_not_the_label():
    """A step is timed by where its work ran (the trace's flags), whatever the algorithm is called."""
    pooled = StepTrace("mine", server_whole_flops=5e12, pooled=True)
    whole = StepTrace("mine", [ClientWork(0, whole_flops=1e12)], whole_clients=True)
    assert M.step_time(pooled) == pytest.approx(0.5) and M.step_time(whole) == pytest.approx(1.0)
    assert M.step_time(split_step("mine")) == M.step_time(split_step("splitlora")) > 0


def test_time_to_target():
    assert time_to_target([0, 1, 2, 3], [3.0, 2.5, 1.9, 1.5], 2.0) == 2
    assert time_to_target([0, 1], [3.0, 2.5], 2.0) is None
    assert time_to_target([0, 1], [1.0, 0.5], 2.0) == 0


def test_trace_round_trips_through_json():
    step = split_step(n=2, samples=8, tokens=100)
    step.sync_up_bytes = [5]
    again = StepTrace.from_dict(step.to_dict())
    assert again == step
    assert again.bytes_up == 2_000_005 and again.client_flops == 6e9 and again.server_flops == 20e9


# ---- the tracer on real engine steps ---------------------------------------------------------

def _built(algorithm, tiny_gpt2, **overrides):
    from conftest import tiny_config

    from splitlora.bench.harness import build

    cfg = tiny_config(algorithm=algorithm, **overrides)
    tiny_gpt2.model.requires_grad_(False)
    return build(cfg, tiny_gpt2, trace=True)


def test_tracer_bytes_match_the_link_and_the_formula(tiny_gpt2):
    from splitlora.bench.trace import activation_bytes

    b = _built("splitlora", tiny_gpt2, clients=2, aggregate_every=1)
    hidden = tiny_gpt2.model.config.hidden_size
    for t in range(2):
        up0, down0, padded0 = b.grid.traffic.up, b.grid.traffic.down, b.tokens.padded_tokens
        b.tracer.begin()
        b.algo.step(t)
        tr = b.tracer.end()
        assert tr.bytes_up == b.grid.traffic.up - up0
        assert tr.bytes_down == b.grid.traffic.down - down0
        assert len(tr.clients) == 2 and len(tr.sync_up_bytes) == 2 and len(tr.sync_down_bytes) == 2
        up, down = activation_bytes(1, b.tokens.padded_tokens - padded0, hidden, 4)
        assert sum(c.up_bytes for c in tr.clients) == up
        assert sum(c.down_bytes for c in tr.clients) == down
        assert all(c.fwd_flops > 0 and c.bwd_flops > 0 and c.server_flops > 0 for c in tr.clients)


def test_split_flops_equal_whole_model_flops(tiny_gpt2):
    """splitlora with 1 client computes the same matmuls as cen on the same batch."""
    split = _built("splitlora", tiny_gpt2, clients=1)
    cen = _built("cen", tiny_gpt2, clients=1)
    for b in (split, cen):
        b.tracer.begin()
        b.algo.step(0)
    ts, tc = split.tracer.end(), cen.tracer.end()
    assert tc.server_whole_flops > 0 and not tc.clients
    assert tc.pooled and not tc.whole_clients and not ts.pooled and not ts.whole_clients  # from the Algorithm
    assert ts.client_flops + ts.server_flops == pytest.approx(tc.server_whole_flops, rel=0.01)


def test_sl_hand_over_is_traced_as_sync(tiny_gpt2):
    b = _built("sl", tiny_gpt2, clients=2, aggregate_every=1)
    traces = []
    for t in range(2):
        b.tracer.begin()
        b.algo.step(t)
        traces.append(b.tracer.end())
    # Each turn: the adapter and its AdamW moments come down to the turn's client (from the server,
    # which has the initial one at first) and go back up at its end.
    for tr in traces:
        assert tr.sync_up_bytes and tr.sync_up_bytes == tr.sync_down_bytes
    assert math.isfinite(LatencyModel().step_time(traces[1]))


def test_u_shape_adds_one_round_trip_per_client_batch(tiny_gpt2):
    """The U-shape's trace: no labels up, h_(L-T) down and dL/dh_(L-T) up, the tail's FLOPs on the
    client; the model charges exactly that extra round trip."""
    from splitlora.bench.trace import activation_bytes

    two = _built("splitlora", tiny_gpt2, clients=1, aggregate_every=10)
    u = _built("splitlora", tiny_gpt2, clients=1, aggregate_every=10, split_shape="u-shape", tail_layers=1)
    traces = {}
    for name, b in (("two", two), ("u", u)):
        padded0 = b.tokens.padded_tokens
        b.tracer.begin()
        b.algo.step(0)
        traces[name] = (b.tracer.end(), b.tokens.padded_tokens - padded0)
    (t2, n2), (tu, nu) = traces["two"], traces["u"]
    assert n2 == nu  # the same batch
    hidden = tiny_gpt2.model.config.hidden_size
    (cu,) = tu.clients
    assert tu.u_shape and cu.tail_flops > 0 and cu.server_bwd_flops > 0
    assert cu.up_bytes == activation_bytes(1, nu, hidden, 4, labels=False)[0]
    assert cu.mid_down_bytes == cu.mid_up_bytes == cu.down_bytes == nu * hidden * 4
    # Same matmuls in all (the tail moved from server to client), one more round trip.
    assert tu.client_flops + tu.server_flops == pytest.approx(t2.client_flops + t2.server_flops, rel=0.01)
    m = LatencyModel(client_flops=1e12, server_flops=1e12, message_latency_s=0.05)
    extra = m.step_time(tu) - m.step_time(t2)
    moved = m.down_s(cu.mid_down_bytes) + m.up_s(cu.mid_up_bytes) - 8.0 * (t2.clients[0].up_bytes - cu.up_bytes) / m.uplink_bps
    assert extra == pytest.approx(moved, rel=1e-6)


def test_fed_is_traced_as_whole_model_clients(tiny_gpt2):
    b = _built("fed", tiny_gpt2, clients=2, aggregate_every=1)
    b.tracer.begin()
    b.algo.step(0)
    tr = b.tracer.end()
    assert tr.whole_clients and not tr.pooled and len(tr.clients) == 2
    assert all(c.whole_flops > 0 and c.up_bytes == c.down_bytes == 0 for c in tr.clients)
    assert M.compute_time(tr) == pytest.approx(max(c.whole_flops for c in tr.clients) / M.client_flops)
