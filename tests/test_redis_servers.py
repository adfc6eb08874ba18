"""redis_servers: the detached bundled server (started, reused, stopped, persistent) and the throw-away
test servers and clusters, which leave no temporary directory behind."""

import os
import socket
import subprocess
import sys
import tempfile

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import redis_servers
from redis_store import RedisExportError


# ----------------------------------------------------------------------------- bundled server


def test_ensure_local_server_detached_reused_stopped_persistent(tmp_path, redis_server):
    data_dir = str(tmp_path / 'redis data')  # a space, to check the config quoting
    port = redis_servers.free_port()
    code = f'import redis_servers; print(redis_servers.ensure_local_server({data_dir!r}, port={port}))'
    env = {**os.environ, 'PYTHONPATH': os.getcwd()}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60,
                         env=env, check=True).stdout
    assert out.strip() == f"('redis://127.0.0.1:{port}', True)"
    try:
        r = redis.Redis(port=port)
        assert r.ping()  # the launching process has exited; the server lives on
        pid = int(open(os.path.join(data_dir, 'valkey.pid')).read())
        if os.path.exists(f'/proc/{pid}/stat'):
            assert int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1]) != os.getpid()
        assert r.config_get('bind')['bind'] == '127.0.0.1'
        assert redis_servers.ensure_local_server(data_dir, port=port) == (f'redis://127.0.0.1:{port}', False)
        r.set('persist-me', 'yes')
        assert redis_servers.stop_local_server(data_dir) is True
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, retry=Retry(NoBackoff(), 0)).ping()
        assert redis_servers.ensure_local_server(data_dir, port=port)[1] is True
        assert r.get('persist-me') == b'yes'  # data came back from data_dir
    finally:
        redis_servers.stop_local_server(data_dir)
    assert redis_servers.stop_local_server(data_dir) is False
    assert 'valkey.pid' in redis_servers.stop_hint(data_dir) and 'stop_local_server' in redis_servers.stop_hint(data_dir)
    # Something already answering is reused as it is, and nothing is written to data_dir.
    other = str(tmp_path / 'unused')
    shared_port = int(redis_server.rsplit(':', 1)[1])
    assert redis_servers.ensure_local_server(other, port=shared_port) == (redis_server, False)
    assert not os.path.exists(other)
    with pytest.raises(ValueError, match='loopback'):
        redis_servers.ensure_local_server(other, host='0.0.0.0')


def test_ensure_local_server_port_taken_by_something_else(tmp_path):
    with socket.socket() as squatter:  # listens, never answers
        squatter.bind(('127.0.0.1', 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(RedisExportError, match='did not start') as e:
            redis_servers.ensure_local_server(str(tmp_path), port=port, timeout=20)
        assert 'in use' in str(e.value)  # the server's log says why


def test_test_server_removes_only_the_directory_it_made(tmp_path):
    server = redis_servers.start_test_server()
    made = server.workdir
    assert os.path.isdir(made)
    server.stop()
    assert not os.path.exists(made)
    given = tmp_path / "kept"
    with redis_servers.start_test_server(workdir=str(given)):
        pass
    assert given.is_dir()




def test_test_cluster_removes_only_the_directory_it_made(tmp_path, monkeypatch):
    made_in = tmp_path / 'tmp'
    made_in.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(made_in))  # where mkdtemp makes them
    with redis_servers.start_test_cluster(2):
        assert len(os.listdir(made_in)) == 1  # one directory, a folder per node inside
    assert os.listdir(made_in) == []
    given = tmp_path / 'kept'
    with redis_servers.start_test_cluster(1, workdir=str(given)):
        pass
    assert given.is_dir()
    # A server or cluster that fails to start removes its temporary directory too.
    with pytest.raises(RedisExportError, match='did not start'):
        redis_servers.start_test_server(args=('--no-such-option', 'x'))
    with pytest.raises(RedisExportError, match='did not start'):
        redis_servers.start_test_cluster(2, args=('--no-such-option', 'x'))
    assert os.listdir(made_in) == []
