"""FedAvg under secure aggregation: the server's side of a SecAgg round, driven through the grid.

Each stage is one command to every client still in the round (:class:`~splitlora.messages.SecAgg`);
a client that does not answer a stage is out of the rest of the round, and the round completes while
at least ``threshold`` clients remain. What the server holds at the end is the weighted sum of the
survivors' adapters and the sum of their weights; no upload is ever seen alone, so the robust rules
of :mod:`splitlora.runtime.aggregator` (which inspect each upload) cannot run: secure aggregation
trades them away, and each input is bounded only by its encoding range (``secagg_clip``) and the
weight cap (``aggregation.max_samples_per_client``). See docs/privacy.md.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import RunConfig
from ..messages import SecAgg
from ..privacy import secagg
from ..runtime.aggregator import Averaged
from ..runtime.grid import ClientInfo, Grid, ask_all


def secure_fedavg(grid: Grid, clients: list[ClientInfo], round_: int, current: dict[str, torch.Tensor],
                  cfg: RunConfig) -> tuple[Averaged, list[ClientInfo]]:
    """The average of ``clients``' adapters by SecAgg: ``(averaged, clients that took part to the end)``."""
    keys_order = sorted(current)
    p = secagg.Params(round_, tuple(c.index for c in clients),
                      cfg.privacy.secagg_threshold or secagg.default_threshold(len(clients)),
                      cfg.privacy.secagg_clip, cfg.aggregation.max_samples_per_client,
                      sum(current[k].numel() for k in keys_order))
    p.check()
    failed = Averaged(None)

    def stage(members, name, data_of):
        replies = ask_all(grid, members, lambda c: SecAgg(round_, name, data_of(c)))
        return {c: r for c, r in replies.items() if r.round == round_ and r.stage == name}

    up = stage(clients, "keys", lambda c: secagg.pack_params(p))
    keys = {c.index: secagg.Keys(c.index, r.data[:32], r.data[32:64]) for c, r in up.items() if len(r.data) == 64}
    if len(keys) < p.threshold:
        return failed, list(up)
    relayed = secagg.pack_keys(keys)
    up = stage([c for c in up if c.index in keys], "share", lambda c: relayed)
    outgoing = {c.index: secagg.unpack_blobs(r.data) for c, r in up.items()}
    shared = sorted(outgoing)
    up = stage(list(up), "mask", lambda c: secagg.pack_blobs(
        {j: out[c.index] for j, out in outgoing.items() if c.index in out}))
    masked = {c.index: secagg.unpack_vector(r.data, p) for c, r in up.items()}
    survivors = list(up)
    if len(masked) < p.threshold:
        return failed, survivors
    roster = secagg.pack_roster(sorted(masked), sorted(set(shared) - set(masked)))
    answers = [secagg.unpack_unmasking(c.index, r.data) for c, r in stage(survivors, "unmask", lambda c: roster).items()]
    if len(answers) < p.threshold:
        return failed, survivors
    values, weight = secagg.unmask_sum(p, keys, shared, masked, answers)
    if weight <= 0:
        return failed, survivors
    mean, state, at = values / weight, {}, 0
    for k in keys_order:
        n = current[k].numel()
        state[k] = torch.from_numpy(np.ascontiguousarray(mean[at:at + n])).view(current[k].shape).to(current[k].dtype)
        at += n
    return Averaged(state, used=[c.name for c in survivors], samples=[weight]), survivors
