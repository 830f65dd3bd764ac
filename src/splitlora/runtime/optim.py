"""Optimiser and schedule shared by every party: AdamW with linear warm-up and decay."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from ..config import RunConfig



# AdamW's betas (torch's defaults), named: an sl hand-over's moments are checked against them (transport/wire.py).
BETAS = (0.9, 0.999)

class Optimizer:
    """AdamW over the trainable (LoRA) tensors of ``module``, stepped with optional clipping.

    ``names`` maps each trainable tensor to its key in the party's LoRA state, so that AdamW's moments
    can travel with the adapter (``sl``'s hand-over) and be loaded by another party's optimiser.
    """

    def __init__(self, module: nn.Module, cfg: RunConfig, total_steps: int):
        from ..models.lora import lora_key

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.names = [lora_key(n) for n, _ in named]
        self.cfg, self.total_steps = cfg, total_steps
        self.opt = self._adamw()
        self.sched = self._schedule()
        self.max_grad_norm = cfg.max_grad_norm
        self.steps = 0
        # An fp16 base needs a loss scaler (bf16 and fp32 do not): each party scales the gradient it
        # starts its own backward from and unscales what it sends on, so parties' scales are independent.
        from ..models.precision import compute_dtype

        device = next((p.device.type for p in self.params), "cpu")
        self.scaler = torch.amp.GradScaler(device, enabled=compute_dtype(module) == torch.float16)
        self._unscaled = self._overflow = False

    def _schedule(self):
        return get_linear_schedule_with_warmup(self.opt, min(self.cfg.warmup_steps, self.total_steps),
                                               self.total_steps)

    # Above this, AdamW's second moment (grad squared) could overflow float32 and freeze the adapter.
    MAX_GRAD = 1e15

    # ---- loss scaling (fp16 only; identities otherwise) ---------------------------------------------
    @property
    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def scale(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The loss (or the upstream gradient) this party's backward starts from, scaled (in fp32
        first, so that no small value underflows before it is), in ``dtype`` if given."""
        if self.scaler.is_enabled():
            t = self.scaler.scale(t.float())
        return t if dtype is None else t.to(dtype)

    def unscale(self, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """A gradient to send on, computed under ``scale``, in fp32 and unscaled."""
        return grad.float() / scale if self.scaler.is_enabled() else grad

    def _unscale_params(self) -> None:
        if self.scaler.is_enabled() and not self._unscaled:
            self.scaler.unscale_(self.opt)
            self._unscaled = True

    def grads_ok(self) -> bool:
        """Whether every gradient is finite and below :data:`MAX_GRAD`: no step is taken otherwise."""
        self._unscale_params()
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        worst = float(torch.nn.utils.get_total_norm(grads, norm_type=float("inf")))  # NaN and inf stay so
        self._overflow = not math.isfinite(worst)
        return worst <= self.MAX_GRAD

    def overflowed(self) -> bool:
        """fp16: whether the gradients :meth:`grads_ok` just refused overflowed at a scale that can still
        be lowered. Then :meth:`zero_grad` halves the scale and the caller redoes its backward, so the
        scale, not a client's batch, pays for it (GradScaler's policy, without losing the step); at
        scale 1 a non-finite gradient is the batch's own."""
        return self.scaler.is_enabled() and self._overflow and self.loss_scale > 1.0

    def zero_grad(self) -> None:
        if self._unscaled:  # fp16: a step given up after unscaling (an overflow) lowers the scale
            self.scaler.update()
            self._unscaled = False
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self._unscale_params()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)
            self.scaler.update()
            self._unscaled = False
        else:
            self.opt.step()
        self.sched.step()
        self.steps += 1
        self.opt.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    # ---- persistence and travel -----------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "steps": self.steps}
        if self.scaler.is_enabled():  # fp16: the scale and its growth count, or a resumed run scales differently
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "opt" in state:
            self.opt.load_state_dict(copy.deepcopy(state["opt"]))
            self.sched.load_state_dict(state["sched"])
            self.steps = int(state["steps"])
        else:  # kept without its moments (they left with an sl hand-over): fresh ones, the schedule at its step
            self.restart_at(int(state["steps"]))
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def _adamw(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.params, lr=self.cfg.lr, betas=BETAS, weight_decay=self.cfg.weight_decay)

    def restart_at(self, steps: int) -> None:
        """Fresh moments, the schedule standing at ``steps`` (a client that lost its optimiser state)."""
        self.opt = self._adamw()
        self.sched = self._schedule()
        self.steps = 0
        self.advance(steps)

    def advance(self, steps: int) -> None:
        """Move the schedule ``steps`` steps on without updating anything (steps a client missed)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(max(steps, 0)):
                self.sched.step()
        self.steps += max(steps, 0)

    def moments(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """AdamW's first and second moments by LoRA key (zeros before the first step)."""
        avg, sq = {}, {}
        for name, p in zip(self.names, self.params):
            state = self.opt.state.get(p, {})
            avg[name] = state["exp_avg"].detach().clone() if "exp_avg" in state else torch.zeros_like(p)
            sq[name] = state["exp_avg_sq"].detach().clone() if "exp_avg_sq" in state else torch.zeros_like(p)
        return avg, sq

    def load_moments(self, exp_avg: dict, exp_avg_sq: dict, steps: int) -> None:
        """Continue from another party's optimiser: its moments and its step count (and schedule)."""
        self.restart_at(steps)
        if steps == 0:
            return
        for name, p in zip(self.names, self.params):
            self.opt.state[p] = {"step": torch.tensor(float(steps)),
                                 "exp_avg": exp_avg[name].to(p.device, p.dtype).clone(),
                                 "exp_avg_sq": exp_avg_sq[name].to(p.device, p.dtype).clone()}


class LrClock:
    """The learning rate a party's schedule gives after ``steps`` steps, for a party the caller does
    not hold (the ``fed`` server logs its clients' learning rate)."""

    def __init__(self, cfg: RunConfig, total_steps: int):
        self.opt = Optimizer(nn.Linear(1, 1), cfg, total_steps)

    def after(self, steps: int) -> float:
        if steps < self.opt.steps:
            self.opt.restart_at(steps)
        else:
            self.opt.advance(steps - self.opt.steps)
        return self.opt.lr


# Kingma & Ba (2015), 2.1: one Adam step moves a value by about lr (exactly lr on the first step), and by at
# most lr * (1 - b1) / sqrt(1 - b2) (3.16 lr) after a gradient far larger than every one before it. An sl
# hand-over may move each value 1.5 lr a step: that rare spike is clipped, an attacker's adapter cannot
# move further than about one and a half honest turns would.
STEP_BOUND = 1.5


def bound_handover(before, after, lrs: list[float], weight_decay: float, sq_growth: float = 100.0):
    """Bound an ``sl`` hand-over (``after``) by what ``len(lrs)`` AdamW steps at learning rates ``lrs`` could make of
    ``before`` (the hand-over the client started from). Returns ``(handover, notes)``; ``notes`` names what
    was bounded (empty for an honest hand-over).

    * ``opt_steps`` is ``before.opt_steps + len(lrs)``: the server counted the steps; a claim is not used.
    * each adapter value moved at most ``sum(lr) * STEP_BOUND`` plus its weight decay; a larger move is
      clipped to that (what any gradients could have done);
    * ``exp_avg_sq`` decays by ``b2`` a step and grows at most by new squared gradients; with no gradient
      bound the server can check, its per-tensor maximum may grow at most ``sq_growth`` times the
      previous maximum (where there is one; early turns grow fast, as LoRA B leaves 0); above that it is
      scaled down to the bound (a huge second moment would freeze every later turn: beyond this, a turn
      is slowed at most sqrt(sq_growth) = 10 times, and less every step, by b2). ``exp_avg`` is then
      kept to ``m^2 <= 52.9 v``.
    """
    from ..messages import Handover

    steps, notes = len(lrs), []
    reach = sum(lrs) * STEP_BOUND
    state = {}
    for k, v in after.state.items():
        old = before.state[k].to(v.dtype)
        limit = reach + sum(lrs) * weight_decay * (old.abs() + reach)
        moved = v - old
        clipped = torch.maximum(torch.minimum(moved, limit), -limit)
        if not torch.equal(clipped, moved):
            notes.append(f"adapter {k}")
        state[k] = old + clipped
    exp_avg, exp_avg_sq = {}, {}
    b1, b2 = BETAS
    for k, v in after.exp_avg_sq.items():
        prev = float(before.exp_avg_sq[k].max()) if k in before.exp_avg_sq else 0.0
        m = after.exp_avg[k]
        if prev > 0 and sq_growth:
            top = sq_growth * prev
            worst = float(v.max())
            if worst > top:
                v = v * (top / worst)
                notes.append(f"exp_avg_sq {k}")
                ratio = (1 - b1) ** 2 / ((1 - b2) * (1 - b1 ** 2 / b2))
                cap = (ratio * v).sqrt()
                m = torch.maximum(torch.minimum(m, cap), -cap)
        exp_avg[k], exp_avg_sq[k] = m, v
    out = Handover(state, exp_avg, exp_avg_sq, before.opt_steps + steps)
    if after.opt_steps != out.opt_steps:
        notes.append(f"opt_steps {after.opt_steps} (counted {out.opt_steps})")
    return out, notes
