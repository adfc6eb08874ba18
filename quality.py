"""Held-out quality across logs and training seeds, in one command: the README's quality table, reproduced.

    python quality.py                                   # demo log + UserBehavior sample, seeds 1337, 1, 2
    python quality.py --logs demo --seeds 1337          # one log, one seed
    python quality.py --name infonce -- --loss infonce --tau 0.1 --batch_size 64 --lr 3e-4 --epochs 10
    python quality.py --scaling 1500,6000,24000         # demo logs of growing size, seed 1337 (tens of minutes)
    python quality.py --capacity                        # no training: what ANY d-dim user vector could reach (~15 s)

Every run is `python train.py --data_path LOG --seed S --save_dir TMP --no_redis --no-progress [FLAGS]` in a
subprocess (FLAGS: what follows `--`); its SAVE_DIR/metrics.json is read and the folder removed.
Logs: 'demo' is demo_data's log of 1,500 users with demo seed 1337 (the log `bash run.sh` generates), written
once to OUT_DIR/logs/; 'userbehavior' is the Taobao UserBehavior sample in shared/real (../shared/real beside
the checkout, else /work/shared/real); any other entry is a path to a log.

Output, in OUT_DIR (default bench_out/, git-ignored): quality[_NAME].md and .json - per log, for the
held-out users, each metric of the model and of every baseline as the mean over seeds with (min-max), and
whether the model's mean beats the best baseline's; the date, the git commit and the exact commands.
With --scaling: scaling[_NAME].png (held-out metrics vs users, log x axis), .md and .json. Each run's
train.py output is kept in OUT_DIR/<stem>_runs/<log>_seed<S>.log.
With --capacity (no training, no seeds): capacity[_NAME].md and .json - per log, next-day category and item
Recall@10 / NDCG@10 of user_freq and of oracles that know each user's exact counts but keep d numbers (random
codes, the best rank-d SVD basis, a top-10 indicator sketch), for d in CAPACITY_DIMS; see capacity_bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import data
import demo_data
import runtime

HERE = Path(__file__).resolve().parent
DEMO_USERS = demo_data.USERS    # the demo log of `bash run.sh` (train.py's DEMO_USERS)
DEMO_SEED = runtime.SEED        # ... generated with train.py's default SEED
SEEDS = (runtime.SEED, 1, 2)    # training seeds of the quality table
SCALING_SEED = runtime.SEED     # one training run per size in --scaling
REAL_FILE = 'Haohanblue__UserBehavior.csv'
# shared/real beside the checkout (as CI lays it out), else the workplace's copy
REAL_DIRS = (HERE.parent / 'shared' / 'real', Path('/work/shared/real'))
GROUP = 'heldout'               # the users never trained on
METHODS = ('model', 'mean_emb', 'user_freq', 'popular', 'random_init')
BASELINES = METHODS[1:]
# (task label, task in metrics.json or 'moe' for the last epoch's history, metric, number format)
ROWS = (
    ('re-identification', 'reid', 'mrr', '.3f'),
    ('re-identification, overlap filtered', 'reid_filtered', 'mrr', '.3f'),
    ('next-day category', 'next_category', 'recall@10', '.3f'),
    ('next-day category', 'next_category', 'ndcg@10', '.3f'),
    ('next-day item', 'next_item', 'recall@10', '.3f'),
    ('category probe (linear)', 'probe_category', 'auc', '.3f'),
    ('MoE, last epoch', 'moe', 'max_violation', '.2f'),
    ('MoE, last epoch', 'moe', 'dead', '.1f'),
)
SCALING_ROWS = (('reid', 'mrr'), ('next_category', 'recall@10'), ('next_item', 'recall@10'))
RESERVED = ('--seed', '--data_path', '--save_dir', '--no-evaluate')   # set by quality.py itself
DASH = '–'


# ----------------------------------------------------------------------------------------------
# aggregation (pure: per-run metrics in, table out)


def _value(run: dict, task: str, metric: str, method: str) -> float | None:
    """One number of one run's metrics.json blob, None when the run has no such task / method / metric."""
    blob = run['metrics']
    if task == 'moe':
        history = blob.get('history') or []
        return history[-1].get('moe', {}).get(metric) if method == 'model' and history else None
    return blob.get('metrics', {}).get(GROUP, {}).get(task, {}).get(method, {}).get(metric)


def _users(run: dict, task: str) -> int | None:
    """Held-out users a task's rows average over (its first method's count), None for the MoE rows."""
    rows = run['metrics'].get('metrics', {}).get(GROUP, {}).get(task) or {}
    return next((r.get('users') for r in rows.values()), None)


def aggregate(runs: list[dict]) -> dict[str, list[dict]]:
    """Per log, one row per ROWS entry: every method's values over the seeds, their mean / min / max, and the
    best baseline by mean.

    Args:
        runs: [{'log': name, 'seed': int, 'metrics': the run's metrics.json blob ({'metrics', 'history'})}].
    Returns:
        {log: [{'task', 'metric', 'label', 'fmt', 'users', 'stats': {method: {'mean', 'min', 'max', 'seeds'}},
        'best_baseline': name or None, 'model_beats': bool or None}]}, logs in first-seen order. Methods a run
        lacks are left out of that method's stats; a method no run has is absent.
    """
    by_log: dict[str, list[dict]] = {}
    for run in runs:
        by_log.setdefault(run['log'], []).append(run)
    table = {}
    for log, log_runs in by_log.items():
        rows = []
        for label, task, metric, fmt in ROWS:
            stats = {}
            for method in METHODS:
                vals = [v for r in log_runs if (v := _value(r, task, metric, method)) is not None]
                if vals:
                    stats[method] = {'mean': float(np.mean(vals)), 'min': float(np.min(vals)),
                                     'max': float(np.max(vals)), 'seeds': len(vals)}
            users = [u for r in log_runs if (u := _users(r, task)) is not None]
            base = [b for b in BASELINES if b in stats]
            best = max(base, key=lambda b: stats[b]['mean']) if base else None
            beats = stats['model']['mean'] > stats[best]['mean'] if best and 'model' in stats else None
            rows.append({'label': label, 'task': task, 'metric': metric, 'fmt': fmt,
                         'users': round(float(np.mean(users))) if users else None, 'stats': stats,
                         'best_baseline': best, 'model_beats': beats})
        table[log] = rows
    return table


def _cell(stat: dict | None, fmt: str, bold: bool) -> str:
    if stat is None:
        return DASH
    text = format(stat['mean'], fmt)
    if bold:
        text = f'**{text}**'
    if stat['seeds'] > 1:
        text += f" ({format(stat['min'], fmt)}–{format(stat['max'], fmt)})"
    return text


def markdown_table(rows: list[dict]) -> str:
    """One log's rows as a markdown table; the best mean of each metric row in bold."""
    lines = ['| task | metric | held-out users | ' + ' | '.join(METHODS) + ' | model beats best baseline |',
             '| --- ' * (len(METHODS) + 4) + '|']
    for row in rows:
        stats = row['stats']
        best = max(stats, key=lambda m: stats[m]['mean']) if len(stats) > 1 else None
        cells = [_cell(stats.get(m), row['fmt'], m == best) for m in METHODS]
        if row['model_beats'] is None:
            verdict = DASH
        else:
            verdict = ('yes' if row['model_beats'] else 'no') + f" ({row['best_baseline']})"
        users = DASH if row['users'] is None else f"{row['users']:,}"
        lines.append(f"| {row['label']} | {row['metric']} | {users} | " + ' | '.join(cells) + f' | {verdict} |')
    return '\n'.join(lines)


def markdown_report(table: dict[str, list[dict]], header: dict) -> str:
    """The whole quality report: provenance, then one table per log."""
    seeds = ', '.join(map(str, header['seeds']))
    out = [f"# Held-out quality{' - ' + header['name'] if header.get('name') else ''}", '',
           f"- date: {header['date']}", f"- commit: `{header['commit']}`",
           f"- command: `{header['command']}`",
           f"- training seeds: {seeds}; extra train.py flags: `{shlex.join(header['flags']) or '(none)'}`",
           f'- cells: mean over the seeds (min–max); bold: the best mean of the row; "model beats best baseline"'
           f' compares means. Group: the {GROUP} users (never trained on); MoE rows: the last epoch.', '']
    for log, rows in table.items():
        info = header['logs'].get(log, {})
        out += [f"## {log}", '', f"log: `{info.get('path', '?')}`", '']
        for cmd in info.get('commands', []):
            out.append(f'    {cmd}')
        walls = info.get('wall_s', [])
        if walls:
            out += ['', 'wall time per run: ' + ', '.join(_duration(w) for w in walls)]
        out += ['', markdown_table(rows), '']
    for failure in header.get('failed', []):
        out.append(f'**failed**: {failure}')
    return '\n'.join(out).rstrip() + '\n'


def scaling_points(runs: list[dict]) -> list[dict]:
    """Per run (one per log size): {'users', 'heldout_users': {'task metric': n}, 'values': {'task metric':
    {method: value}}}."""
    points = []
    for run in sorted(runs, key=lambda r: r['users']):
        values = {f'{task} {metric}': {m: v for m in METHODS if (v := _value(run, task, metric, m)) is not None}
                  for task, metric in SCALING_ROWS}
        heldout = {f'{task} {metric}': _users(run, task) for task, metric in SCALING_ROWS}
        points.append({'users': run['users'], 'heldout_users': heldout, 'values': values})
    return points


def scaling_markdown(points: list[dict], header: dict) -> str:
    """Scaling report: provenance, then one table per metric (rows: log size; columns: methods)."""
    out = [f"# Held-out quality vs data size{' - ' + header['name'] if header.get('name') else ''}", '',
           f"- date: {header['date']}", f"- commit: `{header['commit']}`", f"- command: `{header['command']}`",
           f"- training seed {header['seeds'][0]}; extra train.py flags: `{shlex.join(header['flags']) or '(none)'}`",
           '']
    for task, metric in SCALING_ROWS:
        key = f'{task} {metric}'
        out += [f'## {key}', '', '| users | held-out users | ' + ' | '.join(METHODS) + ' |',
                '| --- ' * (len(METHODS) + 2) + '|']
        for p in points:
            vals = p['values'][key]
            cells = [format(vals[m], '.3f') if m in vals else DASH for m in METHODS]
            out.append(f"| {p['users']:,} | {p['heldout_users'][key] or DASH} | " + ' | '.join(cells) + ' |')
        out.append('')
    for failure in header.get('failed', []):
        out.append(f'**failed**: {failure}')
    return '\n'.join(out).rstrip() + '\n'


def plot_scaling(points: list[dict], path: Path) -> None:
    """Held-out metrics of every method vs the number of users (log x axis), one panel per metric."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SCALING_ROWS), figsize=(5 * len(SCALING_ROWS), 4))
    for ax, (task, metric) in zip(np.atleast_1d(axes), SCALING_ROWS):
        key = f'{task} {metric}'
        for method in METHODS:
            pts = [(p['users'], p['values'][key][method]) for p in points if method in p['values'][key]]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, 'o-', label=method, color=f'C{METHODS.index(method)}')   # same colour in every panel
        ax.set_xscale('log')
        ax.set_xticks([p['users'] for p in points], [f"{p['users']:,}" for p in points])
        ax.minorticks_off()
        ax.set_xlabel('users in the log')
        ax.set_title(f'held-out {key}')
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# capacity: how well could a d-dim user vector rank next-day candidates? (no training)
#
# Oracles that know each user's exact counts over the window the model sees (the last n_max history events)
# and squeeze them through d dimensions: user vector u = f(profile) (d,), candidate vectors c (C, d). Scored by
# a dot product u . c, none reaches user_freq at d = 128; decoded (the non-negative combination of the codes
# that gives u, decode.shares), a random sketch of user_freq's own scores gives them back exactly once d is
# large enough for the users' distinct candidates. The limit is the dot product, not the 128 floats.

CAPACITY_DIMS = (32, 64, 128, 256)
CAPACITY_TOP = 10               # the top-10 indicator sketch keeps each user's 10 most frequent candidates
CAPACITY_TOP_DIMS = (64, 128)
CAPACITY_K = 10                 # Recall@K / NDCG@K
CAPACITY_SEED = 0
CAPACITY_ROUND = 9              # scores are rounded to 1e-9 so float noise cannot break the popularity tie-break
# the model's category half pools the last n_max events' category codes with weight 2 ** -(age in events / h)
# (ModelConfig.category_half_life): those pooled shares exactly, and decoded from d random codes (categories only)
CAPACITY_EVENT_HALF_LIVES = (10, 20, 30)
CAPACITY_EVENT_DIMS = (64, 96, 128)


def _capacity_profiles(seqs: data.Sequences, users: np.ndarray, kind: str, n_cand: int, cutoff: int,
                       n_max: int, half_life_h: float, event_half_lives=()):
    """(counts, recency-weighted counts, {h: event-recency-weighted counts}) of candidates 0..n_cand-1 (vocab
    index - 2) in each user's last n_max history events, as CSR (len(users), n_cand); events of unknown /
    non-candidate ids are left out. Recency: weight 2 ** -(hours before cutoff / half_life_h), user_freq's;
    event recency: 2 ** -(events after this one in the user's history / h), the model's category-half pool."""
    from scipy import sparse
    s, e = seqs.part_bounds(users, 'all')
    pos, own = data.expand_ranges(np.maximum(s, e - n_max), e)
    cand = getattr(seqs, kind)[pos].astype(np.int64) - 2
    ok = (cand >= 0) & (cand < n_cand)
    age = (e[own] - 1 - pos)[ok].astype(np.float64)                         # 0: the user's last event
    own, cand, pos = own[ok], cand[ok], pos[ok]
    shape = (len(users), n_cand)

    def csr(weights):
        m = sparse.csr_matrix((weights, (own, cand)), shape=shape)         # duplicates are summed
        m.sum_duplicates()
        return m
    by_events = {h: csr(0.5 ** (age / h)) for h in event_half_lives}
    hours = (cutoff - seqs.abs_hour[pos]).astype(np.float64)                # before the target day
    return csr(np.ones(len(own))), csr(0.5 ** (hours / half_life_h)), by_events


def _row_normalise(x):
    """Rows scaled to unit L2 norm (all-zero rows stay zero); sparse in, sparse out."""
    from scipy import sparse
    norm = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel()) if sparse.issparse(x) else np.linalg.norm(x, axis=1)
    scale = 1.0 / np.maximum(norm, 1e-12)
    return sparse.diags(scale) @ x if sparse.issparse(x) else x * scale[:, None]


def svd_basis(profiles, dim: int) -> np.ndarray:
    """(C, r) orthonormal basis of the best rank-dim linear subspace (least squares) of the rows of `profiles`
    (N, C), r = min(dim, rank): the top right singular vectors, via the smaller Gram matrix."""
    from scipy import sparse
    p = sparse.csr_matrix(profiles, dtype=np.float64)
    n, c = p.shape
    gram = (p.T @ p if c <= n else p @ p.T).toarray()
    vals, vecs = np.linalg.eigh(gram)                                      # ascending
    keep = np.flatnonzero(vals > max(vals.max(initial=0.0), 1e-300) * 1e-10)[::-1][:dim]
    if c <= n:
        return vecs[:, keep]
    return np.asarray(p.T @ vecs[:, keep]) / np.sqrt(vals[keep])[None, :]   # V = P^T U / s


def random_codes(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) random unit vectors: one code per candidate."""
    codes = rng.standard_normal((n, dim))
    return codes / np.linalg.norm(codes, axis=1, keepdims=True)


def top_indicator(counts, top: int, priority: np.ndarray) -> np.ndarray:
    """Dense 0/1 (N, C): each row's `top` largest counts among its nonzero entries (ties: lower priority first)."""
    x = counts.toarray() if hasattr(counts, 'toarray') else np.asarray(counts)
    order = np.lexsort((np.broadcast_to(priority, x.shape), -x), axis=1)[:, :top]
    out = np.zeros_like(x)
    np.put_along_axis(out, order, 1.0, axis=1)
    return out * (x > 0)


def capacity_ranks(scores: np.ndarray, rel_user: np.ndarray, rel_cand: np.ndarray,
                   priority: np.ndarray) -> np.ndarray:
    """1-based ranks of relevant pairs (rel_user[p], rel_cand[p]) in rows of scores (U, C): higher score first,
    exact ties (after rounding to CAPACITY_ROUND decimals) by priority (lower first), as evaluate.py ranks."""
    import evaluate
    s = np.round(scores, CAPACITY_ROUND)
    return evaluate._rank_all(lambda rows: s[rows], len(s), rel_user, rel_cand, priority)


def _capacity_methods(dims, top_dims, counts_all, recency_all, rows, n_cand, priority, seed: int, kind: str,
                      by_events=None, event_dims=()):
    """({(method, dim): score_fn(local rows) -> (rows, n_cand)}, SVD rank) of the oracles of one task.
    counts_all: every history user's counts (the SVD basis is fitted on them); recency_all: their recency-weighted
    counts (user_freq's scores, which the decoded sketch stores); rows: the evaluated users'; by_events: {h: their
    event-recency-weighted counts} (categories: scored exactly, and decoded from each of event_dims floats)."""
    import decode   # torch: only here
    norm_all = _row_normalise(counts_all)
    tag = {'category': 0, 'item': 1}[kind]
    methods = {}
    for d in dims:
        codes = random_codes(n_cand, d, np.random.default_rng([seed, tag, 1, d]))
        methods[('random code', d)] = lambda r, codes=codes: np.asarray(norm_all[rows[r]] @ codes) @ codes.T
    full = svd_basis(norm_all, max(dims, default=0))                         # nested: rank d = its first d columns
    for d in dims:
        basis = full[:, :d]
        methods[('SVD', d)] = lambda r, basis=basis: np.asarray(norm_all[rows[r]] @ basis) @ basis.T
    for d in top_dims:
        codes = random_codes(n_cand, d, np.random.default_rng([seed, tag, 2, d]))
        methods[(f'top-{CAPACITY_TOP} indicator', d)] = (
            lambda r, codes=codes: (top_indicator(counts_all[rows[r]], CAPACITY_TOP, priority) @ codes) @ codes.T)
    if kind == 'category':   # decoding, not a dot product: the sketch's non-negative least-squares solution
        def decoded(weighted, codes):   # the users' weights stored in d float32s with codes, then decoded
            return lambda r: decode.shares(np.asarray(weighted[rows[r]] @ codes, np.float32), codes)
        for d in dims:
            codes = random_codes(n_cand, d, np.random.default_rng([seed, tag, 3, d]))
            methods[('random code, decoded', d)] = decoded(recency_all, codes)
        event_codes = {d: random_codes(n_cand, d, np.random.default_rng([seed, tag, 4, d])) for d in event_dims}
        for h, weighted in (by_events or {}).items():
            methods[(f'event half-life {h:g}', None)] = lambda r, weighted=weighted: weighted[rows[r]].toarray()
            for d, codes in event_codes.items():
                methods[(f'event half-life {h:g}, decoded', d)] = decoded(weighted, codes)
    return methods, int(full.shape[1])


def capacity_bounds(log_path, dims=CAPACITY_DIMS, n_max: int = data.N_MAX, seed: int = CAPACITY_SEED, *,
                    top_dims=CAPACITY_TOP_DIMS, k: int = CAPACITY_K, items: bool = True,
                    max_items: int | None = None, progress: bool = False,
                    event_half_lives=CAPACITY_EVENT_HALF_LIVES, event_dims=CAPACITY_EVENT_DIMS) -> dict:
    """Next-day Recall@k / NDCG@k of user_freq, plain counts and d-dim oracle sketches of the users' counts.

    The split is train.py's: history = every event before the log's last day, target = that day; vocabulary
    and sequences are fitted on the history. Evaluated users: ALL history users with a target-day event (not a
    held-out sample), scored as evaluate.py scores them (relevant: the distinct known candidates of their
    target day; users without one are left out). Candidates: every known category; for items the
    evaluate.MAX_ITEMS most frequent known items. Every method sees each user's last n_max history events:
      - user_freq: evaluate.py's baseline, recency-weighted counts (half-life evaluate.RECENCY_HALF_LIFE_H);
      - counts: plain counts;
      - random code d: candidate codes R (C, d) random unit vectors, u = normalised counts @ R, score u @ R^T;
      - SVD d: R = the best rank-d linear basis (top right singular vectors) of all history users' normalised
        count profiles, the evaluated users' included (optimistic);
      - top-10 indicator d: u = (0/1 of the user's 10 most frequent candidates) @ R, R random codes;
      - random code, decoded d (categories only): u = user_freq's scores @ R in float32 (what an export holds),
        R random unit codes, scored by decode.shares(u, R): exact where the user's distinct categories are few
        enough for d, so it equals user_freq there;
      - event half-life h (categories): the shares the model's category half pools (weight 2 ** -(age / h), age in
        events after this one, h in event_half_lives: ModelConfig.category_half_life; untrained pool logits),
        exactly; and decoded from d floats (event_dims), the user's shares @ random unit codes, as above. What a
        category half of d floats with that half-life can reach, whatever the training.
    Ties (after rounding scores to 1e-9) go to the more popular candidate (history counts), then a seeded
    random order. Deterministic for a given seed.

    Returns:
        JSON-serialisable {'log', 'target_day', 'history_users', 'target_users', 'n_max', 'k', 'seed', 'dims',
        'top_dims', 'seconds', 'tasks': {kind: {'candidates', 'users', 'relevant', 'unrankable', 'svd_rank',
        'seconds', 'rows': [{'method', 'dim' (None for the baselines), 'recall@k', 'ndcg@k'}]}}};
        tasks has 'item' only when items is true.
    """
    import evaluate
    t0 = time.perf_counter()
    events, _ = data.read_events(str(log_path), progress=False)
    history, target, cutoff, _ = data.split_last_day(events)
    if len(target) == 0:
        raise ValueError(f'{log_path}: no target-day events')
    vocab = data.Vocab.fit(history)
    seqs = data.build_sequences(history, vocab)
    max_items = evaluate.MAX_ITEMS if max_items is None else max_items
    t_user = seqs.user_index(target['user_id'].to_numpy())
    known = t_user >= 0
    t_index = {'category': vocab.encode_categories(target['category_id'].to_numpy()[known]),
               'item': vocab.encode_items(target['item_id'].to_numpy()[known])}
    t_user = t_user[known]
    out = {'log': str(log_path), 'target_day': data.hour_to_str(cutoff)[:10], 'history_users': int(seqs.n_users),
           'target_users': int(len(np.unique(t_user))), 'n_max': int(n_max), 'k': int(k), 'seed': int(seed),
           'dims': [int(d) for d in dims], 'top_dims': [int(d) for d in top_dims], 'tasks': {}}
    all_users = np.arange(seqs.n_users)
    for kind in ('category',) + (('item',) if items else ()):
        t1 = time.perf_counter()
        n_cand = vocab.n_categories - 2 if kind == 'category' else min(vocab.n_items - 2, max_items)
        cand = t_index[kind] - 2
        ok = (cand >= 0) & (cand < n_cand)
        pairs = np.unique(np.stack([t_user[ok], cand[ok]], 1), axis=0)
        unrankable = len(np.unique(np.stack([t_user[~ok], t_index[kind][~ok]], 1), axis=0)) if (~ok).any() else 0
        users = np.unique(pairs[:, 0])                                       # history user indices, sorted
        rel_user, rel_cand = np.searchsorted(users, pairs[:, 0]), pairs[:, 1]
        pop = np.bincount(getattr(seqs, kind), minlength=n_cand + 2)[2:n_cand + 2].astype(np.float64)
        priority = np.empty(n_cand, np.int64)                                # popularity, then a seeded order
        priority[np.lexsort((np.random.default_rng([seed, 3]).permutation(n_cand), -pop))] = np.arange(n_cand)
        counts_all, recency_all, by_events = _capacity_profiles(
            seqs, all_users, kind, n_cand, cutoff, n_max, evaluate.RECENCY_HALF_LIFE_H,
            event_half_lives if kind == 'category' else ())
        methods = {('user_freq', None): lambda r: recency_all[users[r]].toarray(),
                   ('counts', None): lambda r: counts_all[users[r]].toarray()}
        oracles, svd_rank = _capacity_methods(dims, top_dims, counts_all, recency_all, users, n_cand, priority, seed,
                                              kind, by_events, event_dims)
        methods.update(oracles)
        rows = []
        for (name, d), score in methods.items():
            ranks = np.zeros(len(rel_user), np.int64)
            for lo in range(0, len(users), 256):                             # bound the (users, C) scores
                sel = np.flatnonzero((rel_user >= lo) & (rel_user < lo + 256))
                ranks[sel] = capacity_ranks(score(np.arange(lo, min(lo + 256, len(users)))), rel_user[sel] - lo,
                                            rel_cand[sel], priority)
            m = evaluate.topk_metrics(ranks, rel_user, len(users), ks=(k,))
            rows.append({'method': name, 'dim': d, f'recall@{k}': m.get(f'recall@{k}'),
                         f'ndcg@{k}': m.get(f'ndcg@{k}')})
        out['tasks'][kind] = {'candidates': int(n_cand), 'users': int(len(users)), 'relevant': int(len(pairs)),
                              'unrankable': int(unrankable),
                              'svd_rank': svd_rank,
                              'seconds': round(time.perf_counter() - t1, 1), 'rows': rows}
        if progress:
            print(f"  {kind}: {len(users):,} users, {n_cand:,} candidates, {time.perf_counter() - t1:.1f} s",
                  flush=True)
    out['seconds'] = round(time.perf_counter() - t0, 1)
    return out


def capacity_markdown(results: dict[str, dict], header: dict) -> str:
    """The capacity report: provenance, what the rows mean, then one table per log (rows: methods; columns:
    next-day category / item Recall@k and NDCG@k)."""
    out = ['# Capacity of a d-dim user vector: oracle sketches of the users\' own counts, dot product vs decoding', '',
           f"- date: {header['date']}", f"- commit: `{header['commit']}`", f"- command: `{header['command']}`",
           '- split as train.py: history = every event before the log\'s last day, target = that day. Evaluated: '
           'ALL history users with a target-day event (not a 10% held-out sample), relevant = their distinct known '
           'target-day categories / items (the items: the evaluate.MAX_ITEMS most frequent known ones); every '
           'method sees each user\'s last n_max history events. Ties: the more popular candidate, then a seeded '
           'random order.',
           '- user_freq: evaluate.py\'s baseline (recency-weighted counts); counts: plain counts. Oracles (know the '
           'counts exactly, then keep d numbers per user; score = user vector . candidate vector): random code d = '
           'random unit code per candidate, user = normalised counts @ codes; SVD d = the best rank-d linear basis of '
           'all history users\' normalised count profiles (evaluated users included, so optimistic); '
           f'top-{CAPACITY_TOP} indicator d = random codes of the user\'s {CAPACITY_TOP} most frequent candidates '
           'only. random code, decoded d (categories): user = user_freq\'s scores @ random codes in float32, scored '
           'by decoding (decode.shares: the non-negative least-squares combination of the codes), not by a dot '
           'product. event half-life h (categories): the shares the model\'s category half pools (weight '
           '2 ** -(age in events / h), `--category_half_life`), exactly (d –) and decoded from d floats of random '
           'codes: what a category half of d floats can reach with that half-life.', '']
    for log, res in results.items():
        k = res['k']
        tasks = res['tasks']
        out += [f'## {log}', '', f"log: `{res['log']}`; target day {res['target_day']}; "
                f"{res['history_users']:,} history users, {res['target_users']:,} with target-day events; "
                f"n_max {res['n_max']}, seed {res['seed']}; {_duration(res['seconds'])}", '']
        made_by = header.get('logs', {}).get(log, {}).get('commands', [])
        out += [f'    {cmd}' for cmd in made_by] + ([''] if made_by else [])
        for kind, t in tasks.items():
            out.append(f"- {kind}: {t['users']:,} users with a known relevant {kind}, {t['relevant']:,} relevant "
                       f"pairs ({t['unrankable']:,} unknown, not rankable), {t['candidates']:,} candidates; "
                       f"SVD basis rank {t['svd_rank']}")
        if 'item' not in tasks:
            out.append('- item: skipped')
        kinds = list(tasks)
        head = [f'{kind} {m}@{k}' for kind in kinds for m in ('recall', 'ndcg')]
        out += ['', '| method | d | ' + ' | '.join(head) + ' |', '| --- ' * (len(head) + 2) + '|']
        by_kind = {kind: {(r['method'], r['dim']): r for r in tasks[kind]['rows']} for kind in kinds}
        for key in by_kind[kinds[0]]:
            cells = []
            for kind in kinds:
                r = by_kind[kind].get(key, {})
                cells += [DASH if r.get(f'{m}@{k}') is None else format(r[f'{m}@{k}'], '.3f')
                          for m in ('recall', 'ndcg')]
            out.append(f"| {key[0]} | {DASH if key[1] is None else key[1]} | " + ' | '.join(cells) + ' |')
        out.append('')
    return '\n'.join(out).rstrip() + '\n'


def run_capacity(args: argparse.Namespace, argv: list[str]) -> int:
    """quality.py --capacity: capacity_bounds on every --logs entry; writes OUT_DIR/capacity[_NAME].md / .json."""
    out_dir = Path(args.out_dir)
    stem = 'capacity' + (f'_{args.name}' if args.name else '')
    header = {'date': time.strftime('%Y-%m-%d %H:%M %Z'), 'commit': git_commit(),
              'command': shlex.join(['python', _script('quality.py'), *argv]), 'logs': {}}
    logs = {name: resolve_log(name, out_dir) for name in _csv(args.logs, '--logs')}
    results = {}
    for name, (path, made_by) in logs.items():
        print(f'{name}: capacity bounds of {path}', flush=True)
        results[name] = capacity_bounds(path, progress=True)
        header['logs'][name] = {'path': str(path), 'commands': made_by}
    out_dir.mkdir(parents=True, exist_ok=True)
    text = capacity_markdown(results, header)
    (out_dir / f'{stem}.md').write_text(text)
    (out_dir / f'{stem}.json').write_text(json.dumps({**header, 'results': results}, indent=1))
    print(text)
    print(f'wrote {out_dir / stem}.md and .json')
    return 0


# ----------------------------------------------------------------------------------------------
# running


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f'{m}m{s:02d}s' if m else f'{s}s'


def git_commit() -> str:
    """Short commit of the checkout, '+dirty' when the tree has changes (untracked files included)."""
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=HERE, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown (not a git checkout)'
    return commit + ('+dirty' if dirty else '')


def demo_log(out_dir: Path, users: int) -> tuple[Path, list[str]]:
    """The demo log of `users` users (demo seed DEMO_SEED), written once; (path, [the command that writes it])."""
    path = out_dir / 'logs' / f'demo_{users}_seed{DEMO_SEED}.csv'
    cmd = shlex.join(['python', _script('demo_data.py'), '--out', str(path), '--users', str(users),
                      '--seed', str(DEMO_SEED)])
    if not path.exists():
        t0 = time.perf_counter()
        rows = demo_data.write_log(path, n_users=users, seed=DEMO_SEED)
        print(f'wrote the demo log {path} ({rows:,} rows, {users:,} users) in {time.perf_counter() - t0:.1f} s',
              flush=True)
    return path, [cmd]


def resolve_log(name: str, out_dir: Path) -> tuple[Path, list[str]]:
    """(path, commands that make it) of a --logs entry: 'demo', 'userbehavior' or a path."""
    if name == 'demo':
        return demo_log(out_dir, DEMO_USERS)
    if name == 'userbehavior':
        found = next((d / REAL_FILE for d in REAL_DIRS if (d / REAL_FILE).is_file()), None)
        if found is None:
            raise SystemExit(f'quality.py --logs userbehavior: {REAL_FILE} is in neither '
                             + ' nor '.join(str(d) for d in REAL_DIRS))
        return found, []
    path = Path(name)
    if not path.exists():
        raise SystemExit(f"quality.py --logs: '{name}' is not 'demo', 'userbehavior' or an existing log path")
    return path, []


def _script(name: str) -> str:
    """Path of one of the repo's scripts from the working directory ('train.py' when run from the repo)."""
    return os.path.relpath(HERE / name)


def train_command(log: Path, seed: int, save_dir: str, flags: list[str]) -> list[str]:
    return [sys.executable, _script('train.py'), '--data_path', str(log), '--seed', str(seed), '--save_dir', save_dir,
            '--no_redis', '--no-progress', *flags]


def run_training(log: Path, seed: int, flags: list[str], log_file: Path) -> tuple[dict | None, float, str]:
    """Train once in a subprocess; (its metrics.json blob or None on failure, wall seconds, failure reason)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='quality_') as save_dir:
        t0 = time.perf_counter()
        with open(log_file, 'w') as f:
            code = subprocess.run(train_command(log, seed, save_dir, flags), stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
        metrics_path = Path(save_dir) / 'metrics.json'
        if code != 0:
            last = next((ln for ln in reversed(log_file.read_text(errors='replace').splitlines()) if ln.strip()), '')
            return None, wall, f'train.py exited with status {code}: {last.strip()} (output: {log_file})'
        if not metrics_path.exists():
            return None, wall, f'train.py wrote no metrics.json (output: {log_file})'
        return json.loads(metrics_path.read_text()), wall, ''


def run_all(jobs: list[tuple[str, Path, int]], flags: list[str], runs_dir: Path) -> tuple[list[dict], list[str]]:
    """Train every (log name, log path, seed) job in turn, printing progress; (finished runs, failures)."""
    runs, failed = [], []
    for i, (name, path, seed) in enumerate(jobs, 1):
        log_file = runs_dir / f'{name}_seed{seed}.log'
        print(f'[{i}/{len(jobs)}] {name} seed {seed}: training (output in {log_file})', flush=True)
        blob, wall, why = run_training(path, seed, flags, log_file)
        if blob is None:
            print(f'[{i}/{len(jobs)}] {name} seed {seed}: FAILED after {_duration(wall)}: {why}', flush=True)
            failed.append(f'{name} seed {seed}: {why}')
            continue
        run = {'log': name, 'seed': seed, 'wall_s': round(wall, 1), 'metrics': blob}
        reid = {m: _value(run, 'reid', 'mrr', m) for m in ('model', 'mean_emb')}
        print(f"[{i}/{len(jobs)}] {name} seed {seed}: done in {_duration(run['wall_s'])}; held-out re-id MRR "
              + ', '.join(f'{m} {DASH if v is None else format(v, ".3f")}' for m, v in reid.items()), flush=True)
        runs.append(run)
    return runs, failed


def _csv(text: str, flag: str, cast=str) -> list:
    try:
        items = [cast(x.strip()) for x in text.split(',') if x.strip()]
    except ValueError:
        raise SystemExit(f'quality.py {flag}: cannot read {text!r} as a comma-separated list') from None
    if not items:
        raise SystemExit(f'quality.py {flag}: empty list')
    return items


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """quality.py's own flags, and the train.py flags after `--` (passed through to every run)."""
    ours, flags = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    p = argparse.ArgumentParser(prog='quality.py', description=__doc__, usage='%(prog)s [options] [-- train.py flags]',
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--logs', default='demo,userbehavior', help="comma-separated: demo, userbehavior, or log paths")
    p.add_argument('--seeds', default=','.join(map(str, SEEDS)), help='comma-separated training seeds')
    p.add_argument('--scaling', default='', help='comma-separated demo log sizes (users): train once per size '
                   f'(seed {SCALING_SEED}) instead of --logs / --seeds, and plot quality vs size')
    p.add_argument('--capacity', action='store_true', help='no training: next-day Recall@10 of user_freq and of '
                   'd-dim oracle sketches of the users\' counts on every --logs entry (capacity.md / .json)')
    p.add_argument('--name', default='', help='suffix of the output files (quality_NAME.md), e.g. the ablation')
    p.add_argument('--out_dir', default='bench_out', help='output folder (default: bench_out)')
    args = p.parse_args(ours)
    if args.name and not re.fullmatch(r'[A-Za-z0-9_.-]+', args.name):
        p.error(f'--name {args.name!r}: use letters, digits, _ . - only (it names files)')
    if args.capacity and (flags or args.scaling):
        p.error('--capacity trains nothing: drop --scaling and the train.py flags after --')
    for flag in flags:
        if flag.split('=')[0] in RESERVED:
            p.error(f"train.py flag {flag} is set by quality.py (use --logs / --seeds); drop it")
    return args, flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, flags = parse_args(argv)
    if args.capacity:
        return run_capacity(args, argv)
    out_dir = Path(args.out_dir)
    stem = ('scaling' if args.scaling else 'quality') + (f'_{args.name}' if args.name else '')
    header = {'name': args.name, 'date': time.strftime('%Y-%m-%d %H:%M %Z'), 'commit': git_commit(),
              'command': shlex.join(['python', _script('quality.py'), *argv]), 'flags': flags, 'logs': {}}
    if args.scaling:
        sizes = sorted(set(_csv(args.scaling, '--scaling', int)))
        if min(sizes) <= 0:
            raise SystemExit(f'quality.py --scaling: sizes must be > 0, got {args.scaling}')
        header['seeds'] = [SCALING_SEED]
        users = {f'demo_{n}': n for n in sizes}
        logs = {name: demo_log(out_dir, n) for name, n in users.items()}
        jobs = [(name, path, SCALING_SEED) for name, (path, _) in logs.items()]
    else:
        header['seeds'] = _csv(args.seeds, '--seeds', int)
        logs = {name: resolve_log(name, out_dir) for name in _csv(args.logs, '--logs')}
        jobs = [(name, path, seed) for name, (path, _) in logs.items() for seed in header['seeds']]
    for name, (path, made_by) in logs.items():
        header['logs'][name] = {'path': str(path), 'commands': made_by + [
            shlex.join(['python', *train_command(path, s, 'TMP', flags)[1:]]) for s in header['seeds']]}
    print(f"{len(jobs)} training runs; commit {header['commit']}", flush=True)
    runs, header['failed'] = run_all(jobs, flags, out_dir / f'{stem}_runs')
    for run in runs:
        header['logs'][run['log']].setdefault('wall_s', []).append(run['wall_s'])
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.scaling:
        for run in runs:
            run['users'] = users[run['log']]
        points = scaling_points(runs)
        plot_scaling(points, out_dir / f'{stem}.png')
        text, result = scaling_markdown(points, header), {'points': points}
    else:
        table = aggregate(runs)
        text, result = markdown_report(table, header), {'table': table}
    (out_dir / f'{stem}.md').write_text(text)
    (out_dir / f'{stem}.json').write_text(json.dumps({**header, **result, 'runs': runs}, indent=1))
    print(text)
    print(f"wrote {out_dir / stem}.md and .json" + (f" and {out_dir / stem}.png" if args.scaling else ''))
    return 1 if header['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
