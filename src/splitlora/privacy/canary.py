"""The canary audit of the released adapter (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A few random secrets ("canaries": a made-up record number) are inserted, each ``repeats`` times, into
one site's training data; the config is trained in process as usual; then every canary is scored under
the *released* adapter (the one a run saves) against ``candidates`` random secrets of the same format
that were never trained on. The score is the completion's log-likelihood given the prefix. A canary
the model memorised ranks first; one it did not ranks anywhere.

* **rank**: 1 + the number of candidates scoring at least as high as the canary (1 = memorised).
* **exposure** (estimated from the sample, as Carlini et al. do): ``log2(candidates + 1) - log2(rank)``,
  between 0 and ``log2(candidates + 1)``; the secret space's own ``log2(10^digits)`` is the ceiling a
  full enumeration could reach.

Under DP-SGD with (epsilon, delta), a canary inserted ``r`` times cannot be ranked much above random:
the empirical check that the epsilon means something (Jagielski et al. 2020 turn such audits into a
lower bound on epsilon; this audit reports ranks and exposure only).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.batching import IGNORE, Encoded, collate


@dataclass
class CanaryOptions:
    canaries: int = 3
    digits: int = 6
    repeats: int = 4  # copies of each canary in the site's data
    candidates: int = 200  # random secrets each canary is ranked against
    site: int = 0  # the client whose data holds the canaries
    prefix: str = "The patient's record number is"
    seed: int = 4321


def secrets_of(opts: CanaryOptions, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("0123456789") for _ in range(opts.digits)) for _ in range(count)]


def encode_secret(tokenizer, prefix: str, secret: str, max_length: int) -> Encoded:
    """``prefix`` then the secret's digits, space separated (one token each in byte-level BPE
    vocabularies, so every candidate has the same length); loss on the digits only."""
    prompt = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    completion = tokenizer(" " + " ".join(secret), add_special_tokens=False)["input_ids"]
    ids = (prompt + completion)[:max_length]
    return Encoded(ids, ([IGNORE] * len(prompt) + completion)[:max_length])


@torch.no_grad()
def log_likelihoods(model, items: list[Encoded], pad_id: int, batch_size: int = 64) -> list[float]:
    """Sum of the log-probabilities of each item's labelled tokens."""
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size], pad_id)
        device = next(model.parameters()).device
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != IGNORE)
        out += [float(x) for x in picked.sum(1)]
    return out


def rank_and_exposure(canary_score: float, candidate_scores: list[float]) -> tuple[int, float]:
    rank = 1 + sum(1 for s in candidate_scores if s >= canary_score)
    return rank, math.log2(len(candidate_scores) + 1) - math.log2(rank)


def run_canary_audit(cfg: RunConfig, out_dir: str | Path, opts: CanaryOptions | None = None, loaded=None,
                     progress: bool = True) -> dict:
    """Insert the canaries into site ``opts.site``, train ``cfg``, rank the canaries under the released
    adapter. Writes ``OUT/canary.json`` and the run to ``OUT/run``."""
    from ..algorithms import ALGORITHMS
    from ..data import prepare_data
    from ..device import resolve_device
    from ..models.loading import load_model
    from ..models.precision import load_dtype
    from ..models.parts import SharedModel
    from ..privacy.accounting import dp_sgd_epsilons
    from ..runtime.client import ClientApp
    from ..simulation.inprocess import InProcessGrid
    from ..simulation.parties import run_training

    opts = opts or CanaryOptions()
    out = Path(out_dir)
    (out / "run").mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    source = SharedModel(loaded or load_model(cfg.model, load_dtype(cfg)), cfg, device)
    tok = source.tokenizer
    data = prepare_data(cfg, tok)
    secrets = secrets_of(opts, opts.canaries, opts.seed)
    planted = [encode_secret(tok, opts.prefix, s, cfg.max_length) for s in secrets]

    algo_cls = ALGORITHMS[cfg.algorithm]
    n = algo_cls.parties(cfg)
    if not 0 <= opts.site < n:
        from ..errors import UserError

        raise UserError(f"canary site {opts.site} is not a client of this run (0..{n - 1})")
    apps = []
    for i in range(n):
        items = list(algo_cls.party_items(data, i))
        if i == opts.site:
            items += planted * opts.repeats
        part = source.lora_part("whole" if algo_cls.whole_clients else "client", device=device)
        apps.append(ClientApp(str(i), i, part, items, cfg, algo_cls.whole_clients, source.pad_id, source.num_blocks))
    grid = InProcessGrid(apps, cfg.wire_dtype)
    algo = algo_cls(cfg, source, grid, device)
    run_training(cfg, out / "run", source, data, algo, progress=progress)

    released = source.lora_part("whole", state=algo.adapter_state(), device=device)
    others = secrets_of(opts, opts.candidates, opts.seed + 1)
    candidate_items = [encode_secret(tok, opts.prefix, s, cfg.max_length) for s in others]
    candidate_scores = log_likelihoods(released, candidate_items, source.pad_id)
    rows = []
    for secret, score in zip(secrets, log_likelihoods(released, planted, source.pad_id)):
        rank, exposure = rank_and_exposure(score, candidate_scores)
        rows.append({"canary": secret, "log_likelihood": score, "rank": rank, "exposure": exposure})
    epsilon = None
    if cfg.privacy.dp_sgd:
        epsilon = dp_sgd_epsilons(cfg, grid.clients, cfg.steps)
    result = {"config": {"algorithm": cfg.algorithm, "steps": cfg.steps, "dp_clip_norm": cfg.privacy.dp_clip_norm,
                         "dp_noise_multiplier": cfg.privacy.dp_noise_multiplier, "delta": cfg.privacy.delta},
              "options": asdict(opts), "epsilon_sites": epsilon, "canaries": rows,
              "mean_rank": sum(r["rank"] for r in rows) / len(rows),
              "mean_exposure": sum(r["exposure"] for r in rows) / len(rows),
              "max_exposure_possible": math.log2(opts.candidates + 1),
              "candidate_median_log_likelihood": sorted(candidate_scores)[len(candidate_scores) // 2]}
    (out / "canary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_canaries(result: dict) -> str:
    eps = result["epsilon_sites"]
    head = f"epsilon {max(eps.values()):.2f}" if eps else "no DP-SGD"
    ranks = ", ".join(f"{r['canary']}: rank {r['rank']}, exposure {r['exposure']:.2f}" for r in result["canaries"])
    return (f"canaries ({head}; {result['options']['candidates']} candidates, exposure at most "
            f"{result['max_exposure_possible']:.2f}): {ranks}")
