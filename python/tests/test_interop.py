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


def run(cli, *args, input=None):
    return subprocess.run(
        [cli, *args], capture_output=True, input=input, timeout=60, check=False
    )


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
