"""Type stubs of shmdict._shmdict, the Rust half of the shmdict package.

Import the classes from ``shmdict``: it adds the Python conveniences.
"""

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Optional, Union, final

from typing_extensions import Buffer, Self, TypeAlias

_Key: TypeAlias = Union[str, bytes, bytearray, memoryview]
_Bytes: TypeAlias = Union[bytes, bytearray, memoryview]
_Number: TypeAlias = Union[int, float]

class Error(Exception):
    """Base class of shmdict's own errors."""

class FullError(Error):
    """No room for the key or the value; nothing already stored was lost."""

class CorruptError(Error):
    """The segment failed a validity check."""

class IncompatibleError(Error):
    """The segment holds another format version, kind of object, type or layout."""

class ShmDict:
    def __new__(
        cls,
        name: str,
        *,
        capacity: Optional[int] = None,
        arena_bytes: Optional[int] = None,
        create: bool = True,
        create_new: bool = False,
        mode: int = 0o600,
        max_bytes: Optional[int] = None,
        fixed_size: bool = False,
    ) -> Self: ...
    @staticmethod
    def unlink(name: str) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def capacity(self) -> int:
        """Live keys the current index holds (it doubles when full, unless
        created with ``fixed_size=True``)."""
    def __getitem__(self, key: _Key) -> bytes: ...
    def __setitem__(self, key: _Key, value: _Bytes) -> None: ...
    def __delitem__(self, key: _Key) -> None: ...
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[bytes]: ...
    def keys(self) -> list[bytes]: ...  # type: ignore[override]
    def get(self, key: _Key, default: Any = None) -> Any: ...
    def pop(self, key: _Key, *default: Any) -> Any: ...
    def setdefault(self, key: _Key, value: _Bytes) -> bytes: ...  # type: ignore[override]
    def update_key(
        self, key: _Key, fn: Callable[[Optional[bytes]], Optional[_Bytes]]
    ) -> Optional[bytes]: ...
    def get_or_insert_with(self, key: _Key, fn: Callable[[], _Bytes]) -> bytes: ...
    def wait_for(self, key: _Key, timeout: Optional[float] = None) -> Optional[bytes]:
        """The value of ``key`` as soon as it is present, or None after ``timeout``
        seconds (None: no limit). Sleeps without the GIL; Ctrl-C interrupts it."""
    def lock(self) -> DictLock:
        """The dictionary's robust lock, as a context manager (``with d.lock() as g``;
        ``g.recovered`` says whether its previous holder died holding it). Waits
        without the GIL; Ctrl-C interrupts the wait."""
    def view(self, key: _Key) -> ValueView:
        """A zero-copy, read-only view of the value of ``key``.

        ``with d.view(k) as v:`` gives ``v = None`` if the key is absent.
        ``bytes(v)``, ``memoryview(v)`` and ``numpy.frombuffer(v, dtype)`` read the
        shared memory itself; the bytes never change while the view is held,
        whatever other processes write to the key. Release it soon (``with``, or
        ``v.release()``): while held, memory of values replaced since cannot be
        reused by any process. A buffer of an absent key's view is KeyError.
        """
    def stats(self) -> Stats:
        """Occupancy figures, views held and memory they hold back, memory
        committed and the growth history (a snapshot)."""

@final
class ValueView(Buffer):
    """A zero-copy, read-only buffer over one value of a ShmDict (``ShmDict.view``).

    The view holds a pin: the bytes stay valid and unchanged until it is
    released, and at least as long as any buffer exported from it (memoryview,
    numpy array) is alive. ``release()`` raises BufferError instead of releasing
    while such buffers are alive; the end of a ``with`` block then leaves the view
    held until the last of them is released.
    """

    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __enter__(self) -> Optional[Self]:
        """The view, or None if the key was absent."""
    def __bool__(self) -> bool:
        """Whether the view holds a value (present, not released)."""
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool:
        """Releases the view, or, while exported buffers are alive, leaves it held
        until the last of them is released."""
    def release(self) -> None:
        """Releases the view now; BufferError if exported buffers are alive."""
    @property
    def released(self) -> bool:
        """Whether the view was released."""
    @property
    def key(self) -> bytes:
        """The key whose value this view reads."""
    def __len__(self) -> int:
        """The value's length in bytes (ValueError once released)."""

@final
class Stats:
    """Occupancy figures of a ShmDict (``ShmDict.stats()``): a snapshot."""

    @property
    def len(self) -> int:
        """Live keys."""
    @property
    def capacity(self) -> int:
        """Live keys the current index holds."""
    @property
    def buckets(self) -> int:
        """Index buckets (three slots each) of the current index."""
    @property
    def arena_bytes(self) -> int:
        """Arena size in bytes (for a dictionary that grows, its whole reservation)."""
    @property
    def arena_untouched_bytes(self) -> int:
        """Arena bytes never handed out yet."""
    @property
    def free_blocks(self) -> list[int]:
        """Free blocks per order (a block of order ``o`` is ``64 << o`` bytes)."""
    @property
    def attached(self) -> int:
        """Attached handles whose process runs."""
    @property
    def attached_dead(self) -> int:
        """Attach entries left by dead processes."""
    @property
    def pins(self) -> int:
        """Borrowed reads (views, Rust ``Reader``/``ValueRef``) held by live processes."""
    @property
    def oldest_pin_age(self) -> Optional[float]:
        """Seconds the oldest borrowed read has been held (None: none held)."""
    @property
    def retired_bytes(self) -> int:
        """Arena bytes of replaced or removed values waiting until no view can see them."""
    @property
    def generation(self) -> int:
        """The index's generation: how many times it has doubled."""
    @property
    def committed_bytes(self) -> int:
        """Bytes of /dev/shm memory the dictionary has taken."""
    @property
    def reserved_bytes(self) -> int:
        """The size of its file: address space reserved, memory only as it is used."""
    @property
    def max_bytes(self) -> Optional[int]:
        """The most memory it may take (``max_bytes=``), or None if unlimited."""
    @property
    def grows(self) -> bool:
        """Whether it grows (False: created with ``fixed_size=True``)."""
    @property
    def growth(self) -> list[dict[str, Union[int, float]]]:
        """One dict per index generation, oldest first: ``generation``, ``capacity``,
        ``buckets``, ``at`` (when it became current, seconds since the epoch as
        ``time.time()``), ``pid`` (the process that grew it) and ``keys`` (present then)."""

@final
class DictLock:
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    @property
    def recovered(self) -> bool: ...

class Value:
    def __new__(
        cls,
        name: str,
        typecode: str,
        init: Optional[_Number] = 0,
        *,
        create: bool = True,
        create_new: bool = False,
        mode: int = 0o600,
    ) -> Self: ...
    @staticmethod
    def unlink(name: str) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def typecode(self) -> str: ...
    @property
    def value(self) -> _Number: ...
    @value.setter
    def value(self, v: _Number) -> None: ...
    def fetch_add(self, n: _Number) -> _Number: ...

class Array:
    def __new__(
        cls,
        name: str,
        typecode: str,
        length: int,
        *,
        create: bool = True,
        create_new: bool = False,
        mode: int = 0o600,
    ) -> Self: ...
    @staticmethod
    def unlink(name: str) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def typecode(self) -> str: ...
    @property
    def itemsize(self) -> int: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> _Number: ...
    def __setitem__(self, i: int, v: _Number) -> None: ...
    def read(self) -> ArrayBuffer: ...
    def write(self) -> ArrayBuffer: ...
    def tolist(self) -> list[_Number]: ...

@final
class ArrayBuffer(Buffer):
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    def release(self) -> None: ...
    @property
    def held(self) -> bool: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def recovered(self) -> bool: ...
    def __len__(self) -> int: ...

class _Space:
    def __new__(
        cls,
        name: str,
        *,
        capacity: Optional[int] = None,
        arena_bytes: Optional[int] = None,
        create: bool = True,
        create_new: bool = False,
        mode: int = 0o600,
        max_bytes: Optional[int] = None,
        fixed_size: bool = False,
    ) -> Self: ...
    @staticmethod
    def unlink(name: str) -> None: ...
    @property
    def name(self) -> str: ...
    def __len__(self) -> int: ...
    def _out(self, fields: list[tuple[int, Any]]) -> None: ...
    def _wait(
        self, pattern: list[tuple[Any, ...]], take: bool, timeout: Optional[float]
    ) -> Optional[list[tuple[int, Any]]]: ...
    def _try(
        self, pattern: list[tuple[Any, ...]], take: bool
    ) -> Optional[list[tuple[int, Any]]]: ...
