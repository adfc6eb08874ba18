"""Several processes, one training run: torchrun's process group, sharding and the few collectives we use.

    torchrun --nproc_per_node=2 train.py ...                              # one node, 2 GPUs (or 2 CPU ranks)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=host0:29500 train.py ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (plain `python train.py`) every function here is
the single-process identity, so train.py has one code path. NCCL on GPUs (one device per process, by local
rank), Gloo on the CPU.

How a step is split (train.py), with --no-cache: every rank reads the whole log, draws the same global batch
from the same seeded RNG and takes a contiguous share of it; the short-term vectors of the whole batch are
gathered (with gradient), so the negatives are drawn from the global batch exactly as in one process, and
each rank's loss is scaled so that DistributedDataParallel's gradient average equals the single-process
gradient of the global batch.

With the event cache (the default) each rank reads only its own user shards (shard k: rank k mod world) and
cuts its own users into local batches, as many on every rank (train.plan_steps); a step's global batch is
the ranks' local batches in rank order, and the same gathering and scaling give the gradient one process
would compute on that batch. Which users meet in a batch then depends on the number of ranks.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import inference
import runtime

# Rank 0 alone evaluates and publishes while the others wait at their next collective: allow for that.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank among world processes (rank 0 prints and writes files)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(device_name: str = "auto") -> tuple[Context, torch.device]:
    """Join torchrun's process group when launched by it; returns (context, this process's device).

    Under torchrun a CUDA device is the one of the local rank (--device cuda:N would put every rank on the
    same GPU, so it is refused), and the backend is NCCL; on the CPU it is Gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(), runtime.pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda:"):
        raise SystemExit(f"--device {device_name}: under torchrun each process takes the GPU of its local "
                         "rank; use --device cuda or auto")
    device = runtime.pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()} "
                             "(lower --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    return Context(rank=rank, world=world, local_rank=local_rank, backend=backend), device


def close(ctx: Context, finished: bool = False) -> None:
    """Leave the process group. finished: this rank ended normally (so every rank reaches this call): the
    ranks meet at a barrier first. Without it a rank could start shutting the interpreter down while a Gloo
    worker thread is still releasing the tensors of the last collective (a broadcast's), which needs the GIL
    and then aborts the process at exit ('terminate called without an active exception', SIGABRT; seen in
    about 1 of 20 two-rank runs, always after the run's work was done)."""
    if ctx.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def quiet_unless_main(ctx: Context) -> None:
    """One process prints: the other ranks' standard output goes nowhere (errors still reach stderr)."""
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


# ------------------------------------------------------------------------------------------- sharding
def split_sizes(n: int, world: int) -> list[int]:
    """Sizes of the world contiguous shards of n items (numpy.array_split's: they differ by at most 1)."""
    return [n // world + (r < n % world) for r in range(world)]


def shard_slice(n: int, ctx: Context) -> slice:
    sizes = split_sizes(n, ctx.world)
    start = sum(sizes[:ctx.rank])
    return slice(start, start + sizes[ctx.rank])


# ---------------------------------------------------------------------------------------- collectives
def broadcast(obj, ctx: Context):
    """Rank 0's Python object on every rank (pickled; for the vocabulary and checkpoints, not tensors
    on the hot path)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, ctx: Context) -> list:
    """Every rank's Python object, in rank order, on every rank (pickled; small bookkeeping only)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The sum over ranks (a new tensor; the input is left alone)."""
    if not ctx.distributed:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _gather_padded(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; shards are padded to the largest for all_gather."""
    width = max(sizes)
    pad = local.new_zeros((width - local.shape[0],) + tuple(local.shape[1:]))
    parts = [torch.empty((width,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
             for _ in sizes]
    dist.all_gather(parts, torch.cat([local.detach(), pad]).contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows. Backward: each rank's loss may use any row, so the row gradients are
    summed over ranks (all_reduce) and each rank keeps those of its own rows."""

    @staticmethod
    def forward(ctx, local, sizes, rank):
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        return _gather_padded(local, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows], None, None


def gather_rows(local: torch.Tensor, sizes: list[int], ctx: Context) -> torch.Tensor:
    """(sum(sizes), ...) rows of every rank in rank order, differentiable; identity in one process."""
    if not ctx.distributed:
        return local
    return _GatherRows.apply(local, sizes, ctx.rank)


def gather_array(local: np.ndarray, sizes: list[int], ctx: Context, device: torch.device) -> np.ndarray:
    """Every rank's rows of a numpy array, concatenated in rank order, on every rank (through the device:
    NCCL only moves CUDA tensors)."""
    if not ctx.distributed:
        return local
    return _gather_padded(torch.from_numpy(local).to(device), sizes).cpu().numpy()


def sharded_user_vectors(model, seqs, users: np.ndarray | None, ctx: Context, device: torch.device,
                         **kw) -> np.ndarray:
    """inference.compute_user_vectors, each rank computing a contiguous share of the users; every rank
    gets all of them in the order of `users` (default: every user of seqs)."""
    users = np.arange(seqs.n_users) if users is None else np.asarray(users)
    if not ctx.distributed:
        return inference.compute_user_vectors(model, seqs, users, device=device, **kw)
    mine = users[shard_slice(len(users), ctx)]
    kw["progress"] = kw.get("progress", True) and ctx.is_main
    local = inference.compute_user_vectors(model, seqs, mine, device=device, **kw)
    return gather_array(local, split_sizes(len(users), ctx.world), ctx, device)


def own_user_vectors(model, seqs, ctx: Context, device: torch.device, users: np.ndarray | None = None,
                     **kw) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the users this rank read itself (seqs: its own users' sequences, None when it has
    none; users: indices into seqs, default all of them), in seqs' order."""
    hidden = getattr(model, "module", model).cfg.hidden_dim
    if seqs is not None and users is None:
        users = np.arange(seqs.n_users)
    ids = np.zeros(0, np.int64) if seqs is None else seqs.user_ids[users]
    kw["progress"] = kw.get("progress", True) and ctx.is_main
    vectors = (np.zeros((0, hidden), np.float32) if seqs is None or len(users) == 0
               else inference.compute_user_vectors(model, seqs, users, device=device, **kw))
    return ids, vectors


def gather_own_user_vectors(model, seqs, ctx: Context, device: torch.device, users: np.ndarray | None = None,
                            **kw) -> tuple[np.ndarray, np.ndarray]:
    """own_user_vectors of every rank, on every rank: (ids, vectors) sorted by id, the order one process's
    Sequences has (validation scores them all on every rank)."""
    ids, vectors = own_user_vectors(model, seqs, ctx, device, users, **kw)
    parts = gather_objects(ids, ctx)
    ids = np.concatenate(parts)
    vectors = gather_array(vectors, [len(p) for p in parts], ctx, device)
    order = np.argsort(ids, kind="stable")
    return ids[order], vectors[order]


def gather_to_main(ids: np.ndarray, vectors: np.ndarray, ctx: Context,
                   device: torch.device) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every rank's (ids, vectors) on rank 0 only, sorted by id (the other ranks get (None, None) and keep
    only their own): what the single vectors file needs, without a copy of every vector on every rank."""
    if not ctx.distributed:
        order = np.argsort(ids, kind="stable")
        return ids[order], vectors[order]
    sizes = gather_objects(len(ids), ctx)
    id_parts = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(ids, id_parts, dst=0)
    width = max(max(sizes), 1)
    local = torch.from_numpy(np.ascontiguousarray(vectors)).to(device)
    local = torch.cat([local, local.new_zeros((width - len(ids),) + tuple(local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in range(ctx.world)] if ctx.is_main else None
    dist.gather(local, parts, dst=0)
    if not ctx.is_main:
        return None, None
    all_ids = np.concatenate(id_parts)
    all_vectors = torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu().numpy()
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], all_vectors[order]


# ----------------------------------------------------------------------------------------------- model
def wrap(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """The training-step module: the model itself, inside DistributedDataParallel when distributed (its
    forward returns every vector the step's loss needs, so DDP sees every trained parameter used).

    Buffers are not broadcast at every forward: the MoE's balancing state is kept equal on all ranks by
    all-reducing its counts (DeepSeekMoE.MoE.process_group), and its per-rank counters must stay local.
    """
    if not ctx.distributed:
        return model
    model.moe_layer.process_group = dist.group.WORLD
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
