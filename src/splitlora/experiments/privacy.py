"""Privacy: what each split configuration leaks to its server, beside what it costs in utility.

Every row is one ``splitlora audit`` (:mod:`splitlora.privacy.audit`): the config is trained on the
E2E training rows (``devset.csv``), the activations (and gradients) its server receives are recorded,
and an honest-but-curious server that knows the pretrained weights attacks them with its own public
text (the E2E test set's references: disjoint from the victims' data). Rows: the cut layer K without
noise, the U-shape, two noise levels, and NoPeek. Utility: the run's validation loss and BLEU on the
first ``bleu_mrs`` test MRs (greedy). Every row carries the ``splitlora audit`` command that reruns it.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..bench.common import BenchResult, Options, Table, apply_sets, log, pyplot, save_figure
from ..errors import UserError

NAME = "privacy"

# name -> config overrides of the row (on top of the shared settings)
ROWS = {
    "two-part K=1": {"cut_layer": 1},
    "two-part K=2": {"cut_layer": 2},
    "two-part K=4": {"cut_layer": 4},
    "u-shape K=2 T=1": {"cut_layer": 2, "split_shape": "u-shape", "tail_layers": 1},
    "two-part K=2 noise low": {"cut_layer": 2, "privacy.clip_norm": "clip", "privacy.noise_multiplier": "low"},
    "two-part K=2 noise high": {"cut_layer": 2, "privacy.clip_norm": "clip", "privacy.noise_multiplier": "high"},
    "u-shape K=2 T=1 noise low": {"cut_layer": 2, "split_shape": "u-shape", "tail_layers": 1,
                                  "privacy.clip_norm": "clip", "privacy.noise_multiplier": "low"},
    "two-part K=2 NoPeek": {"cut_layer": 2, "privacy.nopeek_weight": "nopeek"},
}


@dataclass
class Settings:
    model: str = "smollm2-135m"
    data: str = "../shared/data/e2e"
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    clients: int = 2
    steps: int = 30
    batch_size: int = 8
    max_length: int = 96
    lr: float = 2e-3
    aggregate_every: int = 5
    clip: float = 100.0  # C: per-token L2 clip of the noise rows (SmolLM2's tokens at K=2: norm ~84, at most ~240)
    low: float = 0.02  # sigma of the low-noise rows (noise std = sigma * C per coordinate)
    high: float = 0.1
    nopeek: float = 1.0
    max_batches: int = 6
    attacker_examples: int = 1500
    bleu_mrs: int = 100

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny-gpt2", data="synthetic", rows=["two-part K=2", "u-shape K=2 T=1 noise low"],
                   clients=2, steps=4, batch_size=4, max_length=64, max_batches=2, attacker_examples=120,
                   bleu_mrs=4)


def _row_config(s: Settings, name: str, data_file: str):
    from ..config import RunConfig

    values = {"clip": s.clip, "low": s.low, "high": s.high, "nopeek": s.nopeek}
    overrides = {k: values.get(v, v) if isinstance(v, str) else v for k, v in ROWS[name].items()}
    base = RunConfig(model=s.model, data=data_file, clients=s.clients, steps=s.steps, batch_size=s.batch_size,
                     max_length=s.max_length, lr=s.lr, aggregate_every=s.aggregate_every,
                     synthetic_examples=200).validate()
    return base.with_overrides(overrides), overrides


def run(opts: Options) -> BenchResult:
    from ..models.loading import load_model
    from ..privacy.audit import AuditOptions, run_audit

    s = apply_sets(Settings.quick() if opts.quick else Settings(), opts.sets, NAME)
    unknown = [r for r in s.rows if r not in ROWS]
    if unknown:
        raise UserError(f"privacy: unknown row {unknown[0]!r} (rows: {', '.join(ROWS)})")
    result = BenchResult(NAME, f"Privacy: what the server can reconstruct, and what protection costs ({s.model})",
                         asdict(s))
    if s.data == "synthetic":
        train_data, attacker, eval_data = "synthetic", "synthetic", None
    else:
        folder = Path(s.data)
        if not (folder / "devset.csv").is_file() or not (folder / "testset_w_refs.csv").is_file():
            if not opts.quick:
                result.skipped = f"E2E data not found in {folder} (devset.csv, testset_w_refs.csv)"
                return result
        train_data, attacker = str(folder / "devset.csv"), str(folder / "testset_w_refs.csv")
        eval_data = attacker
    loaded = load_model(s.model)
    rows = []
    for name in s.rows:
        cfg, overrides = _row_config(s, name, train_data)
        cfg = cfg.with_overrides({"threads": opts.threads, "device": opts.device})
        audit_opts = AuditOptions(max_batches=s.max_batches, attacker_data=attacker,
                                  attacker_examples=s.attacker_examples, bleu_mrs=s.bleu_mrs, eval_data=eval_data)
        out = opts.out / "privacy-runs" / name.replace(" ", "_").replace("=", "")
        row = run_audit(cfg, out, audit_opts, loaded=loaded, progress=False)
        row["row"] = name
        row["command"] = _audit_command(cfg, overrides, audit_opts, s)
        rows.append(row)
        if opts.progress:
            log(f"[privacy] {name}: tokens {row['token_accuracy']:.1%}, labels {row['label_accuracy']:.1%}, "
                f"val {row['val_loss']:.3f}, BLEU {row['bleu'] if row['bleu'] is not None else float('nan'):.3f}, "
                f"{sum(row['seconds'].values()):.0f}s")
    result.tables.append(Table("Leakage and utility per configuration", [
        ("row", "configuration", ""), ("token_accuracy", "input tokens recovered", ".1%"),
        ("least_squares_token_accuracy", "least squares", ".1%"), ("learned_token_accuracy", "learned", ".1%"),
        ("completion_token_accuracy", "completion tokens", ".1%"), ("rouge_l", "ROUGE-L", ".3f"),
        ("label_accuracy", "labels recovered", ".1%"), ("val_loss", "val loss", ".4f"), ("bleu", "BLEU", ".4f"),
        ("epsilon_token_release", "eps/token/release", ".3g"), ("epsilon_token_run", "eps/token/run", ".3g"),
        ("command", "command", "code")], [{k: v for k, v in r.items() if k not in ("attacks", "example")}
                                           for r in rows]))
    result.extra["examples"] = {r["row"]: r["example"] for r in rows}
    result.notes += [
        f"{s.model}, {s.clients} clients, {s.steps} steps of batch {s.batch_size} each, max_length {s.max_length}, "
        f"lr {s.lr}, FedAvg every {s.aggregate_every}; training data {train_data}; the attacker's text "
        f"{attacker} ({s.attacker_examples} examples, disjoint from the victims'); {s.max_batches} batches per "
        "client recorded, spread over the run; BLEU on the first "
        f"{s.bleu_mrs} test MRs, greedy.",
        "input tokens recovered: share of every real position (prompt and completion) whose token the stronger of "
        "the two attacks recovers from h_K; least squares = linear map to the input embedding + nearest token; "
        "learned = a two-layer MLP from h_K to the token. Both are fitted on the attacker's text through the "
        "pretrained bottom, with the same clipping and noise. Labels: two-part = read from the message; U-shape = "
        "learned from the gradients dL/dh_(L-T) and h_(L-T).",
        f"noise rows: every token's vector of every tensor a client sends clipped to C={s.clip:g}, plus "
        f"N(0, (sigma C)^2) noise with sigma {s.low:g} (low) or {s.high:g} (high); epsilon per token per release "
        "(replace-one adjacency) and composed over each example's releases in the run (RDP accountant).",
    ]
    result.plots.append(_plot(rows, opts))
    return result


def _audit_command(cfg, overrides: dict, audit_opts, s: Settings) -> str:
    parts = ["splitlora", "audit", "--model", cfg.model, "--data", cfg.data, "--clients", str(cfg.clients),
             "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--max-length", str(cfg.max_length),
             "--lr", str(cfg.lr), "--aggregate-every", str(cfg.aggregate_every)]
    for key, value in overrides.items():
        parts += ["--set", f"{key}={value}"]
    parts += ["--attacker-data", str(audit_opts.attacker_data), "--max-batches", str(audit_opts.max_batches),
              "--attacker-examples", str(audit_opts.attacker_examples), "--bleu-mrs", str(audit_opts.bleu_mrs)]
    if audit_opts.eval_data:
        parts += ["--eval-data", str(audit_opts.eval_data)]
    return shlex.join(parts)


def _plot(rows, opts: Options) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, (("val_loss", "validation loss (lower is better)"),
                                       ("bleu", "BLEU on test MRs (higher is better)"))):
        for r in rows:
            if r.get(key) is None:
                continue
            ax.scatter(r["token_accuracy"] * 100, r[key], s=30)
            ax.annotate(r["row"], (r["token_accuracy"] * 100, r[key]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("input tokens the server recovers (%)")
        ax.set_ylabel(label)
    fig.suptitle("privacy vs utility: each point one configuration")
    return save_figure(fig, opts, "privacy")
