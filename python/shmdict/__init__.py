"""Shared memory that unrelated processes open by name, with no server.

- :class:`ShmDict`: a dictionary of bytes (str or bytes keys, bytes values).
- :class:`PickleDict`: the same with any picklable values, as a
  ``MutableMapping`` whose str and bytes keys come back as they went in.
- :class:`Value` and :class:`Array`: numbers and arrays of numbers with the
  ``array`` module's typecodes; ``Array.read()``/``write()`` give buffers that
  numpy uses without copying.
- :class:`Space`: a Linda tuple space (``out``, ``take``, ``read``).

Every object is opened by name (1 to 200 characters of ``[A-Za-z0-9._-]``)
and lives in ``/dev/shm`` until ``unlink(name)``; segments are private to
their user by default (``mode=0o600``). The segments are the Rust crate's:
Rust programs and the ``shmdict`` command-line tool read and write the same
dictionaries.

Handles can be passed to ``multiprocessing`` workers (they pickle by name)
and keep working in a child after ``os.fork`` (they reattach by name).

Security: ``PickleDict`` and the opaque fields of ``Space`` unpickle what
other processes wrote. Only share them with processes you trust (the
default ``mode=0o600`` keeps other users out).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable, Optional, Union

from ._shmdict import Array as _Array
from ._shmdict import (
    ArrayBuffer,
    CorruptError,
    DictLock,
    Error,
    FullError,
    IncompatibleError,
    Stats,
    ValueView,
    _Space,
)
from ._shmdict import ShmDict as _ShmDict
from ._shmdict import Value as _Value

__all__ = [
    "Array",
    "ArrayBuffer",
    "CorruptError",
    "DictLock",
    "Error",
    "FullError",
    "IncompatibleError",
    "Opaque",
    "PickleDict",
    "ShmDict",
    "Space",
    "Stats",
    "Value",
    "ValueView",
]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _attach(cls: type, name: str) -> Any:
    return cls(name, create=False)


class ShmDict(_ShmDict, MutableMapping):
    """A dictionary in POSIX shared memory that unrelated processes open by name.

    ``ShmDict(name, *, capacity=None, arena_bytes=None, create=True,
    create_new=False, mode=0o600, max_bytes=None, fixed_size=False)``
    attaches to the dictionary ``name`` or creates it (``capacity``: live
    keys its index holds at first, default 1,048,576; ``arena_bytes``: room
    for keys and values at first, default 1 GiB or a quarter of /dev/shm;
    pages are committed only when written). ``create=False`` raises
    FileNotFoundError if it does not exist; ``create_new=True`` raises
    FileExistsError if it does.

    A new dictionary grows while every process stays attached: inserts
    beyond ``capacity`` or ``arena_bytes`` succeed and every process sees
    the keys, without reopening. ``max_bytes`` caps all the /dev/shm memory
    it may take (``shmdict.FullError`` beyond it; default: no limit but
    /dev/shm); ``fixed_size=True`` never grows (``FullError`` at
    ``capacity`` keys or when the arena is full). Its file in /dev/shm is a
    sparse reservation as large as the most it may take: ``ls -l`` shows
    that size, ``du`` and ``stats().committed_bytes`` the memory it takes.
    Options other than ``create``/``create_new`` are ignored when attaching.

    Keys are ``str`` (stored as UTF-8) or bytes-like, values bytes-like;
    both come back as ``bytes``. Every single-key operation is atomic and
    lock-free across processes; ``setdefault``, ``pop``, ``update_key`` and
    ``get_or_insert_with`` are atomic read-modify-writes.

    ``view(key)`` reads a value without copying it: ``with d.view(key) as
    v: numpy.frombuffer(v, dtype)`` works on the shared memory itself,
    whose bytes do not change while the view is held.
    """

    __slots__ = ()

    def values(self) -> list[bytes]:  # type: ignore[override]
        """The values of the keys present now (a snapshot list)."""
        out = []
        for k in self.keys():
            v = _ShmDict.get(self, k)
            if v is not None:
                out.append(v)
        return out

    def items(self) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        """The (key, value) pairs present now (a snapshot list)."""
        out = []
        for k in self.keys():
            v = _ShmDict.get(self, k)
            if v is not None:
                out.append((k, v))
        return out

    def popitem(self) -> tuple[bytes, bytes]:
        """Removes and returns some (key, value) pair; KeyError if empty."""
        for k in self.keys():
            v = self.pop(k, None)
            if v is not None:
                return k, v
        raise KeyError("popitem(): dictionary is empty")

    def clear(self) -> None:
        """Removes every key present now (not atomic as a whole)."""
        for k in self.keys():
            self.pop(k, None)

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (type(self), self.name))


class Value(_Value):
    """A number in shared memory: ``Value(name, typecode, init=0)``.

    ``typecode`` is one of the ``array`` module's: ``b B h H i I l L q Q f d``.
    ``.value`` reads and writes it; ``fetch_add(n)`` adds atomically and
    returns the previous value. Opening an existing value with another
    typecode (another type) raises IncompatibleError.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_value, (type(self), self.name, self.typecode))


def _attach_value(cls: type, name: str, typecode: str) -> Any:
    return cls(name, typecode, create=False)


def _attach_array(cls: type, name: str, typecode: str, length: int) -> Any:
    return cls(name, typecode, length, create=False)


class Array(_Array):
    """An array of numbers in shared memory: ``Array(name, typecode, length)``.

    ``len(a)``, ``a[i]``, ``a[i] = v`` (IndexError out of range), and
    ``with a.read() as m`` / ``with a.write() as m``: ``m`` holds the
    array's shared (read) or exclusive (write) lock and supports the buffer
    protocol, so ``numpy.asarray(m)`` works on the shared memory itself.
    The lock stays held until the ``with`` block ends and the last
    memoryview or numpy array made from ``m`` is gone. Opening an existing
    array with another typecode or length raises IncompatibleError.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_array, (type(self), self.name, self.typecode, len(self)))


class PickleDict(MutableMapping):
    """A ``MutableMapping`` of picklable values over a :class:`ShmDict`.

    ``PickleDict(name, **options)`` takes the options of ``ShmDict``.
    Keys are ``str`` or ``bytes`` and come back as the type they went in:
    the stored key is one byte ``b"s"`` followed by the UTF-8 of a ``str``
    key, or ``b"b"`` followed by a ``bytes`` key. Keys of the underlying
    dictionary without one of these prefixes are not part of the mapping.
    Values are stored as ``pickle.dumps(value, pickle.HIGHEST_PROTOCOL)``.

    Every single-key operation is atomic across processes, as in
    ``ShmDict``: no torn pickles.
    """

    __slots__ = ("_d",)

    def __init__(self, name: str, **options: Any) -> None:
        self._d = ShmDict(name, **options)

    @staticmethod
    def unlink(name: str) -> None:
        """Removes the name (FileNotFoundError if missing)."""
        _ShmDict.unlink(name)

    @property
    def name(self) -> str:
        """The segment's name."""
        return self._d.name

    @property
    def dict(self) -> ShmDict:
        """The underlying bytes dictionary."""
        return self._d

    @staticmethod
    def _key(key: Union[str, bytes]) -> bytes:
        if isinstance(key, str):
            return b"s" + key.encode()
        if isinstance(key, (bytes, bytearray, memoryview)):
            return b"b" + bytes(key)
        raise TypeError(f"PickleDict keys must be str or bytes, not {type(key).__name__}")

    @staticmethod
    def _unkey(raw: bytes) -> Union[str, bytes, None]:
        tag = raw[:1]
        if tag == b"s":
            try:
                return raw[1:].decode()
            except UnicodeDecodeError:
                return None
        if tag == b"b":
            return raw[1:]
        return None

    def __getitem__(self, key: Union[str, bytes]) -> Any:
        raw = self._d.get(self._key(key))
        if raw is None:
            raise KeyError(key)
        return pickle.loads(raw)

    def __setitem__(self, key: Union[str, bytes], value: Any) -> None:
        self._d[self._key(key)] = pickle.dumps(value, _PROTOCOL)

    def __delitem__(self, key: Union[str, bytes]) -> None:
        try:
            del self._d[self._key(key)]
        except KeyError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        try:
            return self._key(key) in self._d  # type: ignore[arg-type]
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Union[str, bytes]]:
        for raw in self._d.keys():
            k = self._unkey(raw)
            if k is not None:
                yield k

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, key: Union[str, bytes], default: Any = None) -> Any:
        raw = self._d.get(self._key(key))
        return default if raw is None else pickle.loads(raw)

    _MISSING = object()

    def pop(self, key: Union[str, bytes], default: Any = _MISSING) -> Any:
        """Removes ``key`` and returns its value (atomically)."""
        raw = self._d.pop(self._key(key), None)
        if raw is None:
            if default is PickleDict._MISSING:
                raise KeyError(key)
            return default
        return pickle.loads(raw)

    def setdefault(self, key: Union[str, bytes], default: Any = None) -> Any:
        """Returns the value of ``key``, storing ``default`` first if absent (atomic)."""
        return pickle.loads(self._d.setdefault(self._key(key), pickle.dumps(default, _PROTOCOL)))

    def update_key(
        self, key: Union[str, bytes], fn: Callable[[Any], Any], default: Any = None
    ) -> Any:
        """Atomically stores ``fn(current value, or default if absent)``; returns it.

        ``fn`` may run more than once (when another process changes the key
        meanwhile); only its last result is stored. An exception from ``fn``
        propagates and nothing is written.
        """

        def step(old: Optional[bytes]) -> bytes:
            return pickle.dumps(fn(default if old is None else pickle.loads(old)), _PROTOCOL)

        return pickle.loads(self._d.update_key(self._key(key), step))  # type: ignore[arg-type]

    def get_or_insert_with(self, key: Union[str, bytes], fn: Callable[[], Any]) -> Any:
        """Returns the value of ``key``, computing it with ``fn()`` once if absent."""
        return pickle.loads(
            self._d.get_or_insert_with(self._key(key), lambda: pickle.dumps(fn(), _PROTOCOL))
        )

    def wait_for(self, key: Union[str, bytes], timeout: Optional[float] = None) -> Any:
        """The value of ``key`` once present; None if ``timeout`` seconds pass first."""
        raw = self._d.wait_for(self._key(key), timeout)
        return None if raw is None else pickle.loads(raw)

    def lock(self) -> DictLock:
        """The dictionary's lock (see ``ShmDict.lock``)."""
        return self._d.lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (type(self), self.name))

    def __repr__(self) -> str:
        return f"shmdict.PickleDict({self.name!r})"


class Opaque:
    """A tuple-space field of raw opaque bytes.

    Python pickles fields that are not int, float, str, bytes or bool into
    opaque fields. An opaque field that does not unpickle (for example a
    postcard value posted by a Rust program) comes back as ``Opaque(data)``,
    and ``Opaque(data)`` posts those bytes as they are.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.data == self.data

    def __hash__(self) -> int:
        return hash((Opaque, self.data))

    def __repr__(self) -> str:
        return f"shmdict.Opaque({self.data!r})"


# Field kinds shared with the Rust crate (shmdict::space::FieldKind).
_I64, _F64, _STR, _BYTES, _BOOL, _OPAQUE = range(6)
_NATIVE = {int: _I64, float: _F64, str: _STR, bytes: _BYTES, bool: _BOOL}


def _encode(v: Any) -> tuple[int, Any]:
    t = type(v)
    if t is int:
        if -(1 << 63) <= v < (1 << 63):
            return (_I64, v)
    elif t in _NATIVE:
        return (_NATIVE[t], v)
    elif t is Opaque:
        return (_OPAQUE, v.data)
    return (_OPAQUE, pickle.dumps(v, _PROTOCOL))


def _decode(field: tuple[int, Any]) -> Any:
    kind, v = field
    if kind != _OPAQUE:
        return v
    try:
        return pickle.loads(v)
    except Exception:
        return Opaque(v)


def _pattern_element(p: Any) -> tuple[Any, ...]:
    if p is object:
        return (0,)
    if isinstance(p, type):
        if p in _NATIVE:
            kinds = [_NATIVE[p]] + ([_BOOL] if p is int else [])
            # Subclasses of int, float, str and bytes travel pickled.
            extra = None if p is bool else (lambda f, t=p: isinstance(_decode(f), t))
            return (2, kinds, extra)
        return (3, lambda f, t=p: isinstance(_decode(f), t))
    if callable(p) and not isinstance(p, Opaque):
        return (3, lambda f, fn=p: bool(fn(_decode(f))))
    field = _encode(p)
    if field[0] != _OPAQUE or type(p) is Opaque:
        return (1, field)
    return (3, lambda f, want=p: _decode(f) == want)


def _pattern(pattern: Any) -> list[tuple[Any, ...]]:
    if not isinstance(pattern, tuple):
        raise TypeError(f"a pattern is a tuple, not {type(pattern).__name__}")
    return [_pattern_element(p) for p in pattern]


class Space:
    """A Linda tuple space in shared memory (lindypy's model), by name.

    ``out(tup)`` posts a tuple; ``take(pattern, timeout=None)`` removes and
    returns a matching tuple (Linda's ``in``), waiting up to ``timeout``
    seconds (None: forever) and returning None on timeout; ``read`` is the
    same without removing (``rd``); ``try_take``/``try_read`` do not wait.

    Fields: ``int`` (64-bit), ``float``, ``str``, ``bytes`` and ``bool`` are
    stored natively (the Rust crate's encoding, so Rust programs share the
    tuples); any other picklable object is pickled into an opaque field.

    In a pattern (a tuple of the same length as the tuples it matches):
    ``object`` matches anything; a type matches its instances as
    ``isinstance`` does (``int`` matches booleans too); a callable is a
    predicate run in the caller's process on the field's value; any other
    value matches an equal field (int and float fields are distinct: ``1``
    does not match ``1.0``). Each tuple is taken by exactly one ``take``.

    It takes the options of ``ShmDict`` (its dictionary's): a space grows as
    tuples arrive, up to ``max_bytes``, unless ``fixed_size=True``.
    """

    __slots__ = ("_s",)

    def __init__(
        self,
        name: str,
        *,
        capacity: Optional[int] = None,
        arena_bytes: Optional[int] = None,
        create: bool = True,
        create_new: bool = False,
        mode: int = 0o600,
        max_bytes: Optional[int] = None,
        fixed_size: bool = False,
    ) -> None:
        self._s = _Space(
            name,
            capacity=capacity,
            arena_bytes=arena_bytes,
            create=create,
            create_new=create_new,
            mode=mode,
            max_bytes=max_bytes,
            fixed_size=fixed_size,
        )

    @staticmethod
    def unlink(name: str) -> None:
        """Removes the name (FileNotFoundError if missing)."""
        _Space.unlink(name)

    @property
    def name(self) -> str:
        """The space's name."""
        return self._s.name

    def __len__(self) -> int:
        return len(self._s)

    def out(self, tup: tuple[Any, ...]) -> None:
        """Posts ``tup``."""
        if not isinstance(tup, tuple):
            raise TypeError(f"out() takes a tuple, not {type(tup).__name__}")
        self._s._out([_encode(v) for v in tup])

    @staticmethod
    def _result(fields: Optional[list[tuple[int, Any]]]) -> Optional[tuple[Any, ...]]:
        return None if fields is None else tuple(_decode(f) for f in fields)

    def take(self, pattern: tuple[Any, ...], timeout: Optional[float] = None) -> Optional[tuple]:
        """Removes and returns a tuple matching ``pattern``; None on timeout."""
        return self._result(self._s._wait(_pattern(pattern), True, timeout))

    def read(self, pattern: tuple[Any, ...], timeout: Optional[float] = None) -> Optional[tuple]:
        """Returns a tuple matching ``pattern`` without removing it; None on timeout."""
        return self._result(self._s._wait(_pattern(pattern), False, timeout))

    def try_take(self, pattern: tuple[Any, ...]) -> Optional[tuple]:
        """Removes and returns a matching tuple if there is one now, else None."""
        return self._result(self._s._try(_pattern(pattern), True))

    def try_read(self, pattern: tuple[Any, ...]) -> Optional[tuple]:
        """Returns a matching tuple if there is one now, else None."""
        return self._result(self._s._try(_pattern(pattern), False))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (type(self), self.name))

    def __repr__(self) -> str:
        return f"shmdict.Space({self.name!r})"
