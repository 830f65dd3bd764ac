"""Invariant: split forward equals unsplit forward (fp32, padded batches, every supported family),
and LoRA gradients through the cut equal those of the unsplit model."""

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from splitlora.config import LoraSide, RunConfig
from splitlora.models.lora import add_lora, load_lora_state, lora_state, side_lora_config, whole_lora_config
from splitlora.models.split import ARCHITECTURES, architecture_of, client_forward, make_part, server_forward

VOCAB = 97
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)


def _models():
    yield "gpt2", GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                             resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=1,
                                             eos_token_id=1, pad_token_id=0))
    yield "llama", LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=True))
    yield "llama-untied", LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=False))
    yield "mistral", MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=4))
    yield "qwen2", Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE))
    yield "qwen3", Qwen3ForCausalLM(Qwen3Config(**LLAMA_LIKE, head_dim=8))


MODELS = list(_models())


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 5, 12, 3]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return ids, mask, labels


def _cfg(model, cut):
    targets = list(architecture_of(model).lora_targets)
    side = LoraSide(rank=4, alpha=8, dropout=0.0, target_modules=targets)
    return RunConfig(model="x", cut_layer=cut, client_lora=side, server_lora=side)


def assert_grads_match(whole, parts, atol=1e-5):
    """Every trainable parameter of the parts got the unsplit model's gradient (and it is not zero)."""
    ref = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    got = {n: p.grad for part in parts for n, p in part.named_parameters() if p.requires_grad}
    assert set(got) == set(ref)
    for n in ref:
        assert ref[n] is not None and ref[n].abs().sum() > 0
        assert torch.allclose(got[n], ref[n], atol=atol, rtol=0), (n, (got[n] - ref[n]).abs().max())


@pytest.mark.parametrize("name,model", MODELS, ids=[n for n, _ in MODELS])
@pytest.mark.parametrize("cut", [1, 2, 3])
def test_split_forward_equals_unsplit(name, model, cut):
    model.eval()
    ids, mask, _ = _padded_batch()
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        client = make_part(model, "client", cut).eval()
        server = make_part(model, "server", cut).eval()
        split = server_forward(server, client_forward(client, ids, mask), mask)
    real = mask.bool()
    assert split.shape == whole.shape
    assert torch.allclose(split[real], whole[real], atol=1e-5, rtol=0), (split[real] - whole[real]).abs().max()


@pytest.mark.parametrize("name,model", MODELS, ids=[n for n, _ in MODELS])
def test_lora_gradients_match_unsplit(name, model):
    torch.manual_seed(0)
    cut = 2
    cfg = _cfg(model, cut)
    whole = add_lora(make_part(model, "whole", cut), whole_lora_config(model, cfg))
    # Random B as well as A, so every LoRA tensor gets a non-zero gradient.
    state = {k: torch.randn_like(v) * 0.1 for k, v in lora_state(whole).items()}
    load_lora_state(whole, state)
    lora = side_lora_config(cfg.client_lora, architecture_of(model))
    client = add_lora(make_part(model, "client", cut), lora)
    server = add_lora(make_part(model, "server", cut), lora)
    load_lora_state(client, state)
    load_lora_state(server, state)

    ids, mask, labels = _padded_batch(1)
    whole.train()
    whole(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    h = client_forward(client, ids, mask)
    sent = h.detach().requires_grad_(True)
    logits = server_forward(server, sent, mask)
    from transformers.loss.loss_utils import ForCausalLMLoss

    ForCausalLMLoss(logits, labels, model.config.vocab_size).backward()
    h.backward(sent.grad)

    assert_grads_match(whole, (client, server))


@pytest.mark.parametrize("name,model", MODELS, ids=[n for n, _ in MODELS])
def test_parts_hold_only_their_side(name, model):
    cut = 2
    arch = architecture_of(model)
    whole_blocks = model.get_submodule(arch.layers)
    client = make_part(model, "client", cut)
    server = make_part(model, "server", cut)
    client_params = {id(p) for p in client.parameters()}
    server_params = {id(p) for p in server.parameters()}
    for i, block in enumerate(whole_blocks):
        ids = {id(p) for p in block.parameters()}
        assert ids <= (client_params if i < cut else server_params)
        assert not ids & (server_params if i < cut else client_params)
    norm = {id(p) for p in model.get_submodule(arch.norm).parameters()}
    assert not norm & client_params
    embed = model.get_submodule(arch.embed).weight
    assert id(embed) in client_params
    # A tied head shares the (frozen) embedding matrix; an untied model's server holds no embedding.
    tied = model.get_output_embeddings().weight is embed
    assert (id(embed) in server_params) == tied
    # Parts share the base tensors instead of copying them.
    assert all(any(p is q for q in model.parameters()) for p in client.parameters())


def test_every_architecture_row_is_tested():
    tested = {m.config.model_type for _, m in MODELS}
    assert set(ARCHITECTURES) <= tested


def _u_shape_logits(client, server, ids, mask, split):
    from splitlora.models.split import tail_forward

    h = client_forward(client, ids, mask, cut=split.cut)
    mid = server_forward(server, h, mask)
    n = len(client.get_submodule(architecture_of(client).layers)) + len(server.get_submodule(architecture_of(server).layers))
    return tail_forward(client, mid, mask, n - split.tail)


@pytest.mark.parametrize("name,model", MODELS, ids=[n for n, _ in MODELS])
@pytest.mark.parametrize("cut,tail", [(1, 0), (1, 2), (2, 1)])
def test_u_shaped_split_forward_equals_unsplit(name, model, cut, tail):
    """U-shape: the client runs blocks 0..K-1 and L-T..L-1 with the head, the server the middle."""
    from splitlora.models.split import Split

    model.eval()
    split = Split(cut, tail)
    ids, mask, _ = _padded_batch()
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        client = make_part(model, "client", split).eval()
        server = make_part(model, "server", split).eval()
        got = _u_shape_logits(client, server, ids, mask, split)
    real = mask.bool()
    assert torch.allclose(got[real], whole[real], atol=1e-5, rtol=0), (got[real] - whole[real]).abs().max()


@pytest.mark.parametrize("name,model", MODELS, ids=[n for n, _ in MODELS])
def test_u_shaped_lora_gradients_match_unsplit(name, model):
    """Gradients through both cuts of the U (h_K up, h_(L-T) down, their gradients back) equal the
    unsplit model's, for the client's bottom and tail LoRA and the server's."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from splitlora.models.split import Split, tail_forward

    torch.manual_seed(0)
    split = Split(1, 2)
    cfg = RunConfig(model="x", cut_layer=1, split_shape="u-shape", tail_layers=2,
                    client_lora=_cfg(model, 1).client_lora, server_lora=_cfg(model, 1).server_lora)
    whole = add_lora(make_part(model, "whole", split), whole_lora_config(model, cfg))
    state = {k: torch.randn_like(v) * 0.1 for k, v in lora_state(whole).items()}
    load_lora_state(whole, state)
    lora = side_lora_config(cfg.client_lora, architecture_of(model))
    client = add_lora(make_part(model, "client", split), lora)
    server = add_lora(make_part(model, "server", split), lora)
    load_lora_state(client, state)
    load_lora_state(server, state)
    assert sorted(int(i) for i in client.get_submodule(architecture_of(model).layers).keys()) == [0, 2, 3]
    assert sorted(int(i) for i in server.get_submodule(architecture_of(model).layers).keys()) == [1]

    ids, mask, labels = _padded_batch(1)
    whole.train()
    whole(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    h = client_forward(client, ids, mask, cut=1)  # client: bottom
    up = h.detach().requires_grad_(True)
    mid = server_forward(server, up, mask)  # server: middle
    down = mid.detach().requires_grad_(True)
    logits = tail_forward(client, down, mask, 2)  # client: tail, head, loss
    ForCausalLMLoss(logits, labels, model.config.vocab_size).backward()
    mid.backward(down.grad)  # dL/dh_(L-T) up, server backward
    h.backward(up.grad)  # dL/dh_K down, client backward

    assert_grads_match(whole, (client, server))


@pytest.mark.parametrize("name,model", MODELS, ids=[n for n, _ in MODELS])
def test_u_shaped_server_holds_no_head_no_embedding(name, model):
    """The U-shaped server part holds only its middle blocks: no embedding (tied or not), no norm, no head."""
    from splitlora.models.split import Split

    split = Split(1, 1)
    arch = architecture_of(model)
    server = make_part(model, "server", split)
    client = make_part(model, "client", split)
    server_params = {id(p) for p in server.parameters()}
    for path in (arch.embed, arch.norm, arch.head):
        assert not {id(p) for p in model.get_submodule(path).parameters()} & server_params, path
        assert {id(p) for p in model.get_submodule(path).parameters()} <= {id(p) for p in client.parameters()}, path
