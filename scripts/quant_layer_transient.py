"""What one quantized linear layer allocates beyond its own bytes in a CPU forward and backward.

Explains the quantized rows of `splitlora bench memory` (docs/scaling.md): bitsandbytes' CPU path
dequantizes a layer's weight for each matmul, a transient that autograd's saved-tensor accounting
does not see. For each of bf16 (no quantizer), nf4 and int8, in a fresh process: one Llama-3-8B MLP
linear (14336 x 4096), one warm-up pass, then the peak resident set above the resident set before,
in forward and in backward (Linux: VmHWM reset through /proc/self/clear_refs).

    python scripts/quant_layer_transient.py [TOKENS]   # default 32
"""

import json
import subprocess
import sys

import torch

OUT_FEATURES, IN_FEATURES = 14336, 4096


def layer(kind: str) -> torch.nn.Module:
    w = torch.randn(OUT_FEATURES, IN_FEATURES, dtype=torch.bfloat16) * 0.02
    if kind == "bf16":
        m = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False, dtype=torch.bfloat16)
        m.weight.data = w
        return m
    import bitsandbytes as bnb

    if kind == "nf4":
        m = bnb.nn.Linear4bit(IN_FEATURES, OUT_FEATURES, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        m.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        m = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, bias=False, has_fp16_weights=False)
        m.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    return m.to("cpu")  # quantizes


def measure(kind: str, tokens: int) -> dict:
    from splitlora.device import peak_rss_mib, reset_peak_rss, rss_mib

    torch.manual_seed(0)
    m = layer(kind).requires_grad_(False)
    x = torch.randn(tokens, IN_FEATURES, dtype=torch.bfloat16, requires_grad=True)
    m(x).float().sum().backward()  # warm-up: lazy set-up is not counted
    x.grad = None
    before = rss_mib()
    reset_peak_rss()
    y = m(x)
    forward = peak_rss_mib() - before
    reset_peak_rss()
    y.float().sum().backward()
    backward = peak_rss_mib() - before
    own = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers())) / 2**20
    return {"kind": kind, "tokens": tokens, "layer_bytes_mib": round(own, 1),
            "bf16_weight_mib": OUT_FEATURES * IN_FEATURES * 2 / 2**20,
            "forward_peak_above_mib": round(forward, 1), "backward_peak_above_mib": round(backward, 1)}


if __name__ == "__main__":
    if len(sys.argv) > 2:
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
    else:
        tokens = sys.argv[1] if len(sys.argv) > 1 else "32"
        for kind in ("bf16", "nf4", "int8"):  # one fresh process each: peaks do not mix
            subprocess.run([sys.executable, __file__, kind, tokens], check=True)
