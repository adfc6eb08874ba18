"""MoE layer benchmark: sorted grouped dispatch vs a dense SwiGLU of equal active FLOPs vs a naive loop.

Forward + backward on `tokens` tokens, interleaved in one run (the machine is shared, so every repeat
times all variants back to back and the medians are reported):
- dense : LayerNorm -> SwiGLU with hidden (k + shared) * hidden -> dropout, + residual: the same active
          FLOPs as the MoE's k routed + shared experts.
- moe   : DeepSeekMoE.MoE.forward (bincount + sort + torch._grouped_mm, no host syncs).
- naive : MoE.forward_reference (per-expert loop, per-expert .item() counts and nonzero).

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python bench_moe.py
    OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_THRESHOLD_=... .venv/bin/python bench_moe.py   # on a shared CPU

glibc otherwise serves every tensor > 32 MB with a fresh mmap, paying its page faults on each step
(about 20-30 % slower for both dense and MoE here). The MoE runs ~600 small matmuls per step, each an
OpenMP parallel region; when other processes hold the cores, libgomp's default spin-waiting makes every
region wait for a descheduled thread (measured here: 3-4x dense under load); OMP_WAIT_POLICY=PASSIVE
(read by libgomp at start-up, so set it in the environment) removes that and changes little otherwise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from DeepSeekMoE import MoE, MoEConfig


class DenseSwiGLU(nn.Module):
    """LayerNorm -> SwiGLU (fused gate/up) -> dropout, with a residual: the dense reference."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        gate, up = self.w_in(self.norm(x)).chunk(2, dim=-1)
        return x + self.dropout(self.w_out(F.silu(gate) * up))


def _step(fn, x: torch.Tensor, grad: torch.Tensor, params) -> float:
    """Seconds for one forward + backward."""
    for p in params:
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    y = fn(x)
    y.backward(grad)
    return time.perf_counter() - t0


def bench_moe(tokens: int = 25600, dims=(128, 211), hidden: int = 512, experts: int = 100, k: int = 2,
              repeats: int = 7, shared: int = 1, naive: bool = True, seed: int = 0) -> list[dict]:
    """Time MoE variants against the dense SwiGLU; one row per (dim, variant).

    Row keys: dim, variant, median_ms, min_ms, ratio_dense (median of per-repeat ratios to dense,
    measured back to back), tokens, repeats.
    """
    rows = []
    for dim in dims:
        torch.manual_seed(seed)
        moe = MoE(MoEConfig(dim=dim, n_routed_experts=experts, n_shared_experts=shared, n_activated=k,
                            hidden=hidden, dropout=0.1)).train()
        dense = DenseSwiGLU(dim, (k + shared) * hidden).train()
        x = torch.randn(1, tokens, dim, requires_grad=True)
        grad = torch.randn(1, tokens, dim)
        variants = {'dense': (dense, list(dense.parameters())), 'moe': (moe, list(moe.parameters()))}
        if naive:
            variants['naive'] = (moe.forward_reference, list(moe.parameters()))
        for fn, params in variants.values():   # warm-up: allocator, thread pool, oneDNN kernels
            _step(fn, x, grad, params)
        times = {name: [] for name in variants}
        names = list(variants)
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]   # rotate so no variant always runs first
            for name in order:
                times[name].append(_step(*variants[name][:1], x, grad, variants[name][1]))
        for name in names:
            ratios = [t / d for t, d in zip(times[name], times['dense'])]
            rows.append({'dim': dim, 'variant': name, 'median_ms': 1e3 * statistics.median(times[name]),
                         'min_ms': 1e3 * min(times[name]), 'ratio_dense': statistics.median(ratios),
                         'tokens': tokens, 'repeats': repeats})
        moe.epoch_counts.zero_()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--tokens', type=int, default=25600)
    ap.add_argument('--dims', type=int, nargs='+', default=[128, 211])
    ap.add_argument('--hidden', type=int, default=512)
    ap.add_argument('--experts', type=int, default=100)
    ap.add_argument('--k', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--no_naive', action='store_true', help='skip the slow per-expert loop')
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0 = leave the default)')
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.2f}")
    rows = bench_moe(args.tokens, tuple(args.dims), args.hidden, args.experts, args.k, args.repeats,
                     naive=not args.no_naive)
    print(f"{'dim':>4} {'variant':>7} {'median ms':>10} {'min ms':>8} {'x dense':>8}")
    for row in rows:
        print(f"{row['dim']:>4} {row['variant']:>7} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} "
              f"{row['ratio_dense']:>8.2f}")


if __name__ == '__main__':
    main()
