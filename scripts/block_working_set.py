"""The working set of one Llama-3-8B block's forward and backward on the CPU, beyond what autograd saves.

Explains what the 8B-shaped client's peak RSS holds above its budget at 8 x 512 tokens in
`splitlora bench memory` (docs/scaling.md): the budget counts the tensors saved for backward; the
temporaries an op allocates and frees (a [tokens, 14336] MLP gradient, attention's probabilities and
their gradient) are not saved, yet they are resident at the peak. One block (random fp32 weights,
frozen, as the client's are) on a [batch, seq, 4096] input that needs its gradient; the peak resident
set (VmHWM, reset through /proc/self/clear_refs) above the resident set before each phase.

    python scripts/block_working_set.py [BATCH] [SEQ]   # default 8 512
"""

import json
import sys

import torch

from splitlora.bench.bigmodel import llama3_config
from splitlora.device import peak_rss_mib, reset_peak_rss, rss_mib


def main(batch: int, seq: int) -> dict:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = llama3_config(blocks=1)
    cfg._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(cfg, 0).requires_grad_(False)
    rotary = LlamaRotaryEmbedding(cfg)
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    pos = rotary(x, torch.arange(seq).unsqueeze(0))
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved = {}  # storage -> bytes: activations only (the frozen weights are saved too, but held anyway)

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    before = rss_mib()
    reset_peak_rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, attention_mask=mask, position_embeddings=pos)
    out = out[0] if isinstance(out, tuple) else out
    forward_peak, after_forward = peak_rss_mib() - before, rss_mib() - before
    reset_peak_rss()
    out.backward(torch.randn_like(out))
    backward_peak = peak_rss_mib() - before
    mib = 2**20
    return {"batch": batch, "seq": seq, "saved_for_backward_mib": round(sum(saved.values()) / mib),
            "resident_after_forward_mib": round(after_forward), "forward_peak_mib": round(forward_peak),
            "backward_peak_mib": round(backward_peak),
            "backward_working_set_beyond_saved_mib": round(backward_peak - after_forward),
            "one_mlp_gradient_mib": round(batch * seq * cfg.intermediate_size * 4 / mib),
            "one_attention_probs_mib": round(batch * cfg.num_attention_heads * seq * seq * 4 / mib)}


if __name__ == "__main__":
    torch.set_num_threads(2)
    args = [int(a) for a in sys.argv[1:3]] or [8, 512]
    print(json.dumps(main(*args)))
