"""The leakage audit: attack what the server of a run actually received.

Threat model (DESIGN.md): the main server is honest but curious. It runs the protocol, and it knows
the public base weights, the tokenizer, the config (cut, tail, clipping and noise) and every message
it receives. It has its own public text, never the victims' data. The audit trains the user's config
in process, records the messages the server receives (spread over the run), and attacks them:

* **Input reconstruction from h_K** (every split): the attacker runs its own text through the
  *pretrained* bottom (with the same clipping and noise, drawn from its own generator) and fits
  - the **least-squares** baseline: a linear map from h_K to the input token's embedding, then the
    nearest token embedding (cosine);
  - a **learned inverter** (in the spirit of the split-LLM attacks, e.g. BiSR, arXiv 2409.00960): a
    two-layer MLP from each position's h_K to its token, trained with cross-entropy;
  and applies both to the activations the victims sent. Metrics: token accuracy over every real
  position (prompt and completion) and ROUGE-L F1 of the reconstructed text against the real text.
  The audit's number is the stronger of the two attacks.
* **Label reconstruction**: two-part split: the labels are in the message (token for token). U-shape:
  from the gradients dL/dh_(L-T) a client sends up, with the h_(L-T) the server sent down; the
  attacker simulates those gradients on its own text through the pretrained tail and learns a map
  from (gradient, hidden state) at a position to the next token.

Beside each attack: the utility of the same config (validation loss, and BLEU on E2E test MRs) and
the (epsilon, delta) of its noise (:mod:`splitlora.privacy.accounting`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..data.batching import IGNORE, BatchStream, collate, encode_all
from ..errors import UserError
from ..messages import Activations, Tail, TailGrad
from ..registry import ALGORITHMS
from ..models.split import client_forward, make_part, run_blocks, tail_forward
from .accounting import guarantee
from .defences import Protector


@dataclass
class AuditOptions:
    max_batches: int = 6  # per client, spread evenly over the run
    attacker_data: str | None = None  # E2E CSV/folder or "synthetic" (default: synthetic, another seed)
    attacker_examples: int = 1500  # for input reconstruction
    label_examples: int = 500  # for label reconstruction (needs the whole pretrained model per example)
    epochs: int = 4
    hidden: int = 1024  # of the learned attackers' MLP
    bleu_mrs: int = 100  # test MRs decoded for BLEU (0: skip)
    eval_data: str | None = None  # where the test MRs come from (default: as `splitlora eval` finds them)
    seed: int = 1234  # the attacker's own randomness


@dataclass
class Recorder:
    """A grid observer that keeps what the server receives (and the U-shape's h_(L-T) it sends)."""

    keep: set[int]  # which steps to keep
    ups: dict[str, list[Activations]] = field(default_factory=dict)
    tails: dict[str, dict[int, Tail]] = field(default_factory=dict)
    grads: dict[str, list[tuple[TailGrad, Tail]]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # Forward replies per client (batch index)
    batch_of: dict[tuple[str, int], int] = field(default_factory=dict)  # (client, step) -> batch index

    def __call__(self, direction: str, client: str, msg, nbytes: int) -> None:
        if direction == "up" and isinstance(msg, Activations):
            k = self.seen.get(client, 0)
            self.seen[client] = k + 1
            if msg.step in self.keep:
                self.batch_of[(client, msg.step)] = k
                self.ups.setdefault(client, []).append(_detach(msg))
        elif direction == "down" and isinstance(msg, Tail) and msg.step in self.keep:
            self.tails.setdefault(client, {})[msg.step] = _detach(msg)
        elif direction == "up" and isinstance(msg, TailGrad) and msg.step in self.keep:
            self.grads.setdefault(client, []).append((_detach(msg), self.tails[client][msg.step]))


def _detach(msg):
    import dataclasses

    return dataclasses.replace(msg, **{f.name: getattr(msg, f.name).detach().clone() for f in dataclasses.fields(msg)
                                       if isinstance(getattr(msg, f.name), torch.Tensor)})


# ---- the attacker's text and features ---------------------------------------------------------------

def attacker_examples(cfg: RunConfig, opts: AuditOptions, n: int):
    """The attacker's own public text: never the victims' (synthetic: another seed)."""
    from ..data.e2e import load_e2e, synthetic_e2e

    source = opts.attacker_data or "synthetic"
    if source == "synthetic":
        return synthetic_e2e(n, seed=cfg.seed + 7919)
    examples = load_e2e(source)
    if cfg.data != "synthetic" and Path(source).resolve() == Path(cfg.data).resolve():
        raise UserError("--attacker-data must not be the victims' training data")
    g = torch.Generator().manual_seed(opts.seed)
    picks = torch.randperm(len(examples), generator=g)[:n].tolist()
    return [examples[i] for i in sorted(picks)]


def _batches(items, batch_size: int, pad_id: int):
    for i in range(0, len(items), batch_size):
        yield collate(items[i:i + batch_size], pad_id)


@torch.no_grad()
def _bottom_features(model, cfg, items, pad_id, protect: Protector):
    """(h_K as the server would receive it, token ids) at every real position of ``items``."""
    part = make_part(model, "client", cfg.cut_layer).eval()
    hs, ids = [], []
    for b in _batches(items, 16, pad_id):
        h = protect.noise(protect.clip(client_forward(part, b["input_ids"], b["attention_mask"])))
        real = b["attention_mask"].bool()
        hs.append(h[real])
        ids.append(b["input_ids"][real])
    return torch.cat(hs), torch.cat(ids)


class _Inverter(nn.Module):
    def __init__(self, dim: int, hidden: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def _fit_classifier(x: torch.Tensor, y: torch.Tensor, opts: AuditOptions):
    """A two-layer MLP from rows of ``x`` to the tokens ``y`` (over the tokens ``y`` holds)."""
    vocab = torch.unique(y)
    index = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    target = index[y]
    g = torch.Generator().manual_seed(opts.seed)
    with torch.random.fork_rng():
        torch.manual_seed(opts.seed)
        net = _Inverter(x.shape[1], opts.hidden, len(vocab))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(opts.epochs):
        for rows in torch.randperm(len(x), generator=g).split(512):
            loss = F.cross_entropy(net(x[rows]), target[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    @torch.no_grad()
    def predict(z: torch.Tensor) -> torch.Tensor:
        return vocab[torch.cat([net(part).argmax(-1) for part in z.split(4096)])] if len(z) else z.new_zeros(0).long()

    return predict


def _fit_least_squares(h: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor):
    """The baseline: ridge regression from h_K to the input token's embedding, then the nearest token."""
    x = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    target = embeddings[ids].double()
    gram = x.T @ x
    gram += 1e-3 * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    w = torch.linalg.solve(gram, x.T @ target)
    table = F.normalize(embeddings.float(), dim=-1)

    @torch.no_grad()
    def predict(z: torch.Tensor) -> torch.Tensor:
        z = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], 1)
        guess = F.normalize((z @ w).float(), dim=-1)
        return torch.cat([(part @ table.T).argmax(-1) for part in guess.split(2048)]) if len(z) else z.new_zeros(0).long()

    return predict


# ---- the victims' ground truth ------------------------------------------------------------------------

def _truth(cfg: RunConfig, data, pad_id: int, recorder: Recorder) -> dict[tuple[str, int], dict]:
    """The batches the victims really trained on, replayed from their (seeded) data order."""
    out = {}
    for client in recorder.ups:
        index = int(client)
        items = ALGORITHMS[cfg.algorithm].party_items(data, index)
        stream = BatchStream(items, cfg.batch_size, pad_id, seed=(cfg.seed, index))
        wanted = {k: step for (c, step), k in recorder.batch_of.items() if c == client}
        for k in range(max(wanted) + 1):
            batch = next(stream)
            if k in wanted:
                out[(client, wanted[k])] = batch
    return out


def _token_scores(predict, recorder: Recorder, truth, tokenizer) -> dict:
    from ..eval.metrics import corpus_rouge_l

    right = total = right_completion = total_completion = 0
    hyps, refs = [], []
    for client, ups in recorder.ups.items():
        for a in ups:
            batch = truth[(client, a.step)]
            real = a.attention_mask.bool()
            guess = predict(a.hidden[real].float())
            true = batch["input_ids"][real]
            completion = (batch["labels"] != IGNORE)[real]
            right += int((guess == true).sum())
            total += len(true)
            right_completion += int(((guess == true) & completion).sum())
            total_completion += int(completion.sum())
            lengths = real.sum(1).tolist()
            for g, t in zip(guess.split(lengths), true.split(lengths)):
                hyps.append(" ".join(tokenizer.decode(g).split()) or "-")
                refs.append([" ".join(tokenizer.decode(t).split())])
    return {"token_accuracy": right / max(total, 1), "completion_token_accuracy": right_completion / max(total_completion, 1),
            "rouge_l": corpus_rouge_l(hyps, refs) if hyps else None, "tokens": total,
            "example": {"real": refs[0][0], "reconstructed": hyps[0]} if hyps else None}


def _two_part_labels(recorder: Recorder, truth) -> float:
    right = total = 0
    for client, ups in recorder.ups.items():
        for a in ups:
            true = truth[(client, a.step)]["labels"]
            mask = true != IGNORE
            right += int((a.labels[mask] == true[mask]).sum())
            total += int(mask.sum())
    return right / max(total, 1)


def _u_shape_label_attack(model, cfg, items, pad_id, protect, recorder, truth, opts) -> float:
    """Learn (dL/dh_(L-T) x tokens, h_(L-T)) -> next token on the attacker's own text through the
    pretrained tail, then apply it to the gradients the victims sent."""
    from ..models.split import num_blocks

    start = num_blocks(model) - cfg.tail_layers
    whole = make_part(model, "whole", cfg.cut_layer)
    feats, targets = [], []
    for b in _batches(items, 8, pad_id):
        with torch.no_grad():
            h = client_forward(make_part(model, "client", cfg.cut_layer), b["input_ids"], b["attention_mask"])
            mid = run_blocks(whole, h, b["attention_mask"], start=cfg.cut_layer, stop=start)
        mid = mid.detach().requires_grad_(True)
        logits = tail_forward(whole, mid, b["attention_mask"], start)
        from transformers.loss.loss_utils import ForCausalLMLoss

        ForCausalLMLoss(logits, b["labels"], logits.shape[-1]).backward()
        tokens = int((b["labels"][:, 1:] != IGNORE).sum())
        grad = protect.noise(protect.clip(mid.grad)) * tokens
        f, y = _label_features(grad, mid.detach(), b["labels"])
        feats.append(f)
        targets.append(y)
    predict = _fit_classifier(torch.cat(feats), torch.cat(targets), opts)
    right = total = 0
    for client, pairs in recorder.grads.items():
        for g, tail in pairs:
            labels = truth[(client, g.step)]["labels"]
            f, y = _label_features(g.grad * g.tokens, tail.hidden, labels)
            right += int((predict(f) == y).sum())
            total += len(y)
    return right / max(total, 1)


def _label_features(grad, hidden, labels):
    """Per position i with a label at i + 1: (gradient, normalised hidden state) -> that label."""
    nxt = labels[:, 1:]
    has = nxt != IGNORE
    g, h = grad[:, :-1][has], hidden[:, :-1][has]
    h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return torch.cat([g.float(), h.float()], -1), nxt[has]


# ---- the audit ------------------------------------------------------------------------------------------

def run_audit(cfg: RunConfig, out_dir: str | Path, opts: AuditOptions | None = None, loaded=None,
              progress: bool = True, log=print) -> dict:
    """Train ``cfg`` in process, attack what its server received, and write ``OUT/audit.json``."""
    from ..data import prepare_data
    from ..models.loading import load_model
    from ..simulation.run import train

    opts = opts or AuditOptions()
    out = Path(out_dir)
    if not ALGORITHMS[cfg.algorithm].sends_activations:
        raise UserError(f"{cfg.algorithm}: no activations leave a client (an aggregator sees LoRA updates, "
                        f"which this audit does not attack); audit an algorithm that splits the model")
    public = attacker_examples(cfg, opts, opts.attacker_examples)  # bad attacker data fails before training
    loaded = loaded or load_model(cfg.model)
    times = {}
    every = max(cfg.steps // max(opts.max_batches, 1), 1)
    recorder = Recorder(keep={min(s, cfg.steps - 1) for s in range(0, cfg.steps, every)})
    t0 = time.perf_counter()
    result = train(cfg, out / "run", progress=progress, loaded=loaded, observers=[recorder])
    times["train_s"] = time.perf_counter() - t0
    model, tok, pad_id = loaded.model, loaded.tokenizer, loaded.model.config.pad_token_id
    model.requires_grad_(False)
    data = prepare_data(cfg, tok)
    truth = _truth(cfg, data, pad_id, recorder)

    t0 = time.perf_counter()
    protect = Protector(cfg.privacy, opts.seed)  # the attacker simulates the public defence itself
    items = encode_all(public, tok, cfg.prompt_template, cfg.max_length)
    h, ids = _bottom_features(model, cfg, items, pad_id, protect)
    embeddings = model.get_input_embeddings().weight.detach()
    attacks = {"least_squares": _token_scores(_fit_least_squares(h, ids, embeddings), recorder, truth, tok),
               "learned": _token_scores(_fit_classifier(h, ids, opts), recorder, truth, tok)}
    best = max(attacks, key=lambda k: attacks[k]["token_accuracy"])
    times["input_attack_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.u_shape:
        label_items = items[:opts.label_examples]
        labels = _u_shape_label_attack(model, cfg, label_items, pad_id, protect, recorder, truth, opts)
        label_source = "gradients dL/dh_(L-T) (learned attack)"
    else:
        labels = _two_part_labels(recorder, truth)
        label_source = "the labels in the message"
    times["label_attack_s"] = time.perf_counter() - t0

    bleu = None
    if opts.bleu_mrs:
        from ..eval.generate import evaluate_run

        t0 = time.perf_counter()
        bleu = evaluate_run(out / "run", data=opts.eval_data, limit=opts.bleu_mrs, beams=1, progress=progress,
                            show=False)["bleu"]
        times["bleu_s"] = time.perf_counter() - t0
    sizes = [len(ix) for ix in data.client_indices]
    dp = guarantee(cfg, sizes)
    row = {
        "split": f"u-shape T={cfg.tail_layers}" if cfg.u_shape else "two-part", "cut_layer": cfg.cut_layer,
        "noise_multiplier": cfg.privacy.noise_multiplier, "clip_norm": cfg.privacy.clip_norm,
        "nopeek_weight": cfg.privacy.nopeek_weight,
        "token_accuracy": attacks[best]["token_accuracy"], "rouge_l": attacks[best]["rouge_l"],
        "completion_token_accuracy": attacks[best]["completion_token_accuracy"], "best_attack": best,
        "least_squares_token_accuracy": attacks["least_squares"]["token_accuracy"],
        "learned_token_accuracy": attacks["learned"]["token_accuracy"],
        "label_accuracy": labels, "label_source": label_source,
        "val_loss": result.val_loss, "bleu": bleu,
        "epsilon_token_release": dp.epsilon_token_release if dp else None,
        "epsilon_token_run": dp.epsilon_token_run if dp else None,
        "epsilon_example_run": dp.epsilon_example_run if dp else None,
        "delta": cfg.privacy.delta if dp else None, "releases": dp.releases if dp else None,
        "recorded_batches": sum(len(v) for v in recorder.ups.values()), "attacked_tokens": attacks[best]["tokens"],
        "attacker_examples": len(items), "attacker_data": opts.attacker_data or "synthetic",
        "example": attacks[best]["example"], "attacks": attacks, "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    (out / "audit.json").write_text(json.dumps(row, indent=2, default=_json) + "\n")
    return row


def _json(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def format_row(row: dict) -> str:
    eps = row["epsilon_token_run"]
    lines = [
        f"split {row['split']}, cut K={row['cut_layer']}, noise sigma={row['noise_multiplier']:g} "
        f"(clip C={row['clip_norm']:g}), NoPeek {row['nopeek_weight']:g}",
        f"  input tokens recovered from h_K:  {row['token_accuracy']:.1%} ({row['best_attack']}; least squares "
        f"{row['least_squares_token_accuracy']:.1%}, learned {row['learned_token_accuracy']:.1%}), "
        f"completion tokens {row['completion_token_accuracy']:.1%}, ROUGE-L {row['rouge_l']:.3f}",
        f"  labels recovered:                 {row['label_accuracy']:.1%} (from {row['label_source']})",
        f"  utility:                          val loss {row['val_loss']:.4f}" +
        (f", BLEU {row['bleu']:.4f}" if row["bleu"] is not None else ""),
        f"  guarantee:                        " + ("none (no noise)" if eps is None else
                                                  f"epsilon {row['epsilon_token_release']:.3g} per token per release, "
                                                  f"{eps:.3g} per token over the run's {row['releases']} releases, "
                                                  f"{row['epsilon_example_run']:.3g} per example "
                                                  f"(delta {row['delta']:g})"),
    ]
    if row.get("example"):
        lines.append(f"  e.g. real:          {row['example']['real'][:150]}")
        lines.append(f"       reconstructed: {row['example']['reconstructed'][:150]}")
    return "\n".join(lines)


__all__ = ["AuditOptions", "run_audit", "format_row", "Recorder"]
