"""Secure aggregation (privacy/secagg.py): the server's view is masked, the sum is FedAvg's, drops survive."""

import numpy as np
import pytest

from splitlora.privacy import secagg


def _round(n=4, length=300, seed=0, clip=1.0, max_weight=1000):
    rng = np.random.default_rng(seed)
    p = secagg.Params(round=3, clients=tuple(range(n)), threshold=secagg.default_threshold(n), clip=clip,
                      max_weight=max_weight, length=length)
    updates = {i: rng.normal(0, 0.3, length) for i in range(n)}
    weights = {i: int(rng.integers(1, max_weight)) for i in range(n)}
    return p, updates, weights


def _weighted_sum(updates, weights, clients, clip):
    return sum(weights[i] * np.clip(updates[i], -clip, clip) for i in clients), sum(weights[i] for i in clients)


def test_unmasked_sum_is_fedavg_to_the_encoding_precision():
    p, updates, weights = _round()
    values, weight, _ = secagg.run_in_process(p, updates, weights)
    expected, total = _weighted_sum(updates, weights, p.clients, p.clip)
    assert weight == total
    assert np.abs(values - expected).max() <= secagg.precision(p, len(p.clients)) * 1.01
    assert np.abs(values / weight - expected / total).max() < 1e-9  # the FedAvg itself


def test_the_servers_view_reveals_no_single_update():
    p, updates, weights = _round(n=3, length=2000)
    _, _, view = secagg.run_in_process(p, updates, weights)
    for i, masked in view["masked"].items():
        plain = secagg.encode(updates[i], weights[i], p)
        # What the server holds of client i is uniform in Z_(2^64): uncorrelated with the encoding ...
        corr = np.corrcoef(masked[:-1].astype(np.float64), plain[:-1].astype(np.float64))[0, 1]
        assert abs(corr) < 0.1
        top = (masked >> np.uint64(56)).astype(np.int64)  # ... its top bytes spread over all 256 values
        assert len(np.unique(top)) > 200
        # ... and decoding it as if unmasked gives nothing near the update.
        guess, _ = secagg.decode(masked, 1, p)
        assert np.abs(guess / weights[i] - np.clip(updates[i], -1, 1)).mean() > 10
        # The weight coordinate is masked too.
        assert int(masked[-1]) != weights[i]
    # The shares travel encrypted: no ciphertext holds a plaintext share's bytes.
    for out in view["ciphertexts"].values():
        for blob in out.values():
            assert len(blob) == 12 + 72 + 16  # nonce, (sender, recipient, two 32-byte shares), GCM tag


def test_a_client_dropped_mid_round_does_not_stop_it():
    p, updates, weights = _round(n=5)
    values, weight, view = secagg.run_in_process(p, updates, weights, drop_after_sharing=(1, 3))
    survivors = [0, 2, 4]
    expected, total = _weighted_sum(updates, weights, survivors, p.clip)
    assert sorted(view["masked"]) == survivors and weight == total
    assert np.abs(values - expected).max() <= secagg.precision(p, 3) * 1.01


def test_too_many_drops_refuse_and_no_secret_is_given_twice():
    p, updates, weights = _round(n=3)  # threshold 2
    with pytest.raises(secagg.SecAggError):
        secagg.run_in_process(p, updates, weights, drop_after_sharing=(0, 1))
    clients = {i: secagg.SecAggClient(i, p) for i in p.clients}
    keys = {i: c.advertise() for i, c in clients.items()}
    out = {i: c.share(keys) for i, c in clients.items()}
    c0 = clients[0]
    c0.masked_input({j: o[0] for j, o in out.items() if 0 in o}, updates[0], weights[0])
    with pytest.raises(secagg.SecAggError):  # a server asking for both b_1 and s_1
        c0.unmask([0, 1, 2], [1])
    c0.unmask([0, 2], [1])
    with pytest.raises(secagg.SecAggError):  # a second request (e.g. with 1 now called dropped)
        c0.unmask([0, 1], [2])


def test_tampered_share_and_bad_inputs_are_refused():
    p, updates, weights = _round(n=3)
    clients = {i: secagg.SecAggClient(i, p) for i in p.clients}
    keys = {i: c.advertise() for i, c in clients.items()}
    out = {i: c.share(keys) for i, c in clients.items()}
    received = {j: o[0] for j, o in out.items() if 0 in o}
    bad = dict(received)
    bad[1] = bad[1][:-1] + bytes([bad[1][-1] ^ 1])
    with pytest.raises(secagg.SecAggError):
        clients[0].masked_input(bad, updates[0], weights[0])
    swapped = {1: received[2], 2: received[1]}  # a server re-routing shares
    with pytest.raises(secagg.SecAggError):
        clients[0].masked_input(swapped, updates[0], weights[0])
    with pytest.raises(secagg.SecAggError):
        clients[0].masked_input(received, updates[0], p.max_weight + 1)


def test_each_coordinate_is_bounded_by_the_encoding_range():
    p, updates, weights = _round(n=3, clip=0.1)
    updates[0][:5] = 50.0  # outside the range: clipped to it, never wrapped around the field
    values, weight, _ = secagg.run_in_process(p, updates, weights)
    expected, _ = _weighted_sum(updates, weights, p.clients, p.clip)
    assert np.abs(values - expected).max() <= secagg.precision(p, 3) * 1.01


# ---- through the grid: a training run whose aggregator sees only masked inputs ---------------------

def _run(tiny_gpt2, tmp_path, algorithm="fed", secure=True, drop=None, clients=3):
    from conftest import tiny_config

    from splitlora.messages import SecAgg
    from splitlora.simulation.run import build_simulation, run_training

    cfg = tiny_config(algorithm=algorithm, clients=clients, steps=2, aggregate_every=2,
                      privacy={"secure_aggregation": secure}, aggregation={"max_update_ratio": 0.0})
    source, data, grid, algo = build_simulation(cfg, tiny_gpt2)
    seen = {"up": [], "states": {}}

    def record(direction, name, message, nbytes):
        if direction == "up":
            seen["up"].append((name, message))
        elif isinstance(message, SecAgg) and message.stage == "mask":
            seen["states"][name] = grid.apps[name].lora_state()

    grid.observers.append(record)
    if drop is not None:  # this client disconnects after sharing its keys' shares
        app = grid.apps[drop]
        handle = app.handle
        app.handle = lambda cmd: None if isinstance(cmd, SecAgg) and cmd.stage in ("mask", "unmask") else handle(cmd)
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_training(cfg, tmp_path, source, data, algo, progress=False)
    return algo, seen


def test_run_aggregator_view_is_masked_and_sum_is_fedavg(tiny_gpt2, tmp_path):
    import torch

    from splitlora.messages import AdapterUpdate, SecAggReply
    from splitlora.runtime.aggregator import fedavg

    algo, seen = _run(tiny_gpt2, tmp_path / "secure")
    assert not any(isinstance(m, AdapterUpdate) for _, m in seen["up"])  # no adapter ever travels alone
    masked = [(n, m) for n, m in seen["up"] if isinstance(m, SecAggReply) and m.stage == "mask"]
    assert sorted(n for n, _ in masked) == ["0", "1", "2"]
    for name, m in masked:
        state = seen["states"][name]
        flat = np.concatenate([state[k].double().flatten().numpy() for k in sorted(state)])
        y = np.frombuffer(m.data, dtype="<u8")
        corr = np.corrcoef(y[:-1].astype(np.float64), flat)[0, 1]
        assert abs(corr) < 0.1  # the upload says nothing about this client's adapter
    # The average the clients got back is FedAvg of the adapters they held, to the encoding's precision.
    sizes = {n: algo.grid.apps[n].num_samples for n in seen["states"]}
    expected = fedavg([seen["states"][n] for n in sorted(sizes)], [sizes[n] for n in sorted(sizes)])
    for k, v in expected.items():
        torch.testing.assert_close(algo.global_state[k], v, rtol=0, atol=1e-7)


def test_run_finishes_the_round_when_a_site_drops(tiny_gpt2, tmp_path):
    import torch

    from splitlora.runtime.aggregator import fedavg

    algo, seen = _run(tiny_gpt2, tmp_path / "drop", algorithm="splitlora", drop="1")
    survivors = ["0", "2"]
    sizes = {n: algo.grid.apps[n].num_samples for n in survivors}
    expected = fedavg([seen["states"][n] for n in survivors], [sizes[n] for n in survivors])
    for k, v in expected.items():
        torch.testing.assert_close(algo.global_state[k], v, rtol=0, atol=1e-7)


def test_over_grpc_the_server_receives_only_masked_inputs_and_gets_trains_adapter(tmp_path, tiny_gpt2, monkeypatch):
    """Loopback gRPC: the same secure round as in process (the decoded sum is exact, so the adapters
    agree), and no reply the server decodes is an adapter."""
    from test_deploy import adapter, deploy_config, max_abs_diff, write_client_csvs

    from splitlora.simulation.run import train
    from splitlora.transport import sessions
    from splitlora.transport.loopback import run_loopback

    kinds = []

    def recorded(msg, expect, _real=sessions.reply_from_proto):
        kinds.append(msg.WhichOneof("payload"))
        return _real(msg, expect)

    monkeypatch.setattr(sessions, "reply_from_proto", recorded)
    cfg = deploy_config(algorithm="fed", steps=4, privacy={"secure_aggregation": True})
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    result = train(cfg, tmp_path / "train", progress=False, loaded=tiny_gpt2)
    out = run_loopback(cfg, csvs, tmp_path / "loop", wire_dtype="fp32", mode="threads", timeout=240)
    assert "adapter" not in kinds and kinds.count("secagg") == 4 * cfg.clients * 2  # 4 stages, 2 rounds
    assert max_abs_diff(adapter(result.adapter_dir), adapter(out["adapter_dir"])) <= 1e-6
