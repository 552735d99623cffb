"""Functions run in spawned worker processes (importable by name)."""

from __future__ import annotations

import os
import time

import shmdict


def increment(name: str, key: str, n: int, start: float = 0.0) -> None:
    d = shmdict.ShmDict(name, create=False)
    time.sleep(max(0.0, start - time.time()))  # all processes at once
    for _ in range(n):
        d.update_key(key, lambda old: str(int(old or b"0") + 1).encode())


def increment_handle(d: shmdict.ShmDict, key: str, n: int, start: float = 0.0) -> None:
    """Like increment, with the handle passed (pickled by name)."""
    time.sleep(max(0.0, start - time.time()))
    for _ in range(n):
        d.update_key(key, lambda old: str(int(old or b"0") + 1).encode())


def setdefault_race(name: str, key: str, me: int, start: float, out) -> None:
    d = shmdict.ShmDict(name, create=False)
    time.sleep(max(0.0, start - time.time()))
    out.put(d.setdefault(key, str(me).encode()))


def memoize_race(name: str, counter: str, key: str, me: int, start: float, out) -> None:
    d = shmdict.ShmDict(name, create=False)
    runs = shmdict.Value(counter, "q", create=False)

    def compute() -> bytes:
        runs.fetch_add(1)
        time.sleep(0.2)  # long enough for every other process to arrive
        return f"computed by {me}".encode()

    time.sleep(max(0.0, start - time.time()))
    out.put(d.get_or_insert_with(key, compute))


def wait_for_key(name: str, key: str, timeout: float, out) -> None:
    d = shmdict.ShmDict(name, create=False)
    out.put("waiting")
    t0 = time.monotonic()
    v = d.wait_for(key, timeout)
    out.put((v, time.monotonic() - t0))


def fetch_add(name: str, typecode: str, n: int, start: float = 0.0) -> None:
    v = shmdict.Value(name, typecode, create=False)
    time.sleep(max(0.0, start - time.time()))
    for _ in range(n):
        v.fetch_add(1)


def fill_array(name: str, typecode: str, length: int, offset: float) -> None:
    """Writes arange(length) + offset through a numpy view of write()."""
    import numpy as np

    a = shmdict.Array(name, typecode, length, create=False)
    with a.write() as m:
        x = np.asarray(m)
        x[:] = np.arange(length) + offset


def array_sum(name: str, typecode: str, length: int, out) -> None:
    import numpy as np

    a = shmdict.Array(name, typecode, length, create=False)
    with a.read() as m:
        out.put(float(np.asarray(m).sum()))


def produce(name: str, who: int, n: int) -> None:
    s = shmdict.Space(name, create=False)
    for i in range(n):
        s.out(("job", who * 1_000_000 + i))


def consume(name: str, out) -> None:
    s = shmdict.Space(name, create=False)
    got = []
    while True:
        t = s.take(("job", int), timeout=10)
        if t is None:
            break
        if t[1] < 0:  # the poison pill
            break
        got.append(t[1])
    out.put((os.getpid(), got))


def pickle_writer(name: str) -> None:
    p = shmdict.PickleDict(name, create=False)
    p["config"] = {"workers": 4, "ratios": [0.5, 0.25], "name": "ñandú"}
    p[b"raw"] = (1, 2.0, None)
    p.update_key("counter", lambda n: n + 1, 0)


def view_value(i: int, size: int) -> bytes:
    """The value a churning writer stores in round i: distinct per round."""
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def churn_key(name: str, key: str, rounds: int, size: int, out) -> None:
    """Overwrites `key` `rounds` times with values of `size` bytes (the
    same block size as the original, so a recycled block would show), and
    every fourth round removes it and inserts it again. Then waits for the
    key "released" before detaching."""
    d = shmdict.ShmDict(name, create=False)
    out.put("started")
    for i in range(rounds):
        if i % 4 == 3:
            del d[key]
        d[key] = view_value(i, size)
    out.put(("churned", rounds))
    d.wait_for("released", 60)


def growth_value(key: str) -> bytes:
    """The value growth tests store under `key`: derived from it, of a few
    sizes (some larger than a small dictionary's initial arena)."""
    n = sum(key.encode()) % 7
    return key.encode() * (1 + n * 3) + (b"x" * 70_000 if key.endswith("/777") else b"")


def growth_writer(name: str, who: int, n: int, start: float, out) -> None:
    """Inserts n keys "w{who}/{i}" into a dictionary that must grow."""
    d = shmdict.ShmDict(name, create=False)
    time.sleep(max(0.0, start - time.time()))
    for i in range(n):
        k = f"w{who}/{i}"
        d[k] = growth_value(k)
    out.put(("written", who, os.getpid()))


def growth_reader(name: str, expected: list, out) -> None:
    """Attaches before any key is written, then reads every expected key as
    it appears (while the dictionary grows), checks its value, and reports
    what it saw."""
    d = shmdict.ShmDict(name, create=False)
    gen0 = d.stats().generation
    out.put(("attached", gen0, d.capacity))
    wrong = []
    for k in expected:
        v = d.wait_for(k, 60)
        if v != growth_value(k):
            wrong.append(k)
    # Every key again, now that all are present: none went missing.
    missing = [k for k in expected if d.get(k) != growth_value(k)]
    s = d.stats()
    out.put(("read", len(expected), wrong, missing, len(d), s.generation, d.capacity))
