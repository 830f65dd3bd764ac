"""Configuration: plain dataclasses, loaded from YAML, validated with one-line errors.

One dataclass per concept (as in PEFT): :class:`LoraSide` for an adapter, :class:`Privacy` for what
protects what leaves a client, :class:`Aggregation` for the robust FedAvg, :class:`RunConfig` for a
run, :class:`ServeOptions` / :class:`ClientOptions` for the two deployment commands and
:class:`RayOptions` for ``splitlora train --backend ray``. Every field
carries its help text in ``metadata["help"]`` (and, where it has one, its ``--flag``): the command
line, ``--help`` and the docs read them from here.

``splitlora train`` writes the resolved config to ``DIR/config.yaml``; ``splitlora serve -c`` reads
the same format.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .registry import AGGREGATORS, ALGORITHMS, DEFENCES

# The built-in algorithms and wire dtypes, known here without importing torch so that a config is checked
# before the heavy imports (the registries, ALGORITHMS and messages.WIRE_DTYPES, stay the authority).
BUILTIN_ALGORITHMS = ("splitlora", "sl", "fed", "cen")
WIRE_DTYPE_NAMES = ("fp32", "bf16", "fp16")
SERVER_MODES = ("sequential", "batched")
SPLIT_SHAPES = ("two-part", "u-shape")
OUTLIER_ACTIONS = ("reject", "clip")
# The fields a row may carry (data/rows.py maps a user's columns onto them; docs/data.md)
ROW_FIELDS = ("prompt", "completion", "messages", "text", "mr", "ref")
BACKENDS = ("inprocess", "ray")
# Precision of a party's frozen base and its compute (LoRA and its optimiser stay fp32), and its
# quantized-base options (models/precision.py maps them to torch and to a quantizer).
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
QUANTIZE = ("nf4", "int8")
# accelerate's named strategies for a device map (``server_device_map``)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# Client names: what a token file line and --client-id accept.
CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def option(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None, factory=None,
           group: str | None = None, choices: tuple | None = None):
    """A dataclass field with its help text (and command-line flag) attached.

    ``group``: the section of ``--help`` the flag is listed in (default: the one of its dataclass;
    RunConfig's own fields: see ``splitlora.flags.RUN_GROUPS``). ``choices``: the allowed values, shown
    in ``--help`` (``validate`` enforces them).
    """
    meta = {"help": help, **({"flag": flag} if flag else {}), **({"group": group} if group else {}),
            **({"choices": tuple(choices)} if choices else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def help_of(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


@dataclass
class LoraSide:
    """LoRA settings of one side of the cut."""

    rank: int = option(8, "LoRA rank r", flag="--rank")
    alpha: float = option(16.0, "LoRA scaling alpha (the update is scaled by alpha / rank)", flag="--alpha")
    dropout: float = option(0.0, "dropout on the LoRA input, in [0, 1)", flag="--lora-dropout")
    target_modules: list[str] | None = option(
        None, "module names to adapt (null: the family default, q_proj+v_proj or GPT-2's c_attn)")

    def validate(self, where: str) -> None:
        if self.rank < 1:
            raise UserError(f"{where}.rank must be >= 1 (got {self.rank})")
        if self.alpha <= 0:
            raise UserError(f"{where}.alpha must be > 0 (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{where}.dropout must be in [0, 1) (got {self.dropout})")
        if self.target_modules is not None and not self.target_modules:
            raise UserError(f"{where}.target_modules must be null or a non-empty list")


@dataclass
class Privacy:
    """What protects the tensors a client sends (all off by default; see docs/privacy.md)."""

    clip_norm: float = option(0.0, "clip every token's vector of every activation and gradient a client sends to "
                                   "this L2 norm C (0: no clipping)", flag="--clip-norm")
    noise_multiplier: float = option(0.0, "add Gaussian noise N(0, (sigma*C)^2) to every clipped value a client "
                                          "sends (sigma; needs clip_norm)", flag="--noise-multiplier")
    delta: float = option(1e-5, "delta of the reported (epsilon, delta) guarantee")
    defence: str = option("clip-noise", "the client-side defence that clip_norm and noise_multiplier configure, or a "
                                        "registered one (splitlora.register_defence)")
    nopeek_weight: float = option(0.0, "weight of NoPeek's distance-correlation loss between a client's input "
                                       "embeddings and the activations it sends (0: off)", flag="--nopeek")

    # Record-level DP-SGD of the released adapter (privacy/dpsgd.py; accountant: privacy/accounting.py).
    dp_clip_norm: float = option(0.0, "DP-SGD: clip each example's gradient of the adapter to this L2 norm "
                                      "(split: C/sqrt(2) on each side of the cut; 0: off)", flag="--dp-clip")
    dp_noise_multiplier: float = option(0.0, "DP-SGD: Gaussian noise N(0, (sigma*C)^2) on every LoRA gradient "
                                             "coordinate, from each party's own generator (sigma)", flag="--dp-noise")
    dp_poisson: bool = option(False, "DP-SGD: Poisson-sample each batch (every record with probability "
                                     "batch_size / site size) so that epsilon is amplified by subsampling "
                                     "(fed, cen)", flag="--dp-poisson")

    # Secure aggregation of client adapters (privacy/secagg.py): the aggregator sees only their sum.
    secure_aggregation: bool = option(False, "SecAgg: clients mask their adapters so that the aggregator learns only "
                                             "the weighted sum (fed, splitlora; robust outlier rules are off)",
                                      flag="--secure-aggregation")
    secagg_clip: float = option(1.0, "secure aggregation: each adapter value is clipped to [-clip, clip], the range "
                                     "of its fixed-point encoding")
    secagg_threshold: int = option(0, "secure aggregation: shares that reconstruct a secret; the round survives "
                                      "clients - threshold drops (0: a majority)")

    @property
    def dp_sgd(self) -> bool:
        return self.dp_clip_norm > 0

    def validate(self) -> None:
        DEFENCES.check(self.defence, "privacy.defence")
        if self.dp_clip_norm < 0 or self.dp_noise_multiplier < 0:
            raise UserError("privacy.dp_clip_norm and dp_noise_multiplier must be >= 0")
        if self.dp_noise_multiplier > 0 and self.dp_clip_norm == 0:
            raise UserError("privacy.dp_noise_multiplier needs privacy.dp_clip_norm > 0 (noise is scaled by it)")
        if self.clip_norm < 0 or self.noise_multiplier < 0 or self.nopeek_weight < 0:
            raise UserError("privacy.clip_norm, noise_multiplier and nopeek_weight must be >= 0")
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise UserError("privacy.noise_multiplier needs privacy.clip_norm > 0 (noise is scaled by the clip norm)")
        if not 0 < self.delta < 1:
            raise UserError(f"privacy.delta must be in (0, 1) (got {self.delta})")


@dataclass
class Aggregation:
    """Robust FedAvg: bounds that one client's upload cannot pass (the same in simulation and deployment)."""

    # ---- bounded influence (runtime/aggregator.py; docs/deployment.md, What the server checks) ----
    rule: str = option("fedavg", "aggregation rule: fedavg (weighted, norm-bounded), median, trimmed-mean, krum, "
                                 "multi-krum or bulyan (equal weights; see docs/deployment.md for the attackers "
                                 "each tolerates), or one registered with splitlora.register_aggregator",
                       flag="--aggregation")
    max_update_ratio: float = option(
        1.5, "an upload whose change from the current average has an L2 norm above this many times the "
             "reference (the round's lower-median change, capped by max_norm_growth) is an outlier (0: no bound)")
    max_norm_growth: float = option(
        4.0, "the reference may grow at most this many times from one round to the next (0: no cap)")
    max_update_norm: float = option(0.0, "a fixed L2 bound on every upload's change (0: none)",
                                    flag="--max-update-norm")
    outliers: str = option("clip", "what happens to an outlier: clip (its change scaled down to the bound) or "
                                   "reject (left out of the average)", choices=OUTLIER_ACTIONS)
    max_weight_ratio: float = option(
        1.5, "fedavg: a client's weight counts at most this many times the round's lower-median declared "
             "sample count (0: no cap)", flag="--max-weight-ratio")
    trim_fraction: float = option(0.2, "trimmed-mean: the fraction of values cut at each end of every coordinate")
    byzantine: int = option(1, "krum, multi-krum, bulyan: the attackers f the rule assumes (lowered to what "
                               "the round's uploads allow)", flag="--byzantine")
    tail_grad_ratio: float = option(
        2.0, "U-shape: a client's tail gradient whose norm is above this many times the lower median of the "
             "other clients' in the step and the recent steps' is scaled down to it (0: off)")
    max_samples_per_client: int = option(
        100_000, "the most samples a client's FedAvg weight counts (a larger declared count is capped and logged)",
        flag="--max-samples-per-client")
    max_abs_value: float = option(
        0.0, "largest magnitude accepted in any activation, gradient or adapter value a party receives "
             "(0: derived from the model, sqrt(float32 max / hidden size) / 1024, so that no sum of squares "
             "over a token can overflow)")

    def validate(self) -> None:
        AGGREGATORS.check(self.rule, "aggregation.rule")
        if self.max_update_ratio < 0:
            raise UserError(f"aggregation.max_update_ratio must be >= 0 (got {self.max_update_ratio})")
        for name in ("max_norm_growth", "max_update_norm", "max_weight_ratio", "tail_grad_ratio"):
            if getattr(self, name) < 0:
                raise UserError(f"aggregation.{name} must be >= 0 (got {getattr(self, name)})")
        if self.max_weight_ratio and self.max_weight_ratio < 1:
            raise UserError(f"aggregation.max_weight_ratio must be 0 or >= 1 (got {self.max_weight_ratio})")
        if not 0 <= self.trim_fraction < 0.5:
            raise UserError(f"aggregation.trim_fraction must be in [0, 0.5) (got {self.trim_fraction})")
        if self.byzantine < 0:
            raise UserError(f"aggregation.byzantine must be >= 0 (got {self.byzantine})")
        if self.outliers not in OUTLIER_ACTIONS:
            raise UserError(f"aggregation.outliers must be one of {', '.join(OUTLIER_ACTIONS)} (got {self.outliers!r})")
        if self.max_samples_per_client < 1:
            raise UserError("aggregation.max_samples_per_client must be >= 1")
        if self.max_abs_value < 0:
            raise UserError("aggregation.max_abs_value must be >= 0")

    def value_bound(self, hidden_size: int) -> float:
        if self.max_abs_value:
            return self.max_abs_value
        return math.sqrt(3.4028234663852886e38 / hidden_size) / 1024


@dataclass
class DataFormat:
    """How the rows of ``data`` are read (see docs/data.md). In a YAML config, ``data:`` may also be a
    block holding these keys and ``path``."""

    columns: str = option("", "column mapping NAME=COLUMN,... onto prompt, completion, messages, text, mr, "
                              "ref (e.g. prompt=question,completion=answer); empty: detected from the columns",
                          flag="--columns")
    chat_template: str = option("", "a Jinja chat template, or a file holding one (read into the config), for "
                                    "`messages` rows; empty: the tokenizer's own", flag="--chat-template")
    val_data: str = option("", "validation rows (any format --data takes); empty: val_fraction of --data",
                           flag="--val-data")

    def validate(self) -> None:
        if self.chat_template and "{" not in self.chat_template:
            path = Path(self.chat_template).expanduser()
            if not path.is_file():
                raise UserError(f"chat template file not found: {self.chat_template}")
            try:
                self.chat_template = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"chat template file {path}: cannot read it as UTF-8 text ({exc})") from None
        parse_columns(self.columns)


@dataclass
class RunConfig:
    """Everything that defines a run. Defaults are the default job (``splitlora train``)."""

    algorithm: str = option("splitlora", "splitlora (the paper's), sl (split learning), fed (FedLoRA) or cen "
                                         "(centralised); see the README's Algorithms", flag="--algorithm",
                            choices=BUILTIN_ALGORITHMS)
    model: str = option("smollm2-135m", "a preset (smollm2-135m, tiny-gpt2, tiny-llama, gpt2-small, gpt2-medium), "
                                        "a local model directory, a .gguf file or a hub id", flag="--model")
    data: str = option("synthetic", "synthetic, a .jsonl/.json/.csv/.parquet file, a folder of them, a "
                                    "save_to_disk folder or a hub id (online only); rows: prompt/completion, "
                                    "messages, text or E2E mr/ref", flag="--data")
    data_format: DataFormat = option(help="columns, chat template and validation data", factory=DataFormat)
    synthetic_examples: int = option(600, "rows of the synthetic data set")
    val_fraction: float = option(0.05, "fraction of prompts (E2E: MRs) held out for the validation loss")
    max_length: int = option(128, "tokens per example (prompt + completion), longer ones are cut",
                             flag="--max-length")
    prompt_template: str = option("{mr}\nDescription:", "the prompt; {mr} is the meaning representation")
    clients: int = option(3, "number of clients (data owners)", flag="--clients")
    cut_layer: int = option(2, "K: the client runs the embeddings and blocks 0..K-1", flag="--cut-layer")
    split_shape: str = option("two-part", "two-part (the paper's: the server runs blocks K.. and the head, and "
                                          "receives the labels) or u-shape (the client also runs the last "
                                          "tail_layers blocks, the norm and the head: labels stay home)",
                              flag="--split-shape", choices=SPLIT_SHAPES)
    tail_layers: int = option(1, "T, with split_shape u-shape: the client also runs blocks L-T..L-1 (T >= 0)",
                              flag="--tail-layers")
    partition: str = option("iid", "how the training data is split over clients: iid, contiguous or "
                                   "dirichlet:ALPHA (non-IID by partition_key), column:NAME (one client per "
                                   "value) or files (a folder: one client per file)", flag="--partition")
    partition_key: str = option("eatType", "the column (E2E: the MR slot) that dirichlet partitions by")
    steps: int = option(40, "engine steps (one local step of every client; sl: of the active client)",
                        flag="--steps")
    batch_size: int = option(8, "examples per client batch", flag="--batch-size")
    lr: float = option(2e-3, "peak learning rate (AdamW, linear warm-up and decay)", flag="--lr")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int = option(5, "learning-rate warm-up steps")
    max_grad_norm: float = option(0.0, "clip each party's LoRA gradient to this norm (0: no clipping)")
    aggregate_every: int = option(5, "I: local steps between FedAvg rounds (sl: steps per client turn)",
                                  flag="--aggregate-every")
    # ---- client sampling (splitlora, fed) ----
    clients_per_round: int = option(0, "splitlora, fed: a seeded sample of this many clients takes part in each "
                                       "round of I steps (0: all)", flag="--clients-per-round")
    server_mode: str = option("sequential", "splitlora: sequential (one server step per client batch, the "
                                            "paper's code) or batched (one server step over all clients' batches)",
                              flag="--server-mode", choices=SERVER_MODES)
    wire_dtype: str = option("fp32", "dtype of activations and gradients crossing the cut", flag="--wire-dtype",
                             choices=WIRE_DTYPE_NAMES)
    client_lora: LoraSide = option(help="LoRA of the client side", factory=LoraSide)
    server_lora: LoraSide = option(help="LoRA of the server side", factory=LoraSide)
    privacy: Privacy = option(help="protection of what leaves a client", factory=Privacy)
    aggregation: Aggregation = option(help="robust aggregation and value bounds", factory=Aggregation)
    seed: int = option(0, "seed of everything random (data order, LoRA init, dropout, noise)", flag="--seed")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto", flag="--device")
    server_device_map: str | None = option(
        None, "place the server's blocks across devices with accelerate: auto, balanced, balanced_low_0 or "
              "sequential (accelerate's strategies over the visible GPUs), or MODULE=DEVICE,... pairs "
              "(e.g. transformer.h.2=cuda:0,transformer.h.3=cuda:1,...); null: all on `device`",
        flag="--server-device-map")
    log_every: int = option(1, "write a metrics row every N steps")
    eval_every: int = option(0, "validation loss every N steps (0: only at the end)", flag="--eval-every")
    save_every: int = option(0, "also save the adapter every N steps to DIR/adapters/step-N (0: only at the end)")
    threads: int = option(0, "torch threads per process (0: the cores that other work leaves free, i.e. cores "
                              "minus the 1-minute load average, at least 1, looked at before every step; pin N "
                              "for bit-for-bit reruns)", flag="--threads")
    # ---- precision and memory of each party (models/precision.py) ----
    dtype: str = option("fp32", "dtype of the frozen base weights and the compute of the clients (and of the "
                                "whole model for fed/cen): fp32, bf16 or fp16 (fp16 with a loss scaler); LoRA "
                                "weights and optimiser state stay fp32", flag="--dtype")
    server_dtype: str | None = option(None, "the same for the main server's part (null: as dtype)",
                                      flag="--server-dtype")
    gradient_checkpointing: bool = option(False, "recompute each block's activations in backward instead of keeping "
                                                 "them (every party; less memory, ~1.3x time)",
                                          flag="--gradient-checkpointing")
    quantize: str | None = option(None, "quantize the clients' frozen linear layers: nf4 or int8 (bitsandbytes on "
                                        "CUDA; see docs/scaling.md for the CPU); null: off", flag="--quantize")
    server_quantize: str | None = option(None, "the same for the main server's part (null: off)",
                                         flag="--server-quantize")

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        ALGORITHMS.check(self.algorithm, "algorithm")
        for name, allowed in (("server_mode", SERVER_MODES), ("wire_dtype", WIRE_DTYPE_NAMES),
                              ("split_shape", SPLIT_SHAPES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        positive = ("clients", "steps", "batch_size", "aggregate_every", "max_length", "log_every",
                    "synthetic_examples")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.clients_per_round <= self.clients:
            raise UserError(f"clients_per_round must be between 0 (all) and clients={self.clients} "
                            f"(got {self.clients_per_round})")
        for name in ("warmup_steps", "eval_every", "save_every", "threads", "seed", "tail_layers"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.cut_layer < 1:
            raise UserError(f"cut_layer must be >= 1 (got {self.cut_layer})")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0 (got {self.lr})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.max_grad_norm < 0:
            raise UserError(f"max_grad_norm must be >= 0 (got {self.max_grad_norm})")
        parse_partition(self.partition)
        if "{mr}" not in self.prompt_template:
            raise UserError("prompt_template must contain {mr}")
        self.data_format.validate()
        if self.server_device_map is not None:
            parse_device_map(self.server_device_map)
        for name, allowed in (("dtype", COMPUTE_DTYPES), ("server_dtype", COMPUTE_DTYPES), ("quantize", QUANTIZE),
                              ("server_quantize", QUANTIZE)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        self.client_lora.validate("client_lora")
        self.server_lora.validate("server_lora")
        self.privacy.validate()
        # the algorithm's class (imports torch) only when a privacy option asks what it does
        algo = ALGORITHMS[self.algorithm] if self.privacy.secure_aggregation or self.privacy.dp_sgd else None
        if self.privacy.secure_aggregation and (not algo.averages_clients or self.clients < 2
                                                or self.privacy.secagg_clip <= 0 or self.privacy.secagg_threshold < 0
                                                or self.privacy.secagg_threshold > self.clients):
            raise UserError("privacy.secure_aggregation needs an algorithm that averages client adapters (fed, "
                            "splitlora), >= 2 clients, secagg_clip > 0 and 0 <= secagg_threshold <= clients")
        if self.privacy.dp_poisson and (not self.privacy.dp_sgd or not algo.whole_clients):
            raise UserError("privacy.dp_poisson needs DP-SGD (privacy.dp_clip_norm > 0) and an algorithm whose clients "
                            "hold the whole model (fed, cen): a split step cannot send an empty batch")
        if self.privacy.dp_sgd and self.u_shape and not algo.whole_clients:
            raise UserError("privacy.dp_clip_norm (DP-SGD) covers the two-part split, fed and cen; the U-shape is not supported")
        if self.privacy.dp_sgd and "fp16" in (self.dtype, self.server_dtype):
            raise UserError("privacy.dp_clip_norm (DP-SGD) clips true per-example gradients: use dtype bf16 or fp32, "
                            "not fp16 (its loss scaler scales them)")
        self.aggregation.validate()
        return self

    @property
    def u_shape(self) -> bool:
        return self.split_shape == "u-shape"

    @property
    def tail(self) -> int | None:
        """T when the split is U-shaped, else None (what :class:`splitlora.models.split.Split` takes)."""
        return self.tail_layers if self.u_shape else None

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        if isinstance(raw, dict) and isinstance(raw.get("data"), dict):  # a `data:` block
            block = dict(raw["data"])
            raw = {**raw, "data": block.pop("path", "synthetic"),
                   "data_format": {**(raw.get("data_format") or {}), **block}}
        return build_dataclass(cls, raw, "").validate()

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(read_yaml(path))

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """Apply ``{"dotted.key": value}`` overrides (values already parsed) and re-validate."""
        raw = self.to_dict()
        for key, value in overrides.items():
            node = raw
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise UserError(f"unknown config key {key!r}")
                node = node[part]
            if parts[-1] not in node:
                raise UserError(f"unknown config key {key!r}")
            node[parts[-1]] = value
        return RunConfig.from_dict(raw)


# ---- the deployment commands' options -----------------------------------------------------------

@dataclass
class ServeOptions:
    """``splitlora serve``: where and how the server listens, and how it treats its clients."""

    tokens: dict[str, str] = option(help="client name -> token (from --token-file)", factory=dict)
    listen: str = option("127.0.0.1:50051", "HOST:PORT to listen on (port 0: any free port)", flag="--listen")
    tls_cert: bytes | None = option(None, "PEM certificate; with --tls-key the server speaks TLS")
    tls_key: bytes | None = option(None, "PEM private key of --tls-cert")
    min_clients: int = option(1, "fewest clients a step or an aggregation goes ahead with", flag="--min-clients")
    client_timeout: float = option(120.0, "seconds a client may take to answer (its step, adapter or hand-over) "
                                          "before it is dropped", flag="--client-timeout")
    # Stragglers (transport/sessions.py): a deadline relative to how fast the other clients answer.
    straggler_factor: float = option(4.0, "a reply not there within straggler_floor + this many times the "
                                          "lower median of the other clients' recent answer times (of that "
                                          "command) drops its client (it may rejoin at the next round boundary; "
                                          "0: only --client-timeout)", flag="--straggler-factor")
    straggler_floor: float = option(5.0, "seconds added to the relative deadline (so honest jitter is never late)",
                                    flag="--straggler-floor")
    read_timeout: float = option(30.0, "seconds a client may take to send one message once it started; a slower "
                                       "stream is cut and its client dropped", flag="--read-timeout")
    join_timeout: float | None = option(None, "give up when too few clients have joined after S seconds "
                                              "(default: wait)", flag="--join-timeout")
    poll_interval: float = option(20.0, "seconds a waiting client's call is held before it is told to call again",
                                  flag="--poll-interval")
    linger: float = option(10.0, "seconds the server keeps telling late clients that the run is over",
                           flag="--linger")
    checkpoint_every: int = option(0, "checkpoint after the round that completes N more steps (0: every round)",
                                   flag="--checkpoint-every")
    resume: bool = option(False, "continue from DIR/checkpoint after a crash or a stop", flag="--resume")
    max_message_bytes: int = option(512 << 20, "refuse larger messages (they are also checked against the sizes "
                                               "the config implies)")
    calls_per_client: int = option(2, "concurrent calls one client may hold open (more are refused)")
    progress: bool = option(True, "show a progress bar")
    handle_signals: bool = option(True, "SIGINT/SIGTERM stop at the end of the round (main thread only)")

    def validate(self, cfg: RunConfig) -> "ServeOptions":
        if not 1 <= self.min_clients <= cfg.clients:
            raise UserError(f"--min-clients must be between 1 and clients={cfg.clients} (got {self.min_clients})")
        if len(self.tokens) < cfg.clients:
            raise UserError(f"the token file lists {len(self.tokens)} clients, the config needs {cfg.clients}")
        if self.straggler_factor < 0 or self.straggler_floor < 0:
            raise UserError("--straggler-factor and --straggler-floor must be >= 0")
        for name in ("client_timeout", "read_timeout", "poll_interval"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if self.linger < 0:
            raise UserError("--linger must be >= 0")
        if self.join_timeout is not None and self.join_timeout <= 0:
            raise UserError("--join-timeout must be > 0")
        if self.checkpoint_every < 0:
            raise UserError("--checkpoint-every must be >= 0")
        if self.calls_per_client < 2:
            raise UserError("calls_per_client must be >= 2 (one exchange and one hello or leave)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together")
        return self


@dataclass
class ClientOptions:
    """``splitlora client``: one data owner joining a served run."""

    server: str = option(help="HOST:PORT of the server", flag="--server")
    client_id: str = option(help="this client's name in the server's token file", flag="--client-id")
    token: str = option(help="this client's token (from --token-file)")
    data: str = option(help="this client's rows, any format train's --data takes (.jsonl, .json, .csv, .parquet, "
                            "a folder of them or a save_to_disk folder): all of it is its training data",
                       flag="--data")
    tls_ca: bytes | None = option(None, "PEM of the CA that signed the server's certificate (enables TLS)")
    reconnect_timeout: float = option(300.0, "keep trying to reach the server for S seconds",
                                      flag="--reconnect-timeout")
    progress: bool = option(True, "show a progress bar")
    device: str | None = option(None, "cpu, cuda, cuda:N or auto (default: the run's device if this machine "
                                      "has it, else cpu)", flag="--device")


@dataclass
class RayOptions:
    """``splitlora train --backend ray``: the Ray cluster, and what each party reserves on it.

    Clients are long-lived Ray actors (several may share one actor and one copy of the base weights);
    the server (the algorithm, the loop, the outputs) is one more actor. Ray is for one trusted
    cluster: it pickles what it moves. Across organisations use ``serve``/``client`` (gRPC).
    """

    backend: str = option("inprocess", "inprocess (every party in this process; the default) or ray (clients "
                                       "as Ray actors, the server as one more; pip install 'splitlora[ray]')",
                          flag="--backend", choices=BACKENDS)
    address: str | None = option(None, "with --backend ray: the cluster to join, auto (the one `ray start` runs on "
                                       "this machine) or HOST:PORT (its head); default: start a local one",
                                 flag="--ray-address")
    actors: int = option(0, "with --backend ray: client actors; the clients are spread over them in index order, "
                            "those of one actor sharing one copy of the base weights (0: one per client, or as "
                            "many as the cluster holds; the other clients queue on them)",
                         flag="--ray-actors")
    client_cpus: float = option(1.0, "with --backend ray: CPUs each client actor reserves", flag="--client-cpus")
    client_gpus: float = option(0.0, "with --backend ray: GPUs each client actor reserves (fractions share one)",
                                flag="--client-gpus")
    server_cpus: float = option(1.0, "with --backend ray: CPUs the server actor reserves", flag="--server-cpus")
    server_gpus: float = option(0.0, "with --backend ray: GPUs the server actor reserves (with "
                                     "--server-device-map its blocks may span them)", flag="--server-gpus")
    timeout: float = option(600.0, "with --backend ray: seconds a client actor may take for one command before "
                                   "its clients are dropped", flag="--ray-timeout")
    num_cpus: int | None = option(None, "CPUs of the local cluster started when there is no --ray-address "
                                        "(default: Ray's, all of this machine's)")

    @property
    def ray(self) -> bool:
        return self.backend == "ray"

    def validate(self, cfg: RunConfig) -> "RayOptions":
        if self.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if not self.ray:
            default = RayOptions()
            changed = [f.metadata["flag"] for f in fields(self)
                       if f.name != "backend" and f.metadata.get("flag") and getattr(self, f.name) != getattr(default, f.name)]
            if changed:
                raise UserError(f"{changed[0]} needs --backend ray")
            return self
        if not 0 <= self.actors <= cfg.clients:
            raise UserError(f"--ray-actors must be between 0 (one per client) and {cfg.clients} (got {self.actors})")
        for name in ("client_cpus", "client_gpus", "server_cpus", "server_gpus"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.timeout <= 0:
            raise UserError(f"--ray-timeout must be > 0 (got {self.timeout})")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise UserError(f"num_cpus must be >= 1 (got {self.num_cpus})")
        if cfg.device.startswith("cuda"):
            for side in ("client", "server"):
                if getattr(self, f"{side}_gpus") == 0:
                    raise UserError(f"--device {cfg.device} with --backend ray needs --{side}-gpus > 0 (Ray hides the "
                                    f"GPUs from an actor that reserves none; --device auto uses a GPU where one is "
                                    f"reserved)")
        return self

    def clients_per_actor(self, n: int, actors: int | None = None) -> list[list[int]]:
        """Client indices of each actor: ``n`` clients over ``actors`` (default: ``self.actors``) actors, in
        index order."""
        k = min(actors or self.actors or n, n)
        return [list(range(n))[a * n // k:(a + 1) * n // k] for a in range(k)]


def parse_device_map(spec: str) -> str | dict[str, str]:
    """A named accelerate strategy, or ``MODULE=DEVICE,...`` as ``{module: device}``."""
    spec = spec.strip()
    if spec in DEVICE_MAP_STRATEGIES:
        return spec
    out = {}
    for item in (i.strip() for i in spec.split(",")):
        module, sep, device = item.partition("=")
        if not sep or not module.strip() or not device.strip():
            raise UserError(f"server_device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or MODULE=DEVICE,... "
                            f"pairs (got {spec!r:.80})")
        device = device.strip()
        if not re.fullmatch(r"cpu|cuda(:\d+)?|\d+", device):
            raise UserError(f"server_device_map: device must be cpu, cuda, cuda:N or N (got {device!r} for {module!r})")
        out[module.strip()] = int(device) if device.isdigit() else device
    return out


def parse_columns(spec: str) -> dict[str, str]:
    """``prompt=question,completion=answer`` -> ``{"prompt": "question", "completion": "answer"}``."""
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, column = (s.strip() for s in pair.partition("="))
        if not sep or not name or not column:
            raise UserError(f"columns: expected NAME=COLUMN pairs separated by commas (got {pair!r})")
        if name not in ROW_FIELDS:
            raise UserError(f"columns: {name!r} is not one of {', '.join(ROW_FIELDS)}")
        out[name] = column
    return out


def parse_partition(spec: str) -> tuple[str, float | None]:
    """``iid``, ``contiguous``, ``files``, ``column:NAME`` or ``dirichlet:ALPHA`` as ``(kind, alpha)``."""
    if spec in ("iid", "contiguous", "files"):
        return spec, None
    if spec.startswith("column:"):
        if not spec.split(":", 1)[1].strip():
            raise UserError("partition column:NAME needs a column name")
        return "column", None
    if spec.startswith("dirichlet:"):
        try:
            alpha = float(spec.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if alpha <= 0:
            raise UserError(f"partition dirichlet:ALPHA needs ALPHA > 0 (got {spec!r})")
        return "dirichlet", alpha
    raise UserError(f"partition must be iid, contiguous, dirichlet:ALPHA, column:NAME or files (got {spec!r})")


def check_client_name(name: str, where: str) -> str:
    if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
        raise UserError(f"{where}: a client name is 1 to 64 letters, digits, '.', '_' or '-' (got {name!r:.80})")
    return name


# ---- reading --------------------------------------------------------------------------------------

def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return raw


_ESCAPES = re.compile(r"\\(\\|n|t)")
_QUOTED = re.compile(r"""\A(?:'.*'|".*")\Z""", re.S)


def parse_value(text: str) -> Any:
    """One ``--set`` value. What is clearly a number, a boolean, null or a ``[list]`` is read as YAML;
    a quoted value is a YAML string; anything else stays the string typed, with ``\\n``, ``\\t`` and
    ``\\\\`` read as escapes, so that ``--set prompt_template='Q: {mr}\\nA:'`` is the template
    ``"Q: {mr}" + newline + "A:"`` (YAML would read ``{mr}`` as a mapping and fold the newline)."""
    stripped = text.strip()
    if _QUOTED.match(stripped) or stripped.startswith("[") or stripped.lower() in ("null", "~", "true", "false"):
        try:
            value = yaml.safe_load(stripped)
        except yaml.YAMLError:
            raise UserError(f"--set value {text!r:.80} is not valid YAML") from None
        if value is None or isinstance(value, (bool, str, list)):
            return value
    try:
        return int(stripped)
    except ValueError:
        pass
    try:
        value = float(stripped)
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    return _ESCAPES.sub(lambda m: {"\\": "\\", "n": "\n", "t": "\t"}[m.group(1)], text)


def split_set(items: list[str]) -> dict[str, str]:
    """``--set key=value`` items as ``{key: value text}``."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value (got {item!r})")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items (values: :func:`parse_value`)."""
    return {key: parse_value(value) for key, value in split_set(items).items()}


# ---- from a mapping (YAML, --set) to a dataclass ------------------------------------------------
# One converter for every dataclass a user fills in by name: the run config (YAML and train's --set) and
# the benchmarks' and experiments' settings (their --set). A value may be the parsed one (YAML, parse_value)
# or the text typed: each is converted to its field's type, and a bad key or value is one line naming it.

def build_dataclass(cls, raw: Any, prefix: str = "", kind: str = "config key"):
    """``cls`` from ``raw``, a mapping of its field names to values (nested dataclasses from nested
    mappings). ``prefix`` names where ``raw`` sits (``"client_lora."``); ``kind`` what a key is called in
    an error (``unknown config key 'client_lora.rnak'``)."""
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    return cls(**_converted(cls, raw, prefix, kind))


def replace_fields(obj, changes: dict[str, Any], prefix: str = "", kind: str = "setting"):
    """``obj`` (a dataclass instance) with ``changes`` converted as :func:`build_dataclass` converts them;
    lists may be typed comma-separated (``clients=1,4``; ``none``: an empty list)."""
    return dataclasses.replace(obj, **_converted(type(obj), changes, prefix, kind))


def _converted(cls, raw: dict[str, Any], prefix: str, kind: str) -> dict[str, Any]:
    import difflib

    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean {prefix + close[0]!r}?" if close else f"one of: {', '.join(known)}"
        raise UserError(f"unknown {kind} {prefix + unknown[0]!r} ({hint})")
    return {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}


_NONE_TEXT = ("null", "none", "~")
_BOOL_TEXT = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value if value is not None else {}, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (args[0] is not str and isinstance(value, str) and value.strip().lower() in _NONE_TEXT):
            return None
        return _coerce(args[0], value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if value is None:
            value = []
        if isinstance(value, str):  # typed: comma-separated, "none" for an empty list
            value = [] if value.strip().lower() in ("", "[]", *_NONE_TEXT) else \
                [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list (got {value!r})")
        return [_coerce(item, v, key) for v in value]
    if hint is bool:
        if isinstance(value, str):
            value = _BOOL_TEXT.get(value.strip().lower(), value)
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false (got {value!r})")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, str):  # typed, or YAML 1.1's reading of 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number (got {value!r})")
        if not math.isfinite(float(value)):
            raise UserError(f"{key} must be a finite number (got {value!r})")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{key} must be a string (got {value!r})")
        return str(value)
    return value
