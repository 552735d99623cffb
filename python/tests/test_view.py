"""ShmDict.view: zero-copy, read-only buffers over borrowed values that keep
their bytes while other processes overwrite the key, and hold their pin
while any buffer exported from them is alive."""

from __future__ import annotations

import ctypes
import gc
import os
import threading

import _workers
import numpy as np
import pytest

import shmdict


def inode_mapped_at(addr: int) -> int:
    """The inode of the file mapped at `addr` in this process (0: none)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return int(fields[4])
    return 0


def address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def test_view_reads_the_shared_memory_itself(name):
    d = shmdict.ShmDict(name, arena_bytes=1 << 22)
    data = np.arange(512, dtype=np.float64)
    d["xs"] = data.tobytes()
    d[b"\x00bin"] = b"\xff\xfe"
    d["empty"] = b""
    v = d.view("xs")
    assert isinstance(v, shmdict.ValueView)
    assert v.key == b"xs" and len(v) == data.nbytes and not v.released
    assert "ValueView" in repr(v)
    # bytes(), memoryview() and numpy: the bytes of the value, from the
    # segment's own mapping (/dev/shm/NAME), never a copy.
    assert bytes(v) == data.tobytes()
    m = memoryview(v)
    assert m.readonly and m.format == "B" and m.shape == (data.nbytes,) and m.nbytes == data.nbytes
    x = np.frombuffer(v, dtype=np.float64)
    assert np.array_equal(x, data)
    assert not x.flags.writeable
    assert address(m) == x.ctypes.data == address(v)  # one memory
    assert inode_mapped_at(x.ctypes.data) == os.stat(f"/dev/shm/{name}").st_ino
    assert x.ctypes.data % 16 == 0  # values start 16-aligned: any dtype fits
    # Read-only: a writable buffer is refused.
    with pytest.raises(TypeError):
        (ctypes.c_char * len(v)).from_buffer(v)
    # Keys as in d[k]: str (UTF-8) or bytes-like; KeyError with the key.
    assert bytes(d.view(b"\x00bin")) == b"\xff\xfe"
    assert bytes(d.view(memoryview(b"\x00bin"))) == b"\xff\xfe"
    e = d.view("empty")
    assert len(e) == 0 and bytes(e) == b"" and memoryview(e).nbytes == 0
    # Absent: `with` gives None (CONTRACT.md); a buffer of it is KeyError.
    with d.view("absent") as none:
        assert none is None
    a = d.view("absent")
    assert not a
    with pytest.raises(KeyError) as err:
        memoryview(a)
    assert err.value.args == ("absent",)
    with pytest.raises(KeyError):
        len(a)
    with pytest.raises(TypeError):
        d.view(42)
    del m, x
    v.release()
    e.release()


def test_view_keeps_its_bytes_while_another_process_churns(name, spawn):
    size = 3000  # a 4 KiB block
    rounds = 4000
    d = shmdict.ShmDict(name, arena_bytes=64 << 20)
    original = os.urandom(size)
    d["k"] = original
    v = d.view("k")
    m = memoryview(v)
    x = np.frombuffer(v, dtype=np.uint8)
    addr = x.ctypes.data
    q = spawn.Queue()
    p = spawn.Process(target=_workers.churn_key, args=(name, "k", rounds, size, q))
    p.start()
    try:
        assert q.get(timeout=60) == "started"
        seen = set()
        checks = 0
        done = None
        while done is None:
            # The view never changes while the key does.
            assert m == original
            assert x.tobytes() == original
            now = d.get("k")
            if now is not None:
                assert len(now) == size
                seen.add(now[:4])
            checks += 1
            try:
                done = q.get_nowait()
            except Exception:
                pass
        assert done == ("churned", rounds)
        assert d["k"] == _workers.view_value(rounds - 1, size)
        assert len(seen) > 1, "the reads saw the key change"
        # Still the same memory, still the same bytes.
        assert bytes(v) == original and address(v) == addr
        assert np.frombuffer(v, dtype=np.uint8).ctypes.data == addr
        st = d.stats()
        assert st.pins == 1
        assert st.oldest_pin_age is not None and st.oldest_pin_age >= 0
        # Everything unpublished after the pin waits for it.
        assert st.retired_bytes >= rounds * 4096, st
    finally:
        d["released"] = b"1"
        p.join(60)
    assert p.exitcode == 0
    del m, x
    v.release()
    assert d.stats().pins == 0 and d.stats().oldest_pin_age is None
    print(f"{checks} checks of the view while {rounds} writes went on")


def test_release_while_exported_raises_buffer_error(name):
    d = shmdict.ShmDict(name)
    d["k"] = b"value"
    v = d.view("k")
    m = memoryview(v)
    with pytest.raises(BufferError):
        v.release()
    assert not v.released and m == b"value" and d.stats().pins == 1
    x = np.frombuffer(v, dtype=np.uint8)
    m.release()
    with pytest.raises(BufferError):
        v.release()  # the numpy array still uses it
    del x
    v.release()
    v.release()  # twice is fine
    assert v.released and d.stats().pins == 0
    with pytest.raises(BufferError):
        memoryview(v)
    with pytest.raises(BufferError):
        bytes(v)
    with pytest.raises(ValueError):
        len(v)
    # The end of a with block releases the view, but while a memoryview is
    # alive the pin stays, past the block, until the last buffer goes
    # (CONTRACT.md).
    with d.view("k") as w:
        kept = memoryview(w)
    assert kept == b"value" and not w.released and d.stats().pins == 1
    d["k"] = b"other"
    assert kept == b"value"
    kept.release()
    assert w.released and d.stats().pins == 0
    with d.view("k") as w:
        assert bytes(w) == b"other"
    assert w.released and d.stats().pins == 0


def test_a_view_garbage_collected_with_its_buffers_releases_its_pin(name):
    d = shmdict.ShmDict(name)
    d["k"] = b"abc"
    x = np.frombuffer(d.view("k"), dtype=np.uint8)  # the view: only through x
    assert d.stats().pins == 1 and x.tobytes() == b"abc"
    del x
    gc.collect()
    assert d.stats().pins == 0


def test_a_view_outlives_its_dict_object(name):
    d = shmdict.ShmDict(name)
    d["k"] = b"kept"
    v = d.view("k")
    del d
    gc.collect()
    # The handle the view borrows from stays attached while the view lives.
    other = shmdict.ShmDict(name, create=False)
    other["k"] = b"new"
    assert bytes(v) == b"kept" and other.stats().pins == 1
    v.release()
    assert other.stats().pins == 0


def test_views_across_threads(name):
    d = shmdict.ShmDict(name)
    d["k"] = b"x" * 100
    views = [d.view("k") for _ in range(16)]  # joined pin slots
    assert d.stats().pins == 16
    errors = []

    def release(vs):
        try:
            for v in vs:
                assert bytes(v) == b"x" * 100
                v.release()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=release, args=(views[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and d.stats().pins == 0


def test_memory_held_by_a_view_is_reclaimed_after_release(name):
    # While a view is held, memory of values replaced since cannot be
    # reused: a small arena fills (FullError, nothing lost). Once it is
    # released, the same writes find room again.
    size = 3000  # 4 KiB blocks
    d = shmdict.ShmDict(name, arena_bytes=4 << 20, fixed_size=True)
    d["k"] = b"pinned value"
    v = d.view("k")
    i = 0
    with pytest.raises(shmdict.FullError):
        for i in range(2000):  # 8 MiB of values through a 4 MiB arena
            d["churn"] = _workers.view_value(i, size)
    assert i > 100, i
    st = d.stats()
    assert st.pins == 1 and st.retired_bytes > 2 << 20, st
    assert d["churn"] == _workers.view_value(i - 1, size)  # the last write that fit
    assert bytes(v) == b"pinned value"
    v.release()
    assert d.stats().pins == 0
    for j in range(2000):
        d["churn"] = _workers.view_value(j, size)
    st = d.stats()
    assert st.retired_bytes < 1 << 20, st
    assert d["churn"] == _workers.view_value(1999, size)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_view_inherited_through_fork_exports_nothing(name):
    d = shmdict.ShmDict(name)
    d["k"] = b"parent's"
    v = d.view("k")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                memoryview(v)
            except BufferError:
                # The child takes its own view instead.
                code = 0 if bytes(d.view("k")) == b"parent's" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes(v) == b"parent's" and d.stats().pins == 1
    v.release()
    assert d.stats().pins == 0
