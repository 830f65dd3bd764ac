"""The memory probe (splitlora.bench.memproc): roles named after what the process holds, the algorithm
each runs chosen by its attributes, the old names (the algorithms) still accepted, and one probe per role."""

import json

import pytest

from splitlora.algorithms import ALGORITHMS
from splitlora.bench.memproc import ROLES, ProbeSpec, probe_all, role_algorithm


def test_each_role_runs_the_algorithm_its_attributes_pick():
    whole = ALGORITHMS[role_algorithm("whole")]
    assert whole.whole_clients and whole.pools_data
    for role in ("simulation", "client", "server"):
        split = ALGORITHMS[role_algorithm(role)]
        assert split.holds_server_part and not split.whole_clients and split.every_client_steps


def test_the_old_role_names_still_parse():
    """A probe command written before the rename (docs/benchmarks.md recorded some) still runs."""
    assert ProbeSpec(**json.loads('{"role": "cen", "model": "tiny-gpt2"}')).role == "whole"
    assert ProbeSpec(role="splitlora", clients=2).role == "simulation"
    assert [ProbeSpec(role=r).role for r in ROLES] == list(ROLES)
    assert ProbeSpec().role == "whole"
    with pytest.raises(ValueError, match="role must be one of whole, simulation, client, server"):
        ProbeSpec(role="fed")


@pytest.mark.slow
def test_one_probe_per_role():
    """Each role in its own process, on tiny-gpt2: it trains, and the client holds less than the whole."""
    common = dict(model="tiny-gpt2", cut=2, batch_size=2, max_length=32, warmup=1, steps=1, threads=1)
    specs = [ProbeSpec(role=r, clients=2 if r == "simulation" else 1, **common) for r in ROLES]
    got = dict(zip(ROLES, probe_all(specs, jobs=2)))
    for role, r in got.items():
        assert r["spec"]["role"] == role and f'"role":"{role}"' in r["probe_command"]
        assert r["peak_rss_mib"] > r["baseline_rss_mib"] > 0 and r["tokens"] > 0 and r["lora_mib"] > 0
    assert got["client"]["weights_mib"] < got["whole"]["weights_mib"]
    assert got["server"]["weights_mib"] < got["whole"]["weights_mib"]
    assert got["simulation"]["lora_mib"] > got["whole"]["lora_mib"]  # two clients' LoRA and the server's


def test_the_8b_rows_settings_parse():
    """`bench memory --set big_model_dir=... --set big_variants=...` (docs/scaling.md's commands) are
    accepted, and a variant names its dtype, flags and tokens."""
    from splitlora.bench.common import apply_sets
    from splitlora.bench.memory import Settings, _variant

    s = apply_sets(Settings(), {"big_model_dir": "/tmp/llama3-8b-6", "big_variants": "fp32,bf16+ckpt@64",
                                "big_deployed": "fp32@64"}, "memory")
    assert (s.big_model_dir, s.big_variants, s.big_deployed) == ("/tmp/llama3-8b-6", ["fp32", "bf16+ckpt@64"],
                                                                 ["fp32@64"])
    assert [_variant(v, s.big_max_length) for v in s.big_variants] == [("fp32", [], 512), ("bf16", ["ckpt"], 64)]
