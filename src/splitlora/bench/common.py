"""What every benchmark shares: options, settings overrides, results, and the JSON/Markdown/PNG writer."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


from ..config import option, replace_fields
from ..errors import UserError, require


@dataclass
class Options:
    """Command-line options shared by every benchmark and experiment (the flagged fields are their flags)."""

    out: Path = option(Path("bench-out"), "output folder", flag="--out")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto", flag="--device")
    quick: bool = option(False, "tiny-gpt2 and a few steps: a smoke run (used by tests)", flag="--quick")
    threads: int = option(0, "torch intra-op threads (default: torch's choice)", flag="--threads")
    sets: dict[str, Any] = field(default_factory=dict)  # --set overrides of a benchmark's settings
    progress: bool = True
    runner: str = "bench"  # the splitlora command that runs it: bench or experiment

    def command(self, name: str, extra_sets: dict[str, Any] | None = None) -> str:
        """The command line that reruns ``name`` (restricted by ``extra_sets``) with these options."""
        parts = ["splitlora", self.runner, name, "--out", str(self.out), "--device", self.device]
        if self.quick:
            parts.append("--quick")
        if self.threads:
            parts += ["--threads", str(self.threads)]
        for key, value in {**self.sets, **(extra_sets or {})}.items():
            parts += ["--set", f"{key}={_format_value(value)}"]
        return shlex.join(parts)


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def apply_sets(settings, sets: dict[str, Any], where: str):
    """``settings`` (a benchmark's settings dataclass) with its ``--set`` items applied, converted by the
    config's converter (:func:`splitlora.config.replace_fields`; errors name ``where.KEY``)."""
    return replace_fields(settings, sets, f"{where}.")


def sets_for(sets: dict[str, Any], settings_cls) -> dict[str, Any]:
    """The ``--set`` items that belong to ``settings_cls`` (``all`` passes every item to every benchmark)."""
    names = {f.name for f in fields(settings_cls)}
    return {k: v for k, v in sets.items() if k in names}


@dataclass
class Target:
    what: str
    value: float | None
    threshold: float
    op: str = ">="  # ">=" or "<="
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def to_dict(self) -> dict:
        return {"what": self.what, "value": self.value, "threshold": self.threshold, "op": self.op,
                "met": self.met, "note": self.note}

    def line(self) -> str:
        status = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        value = "n/a" if self.value is None else f"{self.value:.3f}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.what}: {value} (target {self.op} {self.threshold}) - {status}{note}"


@dataclass
class Table:
    title: str
    columns: list[tuple[str, str, str]]  # (key, header, format spec e.g. ",.0f")
    rows: list[dict]


@dataclass
class BenchResult:
    name: str
    title: str
    settings: dict
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # anything else worth keeping in the JSON
    seconds: float = 0.0
    skipped: str | None = None  # the reason, when the benchmark could not run at all


# ---- machine -------------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "device": device,
        "load_average": _loadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def check_device(device: str) -> str:
    """``--device`` read as ``splitlora train`` reads it (:func:`splitlora.device.resolve_device`)."""
    from ..device import resolve_device

    try:
        return str(resolve_device(device))
    except UserError as exc:
        raise UserError(f"--device: {exc}") from None


# ---- small statistics ------------------------------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs) -> float | None:
    """Relative half-range of repeated measurements: (max - min) / (2 * median)."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / (2 * m) if m else None


# ---- writing ---------------------------------------------------------------------------------

def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value != value:
        return "nan"
    if spec == "code":
        return f"`{value}`"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return format(value, spec)
        except (ValueError, TypeError):
            return str(value)
    return str(value)


def markdown_table(table: Table) -> str:
    head = "| " + " | ".join(h for _, h, _ in table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    lines = [head, rule]
    for row in table.rows:
        cells = [_fmt(row.get(k), spec).replace("|", "\\|") for k, _, spec in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(result: BenchResult, machine: dict, out: Path) -> str:
    lines = [f"## {result.title}", ""]
    if result.skipped:
        lines += [f"**Skipped:** {result.skipped}", ""]
    for table in result.tables:
        if table.title:
            lines += [f"**{table.title}**", ""]
        lines += [markdown_table(table), ""]
    if result.targets:
        lines += ["**Targets**", ""] + [f"- {t.line()}" for t in result.targets] + [""]
    if result.notes:
        lines += ["**Notes**", ""] + [f"- {n}" for n in result.notes] + [""]
    for plot in result.plots:
        lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    load = machine.get("load_average")
    lines += [f"_Machine: {machine.get('cpu')} ({machine.get('cpu_cores')} cores, {machine.get('memory_gib')} GiB), "
              f"device {machine.get('device')}{' ' + machine['gpu'] if machine.get('gpu') else ''}, torch "
              f"{machine.get('torch')}; load average at start {load}; took {result.seconds:.0f} s._", ""]
    return "\n".join(lines)


def write_result(result: BenchResult, opts: Options, machine: dict) -> dict:
    """``OUT/NAME.json`` and ``OUT/NAME.md`` (plots were written by the benchmark itself)."""
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": result.name,
        "title": result.title,
        "command": opts.command(result.name),
        "quick": opts.quick,
        "device": opts.device,
        "machine": {**machine, "load_average_end": _loadavg()},
        "settings": result.settings,
        "seconds": round(result.seconds, 1),
        "skipped": result.skipped,
        "tables": [{"title": t.title, "rows": t.rows} for t in result.tables],
        "targets": [t.to_dict() for t in result.targets],
        "notes": result.notes,
        "plots": [Path(p).name for p in result.plots],
        **({"extra": result.extra} if result.extra else {}),
    }
    tmp = out / f".{result.name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(out / f"{result.name}.json")
    (out / f"{result.name}.md").write_text(render_markdown(result, payload["machine"], out))
    return payload


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def plot_path(opts: Options, name: str) -> Path:
    opts.out.mkdir(parents=True, exist_ok=True)
    return opts.out / f"{name}.png"


def save_figure(fig, opts: Options, name: str) -> str:
    """Lay out, write ``OUT/NAME.png`` and free the figure; returns the path."""
    fig.tight_layout()
    path = plot_path(opts, name)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return str(path)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    require("matplotlib", "plot", "the benchmark plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)  # one file per shape and process: every run of a benchmark reads the same rows
def full_length_rows(rows: int, max_length: int, seed: int = 0) -> str:
    """A JSONL file of ``rows`` ``text`` rows of ``2 * max_length`` words (more than ``max_length`` GPT-2
    or Llama-3 tokens), so that every batch is exactly batch_size x max_length tokens; removed at exit."""
    import atexit
    import random
    import shutil
    import tempfile

    rng = random.Random(seed)
    words = ("the patient was seen in clinic today and reports less pain after the new dose of her "
             "medication with no fever cough or shortness of breath follow up in two weeks").split()
    folder = Path(tempfile.mkdtemp(prefix="splitlora-bench-rows-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "rows.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choices(words, k=2 * max_length))}) + "\n")
    return str(path)
