"""Python benchmarks of shmdict against what Python users run today, in one run.

    python python/bench/bench.py [--keys 100000] [--runs 5] [--seconds 0.3]

Backends: shmdict.ShmDict (bytes), shmdict.PickleDict (pickled values),
multiprocessing.Manager().dict() (a server process: the usual way to share a
dict between processes) and a plain dict (in-process, the ceiling). Keys are
16 bytes, values 64 bytes (PickleDict and the Manager store a 64-byte bytes
object); reads and overwrites hit existing keys in a random order. Each
figure is the median of --runs runs of at least --seconds each, from one
process, then from --procs spawned processes at once (their sum; the
plain dict has no multi-process row). `update` is an atomic
read-modify-write: `update_key` for shmdict, `with lock: d[k] = f(d[k])`
with a Manager lock for the Manager (it has no atomic read-modify-write),
and `d[k] = f(d[k])` for the plain dict.

Also: summing a float64 array with numpy over a shared `shmdict.Array`
(through `read()`, no copy) against a private numpy array.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable

import shmdict

VALUE = os.urandom(64)


def new_value(old):
    return VALUE


def rate(op: Callable[[list], None], batches: list[list], seconds: float) -> float:
    """Operations per second of `op` over batches, for at least `seconds`."""
    done = 0
    i = 0
    t0 = time.perf_counter()
    while True:
        batch = batches[i % len(batches)]
        op(batch)
        done += len(batch)
        i += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed


def measure(ops: dict[str, Callable[[list], None]], batches, runs, seconds) -> dict[str, float]:
    out = {}
    for name, op in ops.items():
        op(batches[0])  # warm up
        out[name] = statistics.median(rate(op, batches, seconds) for _ in range(runs))
    return out


def mapping_ops(d, lock=None) -> dict[str, Callable[[list], None]]:
    def get(batch):
        for k in batch:
            d[k]

    def set_(batch):
        for k in batch:
            d[k] = VALUE

    if hasattr(d, "update_key"):

        def update(batch):
            for k in batch:
                d.update_key(k, new_value)
    elif lock is not None:

        def update(batch):
            for k in batch:
                with lock:
                    d[k] = new_value(d[k])
    else:

        def update(batch):
            for k in batch:
                d[k] = new_value(d[k])

    return {"get": get, "set": set_, "update": update}


def _worker(kind, target, batches, runs, seconds, barrier, out):
    """One of the processes of a multi-process measurement."""
    if kind == "shmdict":
        d = shmdict.ShmDict(target, create=False)
    elif kind == "pickle":
        d = shmdict.PickleDict(target, create=False)
    else:
        d = target  # a Manager proxy
    ops = mapping_ops(d, None if kind != "manager" else _worker_lock[0])
    res = {}
    for name, op in ops.items():
        op(batches[0])
        res[name] = []
        for _ in range(runs):
            barrier.wait()
            res[name].append(rate(op, batches, seconds))
    out.put(res)


_worker_lock: list = [None]


def _manager_worker(proxy, lock, batches, runs, seconds, barrier, out):
    _worker_lock[0] = lock
    _worker("manager", proxy, batches, runs, seconds, barrier, out)


def measure_procs(kind, target, batches, runs, seconds, procs, lock=None) -> dict[str, float]:
    """Aggregate ops/s of `procs` spawned processes running at once."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    if kind == "manager":
        ps = [
            ctx.Process(
                target=_manager_worker, args=(target, lock, batches, runs, seconds, barrier, out)
            )
            for _ in range(procs)
        ]
    else:
        ps = [
            ctx.Process(target=_worker, args=(kind, target, batches, runs, seconds, barrier, out))
            for _ in range(procs)
        ]
    for p in ps:
        p.start()
    results = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return {
        op: statistics.median(sum(r[op][i] for r in results) for i in range(runs))
        for op in results[0]
    }


def array_streaming(n: int, runs: int) -> tuple[float, float]:
    """GB/s of numpy sum over a shared Array and over a private array."""
    import numpy as np

    name = f"bench-array-{os.getpid()}"
    a = shmdict.Array(name, "d", n)
    try:
        private = np.random.default_rng(1).random(n)
        with a.write() as m:
            np.asarray(m)[:] = private
            del m
        nbytes = n * 8

        def shared_sum():
            with a.read() as m:
                x = np.asarray(m)
                s = x.sum()
                del x
            return s

        def private_sum():
            return private.sum()

        def gbps(f):
            f()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return nbytes / statistics.median(times) / 1e9

        return gbps(shared_sum), gbps(private_sum)
    finally:
        shmdict.Array.unlink(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3)
    ap.add_argument("--array-mib", type=int, default=80)
    ap.add_argument("--procs", type=int, default=2, help="processes for the shared rows")
    args = ap.parse_args()

    rng = random.Random(42)
    keys = [f"key-{i:012d}".encode() for i in range(args.keys)]  # 16 bytes
    order = keys[:]
    rng.shuffle(order)
    batches = [order[i : i + 1000] for i in range(0, len(order), 1000)]
    skeys = [k.decode() for k in keys]
    sbatches = [[k.decode() for k in b] for b in batches]

    results: dict[str, dict[str, float]] = {}
    shared: dict[str, dict[str, float]] = {}
    name = f"bench-py-{os.getpid()}"
    pname = name + "-pickle"
    try:
        d = shmdict.ShmDict(name, capacity=2 * args.keys, arena_bytes=64 << 20)
        for k in keys:
            d[k] = VALUE
        results["shmdict.ShmDict"] = measure(mapping_ops(d), batches, args.runs, args.seconds)
        shared[f"shmdict.ShmDict, {args.procs} processes"] = measure_procs(
            "shmdict", name, batches, args.runs, args.seconds, args.procs
        )

        p = shmdict.PickleDict(pname, capacity=2 * args.keys, arena_bytes=64 << 20)
        for k in skeys:
            p[k] = VALUE
        results["shmdict.PickleDict"] = measure(mapping_ops(p), sbatches, args.runs, args.seconds)
        shared[f"shmdict.PickleDict, {args.procs} processes"] = measure_procs(
            "pickle", pname, sbatches, args.runs, args.seconds, args.procs
        )
    finally:
        for n in (name, pname):
            try:
                shmdict.ShmDict.unlink(n)
            except FileNotFoundError:
                pass

    with multiprocessing.Manager() as manager:
        md = manager.dict()
        md.update({k: VALUE for k in keys})
        mlock = manager.Lock()
        results["Manager().dict()"] = measure(
            mapping_ops(md, mlock), batches, args.runs, args.seconds
        )
        shared[f"Manager().dict(), {args.procs} processes"] = measure_procs(
            "manager", md, batches, args.runs, args.seconds, args.procs, mlock
        )

    plain = dict.fromkeys(keys, VALUE)
    results["dict (in-process)"] = measure(mapping_ops(plain), batches, args.runs, args.seconds)

    print(
        f"# {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {args.keys} keys of 16 B, 64 B values, "
        f"median of {args.runs} runs of >= {args.seconds} s, one process"
    )
    manager_r = results["Manager().dict()"]
    plain_r = results["dict (in-process)"]
    print()
    print("| backend | op | ops/s | vs Manager().dict() | vs plain dict |")
    print("|---|---|---:|---:|---:|")
    for backend, r in results.items():
        for op, v in r.items():
            print(
                f"| {backend} | {op} | {v:,.0f} | {v / manager_r[op]:.1f}x "
                f"| {v / plain_r[op]:.2f}x |"
            )

    manager_n = shared[f"Manager().dict(), {args.procs} processes"]
    print()
    print(f"{args.procs} processes at once (aggregate ops/s):")
    print()
    print("| backend | op | ops/s | vs Manager().dict() |")
    print("|---|---|---:|---:|")
    for backend, r in shared.items():
        for op, v in r.items():
            print(f"| {backend} | {op} | {v:,.0f} | {v / manager_n[op]:.1f}x |")

    n = args.array_mib * (1 << 20) // 8
    shared, private = array_streaming(n, args.runs)
    print()
    print(f"numpy sum over {args.array_mib} MiB of float64, median of {args.runs}:")
    print("| array | GB/s | vs private |")
    print("|---|---:|---:|")
    print(f"| shmdict.Array (read() buffer) | {shared:.2f} | {shared / private:.2f}x |")
    print(f"| private numpy array | {private:.2f} | 1.00x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
