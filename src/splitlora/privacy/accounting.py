"""What clipping and noise buy: (epsilon, delta) from a maintained accountant (Google's dp-accounting).

The mechanism (:class:`~splitlora.privacy.defences.Protector`): every token's vector of every tensor a
client sends is clipped to L2 norm ``C`` and gets ``N(0, (sigma C)^2)`` noise per coordinate.

* **Per token, per release.** Replacing one token's vector by any other of norm at most ``C``
  changes the release by at most ``2C`` in L2, so one release is a Gaussian mechanism with noise
  multiplier ``sigma / 2`` (replace-one adjacency; the add/remove convention would give ``sigma``).
* **Per example, per release.** An example is ``T`` positions (``max_length`` at most): replacing the
  whole sequence moves the release by at most ``2 C sqrt(T)``: multiplier ``sigma / (2 sqrt(T))``.
* **Composed over the run.** An example is released once per epoch of its client's data, and each
  release is one tensor (two-part: h_K) or two (U-shape: h_K and dL/dh_(L-T)); the releases compose
  (Renyi-DP accounting, as Opacus does by default; no amplification by subsampling claimed: batches
  are shuffled, not Poisson-sampled). RDP rather than PLD: PLD is tighter but its discretisation
  needs gigabytes at the small noise multipliers per-example bounds give (sigma / (2 sqrt(T)))).

What this does **not** cover (docs/privacy.md): labels in the two-part split (sent in the clear),
the attention mask (lengths), the LoRA updates the aggregator sees, and the server's own gradients
sent back (they are not the client's release).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import RunConfig
from ..registry import ALGORITHMS


@dataclass
class Guarantee:
    sigma: float
    clip_norm: float
    delta: float
    releases: int  # releases of one example over the run (worst client)
    positions: int  # T of the per-example bound
    epsilon_token_release: float
    epsilon_token_run: float
    epsilon_example_release: float
    epsilon_example_run: float

    def to_dict(self) -> dict:
        return asdict(self)


def epsilon(noise_multiplier: float, count: int, delta: float) -> float:
    """epsilon of ``count`` compositions of a Gaussian mechanism with ``noise_multiplier`` (RDP)."""
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(GaussianDpEvent(noise_multiplier), max(int(count), 1))
    return float(accountant.get_epsilon(delta))


def epochs_touched(batches: int, batch_size: int, n: int) -> int:
    """Passes over a client's ``n`` examples that ``batches`` batches start (each example is in one
    batch per pass: a shuffle per epoch, the partial last batch kept)."""
    per_epoch = math.ceil(max(n, 1) / batch_size)
    return math.ceil(batches / per_epoch)


def releases_per_example(cfg: RunConfig, client_sizes: list[int]) -> int:
    """How often the worst-placed example is released over the run (epochs of its client x tensors)."""
    per_step = 2 if cfg.u_shape else 1
    worst = 0
    for index, n in enumerate(client_sizes):
        batches = ALGORITHMS[cfg.algorithm].batches_drawn(cfg, index, cfg.steps)
        worst = max(worst, math.ceil(batches * cfg.batch_size / max(n, 1)))
    return worst * per_step


# ---- DP-SGD of the released adapter (privacy/dpsgd.py) -------------------------------------------------
#
# Each step releases (to whoever gets the adapter, and to the parties that see the LoRA tensors) a sum of
# per-example gradients, each clipped to C jointly over both sides of the cut, plus N(0, (sigma C)^2) per
# coordinate. Replace-one adjacency: swapping one record moves that sum by at most 2C, so a step is a
# Gaussian mechanism with multiplier sigma / 2 for the records in its batch. Batches are shuffled,
# not Poisson-sampled: no amplification by subsampling is claimed; a record is in one batch per pass
# over its site's data, so its epsilon is that of ``epochs_touched`` compositions (RDP, dp-accounting).
# Every step before that only post-processes (AdamW, FedAvg), so the released adapter carries it.
# With ``dp_poisson`` (fed, cen) each batch is Poisson-sampled at rate B / n and the accountant composes
# the subsampled Gaussian (add/remove adjacency, multiplier sigma) once per step: amplification holds.

def dp_sgd_epsilon(noise_multiplier: float, epochs: int, delta: float) -> float:
    """epsilon per record after its site's data was passed over ``epochs`` times (0 before any)."""
    if epochs <= 0:
        return 0.0
    return epsilon(noise_multiplier / 2, epochs, delta)


def poisson_dp_sgd_epsilon(noise_multiplier: float, rate: float, steps: int, delta: float) -> float:
    """epsilon per record after ``steps`` Poisson-sampled steps at sampling ``rate`` (add/remove
    adjacency, multiplier sigma: the analysis of Abadi et al. and Opacus; RDP)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(PoissonSampledDpEvent(min(rate, 1.0), GaussianDpEvent(noise_multiplier)), steps)
    return float(accountant.get_epsilon(delta))


def dp_sgd_epsilons(cfg: RunConfig, clients, steps: int) -> dict[str, float]:
    """``{site name: epsilon per record}`` after ``steps`` steps; ``clients``: objects with ``name``,
    ``index`` and ``num_samples`` (the algorithm's members)."""
    p = cfg.privacy
    out = {}
    for c in clients:
        batches = ALGORITHMS[cfg.algorithm].batches_drawn(cfg, c.index, steps)
        if p.dp_poisson:
            key = ("poisson", p.dp_noise_multiplier, cfg.batch_size / max(c.num_samples, 1), batches, p.delta)
            if key not in _CACHE:
                _CACHE[key] = poisson_dp_sgd_epsilon(*key[1:])
            out[c.name] = _CACHE[key]
            continue
        epochs = epochs_touched(batches, cfg.batch_size, c.num_samples)
        out[c.name] = _cached_dp_epsilon(p.dp_noise_multiplier, epochs, p.delta)
    return out


_CACHE: dict[tuple, float] = {}


def _cached_dp_epsilon(sigma: float, epochs: int, delta: float) -> float:
    key = (sigma, epochs, delta)
    if key not in _CACHE:
        _CACHE[key] = dp_sgd_epsilon(sigma, epochs, delta)
    return _CACHE[key]


def guarantee(cfg: RunConfig, client_sizes: list[int]) -> Guarantee | None:
    """The run's guarantee, or None when it adds no noise."""
    p = cfg.privacy
    if not (p.clip_norm and p.noise_multiplier):
        return None
    releases = releases_per_example(cfg, client_sizes)
    token, example = p.noise_multiplier / 2, p.noise_multiplier / (2 * math.sqrt(cfg.max_length))
    return Guarantee(p.noise_multiplier, p.clip_norm, p.delta, releases, cfg.max_length,
                     epsilon(token, 1, p.delta), epsilon(token, releases, p.delta),
                     epsilon(example, 1, p.delta), epsilon(example, releases, p.delta))
