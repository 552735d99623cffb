"""Space: fields, lindypy-style patterns, blocking with timeouts, and
exactly-once takes by competing processes."""

from __future__ import annotations

import threading
import time
from fractions import Fraction

import _workers
import pytest

import shmdict


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def test_fields_round_trip(name):
    s = shmdict.Space(name)
    tup = ("all", 1, -(2**63), 2.5, "ñ", b"\x00\xff", True, False, None, [1, {"a": 2}], 2**70)
    s.out(tup)
    got = s.take(("all",) + (object,) * (len(tup) - 1))
    assert got == tup
    assert type(got[6]) is bool and type(got[1]) is int
    s.out(("point", Point(1, 2), Fraction(1, 3)))
    assert s.take(("point", Point, Fraction)) == ("point", Point(1, 2), Fraction(1, 3))
    assert len(s) == 0
    with pytest.raises(TypeError):
        s.out(["not", "a", "tuple"])


def test_patterns(name):
    s = shmdict.Space(name)
    s.out(("n", 5))
    s.out(("n", 2.5))
    s.out(("n", True))
    s.out(("n", "five"))
    # A pattern only matches tuples of its own length.
    assert s.try_read(("n",)) is None and s.try_read(("n", object, object)) is None
    assert s.try_read(("n", float)) == ("n", 2.5)
    assert s.try_read(("n", str)) == ("n", "five")
    assert s.try_read(("n", bool)) == ("n", True)
    # int matches booleans too, as isinstance does.
    assert {s.try_take(("n", int))[1], s.try_take(("n", int))[1]} == {5, True}
    assert s.try_take(("n", int)) is None
    assert s.try_take(("n", lambda v: isinstance(v, float) and v > 2)) == ("n", 2.5)
    assert s.try_take(("n", "five")) == ("n", "five")
    s.out(("p", Point(3, 4)))
    assert s.try_read(("p", Point(9, 9))) is None
    assert s.try_take(("p", Point(3, 4))) == ("p", Point(3, 4))  # by equality
    assert len(s) == 0


def test_predicate_exception_propagates_and_takes_nothing(name):
    s = shmdict.Space(name)
    s.out(("job", 1))

    def bad(v):
        raise ValueError("predicate failed")

    with pytest.raises(ValueError, match="predicate failed"):
        s.try_take(("job", bad))
    with pytest.raises(ValueError, match="predicate failed"):
        s.take(("job", bad), timeout=5)
    assert s.try_read(("job", int)) == ("job", 1)


def test_take_timeout_and_wakeup(name):
    s = shmdict.Space(name)
    t0 = time.monotonic()
    assert s.take(("x", int), timeout=0.3) is None
    assert 0.29 <= time.monotonic() - t0 < 3
    assert s.read(("x", int), timeout=0) is None

    def later():
        time.sleep(0.3)
        shmdict.Space(name).out(("x", 7))

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    assert s.take(("x", int)) == ("x", 7)  # timeout=None waits
    assert time.monotonic() - t0 < 5


def test_exactly_once_with_producers_and_consumers(name, spawn):
    shmdict.Space(name)
    per_producer, producers, consumers = 300, 2, 3
    q = spawn.Queue()
    cons = [spawn.Process(target=_workers.consume, args=(name, q)) for _ in range(consumers)]
    prods = [
        spawn.Process(target=_workers.produce, args=(name, i, per_producer))
        for i in range(producers)
    ]
    for p in cons + prods:
        p.start()
    for p in prods:
        p.join(120)
        assert p.exitcode == 0
    s = shmdict.Space(name)
    for _ in cons:
        s.out(("job", -1))  # one poison pill per consumer
    results = [q.get(timeout=120) for _ in cons]
    for p in cons:
        p.join(60)
        assert p.exitcode == 0
    taken = [j for _, got in results for j in got]
    expected = {i * 1_000_000 + k for i in range(producers) for k in range(per_producer)}
    assert len(taken) == len(expected)  # nothing taken twice
    assert set(taken) == expected  # nothing lost
    assert len(s) == 0


def test_opaque_bytes_pass_through(name):
    s = shmdict.Space(name)
    s.out(("raw", shmdict.Opaque(b"\x07postcard")))
    got = s.take(("raw", object))
    assert got == ("raw", shmdict.Opaque(b"\x07postcard"))
