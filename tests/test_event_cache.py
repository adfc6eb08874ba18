"""Tests for event_cache.py: the cache gives what read_events gives, is reused only while valid, and shards users."""
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import data
import demo_data
import event_cache
from data import DataError

from real_samples import real_sample
from test_data import HEADER, TIANCHI_BAD, write

TIANCHI_SAMPLE = str(real_sample('qichen2020__sample_user_behavior.csv'))
UB_SAMPLE = str(real_sample('Haohanblue__UserBehavior.csv'))
FAR_ROWS = ''.join(f'{u},{10 + u},1,,5,2014-12-{d:02d} 0{u}\n' for u in range(1, 4) for d in range(1, 8))


@pytest.fixture(scope='module')
def demo_log(tmp_path_factory):
    """A small generated Tianchi log (200 users) shared by the tests that only read it."""
    path = tmp_path_factory.mktemp('demo') / data.TIANCHI_FILE
    demo_data.write_log(path, n_users=200, seed=3)
    return str(path)


def fresh_copy(src: str, folder: Path) -> str:
    """A copy of a log in its own folder, so its cache lands beside it (never beside the shared samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / os.path.basename(src)
    shutil.copyfile(src, dst)
    return str(dst)


def load(path, messages=None, **kw):
    kw.setdefault('progress', False)
    return event_cache.load(path, log=(messages.append if messages is not None else lambda m: None), **kw)


def assert_same_as_direct(path: str, **opts):
    """read_events vs a fresh cache vs the reused cache: rows, report, vocabulary, target day, sequences."""
    ev, rep = data.read_events(path, progress=False, **opts)
    msgs = []
    built = load(path, msgs, **opts)
    reused = load(path, msgs, **opts)
    assert 'building' in msgs[0] and 'reusing' in msgs[-1]
    for cache in (built, reused):
        assert cache.events(file_order=True).equals(ev)
        got, want = vars(cache.report).copy(), vars(rep).copy()
        got.pop('seconds'), want.pop('seconds')
        assert got == want
    cached = reused.events()                                    # shard after shard: each user's rows in file order
    assert list(cached.columns) == data.EVENT_COLUMNS and cached.dtypes.equals(ev.dtypes)
    vocab = data.Vocab.fit(ev)
    assert reused.fit_vocab().fingerprint() == vocab.fingerprint()
    sums = {c: event_cache._multiset_hash(ev[c]) for c in ('item_id', 'category_id', 'hour')}
    assert reused.manifest['vocab_fingerprint'] == event_cache.vocab_fingerprint(sums, len(ev))
    history, target, cutoff, n_after = data.split_last_day(ev)
    c_history, c_target, c_cutoff, c_after = reused.split_last_day()
    assert (c_cutoff, c_after) == (cutoff, n_after) and reused.last_days_cutoff() == data.last_days_cutoff(ev)
    if len(history):
        h_vocab = data.Vocab.fit(history)
        assert reused.fit_vocab(before_hour=cutoff).fingerprint() == h_vocab.fingerprint()
        for a, b in ((history, c_history), (ev, cached)):
            s1, s2 = data.build_sequences(a, h_vocab), data.build_sequences(b, h_vocab)
            for name in ('user_ids', 'offsets', 'item', 'category', 'weekday', 'hour', 'behavior', 'time', 'abs_hour'):
                assert np.array_equal(getattr(s1, name), getattr(s2, name)), name
    assert sorted(c_target['user_id'].tolist()) == sorted(target['user_id'].tolist())
    return reused


# ---------------------------------------------------------------- the same events as read_events


@pytest.mark.parametrize('sample', ['tianchi', 'userbehavior'])
@pytest.mark.parametrize('dedupe', [False, True])
def test_real_samples_read_the_same_through_the_cache(tmp_path, sample, dedupe):
    src = TIANCHI_SAMPLE if sample == 'tianchi' else UB_SAMPLE
    assert_same_as_direct(fresh_copy(src, tmp_path / 'log'), dedupe=dedupe)


def test_demo_log_reads_the_same_through_the_cache(tmp_path, demo_log):
    cache = assert_same_as_direct(fresh_copy(demo_log, tmp_path / 'log'))
    assert cache.report.duplicate_rows > 0 and cache.n_shards == event_cache.MIN_SHARDS


@pytest.mark.parametrize('case', ['bad rows', 'slow path', 'userbehavior bad rows', 'quoted', 'implausible times',
                                  'crlf', 'gz', 'small chunks'])
def test_tricky_logs_read_the_same_through_the_cache(tmp_path, monkeypatch, case):
    texts = {
        'bad rows': TIANCHI_BAD,
        'slow path': HEADER + '1,10,1,,5,2014-12-06 02\n1,1x,1,,5,2014-12-06 02\n3,12,x,,5,2014-12-06 02\n'
                              '4,13,2,,6,2014-12-07 02\n',
        'userbehavior bad rows': '1,2,3,pv,1511544070\n1,2,3,click,1511544070\n1,2,3,pv,1511544070,9\n'
                                 '1,2,3,buy,15115\n1,2,3,cart,1511644070\n1,2,3,fav,abc\n',
        'quoted': HEADER + '"1","10","1","","5","2014-12-06 02"\n"2","11","4","abc12","6","2014-12-07 23"\n',
        'implausible times': HEADER + FAR_ROWS + '9,99,1,,5,2044-12-06 03\n',
        'crlf': (HEADER + FAR_ROWS).replace('\n', '\r\n'),
        'gz': None,
        'small chunks': HEADER + FAR_ROWS * 5 + '1,1x,1,,5,2014-12-06 02\n' + FAR_ROWS,   # slow path found late
    }
    if case == 'gz':
        path = tmp_path / 'log.csv.gz'
        path.write_bytes(gzip.compress((HEADER + FAR_ROWS + TIANCHI_BAD[len(HEADER):]).encode()))
        path = str(path)
    else:
        path = write(tmp_path / 'log.csv', texts[case])
    if case == 'small chunks':                  # several chunks per file, the typed parse failing in the last
        monkeypatch.setattr(data, 'CHUNK_ROWS', 7)
    assert_same_as_direct(path)
    if case in ('bad rows', 'implausible times'):
        assert_same_as_direct(path, time_window_days=0, dedupe=True)


@pytest.mark.parametrize('text, line', [(TIANCHI_BAD, r'bad\.csv: line 3: empty line'),
                                        (TIANCHI_BAD.replace('\n\n', '\n'), r'line 3: bad behavior \(behavior_type=7\)'),
                                        (HEADER + FAR_ROWS + '9,99,1,,5,2044-12-06 03\n',
                                         r'bad\.csv: line 23: time implausible \(2044-12-06 03, more than 365 days')])
def test_strict_stops_at_the_same_line_on_the_streaming_path(tmp_path, text, line):
    path = write(tmp_path / 'bad.csv', text)
    with pytest.raises(DataError, match=line):
        data.read_events(path, strict=True, progress=False)
    with pytest.raises(DataError, match=line):
        load(path, strict=True)
    assert os.listdir(tmp_path) == ['bad.csv']              # no cache, no half-written folder left behind


# ---------------------------------------------------------------- reuse, rebuild


def test_cache_hit_does_not_parse_again(tmp_path, demo_log, monkeypatch):
    path = fresh_copy(demo_log, tmp_path / 'log')
    first = load(path)
    assert Path(path + '.cache', event_cache.MANIFEST).is_file()
    stamps = {f: f.stat().st_mtime_ns for f in Path(path + '.cache').iterdir()}
    monkeypatch.setattr(data, 'stream_events', lambda *a, **k: pytest.fail('the log was parsed again'))
    msgs = []
    again = load(path, msgs)
    assert msgs[0].startswith(f'event cache: reusing {path}.cache')
    assert {f: f.stat().st_mtime_ns for f in Path(path + '.cache').iterdir()} == stamps
    assert again.events().equals(first.events())


def test_changed_log_is_parsed_again(tmp_path, demo_log):
    path = fresh_copy(demo_log, tmp_path / 'log')
    before = load(path)
    with open(path, 'a') as f:
        f.write('777,1,1,,5,2014-12-18 10\n')
    msgs = []
    after = load(path, msgs)
    assert 'the log changed' in msgs[0]
    assert after.report.rows_kept == before.report.rows_kept + 1 and 777 in after.users()
    assert after.manifest['vocab_fingerprint'] != before.manifest['vocab_fingerprint']
    os.utime(path, ns=(1, 1))                                   # same size, other modification time
    msgs.clear()
    load(path, msgs)
    assert 'the log changed' in msgs[0]


# ---------------------------------------------------------------- a log that grew: only the new lines parsed


def grow(src: str, folder: Path, cut: float, **opts) -> tuple[str, bytes]:
    """A copy of src cut after `cut` of its lines, cached; returns (its path, the lines left to append)."""
    text = Path(src).read_bytes()
    lines = text.splitlines(keepends=True)
    k = max(2, int(len(lines) * cut))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / os.path.basename(src)
    path.write_bytes(b''.join(lines[:k]))
    load(str(path), **opts)
    return str(path), b''.join(lines[k:])


def assert_update_equals_rebuild(path: str, tail: bytes, monkeypatch, **opts) -> event_cache.Cache:
    """Append tail, load: the cache is updated (only the tail parsed) and holds what a fresh build holds."""
    with open(path, 'ab') as f:
        f.write(tail)
    seen = []
    real = data.stream_events
    monkeypatch.setattr(data, 'stream_events', lambda *a, **k: seen.append(k.get('start', 0)) or real(*a, **k))
    msgs = []
    updated = load(path, msgs, **opts)
    assert 'updating' in msgs[0] and 'updated' in msgs[-1], msgs
    assert seen and all(s > 0 for s in seen)                    # never read from the top
    rebuilt = load(path, cache_dir=str(path) + '.rebuilt', **opts)
    for key in ('rows', 'users', 'vocab_fingerprint', 'hours', 'hour_counts', 'report', 'content', 'valid_rows',
                'valid_hours', 'valid_hour_counts', 'median_hour', 'fingerprint_sums'):
        assert updated.manifest[key] == rebuilt.manifest[key], key
    assert [s['rows'] for s in updated.manifest['shards']] == [s['rows'] for s in rebuilt.manifest['shards']]
    assert updated.events(file_order=True).equals(rebuilt.events(file_order=True))
    msgs.clear()
    load(path, msgs, **opts)
    assert 'reusing' in msgs[0], msgs                           # the updated cache is whole
    return updated


@pytest.mark.parametrize('dedupe', [False, True])
def test_appended_lines_update_the_cache_as_a_rebuild_would(tmp_path, demo_log, monkeypatch, dedupe):
    path, tail = grow(demo_log, tmp_path / 'log', 0.8, dedupe=dedupe)
    before = load(path, dedupe=dedupe)
    cache = assert_update_equals_rebuild(path, tail, monkeypatch, dedupe=dedupe)
    ev, _ = data.read_events(path, progress=False, dedupe=dedupe)
    assert cache.events(file_order=True).equals(ev)
    assert cache.report.duplicate_rows > before.report.duplicate_rows     # the tail repeats cached rows too


@pytest.mark.parametrize('max_parts', [event_cache.MAX_PARTS, 2])
def test_two_daily_refreshes_add_parts_then_compact_and_a_damaged_part_is_rebuilt(tmp_path, demo_log, monkeypatch,
                                                                               max_parts):
    monkeypatch.setattr(event_cache, 'MAX_PARTS', max_parts)
    path, rest = grow(demo_log, tmp_path / 'log', 0.7)
    lines = rest.splitlines(keepends=True)
    first, second = b''.join(lines[:len(lines) // 2]), b''.join(lines[len(lines) // 2:])
    once = assert_update_equals_rebuild(path, first, monkeypatch)
    assert all(len(s['parts']) == 1 for s in once.manifest['shards'])       # every shard got rows: one part each
    monkeypatch.undo()
    monkeypatch.setattr(event_cache, 'MAX_PARTS', max_parts)
    twice = assert_update_equals_rebuild(path, second, monkeypatch)
    n_parts = [len(s.get('parts', [])) for s in twice.manifest['shards']]
    assert n_parts == ([2] * len(n_parts) if max_parts > 2 else [0] * len(n_parts))   # 2 parts: compacted
    files = sorted(p.name for p in Path(path + '.cache').iterdir())
    assert len(files) == 1 + sum(1 + n for n in n_parts)                   # no file left behind
    if max_parts > 2:
        want = twice.events(file_order=True)
        part = Path(path + '.cache') / twice.manifest['shards'][5]['parts'][1]['file']
        b = bytearray(part.read_bytes())
        b[len(b) // 2] ^= 0xFF
        part.write_bytes(bytes(b))
        msgs = []
        again = load(path, msgs)
        assert 'building' in msgs[0] and 'is damaged' in msgs[0], msgs
        assert again.events(file_order=True).equals(want)


def test_appended_userbehavior_lines_and_bad_rows_update_the_cache(tmp_path, monkeypatch):
    path, tail = grow(UB_SAMPLE, tmp_path / 'ub', 0.9)
    bad = b'1,2,3,click,1511544070\n\n1,2,3,pv,1511544070,9\n'
    cache = assert_update_equals_rebuild(path, tail + bad, monkeypatch)
    assert cache.report.skipped == data.read_events(path, progress=False)[1].skipped
    assert sum(cache.report.skipped.values()) >= 3


def test_strict_names_the_file_line_of_a_bad_appended_row(tmp_path):
    path = write(tmp_path / 'log.csv', HEADER + FAR_ROWS)
    load(path, strict=True)
    with open(path, 'a') as f:
        f.write('1,10,1,,5,2014-12-06 02\n1,11,7,,5,2014-12-06 02\n')
    with pytest.raises(DataError, match=r'log\.csv: line 24: bad behavior'):
        load(path, strict=True)
    with pytest.raises(DataError, match=r'log\.csv: line 24: bad behavior'):
        data.read_events(path, strict=True, progress=False)


@pytest.mark.parametrize('change, why', [('edited', 'first'), ('no newline', 'line break'), ('window', 'window')])
def test_a_log_changed_otherwise_is_rebuilt(tmp_path, change, why):
    rows = FAR_ROWS
    if change == 'no newline':
        rows = rows.rstrip('\n')
    path = write(tmp_path / 'log.csv', HEADER + rows)
    opts = {'time_window_days': 3} if change == 'window' else {}
    load(path, **opts)
    text = Path(path).read_text()
    if change == 'edited':                                      # same length, one digit changed, then grown
        text = text.replace('2014-12-01', '2014-12-02', 1)
    extra = ''.join(f'{u},{20 + u},1,,5,2014-12-{d:02d} 05\n' for u in range(1, 4) for d in range(9, 31))
    Path(path).write_text(text + ('\n' if change == 'no newline' else '') + extra)
    msgs = []
    cache = load(path, msgs, **opts)
    assert any('building' in m and why in m for m in msgs), msgs
    ev, _ = data.read_events(path, progress=False, **opts)
    assert cache.events(file_order=True).equals(ev)


@pytest.mark.parametrize('damage, why', [('torn shard', 'is torn'), ('flipped byte', 'is damaged'),
                                         ('missing shard', 'is missing'), ('missing manifest', 'no manifest'),
                                         ('garbled manifest', 'unreadable manifest'), ('rebuild', 'rebuild requested'),
                                         ('other options', 'other options')])
def test_broken_or_outdated_cache_is_rebuilt_never_read(tmp_path, demo_log, damage, why):
    path = fresh_copy(demo_log, tmp_path / 'log')
    good = load(path).events()
    folder = Path(path + '.cache')
    shard = folder / 'shard-00003.parquet'
    kw = {}
    if damage == 'torn shard':
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    elif damage == 'flipped byte':
        b = bytearray(shard.read_bytes())
        b[len(b) // 2] ^= 0xFF
        shard.write_bytes(bytes(b))
    elif damage == 'missing shard':
        shard.unlink()
    elif damage == 'missing manifest':
        (folder / event_cache.MANIFEST).unlink()
    elif damage == 'garbled manifest':
        (folder / event_cache.MANIFEST).write_text('{"version": 1, "shar')
    elif damage == 'rebuild':
        kw['rebuild'] = True
    else:
        kw['dedupe'] = True
    msgs = []
    cache = load(path, msgs, **kw)
    assert 'building' in msgs[0] and why in msgs[0], msgs
    assert cache.events().equals(good) if damage != 'other options' else cache.report.duplicates_dropped > 0
    assert sorted(p.name for p in tmp_path.joinpath('log').iterdir()) == [os.path.basename(path),
                                                                           os.path.basename(path) + '.cache']
    msgs.clear()
    load(path, msgs, **({'dedupe': True} if damage == 'other options' else {}))
    assert 'reusing' in msgs[0]                                 # the rebuilt cache is whole


def test_read_only_log_folder_puts_the_cache_under_save_dir(tmp_path, demo_log):
    path = fresh_copy(demo_log, tmp_path / 'ro')
    os.chmod(tmp_path / 'ro', 0o555)
    try:
        cache = load(path, save_dir=str(tmp_path / 'models'))
        again = load(path, [], save_dir=str(tmp_path / 'models'))
    finally:
        os.chmod(tmp_path / 'ro', 0o755)
    assert os.listdir(tmp_path / 'ro') == [data.TIANCHI_FILE]
    assert cache.directory.parent == tmp_path / 'models' / 'event_cache' and again.directory == cache.directory


# ---------------------------------------------------------------- shards


def test_shards_partition_the_users_exactly_once(tmp_path, demo_log):
    cache = load(fresh_copy(demo_log, tmp_path / 'log'), n_shards=5)
    assert cache.n_shards == 5
    per_shard = [cache.users([k]) for k in range(5)]
    everyone = np.concatenate(per_shard)
    assert len(everyone) == len(np.unique(everyone)) == cache.manifest['users']
    assert np.array_equal(np.sort(everyone), cache.users())
    for k, users in enumerate(per_shard):
        assert len(users) and (cache.shard_of_users(users) == k).all()
        assert len(users) == cache.manifest['shards'][k]['users']
    some = cache.events(shards=[1, 3])
    assert set(some['user_id']) == set(per_shard[1]) | set(per_shard[3])
    # a rank holding some shards still fits the whole log's vocabulary and target day
    assert cache.fit_vocab(shards=range(5)).fingerprint() == data.Vocab.fit(cache.events()).fingerprint()
    assert cache.split_last_day([2])[2] == data.last_days_cutoff(cache.events())
    assert np.array_equal(event_cache.shard_of_users([0, 1, 2, 10**12], 7),
                          event_cache.shard_of_users(np.array([0, 1, 2, 10**12]), 7))    # stable, id-only
    with pytest.raises(IndexError):
        cache.events(shards=[5])


def test_prefaulted_arrays_are_ordinary_writable_arrays():
    a = event_cache._prefaulted_empty(300_000, np.int64)       # 2.4 MB: the mmap path
    a[:] = np.arange(300_000)
    assert a.dtype == np.int64 and len(a) == 300_000 and a.flags.writeable and a[-1] == 299_999
    assert len(event_cache._prefaulted_empty(0, np.int8)) == 0


def test_counts_added_over_shards_equal_one_count_of_all_rows():
    rng = np.random.default_rng(5)
    parts = [rng.integers(0, n, size) for n, size in ((50, 400), (1000, 30), (10, 0), (5000, 2000), (3, 7))]
    total = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    for p in parts:
        assert all(np.array_equal(x, y) for x, y in zip(event_cache._distinct_counts(p),
                                                         np.unique(p, return_counts=True)))
        total = event_cache._merge_counts(*total, *event_cache._distinct_counts(p))
    want = np.unique(np.concatenate(parts), return_counts=True)
    assert np.array_equal(total[0], want[0]) and np.array_equal(total[1], want[1])


def test_a_build_that_loses_the_race_to_other_options_builds_again(tmp_path, demo_log, monkeypatch):
    """Another process's build with other options (--dedupe) lands between our two renames: ours is dropped,
    theirs does not fit, so ours is built again (not an error, not their cache)."""
    path = fresh_copy(demo_log, tmp_path / 'log')
    real, calls = event_cache._swap_in, []

    def racing(tmp, directory):
        calls.append(tmp)
        if len(calls) == 1:                                     # theirs lands first
            monkeypatch.setattr(event_cache, '_swap_in', real)
            load(path, dedupe=True)
            monkeypatch.setattr(event_cache, '_swap_in', racing)
            shutil.rmtree(tmp, ignore_errors=True)             # (one process here: theirs used the same temp name)
            return False
        return real(tmp, directory)

    monkeypatch.setattr(event_cache, '_swap_in', racing)
    cache = load(path)
    assert len(calls) == 2 and cache.manifest['options']['dedupe'] is False
    assert cache.report.duplicates_dropped == 0 and cache.report.duplicate_rows > 0
    msgs = []
    load(path, msgs)
    assert 'reusing' in msgs[0]
