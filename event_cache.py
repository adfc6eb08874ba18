"""Parse a behaviour log once into user-sharded Parquet files, and reuse them while the log is unchanged.

    cache = event_cache.load('DATA/train_user')      # builds <log>.cache/ the first time, reuses it after
    print(cache.report.summary())                    # the same LoadReport read_events gives
    events = cache.events()                          # the rows read_events returns (columns, dtypes, per-user order)
    part = cache.events(shards=[0, 8, 16])           # only some users: shard = stable hash of the raw user id

The first run streams the log chunk by chunk through data.stream_events (the same validation, bad-row
counts, line numbers and --strict errors as read_events), writes each chunk's valid rows to per-shard spill
files, then applies the two steps that need every row - the time window around the median hour (from an hour
histogram, exact: hours are integers) and duplicate detection (duplicates share a user, so a shard holds
all of a row's duplicates) - shard by shard, and writes one Parquet file per shard. Memory is bounded by the
chunk size and the largest shard, not by the log.

Layout of the cache folder (beside the log, or under <save_dir>/event_cache/ when that folder is read-only):
    shard-00000.parquet ...   columns user_id, item_id, category_id (raw int64 ids), behavior (int8), hour
                              (int64, hours since 1970 China time), row (int64: the row's position in
                              read_events' output, so file order is recoverable); each shard in file order
    shard-00000.part-001.parquet ...   rows appended to that shard since (see below), same columns
    manifest.json             written last: source file (size, mtime_ns; uncompressed: SHA-256 and line count),
                              the options that change the content, reader version, counts, the LoadReport, hour
                              histograms, the vocabulary fingerprint (an order-free hash of the item, category
                              and hour columns: what Vocab.fit reads) and every shard file's size and SHA-256
A build writes into a temporary folder and renames it into place, so a reader sees the old cache or the new
one, never half of one; a cache whose manifest is missing or unreadable, whose log or options changed, or
whose shard is missing, torn or altered (size, checksum) is rebuilt with a one-line reason, never read.
The daily refresh: when an uncompressed log grew and its first bytes are still the cached ones (SHA-256),
only the appended lines are parsed (append); each shard gets its new rows as one more part file. The result
holds exactly what a rebuild would (rows, LoadReport, fingerprint), else the cache is rebuilt.
Open a shard with any Parquet tool: pandas.read_parquet('...cache/shard-00000.parquet').
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

import data

CACHE_VERSION = 2                  # bump when the cached content or its layout changes: old caches are rebuilt
MANIFEST = 'manifest.json'
COLUMNS = data.EVENT_COLUMNS + ['row']
DTYPES = {**data.EVENT_DTYPES, 'row': np.int64}
SHARD_SOURCE_BYTES = 64 << 20      # default: one shard per 64 MiB of CSV (~1.5M rows; a .gz counts 4x its size)
MIN_SHARDS = 8                     # ... and at least this many, so 8 ranks can each take a share
MAX_PARTS = 32                     # a shard grown by this many appended parts (daily refreshes) is rewritten as one file
COMPRESSION = 'zstd'               # Parquet codec of the shards (measured on 8.7M rows, one row group a shard, with
                                   # dictionary encoding: zstd 0.33 s / 86 MB, lz4 0.24 s / 127 MB, none 0.29 s / 179 MB)


class CacheStale(Exception):
    """Why a cache folder cannot be used as it is (the message is the reason printed before the rebuild)."""


class LogGrew(CacheStale):
    """The cache is sound but its log is larger now: perhaps lines were appended (append() checks and updates)."""

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


# ----------------------------------------------------------------------------------------------
# users -> shards, and where the cache lives

def shard_of_users(user_ids, n_shards: int) -> np.ndarray:
    """Shard (0 <= s < n_shards) of each raw user id: splitmix64 of the id, modulo n_shards. Depends on the id
    alone, so any process, on any machine, finds a user's shard without reading the log."""
    return (data.splitmix64(user_ids) % np.uint64(n_shards)).astype(np.int64)


def default_shards(log_path: str) -> int:
    size = os.path.getsize(log_path) * (4 if log_path.endswith('.gz') else 1)
    return max(MIN_SHARDS, -(-size // SHARD_SOURCE_BYTES))


def _writable(folder: Path) -> bool:
    """Writable by this process and not marked read-only (no w bit at all): root may write anywhere, but a
    folder of shared samples made r-x is not the place for a cache."""
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) and bool(folder.stat().st_mode & 0o222)


def cache_dir_for(log_path: str, save_dir: str = 'saved_models') -> Path:
    """<log>.cache beside the log; <save_dir>/event_cache/<log name>-<hash of its path>.cache when the log's
    folder cannot be written (a read-only share)."""
    log = Path(log_path).resolve()
    if _writable(log.parent):
        return log.with_name(log.name + '.cache')
    tag = hashlib.sha256(str(log).encode()).hexdigest()[:10]
    return Path(save_dir) / 'event_cache' / f'{log.name}-{tag}.cache'


def _source(log_path: str) -> dict:
    st = os.stat(log_path)
    return {'name': os.path.basename(log_path), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def _content(log_path: str, prefix: int | None = None) -> tuple[dict, str | None]:
    """({sha256, lines, ends_with_newline} of the whole file, SHA-256 of its first `prefix` bytes or None), in
    one read: what tells later whether a grown log only had lines appended (~1 s per GB)."""
    h, lines, last, at, head = hashlib.sha256(), 0, b'', 0, None
    with open(log_path, 'rb') as f:
        while block := f.read(1 << 22):
            if prefix is not None and head is None and at + len(block) >= prefix:
                h.update(block[:prefix - at])
                head = h.hexdigest()
                h.update(block[prefix - at:])
            else:
                h.update(block)
            lines += block.count(b'\n')
            at += len(block)
            last = block[-1:]
    return {'sha256': h.hexdigest(), 'lines': lines, 'ends_with_newline': last == b'\n'}, head


def shard_files(entry: dict) -> list[dict]:
    """A shard's files in row order: its first file, then the parts appended when the log grew."""
    return [entry] + list(entry.get('parts', []))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# the cache

class Cache:
    """A checked cache folder: its LoadReport, and the events of all or some shards."""

    def __init__(self, directory: Path, manifest: dict, report: data.LoadReport):
        self.directory = Path(directory)
        self.manifest = manifest
        self.report = report

    @property
    def n_shards(self) -> int:
        return int(self.manifest['n_shards'])

    def _shards(self, shards) -> list[int]:
        ks = list(range(self.n_shards)) if shards is None else sorted({int(k) for k in np.atleast_1d(shards)})
        if ks and not (0 <= ks[0] and ks[-1] < self.n_shards):
            raise IndexError(f'shard out of range [0, {self.n_shards})')
        return ks

    def _columns(self, shards, columns: list[str]) -> dict[str, np.ndarray]:
        """The columns of the given shards, shard after shard (each in file order), filled in place."""
        import pyarrow.parquet as pq
        ks = self._shards(shards)
        n = sum(self.manifest['shards'][k]['rows'] for k in ks)
        out = {c: _prefaulted_empty(n, DTYPES[c]) for c in columns}
        at = 0
        for k in ks:
            for f in shard_files(self.manifest['shards'][k]):
                table = pq.read_table(self.directory / f['file'], columns=columns)
                m = table.num_rows
                for c in columns:
                    out[c][at:at + m] = table.column(c).to_numpy()
                at += m
                del table
        return out

    def events(self, shards=None, file_order: bool = False) -> pd.DataFrame:
        """read_events' DataFrame for all users (shards=None) or those of the given shards: the same columns
        and dtypes, and each user's rows in file order - which is all read_events' order means downstream
        (build_sequences sorts stably by user, then hour; the vocabulary and the target day are counts).
        Rows come shard after shard; file_order=True sorts them into read_events' exact order (one more sort)."""
        cols = self._columns(shards, COLUMNS if file_order else data.EVENT_COLUMNS)
        if file_order:
            order = np.argsort(cols.pop('row'), kind='stable')
            cols = {c: a[order] for c, a in cols.items()}
        return pd.DataFrame(cols, columns=data.EVENT_COLUMNS, copy=False)   # no 2-D block copy: ~2x faster

    def users(self, shards=None) -> np.ndarray:
        """Sorted distinct raw user ids of the given shards (all: None)."""
        return np.unique(self._columns(shards, ['user_id'])['user_id'])

    def shard_of_users(self, user_ids) -> np.ndarray:
        return shard_of_users(user_ids, self.n_shards)

    def hour_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct hours ascending, events per hour) of the whole cached log."""
        return (np.asarray(self.manifest['hours'], np.int64), np.asarray(self.manifest['hour_counts'], np.int64))

    def last_days_cutoff(self, n_days: int = 1, trim: float = data.TIME_TRIM) -> int:
        """data.last_days_cutoff of the whole log, from its hour histogram (no rows read)."""
        last_day = int(data.quantile_from_counts(*self.hour_counts(), 1.0 - trim)) // 24
        return (last_day - n_days + 1) * 24

    def split_last_day(self, shards=None) -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
        """data.split_last_day of the given shards' events, with the target day of the whole log (so every
        rank that loads a share of the shards agrees on it)."""
        return data.split_last_day(self.events(shards), self.last_days_cutoff(1))

    def fit_vocab(self, before_hour: int | None = None, min_item_count: int = data.MIN_ITEM_COUNT,
                  time_trim: float = data.TIME_TRIM, shards=None) -> data.Vocab:
        """Vocab.fit of the events before `before_hour` (None: all) of the whole log (or some shards), one shard
        at a time: the counts of every shard added up, then Vocab.from_counts."""
        counts = _Counts()
        for k in self._shards(shards):
            c = self._columns([k], ['item_id', 'category_id', 'hour'])
            if before_hour is not None:
                keep = c['hour'] < before_hour
                c = {name: a[keep] for name, a in c.items()}
            counts.add(c['item_id'], c['category_id'], c['hour'])
        return counts.vocab(min_item_count, time_trim)


def _prefaulted_empty(n: int, dtype) -> np.ndarray:
    """np.empty(n, dtype) whose pages the kernel maps in one go (MAP_POPULATE) rather than one fault at a
    time on first write: filling 400 MB measured 0.13 + 0.03 s instead of 0.9 s on this VM, and the events
    table is ~1.7 GB at 50M rows. Plain np.empty where the flag does not exist."""
    import mmap
    nbytes = n * np.dtype(dtype).itemsize
    flag = getattr(mmap, 'MAP_POPULATE', 0)
    if nbytes < 1 << 20 or not flag:
        return np.empty(n, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flag)
    return np.frombuffer(buf, dtype)                # the array keeps the mapping alive


class _Counts:
    """Distinct items, categories and hours with their counts, added up shard by shard: memory holds the
    distinct values (the vocabulary's own size), never the rows."""

    def __init__(self):
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.totals = {'item': empty, 'category': empty, 'hour': empty}

    def add(self, items, categories, hours):
        for name, a in (('item', items), ('category', categories), ('hour', hours)):
            self.totals[name] = _merge_counts(*self.totals[name], *_distinct_counts(a))

    def vocab(self, min_item_count, time_trim) -> data.Vocab:
        return data.Vocab.from_counts(*self.totals['item'], *self.totals['category'], *self.totals['hour'],
                                      min_item_count=min_item_count, time_trim=time_trim)


def _distinct_counts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(a, return_counts=True) by hashing (pandas), then sorting only the distinct values: ~5x faster
    than np.unique's sort of every row when values repeat (categories, hours, popular items)."""
    vc = pd.Series(a, copy=False).value_counts(sort=False)
    values, counts = vc.index.to_numpy(np.int64), vc.to_numpy(np.int64)
    order = np.argsort(values)
    return values[order], counts[order]


def _merge_counts(a, a_counts, b, b_counts):
    """Two (sorted distinct values, counts) -> their sum, sorted: b's values found in a add to their counts,
    the others are inserted in place (a binary search each, no sort of the union)."""
    if len(a) == 0:
        return b, b_counts
    pos = np.searchsorted(a, b)
    found = a[np.minimum(pos, len(a) - 1)] == b
    a_counts = a_counts.copy()
    a_counts[pos[found]] += b_counts[found]
    if found.all():
        return a, a_counts
    new = ~found
    return np.insert(a, pos[new], b[new]), np.insert(a_counts, pos[new], b_counts[new])


def _multiset_hash(values: np.ndarray) -> int:
    """An order-free 64-bit fingerprint of a column: the sum of every value's splitmix64 (mod 2^64). Equal
    multisets give equal sums; it adds over shards."""
    with np.errstate(over='ignore'):
        return int(data.splitmix64(values).sum(dtype=np.uint64))


# ----------------------------------------------------------------------------------------------
# load: check, else build

def load(data_path: str, cache_dir: str | os.PathLike | None = None, *, data_format: str = 'auto',
         strict: bool = False, dedupe: bool = False, time_window_days: int = data.TIME_WINDOW_DAYS,
         n_shards: int | None = None, rebuild: bool = False, verify: bool = True, progress: bool = True,
         save_dir: str = 'saved_models', log=print) -> Cache:
    """The cache of the log at data_path (a file, or a folder as read_events takes it): reused when its manifest
    matches the log (size, mtime) and these options and (verify) every shard's SHA-256, else (or with rebuild)
    built - with a one-line message saying why. n_shards None: the cache's own count when reusing, else
    default_shards. Raises data.DataError for bad input, as read_events."""
    t0 = time.perf_counter()
    path = data.resolve_log_path(data_path)
    directory = Path(cache_dir) if cache_dir is not None else cache_dir_for(path, save_dir)
    options = {'data_format': data_format, 'strict': bool(strict), 'dedupe': bool(dedupe),
               'time_window_days': int(time_window_days)}
    why = 'rebuild requested'
    if not rebuild:
        try:
            try:
                manifest = check(directory, path, options, n_shards, verify)
                verb = 'reusing'
            except LogGrew as e:
                log(f'event cache: updating {directory} ({e}; parsing only what was appended)')
                manifest = append(path, directory, e.manifest, options, progress)
                verb = 'updated'
            report = data.LoadReport(**{**manifest['report'], 'seconds': time.perf_counter() - t0})
            log(f'event cache: {verb} {directory} ({manifest["n_shards"]} shards, {manifest["rows"]:,} rows, '
                f'{manifest["users"]:,} users; {time.perf_counter() - t0:.1f} s)')
            return Cache(directory, manifest, report)
        except CacheStale as e:
            why = str(e)
    log(f'event cache: building {directory} ({why})')
    manifest = build(path, directory, options, n_shards or default_shards(path), progress)
    report = data.LoadReport(**{**manifest['report'], 'seconds': time.perf_counter() - t0})
    log(f'event cache: wrote {manifest["n_shards"]} shards ({manifest["bytes"] / 2**20:,.0f} MiB) in '
        f'{time.perf_counter() - t0:.1f} s')
    return Cache(directory, manifest, report)


def check(directory: Path, log_path: str, options: dict, n_shards: int | None = None, verify: bool = True) -> dict:
    """The manifest of a usable cache for this log and options; CacheStale saying why not otherwise."""
    directory = Path(directory)
    mf = directory / MANIFEST
    if not mf.is_file():
        raise CacheStale('no cache yet' if not directory.exists() else 'no manifest: an earlier build did not finish')
    try:
        manifest = json.loads(mf.read_text())
        shards = manifest['shards']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheStale(f'unreadable manifest ({e})') from None
    if manifest.get('version') != CACHE_VERSION:
        raise CacheStale(f'written by cache version {manifest.get("version")}, this code writes {CACHE_VERSION}')
    src = _source(log_path)
    grew = None
    if manifest.get('source') != src:
        old = manifest.get('source') or {}
        grew = (f'the log changed (size {old.get("size")} -> {src["size"]}, mtime_ns {old.get("mtime_ns")} '
                f'-> {src["mtime_ns"]})')
        if not (old.get('name') == src['name'] and isinstance(old.get('size'), int) and src['size'] > old['size']
                and manifest.get('content')):
            raise CacheStale(grew)
    changed = [f'{k} {manifest["options"].get(k)!r} -> {v!r}' for k, v in options.items()
               if manifest.get('options', {}).get(k) != v]
    if changed:
        raise CacheStale('built with other options (' + ', '.join(changed) + ')')
    if n_shards is not None and n_shards != manifest.get('n_shards'):
        raise CacheStale(f'built with {manifest.get("n_shards")} shards, {n_shards} asked for')
    if len(shards) != manifest.get('n_shards'):
        raise CacheStale('manifest lists the wrong number of shards')
    for s in (f for entry in shards for f in shard_files(entry)):
        f = directory / s['file']
        if not f.is_file():
            raise CacheStale(f'shard {s["file"]} is missing')
        if f.stat().st_size != s['bytes']:
            raise CacheStale(f'shard {s["file"]} is torn ({f.stat().st_size} bytes, manifest says {s["bytes"]})')
        if verify and _sha256(f) != s['sha256']:
            raise CacheStale(f'shard {s["file"]} is damaged (SHA-256 differs from the manifest)')
    if grew:
        raise LogGrew(grew, manifest)
    return manifest


class _Spill:
    """The streaming half of a build: each chunk's valid rows go to per-shard spill files (raw column bytes),
    numbered from `first_row` on (their 'row'), and their hours to a histogram (the time window's median)."""

    def __init__(self, tmp: Path, n_shards: int, first_row: int = 0):
        self.tmp, self.n_shards, self.first_row = tmp, n_shards, first_row
        self.lo, hi = (int(v) for v in data.VALID_TIME)
        self.hist = np.zeros(hi - self.lo, np.int64)
        self.row = first_row
        self.files = [{c: open(tmp / f'spill-{k}.{c}', 'wb') for c in COLUMNS} for k in range(n_shards)]

    def __call__(self, chunk) -> None:
        if chunk is None:                          # the reader starts over on the slow path
            for files in self.files:
                for f in files.values():
                    f.seek(0)
                    f.truncate()
            self.hist[:] = 0
            self.row = self.first_row
            return
        m = len(chunk['hour'])
        cols = {c: np.asarray(chunk[c], DTYPES[c]) for c in data.EVENT_COLUMNS}
        cols['row'] = np.arange(self.row, self.row + m, dtype=np.int64)
        self.row += m
        self.hist[:] += np.bincount(cols['hour'] - self.lo, minlength=len(self.hist))
        shard = shard_of_users(cols['user_id'], self.n_shards)
        order = np.argsort(shard, kind='stable')
        bounds = np.searchsorted(shard[order], np.arange(self.n_shards + 1))
        for c in COLUMNS:
            a = cols[c][order]
            for k in range(self.n_shards):
                if bounds[k + 1] > bounds[k]:
                    self.files[k][c].write(a[bounds[k]:bounds[k + 1]].data)

    def close(self) -> None:
        for files in self.files:
            for f in files.values():
                f.close()

    def take(self, k: int) -> dict[str, np.ndarray]:
        """Shard k's spilled rows (the spill files are removed)."""
        cols = {c: np.fromfile(self.tmp / f'spill-{k}.{c}', dtype=DTYPES[c]) for c in COLUMNS}
        for c in COLUMNS:
            os.remove(self.tmp / f'spill-{k}.{c}')
        return cols

    def valid_hours(self) -> dict[int, int]:
        nz = np.flatnonzero(self.hist)
        return dict(zip((nz + self.lo).tolist(), self.hist[nz].tolist()))


def _median_hour(valid_hours: dict[int, int], window: int) -> int:
    if not window or not valid_hours:
        return 0
    hours = np.array(sorted(valid_hours), np.int64)
    return int(data.median_from_counts(hours, np.array([valid_hours[h] for h in hours.tolist()], np.int64)))


class _Shards:
    """The per-shard half of a build: the time window, duplicates (against the shard's earlier rows, when a grown
    log's cache is updated), Parquet files, and the totals the manifest records."""

    def __init__(self, tmp: Path, options: dict, median: int, fingerprint=None, final_hist=None):
        self.tmp, self.options, self.median = tmp, options, median
        self.n_far = self.n_dup = 0
        self.first_far = None                      # strict: (row, hour) of the earliest event outside the window
        self.fingerprint = dict(fingerprint or {'item_id': 0, 'category_id': 0, 'hour': 0})
        self.final_hist = {int(h): int(n) for h, n in (final_hist or {}).items()}
        self.entries = []

    def add(self, k: int, new: dict[str, np.ndarray], old: dict[str, np.ndarray] | None = None,
            entry: dict | None = None, old_dir: Path | None = None, compact: bool = False) -> None:
        """Shard k from its rows; updating (old: the rows the cache holds, entry: its manifest entry), the new
        rows become one more part of the shard, the cached files kept as they are (linked from old_dir), or
        with compact (old then has every column) the shard is written as one file again."""
        far = data.implausible_mask(new['hour'], self.median, self.options['time_window_days'])
        if far.any():
            self.n_far += int(far.sum())
            i = int(np.flatnonzero(far)[0])
            if self.first_far is None or new['row'][i] < self.first_far[0]:
                self.first_far = (int(new['row'][i]), int(new['hour'][i]))
            new = {c: a[~far] for c, a in new.items()}
        if self.options['strict'] and self.first_far is not None:
            return                                 # the build fails: keep looking for the earliest
        new_users = np.unique(new['user_id'])
        if old is not None:                        # duplicates share a user: the cached rows of the new rows' users
            prior = _member(old['user_id'], new_users)
            old_users = np.unique(old['user_id'][prior])
        both = new if old is None else {c: np.concatenate([old[c][prior], new[c]]) for c in data.EVENT_COLUMNS}
        n_prior = len(both['hour']) - len(new['hour'])
        dup = data.duplicate_mask(pd.DataFrame({c: both[c] for c in data.EVENT_COLUMNS}))[n_prior:]
        self.n_dup += int(dup.sum())
        if self.options['dedupe'] and dup.any():
            new = {c: a[~dup] for c, a in new.items()}
        for c in self.fingerprint:
            self.fingerprint[c] = (self.fingerprint[c] + _multiset_hash(new[c])) % 2 ** 64
        hours, per_hour = np.unique(new['hour'], return_counts=True)
        for h, n in zip(hours.tolist(), per_hour.tolist()):
            self.final_hist[h] = self.final_hist.get(h, 0) + n
        if old is None:
            self.entries.append({**self._write(f'shard-{k:05d}.parquet', new), 'users': len(new_users)})
        elif compact:
            allc = {c: np.concatenate([old[c], new[c]]) for c in COLUMNS}
            self.entries.append({**self._write(f'shard-{k:05d}.parquet', allc),
                                 'users': int(len(np.unique(allc['user_id'])))})
        else:
            self.keep(old_dir, entry)
            grown = self.entries[-1]
            if len(new['row']):
                parts = grown.setdefault('parts', [])
                parts.append(self._write(f'shard-{k:05d}.part-{len(parts) + 1:03d}.parquet', new))
                grown['rows'] += len(new['row'])
                grown['users'] += int((~_member(new_users, old_users)).sum())

    def _write(self, name: str, cols: dict[str, np.ndarray]) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({c: cols[c] for c in COLUMNS}), self.tmp / name, compression=COMPRESSION,
                       row_group_size=max(1, len(cols['row'])))   # one row group: one chunk a column, read ~1.7x faster
        return {'file': name, 'rows': int(len(cols['row'])), 'bytes': (self.tmp / name).stat().st_size,
                'sha256': _sha256(self.tmp / name)}

    def keep(self, old_dir: Path, entry: dict) -> None:
        """An unchanged shard of the cache being updated: its files linked (or copied) into the new folder."""
        for f in shard_files(entry):
            src, dst = old_dir / f['file'], self.tmp / f['file']
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        self.entries.append(json.loads(json.dumps(entry)))          # a deep copy: parts may be added

    def manifest(self, info: data.StreamInfo, options: dict, source: dict, content: dict | None, n_shards: int,
                 valid_rows: int, valid_hours: dict[int, int], rows_read: int, skipped: dict, old_dup: int = 0,
                 slow_path: bool = False) -> dict:
        """The manifest of the shards added (raises what read_events raises for strict's far event, no rows)."""
        fmt, window = info.format, options['time_window_days']
        if self.first_far is not None and options['strict']:
            row, hour = self.first_far             # strict kept every data row: row i is line header + i + 1
            raise data.implausible_error(info.path, fmt, int(info.has_header) + row + 1, hour, self.median, window)
        skipped = dict(skipped)
        if self.n_far:
            skipped['time implausible'] = skipped.get('time implausible', 0) + self.n_far
        rows_kept = sum(s['rows'] for s in self.entries)
        if rows_kept == 0:
            raise data.DataError(f'{info.path}: no valid rows among {rows_read:,} (skipped: {skipped}); '
                                 f'expected {data._EXPECTED[fmt]}')
        n_dup = old_dup + self.n_dup
        report = data.LoadReport(path=info.path, format=fmt, rows_read=rows_read, rows_kept=rows_kept,
                                 skipped=skipped, duplicate_rows=n_dup,
                                 duplicates_dropped=n_dup if options['dedupe'] else 0, slow_path=slow_path)
        hours = sorted(self.final_hist)
        valid = sorted(valid_hours)
        return {
            'version': CACHE_VERSION, 'source': source, 'content': content, 'options': options, 'n_shards': n_shards,
            'rows': rows_kept, 'users': sum(s['users'] for s in self.entries),
            'bytes': sum(f['bytes'] for s in self.entries for f in shard_files(s)),
            'report': {k: v for k, v in asdict(report).items() if k != 'seconds'},
            'vocab_fingerprint': vocab_fingerprint(self.fingerprint, rows_kept),
            'hours': hours, 'hour_counts': [self.final_hist[h] for h in hours],
            'shard_hash': 'splitmix64(user_id) % n_shards',
            # what updating the cache of a grown log needs: the rows before the time window and the duplicates
            'has_header': info.has_header, 'valid_rows': valid_rows, 'median_hour': self.median,
            'valid_hours': valid, 'valid_hour_counts': [valid_hours[h] for h in valid],
            'fingerprint_sums': self.fingerprint,
            'shards': sorted(self.entries, key=lambda e: e['file']),
        }


def _member(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.isin(a, b) through a hash table of b (pandas): no sort of the large a (~6x faster at 650k vs 20k)."""
    return pd.Series(a, copy=False).isin(b).to_numpy()


def _write_manifest(tmp: Path, manifest: dict) -> None:
    with open(tmp / MANIFEST, 'w') as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _temp_dir(directory: Path) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f'.{directory.name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _shard_range(n_shards: int, desc: str, progress: bool):
    """range(n_shards), with a progress bar when progress."""
    from tqdm import tqdm
    return tqdm(range(n_shards), desc=desc, unit='shard', file=sys.stderr, leave=False, disable=not progress)


def _land(tmp: Path, directory: Path, manifest: dict, log_path: str, options: dict, progress: bool) -> dict:
    """Write the manifest (last: without it the folder is no cache) and swap the folder in. When another
    process's cache landed first: theirs if it fits this log and these options, else ours is built again."""
    _write_manifest(tmp, manifest)
    if _swap_in(tmp, directory):
        return manifest
    try:
        return check(directory, log_path, options, None, verify=True)
    except CacheStale:
        return build(log_path, directory, options, manifest['n_shards'], progress)


def build(log_path: str, directory: Path, options: dict, n_shards: int, progress: bool = True) -> dict:
    """Parse the log once into n_shards Parquet files + manifest in `directory` (replaced atomically)."""
    t0 = time.perf_counter()
    directory = Path(directory)
    tmp = _temp_dir(directory)
    try:
        # 1. stream: valid rows -> per-shard spill files, hours -> a histogram
        source = _source(log_path)
        content = None if log_path.endswith('.gz') else _content(log_path)[0]
        spill = _Spill(tmp, n_shards)
        try:
            info = data.stream_events(log_path, spill, data_format=options['data_format'], strict=options['strict'],
                                      progress=progress)
        finally:
            spill.close()
        # 2. per shard: the time window (median of the histogram), duplicates, Parquet
        valid_hours = spill.valid_hours()
        shards = _Shards(tmp, options, _median_hour(valid_hours, options['time_window_days']))
        for k in _shard_range(n_shards, 'writing event cache shards', progress):
            shards.add(k, spill.take(k))
        manifest = shards.manifest(info, options, source, content, n_shards, spill.row, valid_hours,
                                   info.rows_read, info.skipped, slow_path=info.slow_path)
        manifest['build_seconds'] = round(time.perf_counter() - t0, 2)
        return _land(tmp, directory, manifest, log_path, options, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append(log_path: str, directory: Path, manifest: dict, options: dict, progress: bool = True) -> dict:
    """The cache of a log that grew by lines appended at its end (the daily refresh): only the new lines are
    parsed, and each shard's new rows become one more Parquet part of it (duplicates counted against the
    shard's cached rows of the same users; a shard of MAX_PARTS parts is rewritten as one file); the cached
    files are linked into a new folder, swapped in like a build. The same rows, report, vocabulary
    fingerprint and histograms as a rebuild; CacheStale (the caller then rebuilds) where that cannot be
    guaranteed: the cached part of the file changed, the log is compressed, or the time window (around the
    median hour) moved past cached rows."""
    t0 = time.perf_counter()
    directory = Path(directory)
    old_src, content = manifest['source'], manifest.get('content')
    if log_path.endswith('.gz') or not content:
        raise CacheStale('the log changed, and a compressed log is parsed again whole')
    if not content['ends_with_newline']:
        raise CacheStale('the log changed, and its cached part did not end with a line break')
    source = _source(log_path)
    new_content, head = _content(log_path, prefix=old_src['size'])
    if head != content['sha256']:
        raise CacheStale('the log changed: its first {:,} bytes differ from the cached ones (not only lines '
                         'appended)'.format(old_src['size']))
    n_shards, window = manifest['n_shards'], options['time_window_days']
    tmp = _temp_dir(directory)
    try:
        spill = _Spill(tmp, n_shards, first_row=manifest['valid_rows'])
        try:
            info = data.stream_events(log_path, spill, data_format=manifest['report']['format'],
                                      strict=options['strict'], progress=progress, start=old_src['size'],
                                      first_line=content['lines'] + 1)
        finally:
            spill.close()
        valid_hours = {int(h): int(n) for h, n in zip(manifest['valid_hours'], manifest['valid_hour_counts'])}
        old_hours = np.array(sorted(valid_hours), np.int64)
        for h, n in spill.valid_hours().items():
            valid_hours[h] = valid_hours.get(h, 0) + n
        median = _median_hour(valid_hours, window)
        if (data.implausible_mask(old_hours, median, window)
                != data.implausible_mask(old_hours, manifest['median_hour'], window)).any():
            raise CacheStale('the log grew, and its time window (around the median hour) moved past cached rows')
        old = Cache(directory, manifest, None)
        shards = _Shards(tmp, options, median, {c: int(v) for c, v in manifest['fingerprint_sums'].items()},
                         dict(zip(manifest['hours'], manifest['hour_counts'])))
        for k in _shard_range(n_shards, 'updating event cache shards', progress):
            new = spill.take(k)
            if len(new['row']):
                entry = manifest['shards'][k]
                compact = len(entry.get('parts', [])) + 1 >= MAX_PARTS     # one file again ('row' read too)
                shards.add(k, new, old._columns([k], COLUMNS if compact else data.EVENT_COLUMNS), entry, directory,
                           compact)
            else:
                shards.keep(directory, manifest['shards'][k])
        rep = manifest['report']
        skipped = dict(rep['skipped'])
        for r, n in info.skipped.items():
            skipped[r] = skipped.get(r, 0) + n
        updated = shards.manifest(info, options, source, new_content, n_shards, spill.row, valid_hours,
                                  rep['rows_read'] + info.rows_read, skipped, old_dup=rep['duplicate_rows'],
                                  slow_path=rep['slow_path'] or info.slow_path)
        updated['build_seconds'] = manifest.get('build_seconds')
        updated['update_seconds'] = round(time.perf_counter() - t0, 2)
        return _land(tmp, directory, updated, log_path, options, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def vocab_fingerprint(sums: dict, rows: int) -> str:
    """Fingerprint of what a vocabulary is fitted from - the multisets of item ids, category ids and hours
    (Vocab.fit of equal multisets is equal) - from the per-column multiset hashes added over the shards."""
    return hashlib.sha256(json.dumps([rows, sums['item_id'], sums['category_id'], sums['hour']]).encode()).hexdigest()


def _swap_in(tmp: Path, directory: Path) -> bool:
    """Replace `directory` by `tmp` with renames: a reader sees the old folder or the new one, whole. False when
    another process put its own new cache there between the two renames (ours is then dropped)."""
    old = directory.with_name(f'.{directory.name}.old-{os.getpid()}')
    shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(directory, old)
    except FileNotFoundError:
        old = None
    try:
        os.rename(tmp, directory)
        return True
    except OSError:                                # a non-empty folder is there again: another build won
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
