"""Run configuration: plain dataclasses, loaded from YAML, validated with one-line errors.

One dataclass per concept (as in PEFT): :class:`LoraSide` for an adapter, :class:`RunConfig` for a
run. ``splitlora train`` writes the resolved config to ``DIR/config.yaml``; ``splitlora serve -c``
reads the same format.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

ALGORITHMS = ("splitlora", "sl", "fed", "cen")
SERVER_MODES = ("sequential", "batched")
WIRE_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class LoraSide:
    """LoRA settings of one side of the cut. ``target_modules=None`` takes the family default."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

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
class RunConfig:
    """Everything that defines a run. Defaults are the default job (``splitlora train``)."""

    algorithm: str = "splitlora"
    model: str = "smollm2-135m"
    data: str = "synthetic"  # "synthetic", an E2E CSV file, or a folder of them
    synthetic_examples: int = 600
    val_fraction: float = 0.05
    max_length: int = 128
    prompt_template: str = "{mr}\nDescription:"
    clients: int = 3
    cut_layer: int = 2
    partition: str = "iid"  # iid | contiguous | dirichlet:ALPHA
    partition_key: str = "eatType"
    steps: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 5
    max_grad_norm: float = 0.0  # 0 = no clipping (as in the LoRA E2E recipe)
    aggregate_every: int = 5  # I: local steps between FedAvg rounds (sl: steps per client turn)
    server_mode: str = "sequential"  # splitlora: one server step per client batch, or one per step
    wire_dtype: str = "fp32"  # dtype of activations and gradients crossing the cut
    client_lora: LoraSide = field(default_factory=LoraSide)
    server_lora: LoraSide = field(default_factory=LoraSide)
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    log_every: int = 1
    eval_every: int = 0  # validation loss every N steps (0 = only at the end)
    save_every: int = 0  # also save the adapter every N steps to DIR/adapters/step-N (0 = only at the end)
    threads: int = 0  # torch intra-op threads (0 = torch default)

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"algorithm must be one of {', '.join(ALGORITHMS)} (got {self.algorithm!r})")
        if self.server_mode not in SERVER_MODES:
            raise UserError(f"server_mode must be one of {', '.join(SERVER_MODES)} (got {self.server_mode!r})")
        if self.wire_dtype not in WIRE_DTYPES:
            raise UserError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)} (got {self.wire_dtype!r})")
        positive = ("clients", "steps", "batch_size", "aggregate_every", "max_length", "log_every",
                    "synthetic_examples")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "eval_every", "save_every", "threads", "seed"):
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
        from .data.partition import parse_partition  # local import: data imports config

        parse_partition(self.partition)
        if "{mr}" not in self.prompt_template:
            raise UserError("prompt_template must contain {mr}")
        self.client_lora.validate("client_lora")
        self.server_lora.validate("server_lora")
        return self

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        return _build(cls, raw, "").validate()

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


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are read as YAML scalars (``8``, ``1e-3``, ``null``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value (got {item!r})")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown config key {prefix + unknown[0]!r}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list (got {value!r})")
        return [_coerce(item, v, key) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false (got {value!r})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number (got {value!r})")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{key} must be a string (got {value!r})")
        return str(value)
    return value
