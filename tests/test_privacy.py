"""Defences on what leaves a client (clipping, noise, NoPeek) and what they buy (the accountant)."""

import math

import pytest
import torch
from conftest import tiny_config

from splitlora.config import Privacy
from splitlora.messages import Activations, TailGrad
from splitlora.privacy.accounting import epsilon, guarantee, releases_per_example
from splitlora.privacy.defences import Protector, distance_correlation, nopeek_loss
from splitlora.simulation.run import build_simulation


def test_clipping_bounds_every_token_and_keeps_small_ones():
    p = Protector(Privacy(clip_norm=2.0), seed=0)
    x = torch.randn(3, 5, 16) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    y = p.clip(x)
    norms = y.norm(dim=-1)
    assert float(norms.max()) <= 2.0 + 1e-5
    small = x.norm(dim=-1) <= 2.0
    assert torch.equal(y[small], x[small])  # within the ball: untouched
    big = ~small
    cos = torch.nn.functional.cosine_similarity(y[big], x[big], dim=-1)
    assert float(cos.min()) > 0.9999  # scaled, not turned
    x.requires_grad_(True)
    p.clip(x).sum().backward()  # differentiable: the client's backward goes through it
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_noise_is_the_clients_own_seeded_gaussian():
    x = torch.zeros(64, 32, 8)
    a = Protector(Privacy(clip_norm=1.5, noise_multiplier=0.8), seed=7).noise(x)
    b = Protector(Privacy(clip_norm=1.5, noise_multiplier=0.8), seed=7).noise(x)
    c = Protector(Privacy(clip_norm=1.5, noise_multiplier=0.8), seed=8).noise(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.std()) == pytest.approx(0.8 * 1.5, rel=0.05) and abs(float(a.mean())) < 0.02
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    Protector(Privacy(clip_norm=1.0, noise_multiplier=1.0), seed=1).noise(x)
    assert torch.equal(torch.rand(1), before)  # the global generator is not touched
    assert torch.equal(Protector(Privacy(), seed=0).noise(x), x)  # off by default


def test_what_a_protected_client_sends_is_clipped_and_noised(tiny_gpt2):
    """Every activation and gradient tensor a client sends goes through the defence; nothing else changes."""
    cfg = tiny_config(split_shape="u-shape", tail_layers=1, steps=1, privacy={"clip_norm": 0.5, "noise_multiplier": 0.0})
    _, _, grid, algo = build_simulation(cfg, tiny_gpt2)
    sent = []
    grid.observers.append(lambda d, c, msg, n: sent.append(msg) if isinstance(msg, (Activations, TailGrad)) else None)
    algo.join(0)
    algo.step(0)
    assert {type(m).__name__ for m in sent} == {"Activations", "TailGrad"}
    for m in sent:
        t = m.hidden if isinstance(m, Activations) else m.grad
        assert float(t.norm(dim=-1).max()) <= 0.5 + 1e-5


def test_distance_correlation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-5)
    independent = float(distance_correlation(x, torch.randn(200, 6, generator=g)))
    x_big = torch.randn(800, 6, generator=g)
    assert float(distance_correlation(x_big, torch.randn(800, 6, generator=g))) < independent < 0.35  # bias ~ 1/sqrt(n)
    assert float(distance_correlation(x, x.pow(2))) > independent + 0.1  # dependence that correlation misses


def test_nopeek_lowers_the_distance_correlation_it_penalises(tmp_path, tiny_gpt2):
    """Training with NoPeek's penalty leaves the activations less dependent on the input embeddings."""
    dcor = {}
    for weight in (0.0, 5.0):
        cfg = tiny_config(clients=1, steps=30, lr=2e-2, aggregate_every=30, privacy={"nopeek_weight": weight})
        _, data, grid, algo = build_simulation(cfg, tiny_gpt2)
        algo.join(0)
        for t in range(cfg.steps):
            algo.step(t)
        app = next(iter(grid.apps.values()))
        from splitlora.data.batching import collate
        from splitlora.models.split import client_forward

        batch = collate(data.train[:8], tiny_gpt2.model.config.pad_token_id)
        with torch.no_grad():
            emb = app._input_embeddings(batch["input_ids"])
            h = client_forward(app.part, batch["input_ids"], batch["attention_mask"], cut=cfg.cut_layer)
        dcor[weight] = float(nopeek_loss(emb, h, batch["attention_mask"], torch.Generator().manual_seed(0), 512))
    assert dcor[5.0] < dcor[0.0] - 0.02, dcor


def test_accountant_matches_dp_accounting_and_composes():
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(GaussianDpEvent(1.0), 10)
    assert epsilon(1.0, 10, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert epsilon(2.0, 1, 1e-5) < epsilon(1.0, 1, 1e-5) < epsilon(1.0, 10, 1e-5)
    assert math.isinf(epsilon(0.0, 1, 1e-5))
    assert epsilon(0.001, 100, 1e-5) > 1e6  # tiny noise: a number (fast), not a hang


def test_run_guarantee_counts_each_examples_releases():
    cfg = tiny_config(clients=2, steps=10, batch_size=2, privacy={"clip_norm": 1.0, "noise_multiplier": 4.0})
    # 10 steps of batch 2 over 5 examples: 4 epochs, one tensor per step (two-part: h_K).
    assert releases_per_example(cfg, [5, 7]) == 4
    u = cfg.with_overrides({"split_shape": "u-shape"})
    assert releases_per_example(u, [5, 7]) == 8  # h_K and dL/dh_(L-T)
    g = guarantee(cfg, [5, 7])
    assert g.releases == 4 and g.epsilon_token_release < g.epsilon_token_run
    assert g.epsilon_token_release == pytest.approx(epsilon(2.0, 1, 1e-5))  # replace-one: sigma / 2
    assert g.epsilon_example_release > g.epsilon_token_release  # a whole sequence is T tokens
    assert guarantee(tiny_config(), [5]) is None
