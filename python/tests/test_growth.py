"""Growth while attached: a dictionary created small grows past its
capacity and arena while every process stays attached; ``max_bytes`` and
``fixed_size`` give ``shmdict.FullError``; ``stats()`` reports the memory
and the growth history."""

from __future__ import annotations

import os
import time

import _workers
import pytest

import shmdict

WRITERS = 2
PER_WRITER = 6_000


def _get(q, what, timeout=120):
    m = q.get(timeout=timeout)
    assert m[0] == what, m
    return m


def test_grows_while_attached_across_processes(name, spawn):
    """Two spawned processes write 12,000 keys into a dictionary created
    with capacity 16 and a 64 KiB arena; a third, attached before the first
    write, reads every one of them as it appears, through every doubling."""
    d = shmdict.ShmDict(name, capacity=16, arena_bytes=64 << 10, create_new=True)
    assert d.capacity == 16
    s = d.stats()
    assert (s.generation, s.grows, s.max_bytes) == (0, True, None)
    assert len(s.growth) == 1 and s.growth[0]["pid"] == os.getpid()
    expected = [f"w{w}/{i}" for i in range(PER_WRITER) for w in range(WRITERS)]
    q = spawn.Queue()
    reader = spawn.Process(target=_workers.growth_reader, args=(name, expected, q))
    reader.start()
    _, reader_gen, reader_cap = _get(q, "attached")
    assert (reader_gen, reader_cap) == (0, 16)
    start = time.time() + 0.5
    writers = [
        spawn.Process(target=_workers.growth_writer, args=(name, w, PER_WRITER, start, q))
        for w in range(WRITERS)
    ]
    for p in writers:
        p.start()
    msgs = [q.get(timeout=120) for _ in range(WRITERS + 1)]
    for p in [*writers, reader]:
        p.join(timeout=60)
        assert p.exitcode == 0, p
    written = sorted(m for m in msgs if m[0] == "written")
    assert [m[1] for m in written] == list(range(WRITERS))
    writer_pids = {m[2] for m in written}
    (read,) = [m for m in msgs if m[0] == "read"]
    _, n, wrong, missing, reader_len, reader_gen, reader_cap = read
    assert n == WRITERS * PER_WRITER
    assert wrong == [] and missing == []
    assert reader_len == n
    assert reader_cap >= n and reader_gen >= 10  # 16 << 10 = 16,384

    # This handle, attached all along, sees everything too.
    assert len(d) == n
    for k in expected[::97]:
        assert d[k] == _workers.growth_value(k)
    s = d.stats()
    assert s.generation == reader_gen and s.capacity == d.capacity == 16 << s.generation
    assert s.len == n and s.grows and s.max_bytes is None
    assert 0 < s.committed_bytes < s.reserved_bytes
    assert s.committed_bytes < 64 << 20
    assert len(s.growth) == s.generation + 1
    for g, rec in enumerate(s.growth):
        assert set(rec) == {"generation", "capacity", "buckets", "at", "pid", "keys"}
        assert rec["generation"] == g and rec["capacity"] == 16 << g
        assert rec["buckets"] == s.growth[0]["buckets"] << g
        if g > 0:
            # A generation becomes current when a key finds the previous full,
            # in one of the writers.
            assert rec["keys"] == 16 << (g - 1)
            assert rec["pid"] in writer_pids
            assert rec["at"] >= s.growth[g - 1]["at"]
    assert abs(s.growth[0]["at"] - time.time()) < 600
    assert f"generation={s.generation}" in repr(s)


def test_max_bytes_gives_full_error(name):
    """A dictionary that may take 8 MiB stops with FullError, having taken no
    more; what was stored stays; removing keys makes room again."""
    limit = 8 << 20
    d = shmdict.ShmDict(name, capacity=16, arena_bytes=64 << 10, max_bytes=limit)
    s = d.stats()
    assert s.max_bytes == limit and s.grows
    value = b"v" * 4000
    stored = 0
    with pytest.raises(shmdict.FullError) as e:
        for i in range(100_000):
            d[f"k{i}"] = value
            stored += 1
    assert isinstance(e.value, shmdict.Error)
    assert name in str(e.value) and "full" in str(e.value)
    assert stored > 100
    s = d.stats()
    assert s.committed_bytes <= limit
    assert os.stat(f"/dev/shm/{name}").st_blocks * 512 <= limit
    assert len(d) == stored
    assert all(d[f"k{i}"] == value for i in range(0, stored, 13))
    for i in range(50):
        del d[f"k{i}"]
    for i in range(50):
        d[f"again{i}"] = value
    assert len(d) == stored
    with pytest.raises(ValueError):
        shmdict.ShmDict(name + "-tiny", max_bytes=256 << 10)


def test_fixed_size_never_grows(name):
    d = shmdict.ShmDict(name, capacity=100, arena_bytes=1 << 20, fixed_size=True)
    for i in range(100):
        d[f"k{i}"] = b"v"
    with pytest.raises(shmdict.FullError, match="fixed size"):
        d["one-too-many"] = b"v"
    s = d.stats()
    assert (s.grows, s.generation, s.capacity, len(s.growth)) == (False, 0, 100, 1)
    assert len(d) == 100 and "one-too-many" not in d
    # Overwrites and removals still work.
    d["k0"] = b"w"
    del d["k1"]
    d["k-new"] = b"v"
    assert d["k0"] == b"w" and len(d) == 100


def test_other_handles_take_the_options(names):
    """PickleDict and Space pass the growth options to their dictionary."""
    p = shmdict.PickleDict(names(), capacity=16, arena_bytes=64 << 10)
    for i in range(1000):
        p[f"k{i}"] = {"i": i}
    assert len(p) == 1000 and p["k999"] == {"i": 999}
    f = shmdict.PickleDict(names(), capacity=16, fixed_size=True)
    with pytest.raises(shmdict.FullError):
        for i in range(17):
            f[i.to_bytes(2, "little")] = i
    s = shmdict.Space(names(), capacity=16, arena_bytes=64 << 10, max_bytes=64 << 20)
    for i in range(2000):
        s.out(("job", i))
    assert len(s) == 2000
    assert sorted(s.take(("job", int))[1] for _ in range(2000)) == list(range(2000))
