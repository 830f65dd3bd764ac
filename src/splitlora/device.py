"""Devices, threads and random streams: the small helpers every party shares."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import threading
import zlib
from pathlib import Path

import torch

from .errors import UserError

log = logging.getLogger(__name__)
_TORCH_THREADS = torch.get_num_threads()  # torch's default (physical cores, or OMP_NUM_THREADS), before any set


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU if there is one). One-line error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be cpu, cuda, cuda:N or auto (got {name!r})") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu, cuda, cuda:N or auto (got {name!r})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def auto_threads(running: int = 0) -> int:
    """Torch threads for ``--threads 0``: the cores this process may use that other work does not keep
    busy (the 1-minute load average, less the ``running`` threads this process itself ran), at least 1
    and at most torch's default.

    With every core in use, a second thread only waits: each parallel op ends at a barrier that a
    descheduled thread reaches late (a 2-core machine shared with other jobs ran a demo step 9x slower
    on 2 threads than on 1; docs/benchmarks.md, Threads). The training loop asks again before every
    step (:func:`retune_threads`), so load that arrives after the start is seen within about a minute.
    A different count can change the last bits of some reductions (LayerNorm gradients): pin
    ``--threads`` for bit-for-bit reruns.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = 0.0
    return max(1, min(_TORCH_THREADS, round(cores - max(0.0, load - running))))


def retune_threads() -> int:
    """Re-apply :func:`auto_threads` during a run (this process's own threads are not counted as load)."""
    threads = auto_threads(running=torch.get_num_threads())
    if threads != torch.get_num_threads():
        log.info("torch threads: %d -> %d (load %.1f)", torch.get_num_threads(), threads, os.getloadavg()[0])
        torch.set_num_threads(threads)
    return threads


def setup_torch(seed: int, threads: int = 0) -> int:
    """Threads (0: :func:`auto_threads`), seed and deterministic kernels; returns the threads used."""
    threads = threads or auto_threads()
    torch.set_num_threads(threads)
    log.info("torch threads: %d", threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def party_seed(seed: int, role: str) -> int:
    """A seed of its own for each party (``"server"``, ``"client:3"``), fixed by the run's seed."""
    return (seed * 1_000_003 + zlib.crc32(role.encode())) % (2**63 - 1)


class PartyRng:
    """A party's own random stream (LoRA dropout), kept apart from every other party's.

    Each party of a deployment is its own process with its own generator; giving every simulated
    party its own stream too makes the simulation draw exactly what the deployment draws, so the
    two train the same adapter even with dropout on. The stream is swapped into torch's global
    generator for the party's work; parties that share a process (threads) take turns.
    """

    _turn = threading.RLock()

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        self.cpu_state = gen.get_state()
        self.cuda_state = None
        self._active = False
        if self.device.type == "cuda":
            cuda_gen = torch.Generator(device=self.device).manual_seed(seed)
            self.cuda_state = cuda_gen.get_state()

    @contextlib.contextmanager
    def active(self):
        with self._turn:
            with self._swapped():
                yield

    @contextlib.contextmanager
    def _swapped(self):
        saved = torch.get_rng_state()
        torch.set_rng_state(self.cpu_state)
        saved_cuda = None
        if self.cuda_state is not None:
            saved_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self.cpu_state = torch.get_rng_state()
            torch.set_rng_state(saved)
            if saved_cuda is not None:
                self.cuda_state = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(saved_cuda, self.device)

    def state_dict(self) -> dict:
        """The stream's position (read live while :meth:`active`)."""
        cpu = torch.get_rng_state() if self._active else self.cpu_state
        out = {"cpu": cpu.clone()}
        if self.cuda_state is not None:
            out["cuda"] = (torch.cuda.get_rng_state(self.device) if self._active else self.cuda_state).clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.cpu_state = state["cpu"].clone()
        if self._active:
            torch.set_rng_state(self.cpu_state)
        if "cuda" in state and self.cuda_state is not None:
            self.cuda_state = state["cuda"].clone()
            if self._active:
                torch.cuda.set_rng_state(self.cuda_state, self.device)


def return_freed_memory() -> bool:
    """Have glibc give freed blocks above 128 KiB back to the system at once (Linux only).

    By default glibc raises its mmap threshold as large blocks are freed, so a forward/backward's
    transient tensors end up in a heap that is never trimmed: on a GPT-2-medium client at cut 2 that
    kept ~170 MiB resident for nothing (peak 1,105 MiB instead of 945). A data owner's device is the
    party short of memory, so ``splitlora client`` turns this on. Returns whether it could.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 128 << 10)) and bool(libc.mallopt(m_trim_threshold, 128 << 10))
    except (OSError, AttributeError):  # not glibc
        return False


# ---- resource probes (benchmarks, Ray actors) ----------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else peak_rss_mib()


def peak_rss_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = kib / 1024 if sys.platform == "darwin" else kib
    return kib / 1024


def reset_peak_rss() -> bool:
    """Start :func:`peak_rss_mib` again from the current resident set (Linux's ``clear_refs`` 5), so
    that one phase's peak can be told from an earlier one's; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None
