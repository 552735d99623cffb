//! `shmdict.ValueView`: a zero-copy, read-only buffer over one value of a
//! `ShmDict` (`ShmDict.view(key)`), holding a borrowed read of the crate
//! (`shmdict::ValueRef`) and so its pin.
//!
//! The pin is what keeps the bytes: while it lives, no process recycles
//! the value's block, whatever is written to the key meanwhile (see the
//! crate's `Reader`). So the rule here is that the pin outlives every
//! pointer to the bytes handed to Python:
//!
//! - each exported buffer (`memoryview(v)`, `bytes(v)` while it copies, a
//!   numpy array) counts in `exports` and holds a reference to the view
//!   (`Py_buffer.obj`), so the view cannot be dropped while one is alive;
//! - `release()` refuses (`BufferError`) while `exports > 0`, instead of
//!   releasing the pin; the end of a `with` block then leaves the pin to
//!   the last exported buffer, whose release releases it (CONTRACT.md: a
//!   view keeps its memory pinned until the last exported buffer is
//!   released, even past the `with` block);
//! - `__getbuffer__` refuses once released.
//!
//! A view of an absent key holds nothing: `with d.view(k) as m` gives
//! `m = None`, and asking it for a buffer is `KeyError`.

use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyBufferError, PyKeyError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use shmdict::{ShmDict, ValueRef};

/// What changes over a view's life.
struct ViewState {
    /// The borrowed read (and its pin); `None` once released. Its `'static`
    /// is a promise kept by `ValueView`: see there.
    value: Option<ValueRef<'static>>,
    /// Buffers exported and not yet released.
    exports: usize,
    /// A `with` block ended while buffers were exported: the last one's
    /// release releases the read.
    release_with_last_export: bool,
}

/// A zero-copy, read-only view of one value of a ShmDict, from
/// `ShmDict.view(key)`: `bytes(v)`, `memoryview(v)` and
/// `numpy.frombuffer(v, dtype)` read the shared memory itself.
///
/// The bytes never change while the view holds them, whatever other
/// processes write to the key meanwhile; a new `d[key]` sees the new value.
/// While held, memory of values replaced since cannot be reused by any
/// process (writers may get FullError): release views soon. `release()`
/// releases it, and raises BufferError instead while buffers exported from
/// it (memoryviews, numpy arrays) are alive; the end of a `with` block
/// releases it, or, while buffers are alive, leaves it held until the last
/// of them is released; the view is also released when garbage-collected.
/// A view of an absent key holds nothing: `with d.view(k) as m` gives
/// `m = None`, and a buffer of it is KeyError.
#[pyclass(name = "ValueView", module = "shmdict", frozen)]
pub(crate) struct ValueView {
    // Declared before `_dict`, and released first in `Drop`: the borrowed
    // read points into the dictionary that `_dict` keeps alive.
    state: Mutex<ViewState>,
    /// The value's address (as a number: the view is `Send` and `Sync`
    /// through its fields) and length in the mapping, valid while `state`
    /// holds the read.
    addr: usize,
    len: usize,
    /// The fork generation of the process that took the view.
    generation: u64,
    /// Whether the key was present when the view was taken.
    present: bool,
    key: Vec<u8>,
    /// The crate handle the read borrows. An `Arc` of the handle itself,
    /// not the Python `ShmDict` object: the object may be collected first,
    /// and after `fork` it points to the child's new handle, while the read
    /// borrows the one it was taken from.
    _dict: Arc<ShmDict>,
}

impl ValueView {
    /// The view of `key` in `dict` (holding nothing if absent).
    pub(crate) fn new(dict: Arc<ShmDict>, key: &[u8]) -> shmdict::Result<ValueView> {
        // SAFETY: the reference points into the `Arc` stored in the view
        // below, which keeps the handle alive until the view is dropped;
        // the read made from it lives in `state`, which `Drop` empties
        // before the `Arc` is released (and which is declared before it).
        // So the read never outlives the handle it borrows, though its
        // type says `'static`.
        let d: &'static ShmDict = unsafe { &*Arc::as_ptr(&dict) };
        let value = d.get_ref(key)?;
        Ok(ValueView {
            addr: value.as_ref().map_or(0, |v| v.as_ptr() as usize),
            len: value.as_ref().map_or(0, |v| v.len()),
            present: value.is_some(),
            state: Mutex::new(ViewState {
                value,
                exports: 0,
                release_with_last_export: false,
            }),
            generation: crate::fork_generation(),
            key: key.to_vec(),
            _dict: dict,
        })
    }

    fn absent(&self, py: Python<'_>) -> PyErr {
        PyKeyError::new_err(key_object(py, &self.key))
    }

    fn state(&self) -> MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ValueView {
    fn drop(&mut self) {
        // The read borrows `_dict`: release it first (fields drop in
        // declaration order too; this says it explicitly).
        self.state().value.take();
    }
}

#[pymethods]
impl ValueView {
    /// # Safety
    /// Called by Python with a valid `Py_buffer` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        let this = slf.get();
        if this.generation != crate::fork_generation() {
            // The pin belongs to the parent, which may release it at any
            // time: the bytes are not this process's to rely on.
            return Err(PyBufferError::new_err(
                "a view inherited through fork: take a new view in this process",
            ));
        }
        if !this.present {
            return Err(this.absent(slf.py()));
        }
        let mut st = this.state();
        if st.value.is_none() {
            return Err(PyBufferError::new_err("the view was released"));
        }
        // SAFETY: `view` is a valid Py_buffer to fill (the caller's
        // contract). `PyBuffer_FillInfo` fills a one-dimensional buffer of
        // unsigned bytes as `flags` asks, refusing (BufferError, -1) a
        // writable request since readonly is 1; it stores a new reference
        // to the view in `obj`, which keeps the view, and so the read, the
        // pin and the mapping, alive until the buffer is released. The
        // bytes do not change meanwhile (see `ValueView`), and Python never
        // writes through a read-only buffer. `addr`/`len` are the read's,
        // held (checked above, under the lock that `release` takes).
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                this.addr as *mut c_void,
                this.len as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        st.exports += 1;
        Ok(())
    }

    /// # Safety
    /// Called by Python with a view filled by `__getbuffer__`.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        let mut st = self.state();
        st.exports = st.exports.saturating_sub(1);
        if st.exports == 0 && st.release_with_last_export {
            let value = st.value.take();
            drop(st);
            drop(value);
        }
    }

    /// Releases the view (its pin) now. BufferError if buffers exported
    /// from it (memoryviews, numpy arrays) are still alive: release them
    /// first. Releasing twice is allowed.
    fn release(&self) -> PyResult<()> {
        let mut st = self.state();
        if st.exports > 0 {
            return Err(PyBufferError::new_err(format!(
                "{} exported buffer(s) still use this view's memory: release them first \
                 (the view stays held)",
                st.exports
            )));
        }
        let value = st.value.take();
        drop(st);
        drop(value);
        Ok(())
    }

    /// The view, or None if the key was absent.
    fn __enter__(slf: Bound<'_, Self>) -> Option<Bound<'_, Self>> {
        slf.get().present.then_some(slf)
    }

    /// Ends the `with` block by releasing the view; while buffers exported
    /// from it are alive, the view stays held until the last is released.
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let mut st = self.state();
        if st.exports > 0 {
            st.release_with_last_export = true;
            return Ok(false);
        }
        let value = st.value.take();
        drop(st);
        drop(value);
        Ok(false)
    }

    /// Whether the view holds a value (the key was present, and the view
    /// is not released).
    fn __bool__(&self) -> bool {
        self.present && !self.released()
    }

    /// Whether the view was released.
    #[getter]
    fn released(&self) -> bool {
        self.state().value.is_none()
    }

    /// The key this view reads (bytes).
    #[getter]
    fn key(&self) -> &[u8] {
        &self.key
    }

    /// The value's length in bytes; ValueError once released, KeyError if
    /// the key was absent.
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        if !self.present {
            return Err(self.absent(py));
        }
        if self.released() {
            return Err(PyValueError::new_err(
                "operation forbidden on a released view",
            ));
        }
        Ok(self.len)
    }

    fn __repr__(&self) -> String {
        let key = String::from_utf8_lossy(&self.key);
        if !self.present {
            format!("<shmdict.ValueView {key:?} absent>")
        } else if self.released() {
            format!("<shmdict.ValueView {key:?} released>")
        } else {
            format!("<shmdict.ValueView {key:?}, {} bytes>", self.len)
        }
    }
}

/// The key as Python shows it in a KeyError: `str` if it is UTF-8, else
/// `bytes`.
fn key_object(py: Python<'_>, key: &[u8]) -> Py<PyAny> {
    match std::str::from_utf8(key) {
        Ok(s) => pyo3::types::PyString::new(py, s).into_any().unbind(),
        Err(_) => pyo3::types::PyBytes::new(py, key).into_any().unbind(),
    }
}
