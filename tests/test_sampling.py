"""Client sampling (``clients_per_round``): the seeded sample takes part, in process and over loopback
gRPC alike (the served adapter is the trained one)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from splitlora.algorithms.base import sampled
from splitlora.errors import UserError
from splitlora.simulation.run import train


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sampled_clients_train_in_process_and_over_grpc(tmp_path, tiny_gpt2):
    from splitlora.transport.loopback import run_loopback
    from test_deploy import adapter, max_abs_diff, same_rows, write_client_csvs

    cfg = tiny_config(clients=4, clients_per_round=2, steps=4, aggregate_every=2, synthetic_examples=60, threads=1)
    sim = train(cfg, tmp_path / "train", progress=False, loaded=tiny_gpt2)
    records = _records(sim.out_dir)
    assert [r["clients"] for r in records if "event" not in r] == [2] * 4
    used = [sorted(r["used"]) for r in records if r.get("event") == "aggregate"]
    assert used == [sorted(str(i) for i in sampled(cfg, b)) for b in (0, 2)]
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    served = run_loopback(cfg, csvs, tmp_path / "loop", mode="threads", timeout=240)
    assert max_abs_diff(adapter(sim.adapter_dir), adapter(served["adapter_dir"])) <= 1e-6
    assert same_rows(sim.out_dir, tmp_path / "loop/server")


def test_clients_per_round_is_bounded():
    with pytest.raises(UserError, match="clients_per_round must be between 0"):
        tiny_config(clients=3, clients_per_round=4)
