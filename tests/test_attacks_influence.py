"""Bounded influence (issue 19): an authenticated client whose values stay inside every bound must not
poison, freeze or stall a run. In process: a :class:`attack_sim.Malicious` client is driven by the same
algorithm code the deployed server runs; each attack is measured against what one more honest client
moves the result (:class:`attack_sim.Yardstick`)."""

import pytest
import torch

from attack_sim import (BOUND, Malicious, Yardstick, client_side, echo, max_abs_diff, on_handover, on_upload, run,
                        scaled, zeros)
from conftest import tiny_config
from splitlora.messages import AdapterUpdate, Load, Upload


def withhold_last_upload(rounds: int):
    def tamper(command, reply, me):
        if isinstance(command, Upload) and command.round == rounds - 1:
            return None
        return reply
    return lambda app: Malicious(app, tamper)


def test_withheld_last_upload_under_min_clients_sends_no_round_past_the_last(tiny_gpt2):
    cfg = tiny_config(steps=2, aggregate_every=1)
    rounds = cfg.steps // cfg.aggregate_every
    state, grid, log = run(cfg, tiny_gpt2, attackers={1: withhold_last_upload(rounds)}, min_clients=2)
    numbered = [(name, cmd.round) for name, cmd in grid.sent if isinstance(cmd, (Upload, Load))]
    assert numbered and max(r for _, r in numbered) <= rounds, numbered
    # One aggregation per round boundary: the skipped last one is not run again at the end.
    tried = [e["step"] for e in log.records if e.get("event", "").startswith("aggregate")]
    assert tried == sorted(set(tried)), tried
    assert log.events("aggregate_skipped")


# ---- FedAvg: drift, weight capture, collapse, echo, collusion ------------------------------------------

FED_ATTACKS = {
    "drift": on_upload(scaled(1e3)),  # far outside: clipped (or rejected) to the bound every round
    "drift-under-bound": on_upload(scaled(1.45)),  # just under the bound, every round
    "weight-capture": on_upload(scaled(1.45), declare=1 << 40),
    "collapse": on_upload(zeros),  # all-zero adapter
    "echo": on_upload(echo),  # the current average back
}


@pytest.fixture(scope="module")
def fed_yardstick(tiny_gpt2):
    return Yardstick(tiny_config(algorithm="fed", clients=4), tiny_gpt2)


@pytest.mark.parametrize("attack", list(FED_ATTACKS))
def test_fedavg_attack_is_bounded_by_one_honest_client(fed_yardstick, attack):
    """fed, 3 honest clients + 1 attacker (fedavg tolerates (n-1)//2 = 1): the attacked adapter is at
    most BOUND times as far from the honest-only one as one more honest client takes it; the round
    is never skipped, and a collapsed round does not poison the next (the honest uploads stay in)."""
    d, grid, log = fed_yardstick.attack(FED_ATTACKS[attack])
    ratio = d / fed_yardstick.d_extra
    print(f"\nfed {attack}: attacked {d:.3g} vs one honest extra {fed_yardstick.d_extra:.3g} -> {ratio:.2f}x")
    assert ratio <= BOUND
    aggs = log.events("aggregate")
    assert len(aggs) == 2 and not log.events("aggregate_skipped")
    assert all({"0", "1", "2"} <= set(e["used"]) for e in aggs), aggs  # no honest upload is ever refused
    if attack == "weight-capture":
        assert all(e["capped"] == {"3": 1 << 40} for e in aggs)


@pytest.mark.slow  # the fed tests above check the same aggregation; this one measures the split's client side
def test_splitlora_fedavg_drift_is_bounded(tiny_gpt2):
    """splitlora (client side averaged): the same drift, measured on the averaged keys."""
    y = Yardstick(tiny_config(clients=4), tiny_gpt2, keys=client_side)
    for attack in ("drift", "collapse"):
        d, _, _ = y.attack(FED_ATTACKS[attack])
        print(f"\nsplitlora {attack}: attacked {d:.3g} vs one honest extra {y.d_extra:.3g} -> {d / y.d_extra:.2f}x")
        assert d <= BOUND * y.d_extra


# The robust rules, each at the attackers it tolerates (colluders send the same far-out update).
# (the model-level runs of the last four are slow: test_robust_rule_ignores_a_far_upload checks each rule fast)
ROBUST = [  # rule, clients, colluders (= its tolerated number at that count)
    ("fedavg", 5, 1),  # its guard holds up to (n-1)//2, but each attacker adds up to 1.5 honest clients
    ("median", 5, 2),
    pytest.param("trimmed-mean", 5, 1, marks=pytest.mark.slow),
    pytest.param("krum", 5, 1, marks=pytest.mark.slow),
    pytest.param("multi-krum", 5, 1, marks=pytest.mark.slow),
    pytest.param("bulyan", 7, 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("rule,clients,colluders", ROBUST)
def test_robust_rule_bounds_its_tolerated_colluders(tiny_gpt2, rule, clients, colluders):
    from splitlora.runtime.aggregator import AGGREGATORS

    cfg = tiny_config(algorithm="fed", clients=clients, steps=2, aggregate_every=1,
                      aggregation={"rule": rule})
    assert AGGREGATORS[rule](cfg.aggregation).tolerates(clients) >= colluders
    y = Yardstick(cfg, tiny_gpt2, attackers=colluders)
    for attack in ("drift", "collapse"):
        d, _, log = y.attack(FED_ATTACKS[attack])
        print(f"\n{rule}, {colluders} of {clients} colluding, {attack}: attacked {d:.3g} vs one honest extra "
              f"{y.d_extra:.3g}")
        # (+1e-6: Krum may leave the extra honest client out too; then both distances are float noise)
        assert d <= BOUND * y.d_extra + 1e-6
        assert not log.events("aggregate_skipped")


# ---- sl hand-overs: the server's own count and bounds ------------------------------------------------

def _steps_at_end(h, me):
    h.opt_steps = me.app.cfg.steps  # the largest count the wire accepts: the next schedule at its end
    return h


def _freeze(h, me):
    from splitlora.messages import Handover
    return Handover(h.state, h.exp_avg, {k: v * 1e12 + 1e-3 for k, v in h.exp_avg_sq.items()}, h.opt_steps)


def _huge_adapter(h, me):
    from splitlora.messages import Handover
    return Handover({k: v + 1e4 for k, v in h.state.items()}, h.exp_avg, h.exp_avg_sq, h.opt_steps)


SL_ATTACKS = {"opt_steps": _steps_at_end, "exp_avg_sq": _freeze, "adapter": _huge_adapter}


@pytest.fixture(scope="module")
def sl_yardstick(tiny_gpt2):
    # 3 clients, turns of 2 steps: 0, 1, 2 (the attacker), 0: an honest turn follows the attack.
    return Yardstick(tiny_config(algorithm="sl", clients=3, steps=8, aggregate_every=2), tiny_gpt2)


@pytest.mark.parametrize("attack", list(SL_ATTACKS))
def test_sl_handover_attack_is_bounded_and_blames_nobody_else(sl_yardstick, attack):
    """The server sets opt_steps from its own count, clips the adapter's change to what AdamW's steps at
    the schedule's learning rates could make, and bounds exp_avg_sq's growth: nobody is dropped (the
    honest client after the attacker is never blamed), and the result is bounded."""
    d, grid, log = sl_yardstick.attack(on_handover(SL_ATTACKS[attack]))
    ratio = d / sl_yardstick.d_extra
    print(f"\nsl {attack}: attacked {d:.3g} vs one honest extra {sl_yardstick.d_extra:.3g} -> {ratio:.2f}x")
    assert ratio <= BOUND
    assert not grid.dropped
    flagged = [e for e in log.events("handback") if e.get("bounded")]
    assert flagged and all(e["from_client"] == "2" for e in flagged), flagged
    # An honest run's hand-overs are within every bound.
    assert not [e for e in sl_yardstick.log_extra.events("handback") if e.get("bounded")]


# ---- U-shape: one client's share of the server's update ------------------------------------------------

@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_u_shape_tail_gradient_cannot_own_the_server_update(tiny_gpt2, mode):
    """A tail gradient a million times an honest one (far inside the value bound) is scaled down to
    tail_grad_ratio times the reference: the server adapter stays within BOUND of one more honest
    client's effect, the attacker is not dropped (its values are legal), nobody else is."""
    from attack_sim import on_tail

    cfg = tiny_config(clients=4, split_shape="u-shape", tail_layers=1, cut_layer=1, server_mode=mode)
    y = Yardstick(cfg, tiny_gpt2)
    d, grid, log = y.attack(on_tail(1e6))
    print(f"\nu-shape {mode}, tail gradient x1e6: attacked {d:.3g} vs one honest extra {y.d_extra:.3g} "
          f"-> {d / y.d_extra:.2f}x")
    assert d <= BOUND * y.d_extra
    assert not grid.dropped


# ---- what is logged ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm,extra", [("fed", {}), ("splitlora", {"split_shape": "u-shape", "cut_layer": 1})])
def test_forged_loss_does_not_reach_the_log(tiny_gpt2, algorithm, extra):
    """A client reporting a loss of 1e308 (finite) used to overflow every logged mean into null; its report
    is left out: every logged loss is finite and an honest one (cross-entropy of tiny-gpt2, < 20)."""
    import json

    from splitlora.messages import StepDone, TailGrad

    def forge(command, reply, me):
        if isinstance(reply, (StepDone, TailGrad)):
            reply.loss = 1e308
        return reply

    cfg = tiny_config(algorithm=algorithm, clients=3, **extra)
    _, _, attacked = run(cfg, tiny_gpt2, attackers={2: lambda app: Malicious(app, forge)})
    rows = [r for r in attacked.records if "event" not in r]
    assert len(rows) == cfg.steps
    assert all(r["loss"] is not None and r["loss"] < 20 for r in rows), [r["loss"] for r in rows]
    json.dumps(attacked.records, allow_nan=False)


# ---- the rules themselves (no model) ------------------------------------------------------------------

def _uploads(rows, claims=None):
    claims = claims or [10] * len(rows)
    return [(str(i), i, c, {"w": torch.tensor(r, dtype=torch.float32)}) for i, (r, c) in enumerate(zip(rows, claims))]


def _rules(**kw):
    from splitlora.config import Aggregation
    return Aggregation(**kw)


def test_rules_match_their_definitions():
    import numpy as np

    from splitlora.runtime.aggregator import coordinate_median, krum_scores, trimmed_mean

    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(coordinate_median(x), torch.from_numpy(np.median(x.numpy(), axis=0)))
    s = np.sort(x.numpy(), axis=0)
    assert torch.allclose(trimmed_mean(x, 0.2), torch.from_numpy(s[1:5].mean(axis=0)))
    # Krum: a tight cluster of 4 and one far point; the far point has the worst score.
    pts = torch.tensor([[0.0, 0], [0.1, 0], [0, 0.1], [0.1, 0.1], [50, 50]])
    assert int(krum_scores(pts, 1).argmax()) == 4


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_robust_rule_ignores_a_far_upload(rule):
    from splitlora.runtime.aggregator import AGGREGATORS

    honest = [[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.05], [1.05, 1.0], [0.95, 1.0]]
    rows = honest + [[1e3, -1e3]]
    agg = AGGREGATORS[rule](_rules(rule=rule, max_update_ratio=0))
    assert agg.tolerates(len(rows)) >= 1
    out = agg(_uploads(rows), {"w": torch.zeros(2)})
    assert out.state is not None and float((out.state["w"] - 1).abs().max()) <= 0.1, out.state


def test_fedavg_weight_cap_and_norm_reference_from_earlier_rounds():
    from splitlora.runtime.aggregator import Aggregator

    agg = Aggregator(_rules())
    current = {"w": torch.zeros(2)}
    out = agg(_uploads([[1, 0], [0, 1], [1, 1]], claims=[10, 10, 1 << 40]), current)
    assert out.capped == {"2": 1 << 40} and out.samples == [10, 10, 15]
    assert agg.reference == pytest.approx(1.0)  # the lower median of 1, 1, 1.41
    # Next round: colluders (2 of 3) push every norm to 100: the reference grows at most 4x.
    out = agg(_uploads([[100, 0], [0, 100], [1, 0]]), current)
    assert out.bound == pytest.approx(1.5 * 4 * 1.0)
    assert float(out.state["w"].norm()) <= out.bound + 1e-6


def test_an_average_that_is_not_finite_is_never_sent():
    from splitlora.runtime.aggregator import Aggregator

    agg = Aggregator(_rules(max_update_ratio=0, max_weight_ratio=0))
    out = agg(_uploads([[3e38, 0], [3e38, 0]]), {"w": torch.zeros(2)})
    assert out.state is None and "not finite" in out.refused


@pytest.mark.parametrize("mode", ["sequential", pytest.param("batched", marks=pytest.mark.slow)])
def test_two_part_activations_cannot_own_the_server_update(tiny_gpt2, mode):
    """Two-part split: activations scaled a million times (inside the value bound) reach the server's
    LoRA only through its blocks' layer norms and a cross-entropy it computes itself, so one client's
    share of the server's update is bounded without clipping; measured here against one more honest
    client."""
    from splitlora.messages import Activations

    def scale(command, reply, me):
        if isinstance(reply, Activations):
            reply.hidden = reply.hidden * 1e6
        return reply

    y = Yardstick(tiny_config(clients=4, server_mode=mode), tiny_gpt2)
    d, grid, _ = y.attack(lambda app: Malicious(app, scale))
    print(f"\ntwo-part {mode}, activations x1e6: attacked {d:.3g} vs one honest extra {y.d_extra:.3g} "
          f"-> {d / y.d_extra:.2f}x")
    assert d <= BOUND * y.d_extra


@pytest.mark.parametrize("bad,needle", [({"rule": "mean"}, "aggregation.rule"),
                                        ({"max_weight_ratio": 0.5}, "max_weight_ratio"),
                                        ({"trim_fraction": 0.5}, "trim_fraction"),
                                        ({"tail_grad_ratio": -1}, "tail_grad_ratio")])
def test_bad_aggregation_settings_are_one_line_errors(bad, needle):
    from splitlora.config import RunConfig
    from splitlora.errors import UserError

    with pytest.raises(UserError, match=needle):
        RunConfig.from_dict({"aggregation": bad})
