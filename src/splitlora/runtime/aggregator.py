"""The fed server's strategy: aggregation rules whose worst case is bounded by an honest client's influence.

An aggregator turns one round's uploads into the next average. Every rule here works on each upload's
change from the current average (its *update*) and shares the same guards
(:class:`~splitlora.config.Aggregation`):

* **weights** (``fedavg``): a declared sample count is a claim nobody can check. It counts at most
  ``max_samples_per_client`` and at most ``max_weight_ratio`` times the round's lower-median claim;
  the other rules weigh every upload equally.
* **norm bound**: an update whose L2 norm is above ``max_update_ratio`` times the *reference* is an
  outlier (``reject``: left out; ``clip``: scaled down to the bound). The reference is the round's
  lower median of update norms (an honest majority holds it), capped at ``max_norm_growth`` times the
  previous round's reference (so that colluders cannot move it far in one round), and at
  ``max_update_norm`` when that is set. It is never the norm of an average (which an attacker moves).
* **the rule** (``rule``): ``fedavg``, coordinate-wise ``median``, ``trimmed-mean``, ``krum``,
  ``multi-krum``, ``bulyan`` (the rules of Flower's strategy library; see :data:`AGGREGATORS` and
  :meth:`Aggregator.tolerates` for the attackers each tolerates).
* **the result**: an average that is not finite is not sent (the round is refused and the current
  average stays); one whose change is above the bound (a coordinate-wise rule can land outside the
  ball its inputs lie in) is scaled down to it: the server never ships a worse one. A refused round
  leaves the reference as it was.

Flower's functions (``flwr.server.strategy.aggregate``) are the model; they are re-stated here in a
few lines of torch rather than pulling in the flwr framework (and its pinned gRPC/protobuf) for them.
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

    state: dict[str, torch.Tensor] | None  # None: too few uploads were usable, or the result was refused
    used: list[str] = field(default_factory=list)  # client names in the average
    rejected: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    capped: dict[str, int] = field(default_factory=dict)  # name -> declared count that was capped
    samples: list[int] = field(default_factory=list)  # FedAvg weights of ``used``, in order
    update_norms: dict[str, float] = field(default_factory=dict)
    bound: float | None = None  # the norm bound of the round (None: none)
    refused: str = ""  # why the average was not sent
    average_clipped: bool = False  # the rule's result moved further than the bound and was scaled down


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


# ---- the rules, on flattened updates (one row per upload) ------------------------------------------

def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count, as numpy's)."""
    s = x.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Coordinate-wise mean after cutting the ``int(beta * n)`` largest and smallest values."""
    n = x.shape[0]
    cut = int(beta * n)
    return x.sort(dim=0).values[cut:n - cut].mean(dim=0)


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score: each row's summed squared distance to its ``n - f - 2`` nearest other rows."""
    n = x.shape[0]
    d = torch.cdist(x.double(), x.double()).pow(2)
    d.fill_diagonal_(float("inf"))
    k = max(n - f - 2, 1)
    return d.sort(dim=1).values[:, :k].sum(dim=1)


class Aggregator:
    """One aggregation rule. ``combine`` turns the kept updates (rows of ``x``, with their weights)
    into the update of the average; the guards around it are shared (see the module doc).

    Holds what it learns across rounds (the norm reference), saved with the server's checkpoint.
    """

    name = "fedavg"
    weighted = True  # whether declared sample counts weigh the uploads (else equal weights)

    def __init__(self, rules: Aggregation):
        self.rules = rules
        self.reference: float | None = None  # the latest round's norm reference

    def tolerates(self, n: int) -> int:
        """How many of ``n`` uploads may be an attacker's with a bounded effect on the average."""
        return (n - 1) // 2  # the norm reference and the weight cap are lower medians

    def combine(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (weights[:, None] * x).sum(dim=0) / weights.sum()

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"name": self.name, "reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        self.reference = state.get("reference")

    # ---- one round ---------------------------------------------------------------------------------
    def __call__(self, uploads: Sequence[tuple[object, int, int, Mapping[str, torch.Tensor]]],
                 current: Mapping[str, torch.Tensor], min_clients: int = 1) -> Averaged:
        """Aggregate ``uploads`` (``(client name, index, declared samples, state)``), in index order,
        into a new average of ``current`` (the average the round started from)."""
        rules = self.rules
        uploads = sorted(uploads, key=lambda u: u[1])
        out = Averaged(None)
        if not uploads:
            return out
        keys = list(current)
        deltas = {name: torch.cat([(state[k].float() - current[k].float()).flatten() for k in keys])
                  for name, _, _, state in uploads}
        norms = {name: float(d.norm()) for name, d in deltas.items()}
        out.update_norms = {k: round(v, 6) for k, v in norms.items()}
        bound = self._bound(list(norms.values()))
        out.bound = bound
        claims = [min(int(d), rules.max_samples_per_client) for _, _, d, _ in uploads]
        cap = rules.max_weight_ratio * statistics.median_low(claims) if rules.max_weight_ratio else None
        kept, weights = [], []
        for (name, _, declared, _), claim in zip(uploads, claims):
            weight = claim if cap is None else min(claim, cap)
            if weight < declared:
                out.capped[name] = int(declared)
            d = deltas[name]
            if bound is not None and norms[name] > bound:
                if rules.outliers == "reject":
                    out.rejected.append(name)
                    continue
                d = d * (bound / norms[name])
                out.clipped.append(name)
            kept.append((name, d))
            weights.append(float(weight) if self.weighted else 1.0)
        if len(kept) < max(min_clients, 1):
            out.refused = f"{len(kept)} usable uploads, fewer than {max(min_clients, 1)}"
            return out
        x = torch.stack([d for _, d in kept])
        update = self.combine(x, torch.tensor(weights, dtype=x.dtype))
        change = float(update.norm())
        if not torch.isfinite(update).all():
            out.refused = "the average is not finite"
            return out
        if bound is not None and change > bound:  # a coordinate-wise rule can land outside the ball
            update = update * (bound / change)
            out.average_clipped = True
        out.state, row = {}, 0
        for k in keys:
            n = current[k].numel()
            out.state[k] = (current[k].float() + update[row:row + n].view(current[k].shape)).to(current[k].dtype)
            row += n
        out.used = [name for name, _ in kept]
        out.samples = [int(w) for w in weights] if self.weighted else [1] * len(kept)
        if bound is not None:
            self.reference = bound / rules.max_update_ratio if rules.max_update_ratio else self.reference
        return out

    def _bound(self, norms: list[float]) -> float | None:
        rules = self.rules
        bound = None
        if rules.max_update_ratio:
            ref = statistics.median_low(norms)
            if rules.max_norm_growth and self.reference:
                ref = min(ref, rules.max_norm_growth * self.reference)
            bound = rules.max_update_ratio * ref
        if rules.max_update_norm:
            bound = rules.max_update_norm if bound is None else min(bound, rules.max_update_norm)
        return bound


class Median(Aggregator):
    """Coordinate-wise median (Yin et al. 2018; Flower's FedMedian)."""

    name, weighted = "median", False

    def tolerates(self, n: int) -> int:
        return (n - 1) // 2

    def combine(self, x, weights):
        return coordinate_median(x)


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018; Flower's FedTrimmedAvg), ``trim_fraction`` cut each side."""

    name, weighted = "trimmed-mean", False

    def tolerates(self, n: int) -> int:
        return int(self.rules.trim_fraction * n)

    def combine(self, x, weights):
        return trimmed_mean(x, self.rules.trim_fraction)


class Krum(Aggregator):
    """Krum (Blanchard et al. 2017; Flower's Krum): the upload closest to its ``n - f - 2`` neighbours."""

    name, weighted = "krum", False

    def f(self, n: int) -> int:
        """The attackers assumed: ``byzantine``, lowered to what ``n`` uploads allow (n >= 2f + 3)."""
        return max(0, min(self.rules.byzantine, (n - 3) // 2))

    def tolerates(self, n: int) -> int:
        return self.f(n)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return krum_scores(x, self.f(x.shape[0])).argsort()[:1]

    def combine(self, x, weights):
        return x[self.select(x)].mean(dim=0)


class MultiKrum(Krum):
    """Multi-Krum: the mean of the ``n - f`` best Krum scores."""

    name = "multi-krum"

    def select(self, x):
        n = x.shape[0]
        return krum_scores(x, self.f(n)).argsort()[:max(n - self.f(n), 1)]


class Bulyan(Krum):
    """Bulyan (El Mhamdi et al. 2018; Flower's Bulyan): Krum picks ``n - 2f`` uploads one by one, then a
    coordinate-wise mean of the ``n - 4f`` values closest to their median. Needs n >= 4f + 3."""

    name = "bulyan"

    def f(self, n: int) -> int:
        return max(0, min(self.rules.byzantine, (n - 3) // 4))

    def combine(self, x, weights):
        n, f = x.shape[0], self.f(x.shape[0])
        left, chosen = list(range(n)), []
        while len(chosen) < n - 2 * f:
            pick = left[int(krum_scores(x[left], f).argmin())] if len(left) > 2 else left[0]
            chosen.append(pick)
            left.remove(pick)
        s = x[chosen]
        med = coordinate_median(s)
        keep = max(s.shape[0] - 2 * f, 1)
        closest = (s - med).abs().argsort(dim=0)[:keep]
        return s.gather(0, closest).mean(dim=0)


# The aggregation rules by name (``aggregation.rule``).
AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (Aggregator, Median, TrimmedMean, Krum, MultiKrum, Bulyan)
}


class FunctionRule(Aggregator):
    """A registered plain function ``fn(uploads, current, rules, min_clients) -> Averaged``: no state, and
    none of the guards above but what the function does itself."""

    def __init__(self, rules: Aggregation, fn):
        super().__init__(rules)
        self.fn, self.name = fn, rules.rule

    def __call__(self, uploads, current, min_clients: int = 1) -> Averaged:
        return self.fn(uploads, current, self.rules, min_clients)


def make_aggregator(rules: Aggregation, rule=None) -> Aggregator:
    """The aggregator of ``rules.rule``; ``rule``: what the registry holds under that name (a built-in
    when not given): an :class:`Aggregator` subclass or a plain function."""
    rule = AGGREGATORS[rules.rule] if rule is None else rule
    if isinstance(rule, type) and issubclass(rule, Aggregator):
        return rule(rules)
    return FunctionRule(rules, rule)
