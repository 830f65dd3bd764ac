"""The fed server's strategy: sample-weighted FedAvg of LoRA tensors, robust to one bad upload.

Every upload is checked before it can touch the average (:class:`~splitlora.config.Aggregation`):

* its FedAvg weight counts at most ``max_samples_per_client`` samples (a larger declared count is capped);
* its change from the current average, ``||theta_i - avg||``, is compared with
  ``max(median of the other clients' changes, ||avg||)``. Above ``max_update_ratio`` times that, it
  is an outlier: ``reject`` leaves it out, ``clip`` scales its change down to the bound. The norm of
  the average is a floor (an honest round moves LoRA by a fraction of it), and the median of the
  others lets long rounds move further when everyone does; with an honest majority, one client
  cannot move the average much further than the honest clients move it themselves.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..config import Aggregation


@dataclass
class Averaged:
    """The outcome of one aggregation."""

    state: dict[str, torch.Tensor] | None  # None: too few uploads were usable
    used: list[str] = field(default_factory=list)  # client names in the average
    rejected: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    capped: dict[str, int] = field(default_factory=dict)  # name -> declared count that was capped
    samples: list[int] = field(default_factory=list)  # FedAvg weights of ``used``, in order
    update_norms: dict[str, float] = field(default_factory=dict)


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i state_i / sum_i w_i`` over the keys of the first state (all must have the same keys)."""
    if not states:
        raise ValueError("fedavg needs at least one state")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("the states to average hold different sets of LoRA tensors")
    total = float(sum(weights))
    w = [x / total for x in weights]
    return {k: sum(wi * s[k] for wi, s in zip(w, states)) for k in keys}


def _norm(state: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor] | None = None) -> float:
    sq = 0.0
    for k, v in state.items():
        d = v.float() - ref[k].float() if ref is not None else v.float()
        sq += float(d.pow(2).sum())
    return sq ** 0.5


def robust_fedavg(uploads: Sequence[tuple[object, int, int, Mapping[str, torch.Tensor]]],
                  current: Mapping[str, torch.Tensor], rules: Aggregation, min_clients: int = 1) -> Averaged:
    """Average ``uploads`` (``(client name, index, declared samples, state)``), in index order.

    ``current`` is the average the round started from. See the module doc for the rules.
    """
    uploads = sorted(uploads, key=lambda u: u[1])
    out = Averaged(None)
    norms = {name: _norm(state, current) for name, _, _, state in uploads}
    out.update_norms = {k: round(v, 6) for k, v in norms.items()}
    base = _norm(current)
    kept: list[tuple[dict, int, str]] = []
    for name, _, declared, state in uploads:
        samples = min(int(declared), rules.max_samples_per_client)
        if samples < declared:
            out.capped[name] = int(declared)
        bound = None
        if rules.max_update_ratio:
            others = [n for other, n in norms.items() if other != name]
            bound = rules.max_update_ratio * max(statistics.median(others) if others else 0.0, base)
        if bound is not None and norms[name] > bound:
            if rules.outliers == "reject":
                out.rejected.append(name)
                continue
            scale = bound / norms[name]
            state = {k: current[k] + (v - current[k]) * scale for k, v in state.items()}
            out.clipped.append(name)
        kept.append((dict(state), samples, name))
    if len(kept) >= min_clients and kept:
        out.state = fedavg([s for s, _, _ in kept], [n for _, n, _ in kept])
        out.used = [name for _, _, name in kept]
        out.samples = [n for _, n, _ in kept]
    return out
