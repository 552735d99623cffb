//! `shmdict.Array`: a fixed-length array of numbers in a named segment
//! (`shmdict::Array<T>`), and the buffers of its `read()`/`write()` guards.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use bytemuck::Pod;
use pyo3::exceptions::{PyBufferError, PyIndexError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::{ffi, IntoPyObjectExt};
use shmdict::Array;

use crate::errors::OrPy;
use crate::value::check_typecode;
use crate::Handle;

enum AnyArray {
    I8(Array<i8>),
    U8(Array<u8>),
    I16(Array<i16>),
    U16(Array<u16>),
    I32(Array<i32>),
    U32(Array<u32>),
    I64(Array<i64>),
    U64(Array<u64>),
    F32(Array<f32>),
    F64(Array<f64>),
}

/// Runs `$body` on the typed array inside an `AnyArray`.
macro_rules! each {
    ($v:expr, $x:ident => $body:expr) => {
        match $v {
            AnyArray::I8($x) => $body,
            AnyArray::U8($x) => $body,
            AnyArray::I16($x) => $body,
            AnyArray::U16($x) => $body,
            AnyArray::I32($x) => $body,
            AnyArray::U32($x) => $body,
            AnyArray::I64($x) => $body,
            AnyArray::U64($x) => $body,
            AnyArray::F32($x) => $body,
            AnyArray::F64($x) => $body,
        }
    };
}

impl AnyArray {
    fn open(
        py: Python<'_>,
        name: &str,
        code: char,
        len: usize,
        mode: u32,
        create: bool,
        create_new: bool,
    ) -> shmdict::Result<AnyArray> {
        macro_rules! open_as {
            ($variant:ident, $t:ty) => {{
                let opts = Array::<$t>::options()
                    .mode(mode)
                    .create(create)
                    .create_new(create_new);
                AnyArray::$variant(py.detach(|| opts.open(name, len))?)
            }};
        }
        Ok(match code {
            'b' => open_as!(I8, i8),
            'B' => open_as!(U8, u8),
            'h' => open_as!(I16, i16),
            'H' => open_as!(U16, u16),
            'i' => open_as!(I32, i32),
            'I' => open_as!(U32, u32),
            'l' | 'q' => open_as!(I64, i64),
            'L' | 'Q' => open_as!(U64, u64),
            'f' => open_as!(F32, f32),
            _ => open_as!(F64, f64),
        })
    }
}

/// Guards held per thread on one `shmdict.Array` object: (shared,
/// exclusive). A thread asking for access that conflicts with a guard it
/// holds would wait for itself forever; it gets `RuntimeError` instead.
type Held = Mutex<HashMap<ThreadId, (usize, usize)>>;

fn held_change(held: &Held, thread: ThreadId, exclusive: bool, add: bool) {
    let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
    let e = h.entry(thread).or_default();
    let n = if exclusive { &mut e.1 } else { &mut e.0 };
    *n = if add { *n + 1 } else { n.saturating_sub(1) };
    if *e == (0, 0) {
        h.remove(&thread);
    }
}

fn check_no_self_deadlock(held: &Held, exclusive: bool) -> PyResult<()> {
    let h = held.lock().unwrap_or_else(|e| e.into_inner());
    let (shared, excl) = h
        .get(&std::thread::current().id())
        .copied()
        .unwrap_or_default();
    if excl > 0 || (exclusive && shared > 0) {
        return Err(PyRuntimeError::new_err(
            "this thread holds a read() or write() buffer of this array that excludes this \
             access (waiting would deadlock): use that buffer, or release it first",
        ));
    }
    Ok(())
}

/// A fixed-length array of numbers in a named shared-memory segment,
/// shared in place by every process that opens the name with the same
/// typecode and length: `len(a)`, `a[i]`, `a[i] = v`, and `read()` /
/// `write()` buffers that numpy uses without a copy.
#[pyclass(name = "Array", module = "shmdict", subclass, frozen)]
pub(crate) struct PyArray {
    name: String,
    typecode: char,
    len: usize,
    handle: Handle<AnyArray>,
    held: Arc<Held>,
}

impl PyArray {
    fn index(&self, i: isize) -> PyResult<usize> {
        let len = self.len as isize;
        let j = if i < 0 { i + len } else { i };
        if j < 0 || j >= len {
            return Err(PyIndexError::new_err("array index out of range"));
        }
        Ok(j as usize)
    }

    fn buffer(&self, py: Python<'_>, write: bool) -> PyResult<ArrayBuffer> {
        check_no_self_deadlock(&self.held, write)?;
        let array = self.handle.get_arc()?;
        let (guard, ptr, recovered): (Box<dyn Send>, *mut u8, bool) =
            each!(&*array, a => lock(py, a, write));
        let thread = std::thread::current().id();
        held_change(&self.held, thread, write, true);
        let itemsize = self.itemsize() as isize;
        Ok(ArrayBuffer {
            state: Mutex::new(BufState {
                guard: Some(guard),
                exports: 0,
                exited: false,
            }),
            ptr: BufPtr(ptr),
            len_bytes: self.len as isize * itemsize,
            itemsize,
            shape: [self.len as isize],
            strides: [itemsize],
            format: format_of(self.typecode),
            readonly: !write,
            recovered,
            thread,
            held: Arc::clone(&self.held),
            _array: array,
        })
    }

    fn itemsize(&self) -> usize {
        crate::value::with_type!(self.typecode, T => std::mem::size_of::<T>())
    }
}

/// Takes `a`'s lock (shared or exclusive) without the GIL; returns the
/// guard (type-erased), the address of the elements and `recovered`.
fn lock<T: Pod + Send + Sync>(
    py: Python<'_>,
    a: &Array<T>,
    write: bool,
) -> (Box<dyn Send>, *mut u8, bool) {
    // SAFETY: `a` lives inside an `Arc<AnyArray>` that the `ArrayBuffer`
    // made from this guard keeps (`_array`), and the buffer drops the guard
    // before that `Arc` (see `ArrayBuffer`'s `Drop`), so the guard never
    // outlives the array it borrows.
    let a: &'static Array<T> = unsafe { &*(a as *const Array<T>) };
    if write {
        let mut g = py.detach(|| a.write());
        let ptr = g.as_mut_ptr().cast::<u8>();
        let recovered = g.recovered();
        (Box::new(g), ptr, recovered)
    } else {
        let g = py.detach(|| a.read());
        let ptr = g.as_ptr().cast::<u8>().cast_mut();
        let recovered = g.recovered();
        (Box::new(g), ptr, recovered)
    }
}

fn format_of(code: char) -> &'static CStr {
    match code {
        'b' => c"b",
        'B' => c"B",
        'h' => c"h",
        'H' => c"H",
        'i' => c"i",
        'I' => c"I",
        'l' => c"l",
        'L' => c"L",
        'q' => c"q",
        'Q' => c"Q",
        'f' => c"f",
        _ => c"d",
    }
}

#[pymethods]
impl PyArray {
    #[new]
    #[pyo3(signature = (name, typecode, length, *, create=true, create_new=false, mode=0o600))]
    fn new(
        py: Python<'_>,
        name: String,
        typecode: &str,
        length: usize,
        create: bool,
        create_new: bool,
        mode: u32,
    ) -> PyResult<PyArray> {
        let code = check_typecode(typecode)?;
        let a = AnyArray::open(py, &name, code, length, mode, create, create_new).or_py()?;
        let reopen_name = name.clone();
        Ok(PyArray {
            handle: Handle::new(a, move || {
                // Attach only (create(false)): never recreate a name
                // unlinked meanwhile; accept the mode the parent accepted.
                Python::attach(|py| {
                    AnyArray::open(py, &reopen_name, code, length, mode, false, false)
                })
            }),
            typecode: code,
            len: length,
            held: Arc::default(),
            name,
        })
    }

    /// Removes the name (FileNotFoundError if missing).
    #[staticmethod]
    fn unlink(name: &str) -> PyResult<()> {
        Array::<u8>::unlink(name).or_py()
    }

    /// The segment's name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The typecode (as in module array).
    #[getter]
    fn typecode(&self) -> String {
        self.typecode.to_string()
    }

    /// Bytes per element.
    #[getter(itemsize)]
    fn get_itemsize(&self) -> usize {
        self.itemsize()
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __getitem__<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyAny>> {
        let i = self.index(i)?;
        check_no_self_deadlock(&self.held, false)?;
        let array = self.handle.get()?;
        each!(array, a => {
            let v = py.detach(|| a.get(i));
            v.into_bound_py_any(py)
        })
    }

    fn __setitem__(&self, py: Python<'_>, i: isize, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let i = self.index(i)?;
        check_no_self_deadlock(&self.held, true)?;
        let array = self.handle.get()?;
        each!(array, a => {
            let v = v.extract()?;
            py.detach(|| a.set(i, v));
        });
        Ok(())
    }

    /// Shared access to all elements, as a read-only buffer: `with
    /// a.read() as m: numpy.asarray(m)` (no copy). Holds the shared lock
    /// until the `with` block ends and every buffer exported from `m`
    /// (memoryview, numpy array) is released.
    fn read(&self, py: Python<'_>) -> PyResult<ArrayBuffer> {
        self.buffer(py, false)
    }

    /// Exclusive access to all elements, as a writable buffer: `with
    /// a.write() as m: numpy.asarray(m)[:] = ...` writes the shared memory
    /// in place. Holds the exclusive lock until the `with` block ends and
    /// every buffer exported from `m` is released.
    fn write(&self, py: Python<'_>) -> PyResult<ArrayBuffer> {
        self.buffer(py, true)
    }

    /// The elements as a list (a copy, under the shared lock).
    fn tolist<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        check_no_self_deadlock(&self.held, false)?;
        let array = self.handle.get()?;
        each!(array, a => {
            let v = py.detach(|| a.to_vec());
            v.into_bound_py_any(py)
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "shmdict.Array({:?}, {:?}, {})",
            self.name, self.typecode, self.len
        )
    }
}

struct BufState {
    guard: Option<Box<dyn Send>>,
    exports: usize,
    exited: bool,
}

struct BufPtr(*mut u8);

// SAFETY: the pointer is into the shared mapping, which the buffer keeps
// mapped (`_array`); access to the bytes is governed by the lock that the
// guard holds, not by the thread that holds the pointer.
unsafe impl Send for BufPtr {}
// SAFETY: as for `Send`; the pointer itself is never written.
unsafe impl Sync for BufPtr {}

/// The elements of a `shmdict.Array` under its lock, with the buffer
/// protocol (format = the typecode, 1-D): `numpy.asarray(m)` and
/// `memoryview(m)` share the memory without copying.
///
/// The lock is held until the `with` block ends (or `release()`) and
/// every exported buffer is released, whichever is last.
#[pyclass(module = "shmdict", frozen)]
pub(crate) struct ArrayBuffer {
    state: Mutex<BufState>,
    ptr: BufPtr,
    len_bytes: isize,
    itemsize: isize,
    shape: [isize; 1],
    strides: [isize; 1],
    format: &'static CStr,
    readonly: bool,
    recovered: bool,
    thread: ThreadId,
    held: Arc<Held>,
    _array: Arc<AnyArray>,
}

impl ArrayBuffer {
    fn drop_guard(&self, st: &mut BufState) {
        if st.guard.take().is_some() {
            held_change(&self.held, self.thread, !self.readonly, false);
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BufState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ArrayBuffer {
    fn drop(&mut self) {
        // The guard borrows `_array`: release it first.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.guard.take().is_some() {
            held_change(&self.held, self.thread, !self.readonly, false);
        }
    }
}

#[pymethods]
impl ArrayBuffer {
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
        let mut st = this.state();
        if st.guard.is_none() {
            return Err(PyBufferError::new_err(
                "the array buffer was released (its lock is no longer held)",
            ));
        }
        if this.readonly && (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err(
                "a read() buffer is read-only: use write() to modify the array",
            ));
        }
        st.exports += 1;
        drop(st);
        // SAFETY: `view` is a valid Py_buffer to fill (the caller's
        // contract). The pointers stored point into `this`, which the view
        // keeps alive through `obj` (a new reference), and into the shared
        // mapping, which `this` keeps mapped and locked until the view is
        // released (`__releasebuffer__`).
        unsafe {
            (*view).obj = slf.clone().into_any().into_ptr();
            (*view).buf = this.ptr.0.cast::<c_void>();
            (*view).len = this.len_bytes;
            (*view).readonly = c_int::from(this.readonly);
            (*view).itemsize = this.itemsize;
            (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
                this.format.as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND {
                this.shape.as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES {
                this.strides.as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    /// # Safety
    /// Called by Python with a view filled by `__getbuffer__`.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        let mut st = self.state();
        st.exports = st.exports.saturating_sub(1);
        if st.exports == 0 && st.exited {
            self.drop_guard(&mut st);
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Ends the `with` block: the lock is released now, or when the last
    /// exported buffer is released if some are still alive.
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        let mut st = self.state();
        st.exited = true;
        if st.exports == 0 {
            self.drop_guard(&mut st);
        }
        false
    }

    /// Releases the lock now. BufferError if buffers exported from this
    /// object (memoryviews, numpy arrays) are still alive.
    fn release(&self) -> PyResult<()> {
        let mut st = self.state();
        if st.exports > 0 {
            return Err(PyBufferError::new_err(format!(
                "{} exported buffer(s) still use this memory: release them first",
                st.exports
            )));
        }
        st.exited = true;
        self.drop_guard(&mut st);
        Ok(())
    }

    /// Whether the lock is still held by this buffer.
    #[getter]
    fn held(&self) -> bool {
        self.state().guard.is_some()
    }

    /// Whether the buffer is read-only (from `read()`).
    #[getter]
    fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether taking the lock found a holder that had died holding it
    /// (whatever it was writing may be half written).
    #[getter]
    fn recovered(&self) -> bool {
        self.recovered
    }

    fn __len__(&self) -> usize {
        self.shape[0] as usize
    }
}
