"""Benchmarks: one script, a registry of named sections, each printing absolute numbers and ratios
against a reference measured side by side in the same run (the machine is shared and noisy).

    python bench.py                      # every section at a size that runs in a few minutes on 2 cores
    python bench.py --full               # the issue's sizes (12M-row log, 200k Redis vectors, batch 256, ...)
    python bench.py --only train,inference --json bench.json
    python bench.py --list               # section names

Sections: data (read -> CSR vs pandas and a naive pipeline), moe (MoE vs dense SwiGLU vs naive loop),
train (triplets/s with the optimiser, MFU against a GEMM peak, malloc tuning on/off), inference (export
users/s vs the training rate), redis (publish vs a raw-socket SET ceiling), gpu (only with CUDA).
The last table lists every goal with its measured value and PASS/MISS.

Heavy measurements run in a fresh Python process (`python bench.py --task NAME ...`), so each row's peak
RSS is its own and one run cannot warm caches for the next. `extra RSS` is the peak minus the process's
RSS after its imports. Timed figures are medians of repeats; ratios are medians of per-repeat ratios
measured back to back (paired), so load that comes and goes cancels out.

Sections add themselves with the `section` decorator; child tasks with `task`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

# libgomp reads this when torch loads: spin-waiting threads make the MoE's many small parallel regions
# several times slower when another process holds a core (see train.py).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

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
    import numpy  # noqa: F401  (imports before the baseline RSS)
    import pandas  # noqa: F401
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


# ----------------------------------------------------------------------------------------------
# data: read -> validate -> encode -> CSR against a bare pandas read and a naive pipeline

REAL_SAMPLES = ['/work/shared/real/qichen2020__sample_user_behavior.csv',
                '/work/shared/real/Haohanblue__UserBehavior.csv']


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
    return {'rows': report.rows_kept, 'read_s': t[1] - t[0], 'fit_s': t[2] - t[1], 'build_s': t[3] - t[2],
            'users': seqs.n_users, 'items': vocab.n_items, 'duplicates': report.duplicate_rows,
            'batch_ms': batch_s * 1000, 'seconds_total': t[3] - t[0]}


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
    print(f'  batch assembly: {pipe["batch_ms"]:.1f} ms per 256-user long+short batch pair')
    goals = [('pipeline within 3x bare read', pipe['seconds_total'] / bare['seconds'], 3.0, '<='),
             ('peak RSS under 3 GB', pipe['peak_rss_mb'] / 1024, 3.0, '<=')]
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--only', default='', help='comma-separated section names (default: all)')
    p.add_argument('--list', action='store_true', help='list sections and exit')
    p.add_argument('--repeat', type=int, default=1, help='runs per timed task; the fastest is kept')
    p.add_argument('--data_file', default='', help='Tianchi-format CSV for the data section '
                   '(default /tmp/bench_data/tianchi_<rows>M.csv, generated when missing)')
    p.add_argument('--rows', type=int, default=12_000_000, help='rows of the generated data file')
    p.add_argument('--skip_naive', action='store_true', help='data: skip the slow naive pipeline')
    p.add_argument('--skip_coverage', action='store_true', help='data: skip the item-coverage tables')
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
    for name in names:
        print(f'=== {name}: {SECTIONS[name][1]}', flush=True)
        SECTIONS[name][0](args)


if __name__ == '__main__':
    main()
