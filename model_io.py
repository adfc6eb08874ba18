"""Saving and loading everything under saved_models/: weights, config, vocabulary, checkpoints, vectors.

Every file is written atomically (a temporary file in the same folder, fsync, then os.replace), so a crash
mid-save leaves the previous file intact, never a torn one. A model is a *set* of files: config.json is written
last and lists the SHA-256 of each weight file and of vocab.npz, and `load_model` refuses a folder whose files
do not match it (a run killed between two files, or two runs writing one folder), saying how to repair it.
A training run holds an advisory lock on its folder (`lock_save_dir`), so a second run on it fails at once.

In a notebook::

    from model_io import load_model
    model, vocab, config = load_model("saved_models")
    model.feature_embedding, model.moe_layer, model.long_term, model.short_term  # the four modules
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from DeepSeekMoE import MoEConfig
from atomic_files import atomic_json_save, atomic_write
from LongTermInterestModel import LongTermInterestModel, ModelConfig
from data import Vocab

MODULE_NAMES = ("feature_embedding", "moe_layer", "long_term", "short_term")
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.npz"
CHECKPOINT_FILE = "checkpoint.pt"
SAVE_DIR = "saved_models"  # the default model folder of train.py, evaluate.py and load_model
VECTORS_FILE = "user_vectors.npz"
LOCK_FILE = ".lock"


class ModelSetError(RuntimeError):
    """A save folder whose files do not form one model (or cannot be written, or is in use)."""


class ModelMissing(ModelSetError, FileNotFoundError):
    """A save folder without the file asked for (no model trained there yet, or no vectors exported)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def state_version(state_dicts: dict[str, dict[str, torch.Tensor]]) -> str:
    """A short content hash of the weights: the model version readers see in Redis."""
    h = hashlib.sha1()
    for name in sorted(state_dicts):
        for key, t in sorted(state_dicts[name].items()):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def save_model(save_dir: str | os.PathLike, model: LongTermInterestModel, vocab: Vocab,
               train_config: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """Write the four state_dicts, config.json and vocab.npz; return the model version string.

    config.json is written last and holds each file's SHA-256 ("files"), so a reader that finds it also finds
    the weights it describes, and can tell when it does not (a save interrupted between two files).
    """
    save_dir = Path(save_dir)
    states = {name: {k: v.detach().cpu() for k, v in getattr(model, name).state_dict().items()}
              for name in MODULE_NAMES}
    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + state_version(states)
    for name, state in states.items():
        atomic_torch_save(state, save_dir / f"{name}.pth")
    vocab.save(save_dir / VOCAB_FILE)
    files = [f"{name}.pth" for name in MODULE_NAMES] + [VOCAB_FILE]
    config = {
        "model_version": version,
        "files": {f: file_sha256(save_dir / f) for f in files},
        "model": asdict(model.cfg),
        "moe": asdict(model.moe_cfg),
        "train": train_config,
        **(extra or {}),
    }
    atomic_json_save(config, save_dir / CONFIG_FILE, sort_keys=True)
    return version


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_model_set(save_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Raise ModelSetError unless every file config.json lists is there with the hash it records.
    (Folders saved before config.json listed its files are taken as they are.)"""
    save_dir = Path(save_dir)
    bad = [f for f, digest in config.get("files", {}).items()
           if not (save_dir / f).exists() or file_sha256(save_dir / f) != digest]
    if bad:
        raise ModelSetError(
            f"{save_dir}/ is not one consistent model: {', '.join(bad)} "
            f"{'does' if len(bad) == 1 else 'do'} not match {CONFIG_FILE} (model {config.get('model_version')}), so "
            "the folder mixes files from two saves (a run stopped while saving, or two runs writing one --save_dir). "
            f"Nothing was loaded. To repair it, re-run the training command that wrote it with --resume (its "
            f"{CHECKPOINT_FILE} holds the finished run and saves the set again), or train again.")


def read_config(save_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(save_dir) / CONFIG_FILE
    if not path.exists():
        raise ModelMissing(f"{path} not found: train a model first (python train.py --save_dir {save_dir})")
    return json.loads(path.read_text())


def build_model(config: dict[str, Any]) -> LongTermInterestModel:
    """Rebuild the (untrained) modules from a config.json dict."""
    # models saved before ModelConfig.feature_norm / target_head / skip_pool / exact_categories existed were
    # built without them
    old = {"feature_norm": False, "target_head": False, "skip_pool": False, "exact_categories": False}
    return LongTermInterestModel(ModelConfig(**{**old, **config["model"]}), MoEConfig(**config["moe"]))


def load_model(save_dir: str | os.PathLike = SAVE_DIR, device: str | torch.device = "cpu"
               ) -> tuple[LongTermInterestModel, Vocab, dict[str, Any]]:
    """Rebuild the model from saved_models/ and load the four .pth files; returns (model in eval mode, vocab, config).
    Raises ModelSetError when the files are not the set config.json describes."""
    save_dir = Path(save_dir)
    config = read_config(save_dir)
    check_model_set(save_dir, config)
    model = build_model(config)
    for name in MODULE_NAMES:
        state = torch.load(save_dir / f"{name}.pth", map_location="cpu", weights_only=True)
        getattr(model, name).load_state_dict(state)
    vocab = Vocab.load(save_dir / VOCAB_FILE)
    return model.to(device).eval(), vocab, config


def save_vectors(save_dir: str | os.PathLike, user_ids: np.ndarray, vectors: np.ndarray, version: str) -> Path:
    """Write ids + float32 matrix in one file (so they can never disagree); returns its path."""
    path = Path(save_dir) / VECTORS_FILE
    atomic_write(path, lambda f: np.savez(f, user_ids=np.asarray(user_ids, dtype=np.int64),
                                          vectors=np.asarray(vectors, dtype=np.float32),
                                          model_version=np.array(version)))
    return path


def load_vectors(save_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, str]:
    """Return (user_ids, vectors, model_version) written by save_vectors."""
    path = Path(save_dir) / VECTORS_FILE
    if not path.exists():
        raise ModelMissing(f"{path} not found: run python train.py (or --export_only) first")
    with np.load(path) as z:
        return z["user_ids"], z["vectors"], str(z["model_version"])


def lock_save_dir(save_dir: str | os.PathLike):
    """Create save_dir, check that files can be written in it, and take an exclusive advisory lock on it for
    as long as the returned file stays open (the process's lifetime): a second run on the same folder gets a
    ModelSetError at once instead of both writing it. Raises ModelSetError when the folder cannot be created
    or written, or is locked."""
    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=save_dir, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
        handle = open(save_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise ModelSetError(f"--save_dir {save_dir}: cannot write there ({e.strerror or e}); nothing was "
                            "read or trained. Pass a writable folder.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise ModelSetError(f"--save_dir {save_dir} is in use by {owner} (lock {save_dir / LOCK_FILE}); two runs "
                            "writing one folder would mix their models. Wait for it to finish, or pass another "
                            "--save_dir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle
