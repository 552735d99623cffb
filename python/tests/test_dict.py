"""ShmDict: the mapping protocol, atomic read-modify-writes, waiting and the
lock, across threads, spawned processes and fork."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import MutableMapping

import _workers
import pytest

import shmdict


def test_mapping_protocol(name):
    d = shmdict.ShmDict(name, capacity=1000, arena_bytes=1 << 20)
    assert isinstance(d, MutableMapping)
    assert len(d) == 0 and list(d) == []
    d["alpha"] = b"1"
    d[b"beta"] = bytearray(b"2")
    d[memoryview(b"gamma")] = memoryview(b"3")
    d["ñ"] = b"utf-8 key"
    # str keys are their UTF-8 bytes; everything comes back as bytes.
    assert d[b"alpha"] == b"1" and d["beta"] == b"2" and d["gamma"] == b"3"
    assert d["ñ".encode()] == b"utf-8 key"
    assert len(d) == 4
    assert sorted(d) == sorted(d.keys()) == [b"alpha", b"beta", b"gamma", "ñ".encode()]
    assert sorted(d.values()) == [b"1", b"2", b"3", b"utf-8 key"]
    assert (b"alpha", b"1") in d.items()
    assert "alpha" in d and b"alpha" in d and "delta" not in d and 42 not in d
    assert d.get("delta") is None and d.get("delta", b"x") == b"x" and d.get("alpha") == b"1"
    with pytest.raises(KeyError) as e:
        d["delta"]
    assert e.value.args == ("delta",)
    del d["gamma"]
    with pytest.raises(KeyError):
        del d["gamma"]
    assert d.pop("beta") == b"2" and "beta" not in d
    assert d.pop("beta", None) is None
    with pytest.raises(KeyError):
        d.pop("beta")
    assert d.setdefault("alpha", b"other") == b"1"
    assert d.setdefault("new", b"fresh") == b"fresh" and d["new"] == b"fresh"
    d.update({"u1": b"a"}, u2=b"b")
    assert d["u1"] == b"a" and d["u2"] == b"b"
    d["empty"] = b""
    assert d["empty"] == b""
    d.clear()
    assert len(d) == 0
    with pytest.raises(TypeError):
        d[1] = b"x"
    with pytest.raises(TypeError):
        d["k"] = "a str value"
    with pytest.raises(TypeError):
        d["k"] = None


def test_update_key_semantics(name):
    d = shmdict.ShmDict(name)
    assert d.update_key("n", lambda old: None) is None and "n" not in d
    assert d.update_key("n", lambda old: b"1" if old is None else old + b"!") == b"1"
    assert d.update_key("n", lambda old: old + b"!") == b"1!"

    def boom(old):
        raise ZeroDivisionError("inside fn")

    with pytest.raises(ZeroDivisionError, match="inside fn"):
        d.update_key("n", boom)
    assert d["n"] == b"1!"  # unchanged
    with pytest.raises(ZeroDivisionError):
        d.update_key("absent", boom)
    assert "absent" not in d
    with pytest.raises(TypeError):
        d.update_key("n", lambda old: 5)  # not bytes: nothing written
    assert d["n"] == b"1!"
    assert d.update_key("n", lambda old: None) is None and "n" not in d
    with pytest.raises(TypeError):
        d.update_key("n", "not callable")


def test_get_or_insert_with_exception_stores_nothing(name):
    d = shmdict.ShmDict(name)

    def fail():
        raise RuntimeError("no value")

    with pytest.raises(RuntimeError):
        d.get_or_insert_with("k", fail)
    assert "k" not in d
    assert d.get_or_insert_with("k", lambda: b"v") == b"v"
    assert d.get_or_insert_with("k", fail) == b"v"  # present: fn not called


def test_update_key_four_processes_lose_nothing(name, spawn):
    d = shmdict.ShmDict(name)
    n = 5000
    start = time.time() + 1.5  # every interpreter started: they overlap
    procs = [
        spawn.Process(target=_workers.increment, args=(name, "count", n, start)) for _ in range(3)
    ]
    # The fourth process gets the handle itself (pickled by name).
    procs.append(spawn.Process(target=_workers.increment_handle, args=(d, "count", n, start)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert int(d["count"]) == 4 * n


def test_update_key_threads_lose_nothing(name):
    d = shmdict.ShmDict(name)

    def work():
        for _ in range(300):
            d.update_key("c", lambda old: str(int(old or b"0") + 1).encode())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d["c"] == b"1200"


def test_setdefault_race_one_winner(name, spawn):
    shmdict.ShmDict(name)
    q = spawn.Queue()
    start = time.time() + 1.5  # after every interpreter has started
    procs = [
        spawn.Process(target=_workers.setdefault_race, args=(name, "k", i, start, q))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(set(results)) == 1, results
    assert results[0] in {b"0", b"1", b"2", b"3"}
    assert shmdict.ShmDict(name)["k"] == results[0]


def test_get_or_insert_with_runs_once(names, spawn):
    name, counter = names(), names()
    shmdict.ShmDict(name)
    runs = shmdict.Value(counter, "q")
    q = spawn.Queue()
    start = time.time() + 1.5
    procs = [
        spawn.Process(target=_workers.memoize_race, args=(name, counter, "k", i, start, q))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert runs.value == 1  # fn ran in exactly one process
    assert len(set(results)) == 1 and results[0].startswith(b"computed by ")


def test_wait_for_wakes_across_processes(name, spawn):
    d = shmdict.ShmDict(name)
    q = spawn.Queue()
    p = spawn.Process(target=_workers.wait_for_key, args=(name, "result", 30.0, q))
    p.start()
    assert q.get(timeout=30) == "waiting"
    time.sleep(0.3)
    d["result"] = b"42"
    value, waited = q.get(timeout=30)
    p.join(30)
    assert value == b"42"
    assert 0.25 <= waited < 10


def test_wait_for_timeout_and_present(name):
    d = shmdict.ShmDict(name)
    t0 = time.monotonic()
    assert d.wait_for("nothing", 0.25) is None
    assert 0.24 <= time.monotonic() - t0 < 2
    assert d.wait_for("nothing", 0) is None
    d["here"] = b"x"
    assert d.wait_for("here", 5) == b"x"
    with pytest.raises(ValueError):
        d.wait_for("here", -1)


def test_wait_for_releases_the_gil(name):
    d = shmdict.ShmDict(name)
    got = []
    t = threading.Thread(target=lambda: got.append(d.wait_for("k", 10)))
    t.start()
    # This thread keeps running Python code while the other one waits.
    time.sleep(0.2)
    spins = sum(1 for _ in range(100_000))
    d["k"] = b"v"
    t.join(10)
    assert spins == 100_000 and got == [b"v"]


SIGINT_CHILD = textwrap.dedent(
    """
    import sys, time, shmdict
    d = shmdict.ShmDict(sys.argv[1], create=False)
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        if sys.argv[2] == "wait_for":
            d.wait_for("never", None)
        else:
            shmdict.Space(sys.argv[1], create=False).take(("never", int))
    except KeyboardInterrupt:
        print("interrupted %.3f" % (time.monotonic() - t0), flush=True)
        sys.exit(0)
    print("returned", flush=True)
    sys.exit(1)
    """
)


@pytest.mark.parametrize("op", ["wait_for", "take"])
def test_ctrl_c_interrupts_blocking_calls(name, op):
    shmdict.ShmDict(name)
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_CHILD, name, op], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # well inside the blocking call
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=10)
        latency = time.monotonic() - sent
    finally:
        child.kill()
    assert out.startswith("interrupted"), out
    assert child.returncode == 0
    assert latency < 1.0, latency


LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time, shmdict
    d = shmdict.ShmDict(sys.argv[1], create=False)
    with d.lock() as g:
        d["holder"] = b"in"
        print("locked", flush=True)
        time.sleep(3600)
    """
)


def test_sigkilled_lock_holder_is_recovered(name):
    d = shmdict.ShmDict(name)
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        child.kill()  # SIGKILL while holding the lock
        child.wait(10)
    finally:
        child.kill()
    with d.lock() as g:
        assert g.recovered is True
        d["holder"] = b"recovered"
    with d.lock() as g:
        assert g.recovered is False
    assert d["holder"] == b"recovered"


def _interrupt_after(delay: float) -> threading.Thread:
    """Sends SIGINT to this process after `delay` seconds, from a thread."""
    t = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    t.start()
    return t


def test_ctrl_c_interrupts_lock_held_by_another_process(name):
    # lock() waits for a live holder without the GIL, in slices: SIGINT
    # raises KeyboardInterrupt here within a fraction of a second.
    d = shmdict.ShmDict(name)
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        timer = _interrupt_after(0.5)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            with d.lock():
                pass
        waited = time.monotonic() - t0
        timer.join()
        assert child.poll() is None, "the holder still holds the lock"
        print(f"KeyboardInterrupt {waited - 0.5:.3f} s after SIGINT")
        assert 0.5 <= waited < 1.0, waited  # SIGINT at 0.5 s, seen within 0.5 s
        # Interrupted while waiting: nothing held, the next lock() works once
        # the holder is gone (it dies holding it: recovered).
    finally:
        child.kill()
        child.wait(10)
    with d.lock() as g:
        assert g.recovered is True


def test_lock_excludes_threads(name):
    d = shmdict.ShmDict(name)
    d["a"], d["b"] = b"100", b"0"
    torn = []

    def transfer():
        for _ in range(200):
            with d.lock():
                a, b = int(d["a"]), int(d["b"])
                d["a"] = str(a - 1).encode()
                d["b"] = str(b + 1).encode()

    def audit():
        for _ in range(200):
            with d.lock():
                if int(d["a"]) + int(d["b"]) != 100:
                    torn.append(1)

    threads = [threading.Thread(target=transfer) for _ in range(2)]
    threads.append(threading.Thread(target=audit))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert torn == []
    assert (int(d["a"]), int(d["b"])) == (-300, 400)


def test_lock_misuse_raises(name):
    d = shmdict.ShmDict(name)
    g = d.lock()
    with g:
        with pytest.raises(RuntimeError):
            g.__enter__()
        with pytest.raises(ValueError):  # the same thread takes it twice
            with d.lock():
                pass
    with d.lock():
        pass


def test_lock_object_across_threads_raises_not_panics(name):
    d = shmdict.ShmDict(name)
    g = d.lock()
    entered = threading.Event()
    leave = threading.Event()
    errors = []

    def holder():
        with g:
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(10)
    with pytest.raises(RuntimeError):
        g.__exit__(None, None, None)  # not the entering thread
    with pytest.raises(RuntimeError):
        g.__enter__()  # already held
    # Another lock object from another thread waits for the holder.
    got = []
    t2 = threading.Thread(target=lambda: got.append(d.lock().__enter__().recovered))
    t2.start()
    time.sleep(0.2)
    assert got == []
    leave.set()
    t.join(10)
    t2.join(10)
    assert got == [False] and errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_handle_usable_after_fork(name):
    d = shmdict.ShmDict(name)
    d["before"] = b"1"
    pid = os.fork()
    if pid == 0:  # the child: use the inherited handle
        code = 1
        try:
            d.update_key("count", lambda old: b"child")
            with d.lock() as g:
                d["child-saw"] = d["before"]
                code = 0 if not g.recovered else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert d["count"] == b"child" and d["child-saw"] == b"1"
    # The parent's handle still works, and its lock is free.
    d["after"] = b"2"
    with d.lock() as g:
        assert not g.recovered


def test_fork_child_reattaches_a_segment_opened_with_a_wider_mode(name):
    # Regression: a forked child reattached with the default mode 0600, so a
    # dictionary (or space) opened with mode=0o644 was refused with
    # PermissionError in the child: it must accept what the parent accepted.
    d = shmdict.ShmDict(name, mode=0o644)
    s = shmdict.Space(name + "-space", mode=0o644)
    try:
        d["before"] = b"1"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                d["child"] = d["before"]
                s.out(("child", 1))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert d["child"] == b"1"
        assert s.try_take(("child", int)) == ("child", 1)
    finally:
        shmdict.Space.unlink(name + "-space")
