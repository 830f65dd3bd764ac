"""The data owner: its part of the model with its own LoRA, its optimiser and its data.

A :class:`ClientApp` runs the commands an algorithm sends it (:mod:`splitlora.messages`) and
nothing else; the same object is a simulated client, the heart of ``splitlora client`` and a Ray
actor. What it holds depends on the algorithm:

* split (``splitlora``, ``sl``), two-part: the embeddings and blocks 0..K-1;
* split, U-shape: also blocks L-T..L-1, the final norm and the head, so that the loss (and the
  labels) stay here;
* whole (``fed``, ``cen``): the whole model.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from ..config import RunConfig
from ..data.batching import IGNORE, BatchStream, Encoded
from ..device import PartyRng, party_seed, to_device
from ..messages import (Activations, AdapterUpdate, Backward, Finish, Forward, HandIn, HandOut, Handover, Load,
                        LocalStep, SecAgg, SecAggReply, StepDone, Sync, Tail, TailGrad, Upload)
from ..models.lora import load_lora_state, lora_state
from ..models.precision import compute_dtype
from ..models.split import client_forward, tail_forward
from ..privacy.defences import nopeek_loss
from ..privacy.dpsgd import DpSgd, party_bound, per_example_losses
from ..registry import DEFENCES
from .hooks import Hook, Work, observe
from .optim import Optimizer

class ProtocolError(RuntimeError):
    """A command that does not fit what this client did (a gradient for a step it did not run, ...)."""


def handles(command_type: type):
    """Marks the :class:`ClientApp` method that carries out ``command_type`` (a subclass may override
    the method, or mark one for a command of its own)."""

    def mark(method):
        method.handles = command_type
        return method

    return mark


@functools.cache
def handlers(cls: type) -> dict[type, str]:
    """Command type -> the name of the method of ``cls`` (a :class:`ClientApp`) that carries it out."""
    return {m.handles: name for klass in reversed(cls.__mro__) for name, m in vars(klass).items()
            if callable(m) and hasattr(m, "handles")}


class ClientApp:
    def __init__(self, name: str, index: int, part: nn.Module, items: list[Encoded], cfg: RunConfig,
                 whole: bool, pad_id: int, num_blocks: int):
        self.name, self.index, self.cfg = name, index, cfg
        self.part = part
        self.whole = whole
        self.items, self.pad_id = items, pad_id
        self.num_samples = len(items)
        self.device = next(part.parameters()).device
        self.dtype = compute_dtype(part)  # what a hidden state received is computed in
        self.cut = None if whole else cfg.cut_layer
        self.tail_start = num_blocks - cfg.tail_layers if (cfg.u_shape and not whole) else None
        self.stream = self._stream()
        self.batches = 0  # batches drawn so far
        self.optimizer = Optimizer(part, cfg, cfg.steps)
        self.rng = PartyRng(party_seed(cfg.seed, f"client:{index}"), self.device)
        self.protect = DEFENCES[cfg.privacy.defence](cfg.privacy, party_seed(cfg.seed, f"noise:{index}"), self.device)
        p = cfg.privacy
        self.dp = DpSgd(part, party_bound(p.dp_clip_norm, split=not whole), p.dp_noise_multiplier * p.dp_clip_norm,
                        party_seed(cfg.seed, f"dp:{index}"), self.device) if p.dp_sgd else None
        self.snapshots: dict[int, dict] = {}  # batches drawn -> optimiser and RNG state at a round boundary
        self.finished: Finish | None = None
        self.hooks: list[Hook] = []
        self._open = None  # (step, batch, hidden, sent, embeddings) between Forward and Backward
        self._secure = None  # this round's SecAggClient

    def _stream(self):
        if self.cfg.privacy.dp_poisson:  # DP-SGD with amplification by subsampling (whole model only)
            from ..privacy.dpsgd import PoissonStream

            return PoissonStream(self.items, min(1.0, self.cfg.batch_size / len(self.items)), self.pad_id,
                                 party_seed(self.cfg.seed, f"poisson:{self.index}"))
        return BatchStream(self.items, self.cfg.batch_size, self.pad_id, seed=(self.cfg.seed, self.index))

    # ---- the one entry point ----------------------------------------------------------------------
    def handle(self, command):
        """Carry out ``command``; returns its reply (or None for a command that expects none)."""
        name = handlers(type(self)).get(type(command))
        if name is None:
            raise ProtocolError(f"unknown command {type(command).__name__}")
        with self.rng.active():
            return getattr(self, name)(command)

    def _observe(self, kind: str, step: int, shape: tuple, batch=None):
        if batch is None:
            return observe(self.hooks, Work(self.name, kind, step, shape))
        mask = batch["attention_mask"]
        return observe(self.hooks, Work(self.name, kind, step, shape, input_tokens=int(mask.sum()),
                                        samples=mask.shape[0]))

    def _next_batch(self) -> dict[str, torch.Tensor] | None:
        self.batches += 1
        batch = next(self.stream)
        return None if batch is None else to_device(batch, self.device)  # None: an empty Poisson batch

    # ---- split: bottom, tail ------------------------------------------------------------------------
    @handles(Forward)
    def _forward(self, cmd: Forward) -> Activations:
        if self.whole:
            raise ProtocolError("Forward sent to a client that holds the whole model")
        batch = self._next_batch()
        with self._observe("fwd", cmd.step, tuple(batch["input_ids"].shape), batch):
            self.part.train()
            embeds = None
            if self.cfg.privacy.nopeek_weight:
                embeds = self._input_embeddings(batch["input_ids"]).detach()
            hidden = client_forward(self.part, batch["input_ids"], batch["attention_mask"], cut=self.cut)
            sent = self.protect.clip(hidden)  # in the graph: the gradient flows back through the clipping
            out = self.protect.noise(sent.detach())
        self._open = (cmd.step, batch, hidden, sent, embeds)
        labels = None if self.tail_start is not None else batch["labels"]
        return Activations(cmd.step, out, batch["attention_mask"], labels)

    @handles(Tail)
    def _tail(self, cmd: Tail) -> TailGrad:
        step, batch, *_ = self._expect(cmd.step, "Tail")
        if self.tail_start is None:
            raise ProtocolError("Tail sent to a client with a two-part split")
        with self._observe("tail", cmd.step, tuple(cmd.hidden.shape)):
            hidden = cmd.hidden.to(self.device, self.dtype).requires_grad_(True)
            logits = tail_forward(self.part, hidden, batch["attention_mask"], self.tail_start)
            tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
            # This batch's mean loss, as `cen` computes it; a batched server step re-weights it by
            # its share of the step's tokens (Backward.scale).
            loss = ForCausalLMLoss(logits, batch["labels"], logits.shape[-1])
            scale = self.optimizer.loss_scale
            self.optimizer.scale(loss).backward()
            grad = self.protect.noise(self.protect.clip(self.optimizer.unscale(hidden.grad, scale)))
        return TailGrad(cmd.step, grad, float(loss.detach()), tokens)

    @handles(Backward)
    def _backward(self, cmd: Backward) -> None:
        step, batch, hidden, sent, embeds = self._expect(cmd.step, "Backward")
        if tuple(cmd.grad.shape) != tuple(sent.shape):
            raise ProtocolError(f"gradient of shape {list(cmd.grad.shape)} for activations {list(sent.shape)}")
        with self._observe("bwd", cmd.step, tuple(cmd.grad.shape)):
            if cmd.scale != 1.0:  # U-shape, batched: this batch's share of the server step's loss
                for p in self.optimizer.params:
                    if p.grad is not None:
                        p.grad.mul_(cmd.scale)
            tensors, grads = [sent], [self.optimizer.scale(cmd.grad.to(sent.device), sent.dtype)]
            if embeds is not None:
                tensors.append(self.cfg.privacy.nopeek_weight * nopeek_loss(embeds, hidden, batch["attention_mask"],
                                                                            self.protect.generator))
                grads.append(self.optimizer.scale(torch.ones((), device=sent.device), tensors[-1].dtype))
            torch.autograd.backward(tensors, grads)
            self._open = None
            if self.dp is not None:  # the server sent d(sum of per-example losses)/dh: per-example grads here
                self.dp.privatise()
            self._optimizer_step()

    def _expect(self, step: int, what: str):
        if self._open is None or self._open[0] != step:
            have = "none" if self._open is None else self._open[0]
            raise ProtocolError(f"{what} for step {step}, but the open step is {have}")
        return self._open

    def _input_embeddings(self, input_ids):
        from ..models.split import architecture_of

        return self.part.get_submodule(architecture_of(self.part).embed)(input_ids)

    def _optimizer_step(self) -> None:
        if not self.optimizer.grads_ok():
            # Gradients this client computed itself from bounded inputs; never step on non-finite ones.
            self.optimizer.zero_grad()
            if self.dp is not None:
                self.dp.reset(activations=True)
            raise ProtocolError("non-finite gradient: step not applied")
        self.optimizer.step()

    # ---- whole model: fed, cen ----------------------------------------------------------------------
    @handles(LocalStep)
    def _local_step(self, cmd: LocalStep) -> StepDone:
        if not self.whole:
            raise ProtocolError("LocalStep sent to a client that holds only its side of the cut")
        batch = self._next_batch()
        if batch is None:  # Poisson sampling drew no record: the step is noise alone (and still counts)
            self.dp.privatise(self.cfg.batch_size)
            self._optimizer_step()
            return StepDone(cmd.step, 0.0, 0)
        with self._observe("whole", cmd.step, tuple(batch["input_ids"].shape), batch):
            self.part.train()
            if self.dp is None:
                loss = self.part(**batch).loss  # transformers' own forward and loss
                self.optimizer.scale(loss).backward()
            else:  # DP-SGD: the sum of per-example losses, each example's gradient clipped and noised
                logits = self.part(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                losses, _ = per_example_losses(logits, batch["labels"])
                losses.sum().backward()
                self.dp.privatise(self.cfg.batch_size if self.cfg.privacy.dp_poisson else None)
                loss = ForCausalLMLoss(logits.detach(), batch["labels"], logits.shape[-1])  # reported as without DP
            self._optimizer_step()
        return StepDone(cmd.step, float(loss.detach()), int((batch["labels"][:, 1:] != IGNORE).sum()))

    # ---- adapters -----------------------------------------------------------------------------------
    @handles(Upload)
    def _upload(self, cmd: Upload) -> AdapterUpdate:
        # A round boundary: remember where we are, to come back here if the server resumes here.
        self.snapshots[self.batches] = self._snapshot()
        return AdapterUpdate(cmd.round, lora_state(self.part), self.num_samples)

    @handles(SecAgg)
    def _secagg(self, cmd: SecAgg) -> SecAggReply:
        """Secure aggregation: this client's side of one stage; its adapter leaves only masked."""
        import struct

        import numpy as np

        from ..privacy import secagg

        try:
            if cmd.stage == "keys":
                params = secagg.unpack_params(cmd.data)
                if params.round != cmd.round or self.index not in params.clients:
                    raise secagg.SecAggError("round parameters for another round or without this client")
                self._secure = secagg.SecAggClient(self.index, params)
                out = self._secure.advertise()
                data = out.c_public + out.s_public
            elif self._secure is None or self._secure.p.round != cmd.round:
                raise secagg.SecAggError(f"stage {cmd.stage!r} of round {cmd.round} before its keys")
            elif cmd.stage == "share":
                data = secagg.pack_blobs(self._secure.share(secagg.unpack_keys(cmd.data)))
            elif cmd.stage == "mask":
                self.snapshots[self.batches] = self._snapshot()  # a round boundary, as for Upload
                state = lora_state(self.part)
                flat = np.concatenate([state[k].double().flatten().numpy() for k in sorted(state)])
                weight = min(self.num_samples, self._secure.p.max_weight)
                data = secagg.pack_vector(self._secure.masked_input(secagg.unpack_blobs(cmd.data), flat, weight))
            elif cmd.stage == "unmask":
                data = secagg.pack_unmasking(self._secure.unmask(*secagg.unpack_roster(cmd.data)))
            else:
                raise secagg.SecAggError(f"unknown stage {cmd.stage!r}")
        except (secagg.SecAggError, struct.error, ValueError) as exc:
            raise ProtocolError(f"secure aggregation: {exc}") from None
        return SecAggReply(cmd.round, cmd.stage, data)

    @handles(Load)
    def _load(self, cmd: Load) -> None:
        if cmd.state is not None:  # None: the round was not aggregated; keep the local adapter
            load_lora_state(self.part, cmd.state)
        for b in [b for b in self.snapshots if b < cmd.keep_from]:
            del self.snapshots[b]

    @handles(HandOut)
    def _hand_out(self, cmd: HandOut) -> Handover:
        # The end of an sl turn, a point the server may resume at. The moments leave with the hand-over
        # and a HandIn brings them back, so the snapshot keeps the rest (RNG, loss scale) and stays small.
        self.snapshots[self.batches] = self._snapshot(moments=False)
        exp_avg, exp_avg_sq = self.optimizer.moments()
        return Handover(lora_state(self.part), exp_avg, exp_avg_sq, self.optimizer.steps)

    @handles(HandIn)
    def _hand_in(self, cmd: HandIn) -> None:
        self._take(cmd.handover)

    def _take(self, h: Handover) -> None:
        load_lora_state(self.part, h.state)
        self.optimizer.load_moments(h.exp_avg, h.exp_avg_sq, h.opt_steps)

    # ---- joining, rejoining, leaving ----------------------------------------------------------------
    @handles(Sync)
    def _sync(self, cmd: Sync) -> None:
        """Line up with the run. Behind: skip the batches missed (the schedule follows). Ahead (the
        server went back to a checkpoint): rewind to the snapshot taken at that round boundary."""
        self._open = None
        self.optimizer.zero_grad()
        if self.dp is not None:
            self.dp.reset(activations=True)
        if cmd.batches < self.batches:
            self.stream, self.batches = self._stream(), 0
            snap = self.snapshots.get(cmd.batches)
            if snap is not None:
                self._restore(snap)
            else:  # nothing kept for that point: fresh moments, the schedule where the run is
                self.optimizer.restart_at(cmd.batches)
            self.snapshots = {b: s for b, s in self.snapshots.items() if b <= cmd.batches}
        else:
            self.optimizer.advance(cmd.batches - self.batches)
        for _ in range(cmd.batches - self.batches):
            next(self.stream)
        self.batches = cmd.batches
        if cmd.handover is not None:
            self._take(cmd.handover)
        elif cmd.state is not None:
            load_lora_state(self.part, cmd.state)
        self.snapshots.setdefault(self.batches, self._snapshot())

    def _snapshot(self, moments: bool = True) -> dict:
        state = self.optimizer.state_dict()
        if not moments:
            state = {k: v for k, v in state.items() if k not in ("opt", "sched")}
        snap = {"optimizer": copy.deepcopy(state), "rng": self.rng.state_dict()}
        if self.dp is not None:
            snap["dp"] = self.dp.state_dict()
        return snap

    def _restore(self, snap: dict) -> None:
        self.optimizer.load_state_dict(snap["optimizer"])
        self.rng.load_state_dict(snap["rng"])
        if self.dp is not None and "dp" in snap:
            self.dp.load_state_dict(snap["dp"])

    @handles(Finish)
    def _finish(self, cmd: Finish) -> None:
        self.finished = cmd

    # ---- what others may read -------------------------------------------------------------------------
    def lora_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.part)

    @property
    def open_shape(self) -> tuple[int, ...] | None:
        """(B, T, H) of the batch sent and not yet answered with a gradient (None: no such batch)."""
        return tuple(self._open[3].shape) if self._open is not None else None
