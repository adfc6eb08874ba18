"""Tests for data.py: reading/validation, duplicates, vocabulary, CSR sequences and padded batches."""
import gzip
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import data
from data import DataError

from real_samples import real_sample

TIANCHI_SAMPLE = str(real_sample('qichen2020__sample_user_behavior.csv'))
UB_SAMPLE = str(real_sample('Haohanblue__UserBehavior.csv'))
HEADER = 'user_id,item_id,behavior_type,user_geohash,item_category,time\n'


def hour_of(s: str) -> int:
    return int(np.datetime64(s, 'h').astype(np.int64))


def write(path, text: str) -> str:
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


def events_frame(rows) -> pd.DataFrame:
    """rows of (user, item, category, behavior, hour) -> an events table as read_events returns it."""
    a = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return pd.DataFrame({'user_id': a[:, 0], 'item_id': a[:, 1], 'category_id': a[:, 2],
                         'behavior': a[:, 3].astype(np.int8), 'hour': a[:, 4]})


def random_events(rng, n_users=40, n=3000, n_items=300, span=200) -> pd.DataFrame:
    lens = rng.integers(1, 2 * n // n_users, n_users)
    users = np.repeat(rng.choice(10 ** 6, n_users, replace=False), lens)
    users = users[rng.permutation(users.size)]
    m = users.size
    return pd.DataFrame({'user_id': users, 'item_id': rng.integers(0, n_items, m),
                         'category_id': rng.integers(0, 20, m), 'behavior': rng.integers(1, 5, m).astype(np.int8),
                         'hour': 400_000 + rng.integers(0, span, m)})


@pytest.fixture(scope='module')
def ub():
    return data.read_events(UB_SAMPLE, progress=False)


@pytest.fixture(scope='module')
def tianchi():
    return data.read_events(TIANCHI_SAMPLE, progress=False)


# ---------------------------------------------------------------- real samples


def test_tianchi_sample_counts(tianchi):
    ev, rep = tianchi
    assert rep.format == 'tianchi'
    assert (rep.rows_read, rep.rows_kept, rep.skipped) == (1999, 1999, {})
    assert ev['user_id'].nunique() == 34
    assert ev['behavior'].value_counts().to_dict() == {1: 1876, 3: 70, 4: 35, 2: 18}
    assert list(ev.columns) == data.EVENT_COLUMNS
    assert [str(ev[c].dtype) for c in ev.columns] == ['int64', 'int64', 'int64', 'int8', 'int64']
    # file order kept; time strings are already China local time
    assert ev.iloc[0].tolist() == [98047837, 232431562, 4245, 1, hour_of('2014-12-06T02')]
    assert ev.iloc[1]['hour'] == hour_of('2014-12-09T20')


def test_userbehavior_sample_counts_and_truncated_last_line(ub):
    ev, rep = ub
    assert rep.format == 'userbehavior'
    assert rep.rows_read == 84476 and rep.rows_kept == 84475
    assert rep.skipped == {'truncated line': 1}
    assert ev['user_id'].nunique() == 815
    # the cut-off last row was a 'pv'
    assert ev['behavior'].value_counts().to_dict() == {1: 75872, 3: 4497, 2: 2356, 4: 1750}
    # unix seconds -> China time (UTC+8): 1511544070 = 2017-11-24 17:21:10 UTC = 2017-11-25 01:21 local
    assert ev.iloc[0].tolist() == [1, 2268318, 2520377, 1, hour_of('2017-11-25T01')]
    assert 'truncated line: 1' in rep.summary()


def test_strict_makes_truncated_line_fatal_with_its_line_number():
    with pytest.raises(DataError, match=r'Haohanblue__UserBehavior\.csv: line 84476: truncated line'):
        data.read_events(UB_SAMPLE, strict=True, progress=False)


def test_explicit_format_mismatch_is_an_error():
    with pytest.raises(DataError, match='Tianchi'):
        data.read_events(UB_SAMPLE, data_format='tianchi', progress=False)
    with pytest.raises(DataError, match='UserBehavior'):
        data.read_events(TIANCHI_SAMPLE, data_format='userbehavior', progress=False)
    ev, rep = data.read_events(TIANCHI_SAMPLE, data_format='tianchi', progress=False)
    assert rep.rows_kept == 1999


# ---------------------------------------------------------------- paths and file-level errors


def test_folder_resolution(tmp_path):
    d = tmp_path / 'train_user'
    d.mkdir()
    with pytest.raises(DataError, match='train_user'):
        data.read_events(str(d), progress=False)
    shutil.copy(TIANCHI_SAMPLE, d / 'a.csv')
    assert data.resolve_log_path(str(d)) == str(d / 'a.csv')          # the single CSV
    shutil.copy(TIANCHI_SAMPLE, d / 'b.csv')
    with pytest.raises(DataError, match=r'train_user.*several CSV'):
        data.resolve_log_path(str(d))
    with gzip.open(d / (data.TIANCHI_FILE + '.gz'), 'wb') as f:         # the Tianchi name wins
        f.write(open(TIANCHI_SAMPLE, 'rb').read())
    ev, rep = data.read_events(d, progress=False)
    assert rep.path.endswith(data.TIANCHI_FILE + '.gz') and rep.rows_kept == 1999
    with pytest.raises(DataError, match='no such file'):
        data.read_events(str(tmp_path / 'missing.csv'), progress=False)


def test_folder_with_a_tianchi_and_a_userbehavior_log_is_an_error_naming_both(tmp_path):
    d = tmp_path / 'train_user'
    d.mkdir()
    shutil.copy(TIANCHI_SAMPLE, d / data.TIANCHI_FILE)
    write(d / 'notes.csv', 'not,a,log\n')                  # not a log: the Tianchi log is still meant
    assert data.resolve_log_path(str(d)) == str(d / data.TIANCHI_FILE)
    shutil.copy(UB_SAMPLE, d / 'UserBehavior.csv')
    with pytest.raises(DataError, match=rf'train_user: folder holds both a Tianchi log \({data.TIANCHI_FILE}\) '
                                        r'and a UserBehavior log \(UserBehavior\.csv\)'):
        data.read_events(str(d), progress=False)


def test_file_level_errors_name_the_file_and_expectation(tmp_path):
    empty = write(tmp_path / 'empty.csv', '')
    with pytest.raises(DataError, match=r'empty\.csv: file is empty'):
        data.read_events(empty, progress=False)
    renamed = write(tmp_path / 'renamed.csv', HEADER.replace('item_category', 'category') + '1,2,1,,5,2014-12-06 02\n')
    with pytest.raises(DataError, match=r'renamed\.csv: header lacks column\(s\) item_category'):
        data.read_events(renamed, progress=False)
    header_only = write(tmp_path / 'header.csv', HEADER)
    with pytest.raises(DataError, match=r'header\.csv: no data rows'):
        data.read_events(header_only, progress=False)
    junk = write(tmp_path / 'junk.csv', 'hello world\nfoo bar\n')
    with pytest.raises(DataError, match=r'junk\.csv: unrecognised log format; expected a Tianchi log'):
        data.read_events(junk, progress=False)
    all_bad = write(tmp_path / 'bad.csv', HEADER + '1,2,9,,5,2014-12-06 02\n')
    with pytest.raises(DataError, match=r'bad\.csv: no valid rows'):
        data.read_events(all_bad, progress=False)


@pytest.mark.parametrize('damage', ['cut in half', 'garbage after the header', 'byte flipped'])
@pytest.mark.parametrize('strict', [False, True])
def test_damaged_gz_is_named_as_damaged_input(tmp_path, damage, strict):
    gz = bytearray(gzip.compress(open(TIANCHI_SAMPLE, 'rb').read()))
    if damage == 'cut in half':
        gz = gz[:len(gz) // 2]
    elif damage == 'garbage after the header':
        gz = gz[:10] + bytes(range(256)) * 40
    else:                                               # decompresses to junk rows before the CRC check fails
        gz[len(gz) // 2] ^= 0xFF
    path = tmp_path / (data.TIANCHI_FILE + '.gz')
    path.write_bytes(bytes(gz))
    with pytest.raises(DataError, match=r'tianchi_mobile_recommend_train_user\.csv\.gz: damaged compressed input: '
                                        r'(it is truncated|its compressed data is corrupted)'):
        data.read_events(str(tmp_path), strict=strict, progress=False)


def test_columns_may_be_reordered(tmp_path):
    p = write(tmp_path / 'r.csv', 'time,item_category,user_geohash,behavior_type,item_id,user_id\n'
                                   '2014-12-06 02,5,,3,2,1\n')
    ev, _ = data.read_events(p, progress=False)
    assert ev.iloc[0].tolist() == [1, 2, 5, 3, hour_of('2014-12-06T02')]


# ---------------------------------------------------------------- malformed rows


TIANCHI_BAD = (HEADER +
               '1,10,1,,5,2014-12-06 02\n'       # 2 ok
               '\n'                              # 3 empty line
               '1,11,7,,5,2014-12-06 02\n'       # 4 bad behavior
               '1,12,1,,5,2014-13-06 02\n'       # 5 unparsable time
               '2,13,1\n'                        # 6 truncated line
               '2,,1,,5,2014-12-06 03\n'         # 7 missing field
               '2,14,1,,5,1999-12-06 03\n'       # 8 time out of range
               '2,15,4,abc1234,6,2014-12-07 23\n'  # 9 ok
               )


def test_malformed_rows_are_counted_by_reason_and_skipped(tmp_path):
    p = write(tmp_path / 'bad.csv', TIANCHI_BAD)
    ev, rep = data.read_events(p, progress=False)
    assert rep.rows_read == 8 and rep.rows_kept == 2
    assert rep.skipped == {'empty line': 1, 'bad behavior': 1, 'unparsable time': 1, 'truncated line': 1,
                           'missing field': 1, 'time out of range': 1}
    assert ev['item_id'].tolist() == [10, 15]
    assert not rep.slow_path
    with pytest.raises(DataError, match=r'bad\.csv: line 3: empty line'):
        data.read_events(p, strict=True, progress=False)
    p2 = write(tmp_path / 'bad2.csv', TIANCHI_BAD.replace('\n\n', '\n'))
    with pytest.raises(DataError, match=r"line 3: bad behavior \(behavior_type=7\)"):
        data.read_events(p2, strict=True, progress=False)


def test_non_integer_ids_take_the_slow_path_and_are_counted(tmp_path):
    p = write(tmp_path / 'nonint.csv', HEADER + '1,10,1,,5,2014-12-06 02\n'
                                                '1,1x,1,,5,2014-12-06 02\n'
                                                '1,2.5,1,,5,2014-12-06 02\n'
                                                '1,99999999999999999999,1,,5,2014-12-06 02\n'
                                                '3,12,x,,5,2014-12-06 02\n'
                                                '4,13,2,,6,2014-12-06 02\n')
    ev, rep = data.read_events(p, progress=False)
    assert rep.slow_path
    assert rep.skipped == {'non-integer id': 3, 'bad behavior': 1}
    assert ev['item_id'].tolist() == [10, 13] and ev['behavior'].tolist() == [1, 2]
    with pytest.raises(DataError, match=r"line 3: non-integer id \(item_id='1x'\)"):
        data.read_events(p, strict=True, progress=False)


def test_userbehavior_malformed_rows(tmp_path):
    p = write(tmp_path / 'ub.csv', '1,2,3,pv,1511544070\n'
                                   '1,2,3,click,1511544070\n'          # 2 bad behavior
                                   '1,2,3,pv,1511544070,9\n'           # 3 too many fields
                                   '1,2,3,buy,15115\n'                 # 4 truncated timestamp: 1970
                                   '1,2,3,cart,1511544070\n'
                                   '1,2,3,fav,abc\n')                  # 6 unparsable time
    ev, rep = data.read_events(p, progress=False)
    assert rep.rows_read == 6 and rep.rows_kept == 2
    assert rep.skipped == {'too many fields': 1, 'bad behavior': 1, 'time out of range': 1, 'unparsable time': 1}
    assert ev['behavior'].tolist() == [1, 3]
    p2 = write(tmp_path / 'ub2.csv', '1,2,3,pv,1511544070\n1,2,3,pv,1511544070,9\n1,2,3,click,1511544070\n')
    with pytest.raises(DataError, match=r'line 2: too many fields'):
        data.read_events(p2, strict=True, progress=False)


def test_fields_quoted_by_a_csv_writer_read_like_plain_ones(tmp_path):
    rows = ['1,10,1,,5,2014-12-06 02', '2,11,4,abc12,6,2014-12-07 23', '2,1x,4,abc12,6,2014-12-07 23']
    quoted = ''.join('"' + r.replace(',', '","') + '"\n' for r in rows)
    ev, rep = data.read_events(write(tmp_path / 'q.csv', HEADER + quoted), progress=False)
    plain, _ = data.read_events(write(tmp_path / 'p.csv', HEADER + '\n'.join(rows) + '\n'), progress=False)
    assert rep.skipped == {'non-integer id': 1} and ev.equals(plain)
    ub, rep = data.read_events(write(tmp_path / 'ubq.csv', '"1","2","3","pv","1511544070"\n'), progress=False)
    assert rep.rows_kept == 1 and ub['behavior'].tolist() == [1]


def test_times_far_from_the_rest_of_the_log_are_counted_as_implausible(tmp_path):
    rows = ''.join(f'{u},{10 + u},1,,5,2014-12-{d:02d} 0{u}\n' for u in range(1, 4) for d in range(1, 8))
    p = write(tmp_path / 'far.csv', HEADER + rows + '9,99,1,,5,2044-12-06 03\n')    # line 23: a typo'd year
    ev, rep = data.read_events(p, progress=False)
    assert rep.skipped == {'time implausible': 1} and rep.rows_kept == 21
    assert ev['hour'].max() < hour_of('2014-12-08T00')                            # the target day stays in 2014
    assert 'time implausible: 1' in rep.summary()
    with pytest.raises(DataError, match=r"far\.csv: line 23: time implausible \(2044-12-06 03, more than 365 days"):
        data.read_events(p, strict=True, progress=False)
    assert len(data.read_events(p, progress=False, time_window_days=0)[0]) == 22   # 0: no window
    ub_rows = '1,2,3,pv,1511544070\n1,2,3,pv,1511547670\n1,2,3,buy,2458000000\n'   # UserBehavior: 2047
    _, rep = data.read_events(write(tmp_path / 'ub_far.csv', ub_rows), progress=False)
    assert rep.skipped == {'time implausible': 1}


def test_a_cut_time_is_unparsable_not_a_guessed_day(tmp_path):
    # a last line cut mid-time ('2014-1', '2014-12-1') must not read as 2014-01-01 or 2014-12-01 00h;
    # longer ISO forms still floor to the hour
    rows = ['1,10,1,,5,2014-12-06 02', '1,11,1,,5,2014-12-06 03:45', '2,12,1,,5,2014-12-06T04:10:59',
            '2,13,1,,5,2014-1', '3,14,1,,5,2014-12-1']
    p = write(tmp_path / 'cut.csv', HEADER + '\n'.join(rows))           # no final newline, like a cut copy
    ev, rep = data.read_events(p, progress=False)
    assert rep.skipped == {'unparsable time': 2} and rep.rows_kept == 3
    assert ev['hour'].tolist() == [hour_of('2014-12-06T02'), hour_of('2014-12-06T03'), hour_of('2014-12-06T04')]
    with pytest.raises(DataError, match=r"cut\.csv: line 5: unparsable time \(time='2014-1'\)"):
        data.read_events(p, strict=True, progress=False)


def test_a_pipe_is_named_as_not_a_regular_file(tmp_path):
    fifo = tmp_path / 'log.fifo'
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r'log\.fifo: not a regular file'):
        data.read_events(fifo, progress=False)
    with pytest.raises(DataError, match=r'nope\.csv: no such file or folder'):
        data.read_events(tmp_path / 'nope.csv', progress=False)


def test_line_numbers_account_for_skipped_lines(tmp_path):
    # lines the parser drops itself (too many fields) must not shift later rows' line numbers
    lines = ['1,2,3,pv,1511544070'] * 3 + ['1,2,3,pv,1511544070,9'] * 2 + ['1,2,3,pv,1511544070', '1,2,3,nope,1']
    p = write(tmp_path / 'ub.csv', '\n'.join(lines) + '\n')
    ev, rep = data.read_events(p, progress=False)
    assert rep.skipped == {'too many fields': 2, 'bad behavior': 1}
    with pytest.raises(DataError, match='line 4: too many fields'):
        data.read_events(p, strict=True, progress=False)
    assert data._line_of_row(4, 0, np.array([4, 5])) == 7


def test_crlf_line_endings_read_like_lf_in_both_formats(tmp_path):
    tianchi = write(tmp_path / 'lf.csv', TIANCHI_BAD)
    crlf = tmp_path / 'crlf.csv'
    crlf.write_bytes(TIANCHI_BAD.replace('\n', '\r\n').encode())
    ub_rows = '1,2,3,pv,1511544070\n1,2,3,click,1511544070\n1,2,3,pv,1511544070,9\n1,3,3,cart,1511547670\n'
    ub_lf = write(tmp_path / 'ub.csv', ub_rows)
    ub_crlf = tmp_path / 'ub_crlf.csv'
    ub_crlf.write_bytes(ub_rows.replace('\n', '\r\n').encode())
    for lf, cr in ((tianchi, crlf), (ub_lf, ub_crlf)):
        (ev1, rep1), (ev2, rep2) = (data.read_events(p, progress=False) for p in (lf, cr))
        assert (rep2.rows_read, rep2.rows_kept, rep2.skipped) == (rep1.rows_read, rep1.rows_kept, rep1.skipped)
        assert ev2.equals(ev1)
    valid = tmp_path / 'valid.csv'                      # --strict accepts a valid CRLF file, .gz too
    valid.write_bytes((HEADER + '1,10,1,,5,2014-12-06 02\n2,11,4,x,6,2014-12-07 23\n').replace('\n', '\r\n').encode())
    with gzip.open(str(valid) + '.gz', 'wb') as f:
        f.write(valid.read_bytes())
    for p in (valid, str(valid) + '.gz'):
        ev, rep = data.read_events(p, strict=True, progress=False)
        assert rep.rows_read == rep.rows_kept == 2 and ev['item_id'].tolist() == [10, 11]


def test_tianchi_extra_fields_are_counted_on_their_own_line(tmp_path):
    rows = ['1,10,1,,5,2014-12-06 02',              # 2 ok
            '1,11,1,,5,2014-12-06 03,extra',        # 3 too many fields
            '2,12,1,,5,2014-12-06 04',              # 4 ok: not disturbed by line 3
            '2,13,7,,5,2014-12-06 05',              # 5 bad behavior
            '3,14,1,,5,2014-12-06 05,x,y']          # 6 too many fields
    p = write(tmp_path / 'extra.csv', HEADER + '\n'.join(rows) + '\n')
    ev, rep = data.read_events(p, progress=False)
    assert rep.rows_read == 5 and rep.skipped == {'too many fields': 2, 'bad behavior': 1}
    assert ev['item_id'].tolist() == [10, 12] and ev['hour'].tolist() == [hour_of('2014-12-06T02'),
                                                                         hour_of('2014-12-06T04')]
    with pytest.raises(DataError, match=r'extra\.csv: line 3: too many fields'):
        data.read_events(p, strict=True, progress=False)
    p2 = write(tmp_path / 'later.csv', HEADER + '\n'.join([rows[0], rows[2], rows[3], rows[1]]) + '\n')
    with pytest.raises(DataError, match=r'line 4: bad behavior \(behavior_type=7\)'):
        data.read_events(p2, strict=True, progress=False)
    # extra fields on the first data lines: pandas would take the first column for an index and shift every row
    p3 = write(tmp_path / 'first.csv', HEADER + '\n'.join([rows[1], rows[4], rows[0], rows[2]]) + '\n')
    ev, rep = data.read_events(p3, progress=False)
    assert rep.rows_read == 4 and rep.skipped == {'too many fields': 2}
    assert ev.values.tolist() == [[1, 10, 5, 1, hour_of('2014-12-06T02')], [2, 12, 5, 1, hour_of('2014-12-06T04')]]
    with pytest.raises(DataError, match=r'first\.csv: line 2: too many fields'):
        data.read_events(p3, strict=True, progress=False)
    upper = write(tmp_path / 'upper.csv', HEADER.upper() + rows[0] + '\n')   # header matched as detection does
    assert data.read_events(upper, progress=False)[0]['item_id'].tolist() == [10]


# ---------------------------------------------------------------- duplicates


def test_duplicates_counted_kept_by_default_and_dropped_with_dedupe(tmp_path):
    rows = ['1,10,1,,5,2014-12-06 02', '1,10,1,,5,2014-12-06 02', '2,10,1,,5,2014-12-06 02',
            '1,10,1,xyz,5,2014-12-06 02', '1,10,2,,5,2014-12-06 02', '1,10,1,,5,2014-12-06 03']
    p = write(tmp_path / 'dup.csv', HEADER + '\n'.join(rows) + '\n')
    ev, rep = data.read_events(p, progress=False)
    assert rep.rows_kept == 6 and rep.duplicate_rows == 2 and rep.duplicates_dropped == 0
    ev2, rep2 = data.read_events(p, dedupe=True, progress=False)
    assert rep2.rows_kept == 4 and rep2.duplicates_dropped == 2
    # first occurrences kept, in file order
    assert ev2.values.tolist() == ev.iloc[[0, 2, 4, 5]].values.tolist()


def test_duplicate_mask_matches_pandas_even_with_hash_collisions(monkeypatch):
    rng = np.random.default_rng(1)
    for n in (0, 1, 2, 57, 5000):
        ev = events_frame(np.stack([rng.integers(0, 5, n), rng.integers(0, 6, n), rng.integers(0, 2, n),
                                    rng.integers(1, 3, n), 400_000 + rng.integers(0, 3, n)], axis=1))
        assert np.array_equal(data.duplicate_mask(ev), ev.duplicated().to_numpy())
        assert n < 100 or 0 < ev.duplicated().sum() < n
    # a terrible hash (3 values) forces different rows into one group: the exact fallback must settle them
    monkeypatch.setattr(data, '_row_hash', lambda e: (e['item_id'].to_numpy() % 3).astype(np.uint64) << np.uint64(62))
    ev = random_events(rng, n_users=6, n=4000, n_items=9, span=4)
    assert np.array_equal(data.duplicate_mask(ev), ev.duplicated().to_numpy())


# ---------------------------------------------------------------- vocabulary


def test_vocab_indices_rare_items_and_unseen_ids(tmp_path):
    ev = events_frame([(1, 100, 7, 1, 10), (1, 100, 7, 1, 11), (2, 100, 7, 1, 12),
                       (2, 200, 8, 1, 13), (2, 200, 8, 1, 14), (3, 300, 9, 1, 15)])
    v = data.Vocab.fit(ev, min_item_count=2, time_trim=0)
    assert v.n_items == 4 and v.n_categories == 5            # pad + unknown + kept
    assert v.encode_items([100, 200, 300, 999]).tolist() == [2, 3, 1, 1]   # most frequent first; rare, unseen -> 1
    assert v.encode_categories([7, 8, 9, 5]).tolist() == [2, 3, 4, 1]
    assert v.encode_items(np.array([], np.int64)).dtype == np.int64
    assert (v.t_min, v.t_max, v.min_item_count) == (10, 15, 2)
    assert data.Vocab.fit(ev, min_item_count=1).n_items == 5


def test_vocab_round_trip_and_atomic_save(tmp_path):
    ev = random_events(np.random.default_rng(2))
    v = data.Vocab.fit(ev, min_item_count=3)
    path = tmp_path / 'saved' / 'vocab.npz'
    v.save(path)                                                    # a pathlib.Path works too
    assert sorted(os.listdir(path.parent)) == ['vocab.npz']       # no temp file left behind
    w = data.Vocab.load(str(path))
    for name in ('items', 'item_counts', 'categories', 'category_counts'):
        assert np.array_equal(getattr(v, name), getattr(w, name))
    assert (w.t_min, w.t_max, w.min_item_count, w.n_items, w.n_categories) == \
           (v.t_min, v.t_max, 3, v.n_items, v.n_categories)
    raw = np.concatenate([ev['item_id'].to_numpy(), [10 ** 9, -5]])
    assert np.array_equal(w.encode_items(raw), v.encode_items(raw))
    assert w.encode_items([10 ** 9]).tolist() == [data.UNKNOWN]
    v.save(str(path))                                               # overwrite in place
    bad = write(tmp_path / 'bad.npz', 'not a vocabulary')
    with pytest.raises(DataError, match='bad.npz'):
        data.Vocab.load(bad)


def test_time_normalisation_trims_outliers_and_clips(ub):
    ev, _ = ub
    v = data.Vocab.fit(ev)
    # one stray row from 2017-09-11 must not become the start of the span
    assert int(ev['hour'].min()) < hour_of('2017-09-12T00')
    assert hour_of('2017-11-24T00') <= v.t_min <= hour_of('2017-11-25T06')
    assert v.t_max == hour_of('2017-12-03T23')
    span = v.t_max - v.t_min
    t = v.time_features([v.t_min - 500, v.t_min, v.t_min + span // 3, v.t_max, v.t_max + 48])
    assert t.dtype == np.float32 and t.shape == (5, 2)
    third = (span // 3) / span
    np.testing.assert_allclose(t, [[0, 1], [0, 1], [third, 1 - third], [1, 0], [1, 0]], atol=1e-6)


# ---------------------------------------------------------------- sequences


def slow_reference(ev: pd.DataFrame, vocab: data.Vocab) -> dict:
    """Per raw user: list of (item index, category index, behavior, hour) sorted stably by hour."""
    ref = {}
    for pos, r in enumerate(ev.itertuples(index=False)):
        ref.setdefault(r.user_id, []).append((r.hour, pos, r.item_id, r.category_id, r.behavior))
    out = {}
    for u, evs in ref.items():
        evs.sort(key=lambda x: (x[0], x[1]))                # stable: same hour keeps file order
        out[u] = [(int(vocab.encode_items([e[2]])[0]), int(vocab.encode_categories([e[3]])[0]), e[4], e[0])
                  for e in evs]
    return out


@pytest.fixture(scope='module')
def rand_seqs():
    ev = random_events(np.random.default_rng(3), n_users=60, n=4000, span=30)
    ev = pd.concat([ev, events_frame([(7, 1, 1, 1, 400_010)])], ignore_index=True)   # a one-event user
    vocab = data.Vocab.fit(ev, min_item_count=2)
    return ev, vocab, data.build_sequences(ev, vocab), slow_reference(ev, vocab)


def test_csr_matches_slow_reference(rand_seqs):
    ev, vocab, seqs, ref = rand_seqs
    assert seqs.user_ids.tolist() == sorted(ref)
    assert seqs.lengths.tolist() == [len(ref[u]) for u in sorted(ref)]
    assert seqs.offsets[0] == 0 and seqs.offsets[-1] == len(ev) == seqs.n_events
    for k, u in enumerate(seqs.user_ids):
        s, e = seqs.offsets[k], seqs.offsets[k + 1]
        got = list(zip(seqs.item[s:e].tolist(), seqs.category[s:e].tolist(), seqs.behavior[s:e].tolist(),
                       seqs.abs_hour[s:e].tolist()))
        assert got == ref[u]


def test_calendar_features():
    # 2014-12-06 is a Saturday, 2014-12-08 a Monday, 2014-12-07 23h a Sunday
    ev = events_frame([(1, 5, 6, 1, hour_of('2014-12-08T00')), (1, 5, 6, 1, hour_of('2014-12-06T13')),
                       (1, 5, 6, 1, hour_of('2014-12-07T23'))])
    seqs = data.build_sequences(ev, data.Vocab.fit(ev, min_item_count=1, time_trim=0))
    assert seqs.weekday.tolist() == [6, 7, 1]
    assert seqs.hour.tolist() == [14, 24, 1]
    assert seqs.weekend.tolist() == [2, 2, 1]
    np.testing.assert_allclose(seqs.time[:, 0], [0, (34 / 35), 1], atol=1e-6)
    np.testing.assert_allclose(seqs.time.sum(axis=1), 1, atol=1e-6)


@pytest.mark.parametrize('part,min_len,max_len', [('long', 5, 12), ('short', 2, 3), ('all', 3, 20),
                                                   ('long', data.N_MIN, data.N_MAX), ('short', data.K_MIN, data.K_MAX)])
def test_batches_match_slow_reference(rand_seqs, part, min_len, max_len):
    ev, vocab, seqs, ref = rand_seqs
    users = np.array([0, 5, 3, 5, seqs.n_users - 1, 17])
    b = seqs.batch(users, part, min_len, max_len)
    longest = 0
    rows = []
    for u in users:
        evs = ref[seqs.user_ids[u]]
        n = len(evs)
        cut = int(np.floor(9 * n / 10))
        sel = {'long': evs[:cut], 'short': evs[cut:], 'all': evs}[part]
        sel = sel[-max_len:]                                  # most recent kept
        longest = max(longest, len(sel))
        rows.append(sel)
    L = min(max(longest, min_len), max_len)
    assert set(b) == {'item', 'category', 'weekday', 'hour', 'weekend', 'behavior', 'time', 'mask'}
    for k in ('item', 'category', 'weekday', 'hour', 'weekend', 'behavior'):
        assert b[k].shape == (len(users), L) and b[k].dtype == np.int64
    assert b['time'].shape == (len(users), L, 2) and b['time'].dtype == np.float32
    assert b['mask'].dtype == bool
    for i, sel in enumerate(rows):
        n = len(sel)
        assert b['mask'][i].tolist() == [True] * n + [False] * (L - n)          # right padding
        assert b['item'][i, :n].tolist() == [e[0] for e in sel]
        assert b['category'][i, :n].tolist() == [e[1] for e in sel]
        assert b['behavior'][i, :n].tolist() == [e[2] for e in sel]
        hours = np.array([e[3] for e in sel], np.int64)
        assert b['hour'][i, :n].tolist() == (hours % 24 + 1).tolist()
        np.testing.assert_allclose(b['time'][i, :n], vocab.time_features(hours))
        for k in ('item', 'category', 'weekday', 'hour', 'weekend', 'behavior'):
            assert not b[k][i, n:].any()
        assert not b['time'][i, n:].any()


def test_padding_keeps_most_recent_events():
    hours = 400_000 + np.arange(250)
    ev = events_frame([(1, 1000 + h, 1, 1, h) for h in hours[::-1]])        # file order newest first
    seqs = data.build_sequences(ev, data.Vocab.fit(ev, min_item_count=1))
    b = seqs.batch(np.array([0]), 'all', data.N_MIN, data.N_MAX)
    assert b['mask'].shape == (1, data.N_MAX) and b['mask'].all()
    want = data.Vocab.fit(ev, min_item_count=1).encode_items(1000 + hours[-data.N_MAX:])
    assert b['item'][0].tolist() == want.tolist()                            # oldest -> newest, last N_MAX
    b = seqs.batch(np.array([0]), 'short', data.K_MIN, data.K_MAX)
    assert b['mask'].sum() == 20 and b['item'][0, -1] == want[-1]
    b = seqs.batch(np.array([0]), 'long', data.N_MIN, data.N_MAX)             # first 225, the last N_MAX of them
    assert b['item'][0].tolist() == data.Vocab.fit(ev, min_item_count=1).encode_items(1000 + hours[225 - data.N_MAX:225]).tolist()


def test_short_users_excluded_from_training_but_exported(rand_seqs):
    ev, vocab, seqs, ref = rand_seqs
    one = int(np.flatnonzero(seqs.user_ids == 7)[0])
    assert seqs.lengths[one] == 1
    assert one not in seqs.trainable.tolist()
    assert sorted(seqs.trainable.tolist()) == np.flatnonzero(seqs.lengths >= 2).tolist()
    assert seqs.batch(np.array([one]), 'all', 1, 5)['mask'].tolist() == [[True]]
    assert not seqs.batch(np.array([one]), 'long', 1, 5)['mask'].any()
    n_single = sum(len(v) == 1 for v in ref.values())
    assert f'excluded from training (1 event, still exported): {n_single}' in seqs.summary()


def test_newer_log_keeps_known_indices_and_new_users_get_sequences():
    train = events_frame([(1, 100, 7, 1, 400_000), (1, 100, 7, 1, 400_001), (1, 100, 7, 2, 400_002),
                          (2, 200, 8, 1, 400_003), (2, 200, 8, 1, 400_010)])
    vocab = data.Vocab.fit(train, min_item_count=2, time_trim=0)
    newer = events_frame([(3, 100, 7, 1, 400_020), (3, 555, 99, 4, 400_021), (1, 200, 8, 1, 400_022)])
    seqs = data.build_sequences(newer, vocab)
    assert seqs.user_ids.tolist() == [1, 3]
    assert seqs.item.tolist() == [3, 2, 1] and seqs.category.tolist() == [3, 2, 1]
    assert np.all(seqs.time == np.array([1, 0], np.float32))             # after the training span: clipped
    assert seqs.user_index([3, 1, 42]).tolist() == [1, 0, -1]


def test_batch_rejects_bad_arguments(rand_seqs):
    _, _, seqs, _ = rand_seqs
    with pytest.raises(ValueError, match='part'):
        seqs.batch(np.array([0]), 'middle', 1, 5)
    with pytest.raises(IndexError):
        seqs.batch(np.array([seqs.n_users]), 'all', 1, 5)
    with pytest.raises(ValueError):
        seqs.batch(np.array([0]), 'all', 6, 5)
    assert seqs.batch(np.array([], np.int64), 'long', 3, 5)['item'].shape == (0, 3)


def test_split_helpers():
    ev = events_frame([(1, 1, 1, 1, hour_of('2014-12-17T23')), (1, 2, 1, 1, hour_of('2014-12-18T05')),
                       (2, 3, 1, 1, hour_of('2014-12-16T10'))])
    cut = data.last_days_cutoff(ev)
    assert cut == hour_of('2014-12-18T00') and data.hour_to_str(cut) == '2014-12-18 00'
    before, after = data.split_at_hour(ev, cut)
    assert before['item_id'].tolist() == [1, 3] and after['item_id'].tolist() == [2]
    cov = data.item_coverage(before, (1, 2), after)
    assert cov['items'].tolist() == [2, 0] and cov['test_seen'].tolist() == [0.0, 0.0]


def test_top_category_matches_a_slow_count():
    rng = np.random.default_rng(5)
    n = 400
    events = pd.DataFrame({'user_id': rng.integers(1, 30, n), 'item_id': rng.integers(1, 50, n),
                           'category_id': rng.integers(1, 6, n), 'behavior': np.ones(n, np.int8),
                           'hour': rng.integers(390_000, 390_100, n)})
    seqs = data.build_sequences(events, data.Vocab.fit(events, min_item_count=1))
    users = np.arange(seqs.n_users)[::-1]
    got = seqs.top_category(users)
    for row, u in enumerate(users):
        cats = seqs.category[seqs.offsets[u]:seqs.offsets[u + 1]]
        values, counts = np.unique(cats, return_counts=True)
        assert got[row] == values[np.argmax(counts)]


def test_random_cuts_stay_inside_each_history_and_vary(rand_seqs):
    _, _, seqs, _ = rand_seqs
    users = seqs.trainable
    start, end = seqs.part_bounds(users, 'all')
    cuts = []
    for seed in range(20):
        s, c, e = seqs.cut_bounds(users, np.random.default_rng(seed), lowest=0.5)
        assert (s == start).all() and (e == end).all()
        n = e - s
        assert ((c - s >= np.maximum(np.ceil(0.5 * n), 1)) | (n == 2)).all()   # at least half the history before
        assert ((c - s >= 1) & (e - c >= 1)).all()                            # a history and a future, always
        cuts.append(c)
    cuts = np.array(cuts)
    long_users = (end - start) >= 10
    assert (cuts[:, long_users].std(0) > 0).all()                             # other cuts in other epochs
    b = seqs.range_batch(s, c, 1, 7)                                          # the history: most recent 7 kept
    want = seqs.item[np.maximum(s, c - 7)[0]:c[0]]
    assert (b['item'][0, :len(want)] == want).all() and b['mask'][0].sum() == len(want)


# ---------------------------------------------------------------- statistics from counts (the event cache's path)


@pytest.mark.parametrize('n', [1, 2, 3, 10, 1001])
def test_quantiles_and_median_from_counts_equal_numpy_on_the_rows(n):
    rng = np.random.default_rng(n)
    hours = 400_000 + rng.integers(0, max(2, n // 3), n)
    values, counts = np.unique(hours, return_counts=True)
    assert data.median_from_counts(values, counts) == np.median(hours)
    for q in (0.0, 0.0005, 0.3, 0.5, 0.9995, 1.0):
        for method in ('linear', 'lower', 'higher'):
            assert data.quantile_from_counts(values, counts, q, method) == np.quantile(hours, q, method=method)


@pytest.mark.parametrize('trim', [0.0, data.TIME_TRIM, 0.1])
@pytest.mark.parametrize('min_count', [1, 3])
def test_vocab_from_counts_equals_fit(trim, min_count):
    ev = random_events(np.random.default_rng(7), n=5000, n_items=900)
    fitted = data.Vocab.fit(ev, min_item_count=min_count, time_trim=trim)
    counted = data.Vocab.from_counts(*np.unique(ev['item_id'], return_counts=True),
                                     *np.unique(ev['category_id'], return_counts=True),
                                     *np.unique(ev["hour"], return_counts=True),
                                     min_item_count=min_count, time_trim=trim)
    assert counted.fingerprint() == fitted.fingerprint()
    for name in ('items', 'item_counts', 'categories', 'category_counts'):
        assert np.array_equal(getattr(counted, name), getattr(fitted, name))
    assert (counted.t_min, counted.t_max, counted.n_events, counted.n_distinct_items) == \
           (fitted.t_min, fitted.t_max, fitted.n_events, fitted.n_distinct_items)
