//! `shmdict.ShmDict`: bytes keys and values, over `shmdict::ShmDict`.

use std::borrow::Cow;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use shmdict::{DictGuard, ShmDict};

use crate::errors::OrPy;
use crate::view::ValueView;
use crate::{deadline, wait_in_slices, Handle, SameThread, SLICE};

/// The bytes of a key: `str` as UTF-8, or any bytes-like object.
pub(crate) fn key_bytes<'a>(k: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(b) = k.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    if let Ok(s) = k.cast::<PyString>() {
        return Ok(Cow::Borrowed(s.to_str()?.as_bytes()));
    }
    buffer_bytes(k).map_err(|_| {
        PyTypeError::new_err(format!(
            "keys must be str or bytes-like, not {}",
            type_name(k)
        ))
    })
}

/// The bytes of a value: any bytes-like object (not `str`).
pub(crate) fn value_bytes<'a>(v: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    buffer_bytes(v).map_err(|_| {
        PyTypeError::new_err(format!(
            "values must be bytes-like (bytes, bytearray, memoryview), not {}",
            type_name(v)
        ))
    })
}

fn buffer_bytes<'a>(o: &Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    let buf = PyBuffer::<u8>::get(o)?;
    Ok(Cow::Owned(buf.to_vec(o.py())?))
}

fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A dictionary in POSIX shared memory that unrelated processes open by
/// name. Keys are str (UTF-8) or bytes-like, values bytes-like; both come
/// back as bytes.
#[pyclass(name = "ShmDict", module = "shmdict", subclass, frozen)]
pub(crate) struct PyShmDict {
    name: String,
    handle: Handle<ShmDict>,
}

impl PyShmDict {
    pub(crate) fn dict(&self) -> PyResult<&ShmDict> {
        self.handle.get()
    }
}

#[pymethods]
impl PyShmDict {
    #[new]
    #[pyo3(signature = (name, *, capacity=None, arena_bytes=None, create=true, create_new=false, mode=0o600, max_bytes=None, fixed_size=false))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments.
    fn new(
        py: Python<'_>,
        name: String,
        capacity: Option<usize>,
        arena_bytes: Option<usize>,
        create: bool,
        create_new: bool,
        mode: u32,
        max_bytes: Option<u64>,
        fixed_size: bool,
    ) -> PyResult<PyShmDict> {
        let opts = crate::dict_options(&crate::DictArgs {
            capacity,
            arena_bytes,
            create,
            create_new,
            mode,
            max_bytes,
            fixed_size,
        });
        // Creating may wait for a concurrent creator.
        let dict = py.detach(|| opts.open(&name)).or_py()?;
        let reopen_name = name.clone();
        Ok(PyShmDict {
            handle: Handle::new(dict, move || {
                crate::reattach_options(mode).open(&reopen_name)
            }),
            name,
        })
    }

    /// Removes the name; processes already attached keep working on the
    /// segment. FileNotFoundError if there is no such name.
    #[staticmethod]
    fn unlink(name: &str) -> PyResult<()> {
        ShmDict::unlink(name).or_py()
    }

    /// The segment's name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Live keys the current index holds: it doubles when a new key finds
    /// it full (unless the dictionary was created with `fixed_size=True`,
    /// when this is the maximum).
    #[getter]
    fn capacity(&self) -> PyResult<usize> {
        Ok(self.dict()?.capacity())
    }

    fn __getitem__<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let k = key_bytes(key)?;
        match self.dict()?.get(&k).or_py()? {
            Some(v) => Ok(PyBytes::new(key.py(), &v)),
            None => Err(PyKeyError::new_err(key.clone().unbind())),
        }
    }

    fn __setitem__(&self, key: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let k = key_bytes(key)?;
        let v = value_bytes(value)?;
        self.dict()?.insert(&k, &v).or_py()
    }

    fn __delitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        let k = key_bytes(key)?;
        if self.dict()?.remove(&k).or_py()? {
            Ok(())
        } else {
            Err(PyKeyError::new_err(key.clone().unbind()))
        }
    }

    fn __contains__(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let k = match key_bytes(key) {
            Ok(k) => k,
            // Like dict: a key of another type is simply not there.
            Err(_) => return Ok(false),
        };
        self.dict()?.contains_key(&k).or_py()
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.dict()?.len())
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.keys(py)?.try_iter().map(Bound::into_any)
    }

    /// A list of the keys present now (a snapshot), as bytes.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let keys = self.dict()?.keys().or_py()?;
        PyList::new(py, keys.iter().map(|k| PyBytes::new(py, k)))
    }

    /// The value of `key`, or `default` if absent.
    #[pyo3(signature = (key, default=None))]
    fn get<'py>(
        &self,
        key: &Bound<'py, PyAny>,
        default: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let k = key_bytes(key)?;
        Ok(match self.dict()?.get(&k).or_py()? {
            Some(v) => Some(PyBytes::new(key.py(), &v).into_any()),
            None => default,
        })
    }

    /// Removes `key` and returns its value (atomically); `default` if
    /// absent, KeyError if absent and no default is given.
    #[pyo3(signature = (key, *default))]
    fn pop<'py>(
        &self,
        key: &Bound<'py, PyAny>,
        default: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if default.len() > 1 {
            return Err(PyTypeError::new_err(format!(
                "pop expected at most 2 arguments, got {}",
                default.len() + 1
            )));
        }
        let k = key_bytes(key)?;
        let mut old = None;
        self.dict()?
            .update(&k, |v| {
                old = v.map(<[u8]>::to_vec);
                None
            })
            .or_py()?;
        match old {
            Some(v) => Ok(PyBytes::new(key.py(), &v).into_any()),
            None => match default.get_item(0) {
                Ok(d) => Ok(d),
                Err(_) => Err(PyKeyError::new_err(key.clone().unbind())),
            },
        }
    }

    /// Returns the value of `key`, inserting `value` first if the key is
    /// absent. Atomic: of concurrent calls on an absent key, one inserts
    /// and all return its value.
    fn setdefault<'py>(
        &self,
        key: &Bound<'py, PyAny>,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let k = key_bytes(key)?;
        let v = value_bytes(value)?;
        let stored = self
            .dict()?
            .update(&k, |old| Some(old.unwrap_or(&v).to_vec()))
            .or_py()?;
        // `update` stores `Some`, so it returns what is stored.
        Ok(PyBytes::new(key.py(), stored.as_deref().unwrap_or(&v)))
    }

    /// Atomically replaces the value of `key` with `fn(old)`, where `old` is
    /// the current value (bytes) or None if absent; `fn` returning None
    /// removes the key. Returns what was stored (None if removed or left
    /// absent).
    ///
    /// `fn` may run more than once (when another process changes the key
    /// between the read and the write); only its last result is stored. An
    /// exception from `fn` propagates and nothing is written.
    fn update_key<'py>(
        &self,
        key: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = callable)] r#fn: Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let py = key.py();
        let k = key_bytes(key)?;
        let stored = self
            .dict()?
            .try_update(&k, |old| -> PyResult<Option<Vec<u8>>> {
                let arg = old.map(|o| PyBytes::new(py, o));
                let new = r#fn.call1((arg,))?;
                if new.is_none() {
                    Ok(None)
                } else {
                    Ok(Some(value_bytes(&new)?.into_owned()))
                }
            })
            .or_py()??;
        Ok(stored.map(|v| PyBytes::new(py, &v)))
    }

    /// Returns the value of `key`, computing it with `fn()` and inserting it
    /// if absent. `fn` runs in one process (and thread) at a time for a
    /// given key: the others wait, then return the value it stored. An
    /// exception from `fn` propagates and stores nothing (the next caller
    /// runs `fn`).
    fn get_or_insert_with<'py>(
        &self,
        key: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = callable)] r#fn: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let py = key.py();
        let k = key_bytes(key)?;
        let dict = self.dict()?;
        if let Some(v) = dict.get(&k).or_py()? {
            return Ok(PyBytes::new(py, &v));
        }
        let kr: &[u8] = &k;
        let d: &ShmDict = dict;
        let guard = py.detach(|| SameThread(d.lock_keys(&[kr]))).0.or_py()?;
        if let Some(v) = dict.get(&k).or_py()? {
            return Ok(PyBytes::new(py, &v));
        }
        let new = r#fn.call0()?;
        let v = value_bytes(&new)?;
        dict.insert(&k, &v).or_py()?;
        drop(guard);
        Ok(PyBytes::new(py, &v))
    }

    /// Returns the value of `key` as soon as it is present, or None when
    /// `timeout` seconds pass first (None: wait forever). Sleeps without
    /// the GIL on a futex in the segment (no polling); Ctrl-C raises
    /// KeyboardInterrupt within 0.1 s.
    #[pyo3(signature = (key, timeout=None))]
    fn wait_for<'py>(
        &self,
        key: &Bound<'py, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let py = key.py();
        let k = key_bytes(key)?;
        let dict = self.dict()?;
        let d: &ShmDict = dict;
        let kr: &[u8] = &k;
        let found = wait_in_slices(py, deadline(timeout)?, |py, slice| {
            py.detach(|| d.wait_for(kr, slice)).or_py()
        })?;
        Ok(found.map(|v| PyBytes::new(py, &v)))
    }

    /// The dictionary's lock, as a context manager: `with d.lock() as g:`.
    /// A robust process-shared mutex for sequences of operations that must
    /// be consistent together (single-key operations do not take it). If
    /// the previous holder died holding it, `g.recovered` is True. Waits
    /// for a live holder without the GIL; Ctrl-C raises KeyboardInterrupt
    /// within 0.1 s.
    fn lock(&self) -> PyResult<DictLock> {
        Ok(DictLock {
            state: Mutex::new(LockState {
                guard: None,
                recovered: false,
            }),
            dict: self.handle.get_arc()?,
        })
    }

    /// A zero-copy, read-only view of the value of `key`: `bytes(v)`,
    /// `memoryview(v)` and `numpy.frombuffer(v, ...)` read the shared
    /// memory itself. The bytes never change while the view is held,
    /// whatever other processes write meanwhile. Use it as a context
    /// manager: `with d.view(k) as v:` gives `v = None` if the key is
    /// absent, and the block's end releases the view (or, while buffers
    /// exported from it are alive, leaves it held until the last of them
    /// is released). `v.release()` raises BufferError while buffers are
    /// alive. A buffer of an absent key's view is KeyError.
    fn view(&self, key: &Bound<'_, PyAny>) -> PyResult<ValueView> {
        let k = key_bytes(key)?;
        ValueView::new(self.handle.get_arc()?, &k).or_py()
    }

    /// Occupancy figures (a snapshot; exact only when the segment is
    /// quiet), among them the borrowed reads (views) held and the memory
    /// they hold back, the memory committed and the growth history.
    fn stats(&self) -> PyResult<Stats> {
        let s = self.dict()?.stats();
        let growth = s
            .growth
            .iter()
            .map(|g| Growth {
                generation: g.generation,
                capacity: g.capacity,
                buckets: g.buckets,
                at: g
                    .at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
                pid: g.pid,
                keys: g.keys,
            })
            .collect();
        Ok(Stats {
            len: s.len,
            capacity: s.capacity,
            buckets: s.buckets,
            arena_bytes: s.arena_bytes,
            arena_untouched_bytes: s.arena_untouched_bytes,
            free_blocks: s.free_blocks,
            attached: s.attached.0,
            attached_dead: s.attached.1,
            pins: s.pins,
            oldest_pin_age: s.oldest_pin_age.map(|d| d.as_secs_f64()),
            retired_bytes: s.retired_bytes,
            generation: s.generation,
            committed_bytes: s.committed_bytes,
            reserved_bytes: s.reserved_bytes,
            max_bytes: s.max_bytes,
            grows: s.grows,
            growth,
        })
    }

    fn __repr__(&self) -> String {
        format!("shmdict.ShmDict({:?})", self.name)
    }
}

fn callable<'py>(o: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if o.is_callable() {
        Ok(o.clone())
    } else {
        Err(PyTypeError::new_err(format!(
            "fn must be callable, not {}",
            type_name(o)
        )))
    }
}

/// A value that belongs to the thread that made it: used (and dropped)
/// only there. Dropped on another thread, it is leaked instead.
struct ThreadBound<T> {
    owner: ThreadId,
    value: ManuallyDrop<T>,
}

// SAFETY: the value is only reached through `get`, which checks that the
// calling thread is the owner, and dropped only on the owner thread (on
// any other thread it is leaked without being touched). So moving or
// sharing the wrapper between threads never uses `T` off its thread.
unsafe impl<T> Send for ThreadBound<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for ThreadBound<T> {}

impl<T> ThreadBound<T> {
    fn new(value: T) -> ThreadBound<T> {
        ThreadBound {
            owner: std::thread::current().id(),
            value: ManuallyDrop::new(value),
        }
    }

    fn is_mine(&self) -> bool {
        self.owner == std::thread::current().id()
    }
}

impl<T> Drop for ThreadBound<T> {
    fn drop(&mut self) {
        if self.is_mine() {
            // SAFETY: dropped once, here, on the owner thread.
            unsafe { ManuallyDrop::drop(&mut self.value) };
        }
    }
}

struct LockState {
    guard: Option<ThreadBound<DictGuard<'static>>>,
    recovered: bool,
}

/// The lock of a ShmDict, held between `__enter__` and `__exit__`.
///
/// The mutex belongs to the thread that entered: `__exit__` from another
/// thread raises RuntimeError. A lock object garbage-collected on another
/// thread while held is not unlocked there; the lock then stays held until
/// the entering thread ends (robust: the next taker sees `recovered`).
#[pyclass(module = "shmdict", frozen)]
pub(crate) struct DictLock {
    // Declared before `dict`: dropped first (the guard borrows it).
    state: Mutex<LockState>,
    dict: Arc<ShmDict>,
}

impl DictLock {
    fn state(&self) -> std::sync::MutexGuard<'_, LockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for DictLock {
    fn drop(&mut self) {
        // The guard borrows `dict`: release (or leak) it first.
        self.state().guard.take();
    }
}

#[pymethods]
impl DictLock {
    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let this = slf.get();
        if this.state().guard.is_some() {
            return Err(PyRuntimeError::new_err("this lock is already held"));
        }
        // SAFETY: the reference points into the `Arc` that `this` keeps
        // until it is dropped, and the guard made from it is dropped (or
        // leaked) before that `Arc` (in `__exit__` or in `Drop`), so it
        // never outlives the dictionary.
        let dict: &'static ShmDict = unsafe { &*Arc::as_ptr(&this.dict) };
        // Slices without the GIL, checking for Ctrl-C between them.
        let py = slf.py();
        let guard = loop {
            if let Some(g) = py
                .detach(|| SameThread(dict.lock_timeout(SLICE)))
                .0
                .or_py()?
            {
                break g;
            }
            py.check_signals()?;
        };
        let mut st = this.state();
        st.recovered = guard.recovered();
        st.guard = Some(ThreadBound::new(guard));
        drop(st);
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let mut st = self.state();
        match &st.guard {
            Some(g) if !g.is_mine() => Err(PyRuntimeError::new_err(
                "the lock belongs to the thread that entered it: exit it there",
            )),
            _ => {
                st.guard.take();
                Ok(false)
            }
        }
    }

    /// Whether the previous holder died holding the lock (what it was
    /// doing may be half done).
    #[getter]
    fn recovered(&self) -> bool {
        self.state().recovered
    }
}

/// What `ShmDict.stats()` returns: occupancy figures of a dictionary (a
/// snapshot, exact only when the segment is quiet).
#[pyclass(module = "shmdict", frozen, get_all)]
pub(crate) struct Stats {
    /// Live keys.
    len: usize,
    /// Live keys the current index holds.
    capacity: usize,
    /// Index buckets (three slots each) of the current index.
    buckets: usize,
    /// Arena size in bytes: for a dictionary that grows, the most its
    /// reservation can hold (committed as it is used).
    arena_bytes: usize,
    /// Arena bytes never handed out yet.
    arena_untouched_bytes: usize,
    /// Free blocks per order (a block of order `o` is `64 << o` bytes).
    free_blocks: Vec<u64>,
    /// Attached handles whose process runs.
    attached: u64,
    /// Attach entries left by dead processes.
    attached_dead: u64,
    /// Borrowed reads (views, and the Rust crate's `Reader`s and
    /// `ValueRef`s) held by live processes.
    pins: u64,
    /// Seconds the oldest of them has been held, or None if there is none.
    oldest_pin_age: Option<f64>,
    /// Arena bytes of replaced or removed values waiting until no borrowed
    /// read can see them (freed as writers need room).
    retired_bytes: u64,
    /// The index's generation: how many times it has doubled.
    generation: u32,
    /// Bytes of /dev/shm memory the dictionary has taken (committed).
    committed_bytes: u64,
    /// The size of its segment file: the address space it reserves, of
    /// which only `committed_bytes` is memory.
    reserved_bytes: u64,
    /// The most memory it may take (`max_bytes=`), or None if unlimited.
    max_bytes: Option<u64>,
    /// Whether it grows (False: created with `fixed_size=True`).
    grows: bool,
    /// Its growth history: a dict per index generation, oldest first.
    growth: Vec<Growth>,
}

/// One generation of the index, as `Stats.growth` lists it: a Python dict.
#[derive(Clone, IntoPyObject)]
pub(crate) struct Growth {
    /// 0 is the index the dictionary was created with.
    generation: u32,
    /// Keys the generation's index holds.
    capacity: u64,
    /// Buckets of its index.
    buckets: u64,
    /// When it became current, in seconds since the Unix epoch (as
    /// `time.time()`; generation 0: when the dictionary was created).
    at: f64,
    /// The process that made it current.
    pid: u32,
    /// Keys present then (0 for generation 0).
    keys: u64,
}

#[pymethods]
impl Stats {
    fn __repr__(&self) -> String {
        format!(
            "shmdict.Stats(len={}, capacity={}, generation={}, committed_bytes={}, \
             reserved_bytes={}, max_bytes={}, grows={}, arena_bytes={}, arena_untouched_bytes={}, \
             attached={}, attached_dead={}, pins={}, oldest_pin_age={}, retired_bytes={})",
            self.len,
            self.capacity,
            self.generation,
            self.committed_bytes,
            self.reserved_bytes,
            self.max_bytes
                .map_or_else(|| "None".to_owned(), |m| m.to_string()),
            if self.grows { "True" } else { "False" },
            self.arena_bytes,
            self.arena_untouched_bytes,
            self.attached,
            self.attached_dead,
            self.pins,
            self.oldest_pin_age
                .map_or_else(|| "None".to_owned(), |a| format!("{a:.3}")),
            self.retired_bytes
        )
    }
}
