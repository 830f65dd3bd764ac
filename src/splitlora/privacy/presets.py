"""``--privacy MODE``: one config preset per threat (docs/privacy.md has the table of who sees what).

A preset is a set of config overrides applied after ``--config`` and before ``--set`` and explicit
flags (which win). The numbers (clip norm, noise multiplier) are starting points: read the epsilon
each run prints, and check the released adapter with ``splitlora audit --canaries``.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # The main server and the aggregator are trusted: nothing is added (activations, two-part labels
    # and every client's adapter reach them in the clear).
    "trusted-server": {},
    # Labels never leave a client (U-shape); activations and the tail's gradients still do.
    "private-labels": {"split_shape": "u-shape", "tail_layers": 1},
    # The aggregator learns only the sum of the client adapters (secure aggregation).
    "private-updates": {"privacy.secure_aggregation": True},
    # The released adapter is (epsilon, delta)-DP per training record (DP-SGD on every LoRA gradient).
    "private-records": {"privacy.dp_clip_norm": 1.0, "privacy.dp_noise_multiplier": 1.0},
    # No server is trusted with a client's data: no split (fed), secure aggregation and DP-SGD.
    # Poisson-sampled batches: the per-record epsilon is amplified by subsampling.
    "untrusted-server": {"algorithm": "fed", "privacy.secure_aggregation": True, "privacy.dp_clip_norm": 1.0,
                         "privacy.dp_noise_multiplier": 1.0, "privacy.dp_poisson": True},
}

HELP = ("privacy preset: " + ", ".join(PRESETS) + " (see docs/privacy.md; --set and flags override it)")


def preset(name: str) -> dict:
    from ..errors import UserError

    if name not in PRESETS:
        raise UserError(f"--privacy must be one of {', '.join(PRESETS)} (got {name!r})")
    return dict(PRESETS[name])
