"""Command-line flags made from config dataclasses: the one generator behind ``train``, ``serve``,
``client``, ``--backend ray`` and the benchmark and experiment commands.

A field declared with ``config.option(..., flag="--x")`` becomes ``--x``: its help text, type, choices,
default and ``--help`` section come from the field, and the fields of a nested dataclass become flags too
(a field added anywhere shows up). Every generated flag parses to None when it is not given, so what a
user typed can be laid over a config file or a dataclass's defaults (:func:`given`). Torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable

# The --help section of RunConfig's own fields (a field may also say ``option(..., group=)``; a field
# of a nested dataclass goes to its class's section, CLASS_GROUPS). A field listed nowhere lands in
# "other run options".
RUN_GROUPS = {
    "data": "data", "synthetic_examples": "data", "val_fraction": "data", "partition": "data",
    "partition_key": "data", "max_length": "data", "prompt_template": "data",
    "model": "model and split", "cut_layer": "model and split", "split_shape": "model and split",
    "tail_layers": "model and split", "wire_dtype": "model and split", "device": "model and split",
    "server_device_map": "model and split", "threads": "model and split", "dtype": "model and split",
    "server_dtype": "model and split", "gradient_checkpointing": "model and split", "quantize": "model and split",
    "server_quantize": "model and split", "clients_per_round": "algorithm",
    "algorithm": "algorithm", "clients": "algorithm", "steps": "algorithm", "batch_size": "algorithm",
    "lr": "algorithm", "weight_decay": "algorithm", "warmup_steps": "algorithm", "max_grad_norm": "algorithm",
    "aggregate_every": "algorithm", "server_mode": "algorithm", "seed": "algorithm",
    "log_every": "outputs", "eval_every": "outputs", "save_every": "outputs",
}
CLASS_GROUPS = {"DataFormat": "data", "LoraSide": "LoRA", "Privacy": "privacy", "Aggregation": "robust aggregation",
                "RayOptions": "Ray (--backend ray)", "ServeOptions": "deployment", "ClientOptions": "deployment"}
GROUP_ORDER = ("data", "model and split", "LoRA", "algorithm", "privacy", "robust aggregation", "outputs",
               "evaluation", "deployment", "Ray (--backend ray)")
OTHER = "other run options"


@dataclasses.dataclass
class Flag:
    flag: str
    keys: tuple[str, ...]  # dotted field names it sets (a LoraSide flag sets client_lora.X and server_lora.X)
    type: type
    help: str
    default: Any  # dataclasses.MISSING: the flag is required
    group: str
    choices: tuple | None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def field_type(cls, f: dataclasses.Field) -> type:
    """The type of field ``f`` of ``cls``, ``X | None`` read as X."""
    hint = typing.get_type_hints(cls)[f.name]
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def dataclass_flags(cls) -> dict[str, Flag]:
    """``--flag`` -> :class:`Flag` for every flagged field of ``cls`` and of the dataclasses nested in it."""
    out: dict[str, Flag] = {}

    def walk(cls, prefix: str, group: str | None) -> None:
        for f in dataclasses.fields(cls):
            typ = field_type(cls, f)
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{prefix}{f.name}.",
                     f.metadata.get("group") or CLASS_GROUPS.get(typ.__name__) or f.name.replace("_", " "))
                continue
            flag = f.metadata.get("flag")
            if not flag:
                continue
            if flag in out:  # the same dataclass nested twice (both LoRA sides): one flag sets both
                out[flag].keys += (prefix + f.name,)
                continue
            default = None if f.default_factory is not dataclasses.MISSING else f.default
            where = f.metadata.get("group") or group or RUN_GROUPS.get(f.name) or OTHER
            out[flag] = Flag(flag, (prefix + f.name,), typ, f.metadata.get("help", ""), default, where,
                             f.metadata.get("choices"))

    walk(cls, "", CLASS_GROUPS.get(cls.__name__))
    return out


def metavar(flag: str, spec_type, choices) -> str:
    """``{a,b}`` for choices, N for a whole number, X for a number, else the flag's last word."""
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    if spec_type is int or getattr(spec_type, "__name__", "") in ("_positive", "positive_int"):
        return "N"
    return "X" if spec_type is float else flag.lstrip("-").split("-")[-1].upper()


def add_group(p: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's section ``title``, created on first use (sections are listed in creation order)."""
    if not hasattr(p, "_splitlora_groups"):
        p._splitlora_groups = {}
    if title not in p._splitlora_groups:
        p._splitlora_groups[title] = p.add_argument_group(title)
    return p._splitlora_groups[title]


def add_flags(p: argparse.ArgumentParser, flags: Iterable[Flag], sections: bool = True,
              negatable: bool = False) -> None:
    """One argparse option per flag, in its ``--help`` section (``sections=False``: in the parser's own).

    ``negatable``: booleans also get ``--no-X`` (a flag laid over a config file must be able to turn a
    true off); else a boolean flag only turns its field on."""
    for spec in flags:
        text = spec.help.replace("%", "%%") + (" (both sides)" if len(spec.keys) > 1 else "")
        shown = spec.default not in (None, dataclasses.MISSING) and (negatable or spec.type is not bool)
        if shown and "default" not in text:
            text += f" (default: {spec.default})"
        if spec.type is bool:
            kwargs = {"action": argparse.BooleanOptionalAction if negatable else "store_true"}
        else:
            kwargs = {"type": spec.type, "metavar": metavar(spec.flag, spec.type, spec.choices),
                      **({"required": True} if spec.default is dataclasses.MISSING else {})}
        (add_group(p, spec.group) if sections else p).add_argument(spec.flag, default=None, help=text, **kwargs)


def given(args: argparse.Namespace, flags: dict[str, Flag]) -> dict[str, Any]:
    """``{dotted key: value}`` of every flag of ``flags`` given on the command line."""
    out: dict[str, Any] = {}
    for spec in flags.values():
        value = getattr(args, spec.dest, None)
        if value is not None:
            out.update({key: value for key in spec.keys})
    return out
