"""Real model sizes: lean loading of sharded checkpoints, merged export, quantized bases."""

import json
import pathlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from splitlora.models.loading import gpt2_tokenizer


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Llama saved in bf16 in many shards (one block or so per shard), with a tokenizer."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50257,
                                         max_position_embeddings=64, tie_word_embeddings=False,
                                         pad_token_id=50256)).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(out, max_shard_size="40KB")
    gpt2_tokenizer().save_pretrained(out)
    return out, model


def _recording_opens(monkeypatch):
    opened = []
    real = pathlib.Path.open

    def record(self, *args, **kwargs):
        if self.name.endswith(".safetensors"):
            opened.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", record)
    return opened


@pytest.mark.parametrize("side", ["client", "server"])
def test_lean_loading_of_a_sharded_checkpoint_opens_only_the_party_shards(sharded, monkeypatch, side):
    from splitlora.models.lean import file_keys, lean_part, lean_skeleton
    from splitlora.models.split import make_part

    path, model = sharded
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 4  # really sharded
    meta, _, index = lean_skeleton(str(path))
    need = {weight_map[k] for k in file_keys(make_part(meta, side, 1), meta, index)}
    opened = _recording_opens(monkeypatch)
    part = lean_part(meta, index, side, 1, torch.bfloat16)
    assert set(opened) == need and set(weight_map.values()) - need  # its shards, and not the others
    assert {p.name for p in index.opened} == need  # headers too: one read per shard it needs
    ref = dict(model.named_parameters())
    for name, p in part.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ref[name]), name


def test_export_merges_the_adapter_into_a_plain_model(tmp_path, tiny_gpt2):
    """The merged model's logits equal base + adapter (PEFT) within 1e-5 in fp32; it loads without PEFT."""
    from conftest import tiny_config
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splitlora.cli import main
    from splitlora.simulation.run import train

    train(tiny_config(algorithm="cen", steps=3, synthetic_examples=12, lr=5e-2), tmp_path / "run", progress=False,
          loaded=tiny_gpt2)
    assert main(["export", "--run", str(tmp_path / "run"), "--merge", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("Hello world")["input_ids"] == [15496, 995]
    from splitlora.models.loading import load_model

    with_adapter = PeftModel.from_pretrained(load_model("tiny-gpt2").model, str(tmp_path / "run" / "adapter")).eval()
    ids = torch.tensor([[15496, 995, 11, 314, 716, 257]])
    with torch.no_grad():
        want, got = with_adapter(ids).logits, merged.eval()(ids).logits
        base = tiny_gpt2.model.eval()(ids).logits
    assert float((want - base).abs().max()) > 1e-3  # the adapter changes the output
    assert float((got - want).abs().max()) <= 1e-5
    # A second export into a non-empty folder is refused with one line.
    assert main(["export", "--run", str(tmp_path / "run"), "--merge", str(tmp_path / "merged")]) == 2


def _quantized_run(tmp_path, device):
    """Clients in NF4, the server in LLM.int8, both computing in bf16 (tiny Llama): returns the result
    and the parts' layer types."""
    from conftest import tiny_config

    from splitlora.models.loading import load_model
    from splitlora.simulation.run import build_simulation, train

    pytest.importorskip("bitsandbytes")
    cfg = tiny_config(model="tiny-llama", algorithm="splitlora", quantize="nf4", server_quantize="int8", dtype="bf16",
                      steps=8, clients=1, synthetic_examples=24, lr=1e-2, device=device)
    loaded = load_model("tiny-llama")
    _, _, grid, algo = build_simulation(cfg, loaded)
    client = next(iter(grid.apps.values())).part
    kinds = {side: {type(m.base_layer).__name__ for n, m in part.named_modules() if n.endswith("q_proj")}
             for side, part in (("client", client), ("server", algo.server.part))}
    lora = {p.dtype for part in (client, algo.server.part) for n, p in part.named_parameters() if "lora_" in n}
    return train(cfg, tmp_path / "run", progress=False, loaded=loaded), kinds, lora


@pytest.mark.slow  # bitsandbytes is in the test-slow extra (125 MB)
def test_a_quantized_base_trains_on_the_cpu(tmp_path):
    """bitsandbytes' CPU backend: LoRA trains through an NF4 (client) and an int8 (server) frozen base."""
    result, kinds, lora = _quantized_run(tmp_path, "cpu")
    assert kinds == {"client": {"Linear4bit"}, "server": {"Linear8bitLt"}} and lora == {torch.float32}
    assert result.last_loss < result.first_loss


@pytest.mark.cuda
def test_a_quantized_base_trains_on_cuda(tmp_path):
    result, kinds, _ = _quantized_run(tmp_path, "cuda")
    assert kinds == {"client": {"Linear4bit"}, "server": {"Linear8bitLt"}}
    assert result.last_loss < result.first_loss


@pytest.mark.slow  # a child pytest, nine timed runs in bf16 (slow on a CPU without bf16 units)
def test_bench_gpu_dry_run(tmp_path, monkeypatch):
    """`splitlora bench gpu --dry-run`: the GPU check's own code, on the CPU on a tiny Llama-3-shaped model."""
    from splitlora.cli import main

    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])  # where tests/ is: it runs the cuda tests
    assert main(["bench", "gpu", "--dry-run", "--quiet", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "gpu.json").read_text())
    throughput, device_map, tests = (t["rows"] for t in out["tables"])
    runs = [r["run"] for r in throughput]
    assert runs[0] == "plain PEFT (unsplit)" and len(runs) == 9
    assert {f"splitlora {n}c {m} {s}" for n in (1, 4) for m in ("sequential", "batched")
            for s in ("two-part", "u-shape")} == set(runs[1:])
    assert all(r["tok_s"] > 0 and r["ratio"] > 0 for r in throughput)
    assert all(r["client_weights_gib"] > 0 for r in throughput[1:])
    assert device_map[0]["first_block_on"] == "cpu"
    assert tests[0]["failed"] == 0 and tests[0]["skipped"] >= 1  # no GPU here: the cuda tests skip
    assert "| plain PEFT (unsplit) |" in (tmp_path / "gpu.md").read_text()


def test_lean_parties_load_in_their_own_dtypes(sharded):
    """A deployed client in bf16 beside a server in fp32, from the same bf16 checkpoint; LoRA stays fp32."""
    from splitlora.config import RunConfig
    from splitlora.models.parts import LeanModel

    path, model = sharded
    cfg = RunConfig(model=str(path), cut_layer=1, dtype="bf16", server_dtype="fp32").validate()
    source = LeanModel(str(path), cfg)
    for side, dtype in (("client", torch.bfloat16), ("server", torch.float32)):
        part = source.lora_part(side)
        assert {p.dtype for n, p in part.named_parameters() if "lora_" not in n} == {dtype}, side
        assert {p.dtype for n, p in part.named_parameters() if "lora_" in n} == {torch.float32}, side
    ref = dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(dict(part.named_parameters())["model.layers.1.mlp.up_proj.weight"], ref.float())


def test_precision_flags_reach_the_config():
    from splitlora.cli import build_parser, main, resolve_config

    args = build_parser().parse_args(["train", "--dtype", "bf16", "--server-dtype", "fp16", "--gradient-checkpointing",
                                      "--quantize", "nf4"])
    cfg = resolve_config(args)
    assert (cfg.dtype, cfg.server_dtype, cfg.gradient_checkpointing, cfg.quantize) == ("bf16", "fp16", True, "nf4")
    assert resolve_config(build_parser().parse_args(["train"])).gradient_checkpointing is False
    assert main(["train", "--dtype", "fp8"]) == 2  # one line, exit 2


def test_random_llama3_shaped_checkpoint_is_written_shard_by_shard(tmp_path):
    from splitlora.bench.bigmodel import llama3_config, write_random_checkpoint
    from splitlora.models.lean import lean_load

    path = write_random_checkpoint(tmp_path / "m", llama3_config(tiny=True, blocks=3), shard_bytes=1 << 20)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and not list(path.glob(".shard-*"))
    part, _ = lean_load(str(path), "client", 1, torch.bfloat16)
    assert part.get_submodule("model.embed_tokens").weight.shape == (50257, 64)
    assert part.get_submodule("model.layers.0.mlp.down_proj").weight.dtype == torch.bfloat16


def test_deployed_parties_in_their_dtypes_match_the_simulation(tmp_path, tiny_gpt2):
    """Over gRPC (loopback, threads): bf16 clients with checkpointing and an fp32 server give the
    simulation's adapter; each party read its lean part in its own dtype."""
    from test_deploy import adapter, deploy_config, max_abs_diff, write_client_csvs

    from splitlora.transport.loopback import run_loopback
    from splitlora.simulation.run import train

    cfg = deploy_config(steps=3, clients=2, dtype="bf16", server_dtype="fp32", gradient_checkpointing=True)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    sim = train(cfg, tmp_path / "train", progress=False)
    out = run_loopback(cfg, csvs, tmp_path / "loop", mode="threads", timeout=240)
    assert max_abs_diff(adapter(sim.adapter_dir), adapter(out["adapter_dir"])) <= 1e-6


@pytest.mark.slow  # bitsandbytes is in the test-slow extra
def test_a_lean_quantized_part_is_read_block_by_block_and_equals_the_simulation(sharded, monkeypatch):
    """Lean + nf4: each block is quantized as soon as it is read (never the whole part unquantized),
    and the result computes what the simulation's quantized part computes."""
    pytest.importorskip("bitsandbytes")
    from splitlora.config import RunConfig
    from splitlora.models import quantize
    from splitlora.models.loading import LoadedModel
    from splitlora.models.parts import LeanModel, SharedModel
    from splitlora.models.split import client_forward

    path, model = sharded
    cfg = RunConfig(model=str(path), cut_layer=2, dtype="bf16", quantize="nf4").validate()
    unquantized_at_once = []
    real = quantize.quantize_block

    def spy(block, *args):
        unquantized_at_once.append(sum(type(m) is torch.nn.Linear and not m.weight.is_meta
                                       for m in block.modules()))
        real(block, *args)

    monkeypatch.setattr(quantize, "quantize_block", spy)
    lean = LeanModel(str(path), cfg).lora_part("client")
    assert unquantized_at_once[:2] == [7, 7]  # one block's 7 linears at a time
    shared = SharedModel(LoadedModel(model, gpt2_tokenizer(), str(path)), cfg).lora_part("client")
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    # (training mode: under no_grad bitsandbytes' CPU path repacks weights, which needs larger layers)
    assert torch.equal(client_forward(lean.train(), ids, mask), client_forward(shared.train(), ids, mask))
