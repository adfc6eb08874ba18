"""Behaviour logs -> validated events -> vocabulary -> per-user CSR sequences -> padded numpy batches.

Two input formats map onto one events table (columns and dtypes below):
- Alibaba Tianchi mobile recommendation: header `user_id,item_id,behavior_type,user_geohash,item_category,time`,
  behaviour 1..4, time 'YYYY-MM-DD HH' (already China local time).
- Taobao UserBehavior: no header, `user_id,item_id,category_id,behavior_type,timestamp`, behaviour
  pv/fav/cart/buy, unix seconds (converted to China time, UTC+8).

    events, report = read_events('DATA/train_user')         # DataFrame + LoadReport (skipped rows by reason)
    info = stream_events('DATA/train_user', sink)            # the same reading, chunk by chunk (event_cache.py)
    vocab = Vocab.fit(events)                                # item/category tables, time normalisation
    seqs = build_sequences(events, vocab)                    # CSR: offsets + flat per-event features
    batch = seqs.batch(seqs.trainable[:64], 'long', N_MIN, N_MAX)   # dict of padded numpy arrays

Batch contract (shared with the model): integer features 0 = padding; item/category 1 = unknown;
weekday 1..7 (Monday = 1); hour 1..24; weekend 1/2; behaviour 1..4; `time` float32 (B, L, 2) =
[time since the training log's start, time to its end] in [0, 1]; `mask` True = real event.
Events are right-padded, oldest -> newest, and the most recent ones are kept when truncating.

No torch here. Nothing loops over rows or users in Python: the real log has 12-23M rows.
"""
from __future__ import annotations

import csv
import gzip
import os
import re
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from atomic_files import atomic_write

# sequence lengths (the batch contract): long part padded to >= N_MIN, cut to <= N_MAX, short part K_MIN/K_MAX
N_MIN, N_MAX = 100, 100                 # N_MAX = N_MIN: attention memory grows ~N_MAX^2 (12 GB peak at 200, batch 256)
K_MIN, K_MAX = 10, 20
PAD, UNKNOWN = 0, 1                 # reserved indices in the item and category tables

# Items seen fewer than MIN_ITEM_COUNT times in the training events share the UNKNOWN row.
# Chosen by measurement (`item_coverage`; `python bench.py --only data` prints the tables): fit on all
# but the last day, then count the table rows and the share of the last day's events whose item is in
# the table. On a 12M-row generated log with the real file's long tail (~20% of rows a distinct item,
# ~56% of items seen once):
#   min count          1       2       3       5      10
#   table rows     2.35M   1.03M   0.61M   0.35M   0.19M   (x 128 floats x 3 with Adam: 3.4 / 1.5 / 0.9 / 0.5 / 0.3 GB)
#   next-day cover 85.4%   79.7%   76.1%   71.3%   63.8%   (85.4% = items seen at all before)
# 3 is the elbow: the table shrinks 3.9x and stays under ~2 GB with Adam state even at the real file's
# 23M rows, while keeping 89% of the achievable next-day coverage; 2 only halves the table for +3.6
# points, and 5 saves 0.4 GB more for -4.8 points. Items seen once or twice also get too few gradient
# steps to learn anything but an id for memorising one user. The real samples are too small to decide
# this (the UserBehavior one holds 815 of 988k users: 75% of its items occur once and only 32% of its
# last day's events hit an item seen before at all); the bench prints their tables too.
MIN_ITEM_COUNT = 3
# t_min/t_max are the TIME_TRIM and 1 - TIME_TRIM quantiles of the training hours rather than the
# raw min/max, so a few stray rows (the UserBehavior sample has one from 2017-09-11, 2.5 months before
# the rest) cannot squash every other event into a corner of [0, 1]. Times outside [t_min, t_max]
# are clipped: earlier events read as the log's start (0, 1), later ones - e.g. a newer log's -
# as its end (1, 0).
TIME_TRIM = 0.0005
# hours outside this range are rejected as 'time out of range' (a truncated unix timestamp lands in 1970)
VALID_TIME = (np.datetime64('2000-01-01', 'h').astype(np.int64), np.datetime64('2100-01-01', 'h').astype(np.int64))
# Within that range, events further than this many days from the log's median hour are implausible (a typo'd
# year, a device clock decades off): they would move the evaluation's target day and squash the time
# features, so they are skipped and counted as 'time implausible'. The real logs span 9 (UserBehavior) and
# 31 (Tianchi) days; 0 turns the window off.
DATA_PATH = 'DATA/train_user'   # where train.py and evaluate.py look for the log by default
TIME_WINDOW_DAYS = 365
CHUNK_ROWS = 1 << 21                # rows per parser chunk: bounds memory and drives the progress bar

TIANCHI_FILE = 'tianchi_mobile_recommend_train_user.csv'
TIANCHI_COLUMNS = ['user_id', 'item_id', 'behavior_type', 'user_geohash', 'item_category', 'time']
TIANCHI_USED = ['user_id', 'item_id', 'behavior_type', 'item_category', 'time']
USERBEHAVIOR_COLUMNS = ['user_id', 'item_id', 'category_id', 'behavior_type', 'timestamp']
BEHAVIOR_CODES = {'pv': 1, 'fav': 2, 'cart': 3, 'buy': 4}
_BEHAVIOR_TEXT = BEHAVIOR_CODES | {'1': 1, '2': 2, '3': 3, '4': 4}     # UserBehavior copies with numeric codes
EVENT_COLUMNS = ['user_id', 'item_id', 'category_id', 'behavior', 'hour']
FORMATS = ('auto', 'tianchi', 'userbehavior')
# reasons a row is skipped, in priority order (a row is counted once, under its first reason)
REASONS = ('empty line', 'too many fields', 'truncated line', 'missing field', 'non-integer id',
           'bad behavior', 'unparsable time', 'time out of range', 'time implausible')
FEATURES = ('item', 'category', 'weekday', 'hour', 'weekend', 'behavior')
PARTS = ('long', 'short', 'all')
_EXPECTED = {
    'tianchi': 'a Tianchi log: header "user_id,item_id,behavior_type,user_geohash,item_category,time", '
               'behavior_type 1..4, time "YYYY-MM-DD HH"',
    'userbehavior': 'a Taobao UserBehavior log: no header, rows "user_id,item_id,category_id,behavior_type,'
                    'timestamp", behavior_type pv/fav/cart/buy, unix seconds',
}


class DataError(ValueError):
    """Bad input data: the message names the file and what was expected."""


# ----------------------------------------------------------------------------------------------
# reading and validation


@dataclass
class LoadReport:
    """What `read_events` found in a file."""
    path: str
    format: str
    rows_read: int = 0                   # data lines seen (header excluded)
    rows_kept: int = 0                   # rows in the returned events
    skipped: dict = field(default_factory=dict)    # reason -> count
    duplicate_rows: int = 0              # rows that exactly repeat an earlier valid row
    duplicates_dropped: int = 0
    seconds: float = 0.0
    slow_path: bool = False              # typed parse failed (non-numeric text); re-read as strings

    def summary(self) -> str:
        n_skip = sum(self.skipped.values())
        lines = [f'read {self.path} ({self.format}): {self.rows_read:,} rows, kept {self.rows_kept:,} '
                 f'in {self.seconds:.1f} s']
        if n_skip:
            detail = ', '.join(f'{r}: {c:,}' for r, c in self.skipped.items())
            lines.append(f'  skipped {n_skip:,} malformed rows ({detail})')
        else:
            lines.append('  no malformed rows')
        share = self.duplicate_rows / max(1, self.rows_read - n_skip)
        what = 'dropped (--dedupe)' if self.duplicates_dropped else 'kept (--dedupe drops them)'
        lines.append(f'  exact duplicate rows: {self.duplicate_rows:,} ({share:.1%}), {what}')
        if self.slow_path:
            lines.append('  note: non-numeric text in a numeric column; the file was re-read on the slow path')
        return '\n'.join(lines)


def resolve_log_path(data_path: str) -> str:
    """A log file, or the folder holding it: the Tianchi file name first, else the single *.csv(.gz)."""
    data_path = os.fspath(data_path)
    if os.path.isfile(data_path):
        return data_path
    if os.path.exists(data_path) and not os.path.isdir(data_path):   # a pipe, socket or device: the log is read
        raise DataError(f'{data_path}: not a regular file (a pipe or device cannot be read twice: the format is '
                        f'sniffed first, and the cache fingerprints the file); write the log to a file first')
    if not os.path.isdir(data_path):
        raise DataError(f'{data_path}: no such file or folder (expected a behaviour log CSV or a folder holding one)')
    found = sorted(f for f in os.listdir(data_path)
                   if f.endswith(('.csv', '.csv.gz')) and not f.startswith('.')
                   and os.path.isfile(os.path.join(data_path, f)))
    for name in (TIANCHI_FILE, TIANCHI_FILE + '.gz'):
        if os.path.isfile(os.path.join(data_path, name)):
            _refuse_second_format(os.path.join(data_path, name), [os.path.join(data_path, f) for f in found])
            return os.path.join(data_path, name)
    if len(found) == 1:
        return os.path.join(data_path, found[0])
    if not found:
        raise DataError(f'{data_path}: folder holds no {TIANCHI_FILE}(.gz) and no other *.csv / *.csv.gz file')
    raise DataError(f'{data_path}: folder holds several CSV files ({", ".join(found)}) and no {TIANCHI_FILE}; '
                    'pass the file itself')


def _refuse_second_format(tianchi: str, others: list[str]) -> None:
    """A folder's Tianchi log wins over other CSVs, but not silently over a UserBehavior log: which one is meant?"""
    for other in others:
        if other == tianchi:
            continue
        try:
            fmt, _ = _detect_format(other, 'auto')
        except DataError:                  # not a log at all (notes, an export): the Tianchi log is meant
            continue
        if fmt != 'userbehavior':
            continue
        raise DataError(f'{os.path.dirname(tianchi)}: folder holds both a Tianchi log ({os.path.basename(tianchi)}) '
                        f'and a UserBehavior log ({os.path.basename(other)}); pass the one to train on as '
                        '--data_path (the file itself), or move the other away')


def _open_binary(path: str):
    """(handle for the parser, raw file handle whose tell() tracks progress)."""
    raw = open(path, 'rb')
    if path.endswith('.gz'):
        return gzip.GzipFile(fileobj=raw, mode='rb'), raw
    return raw, raw


# what a damaged .gz raises while it is read: cut short, bad deflate data, bad header or CRC
_GZ_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _damaged(path: str, e: BaseException) -> DataError:
    """The DataError for a .gz that cannot be decompressed: names the file and says it is damaged, not the format."""
    what = ('it is truncated (ends before the end of its compressed data)' if isinstance(e, EOFError)
            else f'its compressed data is corrupted ({e})')
    return DataError(f'{path}: damaged compressed input: {what}. Copy or download the file again; '
                     f'`gzip -t {path}` checks a .gz file')


@contextmanager
def _named_gz_errors(path: str):
    """Turn decompression errors anywhere inside into a DataError naming the file (they name nothing)."""
    try:
        yield
    except _GZ_ERRORS as e:
        if not path.endswith('.gz'):
            raise
        raise _damaged(path, e) from None


def _check_gz(path: str) -> None:
    """Decompress a .gz to its end (CRC included), raising what a damaged one raises; other files: nothing."""
    if not path.endswith('.gz'):
        return
    with gzip.open(path, 'rb') as f:
        while f.read(1 << 24):
            pass


def _first_line(path: str) -> str:
    handle, raw = _open_binary(path)
    try:
        data = handle.read(1 << 16)
    except _GZ_ERRORS as e:
        raise _damaged(path, e) if path.endswith('.gz') else DataError(f'{path}: cannot read ({e})') from None
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e})') from None
    finally:
        handle.close()
        raw.close()
    text = data.decode('utf-8-sig', errors='replace')
    if not text.strip():
        raise DataError(f'{path}: file is empty (expected {_EXPECTED["tianchi"]}, or {_EXPECTED["userbehavior"]})')
    return text.lstrip('\r\n').splitlines()[0]


def _detect_format(path: str, data_format: str) -> tuple[str, bool]:
    """(format, has_header) from the first line; DataError naming what was expected otherwise."""
    if data_format not in FORMATS:
        raise ValueError(f'data_format must be one of {FORMATS}, got {data_format!r}')
    line = _first_line(path)
    fields = [f.strip().strip('"').lower() for f in line.split(',')]
    looks_tianchi = set(TIANCHI_USED) <= set(fields)
    is_ub_header = fields == USERBEHAVIOR_COLUMNS
    looks_ub_row = (len(fields) == 5 and fields[3] in BEHAVIOR_CODES
                    and all(re.fullmatch(r'-?\d+', f) for f in fields[:3]))
    if data_format in ('auto', 'tianchi') and looks_tianchi:
        return 'tianchi', True
    if data_format in ('auto', 'userbehavior') and (is_ub_header or looks_ub_row):
        return 'userbehavior', is_ub_header
    if data_format == 'userbehavior' and len(fields) == 5 and not any(re.search('[a-z_]{4,}', f) for f in fields[:3]):
        return 'userbehavior', False      # odd first row: let row validation count it
    shown = line if len(line) <= 120 else line[:120] + '...'
    if data_format == 'tianchi' or (data_format == 'auto' and any(f in TIANCHI_COLUMNS for f in fields)):
        missing = [c for c in TIANCHI_USED if c not in fields]
        raise DataError(f'{path}: header lacks column(s) {", ".join(missing)}; expected {_EXPECTED["tianchi"]} '
                        f'(first line: {shown!r})')
    if data_format == 'userbehavior':
        raise DataError(f'{path}: first line does not look like {_EXPECTED["userbehavior"]} (first line: {shown!r})')
    raise DataError(f'{path}: unrecognised log format; expected {_EXPECTED["tianchi"]}, or '
                    f'{_EXPECTED["userbehavior"]} (first line: {shown!r})')


def _parse_tianchi_times(values: pd.Index) -> np.ndarray:
    """Distinct time strings -> hours since 1970 (float, NaN when unparsable)."""
    dt = pd.to_datetime(values, format='%Y-%m-%d %H', errors='coerce')
    bad = dt.isna()
    if bad.any():            # tolerate 'YYYY-MM-DD HH:MM[:SS]' (floored to the hour), nothing shorter: a cut
        full = values.str.fullmatch(r'\d{4}-\d{2}-\d{2}[ T]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?')   # '2014-1' is no day
        dt = dt.where(~bad, pd.to_datetime(values.where(full), format='ISO8601', errors='coerce'))
    out = dt.values.astype('datetime64[h]').astype(np.int64).astype(np.float64)
    out[dt.isna()] = np.nan
    return out


def _int_column(s: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A parsed column -> (int64 values, missing mask, non-integer mask)."""
    if isinstance(s.dtype, pd.Int64Dtype):                  # fast path: the C parser already checked
        return s.to_numpy(dtype=np.int64, na_value=0), s.isna().to_numpy(), np.zeros(len(s), bool)
    st = s.astype(object).where(s.notna(), None).astype('str').str.strip()   # slow path: strings
    missing = (st.isna() | (st == '')).to_numpy()
    ok = st.str.fullmatch(r'[+-]?\d{1,18}(\.0*)?').fillna(False).to_numpy(bool) & ~missing
    vals = np.zeros(len(s), np.int64)
    vals[ok] = st[ok].str.replace(r'\.0*$', '', regex=True).astype(np.int64).to_numpy()
    return vals, missing, ~missing & ~ok


def _validate_chunk(df: pd.DataFrame, fmt: str) -> tuple[dict, np.ndarray, np.ndarray, list]:
    """Parsed chunk -> (event columns as numpy, reason code per row (0 = ok, k = REASONS[k-1]),
    index into the returned column names of the field each reason is about (-1: whole line), those names)."""
    cols = USERBEHAVIOR_COLUMNS if fmt == 'userbehavior' else TIANCHI_USED
    n = len(df)
    code = np.zeros(n, np.int8)
    where = np.full(n, -1, np.int16)               # which column the reason is about (for messages)

    def mark(mask: np.ndarray, reason: str, col: int = -1) -> None:
        r = REASONS.index(reason) + 1
        hit = mask & ((code == 0) | (code > r))
        code[hit] = r
        where[hit] = col

    ids = {}
    id_cols = ['user_id', 'item_id', 'category_id' if fmt == 'userbehavior' else 'item_category']
    all_missing = np.ones(n, bool)
    for c in cols:
        all_missing &= df[c].isna().to_numpy()
    last_col = 'timestamp' if fmt == 'userbehavior' else 'time'
    mark(all_missing, 'empty line')
    mark(df[last_col].isna().to_numpy() & ~all_missing, 'truncated line', cols.index(last_col))
    for c in id_cols:
        vals, missing, nonint = _int_column(df[c])
        ids[c] = vals
        mark(missing, 'missing field', cols.index(c))
        mark(nonint, 'non-integer id', cols.index(c))

    b = df['behavior_type']
    if fmt == 'userbehavior':
        if isinstance(b.dtype, pd.CategoricalDtype):
            cats = pd.Index(b.cat.categories.astype(str).str.strip().str.lower())
            table = np.array([_BEHAVIOR_TEXT.get(x, 0) for x in cats] + [0], np.int64)
            beh = table[b.cat.codes.to_numpy()]          # code -1 (missing) -> last slot -> 0
        else:
            low = b.astype(object).where(b.notna(), None).astype('str').str.strip().str.lower()
            beh = low.map(_BEHAVIOR_TEXT).fillna(0).to_numpy(np.int64)
        bmissing = b.isna().to_numpy()
        mark(bmissing, 'missing field', cols.index('behavior_type'))
        mark(~bmissing & (beh == 0), 'bad behavior', cols.index('behavior_type'))
        ts, tmissing, tnonint = _int_column(df['timestamp'])
        mark(tnonint, 'unparsable time', cols.index('timestamp'))
        hour = np.floor_divide(ts + 8 * 3600, 3600)          # China time, UTC+8
    else:
        beh, bmissing, bnonint = _int_column(b)
        mark(bmissing, 'missing field', cols.index('behavior_type'))
        mark(bnonint | (~bmissing & ((beh < 1) | (beh > 4))), 'bad behavior', cols.index('behavior_type'))
        t = df['time']
        if not isinstance(t.dtype, pd.CategoricalDtype):
            t = t.astype('category')
        hours_of_cat = np.append(_parse_tianchi_times(pd.Index(t.cat.categories.astype(str))), np.nan)
        hf = hours_of_cat[t.cat.codes.to_numpy()]
        tmissing = t.isna().to_numpy()
        mark(~tmissing & np.isnan(hf), 'unparsable time', cols.index('time'))
        hour = np.nan_to_num(hf, nan=0.0).astype(np.int64)
    # lowest priority: rows already marked for another reason keep it
    mark((hour < VALID_TIME[0]) | (hour >= VALID_TIME[1]), 'time out of range', cols.index(last_col))
    out = {'user_id': ids['user_id'], 'item_id': ids['item_id'], 'category_id': ids[id_cols[2]],
           'behavior': beh.astype(np.int8, copy=False), 'hour': hour}
    return out, code, where, cols


_SKIP_RE = re.compile(r'Skipping line (\d+)')


def _line_of_row(row: int, header_lines: int, skipped_lines: np.ndarray) -> int:
    """1-based file line of parsed data row `row` (0-based), given lines the parser skipped."""
    line = header_lines + row + 1
    k = 0
    while True:
        k2 = int(np.searchsorted(skipped_lines, line + k, side='right'))
        if k2 == k:
            return line + k
        k = k2


def _leading_long_lines(path: str) -> list[int]:
    """1-based numbers of the data lines right after a Tianchi header that have more fields than the header."""
    handle, raw = _open_binary(path)
    found = []
    try:
        n_fields = next(handle).count(b',') + 1
        for number, line in enumerate(handle, start=2):
            if line.rstrip(b'\r\n').count(b',') + 1 <= n_fields:
                break
            found.append(number)
    except StopIteration:
        pass
    finally:
        handle.close()
        raw.close()
    return found


def _column_name(header_field) -> str:
    """A Tianchi header field as _detect_format matched it: case, quotes, spaces and a BOM do not matter."""
    return str(header_field).lstrip('\ufeff').strip().strip('"').lower()


def _reader(handle, fmt: str, has_header: bool, typed: bool, skip_lines: list[int] = (),
            names: list[str] | None = None):
    """pandas' chunked reader of the log. names: the handle starts past the header (a Tianchi log read from a
    byte offset): its columns are these (the header's fields), and no line is a header."""
    kw = dict(engine='c', chunksize=CHUNK_ROWS, compression=None, skip_blank_lines=False, quoting=csv.QUOTE_NONE,
              on_bad_lines='warn', encoding='utf-8', encoding_errors='replace')
    if fmt == 'tianchi':
        dtype = {c: 'Int64' for c in ('user_id', 'item_id', 'behavior_type', 'item_category')} | {'time': 'category'}
        if not typed:
            dtype = {c: str for c in TIANCHI_USED}
        # Every column is read (no usecols: with it the C parser silently drops fields past the header's instead
        # of reporting the line); the geohash read as plain strings makes the whole read ~1.3x slower, not 10x.
        # Leading lines with extra fields are skipped here: pandas would take the first one as an index column.
        if names is not None:
            dtype = {c: dtype.get(_column_name(c), str) for c in names}
            return pd.read_csv(handle, header=None, names=names, index_col=False, dtype=dtype, **kw)
        return pd.read_csv(handle, header=0, index_col=False, skiprows=[n - 1 for n in skip_lines],
                           dtype=dtype | {'user_geohash': str}, **kw)
    dtype = {'user_id': 'Int64', 'item_id': 'Int64', 'category_id': 'Int64',
             'behavior_type': 'category', 'timestamp': 'Int64'}
    if not typed:
        dtype = {c: str for c in USERBEHAVIOR_COLUMNS}
    return pd.read_csv(handle, header=0 if has_header and names is None else None, names=USERBEHAVIOR_COLUMNS,
                       dtype=dtype, **kw)


def _show(value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return '<missing>'
    return repr(value) if isinstance(value, str) else str(value)


class _TypedParseFailed(Exception):
    pass


def _read_validated(path: str, fmt: str, has_header: bool, strict: bool, typed: bool, progress: bool,
                    sink, start: int = 0, first_line: int = 1) -> tuple[int, dict]:
    """Stream the file in chunks, handing each chunk's valid rows to sink({column: array}, in file order)
    -> (rows_read, skipped counts). start > 0: only the lines from that byte offset on (a line boundary past
    the header; first_line is the file line number there, so errors and counts name the file's lines)."""
    leading = _leading_long_lines(path) if fmt == 'tianchi' and not start else []
    if strict and leading:
        raise DataError(f'{path}: line {leading[0]}: too many fields; expected {_EXPECTED[fmt]} '
                        '(drop --strict to skip and count such rows)')
    names = None
    if start:
        names = _first_line(path).split(',') if fmt == 'tianchi' else USERBEHAVIOR_COLUMNS
    handle, raw = _open_binary(path)
    if start:
        raw.seek(start)
    size = os.path.getsize(path) - start
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=size, unit='B', unit_scale=True, desc=f'reading {os.path.basename(path)}',
                   file=sys.stderr, leave=False)
    counts = np.zeros(len(REASONS) + 1, np.int64)
    skipped_lines: list[int] = []
    n_rows = 0
    header_lines = first_line - 1 if start else int(has_header)   # file lines before the first data row read
    skipped_lines.extend(leading)
    counts[REASONS.index('too many fields') + 1] += len(leading)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', pd.errors.ParserWarning)
            reader = _reader(handle, fmt, has_header, typed, leading, names)
            while True:
                try:
                    chunk = next(reader)
                except StopIteration:
                    break
                except (ValueError, TypeError, OverflowError) as e:
                    if typed:
                        raise _TypedParseFailed() from e
                    _check_gz(path)  # damage decompresses to junk before the CRC check catches it: blame the damage
                    raise DataError(f'{path}: cannot parse as {_EXPECTED[fmt]} ({e})') from None
                if fmt == 'tianchi':  # header names as _detect_format matched them: case, quotes, BOM do not matter
                    chunk.columns = [_column_name(c) for c in chunk.columns]
                if not typed:  # a CSV writer that quotes every field ("1","2",...) lands here: unquote the values
                    for c in chunk.columns:
                        if not isinstance(chunk[c].dtype, pd.CategoricalDtype):  # object or str: text
                            chunk[c] = chunk[c].str.strip().str.strip('"')
                new_lines = [int(m) + (first_line - 1 if start else 0)     # pandas counts from the handle's start
                             for w in caught for m in _SKIP_RE.findall(str(w.message))]
                caught.clear()
                skipped_lines.extend(new_lines)
                cols, code, where, names = _validate_chunk(chunk, fmt)
                if strict and (code.any() or new_lines):
                    sl = np.array(sorted(skipped_lines), np.int64)
                    cands = [(ln, 'too many fields', '') for ln in new_lines]
                    if code.any():
                        r = int(np.flatnonzero(code)[0])
                        c = int(where[r])
                        detail = '' if c < 0 else f' ({names[c]}={_show(chunk[names[c]].iloc[r])})'
                        cands.append((_line_of_row(n_rows + r, header_lines, sl), REASONS[code[r] - 1], detail))
                    ln, reason, detail = min(cands)
                    _check_gz(path)
                    raise DataError(f'{path}: line {ln}: {reason}{detail}; expected {_EXPECTED[fmt]} '
                                    '(drop --strict to skip and count such rows)')
                counts += np.bincount(code, minlength=len(REASONS) + 1)
                counts[REASONS.index('too many fields') + 1] += len(new_lines)
                ok = code == 0
                del chunk  # the parsed text is the bulk of a chunk's memory: gone before the sink works
                sink({c: cols[c][ok] if code.any() else cols[c] for c in EVENT_COLUMNS})
                n_rows += len(ok)
                if bar is not None:
                    bar.update(raw.tell() - start - bar.n)
    finally:
        if bar is not None:
            bar.close()
        handle.close()
        raw.close()
    rows_read = n_rows + int(counts[REASONS.index('too many fields') + 1])
    skipped = {r: int(counts[i + 1]) for i, r in enumerate(REASONS) if counts[i + 1]}
    return rows_read, skipped


EVENT_DTYPES = {'user_id': np.int64, 'item_id': np.int64, 'category_id': np.int64, 'behavior': np.int8,
                'hour': np.int64}


@dataclass
class StreamInfo:
    """What `stream_events` found: the resolved file, its format, rows read and skipped by reason."""
    path: str
    format: str
    has_header: bool
    rows_read: int
    skipped: dict
    slow_path: bool


def stream_events(data_path: str, sink, data_format: str = 'auto', strict: bool = False,
                  progress: bool = True, start: int = 0, first_line: int = 1) -> StreamInfo:
    """read_events' reading and row validation, one chunk (CHUNK_ROWS rows) at a time: memory does not grow
    with the log.

    sink({column: array}) receives each chunk's valid rows (EVENT_COLUMNS, EVENT_DTYPES, file order);
    sink(None) means "forget what you got, the file is read again": some numeric field held non-numeric
    text, found only in a later chunk, and the whole file is re-read on the slow path (as read_events does).
    The steps that need every row - the time window around the median hour, duplicates - are the caller's
    (read_events applies them to the collected rows; event_cache to its shards). Raises what read_events raises
    for bad input, strict's first malformed row included.

    start > 0 reads only the rows from that byte offset on (an uncompressed log that grew by appended lines:
    event_cache parses just the new tail); it must be the start of a line past the header, and first_line the
    file line number there, so line numbers in errors are the file's. rows_read then counts the tail's rows.
    """
    path = resolve_log_path(data_path)
    fmt, has_header = _detect_format(path, data_format)
    if start and path.endswith('.gz'):
        raise ValueError(f'{path}: a compressed log is read from its start only')
    slow = False
    with _named_gz_errors(path):
        try:
            rows_read, skipped = _read_validated(path, fmt, has_header, strict, True, progress, sink, start, first_line)
        except _TypedParseFailed as e:
            if isinstance(e.__cause__, _GZ_ERRORS):
                raise e.__cause__ from None
            # some numeric field holds non-numeric text: re-read as strings and validate every value
            slow = True
            sink(None)
            rows_read, skipped = _read_validated(path, fmt, has_header, strict, False, progress, sink, start,
                                                 first_line)
    if rows_read == 0 and not start:
        raise DataError(f'{path}: no data rows (expected {_EXPECTED[fmt]})')
    return StreamInfo(path=path, format=fmt, has_header=has_header, rows_read=rows_read, skipped=skipped,
                      slow_path=slow)


def _row_hash(events: pd.DataFrame) -> np.ndarray:
    """A well-mixed 64-bit hash of each row's EVENT_COLUMNS (multiply-xor, then a murmur3 finaliser)."""
    with np.errstate(over='ignore'):
        h = events['user_id'].to_numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= events['item_id'].to_numpy().astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= events['category_id'].to_numpy().astype(np.uint64) * np.uint64(0x165667B19E3779F9)
        hb = events['hour'].to_numpy().astype(np.uint64) << np.uint64(3)
        hb |= events['behavior'].to_numpy().astype(np.uint64)
        hb *= np.uint64(0xD6E8FEB86659FD93)
        h ^= hb
        del hb
        for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
            h ^= h >> np.uint64(33)
            h *= np.uint64(mult)
        h ^= h >> np.uint64(33)
    return h


def duplicate_mask(events: pd.DataFrame) -> np.ndarray:
    """True for rows that exactly repeat an earlier row (all of EVENT_COLUMNS equal); exact.

    One plain sort instead of a hash table (which is slow with ~10M distinct rows): each row becomes
    (top bits of its hash | row number) in one uint64, so after np.sort rows with equal hash prefix sit
    together, earliest first. Every later row of a group is compared field by field with the group's
    first row; the rare groups where that fails (two different rows sharing a hash prefix) are
    resolved exactly with pandas on just their rows.
    """
    n = len(events)
    dup = np.zeros(n, bool)
    if n < 2:
        return dup
    idx_bits = max(1, int(n - 1).bit_length())
    low = np.uint64((1 << idx_bits) - 1)
    key = _row_hash(events)
    key &= ~low
    key |= np.arange(n, dtype=np.uint64)
    key.sort()
    row = (key & low).astype(np.int64)                     # row numbers, grouped by hash prefix
    key >>= np.uint64(idx_bits)
    later = np.empty(n, bool)                               # sorted position is not its group's first
    np.equal(key[1:], key[:-1], out=later[1:])
    later[0] = False
    del key
    if not later.any():
        return dup
    group_first = row[np.maximum.accumulate(np.where(later, 0, np.arange(n)))]
    cand, first = row[later], group_first[later]
    same = np.ones(cand.size, bool)
    for c in EVENT_COLUMNS:
        v = events[c].to_numpy()
        same &= v[cand] == v[first]
    dup[cand[same]] = True
    if not same.all():                                     # hash-prefix collision: settle those groups exactly
        bad_groups = np.unique(first[~same])
        rows = np.sort(row[np.isin(group_first, bad_groups)])
        dup[rows] = events.iloc[rows].duplicated(subset=EVENT_COLUMNS, keep='first').to_numpy()
    return dup


def implausible_error(path: str, fmt: str, line: int, hour: int, median: int, window_days: int) -> DataError:
    """strict's error for an event outside the time window (read_events and event_cache word it alike)."""
    return DataError(f'{path}: line {line}: time implausible ({hour_to_str(hour)}, more '
                     f'than {window_days} days from the log\'s median time {hour_to_str(median)}); expected '
                     f'{_EXPECTED[fmt]} (widen --time_window_days, or drop --strict to skip and count such rows)')


def implausible_mask(hour: np.ndarray, median: int, window_days: int) -> np.ndarray:
    """True for hours further than window_days from the median hour (none when window_days is 0)."""
    if not window_days:
        return np.zeros(len(hour), bool)
    return np.abs(hour - median) > window_days * 24


def _drop_implausible_times(arrays: dict, skipped: dict, window_days: int, path: str, fmt: str,
                            strict: bool, header_lines: int) -> dict:
    """Skip (count, or under strict refuse) events further than window_days from the median hour."""
    hour = arrays['hour']
    if not window_days or len(hour) == 0:
        return arrays
    median = int(np.median(hour))
    far = implausible_mask(hour, median, window_days)
    n_far = int(far.sum())
    if not n_far:
        return arrays
    if strict:  # strict got here only if every data row was kept, so row i is line header_lines + i + 1
        row = int(np.flatnonzero(far)[0])
        raise implausible_error(path, fmt, header_lines + row + 1, int(hour[row]), median, window_days)
    skipped['time implausible'] = skipped.get('time implausible', 0) + n_far
    return {c: a[~far] for c, a in arrays.items()}


def order_statistics(values: np.ndarray, counts: np.ndarray, ranks) -> np.ndarray:
    """The ranks-th smallest (0-based) of a multiset given as sorted distinct values and their counts."""
    ends = np.cumsum(counts)
    return np.asarray(values)[np.searchsorted(ends, np.asarray(ranks, np.int64), side='right')]


def median_from_counts(values: np.ndarray, counts: np.ndarray) -> float:
    """np.median of the multiset (values, counts), exactly: the same one or two middle elements, averaged
    by numpy itself (a histogram of hours is how event_cache knows the median without holding the hours)."""
    n = int(np.sum(counts))
    return float(np.median(order_statistics(values, counts, sorted({(n - 1) // 2, n // 2}))))


def quantile_from_counts(values: np.ndarray, counts: np.ndarray, q: float, method: str = 'linear') -> float:
    """np.quantile(multiset, q, method=...) for the multiset (values, counts), exactly (methods linear,
    lower, higher): numpy's own virtual index on n, the neighbouring order statistics, numpy's own
    interpolation between them."""
    n = int(np.sum(counts))
    v = (n - 1) * q                                       # numpy's virtual index for these methods
    lo, hi = int(np.floor(v)), int(np.ceil(v))
    a, b = order_statistics(values, counts, [lo, min(hi, n - 1)])
    if method == 'lower':
        return float(a)
    if method == 'higher':
        return float(b)
    if method != 'linear':
        raise ValueError(f'method must be linear, lower or higher, got {method!r}')
    return float(np.quantile(np.array([a, b]), v - lo))   # the same lerp numpy does on the whole array


def read_events(data_path: str, data_format: str = 'auto', strict: bool = False, dedupe: bool = False,
                progress: bool = True, time_window_days: int = TIME_WINDOW_DAYS) -> tuple[pd.DataFrame, LoadReport]:
    """Read and validate a behaviour log.

    Args:
        data_path: the log file (.csv or .csv.gz), or a folder holding `tianchi_mobile_recommend_train_user.csv`
            (or .csv.gz), else exactly one *.csv / *.csv.gz.
        data_format: 'auto' (from the first line), 'tianchi' or 'userbehavior'.
        strict: raise DataError at the first malformed row (naming its 1-based file line and reason)
            instead of skipping and counting it.
        dedupe: drop rows that exactly repeat an earlier row (they are counted either way). Duplicates are
            judged on the kept fields (ids, behaviour, hour); the geohash does not count.
        progress: show a progress bar (stderr) while reading.
        time_window_days: skip (count as 'time implausible'; under strict, refuse) events further than this
            many days from the log's median time; 0 = no window.

    Returns:
        events: DataFrame in file order with user_id, item_id, category_id (int64, raw ids), behavior
            (int8, 1 view .. 4 buy) and hour (int64, hours since 1970-01-01 00:00 China local time).
        report: LoadReport (rows read/kept, skipped rows by reason, duplicates).

    Raises:
        DataError: missing file, empty file, damaged (truncated or corrupted) .gz, missing or renamed columns,
            unrecognised format, no valid rows, or (strict) a malformed row.
    """
    t0 = time.perf_counter()
    parts = {c: [] for c in EVENT_COLUMNS}

    def collect(chunk):
        for c in EVENT_COLUMNS:
            if chunk is None:
                parts[c].clear()
            else:
                parts[c].append(chunk[c])

    info = stream_events(data_path, collect, data_format=data_format, strict=strict, progress=progress)
    path, fmt, rows_read, skipped, slow = info.path, info.format, info.rows_read, info.skipped, info.slow_path
    arrays = {c: (np.concatenate(parts[c]) if parts[c] else np.zeros(0, EVENT_DTYPES[c])).astype(EVENT_DTYPES[c],
                                                                                                 copy=False)
              for c in EVENT_COLUMNS}
    del parts
    arrays = _drop_implausible_times(arrays, skipped, time_window_days, path, fmt, strict, int(info.has_header))
    events = pd.DataFrame(arrays, columns=EVENT_COLUMNS)
    if len(events) == 0:
        raise DataError(f'{path}: no valid rows among {rows_read:,} (skipped: {skipped}); expected {_EXPECTED[fmt]}')
    dup = duplicate_mask(events)
    n_dup = int(dup.sum())
    if dedupe and n_dup:
        events = events.loc[~dup].reset_index(drop=True)
    report = LoadReport(path=path, format=fmt, rows_read=rows_read, rows_kept=len(events), skipped=skipped,
                        duplicate_rows=n_dup, duplicates_dropped=n_dup if dedupe else 0,
                        seconds=time.perf_counter() - t0, slow_path=slow)
    return events, report


def splitmix64(values) -> np.ndarray:
    """splitmix64's finaliser of each int64 value (uint64): well mixed, the same on every machine. Users are
    placed by it - in cache shards (event_cache.shard_of_users) and in the train/validation/test split."""
    with np.errstate(over='ignore'):
        z = np.asarray(values, np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def split_at_hour(events: pd.DataFrame, cutoff_hour: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events before cutoff_hour, events at or after it), each in file order."""
    before = events['hour'].to_numpy() < cutoff_hour
    return events.loc[before].reset_index(drop=True), events.loc[~before].reset_index(drop=True)


def last_days_cutoff(events: pd.DataFrame, n_days: int = 1, trim: float = TIME_TRIM) -> int:
    """Hour at which the log's last `n_days` calendar days (China time) begin.

    The last day is taken at the (1 - trim) quantile of the hours, as Vocab.fit does for the time span, so
    a few stray rows far past the log's end (the UserBehavior sample has some) do not make it an empty day.
    """
    last_day = int(np.quantile(events['hour'].to_numpy(), 1.0 - trim)) // 24
    return (last_day - n_days + 1) * 24


def split_last_day(events: pd.DataFrame, cutoff: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
    """(history, target-day events, cutoff hour, rows after the target day) for held-out evaluation.

    The target day is the log's last day (see last_days_cutoff), or the day from `cutoff` when given (a part
    of a log split at the whole log's day); history is every earlier event. Stray rows past the target day
    belong to neither: their count is returned so the caller can report it.
    """
    cutoff = last_days_cutoff(events, 1) if cutoff is None else int(cutoff)
    history, target = split_at_hour(events, cutoff)
    after = target['hour'].to_numpy() >= cutoff + 24
    if after.any():
        target = target.loc[~after].reset_index(drop=True)
    return history, target, cutoff, int(after.sum())


def hour_to_str(hour: int) -> str:
    """Hours since 1970 (local) -> 'YYYY-MM-DD HH'."""
    return str(np.datetime64(int(hour), 'h')).replace('T', ' ')


# ----------------------------------------------------------------------------------------------
# vocabulary


def _count_sorted(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and counts, most frequent first (ties: smaller raw id first)."""
    uniq, counts = np.unique(np.asarray(raw, dtype=np.int64), return_counts=True)   # a sort: faster than
    order = np.lexsort((uniq, -counts))                                              # hashing ~1M distinct ids
    return uniq[order], counts[order]


@dataclass(eq=False)
class Vocab:
    """Raw item/category ids -> table indices, plus the time normalisation of the training log.

    Index 0 is padding and 1 the shared unknown row; known ids get 2.. in order of training
    frequency (most frequent first). Users are not in the vocabulary: sequences keep raw user ids,
    so users first seen in a newer log still get sequences.

    Attributes:
        items: raw ids of the kept items; items[k] has index k + 2.
        item_counts: their training counts.
        categories, category_counts: same for categories (every training category is kept).
        t_min, t_max: hours (since 1970, local) that map to 0 and 1 in the time features.
        min_item_count: items seen fewer times in training share index 1.
        n_events, n_distinct_items: size of the training events it was fitted on.
    """
    items: np.ndarray
    item_counts: np.ndarray
    categories: np.ndarray
    category_counts: np.ndarray
    t_min: int
    t_max: int
    min_item_count: int = MIN_ITEM_COUNT
    n_events: int = 0
    n_distinct_items: int = 0
    _index_cache: dict = field(default_factory=dict, init=False, repr=False)

    VERSION = 1

    @property
    def n_items(self) -> int:
        """Item table size, including pad (0) and unknown (1)."""
        return len(self.items) + 2

    @property
    def n_categories(self) -> int:
        """Category table size, including pad (0) and unknown (1)."""
        return len(self.categories) + 2

    @classmethod
    def fit(cls, events: pd.DataFrame, min_item_count: int = MIN_ITEM_COUNT, time_trim: float = TIME_TRIM) -> 'Vocab':
        """Fit on training events (the output of `read_events`, possibly cut at an hour)."""
        if len(events) == 0:
            raise DataError('cannot fit a vocabulary on zero events')
        if min_item_count < 1:
            raise ValueError(f'min_item_count must be >= 1, got {min_item_count}')
        if not 0.0 <= time_trim < 0.5:
            raise ValueError(f'time_trim must be in [0, 0.5), got {time_trim}')
        items, item_counts = _count_sorted(events['item_id'].to_numpy())
        keep = item_counts >= min_item_count
        cats, cat_counts = _count_sorted(events['category_id'].to_numpy())
        hours = events['hour'].to_numpy()
        if time_trim > 0:
            t_min = int(np.quantile(hours, time_trim, method='lower'))
            t_max = int(np.quantile(hours, 1.0 - time_trim, method='higher'))
        else:
            t_min, t_max = int(hours.min()), int(hours.max())
        return cls(items=items[keep], item_counts=item_counts[keep], categories=cats, category_counts=cat_counts,
                   t_min=t_min, t_max=t_max, min_item_count=int(min_item_count), n_events=len(events),
                   n_distinct_items=len(items))

    @classmethod
    def from_counts(cls, items: np.ndarray, item_counts: np.ndarray, categories: np.ndarray,
                    category_counts: np.ndarray, hours: np.ndarray, hour_counts: np.ndarray,
                    min_item_count: int = MIN_ITEM_COUNT, time_trim: float = TIME_TRIM) -> 'Vocab':
        """The Vocab that `fit` gives on events whose distinct items, categories and hours occur these many
        times (each array of distinct values with a count array beside it; any order): the same ids, order,
        MIN_ITEM_COUNT rule and time trim. Counts add over chunks or shards, so the vocabulary of a log
        too large to hold is fitted from its counts (event_cache.Cache.fit_vocab)."""
        n_events = int(np.sum(hour_counts))
        if n_events == 0:
            raise DataError('cannot fit a vocabulary on zero events')
        if min_item_count < 1:
            raise ValueError(f'min_item_count must be >= 1, got {min_item_count}')
        if not 0.0 <= time_trim < 0.5:
            raise ValueError(f'time_trim must be in [0, 0.5), got {time_trim}')

        def ranked(raw, counts):                   # _count_sorted's order: most frequent first, ties by raw id
            raw, counts = np.asarray(raw, np.int64), np.asarray(counts, np.int64)
            order = np.lexsort((raw, -counts))
            return raw[order], counts[order]

        items, item_counts = ranked(items, item_counts)
        keep = item_counts >= min_item_count
        cats, cat_counts = ranked(categories, category_counts)
        order = np.argsort(hours, kind='stable')
        hours, hour_counts = np.asarray(hours, np.int64)[order], np.asarray(hour_counts, np.int64)[order]
        if time_trim > 0:
            t_min = int(quantile_from_counts(hours, hour_counts, time_trim, 'lower'))
            t_max = int(quantile_from_counts(hours, hour_counts, 1.0 - time_trim, 'higher'))
        else:
            present = hours[hour_counts > 0]
            t_min, t_max = int(present.min()), int(present.max())
        return cls(items=items[keep], item_counts=item_counts[keep], categories=cats, category_counts=cat_counts,
                   t_min=t_min, t_max=t_max, min_item_count=int(min_item_count), n_events=n_events,
                   n_distinct_items=len(items))

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the tables and time span: equal fingerprints, the same encoding."""
        import hashlib
        h = hashlib.sha256()
        for a in (self.items, self.item_counts, self.categories, self.category_counts,
                  np.array([self.t_min, self.t_max, self.min_item_count, self.n_events, self.n_distinct_items])):
            h.update(np.ascontiguousarray(a, np.int64).tobytes())
            h.update(b'|')
        return h.hexdigest()

    def _lookup(self, name: str) -> pd.Index:
        if name not in self._index_cache:
            self._index_cache[name] = pd.Index(getattr(self, name))
        return self._index_cache[name]

    def _encode(self, name: str, raw) -> np.ndarray:
        idx = self._lookup(name).get_indexer(np.asarray(raw, dtype=np.int64)).astype(np.int64, copy=False)
        idx += 2                                   # known k -> k + 2; not found (-1) -> 1 = UNKNOWN
        return idx

    def encode_items(self, raw) -> np.ndarray:
        """Raw item ids -> indices (int64): 2.. known, 1 unseen or rare."""
        return self._encode('items', raw)

    def encode_categories(self, raw) -> np.ndarray:
        """Raw category ids -> indices (int64): 2.. known, 1 unseen."""
        return self._encode('categories', raw)

    def time_features(self, hours) -> np.ndarray:
        """Hours since 1970 -> float32 (N, 2): [since t_min, to t_max] / span, clipped to [0, 1]."""
        h = np.asarray(hours, dtype=np.int64).ravel()
        span = np.float32(max(self.t_max - self.t_min, 1))
        out = np.empty((h.size, 2), np.float32)
        out[:, 0] = h - self.t_min                         # small integers: exact in float32
        np.subtract(np.float32(self.t_max - self.t_min), out[:, 0], out=out[:, 1])
        out /= span
        np.clip(out, 0.0, 1.0, out=out)
        return out

    def save(self, path: str) -> None:
        """Write to `path` (conventionally <save dir>/vocab.npz) atomically: temp file, then os.replace."""
        atomic_write(path, lambda f: np.savez(
            f, version=np.int64(self.VERSION), items=self.items, item_counts=self.item_counts,
            categories=self.categories, category_counts=self.category_counts,
            scalars=np.array([self.t_min, self.t_max, self.min_item_count, self.n_events, self.n_distinct_items],
                             np.int64)))

    @classmethod
    def load(cls, path: str) -> 'Vocab':
        """Read a vocabulary written by `save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z['version']) != cls.VERSION:
                    raise DataError(f'{path}: vocabulary version {int(z["version"])}, this code reads {cls.VERSION}')
                s = z['scalars']
                return cls(items=z['items'], item_counts=z['item_counts'], categories=z['categories'],
                           category_counts=z['category_counts'], t_min=int(s[0]), t_max=int(s[1]),
                           min_item_count=int(s[2]), n_events=int(s[3]), n_distinct_items=int(s[4]))
        except (KeyError, OSError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f'{path}: not a vocabulary file written by data.Vocab.save ({e})') from None

    def summary(self) -> str:
        kept = int(self.item_counts.sum())
        return (f'vocabulary: {len(self.items):,} of {self.n_distinct_items:,} items kept (seen >= '
                f'{self.min_item_count}x, covering {kept / max(1, self.n_events):.1%} of {self.n_events:,} events), '
                f'{len(self.categories):,} categories; tables {self.n_items:,} / {self.n_categories:,} rows; '
                f'time span {hour_to_str(self.t_min)} .. {hour_to_str(self.t_max)} h')


def item_coverage(train: pd.DataFrame, thresholds=(1, 2, 3, 5, 10), test: pd.DataFrame | None = None) -> pd.DataFrame:
    """How the item table shrinks with min_item_count, and what share of events keeps its own item.

    Columns: min_item_count, items (table rows), table_MB (128 float32 each, x3 with Adam state),
    train_coverage (share of training events whose item is kept) and, given `test` (e.g. the next
    day), test_coverage (share of test events whose item is in the table) and test_seen (share of test
    events whose item occurs at all in training, the ceiling for test_coverage).
    """
    items, counts = _count_sorted(train['item_id'].to_numpy())
    rows = []
    test_counts = None
    if test is not None and len(test):
        idx = pd.Index(items).get_indexer(test['item_id'].to_numpy())
        test_counts = np.where(idx < 0, 0, counts[np.maximum(idx, 0)])
    for k in thresholds:
        keep = counts >= k
        row = {'min_item_count': k, 'items': int(keep.sum()),
               'table_MB': keep.sum() * 128 * 4 * 3 / 2 ** 20,
               'train_coverage': counts[keep].sum() / max(1, len(train))}
        if test_counts is not None:
            row['test_coverage'] = float((test_counts >= k).mean())
            row['test_seen'] = float((test_counts >= 1).mean())
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# sequences


@dataclass(eq=False)
class Sequences:
    """Per-user event sequences in CSR form, sorted stably by (user, hour).

    User u (0 <= u < n_users, raw id user_ids[u], ascending) owns flat positions offsets[u]:offsets[u+1],
    oldest first. Flat arrays (N events) hold contract-encoded features in compact dtypes; `batch`
    returns them as int64. `abs_hour` keeps hours since 1970 (local) for time-based evaluation.
    """
    user_ids: np.ndarray      # (U,) int64, ascending raw ids
    offsets: np.ndarray       # (U+1,) int64
    item: np.ndarray          # (N,) int32: 1 unknown, 2.. known
    category: np.ndarray      # (N,) int32
    weekday: np.ndarray       # (N,) int8: 1..7, Monday = 1
    hour: np.ndarray          # (N,) int8: hour of day + 1
    weekend: np.ndarray       # (N,) int8: 1 weekday, 2 Saturday/Sunday
    behavior: np.ndarray      # (N,) int8: 1..4
    time: np.ndarray          # (N, 2) float32: [since start, to end] in [0, 1]
    abs_hour: np.ndarray      # (N,) int32: hours since 1970-01-01 00:00 local

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """(U,) events per user."""
        return np.diff(self.offsets)

    @property
    def trainable(self) -> np.ndarray:
        """Indices of users with >= 2 events (they have both a long and a short part)."""
        return np.flatnonzero(self.lengths >= 2)

    def user_index(self, raw_ids) -> np.ndarray:
        """Raw user ids -> user indices (int64), -1 for users not in these sequences."""
        raw = np.asarray(raw_ids, dtype=np.int64)
        pos = np.searchsorted(self.user_ids, raw)
        pos_c = np.minimum(pos, max(self.n_users - 1, 0))
        found = (pos < self.n_users) & (self.user_ids[pos_c] == raw) if self.n_users else np.zeros(raw.shape, bool)
        return np.where(found, pos_c, -1).astype(np.int64)

    def part_bounds(self, user_index, part: str) -> tuple[np.ndarray, np.ndarray]:
        """Flat [start, end) of each user's part: long = first floor(9n/10) events, short = the rest, all = every event."""
        if part not in PARTS:
            raise ValueError(f'part must be one of {PARTS}, got {part!r}')
        u = np.asarray(user_index)
        if u.ndim != 1 or not (u.dtype.kind in 'iu' or u.size == 0):
            raise ValueError(f'user_index must be a 1-D integer array, got shape {u.shape} dtype {u.dtype}')
        u = u.astype(np.int64)
        if u.size and (u.min() < 0 or u.max() >= self.n_users):
            raise IndexError(f'user index out of range [0, {self.n_users})')
        start, end = self.offsets[u], self.offsets[u + 1]
        split = start + (end - start) * 9 // 10
        if part == 'long':
            return start, split
        if part == 'short':
            return split, end
        return start, end

    def batch(self, user_index, part: str, min_len: int, max_len: int) -> dict[str, np.ndarray]:
        """Padded batch for the given users' part (see the module docstring for the contract).

        L = clip(longest selected sequence, min_len, max_len); sequences longer than max_len keep
        their most recent max_len events. Returns int64 (B, L) features, float32 (B, L, 2) time and
        bool (B, L) mask, zero at padded positions.
        """
        return self.range_batch(*self.part_bounds(user_index, part), min_len, max_len)

    def cut_bounds(self, user_index, rng: np.random.Generator, lowest: float = 0.5
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A random cut of each user's history: (start, cut, end) flat positions, the history before the cut
        [start, cut) and the events from it [cut, end), each at least one event.

        The cut falls uniformly among the positions from `lowest` of the history (and at least one event in)
        to the last event, so every epoch sees other histories and futures of the same users.
        """
        start, end = self.part_bounds(user_index, 'all')
        n = end - start
        if n.size and n.min() < 2:
            raise ValueError('cut_bounds needs users with >= 2 events (Sequences.trainable)')
        lo = np.maximum(np.ceil(lowest * n).astype(np.int64), 1)
        lo = np.minimum(lo, n - 1)
        cut = lo + np.floor(rng.random(len(n)) * (n - lo)).astype(np.int64)   # in [lo, n - 1]
        return start, start + cut, end

    def range_batch(self, start: np.ndarray, end: np.ndarray, min_len: int, max_len: int) -> dict[str, np.ndarray]:
        """Padded batch of the flat ranges [start, end) (one per row), as `batch` makes for a part."""
        if not 1 <= min_len <= max_len:
            raise ValueError(f'need 1 <= min_len <= max_len, got {min_len}, {max_len}')
        start = np.maximum(start, end - max_len)                      # keep the most recent events
        n = end - start                                               # (B,)
        L = int(np.clip(n.max() if n.size else 0, min_len, max_len))
        pos = np.arange(L)
        mask = pos[None, :] < n[:, None]                              # (B, L)
        idx = np.where(mask, start[:, None] + pos[None, :], 0)        # (B, L) flat positions
        if self.n_events == 0:
            idx = np.zeros_like(idx)
        out = {}
        for name in FEATURES:
            a = getattr(self, name)
            v = a[idx].astype(np.int64) if a.size else np.zeros(idx.shape, np.int64)
            v[~mask] = 0
            out[name] = v
        t = self.time[idx] if self.n_events else np.zeros(idx.shape + (2,), np.float32)
        t[~mask] = 0.0
        out['time'] = t                                               # (B, L, 2)
        out['mask'] = mask
        return out

    def top_category(self, user_index) -> np.ndarray:
        """(B,) each user's most frequent encoded category over all their events (ties: the smaller index)."""
        start, end = self.part_bounds(user_index, 'all')
        n = end - start
        pos, owner = expand_ranges(start, end)                        # (E,) flat position, batch row
        n_cat = int(self.category.max()) + 1 if self.n_events else 1
        pairs, counts = np.unique(owner * n_cat + self.category[pos], return_counts=True)
        rows, cats = pairs // n_cat, pairs % n_cat
        order = np.lexsort((cats, -counts, rows))                     # per row: most frequent first
        first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if len(order) else order
        out = np.zeros(len(n), np.int64)
        out[rows[first]] = cats[first]
        return out

    def summary(self) -> str:
        lens = self.lengths
        n_train = int((lens >= 2).sum())
        med = int(np.median(lens)) if lens.size else 0
        return (f'sequences: {self.n_users:,} users, {self.n_events:,} events (median {med}, max '
                f'{int(lens.max()) if lens.size else 0} per user); trainable users (>= 2 events): {n_train:,}; '
                f'excluded from training (1 event, still exported): {self.n_users - n_train:,}')


def _stable_order(ucode: np.ndarray, n_users: int, hour: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by (user code, hour), stable (ties keep file order)."""
    if len(hour) == 0:
        return np.zeros(0, np.int64)
    h = hour - hour.min()
    h_range = int(h.max()) + 1
    if n_users <= 1 << 16 and h_range <= 1 << 16:
        # two stable LSD radix passes on 16-bit keys: much faster than a 64-bit comparison sort
        p = np.argsort(h.astype(np.uint16), kind='stable')
        q = np.argsort(ucode.astype(np.uint16)[p], kind='stable')
        return p[q]
    if n_users * h_range < 1 << 62:
        return np.argsort(ucode.astype(np.int64) * h_range + h, kind='stable')
    return np.lexsort((h, ucode))


def calendar_features(abs_hour) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hours since 1970 (local) -> (weekday 1..7 Monday = 1, hour of day + 1, weekend 1/2), int8 each."""
    abs_hour = np.asarray(abs_hour, np.int64)
    weekday = (np.floor_divide(abs_hour, 24) + 3) % 7 + 1                  # 1970-01-01 was a Thursday
    return (weekday.astype(np.int8), (abs_hour % 24 + 1).astype(np.int8),
            np.where(weekday >= 6, 2, 1).astype(np.int8))


def expand_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the ranges [starts[i], ends[i]) and the index i each belongs to (vectorised)."""
    starts = np.asarray(starts, np.int64)
    n = np.maximum(np.asarray(ends, np.int64) - starts, 0)
    owner = np.repeat(np.arange(len(n)), n)
    first = np.cumsum(n) - n                                             # output index where range i begins
    pos = starts[owner] + (np.arange(int(n.sum())) - first[owner])
    return pos, owner


def build_sequences(events: pd.DataFrame, vocab: Vocab) -> Sequences:
    """Events (any log, e.g. newer than the vocabulary's) -> CSR sequences encoded with `vocab`."""
    if len(events) == 0:
        raise DataError('no events to build sequences from')
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise DataError(f'events lack column(s) {missing}; expected the output of read_events')
    ucode, users = pd.factorize(events['user_id'].to_numpy(), sort=True)
    hour_all = events['hour'].to_numpy().astype(np.int64, copy=False)
    order = _stable_order(ucode, len(users), hour_all)
    counts = np.bincount(ucode, minlength=len(users))
    offsets = np.zeros(len(users) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    del ucode
    abs_hour = hour_all[order]
    weekday, hour, weekend = calendar_features(abs_hour)
    return Sequences(
        user_ids=np.asarray(users, dtype=np.int64),
        offsets=offsets,
        item=vocab.encode_items(events['item_id'].to_numpy()[order]).astype(np.int32),
        category=vocab.encode_categories(events['category_id'].to_numpy()[order]).astype(np.int32),
        weekday=weekday,
        hour=hour,
        weekend=weekend,
        behavior=events['behavior'].to_numpy()[order].astype(np.int8),
        time=vocab.time_features(abs_hour),
        abs_hour=abs_hour.astype(np.int32),
    )


if __name__ == '__main__':
    # smoke run: python data.py DATA/train_user
    ev, rep = read_events(sys.argv[1] if len(sys.argv) > 1 else DATA_PATH)
    print(rep.summary())
    vo = Vocab.fit(ev)
    print(vo.summary())
    sq = build_sequences(ev, vo)
    print(sq.summary())
    b = sq.batch(sq.trainable[:4], 'long', N_MIN, N_MAX)
    print({k: (v.shape, str(v.dtype)) for k, v in b.items()})
