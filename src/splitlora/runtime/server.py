"""The main server: its blocks with one shared server-side LoRA.

Two-part split: blocks K..L-1, the final norm and the LM head; :meth:`SplitServer.step` takes the
activations (and labels) of one or more client batches, computes the loss, steps, and returns each
client's dL/dh_K. U-shape: only blocks K..L-T-1; :meth:`SplitServer.forward` returns h_(L-T) for each
batch, and :meth:`SplitServer.backward` takes the clients' dL/dh_(L-T), steps, and returns dL/dh_K.

The server never applies a step whose gradients are not finite: the clients whose batches made them
so are named in :class:`Refused` and left out, and the step is taken without them.

U-shape: the server's gradient is linear in each client's tail gradient dL/dh_(L-T), so a client that
scales it up a millionfold (far inside the value bound) would own AdamW's second moment and freeze the
server adapter for everyone else. :class:`InfluenceBound` scales each client's tail gradient down to
``tail_grad_ratio`` times a reference the client cannot move: the lower median of the step's other
clients' norms and of the recent steps' accepted norms (the per-client clipping DP-SGD applies per
example). The two-part split needs none: the server computes the loss itself, and every block it runs
normalises the activations a client sends.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from ..config import RunConfig
from ..data.batching import IGNORE
from ..device import PartyRng, party_seed
from ..messages import Activations, Backward, Tail, TailGrad
from ..models.lora import load_lora_state, lora_state
from ..models.precision import compute_dtype
from ..models.split import server_forward
from ..privacy.dpsgd import DpSgd, party_bound, per_example_losses
from .hooks import Hook, Work, observe
from .metrics import plausible_loss
from .optim import Optimizer


class InfluenceBound:
    """Per-client clipping of the U-shape's tail gradients against a server-side reference."""

    HISTORY = 16  # recent accepted norms kept (the reference is their lower median with the step's)

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.history: list[float] = []
        self.clipped: dict[str, int] = {}  # client name -> tail gradients scaled down so far

    def bound(self, norms: dict) -> dict:
        """``{client: scale <= 1}`` for the step's clients (``norms``: their tail gradients' norms)."""
        if not self.ratio:
            return {c: 1.0 for c in norms}
        scale = {}
        for c, n in norms.items():
            others = [m for o, m in norms.items() if o != c] + self.history
            if not others:  # the run's very first batch: nothing to compare with
                scale[c] = 1.0
                continue
            ref = sorted(others)[(len(others) - 1) // 2]
            limit = self.ratio * ref
            scale[c] = min(1.0, limit / n) if n > 0 else 1.0
            if scale[c] < 1.0:
                name = getattr(c, "name", str(c))
                self.clipped[name] = self.clipped.get(name, 0) + 1
        accepted = [n * scale[c] for c, n in norms.items()]
        self.history = (self.history + accepted)[-self.HISTORY:]
        return scale


@dataclass
class Refused:
    """Clients whose contribution to a server step was left out, and why."""

    clients: list = field(default_factory=list)
    reason: str = ""


class SplitServer:
    def __init__(self, part: nn.Module, cfg: RunConfig, total_steps: int):
        self.part = part
        self.u_shape = cfg.u_shape
        self.vocab_size = part.config.vocab_size
        self.optimizer = Optimizer(part, cfg, total_steps)
        self.device = next(part.parameters()).device
        self.dtype = compute_dtype(part)  # what received hidden states are computed in
        self.rng = PartyRng(party_seed(cfg.seed, "server"), self.device)
        self.hooks: list[Hook] = []
        self.influence = InfluenceBound(cfg.aggregation.tail_grad_ratio)
        p = cfg.privacy
        self.dp = DpSgd(part, party_bound(p.dp_clip_norm, split=True), p.dp_noise_multiplier * p.dp_clip_norm,
                        party_seed(cfg.seed, "dp:server"), self.device) if p.dp_sgd else None
        self._open = None  # U-shape: the middle's graph between forward and backward

    def lora_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.part)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a server checkpoint keeps of the main server: its adapter, optimiser, RNG, the tail
        gradients' reference and DP-SGD's noise stream. The keys sit at the top of the algorithm's
        checkpoint, as they always have."""
        state = {"server_lora": self.lora_state(), "server_optimizer": self.optimizer.state_dict(),
                 "server_rng": self.rng.state_dict(), "tail_grad_history": list(self.influence.history)}
        if self.dp is not None:
            state["server_dp"] = self.dp.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        load_lora_state(self.part, state["server_lora"])
        self.optimizer.load_state_dict(state["server_optimizer"])
        self.rng.load_state_dict(state["server_rng"])
        if self.dp is not None and "server_dp" in state:  # DP-SGD noise never repeats after a resume
            self.dp.load_state_dict(state["server_dp"])
        self.influence.history = [float(x) for x in state.get("tail_grad_history", [])]

    def _observe(self, kind: str, ups) -> "contextlib.ExitStack":
        return observe(self.hooks, Work("server", kind, ups[0][1].step, tuple(tuple(a.hidden.shape) for _, a, *_ in ups),
                                        clients=tuple(getattr(c, "name", str(c)) for c, *_ in ups)))

    # ---- two-part -------------------------------------------------------------------------------
    def step(self, ups: Sequence[tuple[object, Activations]]) -> tuple[dict, Refused]:
        """One server step over ``ups`` (``(client, activations)`` pairs): ``{client: Backward}``."""
        refused = Refused()
        ups = list(ups)
        while ups:
            with self.rng.active(), self._observe("server", ups):
                hidden, mask = self._concat(ups)
                labels = torch.cat([_pad(a.labels.to(self.device), hidden.shape[1], IGNORE) for _, a in ups])
                self.part.train()
                logits = server_forward(self.part, hidden, mask)
                loss = ForCausalLMLoss(logits, labels, self.vocab_size)
                bad = self._bad_rows(logits, labels, ups) if not torch.isfinite(loss) else []
                if not bad:
                    scale = self.optimizer.loss_scale
                    if self.dp is None:
                        self.optimizer.scale(loss).backward()
                    else:  # DP-SGD (never under fp16's loss scaler): each example's gradient (and its dL/dh) from its own loss
                        per_example_losses(logits, labels)[0].sum().backward()
                        self.dp.privatise()
                    if self.optimizer.grads_ok():
                        self.optimizer.step()
                        return self._replies(ups, self.optimizer.unscale(hidden.grad, scale),
                                             float(loss.detach())), refused
                    if self.optimizer.overflowed():  # fp16: the scale's fault; halved, the batch is redone
                        self.optimizer.zero_grad()
                        continue
                    bad = self._culprits([c for c, _ in ups], self._two_part_alone(ups))
                self.optimizer.zero_grad()
                if self.dp is not None:
                    self.dp.reset(activations=True)
            refused.clients += [c for c, _ in ups if c in bad]
            refused.reason = "its batch made the server's loss or gradients non-finite"
            ups = [(c, a) for c, a in ups if c not in bad]
        return {}, refused

    def _replies(self, ups, grad: torch.Tensor, loss: float) -> dict:
        out, row = {}, 0
        for client, a in ups:
            b, t = a.hidden.shape[:2]
            tokens = int((a.labels[:, 1:] != IGNORE).sum())
            # Gradients leave on the activations' device (the client's).
            out[client] = Backward(a.step, grad[row:row + b, :t].to(a.hidden.device).contiguous(), loss, tokens)
            row += b
        return out

    def _bad_rows(self, logits, labels, ups) -> list:
        """The clients whose rows give a non-finite loss."""
        per_token = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                    ignore_index=IGNORE, reduction="none").view(labels.shape[0], -1)
        bad, row = [], 0
        for client, a in ups:
            b = a.hidden.shape[0]
            if not bool(torch.isfinite(per_token[row:row + b]).all()):
                bad.append(client)
            row += b
        return bad or [c for c, _ in ups]

    def _culprits(self, clients, backward_alone) -> list:
        """Finite loss but unusable gradients: the clients whose part alone (``backward_alone(i)``
        for the i-th) makes them unusable; all of them if none does alone. No step is taken."""
        bad = []
        for i, client in enumerate(clients):
            self.optimizer.zero_grad()
            backward_alone(i)
            if not self.optimizer.grads_ok():
                bad.append(client)
        return bad or list(clients)

    def _two_part_alone(self, ups):
        def backward(i):
            client, a = ups[i]
            hidden, mask = self._concat([(client, a)])
            self.optimizer.scale(ForCausalLMLoss(server_forward(self.part, hidden, mask), a.labels.to(self.device),
                                                 self.vocab_size)).backward()
        return backward

    def _concat(self, ups):
        width = max(a.hidden.shape[1] for _, a in ups)
        hidden = torch.cat([_pad(a.hidden.to(self.device, self.dtype), width, 0.0) for _, a in ups]).requires_grad_(True)
        mask = torch.cat([_pad(a.attention_mask.to(self.device), width, 0) for _, a in ups])
        return hidden, mask

    # ---- U-shape --------------------------------------------------------------------------------
    def forward(self, ups: Sequence[tuple[object, Activations]]) -> tuple[dict, Refused]:
        """The middle blocks over ``ups``: ``{client: Tail(h_(L-T))}``; the graph stays open for :meth:`backward`."""
        refused = Refused()
        with self.rng.active(), self._observe("server", ups):
            hidden, mask = self._concat(ups)
            self.part.train()
            out = server_forward(self.part, hidden, mask)
            tails, row, kept = {}, 0, []
            for client, a in ups:
                b, t = a.hidden.shape[:2]
                rows = out[row:row + b, :t]
                if bool(torch.isfinite(rows).all()):
                    tails[client] = Tail(a.step, rows.detach().to(a.hidden.device).contiguous())
                    kept.append((client, a, row))
                else:
                    refused.clients.append(client)
                row += b
        if refused.clients:
            refused.reason = "its batch made the server's activations non-finite"
        self._open = (hidden, out, kept)
        return tails, refused

    def backward(self, grads: dict) -> tuple[dict, Refused]:
        """dL/dh_(L-T) of the clients in ``grads`` (``{client: TailGrad}``) -> ``{client: Backward}``.

        Each client sent the gradient of its batch's mean loss; weighting batch i by n_i / N (its share
        of the step's loss tokens) gives the gradient of the mean loss over every token of the step, as
        the two-part server and ``cen`` compute it. Clients that sent nothing contribute nothing."""
        hidden, out, kept = self._open
        self._open = None
        refused = Refused()
        live = [(c, a, row) for c, a, row in kept if c in grads]
        if not live or sum(grads[c].tokens for c, _, _ in live) == 0:
            if live:
                refused.clients, refused.reason = [c for c, _, _ in live], "its batch carried no loss tokens"
            return {}, refused
        norms = {c: float(grads[c].grad.float().norm()) for c, _, _ in live}
        # Absurd ones (beyond what any gradient may be) are left to the culprit search below, which drops them.
        if all(math.isfinite(n) and n <= Optimizer.MAX_GRAD for n in norms.values()):
            for c, scale in self.influence.bound(norms).items():
                if scale < 1.0:
                    grads[c] = replace(grads[c], grad=grads[c].grad * scale)
        with self.rng.active(), self._observe("server_bwd", live):
            while live:
                tokens = sum(grads[c].tokens for c, _, _ in live)
                if tokens == 0:  # what is left after the culprits carries no loss tokens
                    refused.clients += [c for c, _, _ in live]
                    break
                share = {c: grads[c].tokens / tokens for c, _, _ in live}
                # The graph is kept while more than one client is in the step: if the gradients are
                # not finite (or too large), each client's part is tried alone to find whose it was,
                # and the step is taken without it. Without this, one client's tail gradient got
                # every client of a batched step dropped (issue 11).
                scale, opt = self.optimizer.loss_scale, self.optimizer
                fp16 = opt.scaler.is_enabled()  # an overflow is redone at a lower scale: keep the graph
                out.backward(opt.scale(self._upstream(out, live, grads, share), out.dtype),
                             retain_graph=len(live) > 1 or fp16)
                if self.optimizer.grads_ok():
                    return self._tail_replies(hidden, live, grads, share, scale), refused
                if opt.overflowed():
                    opt.zero_grad()
                    hidden.grad = None
                    continue
                bad = [live[0][0]] if len(live) == 1 else self._culprits(
                    [c for c, _, _ in live],
                    lambda i: out.backward(opt.scale(self._upstream(out, [live[i]], grads, {live[i][0]: 1.0}), out.dtype),
                                           retain_graph=True))
                self.optimizer.zero_grad()
                hidden.grad = None  # the tries above wrote into it too
                refused.clients += bad
                refused.reason = "the server's gradients were not finite"
                live = [x for x in live if x[0] not in bad]
        return {}, refused

    @staticmethod
    def _upstream(out, live, grads, share) -> torch.Tensor:
        upstream = torch.zeros_like(out, dtype=torch.float32)  # cast (and scaled) by the caller
        for c, a, row in live:
            b, t = a.hidden.shape[:2]
            g = grads[c].grad.to(out.device, torch.float32)
            upstream[row:row + b, :t] = g if share[c] == 1.0 else g * share[c]
        return upstream

    def _tail_replies(self, hidden, live, grads, share, scale: float) -> dict:
        self.optimizer.step()
        grad = self.optimizer.unscale(hidden.grad, scale)
        step = live[0][1].step
        counted = [c for c, _, _ in live if plausible_loss(grads[c].loss)]  # a forged report is left out
        weight = sum(share[c] for c in counted)
        loss = sum(grads[c].loss * share[c] for c in counted) / weight if weight else 0.0
        replies = {}
        for c, a, row in live:
            b, t = a.hidden.shape[:2]
            replies[c] = Backward(step, grad[row:row + b, :t].to(a.hidden.device).contiguous(), loss,
                                  grads[c].tokens, scale=share[c])
        return replies


def _pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
    """Right-pad dim 1 of ``t`` to ``width``."""
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = (0, 0, 0, extra) if t.dim() == 3 else (0, extra)
    return F.pad(t, pad, value=value)
