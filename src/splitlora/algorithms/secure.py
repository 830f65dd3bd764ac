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

import struct

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

    def stage(members, name, data_of, parse=lambda c, data: data):
        """``{client: parse(client, reply data)}`` of the members that answered this stage with
        something well formed; a malformed answer drops its client from the run."""
        out = {}
        for c, r in ask_all(grid, members, lambda c: SecAgg(round_, name, data_of(c))).items():
            try:
                if r.round != round_ or r.stage != name:
                    raise secagg.SecAggError(f"a reply to stage {r.stage!r} of round {r.round}")
                out[c] = parse(c, r.data)
            except (secagg.SecAggError, struct.error) as exc:
                grid.drop(c, f"secure aggregation, stage {name}: {exc}")
        return out

    up = stage(clients, "keys", lambda c: secagg.pack_params(p), lambda c, d: secagg.unpack_keys(
        struct.pack(">II", 1, c.index) + d)[c.index])
    keys = {c.index: k for c, k in up.items()}
    if len(keys) < p.threshold:
        return failed, list(up)
    relayed = secagg.pack_keys(keys)
    up = stage(list(up), "share", lambda c: relayed, lambda c, d: secagg.unpack_blobs(d))
    outgoing = {c.index: blobs for c, blobs in up.items()}
    shared = sorted(outgoing)
    up = stage(list(up), "mask", lambda c: secagg.pack_blobs(
        {j: out[c.index] for j, out in outgoing.items() if c.index in out}), lambda c, d: secagg.unpack_vector(d, p))
    masked = {c.index: y for c, y in up.items()}
    survivors = list(up)
    if len(masked) < p.threshold:
        return failed, survivors
    dropped = sorted(set(shared) - set(masked))
    roster = secagg.pack_roster(sorted(masked), dropped)

    def answer(c, d):
        a = secagg.unpack_unmasking(c.index, d)
        if set(a.b_shares) != set(masked) or set(a.s_shares) != set(dropped):
            raise secagg.SecAggError("unmasking shares for other clients than the roster named")
        return a

    answers = list(stage(survivors, "unmask", lambda c: roster, answer).values())
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
