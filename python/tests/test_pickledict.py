"""PickleDict: a MutableMapping of picklable values whose str and bytes keys
come back as they went in."""

from __future__ import annotations

from collections.abc import MutableMapping

import _workers
import pytest

import shmdict


def test_round_trips(name):
    p = shmdict.PickleDict(name)
    assert isinstance(p, MutableMapping)
    values = {
        "int": 2**100,
        "float": 0.1,
        "none": None,
        "list": [1, "two", b"three"],
        "nested": {"a": (1, 2), "b": {3, 4}},
        b"bytes-key": "value of a bytes key",
    }
    p.update(values)
    assert dict(p) == values
    assert len(p) == len(values)
    # The key types come back as they went in; "k" and b"k" are two keys.
    p["k"], p[b"k"] = "str", "bytes"
    assert p["k"] == "str" and p[b"k"] == "bytes"
    assert {type(k) for k in p} == {str, bytes}
    assert p.pop("k") == "str" and "k" not in p and b"k" in p
    assert p.pop("k", "gone") == "gone"
    with pytest.raises(KeyError):
        p.pop("k")
    with pytest.raises(KeyError):
        p["missing"]
    with pytest.raises(KeyError):
        del p["missing"]
    assert p.setdefault("sd", [1]) == [1] and p.setdefault("sd", [2]) == [1]
    assert p.get("missing", 5) == 5
    with pytest.raises(TypeError):
        p[1] = "int keys are not supported"
    assert 1 not in p


def test_storage_scheme_and_foreign_keys(name):
    p = shmdict.PickleDict(name)
    p["a"] = 1
    p[b"a"] = 2
    raw = shmdict.ShmDict(name)
    assert sorted(raw.keys()) == [b"ba", b"sa"]
    raw["foreign"] = b"not ours"  # no prefix byte: not part of the mapping
    assert sorted(p, key=repr) == sorted(["a", b"a"], key=repr)
    assert len(p) == 2


def test_update_key_get_or_insert_wait(name):
    p = shmdict.PickleDict(name)
    assert p.update_key("n", lambda n: n + 1, 0) == 1
    assert p.update_key("n", lambda n: n * 10) == 10
    assert p.get_or_insert_with("memo", lambda: {"x": 1}) == {"x": 1}
    assert p.get_or_insert_with("memo", lambda: 1 / 0) == {"x": 1}
    assert p.wait_for("n", 1) == 10
    assert p.wait_for("never", 0.05) is None
    with p.lock() as g:
        assert g.recovered is False


def test_written_by_another_process(name, spawn):
    p = shmdict.PickleDict(name)
    p["counter"] = 41
    w = spawn.Process(target=_workers.pickle_writer, args=(name,))
    w.start()
    w.join(60)
    assert w.exitcode == 0
    assert p["config"] == {"workers": 4, "ratios": [0.5, 0.25], "name": "ñandú"}
    assert p[b"raw"] == (1, 2.0, None)
    assert p["counter"] == 42
