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
    manifest.json             written last: source file (size, mtime_ns), the options that change the content,
                              reader version, counts, the LoadReport, hour histogram, the vocabulary
                              fingerprint (an order-free hash of the item, category and hour columns: what
                              Vocab.fit reads) and every shard's size and SHA-256
A build writes into a temporary folder and renames it into place, so a reader sees the old cache or the new
one, never half of one; a cache whose manifest is missing or unreadable, whose log or options changed, or
whose shard is missing, torn or altered (size, checksum) is rebuilt with a one-line reason, never read.
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

CACHE_VERSION = 1                  # bump when the cached content or its layout changes: old caches are rebuilt
MANIFEST = 'manifest.json'
COLUMNS = data.EVENT_COLUMNS + ['row']
DTYPES = {**data.EVENT_DTYPES, 'row': np.int64}
SHARD_SOURCE_BYTES = 64 << 20      # default: one shard per 64 MiB of CSV (~1.5M rows; a .gz counts 4x its size)
MIN_SHARDS = 8                     # ... and at least this many, so 8 ranks can each take a share
COMPRESSION = 'zstd'               # Parquet codec of the shards (measured on 8.7M rows, one row group a shard, with
                                   # dictionary encoding: zstd 0.33 s / 86 MB, lz4 0.24 s / 127 MB, none 0.29 s / 179 MB)


class CacheStale(Exception):
    """Why a cache folder cannot be used as it is (the message is the reason printed before the rebuild)."""


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
            table = pq.read_table(self.directory / self.manifest['shards'][k]['file'], columns=columns)
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
            manifest = check(directory, path, options, n_shards, verify)
            report = data.LoadReport(**{**manifest['report'], 'seconds': time.perf_counter() - t0})
            log(f'event cache: reusing {directory} ({manifest["n_shards"]} shards, {manifest["rows"]:,} rows, '
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
    if manifest.get('source') != src:
        old = manifest.get('source') or {}
        raise CacheStale(f'the log changed (size {old.get("size")} -> {src["size"]}, mtime_ns {old.get("mtime_ns")} '
                         f'-> {src["mtime_ns"]})')
    changed = [f'{k} {manifest["options"].get(k)!r} -> {v!r}' for k, v in options.items()
               if manifest.get('options', {}).get(k) != v]
    if changed:
        raise CacheStale('built with other options (' + ', '.join(changed) + ')')
    if n_shards is not None and n_shards != manifest.get('n_shards'):
        raise CacheStale(f'built with {manifest.get("n_shards")} shards, {n_shards} asked for')
    if len(shards) != manifest.get('n_shards'):
        raise CacheStale('manifest lists the wrong number of shards')
    for s in shards:
        f = directory / s['file']
        if not f.is_file():
            raise CacheStale(f'shard {s["file"]} is missing')
        if f.stat().st_size != s['bytes']:
            raise CacheStale(f'shard {s["file"]} is torn ({f.stat().st_size} bytes, manifest says {s["bytes"]})')
        if verify and _sha256(f) != s['sha256']:
            raise CacheStale(f'shard {s["file"]} is damaged (SHA-256 differs from the manifest)')
    return manifest


def build(log_path: str, directory: Path, options: dict, n_shards: int, progress: bool = True) -> dict:
    """Parse the log once into n_shards Parquet files + manifest in `directory` (replaced atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    t0 = time.perf_counter()
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f'.{directory.name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # 1. stream: valid rows -> per-shard spill files (raw column bytes), hours -> a histogram
        source = _source(log_path)
        lo, hi = (int(v) for v in data.VALID_TIME)
        hist = np.zeros(hi - lo, np.int64)
        spill = [{c: open(tmp / f'spill-{k}.{c}', 'wb') for c in COLUMNS} for k in range(n_shards)]
        state = {'row': 0}

        def sink(chunk):
            if chunk is None:                      # the reader starts over on the slow path
                for files in spill:
                    for f in files.values():
                        f.seek(0)
                        f.truncate()
                hist[:] = 0
                state['row'] = 0
                return
            m = len(chunk['hour'])
            cols = {c: np.asarray(chunk[c], DTYPES[c]) for c in data.EVENT_COLUMNS}
            cols['row'] = np.arange(state['row'], state['row'] + m, dtype=np.int64)
            state['row'] += m
            hist[:] += np.bincount(cols['hour'] - lo, minlength=hi - lo)
            shard = shard_of_users(cols['user_id'], n_shards)
            order = np.argsort(shard, kind='stable')
            bounds = np.searchsorted(shard[order], np.arange(n_shards + 1))
            for c in COLUMNS:
                a = cols[c][order]
                for k in range(n_shards):
                    if bounds[k + 1] > bounds[k]:
                        spill[k][c].write(a[bounds[k]:bounds[k + 1]].data)

        try:
            info = data.stream_events(log_path, sink, data_format=options['data_format'], strict=options['strict'],
                                      progress=progress)
        finally:
            for files in spill:
                for f in files.values():
                    f.close()
        # 2. per shard: the time window (median of the histogram), duplicates, Parquet
        window = options['time_window_days']
        nz = np.flatnonzero(hist)
        median = int(data.median_from_counts(nz + lo, hist[nz])) if window and len(nz) else 0
        del hist
        n_far = n_dup = 0
        first_far = None                           # strict: (row, hour) of the earliest event outside the window
        final_hist: dict[int, int] = {}
        fingerprint = {'item_id': 0, 'category_id': 0, 'hour': 0}
        shards = []
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n_shards, desc='writing event cache shards', unit='shard', file=sys.stderr, leave=False)
        for k in range(n_shards):
            cols = {c: np.fromfile(tmp / f'spill-{k}.{c}', dtype=DTYPES[c]) for c in COLUMNS}
            for c in COLUMNS:
                os.remove(tmp / f'spill-{k}.{c}')
            far = data.implausible_mask(cols['hour'], median, window)
            if far.any():
                n_far += int(far.sum())
                i = int(np.flatnonzero(far)[0])
                if first_far is None or cols['row'][i] < first_far[0]:
                    first_far = (int(cols['row'][i]), int(cols['hour'][i]))
                cols = {c: a[~far] for c, a in cols.items()}
            if options['strict'] and first_far is not None:
                continue                           # the build fails below: keep looking for the earliest
            dup = data.duplicate_mask(pd.DataFrame({c: cols[c] for c in data.EVENT_COLUMNS}))
            n_dup += int(dup.sum())
            if options['dedupe'] and dup.any():
                cols = {c: a[~dup] for c, a in cols.items()}
            for c in fingerprint:
                fingerprint[c] = (fingerprint[c] + _multiset_hash(cols[c])) % 2 ** 64
            hours, per_hour = np.unique(cols['hour'], return_counts=True)
            for h, n in zip(hours.tolist(), per_hour.tolist()):
                final_hist[h] = final_hist.get(h, 0) + n
            name = f'shard-{k:05d}.parquet'
            pq.write_table(pa.table({c: cols[c] for c in COLUMNS}), tmp / name, compression=COMPRESSION,
                           row_group_size=max(1, len(cols['row'])))   # one row group: one chunk a column, read ~1.7x faster
            shards.append({'file': name, 'rows': int(len(cols['row'])), 'users': int(len(np.unique(cols['user_id']))),
                           'bytes': (tmp / name).stat().st_size, 'sha256': _sha256(tmp / name)})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        fmt = info.format
        if first_far is not None and options['strict']:
            row, hour = first_far                  # strict kept every data row: row i is line header + i + 1
            raise data.implausible_error(info.path, fmt, int(info.has_header) + row + 1, hour, median, window)
        skipped = dict(info.skipped)
        if n_far:
            skipped['time implausible'] = skipped.get('time implausible', 0) + n_far
        rows_kept = sum(s['rows'] for s in shards)
        if rows_kept == 0:
            raise data.DataError(f'{info.path}: no valid rows among {info.rows_read:,} (skipped: {skipped}); '
                                 f'expected {data._EXPECTED[fmt]}')
        report = data.LoadReport(path=info.path, format=fmt, rows_read=info.rows_read, rows_kept=rows_kept,
                                 skipped=skipped, duplicate_rows=n_dup,
                                 duplicates_dropped=n_dup if options['dedupe'] else 0, slow_path=info.slow_path)
        hours = sorted(final_hist)
        manifest = {
            'version': CACHE_VERSION, 'source': source, 'options': options, 'n_shards': n_shards,
            'rows': rows_kept, 'users': sum(s['users'] for s in shards), 'bytes': sum(s['bytes'] for s in shards),
            'report': {k: v for k, v in asdict(report).items() if k != 'seconds'},
            'vocab_fingerprint': vocab_fingerprint(fingerprint, rows_kept),
            'hours': hours, 'hour_counts': [final_hist[h] for h in hours],
            'build_seconds': round(time.perf_counter() - t0, 2), 'shard_hash': 'splitmix64(user_id) % n_shards',
            'shards': shards,
        }
        with open(tmp / MANIFEST, 'w') as f:       # last: without it the folder is no cache
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if not _swap_in(tmp, directory):           # another process's build of the same log landed first
            return check(directory, log_path, options, None, verify=True)
        return manifest
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
