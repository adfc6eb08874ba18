"""Demo behaviour log in the Alibaba Tianchi mobile-recommendation format.

Writes `user_id,item_id,behavior_type,user_geohash,item_category,time` (header, time 'YYYY-MM-DD HH')
so the whole pipeline runs on a fresh machine without the real 12-23M-row file.

What the log looks like (chosen to match the real file's published statistics):
- behaviour shares near 94.2 / 2.0 / 2.8 / 1.0 % (view / fav / cart / buy), a daily rhythm of hours
  (quiet at 3-6 h, peak at 20-22 h) and a shopping-festival bump on 2014-12-12 when it is in range;
- Zipf-like popularity: items are nested in categories of heavy-tailed size; categories and items within
  a category are drawn log-uniformly in rank (P(rank k) ~ 1/k);
- about half the geohashes empty (each user has their own share), rows of all users interleaved in file
  order, and exact duplicate rows (the same click repeated within an hour), as in the real file;
- heavy-tailed activity: events per user are log-normal around `mean_events`.

Learnable structure: every user has a few favourite categories (with personal weights) and a handful of
favourite items inside each, drawn uniformly so they are idiosyncratic. Sessions (events sharing one hour)
mostly stay inside a favourite category and often revisit a favourite item. The interests are the same
over the whole period, so they continue into each user's last 10% of events: a model can re-identify a
user and predict the categories of their next day.

Usage:
    python demo_data.py --out DATA/train_user/tianchi_mobile_recommend_train_user.csv --users 1500 --days 31 --seed 0

Everything is vectorised numpy: 12M rows are simulated and written in well under a minute.
"""
from __future__ import annotations

import argparse
import gzip
import os
import time

import numpy as np
import pandas as pd

from atomic_files import atomic_write
from data import TIANCHI_COLUMNS

START_DATE = '2014-11-18'
USERS = 1500  # users of the demo log (train.py's DEMO_USERS: the log `bash run.sh` trains on)
BEHAVIOR_SHARES = (0.942, 0.020, 0.028, 0.010)  # view, fav, cart, buy (full Tianchi file)
# relative activity per hour of day, 0..23 (shape of the real Tianchi daily curve)
HOUR_WEIGHTS = np.array([40, 22, 12, 8, 6, 7, 13, 24, 34, 40, 46, 45,
                         45, 47, 47, 47, 45, 42, 46, 58, 68, 73, 68, 55], dtype=np.float64)
FESTIVALS = {'2014-12-12': 2.5}     # day -> activity multiplier (Double 12 in the real log)
GEOHASH_ALPHABET = np.frombuffer(b'0123456789bcdefghjkmnpqrstuvwxyz', dtype=np.uint8)

N_FAVOURITE_CATEGORIES = 4          # interest slots per user
N_FAVOURITE_ITEMS = 6               # favourite items per slot
P_INTEREST_SESSION = 0.8            # share of sessions inside one of the user's favourite categories
P_FAVOURITE_ITEM = 0.5              # inside such a session, share of events on a favourite item
MEAN_SESSION_EVENTS = 6             # events per session (one session = one hour)
WRITE_CHUNK_ROWS = 1 << 20


def _log_uniform_rank(rng: np.random.Generator, size_per_draw: np.ndarray) -> np.ndarray:
    """Draw a rank in [0, size) with P(rank k) ~ 1/(k+1) (Zipf, exponent 1), vectorised."""
    size_per_draw = np.asarray(size_per_draw, dtype=np.float64)
    rank = np.floor(np.exp(rng.random(size_per_draw.shape) * np.log(size_per_draw + 1.0))) - 1.0
    return np.minimum(rank, size_per_draw - 1).astype(np.int64)


def _distinct_ids(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """n distinct random integers in [low, high), in random order (random gaps, then a shuffle)."""
    mean_gap = 0.9 * (high - low) / n
    if mean_gap < 2:
        return rng.choice(high - low, size=n, replace=False).astype(np.int64) + low
    gaps = 1 + np.floor(rng.random(n) * (2 * mean_gap - 2)).astype(np.int64)   # mean = mean_gap
    ids = low + np.cumsum(gaps) - 1
    if ids[-1] >= high:  # few ids (the gaps' sum varies most): squeeze them into the range, still distinct
        ids = low + (ids - low) * (high - low - n) // (ids[-1] - low + 1) + np.arange(n)
    return rng.permutation(ids)


def _simulate(n_users: int, n_days: int, seed: int, mean_events: float, n_items: int | None,
              n_categories: int | None, dup_rate: float) -> dict:
    """Simulate the log as numpy arrays (rows already in file order)."""
    if n_users < 1 or n_days < 1 or mean_events < 1:
        raise ValueError('need n_users >= 1, n_days >= 1 and mean_events >= 1')
    if not 0.0 <= dup_rate < 1.0:
        raise ValueError(f'dup_rate must be in [0, 1), got {dup_rate}')
    rng = np.random.default_rng(seed)
    expected_rows = n_users * mean_events
    # catalogue as large as the log: ~20% of rows then hold a distinct item and ~55% of the items seen
    # occur once, as in the real file (23M rows, 4.8M items); ~500 items per category, at most 10k
    n_items = int(n_items or max(200, expected_rows))
    n_categories = int(n_categories or min(10_000, max(20, n_items // 500)))
    n_categories = min(n_categories, n_items)

    # catalogue: category c (0 = most popular) holds items [cat_start[c], cat_start[c] + cat_size[c])
    share = 1.0 / np.arange(1, n_categories + 1) ** 0.8
    cat_size = 1 + np.floor(share / share.sum() * (n_items - n_categories)).astype(np.int64)
    cat_size[0] += n_items - cat_size.sum()
    cat_start = np.concatenate([[0], np.cumsum(cat_size)[:-1]])
    item_raw = _distinct_ids(rng, n_items, 10_000, 400_000_000)
    cat_raw = _distinct_ids(rng, n_categories, 1, max(20_000, 2 * n_categories))
    user_raw = _distinct_ids(rng, n_users, 10_000, 150_000_000)

    # users: heavy-tailed activity, favourite categories/items, personal geohash habits
    sigma = 1.0
    n_ev = np.exp(rng.normal(np.log(mean_events) - sigma ** 2 / 2, sigma, n_users))
    n_ev = np.clip(np.rint(n_ev), 1, 50 * mean_events).astype(np.int64)
    fav_cat = _log_uniform_rank(rng, np.full((n_users, N_FAVOURITE_CATEGORIES), n_categories))
    fav_weight = np.cumsum(rng.dirichlet(np.ones(N_FAVOURITE_CATEGORIES), n_users), axis=1)
    fav_item = (cat_start[fav_cat][:, :, None]
                + np.floor(rng.random((n_users, N_FAVOURITE_CATEGORIES, N_FAVOURITE_ITEMS))
                           * cat_size[fav_cat][:, :, None]).astype(np.int64))
    p_geo = rng.beta(0.6, 0.6, n_users)
    geo_home = rng.choice(GEOHASH_ALPHABET[:], size=(n_users, 5))

    # sessions: one hour each, a day, an hour of day and a category
    user = np.repeat(np.arange(n_users), n_ev)
    n = user.size
    new_session = rng.random(n) < 1.0 / MEAN_SESSION_EVENTS
    first = np.concatenate([[0], np.cumsum(n_ev)[:-1]])
    new_session[first] = True
    session = np.cumsum(new_session) - 1
    s_user = user[new_session]
    n_sessions = s_user.size
    day_w = np.ones(n_days)
    start = np.datetime64(START_DATE, 'D')
    for day, mult in FESTIVALS.items():
        k = int((np.datetime64(day, 'D') - start).astype(np.int64))
        if 0 <= k < n_days:
            day_w[k] *= mult
    s_day = rng.choice(n_days, size=n_sessions, p=day_w / day_w.sum())
    s_hour = rng.choice(24, size=n_sessions, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    s_interest = rng.random(n_sessions) < P_INTEREST_SESSION
    s_slot = (fav_weight[s_user] < rng.random(n_sessions)[:, None]).sum(axis=1)
    s_slot = np.minimum(s_slot, N_FAVOURITE_CATEGORIES - 1)
    s_cat = np.where(s_interest, fav_cat[s_user, s_slot],
                     _log_uniform_rank(rng, np.full(n_sessions, n_categories)))

    # events: a favourite item, or a popular item of the session's category
    e_cat = s_cat[session]
    e_fav = s_interest[session] & (rng.random(n) < P_FAVOURITE_ITEM)
    fav_j = _log_uniform_rank(rng, np.full(n, N_FAVOURITE_ITEMS))
    popular = cat_start[e_cat] + _log_uniform_rank(rng, cat_size[e_cat])
    item = np.where(e_fav, fav_item[user, s_slot[session], fav_j], popular)
    behavior = (rng.random(n)[:, None] > np.cumsum(BEHAVIOR_SHARES)[None, :-1]).sum(axis=1) + 1
    has_geo = rng.random(n) < p_geo[user]
    geo = np.empty((n, 7), dtype=np.uint8)
    geo[:, :5] = geo_home[user]
    geo[:, 5:] = rng.choice(GEOHASH_ALPHABET, size=(n, 2))

    # exact duplicates: an event repeats the previous one of its session (same hour, same fields)
    repeat = (rng.random(n) < dup_rate) & ~new_session
    src = np.maximum.accumulate(np.where(repeat, 0, np.arange(n)))
    item, behavior, has_geo, geo = item[src], behavior[src], has_geo[src], geo[src]

    order = rng.permutation(n)                      # users interleaved in file order
    return {
        'user_id': user_raw[user[order]],
        'item_id': item_raw[item[order]],
        'behavior_type': behavior[order].astype(np.int8),
        'has_geo': has_geo[order],
        'geo': geo[order],
        'item_category': cat_raw[e_cat[order]],          # a favourite item lies in its session's category
        'hour': (s_day * 24 + s_hour)[session][order],    # hours since START_DATE 00:00
        'n_days': n_days,
    }


def _time_strings(n_days: int) -> list[str]:
    hours = np.datetime64(START_DATE, 'h') + np.arange(24 * n_days)
    return [str(h).replace('T', ' ') for h in hours]


def generate(n_users: int = USERS, n_days: int = 31, seed: int = 0, mean_events: float = 150,
             n_items: int | None = None, n_categories: int | None = None,
             dup_rate: float = 0.15) -> pd.DataFrame:
    """Generate a demo log as a DataFrame with the Tianchi columns and string formats.

    Args:
        n_users: number of users.
        n_days: days covered, starting at 2014-11-18.
        seed: random seed; the same arguments give the same frame.
        mean_events: average events per user (log-normal, heavy-tailed; at least 1 per user).
        n_items, n_categories: catalogue size (default: as many items as expected rows, which makes
            ~20% of the rows distinct items, as in the real log; items/500 categories, at most 10k).
        dup_rate: probability that an event repeats the previous event of its session exactly.

    Returns:
        DataFrame with columns user_id, item_id, behavior_type, user_geohash (NaN when empty),
        item_category, time ('YYYY-MM-DD HH'), rows in file order.
    """
    sim = _simulate(n_users, n_days, seed, mean_events, n_items, n_categories, dup_rate)
    geo = np.array([g.tobytes().decode() for g in sim['geo']], dtype=object)
    geo[~sim['has_geo']] = np.nan
    times = np.array(_time_strings(sim['n_days']), dtype=object)
    return pd.DataFrame({
        'user_id': sim['user_id'],
        'item_id': sim['item_id'],
        'behavior_type': sim['behavior_type'].astype(np.int64),
        'user_geohash': geo,
        'item_category': sim['item_category'],
        'time': times[sim['hour']],
    })


def _digits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ints -> (n, width) ASCII digit matrix (right-aligned) and a keep mask."""
    width = max(1, len(str(int(x.max())))) if x.size else 1
    mat = np.empty((x.size, width), dtype=np.uint8)
    rest = x.copy()
    for j in range(width - 1, -1, -1):
        mat[:, j] = rest % 10 + 48
        rest //= 10
    n_digits = np.ones(x.size, dtype=np.int64)
    for k in range(1, width):
        n_digits += x >= 10 ** k
    keep = np.arange(width)[None, :] >= (width - n_digits)[:, None]
    return mat, keep


def _format_rows(sim: dict, lo: int, hi: int, time_table: np.ndarray) -> bytes:
    """Rows [lo, hi) of a simulation as CSV bytes, built as one byte matrix and a keep mask."""
    n = hi - lo
    comma = (np.full((n, 1), ord(','), np.uint8), np.ones((n, 1), bool))
    parts = [_digits(sim['user_id'][lo:hi]), comma,
             _digits(sim['item_id'][lo:hi]), comma,
             _digits(sim['behavior_type'][lo:hi].astype(np.int64)), comma,
             (sim['geo'][lo:hi], np.repeat(sim['has_geo'][lo:hi, None], 7, axis=1)), comma,
             _digits(sim['item_category'][lo:hi]), comma,
             (time_table[sim['hour'][lo:hi]], np.ones((n, time_table.shape[1]), bool)),
             (np.full((n, 1), ord('\n'), np.uint8), np.ones((n, 1), bool))]
    mat = np.concatenate([p[0] for p in parts], axis=1)
    keep = np.concatenate([p[1] for p in parts], axis=1)
    return mat[keep].tobytes()


def write_log(path: str, n_users: int = USERS, n_days: int = 31, seed: int = 0,
              mean_events: float = 150, n_items: int | None = None, n_categories: int | None = None,
              dup_rate: float = 0.15) -> int:
    """Write a demo log as Tianchi CSV at `path` (gzip when it ends in .gz); returns the row count.

    Folders are created; the file appears atomically (written to a temporary file in the same folder,
    then renamed), so an interrupted run never leaves a half-written log behind.
    Same arguments as `generate`; the rows are exactly `generate(...)`'s.
    """
    path = os.fspath(path)
    sim = _simulate(n_users, n_days, seed, mean_events, n_items, n_categories, dup_rate)
    time_table = np.frombuffer(''.join(_time_strings(sim['n_days'])).encode(), np.uint8).reshape(-1, 13)
    n = sim['user_id'].size

    def write(raw) -> None:
        out = gzip.GzipFile(fileobj=raw, mode='wb', compresslevel=6, mtime=0) if path.endswith('.gz') else raw
        out.write((','.join(TIANCHI_COLUMNS) + '\n').encode())
        for lo in range(0, n, WRITE_CHUNK_ROWS):
            out.write(_format_rows(sim, lo, min(n, lo + WRITE_CHUNK_ROWS), time_table))
        if out is not raw:
            out.close()

    atomic_write(path, write)
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description='Write a demo Tianchi-format behaviour log.')
    p.add_argument('--out', default='DATA/train_user/tianchi_mobile_recommend_train_user.csv',
                   help='output CSV path (.csv or .csv.gz); folders are created')
    p.add_argument('--users', type=int, default=USERS, help='number of users')
    p.add_argument('--days', type=int, default=31, help='days covered, from 2014-11-18')
    p.add_argument('--seed', type=int, default=0, help='random seed (same seed, same file)')
    p.add_argument('--mean_events', type=float, default=150, help='average events per user (heavy-tailed)')
    p.add_argument('--items', type=int, default=None, help='catalogue size (default: expected rows)')
    p.add_argument('--categories', type=int, default=None, help='categories (default: items/500, at most 10k)')
    p.add_argument('--dup_rate', type=float, default=0.15, help='probability an event repeats the previous one')
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    n = write_log(a.out, n_users=a.users, n_days=a.days, seed=a.seed, mean_events=a.mean_events,
                  n_items=a.items, n_categories=a.categories, dup_rate=a.dup_rate)
    print(f'wrote {n:,} rows for {a.users:,} users over {a.days} days to {a.out} '
          f'in {time.perf_counter() - t0:.1f} s')


if __name__ == '__main__':
    main()
