"""Tests for demo_data.py: determinism, file round trip, realistic marginals and learnable structure."""
import gzip
import os

import numpy as np
import pandas as pd
import pytest

import data
import demo_data


@pytest.fixture(scope='module')
def log():
    return demo_data.generate(n_users=1500, n_days=31, seed=0)


def test_deterministic_for_a_seed():
    a = demo_data.generate(n_users=80, n_days=5, seed=7)
    b = demo_data.generate(n_users=80, n_days=5, seed=7)
    c = demo_data.generate(n_users=80, n_days=5, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_columns_and_formats(log):
    assert list(log.columns) == demo_data.TIANCHI_COLUMNS
    assert log['time'].str.fullmatch(r'\d{4}-\d\d-\d\d \d\d').all()
    geo = log['user_geohash'].dropna()
    assert geo.str.fullmatch(r'[0-9b-hjkmnp-z]{7}').all()
    assert log['time'].min() == '2014-11-18 00' and log['time'].max() <= '2014-12-18 23'
    assert log['time'].str[:10].nunique() == 31
    assert set(log['behavior_type'].unique()) <= {1, 2, 3, 4}


def test_write_log_round_trips_through_read_events(tmp_path):
    path = tmp_path / 'DATA' / 'train_user' / data.TIANCHI_FILE
    n = demo_data.write_log(str(path), n_users=60, n_days=4, seed=3)
    assert os.listdir(path.parent) == [data.TIANCHI_FILE]            # folders created, no temp file left
    frame = demo_data.generate(n_users=60, n_days=4, seed=3)
    raw = pd.read_csv(path)
    assert n == len(frame) == len(raw)
    pd.testing.assert_frame_equal(raw, frame, check_dtype=False)
    ev, rep = data.read_events(str(path.parent), progress=False)
    assert rep.format == 'tianchi' and rep.skipped == {} and rep.rows_kept == n
    assert ev['item_id'].tolist() == frame['item_id'].tolist()
    gz = tmp_path / 'log.csv.gz'
    demo_data.write_log(str(gz), n_users=60, n_days=4, seed=3)
    with gzip.open(gz, 'rt') as f:
        assert f.read() == path.read_text()


def test_cli(tmp_path):
    out = tmp_path / 'x' / 'log.csv'
    demo_data.main(['--out', str(out), '--users', '30', '--days', '3', '--seed', '1'])
    ev, rep = data.read_events(str(out), progress=False)
    assert ev['user_id'].nunique() == 30 and rep.skipped == {}
    assert (ev['hour'].max() - ev['hour'].min()) < 3 * 24


def test_marginals(log):
    n = len(log)
    shares = log['behavior_type'].value_counts(normalize=True).sort_index().to_numpy()
    np.testing.assert_allclose(shares, demo_data.BEHAVIOR_SHARES, atol=0.004)
    assert 0.4 <= log['user_geohash'].isna().mean() <= 0.6                  # about half empty
    assert 0.1 <= log.duplicated().mean() <= 0.35                          # exact duplicate rows
    # daily rhythm: nights quiet, evenings busy
    hod = log['time'].str[-2:].astype(int)
    assert (hod.between(2, 5).mean() * 3) < hod.between(19, 22).mean()
    # Zipf-like items: a small head holds many events, most items are rare
    counts = log['item_id'].value_counts()
    assert counts.iloc[: len(counts) // 100].sum() / n > 0.15
    assert (counts <= 2).mean() > 0.5
    # items nested in categories
    assert log.groupby('item_id')['item_category'].nunique().max() == 1
    # heavy-tailed activity around the requested mean, every user present
    per_user = log['user_id'].value_counts()
    assert len(per_user) == 1500
    assert 120 <= per_user.mean() <= 190 and per_user.max() > 6 * per_user.median()
    # users interleaved in file order (not grouped)
    assert (log['user_id'].to_numpy()[1:] == log['user_id'].to_numpy()[:-1]).mean() < 0.02


def test_interests_persist_into_the_last_tenth(log):
    """A user's favourite categories of the first 90% of events predict the last 10%; another's do not."""
    ev = log.assign(hour=pd.to_datetime(log['time'], format='%Y-%m-%d %H'))
    ev = ev.sort_values(['user_id', 'hour'], kind='stable')
    pos = ev.groupby('user_id').cumcount()
    n = ev.groupby('user_id')['item_id'].transform('size')
    ev = ev[n >= 20]
    long_part = ev[pos[n >= 20] < (9 * n[n >= 20]) // 10]
    short_part = ev[pos[n >= 20] >= (9 * n[n >= 20]) // 10]
    top = long_part.groupby('user_id')['item_category'].agg(lambda s: set(s.value_counts().index[:3]))
    users = top.index.to_numpy()
    other = dict(zip(users, np.roll(users, 1)))
    own = short_part.apply(lambda r: r['item_category'] in top[r['user_id']], axis=1).mean()
    foreign = short_part.apply(lambda r: r['item_category'] in top[other[r['user_id']]], axis=1).mean()
    assert own > 0.6 and foreign < 0.2
    # favourite items come back too
    long_items = long_part.groupby('user_id')['item_id'].agg(set)
    again = short_part.apply(lambda r: r['item_id'] in long_items[r['user_id']], axis=1).mean()
    assert again > 0.3


def test_bad_arguments():
    with pytest.raises(ValueError):
        demo_data.generate(n_users=0)
    with pytest.raises(ValueError):
        demo_data.generate(n_users=5, dup_rate=1.0)


@pytest.mark.parametrize("n_users", [1, 2, 7, 20])
def test_tiny_logs_have_distinct_user_ids(n_users):
    for seed in range(30):  # small counts used to overflow the id range for some seeds
        log = demo_data.generate(n_users=n_users, n_days=3, seed=seed, mean_events=5)
        assert log["user_id"].nunique() == n_users
