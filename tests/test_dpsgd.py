"""Record-level DP-SGD (privacy/dpsgd.py): per-example clipping, each party's own noise, the accountant."""

import math

import pytest
import torch

from conftest import tiny_config


def _batch(vocab=100, b=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt without loss
    labels[mask == 0] = -100
    return ids, mask, labels


def _random_state(part, seed=1):
    """A non-zero adapter (PEFT's init has B = 0, which makes every A gradient 0)."""
    from splitlora.models.lora import load_lora_state, lora_state

    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora_state(part).items()}
    load_lora_state(part, state)
    return state


def _loop_grads(part, params, ids, mask, labels):
    """Each example's gradient by its own forward and backward (no Opacus): the reference."""
    from splitlora.privacy.dpsgd import per_example_losses

    out = []
    for i in range(ids.shape[0]):
        logits = part(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        grads = torch.autograd.grad(per_example_losses(logits, labels[i:i + 1])[0].sum(), params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return out


@pytest.fixture(scope="module")
def whole_source(tiny_gpt2):
    from splitlora.models.parts import SharedModel

    return SharedModel(tiny_gpt2, tiny_config(algorithm="fed", client_lora={"dropout": 0.0}))


def test_every_example_clipped_and_the_noise_is_the_partys_own(whole_source):
    from splitlora.privacy.dpsgd import DpSgd, per_example_losses

    part = whole_source.lora_part("whole")
    _random_state(part)
    part.train()
    ids, mask, labels = _batch()
    clip, sigma, seed = 0.05, 0.7, 1234
    dp = DpSgd(part, clip, sigma * clip, seed)
    per_example_losses(part(input_ids=ids, attention_mask=mask).logits, labels)[0].sum().backward()
    dp.privatise()
    before, after = dp.last_norms
    assert bool((before > clip).all())  # the bound binds on every example here ...
    assert float(after.max()) <= clip * (1 + 1e-5)  # ... and every example leaves clipped to it

    # The same estimate from per-example gradients computed one example at a time, clipped by hand,
    # plus noise from a generator seeded with the party's seed: equal.
    reference = _loop_grads(part, dp.params, ids, mask, labels)
    noise = torch.Generator().manual_seed(seed)
    for j, p in enumerate(dp.params):
        total = sum(g[j] * min(1.0, clip / math.sqrt(sum(float(x.pow(2).sum()) for x in g))) for g in reference)
        expected = (total + torch.randn(p.shape, generator=noise) * sigma * clip) / ids.shape[0]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)

    # Another party (same adapter, same batch, its own seed): another noise.
    twin = whole_source.lora_part("whole")
    _random_state(twin)
    twin.train()
    other = DpSgd(twin, clip, sigma * clip, seed + 1)
    per_example_losses(twin(input_ids=ids, attention_mask=mask).logits, labels)[0].sum().backward()
    other.privatise()
    assert all(not torch.allclose(a.grad, b.grad) for a, b in zip(dp.params, other.params))


def test_split_per_example_gradients_equal_unsplit(tiny_gpt2):
    """Client and server per-example gradients (each computed by its own party) are the whole model's."""
    from splitlora.models.parts import SharedModel
    from splitlora.models.split import client_forward, server_forward
    from splitlora.privacy.dpsgd import DpSgd, per_example_losses

    cfg = tiny_config(algorithm="splitlora", cut_layer=1, client_lora={"dropout": 0.0},
                      server_lora={"dropout": 0.0})
    source = SharedModel(tiny_gpt2, cfg)
    whole, client, server = (source.lora_part(s) for s in ("whole", "client", "server"))
    state = _random_state(whole)
    from splitlora.models.lora import load_lora_state

    load_lora_state(client, state)
    load_lora_state(server, state)
    for m in (whole, client, server):
        m.train()
    dps = {name: DpSgd(m, 1e9, 0.0, 0) for name, m in (("whole", whole), ("client", client), ("server", server))}
    ids, mask, labels = _batch()
    per_example_losses(whole(input_ids=ids, attention_mask=mask).logits, labels)[0].sum().backward()
    h = client_forward(client, ids, mask, cut=cfg.cut_layer)
    sent = h.detach().requires_grad_(True)
    per_example_losses(server_forward(server, sent, mask), labels)[0].sum().backward()
    h.backward(sent.grad)
    expected = dict(zip(dps["whole"].names, dps["whole"].per_example()))
    split = {**dict(zip(dps["client"].names, dps["client"].per_example())),
             **dict(zip(dps["server"].names, dps["server"].per_example()))}
    assert split.keys() == expected.keys()
    nonzero = 0
    for name, g in split.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6)
        nonzero += int(bool(g.abs().sum() > 0))
    assert nonzero == len(split)


def test_epsilon_matches_opacus_accountant():
    from opacus.accountants import RDPAccountant

    from splitlora.privacy.accounting import dp_sgd_epsilon

    for sigma, epochs in ((1.0, 3), (4.0, 10)):
        ours = dp_sgd_epsilon(sigma, epochs, 1e-5)
        acc = RDPAccountant()
        for _ in range(epochs):  # replace-one: multiplier sigma / 2; no subsampling: sample rate 1
            acc.step(noise_multiplier=sigma / 2, sample_rate=1.0)
        assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=0.03)
    assert dp_sgd_epsilon(1.0, 0, 1e-5) == 0.0
    assert dp_sgd_epsilon(1.0, 4, 1e-5) > dp_sgd_epsilon(1.0, 2, 1e-5)


@pytest.mark.parametrize("algorithm", ["splitlora", "fed", "sl"])
def test_dp_run_clips_every_party_and_logs_epsilon(tmp_path, tiny_gpt2, monkeypatch, algorithm):
    from splitlora.privacy import dpsgd
    from splitlora.privacy.accounting import dp_sgd_epsilon
    from splitlora.runtime.metrics import read_metrics
    from splitlora.simulation.run import train

    seen = []
    original = dpsgd.DpSgd.privatise

    def checked(self, batch_size=None):
        original(self, batch_size)
        seen.append((self.bound, float(self.last_norms[1].max()), self.generator.initial_seed()))

    monkeypatch.setattr(dpsgd.DpSgd, "privatise", checked)
    cfg = tiny_config(algorithm=algorithm, steps=3, privacy={"dp_clip_norm": 0.01, "dp_noise_multiplier": 1.0})
    train(cfg, tmp_path, progress=False, loaded=tiny_gpt2)
    assert seen and all(after <= bound * (1 + 1e-5) for bound, after, _ in seen)
    seeds = {s for *_, s in seen}
    split = algorithm != "fed"
    parties = {"splitlora": 3, "sl": 3, "fed": 2}[algorithm]  # clients (+ the server)
    assert len(seeds) == parties  # every party draws its noise from its own generator
    assert {b for b, *_ in seen} == {0.01 / math.sqrt(2) if split else 0.01}
    rows = [r for r in read_metrics(tmp_path) if "loss" in r and "event" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("epsilon" in r for r in rows)
    # 18 training examples per site, batches of 2: 3 steps touch each site's data once (one epoch),
    # so every site's epsilon is the accountant's for one composition at sigma.
    expected = dp_sgd_epsilon(1.0, 1, cfg.privacy.delta)
    for r in rows:
        # sl: turns of I = 2 steps, so site 1 has no record in the adapter before step 3.
        first_use = {"0": 1, "1": 3 if algorithm == "sl" else 1}
        assert r["epsilon_sites"] == {k: pytest.approx(expected if r["step"] >= s else 0.0)
                                      for k, s in first_use.items()}
        assert r["epsilon"] == pytest.approx(expected)


def test_dp_config_checks():
    from splitlora.errors import UserError

    with pytest.raises(UserError):
        tiny_config(privacy={"dp_noise_multiplier": 1.0})
    with pytest.raises(UserError):
        tiny_config(algorithm="splitlora", split_shape="u-shape", tail_layers=1,
                    privacy={"dp_clip_norm": 1.0})


def test_poisson_sampling_is_poisson_and_its_epsilon_is_the_accountants(tmp_path, tiny_gpt2):
    from opacus.accountants import RDPAccountant

    from splitlora.privacy.accounting import dp_sgd_epsilon, poisson_dp_sgd_epsilon
    from splitlora.privacy.dpsgd import PoissonStream
    from splitlora.runtime.metrics import read_metrics
    from splitlora.simulation.run import train

    items = [type("E", (), {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]})() for _ in range(200)]
    stream = PoissonStream(items, 0.05, 0, seed=7)
    sizes = [0 if b is None else b["input_ids"].shape[0] for b in (next(stream) for _ in range(400))]
    assert len(set(sizes)) > 5 and 9 < sum(sizes) / len(sizes) < 11  # variable, mean rate x n = 10
    assert 0 in sizes or min(sizes) < 5

    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.01)
    acc.history = [(1.1, 0.01, 500)]
    assert poisson_dp_sgd_epsilon(1.1, 0.01, 500, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=0.03)

    cfg = tiny_config(algorithm="fed", steps=3, privacy={"dp_clip_norm": 0.01, "dp_noise_multiplier": 1.0,
                                                         "dp_poisson": True})
    train(cfg, tmp_path, progress=False, loaded=tiny_gpt2)
    last = [r for r in read_metrics(tmp_path) if "event" not in r][-1]
    # 18 records per site, batch 2: rate 1/9, 3 steps.
    assert last["epsilon_sites"]["0"] == pytest.approx(poisson_dp_sgd_epsilon(1.0, 2 / 18, 3, 1e-5))
    assert last["epsilon"] < dp_sgd_epsilon(1.0, 1, 1e-5)  # amplified: below one unsampled pass
