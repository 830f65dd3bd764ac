"""The GPU check: ``splitlora bench gpu`` (one GPU, offline, < 8 minutes) and its CPU ``--dry-run``.

For each model (a Llama-3-8B-shaped model with random weights made on the GPU, and SmolLM2-135M, or
``smollm2-135m-shaped``: its shape with random weights, where its GGUF is not installed),
in bf16 with the same batch, sequence length, LoRA and data:

* tokens/s of a plain unsplit PEFT training loop (``get_peft_model``, ``model(**batch).loss``,
  AdamW): the baseline;
* tokens/s of ``splitlora`` in process, for 1 and 4 clients, sequential and batched server, two-part
  and U-shape, and its ratio to the baseline (target >= 0.9 with 1 client);
* each party's peak GPU memory (``max_memory_allocated`` over its own work, weights included) and the
  bytes of its frozen part;
* the server's accelerate device map (``server_device_map=auto``) on the GPU;
* the tests marked ``@pytest.mark.cuda`` (run in a child pytest; skipped without a GPU).

``--dry-run`` runs exactly this code on the CPU on ``tiny-llama`` with a few short steps: the suite
runs it, so the GPU run is known to work before a GPU is lent (docs/scaling.md says how to run it).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.batching import BatchStream
from ..models.loading import LoadedModel, gpt2_tokenizer, load_model
from ..models.precision import TORCH_DTYPES, enable_checkpointing
from .bigmodel import SHAPES, llama3_config
from .common import BenchResult, Options, Table, Target, apply_sets, full_length_rows, log, median
from .harness import build, quiet_transformers, synchronize

NAME = "gpu"
@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: ["llama3-8b-shaped", "smollm2-135m"])
    dtype: str = "bf16"
    batch_size: int = 4
    max_length: int = 512
    warmup_steps: int = 2
    steps: int = 4
    clients: list[int] = field(default_factory=lambda: [1, 4])
    server_modes: list[str] = field(default_factory=lambda: ["sequential", "batched"])
    shapes: list[str] = field(default_factory=lambda: ["two-part", "u-shape"])
    gradient_checkpointing: bool = True  # the 8B model's activations at 4 clients x 4 x 512 need it
    run_tests: bool = True
    target_min_ratio: float = 0.9
    full_rows: bool = True  # text rows longer than max_length: every batch is batch_size x max_length tokens

    @classmethod
    def quick(cls) -> "Settings":
        return cls(models=["llama3-8b-shaped@tiny"], batch_size=2, max_length=64, warmup_steps=1, steps=1)


def _model(name: str, dtype: torch.dtype, device: str) -> LoadedModel:
    shape = name.removesuffix("@tiny")
    if shape in SHAPES:  # random weights, built directly on the device in the target dtype
        from transformers import LlamaForCausalLM

        config = llama3_config(tiny=name.endswith("@tiny"), shape=SHAPES[shape])  # @tiny: the dry run's, the same code
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
        return LoadedModel(model.requires_grad_(False), gpt2_tokenizer(), name)
    loaded = load_model(name, dtype)
    loaded.model.requires_grad_(False).to(device)
    return loaded


def _config(model: str, s: Settings, device: str, **kw) -> RunConfig:
    rows = 8 * s.batch_size * (s.warmup_steps + s.steps + 1)  # enough for 4 clients' batches
    if s.full_rows:
        kw.setdefault("data", full_length_rows(rows, s.max_length))
    return RunConfig(model=model, dtype=s.dtype, batch_size=s.batch_size, max_length=s.max_length,
                     steps=s.warmup_steps + s.steps + 1, warmup_steps=1, aggregate_every=s.steps + s.warmup_steps,
                     synthetic_examples=max(64, rows),
                     gradient_checkpointing=s.gradient_checkpointing, device=device, **kw).validate()


class PeakMemory:
    """Each party's peak GPU memory over its own work (weights included): a hook (runtime.hooks)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, work):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        yield
        if self.cuda:
            party = "server" if work.party == "server" else "client"
            self.peak[party] = max(self.peak.get(party, 0), torch.cuda.max_memory_allocated())


def _timed(step, first: int, count: int, device: str) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for t in range(first, first + count):
        step(t)
    synchronize(device)
    return time.perf_counter() - t0


def plain_peft(loaded: LoadedModel, cfg: RunConfig, s: Settings, device: str) -> dict:
    """The baseline: the unsplit model with PEFT's LoRA, trained the way a PEFT user writes it."""
    from peft import get_peft_model

    from ..data import prepare_data
    from ..models.lora import whole_lora_config
    from ..models.split import make_part

    torch.manual_seed(cfg.seed)
    model = get_peft_model(make_part(loaded.model, "whole", 1), whole_lora_config(loaded.model, cfg))
    if cfg.gradient_checkpointing:
        enable_checkpointing(model.base_model.model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    stream = BatchStream(prepare_data(cfg, loaded.tokenizer).train, cfg.batch_size, loaded.model.config.pad_token_id,
                         seed=(cfg.seed, 0))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tokens = 0

    def step(_):
        nonlocal tokens
        batch = {k: v.to(device) for k, v in next(stream).items()}
        tokens += int(batch["attention_mask"].sum())
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _timed(step, 0, s.warmup_steps, device)
    tokens = 0
    wall = _timed(step, 0, s.steps, device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    del model, opt
    return {"run": "plain PEFT (unsplit)", "tok_s": tokens / wall, "tokens_per_step": tokens / s.steps,
            "peak_gib": _gib(peak)}


def splitlora_row(loaded: LoadedModel, cfg: RunConfig, s: Settings, device: str) -> dict:
    built = build(cfg, loaded, device, count_flops=False)
    peaks = PeakMemory(device)
    for party in [*built.grid.apps.values(), built.algo.server]:
        party.hooks.append(peaks)
    _timed(built.algo.step, 0, s.warmup_steps, device)
    tokens0 = built.tokens.input_tokens
    wall = _timed(built.algo.step, s.warmup_steps, s.steps, device)
    tokens = built.tokens.input_tokens - tokens0
    client = next(iter(built.grid.apps.values())).part
    row = {"run": f"splitlora {cfg.clients}c {cfg.server_mode} {cfg.split_shape}", "tok_s": tokens / wall,
           "tokens_per_step": tokens / s.steps, "client_weights_gib": _gib(_frozen_bytes(client)),
           "server_weights_gib": _gib(_frozen_bytes(built.algo.server.part)),
           "client_peak_gib": _gib(peaks.peak.get("client")), "server_peak_gib": _gib(peaks.peak.get("server"))}
    del built
    return row


def device_map_row(loaded: LoadedModel, model: str, s: Settings, device: str) -> dict:
    from ..models.parts import SharedModel

    cfg = _config(model, s, device, server_device_map="auto")
    part = SharedModel(loaded, cfg, device).lora_part("server", device=device)
    where: dict[str, int] = {}
    for module, dev in part.hf_device_map.items():
        where[str(dev)] = where.get(str(dev), 0) + 1
    return {"model": model, "server_device_map": ", ".join(f"{d}: {n} modules" for d, n in sorted(where.items())),
            "first_block_on": str(next(p.device for n, p in part.named_parameters() if ".layers." in n))}


def _frozen_bytes(part) -> int:
    return sum(p.numel() * p.element_size() for n, p in part.named_parameters() if "lora_" not in n)


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def cuda_tests(tests_dir: Path) -> dict:
    """Run the ``@pytest.mark.cuda`` tests in a child pytest: counts of passed, failed, skipped."""
    files = sorted(str(f) for f in tests_dir.glob("test_*.py") if "pytest.mark.cuda" in f.read_text())
    if not files:
        return {"tests": "none found", "passed": 0, "failed": 0, "skipped": 0}
    import xml.etree.ElementTree as ET

    import tempfile

    report = Path(tempfile.mkdtemp(prefix="splitlora-bench-gpu-")) / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *files], capture_output=True, text=True, cwd=tests_dir.parent)
    counts = {"tests": " ".join(Path(f).name for f in files), "passed": 0, "failed": 0, "skipped": 0}
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            counts["failed" if kind in ("failure", "error") else kind] += 1
        report.unlink()
        report.parent.rmdir()
    counts["exit_code"] = proc.returncode
    return counts


def run(opts: Options) -> BenchResult:
    s = apply_sets(Settings.quick() if opts.quick else Settings(), opts.sets, NAME)
    device = opts.device
    quiet_transformers()
    dtype = TORCH_DTYPES[s.dtype]
    result = BenchResult(NAME, f"GPU check: splitlora vs a plain PEFT loop ({s.dtype})", asdict(s))
    rows, maps = [], []
    for model in s.models:
        t0 = time.perf_counter()
        loaded = _model(model, dtype, device)
        base = plain_peft(loaded, _config(model, s, device, algorithm="cen", clients=1), s, device)
        rows.append({"model": model, **base, "ratio": 1.0})
        for shape in s.shapes:
            for mode in s.server_modes:
                for n in s.clients:
                    cfg = _config(model, s, device, clients=n, server_mode=mode, split_shape=shape)
                    row = {"model": model, **splitlora_row(loaded, cfg, s, device)}
                    row["ratio"] = row["tok_s"] / base["tok_s"]
                    rows.append(row)
                    if opts.progress:
                        log(f"[gpu] {model}: {row['run']}: {row['tok_s']:,.0f} tok/s ({row['ratio']:.2f}x plain)")
                    if n == 1:
                        result.targets.append(Target(f"{model}: {row['run']} / plain PEFT tokens/s", row["ratio"],
                                                     s.target_min_ratio, ">="))
        maps.append(device_map_row(loaded, model, s, device))
        del loaded
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        log(f"[gpu] {model} done in {time.perf_counter() - t0:.0f}s")
    cols = [("model", "model", ""), ("run", "run", ""), ("tokens_per_step", "tokens/step", ".0f"),
            ("tok_s", "tokens/s", ",.0f"), ("ratio", "/ plain", ".2f"),
            ("client_weights_gib", "client part GiB", ".2f"), ("server_weights_gib", "server part GiB", ".2f"),
            ("client_peak_gib", "client peak GiB", ".2f"), ("server_peak_gib", "server peak GiB", ".2f"),
            ("peak_gib", "plain peak GiB", ".2f")]
    result.tables.append(Table("Throughput and memory", cols, rows))
    result.tables.append(Table("Server device map (server_device_map=auto)", [
        ("model", "model", ""), ("server_device_map", "modules per device", ""), ("first_block_on", "first block on", "")],
        maps))
    tests_dir = Path.cwd() / "tests"
    if s.run_tests and tests_dir.is_dir():
        tests = cuda_tests(tests_dir)
        result.tables.append(Table("Tests marked cuda", [(k, k, "") for k in tests], [tests]))
        result.extra["cuda_tests"] = tests
    rows_are = "text rows cut to max_length" if s.full_rows else "synthetic E2E-style rows"
    result.notes += [f"{s.dtype}, batch {s.batch_size} x up to {s.max_length} tokens ({rows_are}), LoRA "
                     f"r=8 on q_proj+v_proj, cut 2 (U-shape: tail 1), gradient checkpointing "
                     f"{'on' if s.gradient_checkpointing else 'off'} for every run; {s.warmup_steps} warm-up steps "
                     f"then {s.steps} timed steps; tokens = input (attention-mask) tokens.",
                     "Peak GiB: torch.cuda.max_memory_allocated over that party's own work, the shared frozen "
                     "weights included (in process every party shares one GPU)."]
    result.extra["median_ratio_1_client"] = median([r["ratio"] for r in rows if r["run"].startswith("splitlora 1c")])
    return result
