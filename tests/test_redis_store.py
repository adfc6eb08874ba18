"""redis_store against real bundled valkey servers (no mocks): round trips with plain redis-py,
foreign keys, metadata, the versioned layout's no-mix guarantee, failures mid-publish."""

import json
import re
import threading
import time

import numpy as np
import pytest
import redis

import redis_servers
import redis_store as rs
import redis_writer
from redis_store import RedisExportError

HINT = 'python train.py --export_only --save_dir saved_models --redis_url URL'


def vectors(n, dim, seed):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def db_url(url, db):
    return f'{url}/{db}'


@pytest.fixture(scope='module')
def client(redis_server):
    return rs.connect(redis_server)


@pytest.fixture(scope='module')
def plain_r(redis_server):
    """A plain redis-py client, the way an online reader would make one."""
    return redis.Redis.from_url(redis_server)


def which_version(batch, candidates):
    """Label each row of a read with the candidate matrix it equals exactly. A consistent read
    gives one label; a read that mixes models gives several (or 'missing'/'unknown')."""
    labels = set()
    for i, row in enumerate(batch.vectors):
        if not batch.found[i]:
            labels.add('missing')
            continue
        hits = [name for name, m in candidates.items() if np.array_equal(row, m[i])]
        labels.add(hits[0] if len(hits) == 1 else 'unknown')
    return labels


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize('writer', ['resp', 'pipeline'])
@pytest.mark.parametrize('fmt', ['json', 'f32'])
def test_plain_round_trip_with_plain_redis_py(redis_server, fmt, writer, monkeypatch):
    if writer == 'pipeline':  # the generic writer a cluster client would use
        monkeypatch.setattr(redis_writer, '_uses_raw_resp', lambda c: False)
    db = 8 if fmt == 'json' else 9
    client = rs.connect(db_url(redis_server, db))
    r = redis.Redis.from_url(db_url(redis_server, db))
    ids = np.arange(10_000_000, 10_000_000 + 1234, dtype=np.int64)
    x = vectors(len(ids), 24, seed=1)
    summary = rs.publish(client, ids, x, fmt=fmt, version='m1', batch_size=100, progress=False)
    assert summary['count'] == len(ids) and summary['dim'] == 24 and summary['key_pattern'] == '{user_id}'
    for i, uid in enumerate(ids.tolist()):
        raw = r.get(str(uid))
        got = (np.array(json.loads(raw), dtype=np.float32) if fmt == 'json'
               else np.frombuffer(raw, '<f4'))
        np.testing.assert_array_equal(got, x[i])  # float32 survives the text round trip exactly
    batch = rs.get_vectors(client, ids)
    assert batch.found.all() and batch.version == 'm1'
    np.testing.assert_array_equal(batch.vectors, x)
    np.testing.assert_array_equal(rs.get_vector(client, int(ids[7])), x[7])
    assert rs.get_vector(client, 42) is None


@pytest.mark.parametrize('shape', [(0, 4), (1, 3), (3, 0), (257, 5)])
def test_encode_vectors_edge_shapes(shape):
    x = vectors(*shape, seed=16)
    for fmt in ('json', 'f32'):
        values = redis_writer.encode_vectors(x, fmt)
        assert len(values) == shape[0]
        for i, v in enumerate(values):
            got = np.array(json.loads(v), np.float32) if fmt == 'json' else np.frombuffer(v, '<f4')
            np.testing.assert_array_equal(got.reshape(-1), x[i])


def test_string_ids_prefix_and_metadata(client, plain_r):
    ids = np.array(['alice', 'bob', 'carol'])
    x = vectors(3, 8, seed=2)
    rs.publish(client, ids, x, prefix='rs-meta:', fmt='f32', version='2024-01-01.a',
               progress=False, extra_meta={'model': 'tiny'})
    np.testing.assert_array_equal(np.frombuffer(plain_r.get('rs-meta:bob'), '<f4'), x[1])
    meta = json.loads(plain_r.get('rs-meta:__meta__'))
    assert meta['writer'] == 'redis_store' and meta['state'] == 'complete'
    assert (meta['layout'], meta['format'], meta['dim'], meta['count']) == ('plain', 'f32', 8, 3)
    assert meta['version'] == '2024-01-01.a' and meta['key_pattern'] == 'rs-meta:{user_id}'
    assert meta['extra'] == {'model': 'tiny'} and meta['ttl'] is None
    assert re.match(r'\d{4}-\d\d-\d\dT', meta['published_at'])
    assert rs.read_meta(client, 'rs-meta:') == meta


def test_ttl(client, plain_r):
    ids = np.arange(50)
    rs.publish(client, ids, vectors(50, 4, 3), prefix='rs-ttl:', version='t1', ttl=120, progress=False)
    ttls = [plain_r.ttl(f'rs-ttl:{u}') for u in ids]
    assert all(0 < t <= 120 for t in ttls)
    s = rs.publish(client, ids, vectors(50, 4, 3), prefix='rs-ttlv:', layout='versioned',
                   version='t1', ttl=60, progress=False)
    assert 0 < plain_r.ttl(s['key_pattern'].format(user_id=7)) <= 60
    assert plain_r.ttl('rs-ttlv:__current__') == -1  # the pointer itself never expires


def test_bad_input_is_rejected_before_writing(client, plain_r):
    x = vectors(3, 4, 4)
    bad = x.copy()
    bad[1, 2] = np.nan
    cases = [
        dict(user_ids=[1, 2, 3], vectors=bad, version='a'),
        dict(user_ids=[1, 1, 3], vectors=x, version='a'),
        dict(user_ids=[1, 2], vectors=x, version='a'),
        dict(user_ids=[1, 2, 3], vectors=x, version='has space'),
        dict(user_ids=[1, 2, 3], vectors=x, version='a', fmt='npy'),
        dict(user_ids=[1, 2, 3], vectors=x, version='a', layout='fancy'),
        dict(user_ids=[1, 2, 3], vectors=x, version='a', ttl=0),
        dict(user_ids=[], vectors=np.zeros((0, 4), np.float32), version='a', layout='versioned'),
    ]
    for kwargs in cases:
        with pytest.raises(ValueError):
            rs.publish(client, prefix='rs-bad:', progress=False, **kwargs)
    assert plain_r.keys('rs-bad:*') == []


# ----------------------------------------------------------------------------- foreign keys


def test_foreign_keys_survive_publish_and_republish(redis_server):
    url = db_url(redis_server, 10)
    r = redis.Redis.from_url(url)
    client = rs.connect(url)
    r.flushdb()  # the test's own database (the tool itself never flushes)
    r.mset({'1': 'raw id 1', '2': 'raw id 2', '17': 'raw id 17',           # ids without our prefix
            'other:1': 'x', 'other:17': 'y', 'v:v1:1': 'unprefixed versioned look-alike',
            'rs-fk:v:foreign:1': 'our namespace, a version we never wrote',
            'rs-fk:999999': 'an id we do not publish', 'current': 'z', 'meta': 'w'})
    r.hset('session:abc', mapping={'a': 1})
    r.rpush('queue', 'job1', 'job2')
    rng = np.random.default_rng(5)
    for _ in range(20):
        r.set(rng.bytes(12), rng.bytes(30))
    foreign = {k: r.dump(k) for k in r.keys('*')}

    ids = np.arange(1, 300)
    steps = [('plain', 'json', 'p1'), ('versioned', 'json', 'v1'), ('versioned', 'f32', 'v2'),
             ('plain', 'f32', 'p2'), ('versioned', 'json', 'v3'), ('versioned', 'json', 'v3')]
    for layout, fmt, version in steps:  # the last step re-runs the one before it
        x = vectors(len(ids), 6, seed=int(version[1:]) + 10 * (layout == 'plain'))
        rs.publish(client, ids, x, prefix='rs-fk:', layout=layout, fmt=fmt,
                   version=version, batch_size=64, grace_s=600, progress=False)
        for k, dumped in foreign.items():
            assert r.dump(k) == dumped, k
            assert r.ttl(k) == -1, k
        ours = {k for k in r.keys('*') if k not in foreign}
        assert all(k.startswith(b'rs-fk:') for k in ours)
    assert rs.get_vectors(client, ids, 'rs-fk:').version == 'v3'


def test_foreign_bookkeeping_keys_are_refused(client, plain_r):
    plain_r.set('rs-own:__meta__', 'somebody else\'s config')
    plain_r.set('rs-own2:__current__', 'blue')
    plain_r.set('rs-own3:__versions__', 'a string')
    ids, x = np.arange(5), vectors(5, 4, 6)
    for prefix, layout in [('rs-own:', 'plain'), ('rs-own2:', 'versioned'), ('rs-own3:', 'versioned')]:
        with pytest.raises(RedisExportError, match='not written by this tool'):
            rs.publish(client, ids, x, prefix=prefix, layout=layout, version='a', progress=False)
    assert plain_r.get('rs-own:__meta__') == b"somebody else's config"
    assert plain_r.get('rs-own2:__current__') == b'blue'
    assert plain_r.keys('rs-own*:[0-9]*') == [] and plain_r.keys('rs-own*:v:*') == []


# ----------------------------------------------------------------------------- versioned layout


def test_versioned_switch_expires_old_version(client, plain_r):
    ids = np.arange(100, 400)
    a, b = vectors(300, 8, 7), vectors(300, 8, 8)
    sa = rs.publish(client, ids, a, prefix='rs-ver:', layout='versioned', version='M1', progress=False)
    pa = sa['publish_id']
    assert pa.startswith('M1.') and sa['key_pattern'] == f'rs-ver:v:{pa}:{{user_id}}'
    assert plain_r.get('rs-ver:__current__') == pa.encode()
    live = plain_r.get('rs-ver:__current__').decode()  # a reader resolves the pointer ...
    # Same model, other vectors (a daily refresh with --export_only): new keys, then the switch.
    sb = rs.publish(client, ids, b, prefix='rs-ver:', layout='versioned', version='M1', grace_s=900,
                    progress=False)
    pb = sb['publish_id']
    assert pb != pa and sb['retired_versions'] == [pa] and sb['retired_keys'] == 301  # + its meta
    # ... and reads after the switch: the old set is still whole, for the grace period.
    for i, uid in enumerate(ids.tolist()):
        np.testing.assert_array_equal(
            np.array(json.loads(plain_r.get(f'rs-ver:v:{live}:{uid}')), np.float32), a[i])
    assert plain_r.get('rs-ver:__current__') == pb.encode()
    assert all(0 < plain_r.ttl(f'rs-ver:v:{pa}:{u}') <= 900 for u in ids)
    assert all(plain_r.ttl(f'rs-ver:v:{pb}:{u}') == -1 for u in ids)
    assert plain_r.smembers('rs-ver:__versions__') == {pb.encode()}
    assert json.loads(plain_r.get(f'rs-ver:v:{pb}:__meta__'))['state'] == 'complete'
    batch = rs.get_vectors(client, ids, 'rs-ver:')
    assert (batch.version, batch.publish_id) == ('M1', pb)
    np.testing.assert_array_equal(batch.vectors, b)
    # Re-running the same publish reuses its keys and retires nothing.
    again = rs.publish(client, ids, b, prefix='rs-ver:', layout='versioned', version='M1',
                       progress=False)
    assert again['publish_id'] == pb and again['retired_versions'] == []
    np.testing.assert_array_equal(rs.get_vectors(client, ids, 'rs-ver:').vectors, b)


@pytest.mark.parametrize('layout', ['plain', 'versioned'])
def test_readers_never_see_two_models_mixed(redis_server, layout):
    """Reads during a republish, at every batch boundary (deterministic) and from a thread that
    loops meanwhile. The plain layout is the control: there the same check must see a mix."""
    prefix = f'rs-mix-{layout}:'
    writer = rs.connect(redis_server)
    reader = rs.connect(redis_server)
    ids = np.arange(2000)
    old, new = vectors(2000, 8, 9), vectors(2000, 8, 10)
    candidates = {'old': old, 'new': new}
    rs.publish(writer, ids, old, prefix=prefix, layout=layout, version='old', progress=False)
    at_batches = []
    rs.publish(writer, ids, new, prefix=prefix, layout=layout, version='new', batch_size=100,
               progress=False,
               on_batch=lambda done, total: at_batches.append(
                   which_version(rs.get_vectors(reader, ids, prefix), candidates)))

    if layout == 'plain':
        assert any(len(labels) > 1 for labels in at_batches)  # the check can fail
        return
    assert at_batches and all(labels == {'old'} for labels in at_batches)
    # A thread reading in a loop across a republish (new -> old content under version 'new2').
    seen, stop = [], threading.Event()

    def loop():
        own = rs.connect(redis_server)
        while not stop.is_set():
            seen.append(which_version(rs.get_vectors(own, ids, prefix), {'new': new, 'old': old}))

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        rs.publish(writer, ids, old, prefix=prefix, layout=layout, version='new2', batch_size=100,
                   progress=False)
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline and not any(
                labels == {'old'} for labels in seen):  # wait for one read after the switch
            thread.join(0.01)
    finally:
        stop.set()
        thread.join()
    assert any(labels == {'old'} for labels in seen)
    assert all(len(labels) == 1 and labels <= {'new', 'old'} for labels in seen), seen


# ----------------------------------------------------------------------------- failures


def test_unreachable_and_auth_errors_are_clear(tmp_path):
    port = redis_servers.free_port()
    with pytest.raises(RedisExportError) as e:
        rs.connect(f'redis://127.0.0.1:{port}/0', vectors_path='saved_models/vectors.npy',
                   republish_hint=HINT)
    assert 'cannot reach Redis' in str(e.value) and 'safe on disk at saved_models/vectors.npy' in str(e.value)
    assert HINT in str(e.value)
    with pytest.raises(RedisExportError, match='invalid Redis URL'):
        rs.connect('http://localhost:6379')
    with redis_servers.start_test_server(args=('--requirepass', 's3cret')) as server:
        with pytest.raises(RedisExportError, match='needs a password'):
            rs.connect(server.url)
        with pytest.raises(RedisExportError, match='refused the credentials') as e:
            rs.connect(f'redis://:wrong-pw@127.0.0.1:{server.port}/0')
        assert 'wrong-pw' not in str(e.value)
        client = rs.connect(f'redis://:s3cret@127.0.0.1:{server.port}/0')
        rs.publish(client, [1, 2], vectors(2, 4, 11), version='a', progress=False)
        assert json.loads(client.get('2')) == pytest.approx(vectors(2, 4, 11)[1].tolist())


def test_dropped_connection_is_retried(client, plain_r):
    ids, x = np.arange(2000), vectors(2000, 8, 15)
    dropped = []

    def drop_publisher_connection(done, total):
        if done == 400:  # the next batch is already in flight
            for c in plain_r.client_list():
                if c['cmd'] == 'mset':
                    dropped.append(plain_r.client_kill_filter(_id=c['id']))

    rs.publish(client, ids, x, prefix='rs-drop:', version='d1', batch_size=200, progress=False,
               on_batch=drop_publisher_connection)
    assert dropped == [1]
    np.testing.assert_array_equal(rs.get_vectors(client, ids, 'rs-drop:').vectors, x)


def test_killed_server_mid_publish_then_rerun_completes(tmp_path):
    persist = ('--appendonly', 'yes', '--appendfsync', 'always')  # what was acknowledged survives
    server = redis_servers.start_test_server(args=persist, workdir=str(tmp_path / 'srv'))
    port = server.port
    client = rs.connect(server.url)
    client.set('foreign', 'keep me')
    ids, x = np.arange(3000), vectors(3000, 16, 12)
    vectors_path = str(tmp_path / 'vectors.npy')

    def crash(done, total):
        if done >= 600:
            server.kill()

    with pytest.raises(RedisExportError) as e:
        rs.publish(client, ids, x, version='k1', batch_size=200, progress=False, retries=1,
                   vectors_path=vectors_path, republish_hint=HINT, on_batch=crash)
    message = str(e.value)
    written, total = map(int, re.search(r'(\d+) of (\d+) vectors were confirmed written', message).groups())
    assert 600 <= written < 3000 and total == 3000
    assert f'safe on disk at {vectors_path}' in message and HINT in message
    server = redis_servers.start_test_server(port=port, args=persist, workdir=str(tmp_path / 'srv'))
    try:
        r = redis.Redis(port=port)
        assert r.get('foreign') == b'keep me' and r.get('__meta__') is None
        assert r.exists(*[str(u) for u in ids[:written]]) == written  # the partial publish
        rs.publish(client, ids, x, version='k1', progress=False)  # same client: it reconnects
        for i, uid in enumerate(ids.tolist()):
            assert np.array_equal(np.array(json.loads(r.get(str(uid))), np.float32), x[i])
        assert json.loads(r.get('__meta__'))['count'] == 3000 and r.get('foreign') == b'keep me'
    finally:
        server.stop()


def test_publish_in_parts_switches_once_after_every_part(client, plain_r, redis_server):
    """What train.py does under torchrun: one writer begins, each writes its own part (here two clients,
    as two ranks would), one finishes. Nothing is live before the finish; a part that never arrives
    leaves the previous set live; one part is exactly `publish`."""
    ids, vec = np.arange(5000, 5300), vectors(300, 8, 21)
    first = rs.publish(client, ids, vec, prefix='rs-parts:', layout='versioned', version='M0', progress=False)
    parts = [rs.prepare(ids[:170], vec[:170]), rs.prepare(ids[170:], vec[170:] + 1)]
    fingerprint = rs.combine_fingerprints([p[2] for p in parts])
    plan = rs.begin(client, prefix='rs-parts:', layout='versioned', version='M1', fingerprint=fingerprint,
                    count=300, dim=8)
    other_rank = rs.connect(redis_server)
    assert rs.write_part(other_rank, plan, parts[0][0], parts[0][1], progress=False) == 170
    # one part written, the other not (its rank died): readers still get the previous set, whole
    batch = rs.get_vectors(client, ids, 'rs-parts:')
    assert batch.publish_id == first['publish_id'] and batch.found.all()
    np.testing.assert_array_equal(batch.vectors, vec)
    assert rs.write_part(client, plan, parts[1][0], parts[1][1], progress=False) == 130
    assert plain_r.get('rs-parts:__current__') == first['publish_id'].encode()  # still: no finish yet
    summary = rs.finish(client, plan, grace_s=60)
    assert summary['count'] == 300 and summary['retired_versions'] == [first['publish_id']]
    batch = rs.get_vectors(client, ids, 'rs-parts:')
    assert batch.publish_id == plan.publish_id != first['publish_id'] and batch.found.all()
    np.testing.assert_array_equal(batch.vectors[:170], vec[:170])
    np.testing.assert_array_equal(batch.vectors[170:], vec[170:] + 1)
    # a single part names its keys exactly as publish does (same vectors -> same keys, nothing retired)
    assert rs.combine_fingerprints([rs.prepare(ids, vec)[2]]) == rs.prepare(ids, vec)[2]
    assert rs.publish(client, ids, vec, prefix='rs-parts:', layout='versioned', version='M0',
                      progress=False)['publish_id'] == first['publish_id']


def test_error_mid_versioned_publish_keeps_old_version_live(tmp_path):
    with redis_servers.start_test_server(args=('--maxmemory-policy', 'noeviction')) as server:
        client = rs.connect(server.url)
        ids = np.arange(2000)
        old, new = vectors(2000, 32, 13), vectors(2000, 32, 14)
        first = rs.publish(client, ids[:200], old[:200], layout='versioned', version='old',
                           progress=False)['publish_id']
        client.config_set('maxmemory', client.info('memory')['used_memory'] + 300_000)
        with pytest.raises(RedisExportError) as e:  # out of memory part-way through
            rs.publish(client, ids, new, layout='versioned', version='new', batch_size=100,
                       progress=False, vectors_path='saved_models/vectors.npy')
        assert 'OutOfMemoryError' in str(e.value) and 'safe on disk' in str(e.value)
        assert client.get('__current__') == first.encode()
        batch = rs.get_vectors(client, ids[:200])
        assert batch.publish_id == first and batch.found.all()
        np.testing.assert_array_equal(batch.vectors, old[:200])
        client.config_set('maxmemory', 0)
        s = rs.publish(client, ids, new, layout='versioned', version='new', progress=False)
        assert s['retired_versions'] == [first] and client.get('__current__') == s['publish_id'].encode()
        np.testing.assert_array_equal(rs.get_vectors(client, ids).vectors, new)


def test_reserved_ids_and_foreign_version_sets_are_refused(redis_server):
    client = rs.connect(redis_server)
    vec = np.ones((1, 4), np.float32)
    for bad in ('__meta__', '__current__', 'v:abc:1'):
        with pytest.raises(ValueError, match='reserved'):
            rs.publish(client, [bad], vec, prefix='rs-reserved:', version='v1', progress=False)
    client.sadd('rs-foreignset:__versions__', 'someone-elses')
    client.set('rs-foreignset:v:someone-elses:1', 'keep')
    with pytest.raises(rs.RedisExportError, match='not written by this tool'):
        rs.publish(client, np.array([1]), vec, prefix='rs-foreignset:', layout='versioned', version='v1',
                   progress=False)
    assert client.get('rs-foreignset:v:someone-elses:1') == b'keep'
    assert client.ttl('rs-foreignset:v:someone-elses:1') == -1
