"""Value and Array: typecodes, atomic fetch_add across processes, numpy
buffers over the shared memory (no copies), and their locks."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
import time

import _workers
import numpy as np
import pytest

import shmdict

INT_RANGES = {
    "b": (-(2**7), 2**7 - 1),
    "B": (0, 2**8 - 1),
    "h": (-(2**15), 2**15 - 1),
    "H": (0, 2**16 - 1),
    "i": (-(2**31), 2**31 - 1),
    "I": (0, 2**32 - 1),
    "l": (-(2**63), 2**63 - 1),
    "L": (0, 2**64 - 1),
    "q": (-(2**63), 2**63 - 1),
    "Q": (0, 2**64 - 1),
}


@pytest.mark.parametrize("typecode", list(INT_RANGES))
def test_value_integers(names, typecode):
    lo, hi = INT_RANGES[typecode]
    v = shmdict.Value(names(), typecode, init=7)
    assert v.value == 7 and v.typecode == typecode
    v.value = hi
    assert v.value == hi
    assert v.fetch_add(1) == hi and v.value == lo  # wraps like a C atomic
    v.value = lo
    with pytest.raises(OverflowError):
        v.value = hi + 1
    with pytest.raises(TypeError):
        v.value = "1"


@pytest.mark.parametrize("typecode", ["f", "d"])
def test_value_floats(names, typecode):
    v = shmdict.Value(names(), typecode, init=1.5)
    assert v.value == 1.5
    assert v.fetch_add(0.25) == 1.5 and v.value == 1.75
    v.value = -2
    assert v.value == -2.0


def test_value_fetch_add_across_processes(name, spawn):
    v = shmdict.Value(name, "Q")
    n = 50_000
    start = time.time() + 1.5  # every interpreter started: they overlap
    procs = [spawn.Process(target=_workers.fetch_add, args=(name, "Q", n, start)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert v.value == 4 * n


def test_value_type_is_checked(name):
    shmdict.Value(name, "i", 3)
    assert shmdict.Value(name, "i").value == 3  # init only on creation
    with pytest.raises(shmdict.IncompatibleError):
        shmdict.Value(name, "d")
    with pytest.raises(shmdict.IncompatibleError):
        shmdict.ShmDict(name)
    with pytest.raises(ValueError):
        shmdict.Value(name, "x")
    with pytest.raises(ValueError):
        shmdict.Value(name, "ii")


def test_array_indexing(name):
    a = shmdict.Array(name, "i", 5)
    assert len(a) == 5 and a.itemsize == 4 and a.tolist() == [0] * 5
    a[0] = 10
    a[-1] = 50
    assert a[0] == 10 and a[4] == 50 and a[-5] == 10
    for i in (5, -6, 10**6):
        with pytest.raises(IndexError):
            a[i]
        with pytest.raises(IndexError):
            a[i] = 1
    with pytest.raises(OverflowError):
        a[1] = 2**31
    with pytest.raises(shmdict.IncompatibleError):
        shmdict.Array(name, "i", 6)
    with pytest.raises(shmdict.IncompatibleError):
        shmdict.Array(name, "f", 5)


def test_array_buffers_are_the_shared_memory(name):
    a = shmdict.Array(name, "d", 1000)
    with a.write() as m:
        assert not m.readonly and len(m) == 1000
        x = np.asarray(m)
        assert x.dtype == np.float64 and x.shape == (1000,)
        assert memoryview(m).format == "d" and memoryview(m).itemsize == 8
        x[:] = np.arange(1000)
        addr = x.__array_interface__["data"][0]
        del x
    assert a[999] == 999.0  # written in place, seen by element access
    with a.read() as m1:
        y = np.asarray(m1)
        assert not y.flags.writeable
        # The same address as the write view: no copy was made.
        assert y.__array_interface__["data"][0] == addr
        with pytest.raises((TypeError, ValueError)):
            memoryview(m1)[0] = 1.0
        assert y.sum() == sum(range(1000))
        del y


def test_numpy_shared_between_processes(name, spawn):
    length = 100_000
    a = shmdict.Array(name, "d", length)
    p = spawn.Process(target=_workers.fill_array, args=(name, "d", length, 0.5))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    with a.read() as m:
        x = np.asarray(m)
        assert x[0] == 0.5 and x[-1] == length - 0.5
        del x
    # And the reverse: written through this process's numpy view, summed
    # through the child's.
    with a.write() as m:
        np.asarray(m)[:] = 2.0
    q = spawn.Queue()
    p = spawn.Process(target=_workers.array_sum, args=(name, "d", length, q))
    p.start()
    assert q.get(timeout=60) == 2.0 * length
    p.join(60)


BLOCKED_READER = textwrap.dedent(
    """
    import sys, shmdict
    a = shmdict.Array(sys.argv[1], "i", 4, create=False)
    print(a[0], flush=True)
    """
)


def test_lock_held_until_last_export_released(name):
    a = shmdict.Array(name, "i", 4)
    with a.write() as m:
        x = np.asarray(m)
        x[0] = 7
    # The with block ended, but x still exports the buffer: still locked.
    assert m.held
    with pytest.raises(BufferError):
        m.release()
    reader = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_READER, name], stdout=subprocess.PIPE, text=True
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            reader.communicate(timeout=1.0)  # waits for our exclusive lock
        del x  # the last export: the lock goes
        assert not m.held
        out, _ = reader.communicate(timeout=20)
    finally:
        reader.kill()
    assert out.strip() == "7"
    with pytest.raises(BufferError):
        memoryview(m)  # released


def test_buffer_release_and_self_deadlock(name):
    a = shmdict.Array(name, "B", 8)
    m = a.write()
    with pytest.raises(RuntimeError):
        a[0]  # this thread holds the exclusive lock
    with pytest.raises(RuntimeError):
        a.read()
    m.release()
    assert not m.held
    a[0] = 1
    with a.read() as r:
        assert a[0] == 1  # shared + shared is fine
        with pytest.raises(RuntimeError):
            a[0] = 2
        assert not np.asarray(r).flags.writeable
        with pytest.raises((BufferError, TypeError)):
            (ctypes.c_uint8 * 8).from_buffer(r)  # asks for a writable buffer


ARRAY_WRITER = textwrap.dedent(
    """
    import sys, time, shmdict
    a = shmdict.Array(sys.argv[1], "i", 4, create=False)
    m = a.write()
    print("writing", flush=True)
    time.sleep(3600)
    """
)


def test_sigkilled_array_writer_is_recovered(name):
    a = shmdict.Array(name, "i", 4)
    child = subprocess.Popen(
        [sys.executable, "-c", ARRAY_WRITER, name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        child.kill()
        child.wait(10)
    finally:
        child.kill()
    with a.write() as m:
        assert m.recovered
    with a.write() as m:
        assert not m.recovered


def test_handles_pickle_by_name(names):
    import pickle

    v = shmdict.Value(names(), "h", 5)
    a = shmdict.Array(names(), "f", 3)
    a[2] = 1.5
    v2, a2 = pickle.loads(pickle.dumps((v, a)))
    assert (v2.value, v2.typecode) == (5, "h")
    assert (len(a2), a2[2]) == (3, 1.5)


def test_create_flags(name):
    with pytest.raises(FileNotFoundError):
        shmdict.Value(name, "i", create=False)
    with pytest.raises(FileNotFoundError):
        shmdict.Array(name, "i", 3, create=False)
    shmdict.Array(name, "i", 3, create_new=True)
    with pytest.raises(FileExistsError):
        shmdict.Array(name, "i", 3, create_new=True)
    shmdict.Array.unlink(name)
    with pytest.raises(FileNotFoundError):
        shmdict.Array.unlink(name)
    with pytest.raises(FileNotFoundError):
        shmdict.Value.unlink(name)


def test_array_element_access_waits_without_gil(name):
    """A thread blocked on the array's lock does not stop other threads."""
    import threading

    a = shmdict.Array(name, "i", 2)
    m = a.write()
    got = []

    def reader():
        b = shmdict.Array(name, "i", 2)  # another handle: waits, no deadlock error
        got.append(b[0])

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.3)
    assert got == []  # still waiting for the write lock
    np.asarray(m)[0] = 9
    m.release()
    t.join(10)
    assert got == [9]


def test_value_array_space_after_fork(names):
    import os

    v = shmdict.Value(names(), "q")
    a = shmdict.Array(names(), "i", 3)
    s = shmdict.Space(names())
    pid = os.fork()
    if pid == 0:  # the child uses the inherited handles
        code = 1
        try:
            v.fetch_add(5)
            a[1] = 7
            with a.write() as m:
                np.asarray(m)[2] = 9
            s.out(("from-child", os.getpid()))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert v.value == 5 and a.tolist() == [0, 7, 9]
    assert s.try_take(("from-child", pid)) == ("from-child", pid)
