"""Fixtures shared by the tests: unique segment names, cleaned up after."""

from __future__ import annotations

import multiprocessing
import os
import sys
import uuid

import pytest

import shmdict

# The worker functions live in _workers.py, next to this file; spawned
# processes import it by name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def name(request):
    """A fresh segment name, unlinked after the test (if it still exists)."""
    n = f"pytest-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield n
    try:
        shmdict.ShmDict.unlink(n)
    except FileNotFoundError:
        pass


@pytest.fixture
def names():
    """A factory of fresh segment names, all unlinked after the test."""
    made = []

    def make():
        n = f"pytest-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        made.append(n)
        return n

    yield make
    for n in made:
        try:
            shmdict.ShmDict.unlink(n)
        except FileNotFoundError:
            pass


@pytest.fixture(scope="session")
def spawn():
    """multiprocessing with the spawn start method: fresh interpreters."""
    return multiprocessing.get_context("spawn")
