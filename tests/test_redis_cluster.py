"""redis_store against a real 3-primary Redis Cluster of bundled valkey servers on loopback (no mocks):
every vector read back through redis_store and through a plain RedisCluster reader, keys on every node,
foreign keys untouched by publishes and retirements, the versioned switch across slots, clear errors."""

import json
import time

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

import redis_servers
import redis_store as rs
import redis_writer
from redis_store import RedisExportError

HINT = 'python train.py --republish --save_dir saved_models --redis_url URL'


def vectors(n, dim, seed):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.fixture(scope='module')
def client(redis_cluster):
    return rs.connect(redis_cluster.url)


@pytest.fixture(scope='module')
def reader(redis_cluster):
    """A plain redis-py cluster client, the way an online reader would make one."""
    return RedisCluster.from_url(f'redis://127.0.0.1:{redis_cluster.nodes[0].port}')


@pytest.fixture(scope='module')
def node_clients(redis_cluster):
    return [redis.Redis(port=node.port) for node in redis_cluster.nodes]


def keys_per_node(node_clients, pattern):
    return [sum(1 for _ in r.scan_iter(match=pattern, count=1000)) for r in node_clients]


def stored(reader, key, fmt):
    """The seed's reader: json.loads(r.get(key)), or the raw float32 bytes."""
    raw = reader.get(key)
    return np.array(json.loads(raw), np.float32) if fmt == 'json' else np.frombuffer(raw, '<f4')


# ----------------------------------------------------------------------------- round trips


def test_connect_gives_a_cluster_client(redis_cluster, client, node_clients):
    assert isinstance(client, RedisCluster) and redis_cluster.url.startswith('redis+cluster://127.0.0.1:')
    assert len(client.get_primaries()) == 3
    assert [r.info('cluster')['cluster_enabled'] for r in node_clients] == [1, 1, 1]
    assert rs.connect(redis_cluster.url + '/0').get_primaries()  # database 0 may be named


@pytest.mark.parametrize('layout,fmt,ttl', [('plain', 'json', None), ('plain', 'f32', 600),
                                            ('versioned', 'json', 600), ('versioned', 'f32', None)])
def test_every_vector_round_trips_and_spreads_over_all_nodes(client, reader, node_clients, layout, fmt, ttl):
    prefix = f'rc-rt-{layout}-{fmt}:'
    ids = np.arange(5_000_000, 5_000_000 + 3000, dtype=np.int64)
    x = vectors(len(ids), 16, seed=len(prefix))
    acked = []
    summary = rs.publish(client, ids, x, prefix=prefix, layout=layout, fmt=fmt, version='m1', ttl=ttl,
                         batch_size=256, progress=False, on_batch=lambda done, total: acked.append(done))
    assert summary['count'] == 3000 and summary['dim'] == 16
    assert acked == sorted(acked) and acked[-1] == 3000 and len(acked) >= 12  # batched, per node
    batch = rs.get_vectors(client, ids, prefix)
    assert batch.found.all() and batch.version == 'm1'
    np.testing.assert_array_equal(batch.vectors, x)
    np.testing.assert_array_equal(rs.get_vector(client, int(ids[5]), prefix), x[5])
    assert rs.get_vector(client, 42, prefix) is None

    # The documented keys, read with plain redis-py.
    if layout == 'versioned':
        live = reader.get(prefix + '__current__').decode()
        assert live == summary['publish_id'] == batch.publish_id
        key_prefix = f'{prefix}v:{live}:'
    else:
        key_prefix = prefix
    assert summary['key_pattern'] == key_prefix + '{user_id}'
    for i, uid in enumerate(ids.tolist()):
        np.testing.assert_array_equal(stored(reader, f'{key_prefix}{uid}', fmt), x[i])
    meta = rs.read_meta(client, prefix)
    assert (meta['layout'], meta['format'], meta['count'], meta['state']) == (layout, fmt, 3000, 'complete')
    assert json.loads(reader.get(prefix + '__meta__')) == meta

    per_node = keys_per_node(node_clients, rs._glob_escape(key_prefix) + '[0-9]*')
    assert sum(per_node) == 3000 and min(per_node) > 500, per_node  # every primary holds a share
    key = f'{key_prefix}{ids[0]}'
    assert (0 < reader.ttl(key) <= 600) if ttl else reader.ttl(key) == -1


def test_pipeline_writer_on_a_cluster(client, reader, monkeypatch):
    """The generic redis-py writer (cluster pipelines grouped by node) gives the same keys."""
    monkeypatch.setattr(redis_writer, '_uses_raw_resp', lambda c: False)
    ids, x = np.arange(700), vectors(700, 8, 3)
    rs.publish(client, ids, x, prefix='rc-pipe:', version='p', ttl=300, batch_size=100, progress=False)
    for i in range(700):
        np.testing.assert_array_equal(stored(reader, f'rc-pipe:{i}', 'json'), x[i])
    np.testing.assert_array_equal(rs.get_vectors(client, ids, 'rc-pipe:').vectors, x)


def test_batches_sent_to_a_stale_slot_owner_are_rewritten(redis_cluster, reader, monkeypatch):
    """A slot that moved while publishing answers MOVED: those batches are rewritten through redis-py
    and every vector still lands, counted once."""
    rewritten, write_with_pipelines = [], redis_writer._write_with_pipelines

    def spy(client, batches, ttl, on_ack):
        batches = list(batches)
        rewritten.extend(len(b.keys) for b in batches)
        write_with_pipelines(client, batches, ttl, on_ack)

    monkeypatch.setattr(redis_writer, '_write_with_pipelines', spy)
    client = rs.connect(redis_cluster.url)
    cache = client.nodes_manager.slots_cache
    first, second = client.get_primaries()[:2]
    stale = [s for s, nodes in cache.items() if nodes[0].name == first.name][:3000]
    for s in stale:  # the client wrongly believes `second` owns these slots
        cache[s] = [second]
    ids, x = np.arange(3000), vectors(3000, 8, 4)
    acked = []
    rs.publish(client, ids, x, prefix='rc-moved:', fmt='f32', version='mv', batch_size=200,
               progress=False, on_batch=lambda done, total: acked.append(done))
    assert acked[-1] == 3000 and 0 < sum(rewritten) < 3000
    for i in range(3000):
        np.testing.assert_array_equal(stored(reader, f'rc-moved:{i}', 'f32'), x[i])


# ----------------------------------------------------------------------------- ownership


def test_foreign_keys_survive_publish_and_versioned_republish(redis_cluster, client, reader, node_clients):
    foreign = {'1': 'raw id 1', '2': 'raw id 2', '17': 'raw id 17', 'other:1': 'x', 'other:17': 'y',
               'v:v1:1': 'unprefixed versioned look-alike', 'current': 'z', 'meta': 'w',
               'rc-fk:v:foreign:1': 'our namespace, a version we never wrote',
               'rc-fk:999999': 'an id we do not publish', '{rc-fk:}tagged': 'hash-tagged'}
    for i in range(30):
        foreign[f'rc-fk-other:{i}'] = f'neighbour {i}'
    for k, v in foreign.items():
        reader.set(k, v)
    reader.hset('rc-session:abc', mapping={'a': 1})
    reader.rpush('rc-queue', 'job1', 'job2')
    names = list(foreign) + ['rc-session:abc', 'rc-queue']
    assert len({reader.get_node_from_key(k).name for k in names}) == 3  # on every node
    dumped = {k: reader.dump(k) for k in names}

    ids = np.arange(1, 1500)
    steps = [('plain', 'json', 'p1'), ('versioned', 'json', 'v1'), ('versioned', 'f32', 'v2'),
             ('plain', 'f32', 'p2'), ('versioned', 'json', 'v3')]
    seen = []
    for layout, fmt, version in steps:
        x = vectors(len(ids), 6, seed=int(version[1:]) + 10 * (layout == 'plain'))
        s = rs.publish(client, ids, x, prefix='rc-fk:', layout=layout, fmt=fmt, version=version,
                       batch_size=128, grace_s=600, progress=False)
        seen.append({**s, 'pointer_ttl': reader.ttl('rc-fk:__current__')})
        for k in names:
            assert reader.dump(k) == dumped[k], k
            assert reader.ttl(k) == -1, k
        np.testing.assert_array_equal(rs.get_vectors(client, ids, 'rc-fk:').vectors, x)
    # v2 retired v1: every v1 key, on every primary, got the grace expiry (the SCAN saw all nodes).
    v1, v2 = seen[1]['publish_id'], seen[2]['publish_id']
    assert seen[2]['retired_versions'] == [v1] and seen[2]['retired_keys'] == len(ids) + 1  # + its meta
    assert all(0 < t <= 600 for t in (reader.ttl(f'rc-fk:v:{v1}:{u}') for u in ids))
    assert min(keys_per_node(node_clients, f'rc-fk:v:{v1}:*')) > 0
    assert seen[3]['retired_versions'] == [v2]
    assert 0 < seen[3]['pointer_ttl'] <= 600  # a plain publish lets the pointer age out
    assert seen[4]['pointer_ttl'] == -1
    assert reader.smembers('rc-fk:__versions__') == {seen[4]['publish_id'].encode()}


def test_foreign_bookkeeping_keys_are_refused(client, reader):
    reader.set('rc-own:__meta__', "somebody else's config")
    reader.sadd('rc-own2:__versions__', 'someone-elses')
    reader.set('rc-own2:v:someone-elses:1', 'keep')
    reader.set('rc-own3:__current__', 'blue')
    ids, x = np.arange(5), vectors(5, 4, 6)
    for prefix, layout in [('rc-own:', 'plain'), ('rc-own2:', 'versioned'), ('rc-own3:', 'versioned')]:
        with pytest.raises(RedisExportError, match='not written by this tool'):
            rs.publish(client, ids, x, prefix=prefix, layout=layout, version='a', progress=False)
    assert reader.get('rc-own:__meta__') == b"somebody else's config"
    assert reader.get('rc-own3:__current__') == b'blue'
    assert reader.get('rc-own2:v:someone-elses:1') == b'keep'
    assert reader.ttl('rc-own2:v:someone-elses:1') == -1
    assert not any(reader.exists(f'{p}{i}') for p in ('rc-own:', 'rc-own3:') for i in range(5))


# ----------------------------------------------------------------------------- versioned switch


def test_versioned_pointer_switches_only_after_every_key_is_written(client, reader):
    prefix = 'rc-ver:'
    ids = np.arange(2000)
    old, new = vectors(2000, 8, 9), vectors(2000, 8, 10)
    first = rs.publish(client, ids, old, prefix=prefix, layout='versioned', version='old',
                       progress=False)['publish_id']
    during = []

    def check(done, total):  # at every batch boundary, on every node
        during.append(reader.get(prefix + '__current__').decode())
        batch = rs.get_vectors(client, ids, prefix)
        assert batch.publish_id == first and batch.found.all()
        np.testing.assert_array_equal(batch.vectors, old)

    s = rs.publish(client, ids, new, prefix=prefix, layout='versioned', version='new', batch_size=100,
                   grace_s=900, progress=False, on_batch=check)
    assert len(during) == 21 and set(during) == {first}  # ~667 keys per node, 7 batches each
    assert reader.get(prefix + '__current__') == s['publish_id'].encode()
    assert json.loads(reader.get(f"{prefix}v:{s['publish_id']}:__meta__"))['state'] == 'complete'
    assert rs.read_meta(client, prefix)['publish_id'] == s['publish_id']
    batch = rs.get_vectors(client, ids, prefix)
    assert (batch.version, batch.publish_id) == ('new', s['publish_id'])
    np.testing.assert_array_equal(batch.vectors, new)
    # A reader that resolved the pointer just before the switch still finds the whole old set.
    for i in range(0, 2000, 97):
        np.testing.assert_array_equal(stored(reader, f'{prefix}v:{first}:{i}', 'json'), old[i])
    again = rs.publish(client, ids, new, prefix=prefix, layout='versioned', version='new', progress=False)
    assert again['publish_id'] == s['publish_id'] and again['retired_versions'] == []


# ----------------------------------------------------------------------------- errors


def test_plain_url_naming_a_cluster_node_is_refused(redis_cluster):
    port = redis_cluster.nodes[1].port
    with pytest.raises(RedisExportError, match='is a Redis Cluster node') as e:
        rs.connect(f'redis://127.0.0.1:{port}/0', vectors_path='saved_models/user_vectors.npz',
                   republish_hint=HINT)
    assert f'redis+cluster://127.0.0.1:{port}' in str(e.value)
    assert 'safe on disk at saved_models/user_vectors.npz' in str(e.value) and HINT in str(e.value)
    # A plain client made some other way is told the same thing by the publish itself.
    plain = redis.Redis(port=port)
    with pytest.raises(RedisExportError, match='Redis Cluster node.*redis[+]cluster'):
        rs.publish(plain, np.arange(500), vectors(500, 4, 1), prefix='rc-plain:', version='a',
                   progress=False)


def test_unreachable_and_bad_cluster_urls_are_clear(redis_server):
    port = redis_servers.free_port()
    with pytest.raises(RedisExportError, match='cannot reach the Redis Cluster') as e:
        rs.connect(f'redis+cluster://:pw@127.0.0.1:{port}', vectors_path='v.npz', republish_hint=HINT)
    assert 'safe on disk at v.npz' in str(e.value) and HINT in str(e.value) and ':pw@' not in str(e.value)
    with pytest.raises(RedisExportError, match='database 0 only'):
        rs.connect(f'redis+cluster://127.0.0.1:{port}/3')
    with pytest.raises(RedisExportError, match='invalid Redis URL'):
        rs.connect(f'unix+cluster://127.0.0.1:{port}')
    with pytest.raises(RedisExportError, match='not a Redis Cluster') as e:  # a single server
        rs.connect(redis_server.replace('redis://', 'redis+cluster://'))
    assert redis_server in str(e.value)


def test_cluster_auth_and_down_errors_are_clear():
    with redis_servers.start_test_cluster(1, password='s3cret') as cluster:
        port = cluster.nodes[0].port
        with pytest.raises(RedisExportError, match='needs a password'):
            rs.connect(f'redis+cluster://127.0.0.1:{port}')
        with pytest.raises(RedisExportError, match='refused the credentials') as e:
            rs.connect(f'redis+cluster://:wrong-pw@127.0.0.1:{port}')
        assert 'wrong-pw' not in str(e.value)
        client = rs.connect(cluster.url)
        rs.publish(client, [1, 2], vectors(2, 4, 11), version='a', progress=False)
        np.testing.assert_array_equal(rs.get_vector(client, 2), vectors(2, 4, 11)[1])
        r = redis.Redis(port=port, password='s3cret', retry=Retry(NoBackoff(), 0))
        r.execute_command('CLUSTER', 'DELSLOTSRANGE', 0, 99)  # 100 slots without an owner
        with pytest.raises(RedisExportError, match='is down'):
            rs.connect(cluster.url)


def test_primary_dying_mid_publish_then_cluster_down_are_clear(tmp_path):
    with redis_servers.start_test_cluster(3, args=('--cluster-node-timeout', '300')) as cluster:
        client = rs.connect(cluster.url)
        ids, x = np.arange(3000), vectors(3000, 8, 12)

        def crash(done, total):
            if done >= 600:
                cluster.nodes[2].kill()

        with pytest.raises(RedisExportError) as e:
            rs.publish(client, ids, x, version='k1', batch_size=100, progress=False, retries=1,
                       vectors_path='saved_models/user_vectors.npz', republish_hint=HINT, on_batch=crash)
        message = str(e.value)
        assert 'Redis publish failed' in message and 'vectors were confirmed written' in message
        assert 'safe on disk at saved_models/user_vectors.npz' in message and HINT in message
        # The survivors mark the dead primary failed (node timeout 0.3 s): the cluster is down.
        survivor = redis.Redis(port=cluster.nodes[0].port)
        for _ in range(200):
            if redis_servers._cluster_state(survivor).get('cluster_state') == 'fail':
                break
            time.sleep(0.05)
        with pytest.raises(RedisExportError, match=r'is down: node .* reports cluster_state:fail'):
            rs.connect(cluster.url, vectors_path='v.npz')
