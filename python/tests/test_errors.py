"""Errors map to Python's conventions; garbage segments raise, never crash."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import shmdict


def test_hierarchy():
    for cls in (shmdict.FullError, shmdict.CorruptError, shmdict.IncompatibleError):
        assert issubclass(cls, shmdict.Error)
    assert issubclass(shmdict.Error, Exception)
    assert shmdict.FullError.__module__ == "shmdict"


@pytest.mark.parametrize("bad", ["", "a/b", "../etc", "x" * 201, "é", ".", "a b"])
def test_invalid_names(bad):
    for open_ in (
        lambda: shmdict.ShmDict(bad),
        lambda: shmdict.PickleDict(bad),
        lambda: shmdict.Value(bad, "i"),
        lambda: shmdict.Array(bad, "i", 1),
        lambda: shmdict.Space(bad),
        lambda: shmdict.ShmDict.unlink(bad),
    ):
        with pytest.raises(ValueError):
            open_()


def test_create_flags_and_unlink(name):
    for open_missing in (
        lambda: shmdict.ShmDict(name, create=False),
        lambda: shmdict.PickleDict(name, create=False),
        lambda: shmdict.Space(name, create=False),
    ):
        with pytest.raises(FileNotFoundError):
            open_missing()
    with pytest.raises(FileNotFoundError):
        shmdict.ShmDict.unlink(name)
    with pytest.raises(FileNotFoundError):
        shmdict.Space.unlink(name)
    with pytest.raises(FileNotFoundError):
        shmdict.PickleDict.unlink(name)
    d = shmdict.ShmDict(name, create_new=True, mode=0o640)
    assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o640
    with pytest.raises(FileExistsError):
        shmdict.ShmDict(name, create_new=True)
    with pytest.raises(FileExistsError):
        shmdict.Space(name, create_new=True)
    with pytest.raises(ValueError):
        shmdict.ShmDict(name, create=False, create_new=True)
    d["k"] = b"v"
    shmdict.ShmDict.unlink(name)
    assert d["k"] == b"v"  # the attached handle keeps working
    with pytest.raises(FileNotFoundError):
        shmdict.ShmDict(name, create=False)


def test_full_is_clean(name):
    # Of fixed size: a dictionary that grows would take all of /dev/shm first
    # (test_growth.py tests max_bytes).
    d = shmdict.ShmDict(name, capacity=8, arena_bytes=1 << 16, fixed_size=True)
    stored = {}
    with pytest.raises(shmdict.FullError):
        for i in range(10_000):
            d[f"k{i}"] = b"x" * 100
            stored[f"k{i}".encode()] = b"x" * 100
    assert dict(d.items()) == stored  # nothing stored was lost
    with pytest.raises(shmdict.FullError):
        d["huge"] = b"x" * (1 << 20)  # larger than any block
    d.pop(next(iter(stored)))
    d["again"] = b"room"  # freeing space makes room
    assert d["again"] == b"room"
    with pytest.raises(ValueError):
        shmdict.ShmDict(name + "x", capacity=0)


GARBAGE = textwrap.dedent(
    """
    import os, random, sys, shmdict
    name = sys.argv[1]
    path = "/dev/shm/" + name
    rng = random.Random(7)
    outcomes = []

    def attempt(content):
        with open(path, "wb") as f:
            f.write(content)
        # Private, as shmdict creates them: a file more open than the
        # opener's mode is refused (PermissionError) before its content
        # is looked at, and the content is what this test is about.
        os.chmod(path, 0o600)
        for open_ in (lambda: shmdict.ShmDict(name, create=False),
                      lambda: shmdict.Value(name, "i", create=False),
                      lambda: shmdict.Array(name, "d", 4, create=False),
                      lambda: shmdict.Space(name, create=False)):
            try:
                obj = open_()
            except shmdict.Error as e:
                outcomes.append(type(e).__name__)
                continue
            outcomes.append("opened")

    attempt(b"")
    attempt(b"\\0" * 4096)
    attempt(b"\\0" * (1 << 20))
    for size in (16, 4096, 1 << 16, 1 << 20):
        attempt(bytes(rng.getrandbits(8) for _ in range(size)))

    # A real dictionary whose index and arena are then scribbled over.
    os.unlink(path)
    d = shmdict.ShmDict(name, capacity=64, arena_bytes=1 << 16)
    for i in range(50):
        d[f"key{i}"] = b"v" * i
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for _ in range(200):
            f.seek(rng.randrange(4096, size - 8))
            f.write(rng.getrandbits(64).to_bytes(8, "little"))
    for op in (lambda: [d.get(f"key{i}") for i in range(50)], lambda: d.keys(),
               lambda: [d.update_key(f"key{i}", lambda o: b"new") for i in range(50)],
               lambda: [d.pop(f"key{i}", None) for i in range(50)]):
        try:
            op()
            outcomes.append("ran")
        except shmdict.Error as e:
            outcomes.append(type(e).__name__)
    print("ok", sorted(set(outcomes)))
    """
)


def test_garbage_segments_raise_never_crash(name):
    r = subprocess.run(
        [sys.executable, "-c", GARBAGE, name], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok"), r.stdout
    # Garbage was recognized as such at least once.
    assert "CorruptError" in r.stdout or "IncompatibleError" in r.stdout, r.stdout
