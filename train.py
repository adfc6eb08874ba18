"""
Train user long-term-interest vectors from a behaviour log and publish them to Redis.

End to end on the built-in demo log, set-up included (creates .venv, starts a bundled Redis):
    bash run.sh
On a real log (Tianchi tianchi_mobile_recommend_train_user.csv, or Taobao UserBehavior.csv):
    python train.py --data_path DATA/train_user --save_dir saved_models
Daily refresh with the saved model and vocabulary (no training), or re-publish the saved vectors:
    python train.py --export_only --data_path DATA/train_user
    python train.py --republish --redis_url redis://host:6379/0
On several GPUs or machines (DistributedDataParallel; see distributed.py):
    torchrun --nproc_per_node=8 train.py --batch_size 2048
The seed project's recipe (BPR on cosine, one negative, fixed 90/10 split, per-epoch expert penalty, its shapes):
    python train.py --loss bpr --tau 1 --no-skip_pool --no-random_cuts --lr_schedule constant --moe_balance seed \
        --batch_size 256 --depth 4 --item_embedding_dim 128 --precision fp32
Held-out quality of the defaults on the demo log and the real sample, 3 seeds (README's table): python quality.py
Every constant below is also a flag: --epochs 10, --moe_balance bias, --no-evaluate, ...
"""
from __future__ import annotations

import argparse
import json
import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import runtime  # first: it sets OpenMP's wait policy before torch loads
import torch  # noqa: E402
from tqdm.auto import tqdm

import data
import decode
import demo_data
import distributed
import evaluate
import event_cache
import inference
import model_io
import redis_servers
import redis_store
import report
from DeepSeekMoE import MoEConfig
from LongTermInterestModel import LongTermInterestModel, ModelConfig, batch_loss

# -----------------------------------------------------------------------------
# I/O
DATA_PATH = data.DATA_PATH  # folder holding the log, or the .csv / .csv.gz itself
DATA_FORMAT = "auto"  # auto | tianchi | userbehavior (auto reads the first line)
SAVE_DIR = model_io.SAVE_DIR  # weights, config.json, vocab.npz, checkpoint.pt, user_vectors.npz
RESUME = False  # continue an interrupted run from SAVE_DIR/checkpoint.pt
EXPORT_ONLY = False  # no training: vectors for DATA_PATH's log from the saved model, then publish
REPUBLISH = False  # no training, no data: publish SAVE_DIR/user_vectors.npz again
DEMO_USERS = demo_data.USERS  # users in the demo log generated when the default DATA_PATH holds no log
# data
STRICT = False  # stop at the first malformed row instead of skipping and counting it
DEDUPE = False  # drop exact duplicate rows (kept by default: hour-precision logs repeat real clicks)
CACHE = True  # parse the log once into <log>.cache/ (Parquet shards by user; under SAVE_DIR/event_cache/ if the log's folder is read-only) and reuse it while the log is unchanged
REBUILD_CACHE = False  # with CACHE: parse the log again and rewrite its cache even if the cache matches the log
MIN_ITEM_COUNT = data.MIN_ITEM_COUNT  # items seen fewer times share the reserved "unknown" row (3 measured best: see data.py)
TIME_WINDOW_DAYS = data.TIME_WINDOW_DAYS  # events further than this many days from the log's median time are skipped, counted as 'time implausible' (0: no window)
N_MIN = data.N_MIN  # long-term sequences are padded to at least this many events
N_MAX = data.N_MAX  # ... and keep at most the most recent N_MAX events (also used for export; memory grows ~N_MAX^2)
K_MIN = data.K_MIN  # short-term sequences are padded to at least this many events
K_MAX = data.K_MAX  # ... and keep at most the most recent K_MAX events
VAL_FRACTION = 0.1  # share of trainable users held out to choose the best epoch
EVALUATE = True  # hold out the log's last day (and TEST_FRACTION of users) and evaluate against baselines
TEST_FRACTION = 0.1  # with EVALUATE: share of users never trained on, evaluated as 'heldout'
# model
ITEM_EMBEDDING_DIM = 64  # item table width (rows x this x 4 bytes, times 3 with Adam state); seed 128
CATEGORY_EMBEDDING_DIM = 64  # category table width
WIDTH = 128  # model width after the feature projection (the MoE and tower width)
HIDDEN_DIM = 128  # size of the exported user vector
CATEGORY_DIM = 0  # entries of the vector's category half (its last ones; the rest is the item half); 0 = HIDDEN_DIM // 2
DEPTH = 2  # Transformer layers per tower (seed 4: no better held out on the demo log, 1.6x slower)
HEADS = 8  # attention heads per layer
HEAD_DIM = 64  # width of each head
DROPOUT = 0.1  # dropout in towers and experts
POOLING = "cls"  # cls | mean: how a tower turns the sequence into one vector
SKIP_POOL = True  # add a recency-weighted pool of the events' target vectors to the tower output (the vector starts as pooling)
EXACT_CATEGORIES = True  # with SKIP_POOL: the vector's category half is the pool alone, so decode.py reads the user's category shares back out of it (next-day categories are scored that way)
ITEM_CATEGORY_WEIGHT = 0.5  # scoring next-day items against a user vector: the item candidate's category half counts this much relative to its item half (1: as trained; README: chosen on training users)
CATEGORY_HALF_LIFE = 30.0  # with SKIP_POOL: the category half's pool weighs an event this many events older than the last half as much (0: the learned recency weights alone)
CATEGORY_TOP = 10  # with SKIP_POOL: only each user's this many heaviest categories enter the vector's category half, so decode.py recovers them exactly (0: every category)
CATEGORY_IDF = 0.5  # with SKIP_POOL: each event counts in the category half by its category's IDF over the training users to this power (popular categories say little about who a user is; decoded shares are unchanged; README: measured over 8 seeds); 0: off
FIXED_CATEGORY_CODES = False  # each category's code in the vector's category half is a fixed random unit vector, never trained (learned codes pull co-occurring categories together)
# MoE
MOE_EXPERTS = 100  # routed experts
MOE_SHARED = 1  # shared experts, applied to every token
MOE_ACTIVATED = 2  # experts chosen per token (top-k)
MOE_HIDDEN = 512  # hidden width of each SwiGLU expert
MOE_BALANCE = "running"  # running (usage penalty updated every step) | seed (penalise last epoch's heavy experts) | bias (DeepSeek-V3 aux-loss-free) | none
# optimisation
EPOCHS = 5  # passes over the training users
BATCH_SIZE = 64  # users per step (seed 256: ~5 steps an epoch on a demo-sized log, too few to learn)
LR = 1e-3  # Adam learning rate (dense parameters) and SparseAdam (item table)
LR_SCHEDULE = "cosine"  # cosine (linear warm-up over the first 1/20 of the steps, then cosine decay to LR/10) | constant (seed)
LOSS = "allaction"  # allaction (infonce + the long vector scores the future's items and categories) | infonce (in-batch negatives) | bpr (seed)
TAU = 0.1  # temperature on cosine similarities; 1.0 with --loss bpr reproduces the seed
RANDOM_CUTS = True  # a new random history/future cut of every user each epoch; off = the seed's fixed 90/10 split
SEED = runtime.SEED  # seeds data split, initialisation, dropout and negatives
DEVICE = "auto"  # auto | cpu | cuda | cuda:N (auto takes CUDA when present)
PRECISION = "auto"  # training matmuls: auto (bf16 autocast on CUDA and on CPUs with native bf16, AVX512-BF16 or AMX; fp32 elsewhere) | fp32 | bf16
# export and Redis
EXPORT_BATCH_SIZE = inference.BATCH_SIZE  # users per inference batch when computing vectors
REDIS_URL = ""  # redis://[:password@]host:port/db, rediss://, redis+cluster://host:port (any node); empty = localhost:6379, started if needed
REDIS_PREFIX = ""  # key prefix; empty keeps the seed's layout (key = raw user id)
REDIS_FORMAT = "json"  # json (json.loads(r.get(uid))) | f32 (np.frombuffer(r.get(uid), '<f4'), 4x smaller)
REDIS_LAYOUT = "plain"  # plain (key per user) | versioned (keys per model version + a pointer switched at the end)
REDIS_TTL = 0  # seconds before published vectors expire; 0 = never
NO_REDIS = False  # write vectors to disk only
PROGRESS = True  # progress bars
# -----------------------------------------------------------------------------
# How each flag is checked, in one table: a tuple lists the allowed values; "> 0", ">= 0" and "[0, 1)" are
# ranges (NaN and inf are refused for every float). Every numeric constant needs an entry: _constants() refuses
# a constant without one, and a constant without a comment (the comment is the flag's help).
CHECKS = {
    "data_format": ("auto", "tianchi", "userbehavior"), "pooling": ("cls", "mean"),
    "moe_balance": ("running", "seed", "bias", "none"), "loss": ("allaction", "infonce", "bpr"),
    "lr_schedule": ("cosine", "constant"), "precision": ("auto", "fp32", "bf16"), "redis_format": ("json", "f32"), "redis_layout": ("plain", "versioned"),
    **dict.fromkeys(("demo_users", "min_item_count", "n_min", "n_max", "k_min", "k_max", "item_embedding_dim",
                     "category_embedding_dim", "width", "hidden_dim", "depth", "heads", "head_dim", "moe_experts",
                     "moe_activated", "moe_hidden", "epochs", "batch_size", "lr", "tau", "export_batch_size"), "> 0"),
    **dict.fromkeys(("time_window_days", "moe_shared", "seed", "redis_ttl", "category_dim", "category_half_life", "category_top", "category_idf", "item_category_weight"), ">= 0"),
    **dict.fromkeys(("val_fraction", "test_fraction", "dropout"), "[0, 1)"),
}
# Every constant is in exactly one of these two lists (_constants() checks): the settings that define the model
# and data, which a checkpoint only resumes with unchanged, and those a resumed or repeated run may change.
RESUME_KEYS = ("data_path", "data_format", "strict", "dedupe", "time_window_days", "evaluate", "test_fraction", "min_item_count", "n_min", "n_max", "k_min", "k_max",
               "val_fraction", "item_embedding_dim", "category_embedding_dim", "width", "hidden_dim", "category_dim", "depth",
               "heads", "head_dim", "dropout", "pooling", "skip_pool", "exact_categories", "fixed_category_codes", "category_half_life", "category_top", "category_idf", "random_cuts", "moe_experts", "moe_shared", "moe_activated",
               "moe_hidden", "moe_balance", "batch_size", "lr", "lr_schedule", "loss", "tau", "seed")
RUN_ONLY = ("save_dir", "resume", "export_only", "republish", "demo_users", "cache", "rebuild_cache", "epochs", "device",
            "precision", "export_batch_size", "redis_url", "redis_prefix", "redis_format", "redis_layout", "redis_ttl",
            "item_category_weight", "no_redis", "progress")
RESUME_SINCE = {"category_dim": 0, "exact_categories": False, "fixed_category_codes": False, "category_half_life": 0.0, "category_top": 0, "category_idf": 0.0}  # RESUME_KEYS added later: the value a checkpoint without it was made with
EXIT_REDIS = 3  # exit status when the vectors are on disk but Redis could not take them
_RULE = "# " + "-" * 77 + "\n"  # the rules around the constants block


# -----------------------------------------------------------------------------
# the run: the whole job, top to bottom

def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    runtime.tune_malloc()
    ctx, device = distributed.init(cfg.device)
    lock, finished, started = None, False, time.time()
    try:
        lock = preflight(cfg, ctx)
        status = run(cfg, ctx, device)
        finished = True
        return status
    except (data.DataError, model_io.ModelSetError) as e:  # bad input, explained in one line: a traceback would
        raise SystemExit(f"error: {e}") from None           # only bury it (bugs keep theirs)
    except KeyboardInterrupt:                               # Ctrl-C: say what is on disk, exit 130 like a shell
        ckpt = Path(cfg.save_dir) / model_io.CHECKPOINT_FILE
        ours = ckpt.exists() and (cfg.resume or ckpt.stat().st_mtime >= started)   # not an earlier run's
        resume = (f"; {ckpt} holds the last finished epoch: the same command with --resume continues from it"
                  if ours and not (cfg.export_only or cfg.republish) else "")
        print(f"interrupted: every file already written is whole (each is replaced in one step); a Redis publish "
              f"that did not finish is completed by --republish{resume}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if lock is not None:
            lock.close()
        distributed.close(ctx, finished)


def run(cfg, ctx: distributed.Context, device: torch.device) -> int:
    """The whole job; under torchrun every rank runs it, rank 0 alone prints, writes files and publishes."""
    distributed.quiet_unless_main(ctx)
    if not ctx.is_main:
        cfg.progress = False
    cfg.precision = runtime.resolve_precision(cfg.precision, device)   # recorded as used, in config.json too
    print("config: " + json.dumps(public_config(cfg), sort_keys=True))
    # distributed with the cache, each rank reads and trains on its own user shards; else every rank reads
    # the whole log and takes a share of every (identical) global batch
    own = ctx.distributed and cfg.cache
    if ctx.distributed:
        print(f"distributed: {ctx.world} processes ({ctx.backend})"
              + ("" if own or cfg.export_only or cfg.republish else ", a share of every batch each"))
    if cfg.export_only or cfg.republish:
        return run_export_only(cfg, device, ctx)
    runtime.seed_everything(cfg.seed)
    cache = None
    if own:
        cache, events, history, target, cutoff, vocab = read_own_shards(cfg, ctx)
    else:
        events = read_log(cfg, ctx)
        history, target, cutoff = split_target_day(events) if cfg.evaluate else (events, None, None)
        # fitted once, by rank 0, and sent to the others: every rank encodes the data the same way
        vocab = distributed.broadcast(data.Vocab.fit(history, min_item_count=cfg.min_item_count)
                                      if ctx.is_main else None, ctx)
    print(vocab.summary())
    seqs = make_sequences(history, vocab, ("rank 0's " if own else "") + ("history" if cfg.evaluate else "sequences"))
    train_users, val_users, test_users = split_users(seqs, cfg, ctx, own)
    n_train, n_val, n_test = (np.sum(distributed.gather_objects((len(train_users), len(val_users), len(test_users)),
                                                                ctx), axis=0).tolist()
                              if own else (len(train_users), len(val_users), len(test_users)))
    if own:
        print(f"each of {ctx.world} processes trains on its own user shards (rank 0: {seqs.n_users} users, "
              f"{len(events):,} events); batch = the ranks' local batches together")
    elif len(train_users) < ctx.world:
        raise SystemExit(f"error: only {len(train_users)} training users for {ctx.world} processes: every process needs "
                         "a user in every batch (use fewer processes)")
    print(f"training on {n_train} users, validating on {n_val}"
          + (f", {n_test} held out for evaluation" if cfg.evaluate else "") + f"; device {device}")
    # NCCL cannot all-reduce sparse gradients: on GPUs the item table is dense (and takes Adam)
    model = build_model(cfg, vocab, sparse_item_grad=ctx.backend != "nccl").to(device)
    if model.cfg.category_idf:  # a statistic of the training users (every rank's, with own shards)
        users_with = category_users(seqs, train_users, model.cfg.n_categories)
        if own:
            users_with = np.sum(distributed.gather_objects(users_with, ctx), axis=0)
        model.feature_embedding.set_category_frequencies(users_with, n_train)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({model.feature_embedding.item.weight.numel() / 1e6:.2f}M "
          f"in the item table)")
    best, history_log, stop = train(cfg, model, seqs, train_users, val_users, device, ctx, own)
    if stop:
        cause = (f"The training diverged: the learning rate is likely too high (try a lower --lr than {cfg.lr:g}"
                 + (f", or a larger --tau than {cfg.tau:g}" if cfg.tau < 0.05 else "") + ").")
        if best["state"] is None:
            raise SystemExit(f"error: {stop}; no epoch finished with finite results, so no weights were written "
                             f"and nothing was exported. {cause}")
        model.load_state_dict(best["state"])
        if ctx.is_main:
            model_io.save_model(cfg.save_dir, model, vocab, public_config(cfg), {"history": history_log})
        raise SystemExit(f"error: {stop}; saved the last good weights (epoch {best['epoch']}) to "
                         f"{cfg.save_dir}/ and stopped before export. {cause}")
    model.load_state_dict(best["state"])
    version = ""
    heldout = seqs.user_ids[test_users]
    if own:  # every rank's held-out users, by id: one process's order
        heldout = np.sort(np.concatenate(distributed.gather_objects(heldout, ctx)))
    if ctx.is_main:
        extra = {"best_epoch": best["epoch"], "history": history_log, "world_size": ctx.world,
                 "batches": "own shards" if own else "shared"}
        if cfg.evaluate:
            extra["eval"] = {"cutoff_hour": cutoff, "heldout_users": heldout.tolist()}
        version = model_io.save_model(cfg.save_dir, model, vocab, public_config(cfg), extra)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"saved model {version} (best epoch {best['epoch']} on validation) to {cfg.save_dir}/; "
              f"peak memory so far {peak_gb:.1f} GB")
        if cfg.evaluate and own:  # the other ranks wait for it at the export's gather
            seqs = history = None  # rank 0 evaluates on every user's history: let its own shards' copy go first
            run_evaluation_on_every_user(cfg, cache, model, vocab, history_log, device)
        elif cfg.evaluate:
            run_evaluation(cfg, model, seqs, target, vocab, train_users, test_users, history_log, device)
    if cfg.evaluate:
        seqs = make_sequences(events, vocab, ("rank 0's " if own else "") + "export sequences (whole log)")
    return export(cfg, model, seqs, version, device, ctx, own_users=own)


def preflight(cfg, ctx: distributed.Context = distributed.Context()):
    """Fail before the work, not after it: the save folder can be written and is this run's alone (its lock,
    returned, is held until the run ends), and the Redis URL answers and takes its credentials. Rank 0 checks;
    every rank stops on its verdict."""
    lock, error = None, None
    if ctx.is_main:
        try:
            if not cfg.republish:  # --republish writes nothing there
                lock = model_io.lock_save_dir(cfg.save_dir)
            if not cfg.no_redis:
                redis_store.preflight(cfg.redis_url)
        except model_io.ModelSetError as e:
            error = f"error: {e}"
        except redis_store.RedisExportError as e:
            error = (f"error: {e} Nothing was read or trained: fix --redis_url, or pass --no_redis to write the "
                     "vectors to disk only.")
    error = distributed.broadcast(error, ctx)
    if error:
        if lock is not None:
            lock.close()
        raise SystemExit(error)
    return lock

# -----------------------------------------------------------------------------
# flags

def _constants() -> dict[str, tuple[Any, str]]:
    """The upper-case constants above with their one-line comments (the flags' help). A constant without a
    comment, a numeric one without a CHECKS entry, one in neither or both of RESUME_KEYS and RUN_ONLY, or a
    table entry naming no constant is a bug in this file, caught here rather than left as a flag that silently
    is not one, is not checked, or resumes under a changed setting."""
    src = Path(__file__).read_text().split(_RULE)[1]  # the block between the first two rules
    names = re.findall(r"^([A-Z][A-Z0-9_]*) = ", src, re.M)
    comments = dict(re.findall(r"^([A-Z][A-Z0-9_]*) = .*?#[ \t]*(.*)$", src, re.M))
    flags = {n.lower() for n in names}
    problems = [f"{n} has no comment (its flag's help)" for n in names if not comments.get(n, "").strip()]
    problems += [f"{n} has no entry in CHECKS" for n in names
                 if type(globals()[n]) in (int, float) and n.lower() not in CHECKS]
    problems += [f"CHECKS names {k!r}, which is no constant" for k in CHECKS if k not in flags]
    problems += [f"{n} is in {'both' if n.lower() in RESUME_KEYS else 'neither'} of RESUME_KEYS and RUN_ONLY "
                 f"(may a resumed run change it?)" for n in names if (n.lower() in RESUME_KEYS) == (n.lower() in RUN_ONLY)]
    problems += [f"{k!r} in RESUME_KEYS or RUN_ONLY is no constant" for k in RESUME_KEYS + RUN_ONLY if k not in flags]
    if problems:
        raise RuntimeError("train.py's constants: " + "; ".join(problems))
    return {name: (globals()[name], comments[name]) for name in names}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for name, (default, help_) in _constants().items():
        flag = "--" + name.lower()
        if isinstance(default, bool):
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
        else:
            rule = CHECKS.get(name.lower())
            p.add_argument(flag, default=default, type=type(default), help=f"{help_} (default: {default})",
                           choices=rule if isinstance(rule, tuple) else None)
    return p


_RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "[0, 1)": lambda v: 0 <= v < 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    cfg = p.parse_args(argv)
    for key, value in vars(cfg).items():  # float('nan') and 'inf' parse, and NaN slips through every comparison
        if isinstance(value, float) and not math.isfinite(value):
            p.error(f"--{key} must be a finite number, got {value}")
        rule = CHECKS.get(key)
        if isinstance(rule, str) and not _RANGES[rule](value):
            p.error(f"--{key} must be {'in ' if rule.startswith('[') else ''}{rule}, got {value}")
    for small, large in (("n_min", "n_max"), ("k_min", "k_max"), ("moe_activated", "moe_experts")):
        if getattr(cfg, small) > getattr(cfg, large):
            p.error(f"--{small} ({getattr(cfg, small)}) must not exceed --{large} ({getattr(cfg, large)})")
    if cfg.category_dim >= cfg.hidden_dim:
        p.error(f"--category_dim ({cfg.category_dim}) must be below --hidden_dim ({cfg.hidden_dim}): the rest of the "
                f"vector is the item half (0: half of it)")
    if cfg.export_only and cfg.republish:
        p.error("--export_only and --republish exclude each other")
    return cfg


# -----------------------------------------------------------------------------
# data

def read_log(cfg, ctx=distributed.Context(), own_shards: bool = False):
    """Read the log, generating the demo log first when the default folder holds none (one process per
    node writes it; every process reads the log). own_shards (with the cache, distributed): only the users
    of this process's shards (shard k goes to rank k mod world), so each holds ~1/world of the events."""
    ensure_log(cfg, ctx)
    if not cfg.cache:
        events, report = data.read_events(cfg.data_path, data_format=cfg.data_format, strict=cfg.strict,
                                          dedupe=cfg.dedupe, progress=cfg.progress,
                                          time_window_days=cfg.time_window_days)
        print(report.summary())
        return events
    cache = load_cache(cfg, ctx)
    print(cache.report.summary())
    if own_shards and ctx.distributed:
        return own_events(cache, ctx)
    return cache.events()


def ensure_log(cfg, ctx=distributed.Context()) -> None:
    """The demo log, written first when the default folder holds no log (by one process per node)."""
    path = Path(cfg.data_path)
    if cfg.data_path == DATA_PATH and not _has_log(path) and ctx.local_rank == 0:
        target = path / data.TIANCHI_FILE
        print(f"No log under {path}/: generating the demo log ({cfg.demo_users} users) at {target}")
        demo_data.write_log(target, n_users=cfg.demo_users, seed=cfg.seed)
    distributed.barrier(ctx)


def own_events(cache: event_cache.Cache, ctx: distributed.Context):
    """The events of this rank's cache shards: shard k goes to rank k mod world."""
    shards = list(range(ctx.rank, cache.n_shards, ctx.world))
    print(f"each of {ctx.world} processes reads only its own user shards of the cache's {cache.n_shards} "
          f"(rank 0: {len(shards)})")
    return cache.events(shards)


def read_own_shards(cfg, ctx: distributed.Context):
    """Distributed training with the cache: this rank's shards only. -> (cache, events, history, target,
    cutoff, vocab): the target day is the whole log's (from the cache's hour histogram), so every rank cuts
    at the same hour; the vocabulary is fitted once, by rank 0 from every shard's counts (what Vocab.fit of
    the whole history gives), and sent to the others."""
    ensure_log(cfg, ctx)
    cache = load_cache(cfg, ctx)
    print(cache.report.summary())
    events = own_events(cache, ctx)
    cutoff = cache.last_days_cutoff(1) if cfg.evaluate else None
    history, target = events, None
    if cfg.evaluate:
        history, target, cutoff = split_target_day(events, cutoff, whose="rank 0's ")
    sizes = distributed.gather_objects((len(events), len(history)), ctx)
    empty = [r for r, (n, h) in enumerate(sizes) if h == 0]
    if empty:  # every rank stops here, none waits at a later collective for one that failed
        raise SystemExit(f"error: rank {empty[0]} holds no {'history ' if sizes[empty[0]][0] else ''}events in its "
                         f"shards of the cache ({cache.n_shards} shards, rank r takes shard k when k mod "
                         f"{ctx.world} = r): use fewer processes, or --no-cache (every rank reads the whole log)")
    vocab = distributed.broadcast(cache.fit_vocab(before_hour=cutoff, min_item_count=cfg.min_item_count)
                                  if ctx.is_main else None, ctx)
    return cache, events, history, target, cutoff, vocab


def load_cache(cfg, ctx=distributed.Context()) -> event_cache.Cache:
    """The log's event cache (event_cache.load): one process per node checks or builds it while the others
    wait, then they reuse it. Bad input raises in every process (the others meet it when they load)."""
    def load(rebuild: bool) -> event_cache.Cache:
        return event_cache.load(cfg.data_path, data_format=cfg.data_format, strict=cfg.strict, dedupe=cfg.dedupe,
                                time_window_days=cfg.time_window_days, rebuild=rebuild, progress=cfg.progress,
                                save_dir=cfg.save_dir)
    cache = error = None
    if ctx.local_rank == 0:
        try:
            cache = load(cfg.rebuild_cache)
        except data.DataError as e:
            error = e
    distributed.barrier(ctx)
    if error is not None:
        raise error
    return cache if cache is not None else load(False)


def _has_log(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.glob("*.csv*")))  # not <log>.cache/


def split_target_day(events, cutoff: int | None = None, whose: str = ""):
    """(history, target-day events, cutoff hour): sequences and vocabulary only ever see history. cutoff:
    the whole log's target day, when events are one rank's part (default: the events' own last day)."""
    history, target, cutoff, n_after = data.split_last_day(events, cutoff)
    if n_after:
        print(f"evaluation: {whose}{n_after} rows after the target day are left out of it")
    print(f"evaluation: target day {data.hour_to_str(cutoff)[:10]} ({whose}{len(target):,} events) held out of "
          f"training; {whose}{len(history):,} earlier events form the sequences")
    return history, target, cutoff


def make_sequences(events, vocab, what: str = "sequences"):
    seqs = data.build_sequences(events, vocab)
    print(seqs.summary().replace("sequences", what, 1))
    return seqs


def split_users(seqs, cfg, ctx: distributed.Context = distributed.Context(),
                own_users: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trainable users split into (train, validation, test) indices of seqs. Test users (only with
    --evaluate) are never trained on; validation users choose the best epoch.

    A user's role is a function of their raw id and the seed (user_split_hash against the fractions), not
    of who else is in the log: one process and any number of ranks holding shards of the users hold out
    the same users, and a user keeps their role when the log grows by a day. own_users: seqs holds this
    rank's users only; the counts checked are the sums over the ranks.
    """
    users = np.asarray(seqs.trainable)
    h = user_split_hash(seqs.user_ids[users], cfg.seed)
    test = h < _fraction_threshold(cfg.test_fraction if cfg.evaluate else 0.0)
    val = ~test & (h < _fraction_threshold((cfg.test_fraction if cfg.evaluate else 0.0) + cfg.val_fraction))

    def total(a) -> int:
        return sum(distributed.gather_objects(int(a), ctx)) if own_users else int(a)

    if cfg.val_fraction > 0 and total(val.sum()) < 2:  # validation ranks a user among the others: it needs two
        lowest = np.sort(h[~test])[:2]                 # ... so the two next in line in hash order
        if own_users:
            lowest = np.sort(np.concatenate(distributed.gather_objects(lowest, ctx)))[:2]
        val = ~test & (h <= lowest[-1]) if len(lowest) else val
    n_all, n_test, n_val = total(len(users)), total(test.sum()), total(val.sum())
    if n_all - n_test - n_val < 2:
        raise SystemExit(f"error: only {n_all} user(s) have the 2+ events needed for a long and a short sequence; "
                         f"after holding out {n_test} test and {n_val} validation users fewer than 2 are left "
                         "to train on (lower --test_fraction / --val_fraction, or --no-evaluate)")
    return users[~test & ~val], users[val], users[test]


def user_split_hash(user_ids, seed: int) -> np.ndarray:
    """(U,) uint64: where each raw user id falls in the train/validation/test split of this seed (splitmix64 of
    the id mixed with the seed's own hash, so it is independent of the cache's shard hash)."""
    key = data.splitmix64(np.array([seed], np.int64)).view(np.int64)[0]
    return data.splitmix64(np.asarray(user_ids, np.int64) ^ key)


def _fraction_threshold(fraction: float) -> np.uint64:
    """The hash value below which `fraction` of uniformly hashed users fall."""
    return np.uint64(min(int(fraction * 2.0 ** 64), 2 ** 64 - 1))


# -----------------------------------------------------------------------------
# model and optimisers

def build_model(cfg, vocab, sparse_item_grad: bool = True):
    target_head = cfg.skip_pool or cfg.loss == "allaction"  # the settings below that act on target vectors need it
    mcfg = ModelConfig(n_items=vocab.n_items, n_categories=vocab.n_categories,
                       item_embedding_dim=cfg.item_embedding_dim, category_embedding_dim=cfg.category_embedding_dim,
                       width=cfg.width, depth=cfg.depth, heads=cfg.heads, head_dim=cfg.head_dim,
                       hidden_dim=cfg.hidden_dim, category_dim=cfg.category_dim if target_head else 0,
                       dropout=cfg.dropout, max_positions=max(cfg.n_max, cfg.k_max),
                       pooling=cfg.pooling, sparse_item_grad=sparse_item_grad,
                       target_head=target_head, skip_pool=cfg.skip_pool,
                       exact_categories=cfg.exact_categories and cfg.skip_pool,
                       fixed_category_codes=cfg.fixed_category_codes and target_head,
                       category_half_life=cfg.category_half_life if cfg.skip_pool else 0.0,
                       category_top=cfg.category_top if cfg.skip_pool else 0,
                       category_idf=cfg.category_idf if cfg.skip_pool else 0.0,
                       item_category_weight=cfg.item_category_weight if target_head else 1.0)
    moe = MoEConfig(dim=cfg.width, n_routed_experts=cfg.moe_experts, n_shared_experts=cfg.moe_shared,
                    n_activated=cfg.moe_activated, hidden=cfg.moe_hidden, dropout=cfg.dropout,
                    balance=cfg.moe_balance)
    return LongTermInterestModel(mcfg, moe)


def category_users(seqs, users: np.ndarray, n_categories: int) -> np.ndarray:
    """(n_categories,) int64: how many of the users have each category among their events."""
    starts, ends = seqs.part_bounds(np.asarray(users, np.int64), "all")
    pos, owner = data.expand_ranges(starts, ends)
    pairs = np.unique(owner.astype(np.int64) * n_categories + seqs.category[pos])
    return np.bincount(pairs % n_categories, minlength=n_categories)


def build_optimizers(model, lr: float):
    """Adam for the dense parameters (the seed's settings); SparseAdam for the item table, whose dense
    update would cost more than the whole forward and backward on a real log."""
    sparse, dense = model.param_groups()
    opts = [torch.optim.Adam(dense, lr=lr, fused=True)]  # fused: one kernel, ~10x faster than foreach on CPU
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=lr))
    return opts


# -----------------------------------------------------------------------------
# training

def train(cfg, model, seqs, train_users, val_users, device,
          ctx: distributed.Context = distributed.Context(), own_users: bool = False) -> tuple[dict, list, str]:
    """The epoch loop: returns (best epoch chosen on validation with its state_dict, history, stop). stop is ''
    or why training stopped early (a non-finite loss, validation figure or weight): best is then the last good
    epoch (state None if there was none). Distributed, every rank runs it (and ends with the same weights);
    rank 0 writes the checkpoint. own_users: seqs and the user indices are this rank's own users only."""
    opts = build_optimizers(model, cfg.lr)
    save_dir = Path(cfg.save_dir)
    ckpt_path = save_dir / model_io.CHECKPOINT_FILE
    start, best, history = 0, {"epoch": 0, "score": -math.inf, "state": None}, []
    if cfg.resume:
        start, best, history = restore_checkpoint(ckpt_path, model, opts, cfg, ctx)
        print(f"resumed from {ckpt_path} after epoch {start}")
    if ctx.rank:  # dropout masks differ between ranks; rank 0 keeps the single-process stream
        torch.manual_seed(cfg.seed + ctx.rank)
    net = distributed.wrap(model, ctx, device)
    for epoch in range(start, cfg.epochs):
        try:
            rec = {"epoch": epoch + 1,
                   **train_epoch(model, opts, seqs, train_users, cfg, device, epoch, ctx, net, own_users)}
        except NonFiniteLoss as e:
            return best, history, str(e)
        rec["moe"] = model.moe_layer.end_epoch()
        rec.update(validate(model, seqs, val_users, cfg, device, ctx, own_users))
        reason = non_finite_reason(model, rec)
        if reason:  # never chosen as best, never checkpointed: the run stops on the last good epoch
            return best, history, f"{reason} at epoch {epoch + 1}"
        score = rec.get("val_mrr", -rec["train_loss"])  # no validation users: fall back on the training loss
        if score > best["score"]:
            best = {"epoch": epoch + 1, "score": score,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        history.append(rec)
        print(format_epoch(rec))
        if ctx.is_main:
            model_io.atomic_torch_save(checkpoint_state(model, opts, epoch + 1, best, history, cfg), ckpt_path)
    return best, history, ""


def train_epoch(model, opts, seqs, users, cfg, device, epoch: int,
                ctx: distributed.Context = distributed.Context(), net=None, own_users: bool = False) -> dict[str, Any]:
    """One pass over the training users; returns the mean loss, the users trained on and throughput. The
    epoch's shuffling and negatives come from an RNG derived from (seed, epoch), so a resumed run draws the
    same ones, and so does every rank of a distributed run: each takes a contiguous share of every batch
    (see distributed). own_users (distributed, each rank holding its own users): each rank cuts its shuffled
    users (RNG from (seed, epoch, rank)) into as many local batches as plan_steps gives every rank; a step's
    global batch is the ranks' local batches together, in rank order."""
    rank_key = [ctx.rank] if own_users else []
    rng = np.random.default_rng([cfg.seed, 1, epoch, *rank_key])
    cut_rng = np.random.default_rng([cfg.seed, 5, epoch, *rank_key]) if cfg.random_cuts else None
    log_q = item_log_q(seqs, model.cfg.n_items, ctx if own_users else distributed.Context()) \
        if cfg.loss == "allaction" else None
    net = net if net is not None else model  # distributed: the DDP-wrapped model
    model.train()
    lengths = np.asarray(seqs.lengths)
    sizes = None
    if own_users:
        steps = plan_steps(distributed.gather_objects(len(users), ctx), cfg.batch_size)
        batches = local_batches(users, lengths, steps, rng)
        sizes = np.array(distributed.gather_objects([len(b) for b in batches], ctx))  # (ranks, steps)
        shift_rng = np.random.default_rng([cfg.seed, 6, epoch])  # the same on every rank: it sees the global batch
    else:
        batches = epoch_batches(users, lengths, cfg.batch_size, rng, min_size=max(2, ctx.world))
    total, seen, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress,
               dynamic_ncols=True)
    for step, batch_users in enumerate(bar):
        step_sizes = None if sizes is None else sizes[:, step].tolist()
        n = len(batch_users) if sizes is None else sum(step_sizes)
        neg_shift = int((rng if sizes is None else shift_rng).integers(1, n))
        factor = lr_factor(epoch * len(batches) + step, cfg.epochs * len(batches), cfg.lr_schedule)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor
        loss, value = batch_forward(net, seqs, batch_users, neg_shift, cfg, device, ctx, cut_rng, log_q,
                                    step_sizes)
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss became {value} at epoch {epoch + 1}, step {step + 1}")
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        model.moe_layer.after_step()
        total += value * n
        seen += n
        bar.set_postfix(loss=f"{total / seen:.4f}")
    seconds = time.perf_counter() - t0
    out = {"train_loss": total / seen, "seconds": seconds, "triplets_per_s": seen / seconds, "users": seen}
    if sizes is not None:
        out["rank_users"] = sizes.sum(1).tolist()  # users each rank trained on this epoch
    return out


def batch_forward(net, seqs, batch_users: np.ndarray, neg_shift: int, cfg, device,
                  ctx: distributed.Context = distributed.Context(), cut_rng: np.random.Generator | None = None,
                  log_q: np.ndarray | None = None, sizes: list[int] | None = None) -> tuple[torch.Tensor, float]:
    """Forward pass of one batch (distributed: this rank's contiguous share of it, with the whole batch's
    short vectors gathered for the negatives). With cut_rng every user's history is cut at a random point
    (Sequences.cut_bounds): the long tower reads the events before the cut, the short tower and the
    'allaction' objective the next K_MAX events; without, the fixed 90/10 parts. Returns (loss to
    backpropagate, the batch's mean loss); the first is scaled so that DDP's average over ranks is the
    gradient of the whole batch's mean.

    sizes (own users): batch_users are this rank's local batch only, sizes[r] the local batch size of each
    rank; the global batch is the local batches in rank order, and the loss is the one of that batch (the
    negatives and the 'allaction' candidates come from every rank's users). A rank with no user in the step
    still runs its forward and backward (DDP and the gather need every rank) and adds nothing."""
    to_t = inference.batch_to_tensors
    own = sizes is not None
    # rows: this rank's rows of the global batch; local: the same rows among the batch_users it builds
    if own:  # this rank's users are its local batch
        n, start = sum(sizes), sum(sizes[:ctx.rank])
        rows, mine = slice(start, start + len(batch_users)), batch_users
        local = slice(0, len(mine))
    else:  # every rank holds the whole batch: a contiguous share is its own
        n = len(batch_users)
        sizes, rows = distributed.split_sizes(n, ctx.world), distributed.shard_slice(n, ctx)
        mine, local = batch_users[rows], rows
    if cut_rng is not None:  # drawn for every user built, so ranks holding the whole batch draw the same cuts
        start_, cut, end = seqs.cut_bounds(batch_users, cut_rng)
        long_b = seqs.range_batch(start_[local], cut[local], cfg.n_min, cfg.n_max)
        short_built = seqs.range_batch(cut, np.minimum(end, cut + cfg.k_max), cfg.k_min, cfg.k_max)
    else:
        long_b = seqs.batch(mine, "long", cfg.n_min, cfg.n_max)
        short_built = seqs.batch(batch_users, "short", cfg.k_min, cfg.k_max)
    short_b = {k: v[local] for k, v in short_built.items()}
    cands = pairs = None
    if cfg.loss == "allaction":
        batch_events = None
        if own:  # the candidates come from every rank's futures, in rank order: one process's batch order
            parts = distributed.gather_objects(known_future_events(short_b), ctx)
            batch_events = tuple(np.concatenate(p) for p in zip(*parts))
        cands, pairs = future_candidates(short_built, local, getattr(net, "module", net).cfg.n_categories, log_q,
                                         batch_events)
    with inference.autocast(device, cfg.precision):
        long_v, short_v, cand_v = net(to_t(long_b, device), to_t(short_b, device),
                                      [tuple(torch.from_numpy(np.asarray(a, np.int64)).to(device) for a in c)
                                       for c in cands] if cands else None)
    short_all = distributed.gather_rows(short_v.float(), sizes, ctx)
    if len(mine) == 0:  # zero, but through every output: the backward's collectives run as on the other ranks
        loss_sum = 0.0 * (short_all.sum() + long_v.float().sum() + sum(v.float().sum() for v in cand_v))
    else:
        future = None
        if pairs:
            future = [(v.float(), torch.from_numpy(u).to(device), torch.from_numpy(c).to(device),
                       None if q is None else torch.from_numpy(q).to(device)) for v, (u, c, q) in zip(cand_v, pairs)]
        loss, _ = batch_loss(long_v.float(), short_all, cfg.loss, cfg.tau, neg_shift, rows, future)
        loss_sum = loss * len(mine)
    value = distributed.all_reduce_sum(loss_sum.detach(), ctx).item() / n
    return loss_sum * (ctx.world / n), value


def known_future_events(short: dict) -> tuple[np.ndarray, np.ndarray]:
    """(item, category) of the known items among a short batch's events, row after row."""
    known = short["mask"] & (short["item"] > data.UNKNOWN)
    return short["item"][known], short["category"][known]


def future_candidates(short: dict, rows: slice, n_categories: int, log_q: np.ndarray | None,
                      batch_events: tuple[np.ndarray, np.ndarray] | None = None):
    """Candidates and positives of the 'allaction' objective from the whole batch's future events.

    Categories: every known category (a full softmax); a category candidate is (unknown item, category), as
    in evaluate.py. Items: the distinct known items of the batch's futures with their category there
    (in-batch negatives, logQ-corrected). Returns [(item index, category index) candidate arrays] and
    [(pair_user, pair_cand, log_q)] per set; pairs only for `rows` of `short`, numbered from 0.
    batch_events: known_future_events of the whole batch in batch order, when `short` holds only this
    rank's part of it (default: short holds the whole batch).
    """
    batch_items, batch_cats = known_future_events(short) if batch_events is None else batch_events
    items, first = np.unique(batch_items, return_index=True)
    cats = np.arange(2, n_categories)
    cands = [(np.full(len(cats), data.UNKNOWN), cats), (items, batch_cats[first])]
    mask = short["mask"][rows]
    known = mask & (short["item"][rows] > data.UNKNOWN)
    cat_user, cat_pos = np.nonzero(mask)[0], short["category"][rows][mask] - 2   # every known category >= 2
    ok = cat_pos >= 0
    item_user, item_pos = np.nonzero(known)[0], np.searchsorted(items, short["item"][rows][known])
    pairs = [(cat_user[ok], cat_pos[ok], None),
             (item_user, item_pos, None if log_q is None else log_q[items])]
    return cands, pairs


def item_log_q(seqs, n_items: int, ctx: distributed.Context = distributed.Context()) -> np.ndarray:
    """(n_items,) log share of each item among the events: how likely it is to be an in-batch candidate.
    Distributed with own users (ctx given): the counts of every rank's events, so every rank has one process's."""
    counts = np.bincount(seqs.item, minlength=n_items)
    if ctx.distributed:
        counts = distributed.all_reduce_sum(torch.from_numpy(counts), ctx).numpy()
    counts = counts.astype(np.float64) + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)


def epoch_batches(users: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  bucket: int = 16, min_size: int = 2) -> list[np.ndarray]:
    """Shuffled users cut into near-equal batches of at most batch_size and at least min_size (2: a negative
    needs another user in the batch; distributed, at least one user per rank). Within windows of `bucket` batches users are ordered by length, so a batch
    is padded to its own users' lengths rather than to the longest history in the log; the batches are
    then shuffled."""
    n_batches = max(min(math.ceil(len(users) / batch_size), len(users) // min_size), 1)
    return local_batches(users, lengths, n_batches, rng, bucket)


def local_batches(users: np.ndarray, lengths: np.ndarray, n_batches: int, rng: np.random.Generator,
                  bucket: int = 16) -> list[np.ndarray]:
    """The users shuffled, ordered by length within windows of `bucket` batches, cut into n_batches
    near-equal batches (sizes differ by at most 1; empty ones when there are fewer users than batches),
    in shuffled order. epoch_batches of one process; under torchrun with own shards, a rank's share of
    every step (plan_steps)."""
    order = rng.permutation(users)
    window = max(math.ceil(len(order) / n_batches), 1) * bucket
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        order[start:start + window] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    batches = np.array_split(order, n_batches)
    return [batches[i] for i in rng.permutation(n_batches)]


def plan_steps(counts: list[int], batch_size: int) -> int:
    """Steps of an epoch when rank r trains on its own counts[r] users: as many as global batches of at most
    batch_size users need (every rank must take the same number: DDP all-reduces at every step), fewer if
    that is what it takes for every step's global batch to hold 2 users (a negative needs another user).
    Rank r cuts its users into that many near-equal local batches, each at least counts[r] // steps."""
    c = np.asarray(counts, np.int64)
    if c.sum() < 2:
        raise ValueError(f"need 2 or more training users over all ranks, got {int(c.sum())}")
    lo, hi = 1, max(math.ceil(int(c.sum()) / batch_size), 1)
    while lo < hi:  # the smallest global batch, sum(c // steps), shrinks as steps grow: bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if (c // mid).sum() >= 2 else (lo, mid - 1)
    return lo


def lr_factor(step: int, total: int, schedule: str, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Multiplier of LR at optimizer step `step` (0-based) of `total`: 'constant' is 1; 'cosine' rises
    linearly over the first `warmup` share of the steps, then decays along a cosine to `floor`. A function
    of the step alone, so a resumed run continues the same schedule."""
    if schedule == "constant":
        return 1.0
    n_warm = max(1, round(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    progress = (step - n_warm) / max(1, total - n_warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def validate(model, seqs, users, cfg, device, ctx: distributed.Context = distributed.Context(),
             own_users: bool = False) -> dict[str, float]:
    """BPR loss with fixed negatives (the next user's short vector) and re-identification MRR among the
    validation users: rank of a user's own short vector by cosine with their long vector. Distributed,
    the ranks share the work and all get the same figures. own_users: each rank embeds its own validation
    users; the vectors of all of them, gathered in user-id order (one process's), are scored on every rank."""
    n = sum(distributed.gather_objects(len(users), ctx)) if own_users else len(users)
    if n < 2:
        return {}
    kw = dict(progress=False, batch_size=cfg.export_batch_size)

    def vectors(**part):
        if own_users:
            return distributed.gather_own_user_vectors(model, seqs, ctx, device, users=users, **part, **kw)[1]
        return distributed.sharded_user_vectors(model, seqs, users, ctx, device, **part, **kw)

    long_v = torch.from_numpy(vectors(part="long", tower="long", min_len=cfg.n_min, max_len=cfg.n_max))
    short_v = torch.from_numpy(vectors(part="short", tower="short", min_len=cfg.k_min, max_len=cfg.k_max))
    loss, metrics = batch_loss(long_v, short_v, "bpr", cfg.tau, neg_shift=1)
    tie_order = np.random.default_rng([cfg.seed, 3]).permutation(n)  # ties rank as chance, as in evaluate
    reid = evaluate.reid_metrics(evaluate.reid_ranks(long_v.numpy(), short_v.numpy(), tie_order))
    return {"val_loss": loss.item(), "val_acc": float(metrics["acc"]), "val_mrr": reid["mrr"],
            "val_recall@10": reid["recall@10"]}


class NonFiniteLoss(RuntimeError):
    """A training step's loss is NaN or inf (train_epoch raises it; train() stops on the last good epoch)."""


def non_finite_reason(model, rec: dict[str, Any]) -> str:
    """Why an epoch's result cannot be kept ('' when it can): a non-finite validation figure or weight."""
    for key in ("val_loss", "val_mrr"):
        if key in rec and not math.isfinite(rec[key]):
            return f"validation {key[4:]} became {rec[key]}"
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        return f"{len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]})"
    return ""


def checkpoint_state(model, opts, epoch, best, history, cfg) -> dict[str, Any]:
    return {"epoch": epoch, "model": model.state_dict(), "optimizers": [o.state_dict() for o in opts],
            "best": best, "history": history, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": {k: getattr(cfg, k) for k in RESUME_KEYS}}


def restore_checkpoint(path: Path, model, opts, cfg, ctx=distributed.Context()) -> tuple[int, dict, list]:
    """Rank 0 reads the checkpoint and sends it to the others (no shared file system needed)."""
    ckpt = distributed.broadcast(torch.load(path, map_location="cpu", weights_only=False)
                                 if ctx.is_main and path.exists() else None, ctx)
    if ckpt is None:
        raise SystemExit(f"error: --resume: no checkpoint at {path}")
    # settings added since: a checkpoint without one was made with the value that matched the old behaviour
    made_with = {**RESUME_SINCE, **ckpt["config"]}
    changed = {k: (v, getattr(cfg, k)) for k, v in made_with.items() if getattr(cfg, k) != v}
    if changed:
        raise SystemExit(f"error: --resume: {path} was made with other settings "
                         + ", ".join(f"--{k} {old!r} (now {new!r})" for k, (old, new) in changed.items()))
    model.load_state_dict(ckpt["model"])
    try:
        for opt, state in zip(opts, ckpt["optimizers"], strict=True):
            opt.load_state_dict(state)
    except ValueError:  # e.g. the two dense Adam groups of checkpoints written before 2026-12-04
        raise SystemExit(f"error: --resume: {path} was written by an older train.py whose optimiser state has "
                         "another layout; start the run again without --resume") from None
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["epoch"], ckpt["best"], ckpt["history"]


def format_epoch(rec: dict[str, Any]) -> str:
    moe = rec.get("moe", {})
    val = (f"val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.3f} MRR {rec['val_mrr']:.3f} "
           if "val_loss" in rec else "")
    return (f"epoch {rec['epoch']}: train loss {rec['train_loss']:.4f} | {val}| "
            f"{rec['triplets_per_s']:.1f} triplets/s | experts: max-violation {moe.get('max_violation', 0):.2f} "
            f"cv {moe.get('cv', 0):.2f} dead {moe.get('dead', 0)} load {_load_summary(moe.get('load'))}")


def _load_summary(load) -> str:
    if not load:
        return "-"
    share = np.asarray(load, dtype=float) / max(sum(load), 1)
    q = np.quantile(share, [0, 0.5, 1])
    return f"share min/median/max {q[0]:.3%}/{q[1]:.3%}/{q[2]:.3%}"


# -----------------------------------------------------------------------------
# export and evaluation

def export(cfg, model, seqs, version: str, device, ctx: distributed.Context = distributed.Context(),
           own_users: bool = False) -> int:
    """Every user's long-term vector (most recent N_MAX events through the long tower) -> disk -> Redis.
    Distributed, each rank computes a share of the users (own_users: seqs holds only this rank's users, None
    if it has none), rank 0 writes the file, and each rank publishes a share (see publish)."""
    t0 = time.perf_counter()
    kw = dict(part="all", tower="long", min_len=cfg.n_min, max_len=cfg.n_max, batch_size=cfg.export_batch_size,
              progress=cfg.progress)
    mine = None
    if own_users:  # each rank keeps its own vectors (it publishes them); rank 0 alone gets them all, for the file
        mine = distributed.own_user_vectors(model, seqs, ctx, device, **kw)
        counts = distributed.gather_objects((int((~np.isfinite(mine[1])).any(axis=1).sum()), len(mine[0])), ctx)
        bad, n = np.sum(counts, axis=0).tolist()                     # one verdict, on every rank
        user_ids, vectors = distributed.gather_to_main(*mine, ctx, device) if not bad else (None, None)
    else:
        user_ids, vectors = seqs.user_ids, distributed.sharded_user_vectors(model, seqs, None, ctx, device, **kw)
        bad, n = int((~np.isfinite(vectors)).any(axis=1).sum()), len(vectors)  # every rank holds every vector
    seconds = time.perf_counter() - t0
    if bad:  # checked before the disk, so a NaN file never replaces good vectors
        if not ctx.is_main:
            return 0
        raise SystemExit(f"error: {bad} of {n} user vectors hold NaN or inf; nothing was written to "
                         f"{cfg.save_dir}/{model_io.VECTORS_FILE} or Redis. The model's weights are not usable: "
                         "retrain with a lower --lr (or a larger --tau).")
    path = Path(cfg.save_dir) / model_io.VECTORS_FILE
    if ctx.is_main:
        path = model_io.save_vectors(cfg.save_dir, user_ids, vectors, version)
        print(f"computed {len(vectors)} user vectors in {seconds:.1f} s ({len(vectors) / seconds:.0f} users/s) "
              f"-> {path}")
    distributed.barrier(ctx)  # on disk before any of them reaches Redis
    return publish(cfg, user_ids, vectors, version, path, ctx, mine)


def publish(cfg, user_ids: np.ndarray | None, vectors: np.ndarray | None, version: str, vectors_path: Path,
            ctx: distributed.Context = distributed.Context(), mine: tuple | None = None) -> int:
    """Publish to Redis; returns the process exit status (0, or EXIT_REDIS with the vectors safe on disk).

    Under torchrun every rank writes its share of the users (to a cluster: straight to the primaries
    owning their keys): mine, the (ids, vectors) it computed itself, or else a contiguous share of
    (user_ids, vectors), which every rank then holds (with mine, only rank 0 holds them all). Rank 0 checks
    and registers the publish first, and records the metadata and switches the versioned pointer once,
    after every rank's keys are acknowledged. A failure on any rank leaves the pointer and __meta__ as they
    were (the re-publish hint completes it)."""
    if cfg.no_redis:
        print(f"--no_redis: vectors are in {vectors_path}; publish later with "
              f"python train.py --republish --save_dir {cfg.save_dir}")
        return 0
    url, error = cfg.redis_url, None
    try:
        if not url and ctx.is_main:
            url, started = redis_servers.ensure_local_server(Path(cfg.save_dir) / "redis")
            if started:
                print(f"started a bundled Redis-compatible server (Valkey) at {url}, data in "
                      f"{Path(cfg.save_dir) / 'redis'}; stop it with: {redis_servers.stop_hint(Path(cfg.save_dir) / 'redis')}")
    except redis_store.RedisExportError as e:
        error = str(e)
    url, error = distributed.broadcast((url, error), ctx)
    # the bundled server listens on rank 0's machine only: then rank 0 writes every key
    sharded = ctx.distributed and bool(cfg.redis_url)
    if sharded and mine is not None:
        ids, part_vectors = mine
    elif sharded:
        part = distributed.shard_slice(len(user_ids), ctx)
        ids, part_vectors = user_ids[part], vectors[part]
    elif ctx.is_main:
        ids, part_vectors = user_ids, vectors
    else:
        ids, part_vectors = (t[:0] for t in (mine if mine is not None else (user_ids, vectors)))
    hint = f"python train.py --republish --save_dir {cfg.save_dir}" + redis_flags(cfg, url)
    where = {"vectors_path": str(vectors_path), "republish_hint": hint}

    def attempt(fn, ranks: str = "all"):
        """fn() on every rank (or rank 0) unless a rank already failed -> (result, this rank's error)."""
        if error is not None or (ranks == "main" and not ctx.is_main):
            return None, error
        try:
            return fn(), None
        except redis_store.RedisExportError as e:
            return None, (f"rank {ctx.rank}: " if ctx.distributed else "") + str(e)

    def agree(err):
        """Every rank learns the first rank's error (a collective: every rank calls it)."""
        return next((e for e in distributed.gather_objects(err, ctx) if e), None)

    client, error = attempt(lambda: redis_store.connect(url, **where) if len(ids) or ctx.is_main else None)
    prepared, error = attempt(lambda: redis_store.prepare(ids, part_vectors, cfg.redis_format, allow_empty=True))
    error = agree(error)
    fingerprints = distributed.gather_objects(prepared[2] if prepared and len(ids) else "", ctx)
    plan, error = attempt(lambda: redis_store.begin(
        client, prefix=cfg.redis_prefix, fmt=cfg.redis_format, layout=cfg.redis_layout, version=version,
        ttl=cfg.redis_ttl or None, fingerprint=redis_store.combine_fingerprints([f for f in fingerprints if f]),
        count=len(user_ids), dim=vectors.shape[1], **where), ranks="main")
    plan, error = distributed.broadcast((plan, error), ctx)  # only rank 0 can have failed since agree()
    _, error = attempt(lambda: redis_store.write_part(client, plan, prepared[0], prepared[1],
                                                      progress=cfg.progress, **where))
    error = agree(error)
    summary, error = attempt(lambda: redis_store.finish(client, plan, **where), ranks="main")
    error = distributed.broadcast(error, ctx)
    if error is not None:
        if ctx.is_main:  # every rank knows the first error: one says it
            print(f"error: {error}", file=sys.stderr)
        return EXIT_REDIS
    if not ctx.is_main:
        return 0
    print(f"published {summary['count']} vectors to {redis_store.safe_url(url)} "
          f"(format {cfg.redis_format}, layout {cfg.redis_layout}, model {version}"
          + (f"; each of {ctx.world} processes wrote its share" if sharded else "") + ")")
    example = int(user_ids[0])
    if cfg.redis_layout == "plain" and cfg.redis_format == "json":
        safe = redis_store.safe_url(url)
        client_code = "redis.Redis" if redis_store.plain_url(safe) == safe else "redis.cluster.RedisCluster"
        print(f"read one back: python -c \"import json, redis, redis.cluster; "
              f"r = {client_code}.from_url('{redis_store.plain_url(safe)}'); "
              f"print(json.loads(r.get('{cfg.redis_prefix}{example}'))[:4])\"")
    return 0


def public_config(cfg) -> dict[str, Any]:
    """The flags as printed and saved: the Redis password masked (pass --redis_url again to re-publish)."""
    return {**vars(cfg), "redis_url": redis_store.safe_url(cfg.redis_url)}


def redis_flags(cfg, url: str) -> str:
    """The Redis flags of this run, for the re-publish hint (password masked)."""
    flags = f" --redis_url {redis_store.safe_url(url)}"
    for key in ("redis_prefix", "redis_format", "redis_layout", "redis_ttl"):
        if getattr(cfg, key) != globals()[key.upper()]:
            flags += f" --{key} {getattr(cfg, key)}"
    return flags


def run_export_only(cfg, device, ctx: distributed.Context = distributed.Context()) -> int:
    """--republish: the saved vectors again; --export_only: new vectors for a (newer) log, saved model
    (distributed: every rank loads it from save_dir and computes a share)."""
    if cfg.republish:
        if not ctx.is_main:
            return 0
        user_ids, vectors, version = model_io.load_vectors(cfg.save_dir)
        print(f"re-publishing {len(user_ids)} vectors of model {version} from {cfg.save_dir}")
        return publish(cfg, user_ids, vectors, version, Path(cfg.save_dir) / model_io.VECTORS_FILE)
    model, vocab, config = model_io.load_model(cfg.save_dir, device)
    for key in ("n_min", "n_max"):  # sequences as the model was trained on
        setattr(cfg, key, config["train"][key])
    own = cfg.cache and ctx.distributed  # each rank reads and embeds only the users of its own cache shards
    events = read_log(cfg, ctx, own_shards=own)
    seqs = (make_sequences(events, vocab, "rank 0's sequences" if own else "sequences")
            if len(events) or not own else None)
    return export(cfg, model, seqs, config["model_version"], device, ctx, own_users=own)


def run_evaluation_on_every_user(cfg, cache: event_cache.Cache, model, vocab, history, device) -> dict:
    """run_evaluation after training on own shards: rank 0 reads every shard's history and target day and
    evaluates as one process does - the same held-out users (the id-hash split), the same sample of training
    users, and the popularity, candidates and item categories counted over every user. It holds the whole
    history and its sequences while it does (what one process holds); the other ranks keep their shards."""
    events, target, _, _ = cache.split_last_day()
    seqs = make_sequences(events, vocab, "evaluation history (every user)")
    del events
    train_users, _, test_users = split_users(seqs, cfg)
    return run_evaluation(cfg, model, seqs, target, vocab, train_users, test_users, history, device)


def run_evaluation(cfg, model, seqs, target, vocab, train_users, test_users, history, device) -> dict:
    """Held-out metrics (ours beside the baselines) and the training report, both under save_dir."""
    rng = np.random.default_rng([cfg.seed, 2])
    n_train = min(len(train_users), max(len(test_users), 1000))  # a comparable sample of training users
    groups = {"train": np.sort(rng.choice(train_users, n_train, replace=False))}
    if len(test_users) >= 2:
        groups["heldout"] = test_users
    metrics = evaluate.evaluate(model, seqs, target, vocab, groups=groups, n_min=cfg.n_min, n_max=cfg.n_max,
                                k_min=cfg.k_min, k_max=cfg.k_max, device=device,
                                batch_size=cfg.export_batch_size, seed=cfg.seed, progress=cfg.progress,
                                decode_workers=decode.default_workers())
    print(evaluate.format_table(metrics))
    users = np.concatenate(list(groups.values()))
    vectors = inference.compute_user_vectors(model, seqs, users, part="all", min_len=cfg.n_min, max_len=cfg.n_max,
                                             batch_size=cfg.export_batch_size, device=device, progress=False)
    report.write_report(cfg.save_dir, history=history, metrics=metrics, user_vectors=vectors,
                        top_category=seqs.top_category(users))
    return metrics


if __name__ == "__main__":
    sys.exit(main())
