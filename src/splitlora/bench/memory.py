"""Client memory: peak memory of the client side alone vs the whole model, for several cut layers.

Why the split exists: a data owner should not need the memory of the whole model. Each row is a
fresh process (:mod:`splitlora.bench.memproc`) that reads only the weights it holds: ``client``
(embeddings + blocks 0..K-1 + client LoRA, trained against a fake upstream gradient), ``server``
(blocks K..L-1, norm, head + server LoRA, fed random activations) and ``whole`` (the whole model with
one LoRA, one party on pooled data). Same batch, data and LoRA settings for all.

The deployed client: the real ``splitlora client`` process of a loopback deployment (one client,
``deployed_model``, default a random GPT-2-medium-shaped model of 1.4 GB), whose peak resident set
(``wait4``'s ``ru_maxrss``) is compared with what its share should cost: the import baseline plus its
part, LoRA, optimiser state and activations, as the ``client`` probe counts them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .common import BenchResult, Options, Table, Target, apply_sets, full_length_rows, log, pyplot, save_figure
from .memproc import LABELS, ProbeSpec, probe_all
from .scale import memory_key

NAME = "memory"


@dataclass
class Settings:
    model: str = "smollm2-135m"
    cuts: list[int] = field(default_factory=lambda: [1, 2, 4])
    server_cuts: list[int] = field(default_factory=lambda: [2])
    batch_size: int = 8
    max_length: int = 128
    warmup_steps: int = 1
    steps: int = 2
    target_cut: int = 2
    target_fraction: float = 0.40
    parallel_probes: int = 1  # probes at a time (memory is per process; >1 only shortens smoke runs)
    deployed_model: str = "gpt2-medium"  # "" = no deployed-client row
    deployed_steps: int = 3
    deployed_dtype: str = "fp32"  # of the deployed client and its server
    target_deployed: float = 1.15  # deployed client peak RSS / (baseline + its tensors)
    # The client of a Llama-3-8B-shaped model truncated to big_blocks blocks (random bf16 weights,
    # written to big_model_dir first if absent; "" = no such rows), one probe per variant:
    # DTYPE[+ckpt][+nf4|+int8][@TOKENS] (@: max_length, default big_max_length). fp32 runs at 8 x 512 (and
    # at 8 x 64, beside the others); bf16 and the quantized bases (bitsandbytes dequantizes to bf16) at 8 x 64,
    # and only where the CPU has bf16 units: without AVX512-BF16/AMX, torch's backward matmul in bf16 falls
    # back to a portable GEMM (a step at 8 x 8 tokens took 293 s here, fp32 at 8 x 64 14.5 s).
    big_model_dir: str = ""
    big_blocks: int = 6
    big_variants: list[str] = field(default_factory=lambda: ["fp32@64", "fp32", "fp32+ckpt", "bf16@64",
                                                             "bf16+ckpt@64", "bf16+int8@64", "bf16+nf4@64"])
    big_batch_size: int = 8
    big_max_length: int = 512  # full rows (bench.common.full_length_rows): 8 x 512 tokens in every batch
    # Deployed `splitlora client` rows for the 8B-shaped model, one per probe variant named here (its server
    # in fp32, the fastest on a CPU without bf16 units), each compared with that variant's probe budget.
    # (at 8 x 512 its fp32 server, 4 blocks + the 128256 x 4096 head, would take ~11 min a step on 2 cores:
    # ~3.4e13 FLOP at the ~50 GFLOP/s measured for an fp32 linear here)
    big_deployed: list[str] = field(default_factory=lambda: ["fp32@64", "bf16@64"])
    big_deployed_steps: int = 1

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny-gpt2", cuts=[2], server_cuts=[], batch_size=2, max_length=64, steps=1,
                   parallel_probes=2, deployed_model="tiny-gpt2", deployed_steps=2)


def run(opts: Options) -> BenchResult:
    s = apply_sets(Settings.quick() if opts.quick else Settings(), opts.sets, NAME)
    result = BenchResult(NAME, f"Client memory: client side alone vs the whole model ({s.model})", asdict(s))
    key, label = memory_key(opts)
    configs = [("whole", s.target_cut, {"cuts": "none", "server_cuts": "none"})]
    configs += [("client", k, {"cuts": k, "server_cuts": "none"}) for k in s.cuts]
    configs += [("server", k, {"cuts": "none", "server_cuts": k}) for k in s.server_cuts]
    specs = [ProbeSpec(role=role, model=s.model, cut=cut, batch_size=s.batch_size, max_length=s.max_length,
                       warmup=s.warmup_steps, steps=s.steps, threads=opts.threads, device=opts.device)
             for role, cut, _ in configs]
    rows = []
    for (role, cut, sets), r in zip(configs, probe_all(specs, s.parallel_probes)):
        rows.append({"side": LABELS.get(role, role), "cut": None if role == "whole" else cut,
                     **{k: v for k, v in r.items() if k != "spec"}, "command": opts.command(NAME, sets)})
        if opts.progress:
            log(f"[memory] {role} cut {cut}: peak RSS {r['peak_rss_mib']:.0f} MiB "
                f"({r['peak_above_baseline_mib']:.0f} above baseline), tensors {r['tensors_mib']:.0f} MiB")
    whole = rows[0]
    for row in rows:
        row["vs_whole"] = row[key] / whole[key] if whole[key] else None
        row["tensors_vs_whole"] = row["tensors_mib"] / whole["tensors_mib"]
        row["rss_vs_whole"] = row["peak_rss_mib"] / whole["peak_rss_mib"]
    target_row = next((r for r in rows if r["side"] == "client" and r["cut"] == s.target_cut), None)
    if target_row is not None:
        result.targets.append(Target(
            f"client side at cut {s.target_cut} / whole model ({label})", target_row["vs_whole"], s.target_fraction,
            "<=", note=f"tensor bytes {target_row['tensors_vs_whole']:.3f}, total peak RSS {target_row['rss_vs_whole']:.3f}"))
    cols = [("side", "side", ""), ("cut", "cut", ""), ("peak_rss_mib", "peak RSS MiB", ",.0f"),
            ("peak_above_baseline_mib", "above baseline MiB", ",.0f"), ("weights_mib", "weights MiB", ",.0f"),
            ("activations_peak_mib", "activations MiB", ",.0f"), ("tensors_mib", "tensors MiB", ",.0f"),
            ("vs_whole", "vs whole", ".3f"), ("tensors_vs_whole", "tensors vs whole", ".3f")]
    if key == "cuda_peak_mib":
        cols.insert(4, ("cuda_peak_mib", "CUDA peak MiB", ",.0f"))
    result.tables.append(Table("", cols + [("command", "command", "code")], rows))
    result.tables.append(Table("Probe commands (one fresh process per row)",
                               [("side", "side", ""), ("cut", "cut", ""), ("probe_command", "probe", "code")], rows))
    result.notes += [
        f"batch {s.batch_size}, max_length {s.max_length}, synthetic data, LoRA r=8; {s.warmup_steps} warm-up "
        f"step(s) + {s.steps} step(s). 'vs whole' compares {label} with the whole model's.",
        "baseline = resident memory after imports, tokenizer and data, before any weight is read; it is the "
        "same for every role (interpreter + torch + transformers) and is excluded from 'above baseline'.",
        "tensors = unique bytes of weights held + LoRA + AdamW state + peak bytes of tensors saved for "
        "backward (activations) alive at once.",
        "Tied embeddings: with tie_word_embeddings (SmolLM2, GPT-2) the vocabulary matrix is both the "
        "client's input embedding and the server's LM head, so BOTH sides hold a copy of it; for "
        "smollm2-135m that is 49152 x 576 fp32 = 108 MiB of the client's weights at any cut.",
    ]
    result.plots.append(_plot(rows, key, label, s, opts))
    if s.big_model_dir:
        _big_rows(s, opts, result)
    if s.deployed_model:
        row = _deployed(s, opts)
        result.tables.append(Table(f"The deployed client process ({s.deployed_model}, cut {s.target_cut})", [
            ("model", "model", ""), ("cut", "cut", "d"), ("peak_rss_mib", "client process peak RSS MiB", ",.0f"),
            ("baseline_rss_mib", "import baseline MiB", ",.0f"), ("tensors_mib", "its tensors MiB", ",.0f"),
            ("expected_mib", "baseline + tensors MiB", ",.0f"), ("ratio", "ratio", ".3f"),
            ("whole_weights_mib", "whole model weights MiB", ",.0f"), ("command", "command", "code")], [row]))
        result.targets.append(Target(f"deployed client peak RSS / (baseline + its tensors), {s.deployed_model}",
                                     row["ratio"], s.target_deployed, "<="))
        result.notes.append(
            "deployed client: `splitlora serve` + one `splitlora client` on 127.0.0.1 for "
            f"{s.deployed_steps} steps; the client's peak RSS is its ru_maxrss (os.wait4); its expected cost is "
            "the client probe's baseline (imports incl. grpc, tokenizer, data) plus its tensors (part, LoRA, AdamW "
            "state, peak saved activations). The client reads only its own tensors from the safetensors file.")
    return result


def _variant(variant: str, default_length: int) -> tuple[str, list[str], int]:
    """``DTYPE[+FLAG...][@TOKENS]`` -> (dtype, flags, max_length)."""
    spec, _, length = variant.partition("@")
    dtype, *flags = spec.split("+")
    return dtype, flags, int(length) if length else default_length


def _big_rows(s: Settings, opts: Options, result: BenchResult) -> None:
    """Peak RSS of the client at cut ``target_cut`` per precision, against its budget: import baseline
    + its part's weights in that dtype + LoRA + AdamW state + peak saved activations."""
    from ..config import RunConfig
    from .bigmodel import llama3_config, write_random_checkpoint

    path = write_random_checkpoint(s.big_model_dir, llama3_config(blocks=s.big_blocks))
    data = full_length_rows(8 * s.big_batch_size, s.big_max_length)
    rows = []
    for variant in s.big_variants:
        dtype, flags, max_length = _variant(variant, s.big_max_length)
        quant = next((f for f in flags if f in ("nf4", "int8")), None)
        spec = ProbeSpec(role="client", model=str(path), cut=s.target_cut, batch_size=s.big_batch_size,
                         max_length=max_length, warmup=1, steps=1, threads=opts.threads, device=opts.device,
                         dtype=dtype, gradient_checkpointing="ckpt" in flags, quantize=quant, data=data)
        r = probe_all([spec])[0]  # one at a time: each holds GBs
        rows.append({"variant": variant, **{k: v for k, v in r.items() if k != "spec"}, "s_per_step": r["seconds"],
                     "command": opts.command(NAME, {"cuts": "none", "server_cuts": "none", "deployed_model": "",
                                                    "big_model_dir": s.big_model_dir, "big_variants": variant})})
        if opts.progress:
            log(f"[memory] 8B-shaped client {variant}: peak RSS {r['peak_rss_mib']:,.0f} MiB, "
                f"{r['seconds']:.1f} s/step")
    by = {r["variant"]: r for r in rows}
    for r in rows:
        # Checkpointed, autograd keeps only each block's input; in backward one block is recomputed at a
        # time, so its activations (the same dtype's row without checkpointing, per block) join the budget.
        plain = by.get(r["variant"].replace("+ckpt", "")) if "+ckpt" in r["variant"] else None
        r["recompute_mib"] = plain["activations_peak_mib"] / s.target_cut if plain else 0.0
        r["budget_mib"] = r["baseline_rss_mib"] + r["tensors_mib"] + r["recompute_mib"]
        r["ratio"] = r["peak_rss_mib"] / r["budget_mib"]
        r["train_ratio"] = r["train_peak_rss_mib"] / r["budget_mib"] if r.get("train_peak_rss_mib") else None
        if plain:  # checkpointing's cost in time and what it saves, against the same dtype without it
            r["time_vs_plain"] = r["s_per_step"] / plain["s_per_step"]
            r["activations_saved_mib"] = plain["activations_peak_mib"] - r["activations_peak_mib"] - r["recompute_mib"]
            r["rss_saved_mib"] = plain["peak_rss_mib"] - r["peak_rss_mib"]
        result.targets.append(Target(f"8B-shaped client at cut {s.target_cut}, {r['variant']}: peak RSS / budget",
                                     r["ratio"], s.target_deployed, "<="))
    result.tables.append(Table(
        f"Client at cut {s.target_cut} of a Llama-3-8B-shaped model ({s.big_blocks} blocks), full rows", [
            ("variant", "variant", ""), ("tokens", "tokens/step", ",.0f"), ("peak_rss_mib", "peak RSS MiB", ",.0f"),
            ("load_peak_rss_mib", "peak loading", ",.0f"), ("train_peak_rss_mib", "peak training", ",.0f"),
            ("baseline_rss_mib", "import baseline", ",.0f"), ("weights_mib", "part weights", ",.0f"),
            ("lora_mib", "LoRA", ",.1f"), ("optimizer_mib", "AdamW", ",.1f"),
            ("activations_peak_mib", "saved activations", ",.0f"), ("recompute_mib", "+ 1 block recomputed", ",.0f"),
            ("budget_mib", "budget (sum)", ",.0f"),
            ("ratio", "RSS / budget", ".3f"), ("train_ratio", "training / budget", ".3f"),
            ("s_per_step", "s/step", ".1f"), ("time_vs_plain", "time vs no ckpt", ".2f"),
            ("rss_saved_mib", "RSS saved by ckpt", ",.0f"), ("command", "command", "code")], rows))
    deployed = []
    for variant in s.big_deployed:
        probe = by.get(variant)
        dtype, flags, max_length = _variant(variant, s.big_max_length)
        if probe is None or flags:
            continue  # its budget comes from the probe row of the same variant (a plain dtype)
        cfg = RunConfig(model=str(path), clients=1, cut_layer=s.target_cut, batch_size=s.big_batch_size,
                        max_length=max_length, steps=s.big_deployed_steps, aggregate_every=s.big_deployed_steps,
                        threads=opts.threads, device=opts.device, dtype=dtype, server_dtype="fp32",
                        data=data).validate()
        peak = _deployed_peak(cfg, data)
        deployed.append({"variant": variant, "tokens": probe["tokens"], "peak_rss_mib": peak, "budget_mib": probe["budget_mib"],
                         "ratio": peak / probe["budget_mib"],
                         "command": opts.command(NAME, {"cuts": "none", "server_cuts": "none", "deployed_model": "",
                                                        "big_model_dir": s.big_model_dir, "big_variants": variant,
                                                        "big_deployed": variant})})
        if opts.progress:
            log(f"[memory] deployed 8B-shaped client {variant}: peak RSS {peak:,.0f} MiB, budget "
                f"{probe['budget_mib']:,.0f} MiB")
        result.targets.append(Target(f"deployed 8B-shaped client at cut {s.target_cut}, {variant}: peak RSS / budget",
                                     peak / probe["budget_mib"], s.target_deployed, "<="))
    if deployed:
        result.tables.append(Table(
            f"The deployed `splitlora client` process, cut {s.target_cut} of the 8B-shaped model (its server: fp32)", [
                ("variant", "client dtype", ""), ("tokens", "probe's tokens/step", ",.0f"), ("peak_rss_mib", "client process peak RSS MiB", ",.0f"),
                ("budget_mib", "budget MiB (probe row)", ",.0f"), ("ratio", "RSS / budget", ".3f"),
                ("command", "command", "code")], deployed))
    result.notes.append(
        "8B-shaped client: one fresh `memproc` client process per row (lean read of its own tensors: embeddings "
        "128256 x 4096 and blocks 0-1, 2.36B-parameter checkpoint in bf16 on disk), trained against a fake "
        "upstream gradient; budget = import baseline + part weights in that dtype (quantized: bitsandbytes' "
        "packed weights; embeddings and norms stay bf16) + LoRA + AdamW state + peak bytes saved for backward "
        "(+ with checkpointing, one block's activations, recomputed in backward: the row without it / K).")


def _deployed(s: Settings, opts: Options) -> dict:
    import csv
    import tempfile
    from pathlib import Path

    from ..config import RunConfig
    from ..data.e2e import synthetic_e2e
    from ..models.lean import lean_skeleton

    probe = probe_all([ProbeSpec(role="client", model=s.deployed_model, cut=s.target_cut, batch_size=s.batch_size,
                                 max_length=s.max_length, warmup=s.warmup_steps, steps=s.steps,
                                 threads=opts.threads, device=opts.device, dtype=s.deployed_dtype)])[0]
    meta, _, _ = lean_skeleton(s.deployed_model)
    whole = sum(p.numel() * p.element_size() for p in meta.parameters()) / 2**20
    cfg = RunConfig(model=s.deployed_model, clients=1, cut_layer=s.target_cut, batch_size=s.batch_size,
                    max_length=s.max_length, steps=s.deployed_steps, aggregate_every=s.deployed_steps,
                    threads=opts.threads, device=opts.device, dtype=s.deployed_dtype).validate()
    with tempfile.TemporaryDirectory(prefix="splitlora-memory-") as tmp:
        data = Path(tmp) / "client.csv"
        with data.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["mr", "ref"])
            w.writerows([ex.mr, ex.ref] for ex in synthetic_e2e(400, seed=0))
        peak = _deployed_peak(cfg, data)
    expected = probe["baseline_rss_mib"] + probe["tensors_mib"]
    if opts.progress:
        log(f"[memory] deployed client {s.deployed_model}: peak RSS {peak:.0f} MiB, expected {expected:.0f} MiB")
    return {"model": f"{s.deployed_model} ({s.deployed_dtype})", "cut": s.target_cut, "peak_rss_mib": peak,
            "baseline_rss_mib": probe["baseline_rss_mib"], "tensors_mib": probe["tensors_mib"],
            "expected_mib": expected, "ratio": peak / expected, "whole_weights_mib": whole,
            "command": opts.command(NAME, {"cuts": "none", "server_cuts": "none", "deployed_model": s.deployed_model})}


def _deployed_peak(cfg, data) -> float:
    """Peak resident set (MiB) of the `splitlora client` process of a loopback deployment of ``cfg`` with
    one client reading ``data``: its ``ru_maxrss`` from ``os.wait4``."""
    import os
    import tempfile
    from pathlib import Path

    from ..transport.loopback import Loopback

    with tempfile.TemporaryDirectory(prefix="splitlora-memory-") as tmp, \
            Loopback(cfg, [data], Path(tmp) / "lb") as lb:
        lb.start_server("--join-timeout", "3600")
        lb.start_client(0, endpoint=lb.endpoint(timeout=3600))
        proc = lb.clients[0]
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak resident set
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"the client exited with {proc.returncode}: {lb.tail(lb.client_log(0))}")
        lb.wait(lb.server, 3600, "server")
    return usage.ru_maxrss / 1024


def _plot(rows, key, label, s: Settings, opts: Options) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    names = [r["side"] if r["cut"] is None else f"{r['side']}\ncut {r['cut']}" for r in rows]
    xs = range(len(rows))
    w = 0.38
    ax.bar([i - w / 2 for i in xs], [r[key] for r in rows], w, label=label)
    ax.bar([i + w / 2 for i in xs], [r["tensors_mib"] for r in rows], w, label="tensors (weights+state+activations)")
    ax.axhline(rows[0][key] * s.target_fraction, ls="--", c="grey", lw=1,
               label=f"{s.target_fraction:.0%} of the whole model")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("MiB")
    ax.set_title(f"peak memory by side, {s.model}, batch {s.batch_size}")
    ax.legend(fontsize=7)
    return save_figure(fig, opts, "memory")
