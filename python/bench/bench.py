"""Python benchmarks of shmdict against what Python users run today, in one run.

    python python/bench/bench.py [--keys 100000] [--runs 5] [--seconds 0.3]
                                 [--json PATH] [--chart PATH.png]

Backends: shmdict.ShmDict (bytes), shmdict.PickleDict (pickled values),
UltraDict with shared_lock=True and with its default lock,
multiprocessing.Manager().dict() (a server process: the usual way to share a
dict between processes), shared-memory-dict, Redis through redis-py on
loopback (the script starts its own redis-server on a free 127.0.0.1 port,
without persistence, and stops it at the end) and a plain dict (in-process,
the ceiling). The peers are optional: a peer whose package (or
redis-server) is missing is skipped with a printed note.

Keys are 16 bytes, values 64 bytes (the pickling backends store a 64-byte
bytes object); reads and overwrites hit existing keys in a random order.
Each figure is the median of --runs runs of at least --seconds each, from
one process, then from --procs spawned processes at once, each opening the
store by name (their sum; the plain dict has no multi-process row).
`update` is an atomic read-modify-write: `update_key` for shmdict,
`with lock: d[k] = f(d[k])` with the store's lock for UltraDict and with a
Manager lock for the Manager (neither has an atomic read-modify-write),
WATCH/GET/MULTI/SET/EXEC for Redis, `d[k] = f(d[k])` for the plain dict;
shared-memory-dict has no lock across processes, so no `update` row.

Also: summing a float64 array with numpy over a shared `shmdict.Array`
(through `read()`, no copy) against a private numpy array.

--chart draws the ops/s of this run into a PNG (needs matplotlib); --json
writes the results, and `--from-json FILE --chart PNG` redraws a saved run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import shmdict

VALUE = os.urandom(64)
OPS = ("get", "set", "update")
SHM = "shmdict.ShmDict"
ULTRA_SHARED = "UltraDict (shared_lock=True)"
ULTRA_DEFAULT = "UltraDict (default lock)"
MANAGER = "Manager().dict()"
SMD = "shared-memory-dict"
REDIS = "Redis (redis-py, loopback)"
PLAIN = "dict (in-process)"
# UltraDict streams every write into a buffer and, when the buffer is full,
# re-pickles the whole dict into a new segment. Its default buffer (10 kB)
# would do that every ~100 writes of 100,000 keys; give it room for every
# write of the run (its best case).
ULTRA_BUFFER = 256 << 20
SMD_BYTES = 16 << 20


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


def mapping_ops(d, lock=None, kind="") -> dict[str, Callable[[list], None]]:
    if kind == "redis":
        return redis_ops(d)

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
    elif kind == "smd":
        return {"get": get, "set": set_}
    else:

        def update(batch):
            for k in batch:
                d[k] = new_value(d[k])

    return {"get": get, "set": set_, "update": update}


def redis_ops(r) -> dict[str, Callable[[list], None]]:
    def get(batch):
        g = r.get
        for k in batch:
            g(k)

    def set_(batch):
        s = r.set
        for k in batch:
            s(k, VALUE)

    def update(batch):
        for k in batch:

            def rmw(pipe, k=k):
                old = pipe.get(k)
                pipe.multi()
                pipe.set(k, new_value(old))

            r.transaction(rmw, k)

    return {"get": get, "set": set_, "update": update}


def open_store(kind: str, target):
    """(store, lock) for `kind`, opened by name (or address) in this process."""
    if kind == "shmdict":
        return shmdict.ShmDict(target, create=False), None
    if kind == "pickle":
        return shmdict.PickleDict(target, create=False), None
    if kind == "manager":
        return target  # (proxy, lock proxy)
    if kind == "ultra":
        from UltraDict import UltraDict

        name, shared_lock = target
        d = UltraDict(name=name, create=False, shared_lock=shared_lock)
        return d, d.lock
    if kind == "smd":
        from shared_memory_dict import SharedMemoryDict

        return SharedMemoryDict(name=target, size=SMD_BYTES), None
    if kind == "redis":
        import redis

        return redis.Redis(host="127.0.0.1", port=target), None
    raise ValueError(kind)


def _worker(kind, target, batches, runs, seconds, barrier, out):
    """One of the processes of a multi-process measurement."""
    try:
        d, lock = open_store(kind, target)
        ops = mapping_ops(d, lock, kind)
        res: dict = {}
        for name, op in ops.items():
            op(batches[0])
            res[name] = []
            for _ in range(runs):
                barrier.wait()
                res[name].append(rate(op, batches, seconds))
        out.put(res)
    except BaseException as e:
        barrier.abort()
        out.put({"error": f"{type(e).__name__}: {e}"})


def measure_procs(kind, target, batches, runs, seconds, procs) -> dict:
    """Aggregate ops/s of `procs` spawned processes running at once."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    ps = [
        ctx.Process(target=_worker, args=(kind, target, batches, runs, seconds, barrier, out))
        for _ in range(procs)
    ]
    for p in ps:
        p.start()
    results = [out.get() for _ in ps]
    for p in ps:
        p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"error": errors[0]}
    return {
        op: statistics.median(sum(r[op][i] for r in results) for i in range(runs))
        for op in results[0]
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis() -> tuple[Optional[subprocess.Popen], int, str]:
    """A private redis-server on loopback, or (None, 0, why not)."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None, 0, "redis-server not found"
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            r.ping()
            return proc, port, ""
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.terminate()
    return None, 0, "redis-server did not answer"


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


def run_peers(args, keys, batches, sbatches, one: dict, many: dict, notes: list) -> None:
    """Fill each backend, measure it from one process, then from --procs."""
    runs, seconds, procs = args.runs, args.seconds, args.procs

    def both(label, store, lock, kind, target, b=batches):
        print(f"  {label} ...", file=sys.stderr, flush=True)
        one[label] = measure(mapping_ops(store, lock, kind), b, runs, seconds)
        many[label] = measure_procs(kind, target, b, runs, seconds, procs)
        if "error" in many[label]:
            notes.append(f"{label}, {procs} processes: {many[label]['error']}")

    name = f"bench-py-{os.getpid()}"
    pname = name + "-pickle"
    try:
        d = shmdict.ShmDict(name, capacity=2 * args.keys, arena_bytes=64 << 20)
        for k in keys:
            d[k] = VALUE
        both(SHM, d, None, "shmdict", name)
        p = shmdict.PickleDict(pname, capacity=2 * args.keys, arena_bytes=64 << 20)
        for k in keys:
            p[k.decode()] = VALUE
        both("shmdict.PickleDict", p, None, "pickle", pname, sbatches)
    finally:
        for n in (name, pname):
            try:
                shmdict.ShmDict.unlink(n)
            except FileNotFoundError:
                pass

    try:
        from UltraDict import UltraDict
    except ImportError as e:
        notes.append(f"UltraDict skipped: {e}")
    else:
        for label, shared_lock in ((ULTRA_SHARED, True), (ULTRA_DEFAULT, False)):
            uname = f"bu{os.getpid()}{int(shared_lock)}"
            try:
                u = UltraDict(
                    name=uname, create=True, shared_lock=shared_lock, buffer_size=ULTRA_BUFFER
                )
            except Exception as e:  # e.g. `atomics` missing for shared_lock=True
                notes.append(f"{label} skipped: {type(e).__name__}: {e}")
                continue
            try:
                for k in keys:
                    u[k] = VALUE
                u.dump()  # the fill goes into a full dump, the stream starts empty
                both(label, u, u.lock, "ultra", (uname, shared_lock))
            finally:
                u.close(unlink=True)

    with multiprocessing.Manager() as manager:
        md = manager.dict()
        md.update({k: VALUE for k in keys})
        mlock = manager.Lock()
        both(MANAGER, md, mlock, "manager", (md, mlock))

    try:
        from shared_memory_dict import SharedMemoryDict
    except ImportError as e:
        notes.append(f"shared-memory-dict skipped: {e}")
    else:
        sname = f"bs{os.getpid()}"
        s = SharedMemoryDict(name=sname, size=SMD_BYTES)
        try:
            s.update({k: VALUE for k in keys})
            # Every access unpickles the whole dict: one key per batch.
            both(SMD, s, None, "smd", sname, [[k] for b in batches[:10] for k in b])
        finally:
            s.shm.close()
            s.shm.unlink()
            from multiprocessing import resource_tracker

            if resource_tracker.unregister.__name__ == "fix_unregister":
                # UltraDict's import turned tracking off here, not in the
                # workers, which registered the segment: forget it.
                resource_tracker._resource_tracker.unregister(s.shm._name, "shared_memory")

    try:
        import redis
    except ImportError as e:
        notes.append(f"Redis skipped: redis-py not installed ({e})")
    else:
        proc, port, why = start_redis()
        if proc is None:
            notes.append(f"Redis skipped: {why}")
        else:
            try:
                r = redis.Redis(host="127.0.0.1", port=port)
                pipe = r.pipeline(transaction=False)
                for k in keys:
                    pipe.set(k, VALUE)
                pipe.execute()
                both(REDIS, r, None, "redis", port)
                r.close()
            finally:
                proc.terminate()
                proc.wait()

    plain = dict.fromkeys(keys, VALUE)
    one[PLAIN] = measure(mapping_ops(plain), batches, runs, seconds)


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def ratio(a, b) -> Optional[float]:
    return None if a is None or b is None else a / b


def fr(x) -> str:
    return "n/a" if x is None else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def chart(path, one, many, procs, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [b for b in one if b != PLAIN] + [PLAIN]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True)
    colors = {"get": "#4472c4", "set": "#ed7d31", "update": "#70ad47"}
    for ax, data, sub in (
        (axes[0], one, "1 process"),
        (axes[1], many, f"{procs} processes (aggregate)"),
    ):
        h = 0.27
        for j, op in enumerate(OPS):
            ys = [i + (j - 1) * h for i in range(len(labels))]
            xs = [(data.get(b) or {}).get(op) or 0 for b in labels]
            ax.barh(ys, xs, height=h, color=colors[op], label=op)
            for y, x in zip(ys, xs):
                if x:
                    ax.text(x * 1.08, y, f"{x:,.0f}", va="center", fontsize=6)
        ax.set_xscale("log")
        ax.set_xlim(10, 4e8)
        ax.set_title(sub)
        ax.set_xlabel("operations per second (log scale)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3)
    ap.add_argument("--array-mib", type=int, default=80)
    ap.add_argument("--procs", type=int, default=2, help="processes for the shared rows")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--chart", help="draw the ops/s into this PNG (needs matplotlib)")
    ap.add_argument("--from-json", help="measure nothing: draw --chart from a --json file")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        chart(
            args.chart,
            saved["one_process"],
            saved["many_processes"],
            saved["processes"],
            saved["conditions"],
        )
        return 0

    rng = random.Random(42)
    keys = [f"key-{i:012d}".encode() for i in range(args.keys)]  # 16 bytes
    # Other objects than the stored keys: no backend gets the identity
    # shortcut of an in-process dict lookup (a reader's keys come from elsewhere).
    order = [bytes(bytearray(k)) for k in keys]
    rng.shuffle(order)
    batches = [order[i : i + 1000] for i in range(0, len(order), 1000)]
    sbatches = [[k.decode() for k in b] for b in batches]

    one: dict[str, dict] = {}
    many: dict[str, dict] = {}
    notes: list[str] = []
    load0 = os.getloadavg()
    run_peers(args, keys, batches, sbatches, one, many, notes)
    n = args.array_mib * (1 << 20) // 8
    ashared, aprivate = array_streaming(n, args.runs)
    load1 = os.getloadavg()

    head = (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {args.keys} keys of 16 B, 64 B values, "
        f"median of {args.runs} runs of >= {args.seconds} s; "
        f"load average {load0[0]:.1f} before, {load1[0]:.1f} after"
    )
    print(f"# {head}")
    print()
    p = args.procs
    print(f"ops/s, from 1 process and from {p} processes at once (aggregate):")
    print()
    print(
        f"| backend | get, 1 proc | set, 1 proc | update, 1 proc "
        f"| get, {p} procs | set, {p} procs | update, {p} procs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b, r in one.items():
        m = many.get(b, {})
        cells = [fmt(r.get(op)) for op in OPS]
        if "error" in m:
            cells += ["failed"] * 3
        else:
            cells += [fmt(m.get(op)) if b in many else "-" for op in OPS]
        print(f"| {b} | " + " | ".join(cells) + " |")

    def get(data, b, op):
        v = data.get(b, {})
        return None if "error" in v else v.get(op)

    print()
    print(f"{SHM} against each peer (its ops/s over the peer's, same run):")
    print()
    print(
        f"| peer | reads, 1 proc | writes, 1 proc | updates, 1 proc "
        f"| reads, {p} procs | writes, {p} procs | updates, {p} procs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b in one:
        if b == SHM:
            continue
        cells = [fr(ratio(get(one, SHM, op), get(one, b, op))) for op in OPS]
        cells += [fr(ratio(get(many, SHM, op), get(many, b, op))) for op in OPS]
        print(f"| {b} | " + " | ".join(cells) + " |")

    print()
    print(f"numpy sum over {args.array_mib} MiB of float64, median of {args.runs}:")
    print()
    print("| array | GB/s | vs private |")
    print("|---|---:|---:|")
    print(f"| shmdict.Array (read() buffer) | {ashared:.2f} | {ashared / aprivate:.2f}x |")
    print(f"| private numpy array | {aprivate:.2f} | 1.00x |")

    print()
    print("Targets (issue 13):")
    print()
    targets = []
    for peer, op, what, want in (
        (ULTRA_SHARED, "get", "reads", 1.5),
        (ULTRA_SHARED, "set", "writes", 10),
        (MANAGER, "get", "reads", 50),
        (MANAGER, "set", "writes", 50),
    ):
        for data, procs in ((one, 1), (many, p)):
            x = ratio(get(data, SHM, op), get(data, peer, op))
            status = "(not measured)" if x is None else "met" if x >= want else "MISSED"
            targets.append((f"{what} >= {want}x {peer}, {procs} proc", x, status))
    x = ashared / aprivate
    targets.append(("Array streaming >= 0.9x private numpy", x, "met" if x >= 0.9 else "MISSED"))
    for t, x, status in targets:
        print(f"- {t}: {fr(x)} {status}")
    if notes:
        print()
        print("Notes:")
        for note in notes:
            print(f"- {note}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "conditions": head,
                    "one_process": one,
                    "processes": p,
                    "many_processes": many,
                    "array_gbps": {"shared": ashared, "private": aprivate},
                    "targets": targets,
                    "notes": notes,
                },
                f,
                indent=1,
            )
    if args.chart:
        chart(args.chart, one, many, p, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
