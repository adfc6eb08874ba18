"""From CSR sequences to tensors and user vectors: the bridge between data.py and the model files."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from data import Sequences

def batch_to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy batch dict -> torch tensors on device (pinned, non-blocking copies on CUDA)."""
    cuda = device.type == "cuda"
    out = {}
    for key, arr in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if cuda:
            t = t.pin_memory().to(device, non_blocking=True)
        out[key] = t
    return out


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast of the matmuls on CUDA ("auto", "bf16") and on the CPU with "bf16" (train.py's
    --precision; CPUs without native bf16 emulate it slowly); else a no-op (float32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


BATCH_SIZE = 512  # users per inference batch (train.py --export_batch_size, evaluate.py --batch_size)


@torch.inference_mode()
def compute_user_vectors(model, seqs: Sequences, users: np.ndarray | None = None, *, part: str = "all",
                         tower: str = "long", min_len: int, max_len: int, batch_size: int = BATCH_SIZE,
                         device: torch.device = torch.device("cpu"), progress: bool = True,
                         desc: str = "export") -> np.ndarray:
    """Vectors (len(users), hidden_dim) float32 of the given users (default: all), in batches.

    Users are processed longest-first so each batch is padded only to its own longest sequence; the result
    is returned in the order of `users`.
    """
    users = np.arange(seqs.n_users) if users is None else np.asarray(users)
    was_training = model.training
    model.eval()
    lengths = np.asarray(seqs.lengths)[users]
    order = np.argsort(-lengths, kind="stable")
    out = np.empty((len(users), model.cfg.hidden_dim), dtype=np.float32)
    try:
        for start in tqdm(range(0, len(users), batch_size), desc=desc, unit="batch", disable=not progress,
                          leave=False):
            idx = order[start:start + batch_size]
            batch = batch_to_tensors(seqs.batch(users[idx], part, min_len, max_len), device)
            with autocast(device):
                vec = model.encode(batch, tower=tower)
            out[idx] = vec.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out
