"""One format, one set of names: what Python writes, the Rust `shmdict` CLI
reads, and the reverse. The CLI is built from this repository."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import shmdict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def cli():
    """The `shmdict` binary, built with `cargo build --bin shmdict`."""
    subprocess.run(
        ["cargo", "build", "--quiet", "--bin", "shmdict"], cwd=ROOT, check=True, timeout=1200
    )
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    path = os.path.join(target, "debug", "shmdict")
    assert os.access(path, os.X_OK), path
    return path


@pytest.fixture(scope="session")
def peer():
    """The Rust peer `examples/python_peer.rs`, built with cargo."""
    subprocess.run(
        ["cargo", "build", "--quiet", "--example", "python_peer"],
        cwd=ROOT,
        check=True,
        timeout=1200,
    )
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    path = os.path.join(target, "debug", "examples", "python_peer")
    assert os.access(path, os.X_OK), path
    return path


def ask(peer, *args):
    r = subprocess.run([peer, *args], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def run(cli, *args, input=None):
    return subprocess.run([cli, *args], capture_output=True, input=input, timeout=60, check=False)


@pytest.mark.timeout(1300)
def test_python_writes_cli_reads(cli, name):
    d = shmdict.ShmDict(name)
    d["greeting"] = b"hello from python"
    d[b"\x00bin"] = b"\xff\xfe"
    r = run(cli, "get", name, "greeting")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello from python\n"
    r = run(cli, "get", name, "--key-hex", "0062696e", "--raw")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"\xff\xfe"
    r = run(cli, "keys", name, "--hex")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted([b"0062696e", b"greeting".hex().encode()])
    assert run(cli, "get", name, "absent").returncode == 3
    # PickleDict keys are visible as their prefixed bytes.
    shmdict.PickleDict(name)["p"] = 1
    r = run(cli, "dump", name)
    keys = {json.loads(line).get("key") for line in r.stdout.splitlines()}
    assert "sp" in keys and "greeting" in keys


@pytest.mark.timeout(1300)
def test_cli_writes_python_reads(cli, name):
    d = shmdict.ShmDict(name)
    r = run(cli, "set", name, "from-cli", "written by rust")
    assert r.returncode == 0, r.stderr
    assert d["from-cli"] == b"written by rust"
    r = run(cli, "set", name, "stdin-key", input=b"\x00\x01binary")
    assert r.returncode == 0, r.stderr
    assert d["stdin-key"] == b"\x00\x01binary"
    r = run(cli, "del", name, "from-cli")
    assert r.returncode == 0, r.stderr
    assert "from-cli" not in d
    # A dictionary created by the CLI opens from Python.
    other = name + "-cli"
    try:
        r = run(cli, "set", other, "k", "v", "--create")
        assert r.returncode == 0, r.stderr
        assert shmdict.ShmDict(other, create=False)["k"] == b"v"
    finally:
        shmdict.ShmDict.unlink(other)


@pytest.mark.timeout(1300)
def test_wait_for_wakes_on_cli_write(cli, name):
    import threading

    d = shmdict.ShmDict(name)
    got = []
    t = threading.Thread(target=lambda: got.append(d.wait_for("signal", 30)))
    t.start()
    r = run(cli, "set", name, "signal", "go")
    assert r.returncode == 0, r.stderr
    t.join(30)
    assert got == [b"go"]


@pytest.mark.timeout(1300)
def test_rust_reads_and_writes_python_dict(peer, name):
    d = shmdict.ShmDict(name)
    d["from-python"] = b"written by python"
    assert ask(peer, "dict", name) == "written by python"
    assert d["from-rust"] == b"written by rust"


@pytest.mark.timeout(1300)
def test_value_and_array_shared_with_rust(peer, names):
    import numpy as np

    v = shmdict.Value(names(), "i", 5)  # Rust's Value<i32>
    assert ask(peer, "value", v.name) == "5"
    assert v.value == 15
    a = shmdict.Array(names(), "d", 10)  # Rust's Array<f64>
    with a.write() as m:
        np.asarray(m)[:] = 1.5
    assert float(ask(peer, "array", a.name, "10")) == 15.0
    assert a.tolist() == [2.0 * i for i in range(10)]


@pytest.mark.timeout(1300)
def test_space_tuples_shared_with_rust(peer, name):
    s = shmdict.Space(name)
    assert ask(peer, "space-out", name) == "posted"
    assert s.take(("from-rust", int, float, str, bytes, bool), timeout=10) == (
        "from-rust",
        7,
        2.5,
        "text",
        b"bytes",
        True,
    )
    s.out(("from-python", 42, 0.5, "ñ", b"\x00b", False))
    assert ask(peer, "space-take", name) == "42 0.5 ñ \x00b false"


@pytest.mark.timeout(1300)
def test_view_of_a_value_written_by_the_cli(cli, name):
    import numpy as np

    d = shmdict.ShmDict(name)
    data = np.linspace(0.0, 1.0, 1000)
    r = run(cli, "set", name, "samples", input=data.tobytes())
    assert r.returncode == 0, r.stderr
    with d.view("samples") as v:
        x = np.frombuffer(v, dtype=np.float64)  # no copy: 16-aligned in the segment
        assert np.array_equal(x, data)
        # The CLI overwrites, then removes, the key: the view keeps its bytes.
        r = run(cli, "set", name, "samples", "replaced by the cli")
        assert r.returncode == 0, r.stderr
        assert d["samples"] == b"replaced by the cli"
        r = run(cli, "del", name, "samples")
        assert r.returncode == 0, r.stderr
        assert "samples" not in d
        assert np.array_equal(x, data) and bytes(v) == data.tobytes()
        del x
    assert d.stats().pins == 0
