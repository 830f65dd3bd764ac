"""Bounded influence (issue 19): an authenticated client whose values stay inside every bound must not
poison, freeze or stall a run. In process: a :class:`attack_sim.Malicious` client is driven by the same
algorithm code the deployed server runs; each attack is measured against what one more honest client
moves the result (:class:`attack_sim.Yardstick`)."""

import pytest
import torch

from attack_sim import BOUND, Malicious, Yardstick, max_abs_diff, run
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
