"""Invariants of the engine: splitlora(1 client) == cen, FedAvg is sample-weighted, same seed gives
the same adapter, the product loads as one PEFT adapter of the unsplit model, memory is shared."""

import logging
import warnings

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from splitlora.data import prepare_data
from splitlora.messages import Activations
from splitlora.models.lora import lora_state
from splitlora.simulation.run import build_simulation, train


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("shape", [{}, {"split_shape": "u-shape", "tail_layers": 1},
                                   {"split_shape": "u-shape", "tail_layers": 0, "cut_layer": 1}],
                         ids=["two-part", "u-shape-T1", "u-shape-T0"])
def test_splitlora_one_client_equals_cen(tmp_path, tiny_gpt2, shape):
    common = dict(steps=20, clients=1, aggregate_every=1, batch_size=2, synthetic_examples=30)
    train(tiny_config(algorithm="splitlora", **common, **shape), tmp_path / "split", progress=False, loaded=tiny_gpt2)
    train(tiny_config(algorithm="cen", **common), tmp_path / "cen", progress=False, loaded=tiny_gpt2)
    a, b = _adapter(tmp_path / "split"), _adapter(tmp_path / "cen")
    assert _max_diff(a, b) <= 1e-5
    # It trained: B started at zero and moved.
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-4


def test_fedavg_is_sample_weighted(tiny_gpt2):
    # A Dirichlet split over 3 clients: unequal sample counts. Plain FedAvg: the bounded-influence caps
    # (a weight above 1.5x the lower median claim, an update above 1.5x the reference) are off here and
    # tested in tests/test_attacks_influence.py.
    cfg = tiny_config(clients=3, partition="dirichlet:1.0", aggregate_every=100, synthetic_examples=40,
                      aggregation={"max_weight_ratio": 0, "max_update_ratio": 0})
    _, data, grid, algo = build_simulation(cfg, tiny_gpt2)
    clients = list(grid.apps.values())
    algo.join(0)
    for t in range(2):
        algo.step(t)
    before = [lora_state(c.part) for c in clients]
    counts = [len(ix) for ix in data.client_indices]
    assert len(set(counts)) > 1
    assert max(_max_diff(before[0], s) for s in before[1:]) > 0  # clients diverged before averaging
    event = algo.aggregate(1)
    assert event["samples"] == counts
    expected = {k: sum(n * s[k] for n, s in zip(counts, before)) / sum(counts) for k in before[0]}
    for c in clients:
        assert _max_diff(lora_state(c.part), expected) <= 1e-6
    # Only the client side is averaged: the server keeps one adapter, which holds no client keys.
    assert not set(lora_state(algo.server.part)) & set(expected)


@pytest.mark.parametrize("algorithm,extra", [("splitlora", {}), ("sl", {}), ("fed", {}), ("cen", {}),
                                             ("splitlora", {"split_shape": "u-shape", "server_mode": "batched"}),
                                             ("splitlora", {"privacy": {"clip_norm": 1.0, "noise_multiplier": 0.5,
                                                                        "nopeek_weight": 0.1}})],
                         ids=["splitlora", "sl", "fed", "cen", "u-shape-batched", "noise-nopeek"])
def test_same_seed_same_adapter(tmp_path, tiny_gpt2, algorithm, extra):
    cfg = tiny_config(algorithm=algorithm, steps=3, client_lora={"rank": 4, "dropout": 0.1},
                      server_lora={"rank": 4, "dropout": 0.1}, **extra)
    train(cfg, tmp_path / "a", progress=False, loaded=tiny_gpt2)
    train(cfg, tmp_path / "b", progress=False, loaded=tiny_gpt2)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(cfg.with_overrides({"seed": 1}), tmp_path / "c", progress=False, loaded=tiny_gpt2)
    assert _max_diff(a, _adapter(tmp_path / "c")) > 0


@pytest.mark.parametrize("algorithm,server_mode", [("splitlora", "batched"), ("splitlora", "sequential"),
                                                   ("sl", "sequential"), ("fed", "sequential")])
def test_product_is_one_peft_adapter_of_the_whole_model(tmp_path, tiny_gpt2, algorithm, server_mode, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(algorithm=algorithm, server_mode=server_mode, steps=3)
    result = train(cfg, tmp_path, progress=False, loaded=tiny_gpt2)
    adapter = _adapter(tmp_path)
    # Keys of both sides in one whole-model key space, for every block.
    blocks = {int(k.split(".h.")[1].split(".")[0]) for k in adapter}
    assert blocks == set(range(tiny_gpt2.model.config.n_layer))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        base = AutoModelForCausalLM.from_pretrained(tiny_gpt2.base_path)
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert _max_diff({k.removeprefix("base_model.model."): v for k, v in loaded.items()},
                     {k.removeprefix("base_model.model."): v for k, v in adapter.items()}) == 0
    # The validation loss the run reported is the loss of this very PEFT model.
    from splitlora.eval.loss import mean_loss

    data = prepare_data(cfg, tiny_gpt2.tokenizer)
    assert mean_loss(peft_model, data.val, tiny_gpt2.model.config.pad_token_id) == pytest.approx(result.val_loss,
                                                                                                 abs=1e-5)


def _held_bytes(algo, grid, model) -> int:
    """Bytes of every distinct tensor storage the run holds: base, LoRA, optimizer state."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    parties = list(grid.apps.values()) + [getattr(algo, "server", None)]
    for party in filter(None, parties):
        tensors += list(party.part.parameters()) + list(party.part.buffers())
        for state in party.optimizer.opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def test_memory_of_simulated_clients_is_shared(tiny_gpt2):
    held = {}
    for n in (1, 8):
        cfg = tiny_config(clients=n, synthetic_examples=60)
        _, _, grid, algo = build_simulation(cfg, tiny_gpt2)
        algo.join(0)
        algo.step(0)  # optimizer state exists after the first step
        held[n] = _held_bytes(algo, grid, tiny_gpt2.model)
    print(f"held tensor bytes: 1 client {held[1]:,}, 8 clients {held[8]:,} ({held[8] / held[1]:.3f}x)")
    assert held[8] < 1.5 * held[1]


def test_metrics_log_counts_bytes_exactly(tmp_path, tiny_gpt2):
    import json

    cfg = tiny_config(steps=2, aggregate_every=2, wire_dtype="bf16")
    train(cfg, tmp_path, progress=False, loaded=tiny_gpt2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("loss", "lr", "tokens", "bytes_up", "bytes_down"):
        assert all(key in r for r in steps)
    agg = [r for r in rows if r.get("event") == "aggregate"]
    assert len(agg) == 1
    # Down: bf16 gradients of (B, T, H) per client; up adds uint8 mask and int32 labels.
    hidden = tiny_gpt2.model.config.n_embd
    up_step1, down_step1 = steps[0]["bytes_up"], steps[0]["bytes_down"]
    assert down_step1 % (2 * hidden) == 0
    bt = down_step1 // (2 * hidden)  # total B*T over clients
    assert up_step1 == bt * (2 * hidden + 1 + 4)
    # Aggregation: every client uploads its fp32 client-side LoRA and gets the average back.
    lora_bytes = sum(v.numel() * 4 for k, v in _adapter(tmp_path).items()
                     if int(k.split(".h.")[1].split(".")[0]) < cfg.cut_layer)
    assert agg[0]["bytes_up"] == agg[0]["bytes_down"] == cfg.clients * lora_bytes
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "config.yaml").is_file()


def test_sl_client_data_continues_across_turns(tiny_gpt2):
    # With 2 clients taking turns every step, client 0's second turn must see its *next* batch.
    cfg = tiny_config(algorithm="sl", clients=2, aggregate_every=1, batch_size=2, synthetic_examples=40)
    _, _, grid, algo = build_simulation(cfg, tiny_gpt2)
    seen = []

    def record(direction, client, msg, nbytes):  # what each client's forward sent up
        if direction == "up" and isinstance(msg, Activations):
            seen.append((client, msg.labels.clone()))

    grid.observers.append(record)
    algo.join(0)
    for t in range(3):
        algo.step(t)
    (turn_a, first), (_, _), (turn_b, third) = seen
    assert turn_a == turn_b == "0"
    assert first.shape != third.shape or not torch.equal(first, third)


def test_u_shape_batched_server_step_is_the_mean_loss_over_all_batches(tiny_gpt2):
    """A batched U-shaped server step weights each client's mean-loss gradient by its share of the
    step's loss tokens: the server's LoRA gradient is that of the mean loss over every batch of the
    step, as the unsplit model computes it on the batches together."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from splitlora.data.batching import collate
    from splitlora.messages import Activations, TailGrad
    from splitlora.models.lora import add_lora, load_lora_state, side_lora_config, whole_lora_config
    from splitlora.models.split import Split, architecture_of, client_forward, make_part, tail_forward
    from splitlora.runtime.server import SplitServer

    cfg = tiny_config(split_shape="u-shape", tail_layers=1, cut_layer=1, server_mode="batched", max_length=48)
    model, split = tiny_gpt2.model, Split(1, 1)
    data = prepare_data(cfg, tiny_gpt2.tokenizer)
    batches = [collate(data.train[i:i + n], model.config.pad_token_id) for i, n in ((0, 2), (2, 3), (5, 1))]
    torch.manual_seed(0)
    whole = add_lora(make_part(model, "whole", split), whole_lora_config(model, cfg))
    state = {k: torch.randn_like(v) * 0.1 for k, v in lora_state(whole).items()}
    load_lora_state(whole, state)
    client = add_lora(make_part(model, "client", split), side_lora_config(cfg.client_lora, architecture_of(model)))
    load_lora_state(client, state)
    server_part = add_lora(make_part(model, "server", split), side_lora_config(cfg.server_lora, architecture_of(model)))
    load_lora_state(server_part, state)
    server = SplitServer(server_part, cfg, total_steps=10)
    server.optimizer.step = lambda: None  # keep the gradients to compare them

    ups = [(f"c{i}", Activations(0, client_forward(client, b["input_ids"], b["attention_mask"], cut=1).detach(),
                                 b["attention_mask"])) for i, b in enumerate(batches)]
    tails, refused = server.forward(ups)
    assert not refused.clients
    grads = {}
    for (name, _), b in zip(ups, batches):
        h = tails[name].hidden.clone().requires_grad_(True)
        logits = tail_forward(client, h, b["attention_mask"], 3)
        loss = ForCausalLMLoss(logits, b["labels"], model.config.vocab_size)
        loss.backward()
        grads[name] = TailGrad(0, h.grad, float(loss), int((b["labels"][:, 1:] != -100).sum()))
    replies, refused = server.backward(grads)
    assert not refused.clients and set(replies) == set(grads)
    assert sum(r.scale for r in replies.values()) == pytest.approx(1.0)

    width = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    ids = torch.cat([pad(b["input_ids"], model.config.pad_token_id) for b in batches])
    mask = torch.cat([pad(b["attention_mask"], 0) for b in batches])
    labels = torch.cat([pad(b["labels"], -100) for b in batches])
    whole(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ref = dict(whole.named_parameters())
    for n, p in server_part.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref[n].grad, atol=1e-5, rtol=0), (n, (p.grad - ref[n].grad).abs().max())


def test_u_shape_sends_no_labels_and_the_server_computes_no_loss(tiny_gpt2):
    """Protocol level: in the U-shape nothing a client sends holds a label or a token id."""
    import dataclasses

    cfg = tiny_config(split_shape="u-shape", tail_layers=1, steps=2, aggregate_every=1)
    _, _, grid, algo = build_simulation(cfg, tiny_gpt2)
    sent = []
    grid.observers.append(lambda direction, client, msg, n: sent.append(msg) if direction == "up" else None)
    algo.join(0)
    for t in range(2):
        algo.step(t)
    kinds = {type(m).__name__ for m in sent}
    assert kinds == {"Activations", "TailGrad", "AdapterUpdate"}
    for msg in sent:
        for f in dataclasses.fields(msg):
            value = getattr(msg, f.name)
            tensors = value.values() if isinstance(value, dict) else [value]
            for t in tensors:
                if isinstance(t, torch.Tensor) and f.name != "attention_mask":
                    assert t.is_floating_point(), (type(msg).__name__, f.name)
        if isinstance(msg, Activations):
            assert msg.labels is None


def test_client_keeps_its_adapter_when_a_round_is_not_aggregated(tiny_gpt2):
    from splitlora.messages import Load

    _, _, grid, algo = build_simulation(tiny_config(), tiny_gpt2)
    algo.join(0)
    algo.step(0)
    app = next(iter(grid.apps.values()))
    before = app.lora_state()
    app.handle(Load(1, None))  # too few uploads that round: nothing to load
    assert _max_diff(app.lora_state(), before) == 0


@pytest.mark.parametrize("mode,most", [("sequential", 1), ("batched", 3)])
def test_sequential_server_keeps_one_client_graph_alive(tiny_gpt2, mode, most):
    """In process, `sequential` takes one client's batch at a time: when a client's activations go up,
    no other client holds an open graph (the paper's memory profile); `batched` holds all of them."""
    _, _, grid, algo = build_simulation(tiny_config(algorithm="splitlora", clients=3, steps=2, server_mode=mode),
                                        loaded=tiny_gpt2)
    open_graphs = []

    def count(direction, name, message, nbytes):
        if direction == "up" and isinstance(message, Activations):
            open_graphs.append(sum(app._open is not None for app in grid.apps.values()))

    grid.observers.append(count)
    for t in range(2):
        algo.step(t)
    assert len(open_graphs) == 2 * 3
    assert max(open_graphs) == most


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("algorithm", ["splitlora", "sl"])
def test_server_checkpoint_keeps_its_keys_and_loads_back(tiny_gpt2, algorithm):
    """The main server's part of a checkpoint (SplitServer.state_dict) keeps the top-level keys older
    checkpoints hold, and loading it into a fresh run restores the server exactly; a checkpoint from
    before the tail-gradient reference was kept still loads."""
    import copy

    cfg = tiny_config(algorithm=algorithm, privacy={"dp_clip_norm": 0.01, "dp_noise_multiplier": 1.0})
    _, _, _, algo = build_simulation(cfg, tiny_gpt2)
    algo.join(0)
    for t in range(cfg.aggregate_every):
        algo.step(t)
    algo.server.influence.history = [0.5, 2.0]
    state = algo.state_dict()
    keys = {"round", "global_state", "aggregator", "server_lora", "server_optimizer", "server_rng",
            "tail_grad_history", "server_dp"}
    assert set(state) == keys | ({"handover"} if algorithm == "sl" else set())
    assert set(state["server_optimizer"]) == {"opt", "sched", "steps"} and state["server_optimizer"]["steps"] > 0
    _, _, _, fresh = build_simulation(cfg, tiny_gpt2)
    assert not _same(fresh.state_dict(), state)
    fresh.load_state_dict(copy.deepcopy(state))
    assert _same(fresh.state_dict(), state)
    assert _same(lora_state(fresh.server.part), lora_state(algo.server.part))
    older = {k: v for k, v in copy.deepcopy(state).items() if k != "tail_grad_history"}
    fresh.load_state_dict(older)
    assert fresh.server.influence.history == [] and _same(fresh.server.optimizer.state_dict(), state["server_optimizer"])
