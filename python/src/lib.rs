//! `shmdict._shmdict`: the Rust half of the `shmdict` Python package.
//!
//! Thin `#[pyclass]` wrappers over the crate: each converts its arguments,
//! calls the crate and maps errors to Python exceptions. The conveniences
//! that are naturally Python (`PickleDict`, tuple encoding and patterns of
//! `Space`, `values`/`items`, pickling of handles) live in
//! `shmdict/__init__.py`.
//!
//! Two rules run through the file:
//!
//! - Anything that can wait for another process (locks held elsewhere,
//!   `wait_for`, blocking `take`) runs inside `Python::detach`, so other
//!   Python threads go on; unbounded waits are cut into slices of at most
//!   [`SLICE`], with `Python::check_signals` between slices, so Ctrl-C
//!   raises `KeyboardInterrupt` within a fraction of a second.
//! - Handles are usable after `fork`: a handle notices that it was
//!   inherited (a `pthread_atfork` counter, see [`Handle`]) and attaches
//!   again by name in the child before its first use there.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

mod array;
mod dict;
mod errors;
mod space;
mod value;
mod view;

/// The longest time spent waiting without the GIL before checking for
/// signals (Ctrl-C).
pub(crate) const SLICE: Duration = Duration::from_millis(100);

/// Incremented in every child process right after `fork`.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

extern "C" fn after_fork_in_child() {
    // Relaxed: the child has a single thread at this point; later loads in
    // it are ordered by program order.
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// This process's fork generation: changes in a child after `fork`.
pub(crate) fn fork_generation() -> u64 {
    // Relaxed: as in `Handle::get`.
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// A crate handle that reattaches by name after `fork`.
///
/// The crate's handles name the process that opened them (locks, arena
/// blocks in flight), so a child must not go on with its parent's handle.
/// The first use in a child opens the name again; the inherited handle is
/// leaked in the child (never dropped there, even if the child never uses
/// it), so its drop cannot detach the parent's attach entry.
///
/// The current handle is an `Arc<T>` turned into a raw pointer (one strong
/// count owned by the `Handle`), replaced at most once per process: a
/// process's fork generation never changes after it starts. The fast path
/// is two atomic loads.
pub(crate) struct Handle<T> {
    /// The fork generation of the process that made `ptr`.
    generation: AtomicU64,
    /// From `Arc::into_raw`; never freed while `self` lives.
    ptr: AtomicPtr<T>,
    /// Serializes reattaching.
    reattach: Mutex<()>,
    reopen: Box<dyn Fn() -> shmdict::Result<T> + Send + Sync>,
}

impl<T> Handle<T> {
    pub(crate) fn new(
        first: T,
        reopen: impl Fn() -> shmdict::Result<T> + Send + Sync + 'static,
    ) -> Handle<T> {
        Handle {
            generation: AtomicU64::new(FORK_GENERATION.load(Ordering::Relaxed)),
            ptr: AtomicPtr::new(Arc::into_raw(Arc::new(first)).cast_mut()),
            reattach: Mutex::new(()),
            reopen: Box::new(reopen),
        }
    }

    /// The handle of this process.
    pub(crate) fn get(&self) -> PyResult<&T> {
        // Relaxed: set before any other thread of this process exists.
        let current = FORK_GENERATION.load(Ordering::Relaxed);
        // Acquire: pairs with the Release store below, so `ptr` is the
        // pointer stored before it.
        if self.generation.load(Ordering::Acquire) != current {
            let _one = self.reattach.lock().unwrap_or_else(|e| e.into_inner());
            if self.generation.load(Ordering::Acquire) != current {
                let fresh = Arc::into_raw(Arc::new((self.reopen)().map_err(errors::to_py)?));
                // The inherited pointer is leaked: see the type's docs.
                // Release: publishes the new handle before the generation.
                self.ptr.store(fresh.cast_mut(), Ordering::Release);
                self.generation.store(current, Ordering::Release);
            }
        }
        // SAFETY: `ptr` came from `Arc::into_raw` and its strong count owned
        // by `self` is released only in `Drop` (which needs `&mut self`), or
        // never (an inherited handle): the `T` outlives this borrow of
        // `self`.
        Ok(unsafe { &*self.ptr.load(Ordering::Acquire) })
    }

    /// The handle of this process, as an `Arc` that outlives `self`.
    pub(crate) fn get_arc(&self) -> PyResult<Arc<T>> {
        let t: *const T = self.get()?;
        // SAFETY: `t` came from `Arc::into_raw` and is alive (see `get`);
        // taking a new strong count and turning it into an `Arc` leaves the
        // count owned by `self` untouched.
        unsafe {
            Arc::increment_strong_count(t);
            Ok(Arc::from_raw(t))
        }
    }
}

impl<T> Drop for Handle<T> {
    fn drop(&mut self) {
        // Only a handle made by this process is released here: one made
        // before a fork belongs to the parent (leaked; see the type's docs).
        if *self.generation.get_mut() == FORK_GENERATION.load(Ordering::Relaxed) {
            // SAFETY: `ptr` came from `Arc::into_raw` in this process and
            // `self` owns one strong count of it, released exactly once,
            // here.
            drop(unsafe { Arc::from_raw(*self.ptr.get_mut()) });
        }
    }
}

/// Moves a value out of `Python::detach`.
///
/// `detach` runs its closure on the calling thread, so a value that must
/// stay on its thread (a lock guard) can be returned from it.
pub(crate) struct SameThread<T>(pub(crate) T);

// SAFETY: `SameThread` is only returned from `Python::detach` closures,
// which run on the calling thread; the value never reaches another thread.
unsafe impl<T> Send for SameThread<T> {}

/// A deadline from a timeout in seconds (`None`: wait forever).
pub(crate) fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_nan() || t < 0.0 => Err(pyo3::exceptions::PyValueError::new_err(
            "timeout must be a non-negative number of seconds or None",
        )),
        Some(t) => Ok(Duration::try_from_secs_f64(t)
            .ok()
            .and_then(|d| Instant::now().checked_add(d))),
    }
}

/// Waits in slices of at most [`SLICE`] without the GIL, checking for
/// signals between slices: `attempt(slice)` waits up to `slice` and
/// returns `Some` when done. `None` when `deadline` passes.
pub(crate) fn wait_in_slices<R: Send>(
    py: Python<'_>,
    deadline: Option<Instant>,
    mut attempt: impl FnMut(Python<'_>, Duration) -> PyResult<Option<R>>,
) -> PyResult<Option<R>> {
    loop {
        let now = Instant::now();
        let slice = match deadline {
            None => SLICE,
            Some(d) => d.saturating_duration_since(now).min(SLICE),
        };
        if let Some(r) = attempt(py, slice)? {
            return Ok(Some(r));
        }
        py.check_signals()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
    }
}

/// The keyword arguments that `ShmDict` and `Space` take.
pub(crate) struct DictArgs {
    pub(crate) capacity: Option<usize>,
    pub(crate) arena_bytes: Option<usize>,
    pub(crate) create: bool,
    pub(crate) create_new: bool,
    pub(crate) mode: u32,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) fixed_size: bool,
}

/// The crate's dictionary options from the keyword arguments.
pub(crate) fn dict_options(a: &DictArgs) -> shmdict::Options {
    let mut opts = shmdict::ShmDict::options()
        .create(a.create)
        .create_new(a.create_new)
        .mode(a.mode)
        .fixed_size(a.fixed_size);
    if let Some(c) = a.capacity {
        opts = opts.capacity(c);
    }
    if let Some(b) = a.arena_bytes {
        opts = opts.arena_bytes(b);
    }
    if let Some(m) = a.max_bytes {
        opts = opts.max_bytes(m);
    }
    opts
}

/// Options that reattach, in a forked child, a dictionary its parent opened
/// with `mode`: attach only (an unlinked name is not created again), and
/// accept the mode the parent accepted.
pub(crate) fn reattach_options(mode: u32) -> shmdict::Options {
    shmdict::ShmDict::options().create(false).mode(mode)
}

/// The Rust half of the `shmdict` package; import `shmdict` instead.
#[pymodule]
fn _shmdict(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // SAFETY: registers a handler that only increments an atomic (async-
    // signal-safe); pthread_atfork has no other preconditions.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    if rc != 0 {
        return Err(pyo3::exceptions::PyOSError::new_err((
            rc,
            "pthread_atfork failed",
        )));
    }
    errors::register(m)?;
    m.add_class::<dict::PyShmDict>()?;
    m.add_class::<dict::DictLock>()?;
    m.add_class::<dict::Stats>()?;
    m.add_class::<view::ValueView>()?;
    m.add_class::<value::PyValue>()?;
    m.add_class::<array::PyArray>()?;
    m.add_class::<array::ArrayBuffer>()?;
    m.add_class::<space::PySpace>()?;
    Ok(())
}
