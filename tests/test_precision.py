"""Lower precision and activation checkpointing keep the split == unsplit invariants.

Stated tolerances: a bf16 split equals the bf16 unsplit model exactly (the same kernels run in the
same order; the fp32 wire carries bf16 values losslessly), and a bf16 model's LoRA gradients are
within 5% (relative to each tensor's largest gradient) of the fp32 model's. Checkpointing recomputes
the same ops: gradients equal those without it exactly.
"""

import copy

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_split import MODELS, _cfg, _padded_batch
from transformers.loss.loss_utils import ForCausalLMLoss

from splitlora.models.lora import add_lora, load_lora_state, lora_state, side_lora_config, whole_lora_config
from splitlora.models.precision import cast_base, enable_checkpointing
from splitlora.models.split import Split, architecture_of, client_forward, make_part, server_forward, tail_forward
from splitlora.simulation.run import build_simulation, train

SMALL = [m for m in MODELS if m[0] in ("gpt2", "llama")]
SHAPES = {"two-part": Split(2), "u-shape": Split(1, 2)}


def _grads(model, split: Split, dtype, checkpointing=False, seed=0):
    """LoRA gradients of the unsplit model and of its split parts (both in ``dtype``), one batch."""
    model = cast_base(copy.deepcopy(model), dtype)
    cfg = _cfg(model, split.cut)
    cfg.split_shape, cfg.tail_layers = ("u-shape", split.tail) if split.u_shape else ("two-part", 1)
    torch.manual_seed(seed)
    whole = add_lora(make_part(model, "whole", split), whole_lora_config(model, cfg))
    state = {k: torch.randn_like(v) * 0.1 for k, v in lora_state(whole).items()}
    load_lora_state(whole, state)
    lora = side_lora_config(cfg.client_lora, architecture_of(model))
    client, server = (add_lora(make_part(model, side, split), lora) for side in ("client", "server"))
    for part in (client, server):
        load_lora_state(part, state)
        if checkpointing:
            enable_checkpointing(part)
        part.train()
    if checkpointing:
        enable_checkpointing(whole)
    whole.train()
    ids, mask, labels = _padded_batch(1)
    whole(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    h = client_forward(client, ids, mask, cut=split.cut)
    up = h.detach().requires_grad_(True)
    mid = server_forward(server, up.float().to(dtype), mask)  # the fp32 wire in between
    if split.u_shape:
        down = mid.detach().float().to(dtype).requires_grad_(True)
        n = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
        ForCausalLMLoss(tail_forward(client, down, mask, n - split.tail), labels, model.config.vocab_size).backward()
        mid.backward(down.grad)
    else:
        ForCausalLMLoss(mid, labels, model.config.vocab_size).backward()
    h.backward(up.grad)
    ref = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    got = {n: p.grad for part in (client, server) for n, p in part.named_parameters() if p.requires_grad}
    return ref, got, (client, server, whole)


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("name,model", SMALL, ids=[n for n, _ in SMALL])
def test_bf16_split_gradients_equal_bf16_unsplit_and_stay_near_fp32(name, model, shape):
    ref, got, (client, server, _) = _grads(model, SHAPES[shape], torch.bfloat16)
    assert set(got) == set(ref)
    for n in ref:
        assert ref[n].abs().sum() > 0
        assert torch.equal(got[n], ref[n]), (n, (got[n] - ref[n]).abs().max())
    # The base computes in bf16, the adapter (and so its gradient and AdamW's state) stays fp32.
    for part in (client, server):
        dtypes = {("lora" if "lora_" in n else "base", p.dtype) for n, p in part.named_parameters()}
        assert dtypes == {("lora", torch.float32), ("base", torch.bfloat16)}
    fp32, _, _ = _grads(model, SHAPES[shape], torch.float32)
    for n in ref:
        rel = float((ref[n] - fp32[n]).abs().max() / fp32[n].abs().max())
        assert rel < 0.05, (n, rel)


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("name,model", SMALL, ids=[n for n, _ in SMALL])
def test_checkpointed_split_gradients_equal_unsplit(name, model, shape):
    plain, _, _ = _grads(model, SHAPES[shape], torch.float32)
    ref, got, (client, _, _) = _grads(model, SHAPES[shape], torch.float32, checkpointing=True)
    for n in plain:
        assert torch.equal(got[n], ref[n]) and torch.equal(got[n], plain[n]), n
    # And it does recompute: inside a checkpointed block, forward runs again in backward.
    arch = architecture_of(client)
    block = next(iter(client.get_submodule(arch.layers).values()))
    inner = next(m for n, m in block.named_modules() if n.endswith(("mlp", "attn")))
    calls = []
    inner.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, _ = _padded_batch(1)
    client_forward(client, ids, mask, cut=SHAPES[shape].cut).sum().backward()
    assert len(calls) == 2


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("shape", [{}, {"split_shape": "u-shape", "tail_layers": 1}], ids=["two-part", "u-shape"])
def test_bf16_splitlora_one_client_equals_cen(tmp_path, tiny_gpt2, shape):
    """The engine invariant in bf16 (with checkpointing on the split run): same adapter as cen in
    bf16 (1e-5: both run the same bf16 kernels), and within 2e-2 of the fp32 run. Four steps: a bf16 step
    costs seconds on a CPU without bf16 units (the 50257-row head)."""
    common = dict(steps=4, clients=1, aggregate_every=1, batch_size=2, synthetic_examples=20, dtype="bf16")
    train(tiny_config(algorithm="splitlora", gradient_checkpointing=True, **common, **shape), tmp_path / "split",
          progress=False, loaded=tiny_gpt2)
    train(tiny_config(algorithm="cen", **common), tmp_path / "cen", progress=False, loaded=tiny_gpt2)
    train(tiny_config(algorithm="cen", **{**common, "dtype": "fp32"}), tmp_path / "fp32", progress=False,
          loaded=tiny_gpt2)
    a, b, c = (_adapter(tmp_path / d) for d in ("split", "cen", "fp32"))
    assert all(v.dtype == torch.float32 for v in a.values())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float((a[k] - c[k]).abs().max()) for k in a) <= 2e-2
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-4
    # The caller's fp32 model was not cast.
    assert next(tiny_gpt2.model.parameters()).dtype == torch.float32


def test_parties_may_differ_and_fp16_scales_its_loss(tmp_path, tiny_gpt2):
    """Clients in fp16 (with a loss scaler), the server in bf16: each part in its dtype, and it trains."""
    cfg = tiny_config(algorithm="splitlora", dtype="fp16", server_dtype="bf16", steps=6, clients=2,
                      synthetic_examples=24)
    source, _, grid, algo = build_simulation(cfg, tiny_gpt2)
    client = next(iter(grid.apps.values()))
    assert {p.dtype for n, p in client.part.named_parameters() if "lora_" not in n} == {torch.float16}
    assert client.optimizer.scaler.is_enabled() and client.optimizer.loss_scale > 1
    assert algo.server.dtype == torch.bfloat16 and not algo.server.optimizer.scaler.is_enabled()
    result = train(cfg, tmp_path / "run", progress=False, loaded=tiny_gpt2)
    assert result.last_loss < result.first_loss


@pytest.mark.cuda
def test_bf16_split_equals_cen_on_cuda(tmp_path, tiny_gpt2):
    """On a GPU (`splitlora bench gpu` runs it): the bf16 invariant with CUDA kernels."""
    common = dict(steps=6, clients=1, aggregate_every=1, batch_size=2, synthetic_examples=20, dtype="bf16",
                  device="cuda")
    train(tiny_config(algorithm="splitlora", gradient_checkpointing=True, **common), tmp_path / "split",
          progress=False, loaded=tiny_gpt2)
    train(tiny_config(algorithm="cen", **common), tmp_path / "cen", progress=False, loaded=tiny_gpt2)
    a, b = _adapter(tmp_path / "split"), _adapter(tmp_path / "cen")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-3  # CUDA kernels may differ in reduction order
