"""Process-level set-up shared by train.py, evaluate.py and bench.py: OpenMP wait policy, allocator, seeds, device."""
from __future__ import annotations

import ctypes
import os
import random

import numpy as np

# The MoE issues hundreds of small matmuls per step; OpenMP's default spin-wait made them 4x slower when
# another process shares the cores (CI has 2). libgomp reads this once, when torch loads: entry points
# (train.py, evaluate.py, bench.py, tests/conftest.py) import this module before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

# glibc mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep large tensors on the heap instead of a fresh mmap per allocation.

    With glibc's defaults every buffer over the (dynamic, at most 32 MB) mmap threshold is mapped and
    unmapped on each use, so a training step spends a third of its CPU time in page faults. Raising the
    mmap threshold to 1 GiB and never trimming the heap lets freed buffers be reused (the same as
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, but on by default). Returns False where mallopt is
    unavailable (not glibc); the user can opt out with LTI_DEFAULT_MALLOC=1.
    """
    if os.environ.get("LTI_DEFAULT_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, 2**30)
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(ok_trim and ok_mmap)


SEED = 1337  # the default seed of train.py, evaluate.py and the quality table


def seed_everything(seed: int) -> None:
    """Seed Python, numpy's legacy RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo): there bf16
    matmuls run 2-4x faster than float32 (measured: AMD EPYC with AVX512-BF16, 2 threads, 418 vs 191 GFLOP/s
    at 2048^3); elsewhere they are emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto -> 'bf16' on CUDA and on CPUs with native bf16, else 'fp32'; fp32 / bf16 as given."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or cpu_native_bf16() else "fp32"


def pick_device(name: str) -> torch.device:
    """Resolve --device: 'auto' takes CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device {name!r} is not a valid torch device: {e}") from None
