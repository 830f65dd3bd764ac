"""Record-level DP-SGD of the released adapter (Abadi et al. 2016), one instance per party.

Each party that trains LoRA tensors holds a :class:`DpSgd` on its part. After the backward of a
batch's *summed* per-example losses, it takes every example's gradient of the party's LoRA tensors
(Opacus' per-sample hooks: PEFT's ``lora_A``/``lora_B`` are ``nn.Linear``), clips each example's
gradient to L2 norm ``bound``, sums them, adds ``N(0, (sigma C)^2)`` per coordinate from the party's
own generator, and divides by the batch size. The optimiser then steps on that (post-processing).

Where the adapter is split (``splitlora``, ``sl``, two-part), one example's gradient has a client
part and a server part, computed by different parties from one forward pass: each side clips its
part to ``C / sqrt(2)``, so the joint per-example gradient has norm at most ``C``, and each side adds
``N(0, (sigma C)^2)`` to its coordinates: the joint release is the Gaussian mechanism with
multiplier ``sigma`` on a per-example sensitivity ``C``, as in the unsplit model (``fed``, ``cen``,
where the one party clips to ``C``). The accountant is in :mod:`splitlora.privacy.accounting`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import IGNORE

# Opacus' hooks fire on the LoRA linears whose inputs (frozen activations) need no gradient: expected here.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(losses, tokens)``: each row's mean next-token loss over its loss tokens (0 for a row with
    none), and the batch's loss-token count. DP-SGD's objective is ``losses.sum()``."""
    shifted = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE,
                                reduction="none").view(shifted.shape)
    counts = (shifted != IGNORE).sum(1)
    return per_token.sum(1) / counts.clamp_min(1), int(counts.sum())


class DpSgd:
    """Per-example clipping and Gaussian noise on the gradients of ``module``'s trainable tensors.

    ``bound``: the L2 norm each example's gradient (of this party's tensors) is clipped to;
    ``noise_std``: the standard deviation of the noise per coordinate (``sigma * C``).
    """

    def __init__(self, module: nn.Module, bound: float, noise_std: float, seed: int,
                 device: torch.device | str = "cpu"):
        try:
            from opacus import GradSampleModule
        except ImportError:
            from ..errors import UserError

            raise UserError("DP-SGD (privacy.dp_clip_norm) needs opacus: pip install 'splitlora[dp]'") from None

        self.bound, self.noise_std = float(bound), float(noise_std)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        # The hooks live on the LoRA submodules: calling ``module`` itself records per-example grads.
        self._hooks = GradSampleModule(module, batch_first=True, loss_reduction="sum", strict=False)
        self.generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
        self.steps = 0  # noised steps taken
        self.last_norms: tuple[torch.Tensor, torch.Tensor] | None = None  # (before, after) clipping

    def per_example(self) -> list[torch.Tensor]:
        """The per-example gradients recorded since the last :meth:`reset` (one ``(B, *shape)`` per tensor)."""
        return [p.grad_sample for p in self.params]

    def reset(self, activations: bool = False) -> None:
        """Forget the recorded per-example gradients (and, with ``activations``, the inputs recorded by
        forwards never followed by a backward: a step abandoned)."""
        for p in self.params:
            p.grad_sample = None
        if activations:
            for m in self._hooks._module.modules():
                if hasattr(m, "activations"):
                    m.activations = []

    def privatise(self, batch_size: int | None = None) -> None:
        """Replace every ``p.grad`` by the DP-SGD estimate of this batch; ``batch_size`` divides the
        noised sum (default: the number of examples recorded)."""
        samples = self.per_example()
        if any(g is None for g in samples):  # a tensor the batch did not reach (or an empty batch): zeros
            b = next((g.shape[0] for g in samples if g is not None), 0)
            samples = [torch.zeros((b, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                       for g, p in zip(samples, self.params)]
        flat = torch.cat([g.flatten(1).float() for g in samples], dim=1)
        norms = flat.norm(dim=1)
        factor = (self.bound / norms.clamp_min(1e-12)).clamp(max=1.0)
        self.last_norms = (norms.detach(), (norms * factor).detach())
        divide = float(batch_size or max(flat.shape[0], 1))
        for p, g in zip(self.params, samples):
            total = torch.einsum("b,b...->...", factor.to(g.dtype), g)
            noise = torch.randn(p.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)
            p.grad = ((total.float() + noise.to(total.device) * self.noise_std) / divide).to(p.dtype)
        self.steps += 1
        self.reset()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])


def party_bound(clip_norm: float, split: bool) -> float:
    """The clip norm of one party's share of an example's gradient (see the module doc)."""
    return clip_norm / math.sqrt(2) if split else clip_norm


class PoissonStream:
    """Poisson sampling of a site's records (what the amplification-by-subsampling analysis needs):
    each batch holds every record independently with probability ``rate``, drawn from the party's own
    generator; a batch may be empty (``None``: the party still takes a noise-only step)."""

    def __init__(self, items, rate: float, pad_id: int, seed: int):
        import numpy as np

        from ..data.batching import collate

        self.items, self.rate, self.pad_id, self._collate = list(items), float(rate), pad_id, collate
        self.rng = np.random.default_rng(seed)

    def __next__(self):
        picked = (self.rng.random(len(self.items)) < self.rate).nonzero()[0]
        return self._collate([self.items[i] for i in picked], self.pad_id) if len(picked) else None

    def __iter__(self):
        return self
