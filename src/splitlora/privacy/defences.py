"""Defences on what leaves a client: per-token clipping and Gaussian noise, and NoPeek.

* :class:`Protector` clips every token's vector of an outgoing activation or gradient tensor to L2
  norm ``C`` and adds ``N(0, (sigma C)^2)`` noise to every coordinate, drawn from the client's own
  generator (never the server's, never shared). What that guarantees is computed by
  :mod:`splitlora.privacy.accounting` and stated in docs/privacy.md.
* :func:`nopeek_loss` is NoPeek's distance correlation (Vepakomma et al., arXiv 2008.09161) between
  a client's input embeddings and the activations it sends; adding ``weight * dcor`` to the client's
  objective makes the activations less predictive of the input.
"""

from __future__ import annotations

import torch

from ..config import Privacy


class Protector:
    def __init__(self, privacy: Privacy, seed: int, device: torch.device | str = "cpu"):
        self.clip_norm = privacy.clip_norm
        self.sigma = privacy.noise_multiplier
        self.generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
        self.releases = 0  # tensors released with noise (each one a Gaussian mechanism per token)

    def clip(self, t: torch.Tensor) -> torch.Tensor:
        """Each token's vector (the last dimension) scaled down to L2 norm at most C (differentiable)."""
        if not self.clip_norm:
            return t
        norms = t.norm(dim=-1, keepdim=True)
        return t * (self.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)

    def noise(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` plus N(0, (sigma C)^2) noise (``t`` must already be clipped)."""
        if not self.sigma:
            return t
        self.releases += 1
        noise = torch.randn(t.shape, generator=self.generator, device=t.device, dtype=t.dtype)
        return t + noise * (self.sigma * self.clip_norm)


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation between the rows of ``x`` (n, dx) and ``z`` (n, dz), in [0, 1]."""
    def centred(m):
        sq = (m[:, None, :] - m[None, :, :]).pow(2).sum(-1)
        d = (sq + 1e-12).sqrt()  # smooth at 0, so the diagonal has a finite gradient
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x.float()), centred(z.float())
    dcov_xz = (a * b).mean()
    dcov_xx, dcov_zz = (a * a).mean(), (b * b).mean()
    return (dcov_xz.clamp_min(0) / (dcov_xx * dcov_zz).sqrt().clamp_min(1e-12)).sqrt()


def nopeek_loss(embeds: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                max_tokens: int = 256) -> torch.Tensor:
    """dCor between input embeddings and activations over the batch's real tokens (a random subset of
    at most ``max_tokens``, drawn from the client's generator)."""
    real = mask.bool()
    x, z = embeds[real], hidden[real]
    if x.shape[0] > max_tokens:
        pick = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:max_tokens].to(x.device)
        x, z = x[pick], z[pick]
    return distance_correlation(x, z)
