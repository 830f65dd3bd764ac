"""Lower precision and activation checkpointing keep the split == unsplit invariants.

Stated tolerances: a bf16 split equals the bf16 unsplit model exactly (the same kernels run in the
same order; the fp32 wire carries bf16 values losslessly), and a bf16 model's LoRA gradients are
within 5% (relative to each tensor's largest gradient) of the fp32 model's. Checkpointing recomputes
the same ops: gradients equal those without it exactly.
"""

import copy
import json

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


@pytest.mark.parametrize("algorithm", ["splitlora", "sl"])
def test_fp16_resumed_run_keeps_its_loss_scales(tmp_path, tiny_gpt2, algorithm):
    """fp16: a server that crashes after a checkpoint and resumes from it (what ``serve --resume`` does,
    here in process: a new server and grid, the same clients, which rewind to their snapshot) trains the
    adapter an uninterrupted run trains, and every party ends with the same loss scaler state."""
    from splitlora.algorithms import ALGORITHMS
    from splitlora.runtime.checkpoint import load_checkpoint, save_checkpoint
    from splitlora.runtime.loop import Stopped, Totals, run_loop
    from splitlora.runtime.metrics import MetricsLog
    from splitlora.simulation.inprocess import InProcessGrid

    cfg = tiny_config(algorithm=algorithm, dtype="fp16", steps=8, clients=2, synthetic_examples=24)
    checkpoint_at, crash_at = 4, 6

    def scalers(algo, grid):
        return [algo.server.optimizer.scaler.state_dict(), *(a.optimizer.scaler.state_dict() for a in grid.apps.values())]

    logs = []

    def log(name):
        (tmp_path / name).mkdir()
        logs.append(MetricsLog(tmp_path / name))
        return logs[-1]

    def build():
        source, _, grid, algo = build_simulation(cfg, tiny_gpt2)
        for opt in [algo.server.optimizer, *(a.optimizer for a in grid.apps.values())]:
            # A low scale that doubles every 3 steps: it moves within the run, far from fp16's overflow.
            opt.scaler.load_state_dict({**opt.scaler.state_dict(), "scale": 2.0 ** 8, "growth_interval": 3})
        return source, grid, algo

    _, grid, algo = build()
    run_loop(cfg, algo, log("whole"), progress=False)
    want_adapter, want_scalers = algo.adapter_state(), scalers(algo, grid)
    assert all(s["scale"] > 2.0 ** 8 for s in want_scalers)  # every party's scale grew

    class Checkpointer:  # serve's Checkpointer, less the config and metrics it also keeps
        def due(self, step):
            return step == checkpoint_at

        def save(self, algo, totals):
            save_checkpoint(tmp_path / "checkpoint", {"step": totals.step, "algorithm": algo.state_dict()})
            algo.keep_from = totals.step

    source, grid, algo = build()
    totals = Totals()
    with pytest.raises(Stopped):  # the crash: the server's state after step 4 is lost, the clients live on
        run_loop(cfg, algo, log("crashed"), totals=totals, progress=False,
                 checkpointer=Checkpointer(), stop=lambda: "crash" if totals.step >= crash_at else None)
    assert totals.step == crash_at
    state = load_checkpoint(tmp_path / "checkpoint")
    assert state["step"] == checkpoint_at and "scaler" in state["algorithm"]["server_optimizer"]
    grid = InProcessGrid(list(grid.apps.values()), cfg.wire_dtype)
    algo = ALGORITHMS[cfg.algorithm](cfg, source, grid, algo.device)
    algo.load_state_dict(state["algorithm"])
    algo.keep_from = checkpoint_at
    run_loop(cfg, algo, log("resumed"), totals=Totals(step=checkpoint_at), progress=False)
    got = algo.adapter_state()
    assert got.keys() == want_adapter.keys()
    assert all(torch.equal(got[k], want_adapter[k]) for k in got)
    assert scalers(algo, grid) == want_scalers
    for m in logs:
        m.close()


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


def _served_equals_train(tmp_path, tiny_gpt2, device: str) -> float:
    """`splitlora serve` + 2 `splitlora client` processes on ``device`` in bf16 (checkpointed) against
    `splitlora train` of the same run: max |adapter difference|."""
    from deploy_helpers import write_client_csvs

    from splitlora.transport.loopback import run_loopback

    cfg = tiny_config(algorithm="splitlora", clients=2, steps=4, aggregate_every=2, batch_size=2,
                      synthetic_examples=24, dtype="bf16", gradient_checkpointing=True, device=device, threads=1)
    trained = train(cfg, tmp_path / "train", progress=False, loaded=tiny_gpt2)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    served = run_loopback(cfg, csvs, tmp_path / "loop", mode="processes", timeout=300)
    a = _adapter(trained.out_dir)
    b = load_file(f"{served['adapter_dir']}/adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nmax |adapter(serve + 2 clients on {device}) - adapter(train on {device})| = {diff:.3g}")
    return diff


@pytest.mark.cuda
def test_served_over_grpc_equals_train_on_cuda(tmp_path, tiny_gpt2):
    """On a GPU: the deployed commands with `--device cuda` (server and clients) train what `train` does."""
    assert _served_equals_train(tmp_path, tiny_gpt2, "cuda") <= 1e-3  # as above: CUDA reductions may differ


@pytest.mark.parametrize("shape", [{}, {"split_shape": "u-shape", "tail_layers": 1}], ids=["two-part", "u-shape"])
def test_fp16_overflow_at_the_server_lowers_its_scale_and_loses_no_step(tmp_path, tiny_gpt2, shape):
    """A server scale far beyond fp16's range overflows its backward: the scale is halved and the batch
    redone until it fits, so every party takes every step a run that started at a fitting scale takes
    (no client refused, no step lost), and the adapter stays finite."""
    from splitlora.runtime.loop import run_loop
    from splitlora.runtime.metrics import MetricsLog

    cfg = tiny_config(algorithm="splitlora", dtype="fp16", steps=2, clients=2, synthetic_examples=24, **shape)

    def run(name, scale=None):
        _, _, grid, algo = build_simulation(cfg, tiny_gpt2)
        if scale is not None:
            scaler = algo.server.optimizer.scaler
            scaler.load_state_dict({**scaler.state_dict(), "scale": scale})
        (tmp_path / name).mkdir()
        log = MetricsLog(tmp_path / name)
        totals = run_loop(cfg, algo, log, progress=False)
        log.close()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        steps = [algo.server.optimizer.steps, *(app.optimizer.steps for app in grid.apps.values())]
        return algo, totals, rows, steps

    _, _, _, want_steps = run("fitting")
    algo, totals, rows, steps = run("overflowing", scale=2.0 ** 24)  # fp16 tops out near 2^16
    assert 1.0 < algo.server.optimizer.loss_scale <= 2.0 ** 20
    assert totals.step == cfg.steps and steps == want_steps
    assert not [r for r in rows if r.get("refused")], "an overflow of the server's scale refused a client"
    assert all(torch.isfinite(t).all() for t in algo.adapter_state().values())
