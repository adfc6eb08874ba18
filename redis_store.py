"""Publish user vectors to Redis (or Valkey) and read them back: connect, publish, read_meta, get_vectors.

This module knows ids and float32 vectors only (numpy + redis-py + orjson; no torch). It decides the
keys and the bookkeeping; `redis_writer` encodes the values and writes them pipelined, and
`redis_servers` runs the bundled valkey server (and throw-away test servers and clusters).

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
  `__meta__` is written after the last key is acknowledged, so during a publish, and after an
  interrupted one, it still describes the previous completed publish while some keys already hold
  new vectors: there it is stale, and re-running the publish completes the keys and updates it.
- 'versioned' writes the new vectors under new keys and switches `__current__` in one step at the
  end; the previous set's keys get an expiry (`grace_s`, 1 h by default) so a reader that read
  the pointer just before the switch still finds them. A reader that resolves the pointer once per
  read (`get_vector`, `get_vectors`, or GET `__current__` then GET `v:<id>:<user_id>`) never sees
  two models mixed. Costs twice the memory during the grace period.

A publish can be written in parts by several processes (train.py under torchrun): one calls `begin`
(ownership check, registration) and shares the returned `PublishPlan`, each writes its own users with
`write_part`, and once every part is acknowledged one calls `finish` (metadata, pointer switch,
retiring). `publish` is the same three steps in one process.

Safety rules: no FLUSHDB, no DEL of vectors; only keys under `prefix` that this tool wrote ever get
an expiry (the publish ids recorded in `__versions__`, matched by their `v:<publish_id>:` pattern).
A publish is idempotent: re-running it after a failure completes it.

Redis Cluster (`connect('redis+cluster://host:port')`, any one node; a `redis.cluster.RedisCluster`):
the same keys and values, spread over the primaries by hash slot (a `{...}` hash tag in `prefix`
would put every key in one slot, on one node). `redis_writer` sends each key to the primary that owns
its slot (a cluster refuses multi-key commands across slots) and follows MOVED/ASK when a slot moved
meanwhile. There is no MULTI across slots, so the versioned switch runs in this order: every
vector key acknowledged by its primary, `v:<id>:__meta__` marked complete, `__current__` set (the
switch), then `__meta__`; `get_vectors` reads `__meta__` before `__current__`. A reader never sees
a pointer to a set that is not all written, as long as it reads from primaries (redis-py's default;
replicas are updated asynchronously). Retiring a version SCANs every primary. A plain redis:// URL
naming a cluster node is refused with a pointer to the cluster URL. Read from a cluster with
`RedisCluster.from_url('redis://host:port').get(key)`.
"""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import AskError, RedisClusterException, RedisError, ResponseError
from redis.retry import Retry
from tqdm import tqdm

import redis_writer

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
    host = parts.netloc.rsplit('@', 1)[1]  # verbatim: parts.port raises on a bad port
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
            vectors_path: str | None = None, republish_hint: str | None = None,
            retry_hint: bool = True) -> redis.Redis | RedisCluster:
    """Open a client for `url` and check it answers within `timeout` seconds.

    Args:
        url: `redis://[[user]:password@]host:port[/db]`, `rediss://...` (TLS), `unix://path`, or
            `redis+cluster://[[user]:password@]host:port[/0]` / `rediss+cluster://...` for a Redis
            Cluster (any one node; the others are discovered). A plain URL naming a cluster node
            is refused with a message pointing to the cluster URL.
        timeout: connect and PING timeout in seconds.
        socket_timeout: read/write timeout of the returned client (large batches need some).
        vectors_path, republish_hint: put into the error message so a user knows what to do.
        retry_hint: end the error message with how to re-publish (off for a check before any work).

    Returns:
        `redis.Redis`, or `redis.cluster.RedisCluster` for a cluster URL.

    Raises:
        RedisExportError: bad URL, unreachable server, failed authentication, a cluster that is
            down or not a cluster, a plain URL naming a cluster node.
    """
    scheme = url.split('://', 1)[0].lower() if '://' in url else ''
    safe = safe_url(url)
    ctx = {'vectors_path': vectors_path, 'republish_hint': republish_hint, 'retry_hint': retry_hint}
    if scheme in ('redis+cluster', 'rediss+cluster'):
        return _connect_cluster(url, timeout, socket_timeout, ctx)
    if scheme not in ('redis', 'rediss', 'unix'):
        raise _failure(f'invalid Redis URL {safe!r}: expected redis://[:password@]host:port[/db], '
                       'rediss://... for TLS, unix:///path/to/socket, or redis+cluster://host:port '
                       'for a Redis Cluster', **ctx)
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
        cluster_node = _cluster_enabled(probe)
    except (redis.AuthenticationError, ResponseError) as e:
        if not _is_auth_error(e):
            raise _failure(f'Redis at {safe} answered PING with an error: {e}', **ctx) from e
        raise _auth_failure(url, safe, e, ctx) from e
    except (RedisError, OSError) as e:
        raise _failure(f'cannot reach Redis at {safe} ({type(e).__name__}: {e})', **ctx) from e
    finally:
        probe.close()
    if cluster_node:
        # A plain client would be answered MOVED for every key another node owns, mid-publish.
        client.close()
        raise _failure(f'Redis at {safe} is a Redis Cluster node (cluster_enabled:1); connect with '
                       f'{_cluster_url(safe)} so each key goes to the node that owns its slot', **ctx)
    return client


def preflight(url: str, *, timeout: float = 3.0) -> None:
    """Check, before any long work, that publishing to `url` can succeed: the URL parses, the server (or
    every cluster node) answers and accepts the URL's credentials. An empty URL means the local default
    port, where the bundled server is started when nothing answers: only a server there that wants a
    password is an error. Raises RedisExportError saying what is wrong."""
    if not url:
        if ping_state('127.0.0.1', DEFAULT_PORT) == 'auth':
            raise _failure(f'the Redis on 127.0.0.1:{DEFAULT_PORT} (used when --redis_url is empty) needs a '
                           f'password; pass it in the URL: redis://:PASSWORD@127.0.0.1:{DEFAULT_PORT}/0',
                           retry_hint=False)
        return
    connect(url, timeout=timeout, socket_timeout=timeout, retry_hint=False).close()


def ping_state(host: str, port: int, timeout: float = 1.0) -> str:
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


def _cluster_enabled(client: redis.Redis) -> bool:
    """Whether the server is a Redis Cluster node (False when INFO is not allowed)."""
    try:
        return str(client.info('cluster').get('cluster_enabled', '0')) == '1'
    except ResponseError:  # e.g. an ACL without INFO, or a proxy that hides it
        return False


def plain_url(url: str) -> str:
    """redis+cluster://... -> redis://... (rediss+cluster -> rediss): the scheme redis-py's clients
    parse; `redis.cluster.RedisCluster.from_url` takes it for a cluster. Other URLs are returned as is."""
    return re.sub(r'(?i)^(rediss?)[+]cluster(?=://)', r'\1', url)


def _cluster_url(url: str) -> str:
    """redis://host:port/db -> redis+cluster://host:port (a cluster has database 0 only)."""
    parts = urlsplit(url)
    scheme = 'rediss+cluster' if parts.scheme.lower() == 'rediss' else 'redis+cluster'
    return urlunsplit(parts._replace(scheme=scheme, path=''))


def _is_auth_error(e: BaseException) -> bool:
    return isinstance(e, redis.AuthenticationError) or bool(re.match(r'(NOAUTH|WRONGPASS)', str(e)))


def _auth_failure(url: str, safe: str, e: BaseException, ctx: dict) -> RedisExportError:
    what = ('refused the credentials in the URL' if urlsplit(url).password is not None
            else 'needs a password')
    example = ('redis+cluster://:PASSWORD@host:port' if '+cluster' in safe
               else 'redis://:PASSWORD@host:port/0')
    return _failure(f'Redis at {safe} {what} ({e}); put the password in the URL: {example} '
                    '(or USER:PASSWORD@...)', **ctx)


def _cause_chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _connect_cluster(url: str, timeout: float, socket_timeout: float, ctx: dict) -> RedisCluster:
    """`connect` for redis+cluster:// and rediss+cluster:// URLs: a `RedisCluster` client, once
    every node answers and reports `cluster_state:ok`."""
    safe = safe_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise _failure(f'invalid Redis Cluster URL {safe!r}: {e}', **ctx) from e
    if not parts.hostname:
        raise _failure(f'invalid Redis Cluster URL {safe!r}: expected redis+cluster://[:password@]host:port',
                       **ctx)
    if parts.path not in ('', '/', '/0'):
        raise _failure(f'invalid Redis Cluster URL {safe!r}: a cluster has database 0 only '
                       f'(drop {parts.path!r})', **ctx)
    # redis-py's parser knows redis:// and rediss://; the cluster is chosen by the client class.
    plain = urlunsplit(urlsplit(plain_url(url))._replace(path=''))
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), DEFAULT_RETRIES)
    probe = None
    try:
        # The constructor already connects: CLUSTER SLOTS from the URL's node, then every node.
        probe = RedisCluster.from_url(plain, socket_connect_timeout=timeout, socket_timeout=timeout,
                                      retry=Retry(NoBackoff(), 0))
        for node in probe.get_nodes():
            try:
                state = probe.cluster_info(target_nodes=node).get('cluster_state')
            except (RedisError, OSError) as e:
                raise _failure(f'cannot reach node {node.name} of the Redis Cluster at {safe} '
                               f'({type(e).__name__}: {e})', **ctx) from e
            if state != 'ok':
                raise _failure(f'the Redis Cluster at {safe} is down: node {node.name} reports '
                               f'cluster_state:{state} (a node failed, or slots are not all served)',
                               **ctx)
        client = RedisCluster.from_url(plain, socket_connect_timeout=timeout,
                                       socket_timeout=socket_timeout, retry=retry)
    except RedisExportError:
        raise
    except (ValueError, TypeError) as e:
        raise _failure(f'invalid Redis Cluster URL {safe!r}: {e}', **ctx) from e
    except (RedisClusterException, RedisError, OSError) as e:
        causes = list(_cause_chain(e))
        if any(_is_auth_error(c) for c in causes):
            raise _auth_failure(url, safe, e, ctx) from e
        text = str(e)
        if 'Cluster mode is not enabled' in text:
            single = plain_url(safe)
            raise _failure(f'Redis at {safe} is not a Redis Cluster (cluster support is disabled on '
                           f'that server); use {single} for a single server', **ctx) from e
        if 'slots are not covered' in text:
            raise _failure(f'the Redis Cluster at {safe} is down: not every hash slot is served '
                           f'({text})', **ctx) from e
        raise _failure(f'cannot reach the Redis Cluster at {safe} ({type(causes[-1]).__name__}: '
                       f'{causes[-1]})', **ctx) from e
    finally:
        if probe is not None:
            probe.close()
    return client


# ----------------------------------------------------------------------------- publishing


def _check_options(fmt, layout, version, ttl) -> None:
    """What `begin` decides with: checked before it writes anything."""
    if fmt not in FORMATS:
        raise ValueError(f'fmt must be one of {FORMATS}, got {fmt!r}')
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f'version must be 1-128 characters from [A-Za-z0-9._-], got {version!r}')
    if ttl is not None and (int(ttl) != ttl or ttl <= 0):
        raise ValueError(f'ttl must be a positive number of seconds or None, got {ttl!r}')


def _check_sizes(batch_size, grace_s) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    if grace_s <= 0:
        raise ValueError(f'grace_s must be positive, got {grace_s!r}')


def prepare(user_ids, vectors, fmt: str = 'json', *, allow_empty: bool = False) -> tuple[list[str], np.ndarray, str]:
    """Check one set (or, sharded, one writer's part) of vectors before anything is written.

    Returns (ids as strings, float32 vectors, content fingerprint). A sharded publish combines the parts'
    fingerprints with `combine_fingerprints`. Raises ValueError.
    """
    if fmt not in FORMATS:
        raise ValueError(f'fmt must be one of {FORMATS}, got {fmt!r}')
    vectors = np.ascontiguousarray(vectors, dtype='<f4')  # (N, D)
    if vectors.ndim != 2:
        raise ValueError(f'vectors must be 2-D (N, D), got shape {vectors.shape}')
    ids = _id_strings(user_ids)
    if len(ids) != len(vectors):
        raise ValueError(f'{len(ids)} user ids but {len(vectors)} vectors')
    if not ids and not allow_empty:  # a versioned switch to an empty set would hide every user's vector
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
    return ids, vectors, _fingerprint(ids, vectors, fmt)


def _fingerprint(ids: list[str], vectors: np.ndarray, fmt: str) -> str:
    """Content hash of one publish: names its versioned keys, so two different vector sets never
    share keys (readers of a live set never see it change) and a re-run finds its own keys."""
    h = hashlib.sha256()  # hardware-accelerated on most CPUs: ~2 GB/s
    h.update(f'{fmt}:{vectors.shape}'.encode())
    h.update('\n'.join(ids).encode())
    h.update(memoryview(vectors).cast('B'))
    return h.hexdigest()[:32]


def combine_fingerprints(parts: list[str]) -> str:
    """The fingerprint of a publish written in parts, in writer order; one part is its own fingerprint,
    so a single writer names its keys exactly as `publish` does."""
    if len(parts) == 1:
        return parts[0]
    return hashlib.sha256(':'.join(parts).encode()).hexdigest()[:32]


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


@contextmanager
def _explained(client, *, written: Callable[[], int] | None = None, total: int | None = None, **ctx):
    """Redis failures inside as one RedisExportError saying what was written and how to re-publish."""
    counts = {}
    try:
        yield
    except RedisExportError as e:
        raise _failure(f'Redis publish refused: {e}', retry_hint=False, **ctx) from e
    except (RedisError, RedisClusterException, OSError) as e:
        if written is not None:
            counts = {'written': written(), 'total': total}
        if isinstance(e, AskError) and not isinstance(client, RedisCluster):
            # A plain client given a cluster node (connect() refuses those URLs): every key another
            # node owns is answered MOVED.
            raise _failure(f'Redis publish failed: the server is a Redis Cluster node ({type(e).__name__}: '
                           f'{e}); connect with a redis+cluster://host:port URL', **counts, **ctx) from e
        raise _failure(f'Redis publish failed ({type(e).__name__}: {e})', **counts, **ctx) from e


class PublishPlan(NamedTuple):
    """One publish as `begin` decided it: what every writer of its parts and `finish` need (picklable,
    so one process can begin a sharded publish and send the plan to the others)."""

    prefix: str
    fmt: str
    layout: str
    version: str
    ttl: int | None
    publish_id: str | None  # versioned layout: the key namespace of this set
    key_prefix: str  # what precedes every user id
    meta: dict  # the metadata recorded when the publish completes
    retire: list[str]  # publish ids this tool wrote before, given an expiry by `finish`
    old_pointer: str | None  # the pointer a plain publish makes obsolete


def publish(client, user_ids, vectors, *, prefix: str = '', fmt: str = 'json',
            layout: str = 'plain', version: str, ttl: int | None = None,
            batch_size: int = DEFAULT_BATCH, progress: bool = True, vectors_path: str | None = None,
            republish_hint: str | None = None, grace_s: int = DEFAULT_GRACE_S,
            extra_meta: dict | None = None, retries: int = DEFAULT_RETRIES,
            on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Write one vector per user, pipelined, and record the metadata (see the module docstring).

    The steps, for one writer: `prepare` (check), `begin` (ownership, registration), `write_part`,
    `finish` (metadata, pointer switch, retiring). Several processes publishing one set in parts
    (train.py under torchrun) run the same steps: one begins, every one writes its part, one finishes.

    Args:
        client: a `redis.Redis` or `redis.cluster.RedisCluster` (e.g. from `connect`).
        user_ids: (N,) raw user ids (integers or strings); key = prefix + str(id).
        vectors: (N, D) float32 (other float dtypes are cast), all finite.
        prefix: namespace put in front of every key.
        fmt: 'json' (list of floats) or 'f32' (raw little-endian float32 bytes).
        layout: 'plain' (key = prefix + id) or 'versioned' (versioned keys + pointer switch).
        version: model version recorded in the metadata and leading the versioned publish id;
            1-128 characters from [A-Za-z0-9._-].
        ttl: expiry in seconds of every vector key (None: no expiry).
        batch_size: vectors per pipelined batch (on a cluster: per batch to one primary).
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
    _check_options(fmt, layout, version, ttl)  # all arguments before the vectors, as before the split
    _check_sizes(batch_size, grace_s)
    ids, vectors, fingerprint = prepare(user_ids, vectors, fmt)
    ctx = {'vectors_path': vectors_path, 'republish_hint': republish_hint}
    t0 = time.perf_counter()
    plan = begin(client, prefix=prefix, fmt=fmt, layout=layout, version=version, ttl=ttl,
                 fingerprint=fingerprint, count=len(ids), dim=vectors.shape[1], extra_meta=extra_meta, **ctx)
    write_part(client, plan, ids, vectors, batch_size=batch_size, retries=retries, progress=progress,
               on_batch=on_batch, **ctx)
    summary = finish(client, plan, batch_size=batch_size, grace_s=grace_s, **ctx)
    seconds = time.perf_counter() - t0
    summary.update(seconds=round(seconds, 3), vectors_per_s=round(len(ids) / seconds, 1) if seconds else None)
    return summary


def begin(client, *, prefix: str = '', fmt: str = 'json', layout: str = 'plain', version: str,
          ttl: int | None = None, fingerprint: str, count: int, dim: int, extra_meta: dict | None = None,
          vectors_path: str | None = None, republish_hint: str | None = None) -> PublishPlan:
    """Check that the bookkeeping keys are this tool's, and (versioned) register the new set before any of
    its keys is written, so a failed publish is retired by a later one. Raises RedisExportError."""
    _check_options(fmt, layout, version, ttl)
    names = _names(prefix)
    with _explained(client, vectors_path=vectors_path, republish_hint=republish_hint):
        old_meta, versions, pointer = _check_ownership(client, names)
        versioned = layout == 'versioned'
        publish_id = f'{version}.{fingerprint[:10]}' if versioned else None
        key_prefix = _version_prefix(prefix, publish_id) if versioned else prefix
        meta = {
            'writer': WRITER, 'schema': SCHEMA, 'layout': layout, 'format': fmt, 'dim': dim,
            'dtype': 'float32' if fmt == 'json' else 'float32 little-endian', 'count': count,
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
    return PublishPlan(prefix, fmt, layout, version, ttl, publish_id, key_prefix, meta,
                       sorted(v for v in versions if v != publish_id), None if versioned else pointer)


def write_part(client, plan: PublishPlan, ids: list[str], vectors: np.ndarray, *,
               batch_size: int = DEFAULT_BATCH, retries: int = DEFAULT_RETRIES, progress: bool = True,
               on_batch: Callable[[int, int], None] | None = None, vectors_path: str | None = None,
               republish_hint: str | None = None) -> int:
    """Write the keys of `ids` (from `prepare`) under the plan; returns how many were acknowledged.
    Raises RedisExportError saying how many were written before a failure."""
    total = len(ids)
    written = 0
    bar = tqdm(total=total, unit='vec', unit_scale=True, desc=f'redis {plan.layout}/{plan.fmt}',
               disable=not progress)

    def on_ack(n: int) -> None:
        nonlocal written
        written += n
        bar.update(n)
        if on_batch is not None:
            on_batch(written, total)

    prefix_b = plan.key_prefix.encode()
    keys = [prefix_b + i.encode() for i in ids]
    try:
        with _explained(client, written=lambda: written, total=total, vectors_path=vectors_path,
                        republish_hint=republish_hint):
            if keys:
                redis_writer.write(client, keys, vectors, plan.fmt, int(batch_size), plan.ttl, retries, on_ack)
    finally:
        bar.close()
    return written


def finish(client, plan: PublishPlan, *, batch_size: int = DEFAULT_BATCH, grace_s: int = DEFAULT_GRACE_S,
           vectors_path: str | None = None, republish_hint: str | None = None) -> dict:
    """Once every part is acknowledged: record the metadata, switch the pointer (versioned), and retire
    what this tool wrote before and no longer serves (old versions, and a pointer a plain publish made
    obsolete): they expire after `grace_s`; nothing is deleted. Returns the summary (see `publish`)."""
    names = _names(plan.prefix)
    meta = {**plan.meta, 'state': 'complete',
            'published_at': datetime.now(timezone.utc).isoformat(timespec='seconds')}
    meta_json = orjson.dumps(meta)
    retired_keys = 0
    count = plan.meta['count']
    with _explained(client, written=lambda: count, total=count, vectors_path=vectors_path,
                    republish_hint=republish_hint):
        if plan.layout == 'versioned':
            client.set(plan.key_prefix + META_KEY, meta_json)
            _switch_pointer(client, names, plan.publish_id, meta_json)
        else:
            client.set(names['meta'], meta_json)
        lt = _server_major(client) >= 7
        for old in plan.retire:
            retired_keys += _expire_version(client, plan.prefix, old, int(grace_s), int(batch_size), lt)
            client.srem(names['versions'], old)
        if plan.old_pointer is not None:
            client.expire(names['pointer'], int(grace_s), lt=lt)
    return {'layout': plan.layout, 'format': plan.fmt, 'version': plan.version, 'publish_id': plan.publish_id,
            'count': meta['count'], 'dim': meta['dim'],
            'key_pattern': meta['key_pattern'], 'meta_key': names['meta'],
            'pointer_key': meta['pointer_key'], 'retired_versions': list(plan.retire),
            'retired_keys': retired_keys}


def _switch_pointer(client, names: dict[str, str], publish_id: str, meta_json: bytes) -> None:
    """Make `publish_id` the live set, once all its keys and its `v:<id>:__meta__` are written.

    Readers resolve the set from the pointer alone, so the pointer's single SET is the atomic
    step. On one server the metadata changes with it (MULTI). A cluster has no MULTI across slots:
    there the pointer is set first and `__meta__` right after, and `get_vectors` reads `__meta__`
    before the pointer, so a reader that sees the new `__meta__` also sees the new pointer (the
    other way round, a reader could see a versioned `__meta__` with no pointer yet after a plain
    publish). For a moment `read_meta` may still return the previous publish's metadata.
    """
    if type(client) is redis.Redis:
        pipe = client.pipeline(transaction=True)
        pipe.set(names['pointer'], publish_id)
        pipe.set(names['meta'], meta_json)
        pipe.execute()
    else:
        client.set(names['pointer'], publish_id)
        client.set(names['meta'], meta_json)


# ----------------------------------------------------------------------------- reading


def read_meta(client, prefix: str = '') -> dict | None:
    """Metadata of the last completed publish under `prefix` (None when there is none)."""
    return _load_meta(client.get(prefix + META_KEY))


def get_vectors(client, user_ids, prefix: str = '', *, batch_size: int = DEFAULT_BATCH) -> VectorBatch:
    """Read many users' vectors, all from one model version.

    Plain layout: metadata, then the keys. Versioned layout: the pointer is read once, then every
    key of that version (its keys outlive a switch by the grace period), so the rows never mix two
    versions even while a republish runs. `client` may be a `RedisCluster` (keys read per slot).
    """
    ids = _id_strings(user_ids)
    names = _names(prefix)
    cluster = isinstance(client, RedisCluster)
    if cluster:  # two nodes: `__meta__` strictly before the pointer (see `_switch_pointer`)
        raw_meta = client.get(names['meta'])
        pointer = client.get(names['pointer'])
    else:  # one connection executes them in this order
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
        keys = [key_prefix + uid for uid in ids[start:start + batch_size]]
        if cluster:  # one MGET per slot, pipelined per node
            values = client.mget_nonatomic(keys)
        else:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            values = pipe.execute()
        rows.extend(_decode(v, fmt, dim) for v in values)
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


