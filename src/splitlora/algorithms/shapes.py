"""What crosses the cut in one server step, for each split shape (used by ``splitlora`` and ``sl``).

two-part: h_K, mask and labels up; dL/dh_K down.
U-shape:  h_K and mask up; h_(L-T) down; dL/dh_(L-T), the batch loss and its token count up;
          dL/dh_K down. Labels, logits and token ids never leave the client.
"""

from __future__ import annotations

from ..messages import Activations
from ..runtime.grid import ask_all


def round_trip(algo, ups: list[tuple[object, Activations]]) -> dict:
    """Run one server step on ``ups`` (``(client, activations)``); ``{client: (loss, tokens)}``."""
    if not ups:
        return {}
    server, grid = algo.server, algo.grid
    if not server.u_shape:
        replies, refused = server.step(ups)
        losses = {c: (b.loss, b.tokens) for c, b in replies.items()}
    else:
        tails, refused = server.forward(ups)
        _drop(grid, refused)
        grads = ask_all(grid, tails, lambda c: tails[c])
        replies, refused = server.backward(grads)
        losses = {c: (grads[c].loss, grads[c].tokens) for c in replies}
    _drop(grid, refused)
    for client, backward in replies.items():
        grid.send(client, backward)
    return losses


def _drop(grid, refused) -> None:
    for client in refused.clients:
        grid.drop(client, refused.reason)
