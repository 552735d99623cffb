//! `shmdict.Value`: one number in a named segment (`shmdict::Value<T>`),
//! with the `array` module's typecodes.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use shmdict::Value;

use crate::errors::OrPy;
use crate::Handle;

/// The element types of the `array` module's typecodes, on Linux x86-64
/// and aarch64 (`l`/`L` are 64 bits there).
pub(crate) const TYPECODES: &str = "bBhHiIlLqQfd";

pub(crate) fn check_typecode(typecode: &str) -> PyResult<char> {
    let mut chars = typecode.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if TYPECODES.contains(c) => Ok(c),
        _ => Err(PyValueError::new_err(format!(
            "typecode must be one of {TYPECODES:?} (as in module array), not {typecode:?}"
        ))),
    }
}

/// Runs `$body` with `$t` bound to the Rust type of typecode `$code`.
macro_rules! with_type {
    ($code:expr, $t:ident => $body:expr) => {
        match $code {
            'b' => {
                type $t = i8;
                $body
            }
            'B' => {
                type $t = u8;
                $body
            }
            'h' => {
                type $t = i16;
                $body
            }
            'H' => {
                type $t = u16;
                $body
            }
            'i' => {
                type $t = i32;
                $body
            }
            'I' => {
                type $t = u32;
                $body
            }
            'l' | 'q' => {
                type $t = i64;
                $body
            }
            'L' | 'Q' => {
                type $t = u64;
                $body
            }
            'f' => {
                type $t = f32;
                $body
            }
            _ => {
                type $t = f64;
                $body
            }
        }
    };
}
pub(crate) use with_type;

enum AnyValue {
    I8(Value<i8>),
    U8(Value<u8>),
    I16(Value<i16>),
    U16(Value<u16>),
    I32(Value<i32>),
    U32(Value<u32>),
    I64(Value<i64>),
    U64(Value<u64>),
    F32(Value<f32>),
    F64(Value<f64>),
}

/// Runs `$body` on the typed value inside an `AnyValue`.
macro_rules! each {
    ($v:expr, $x:ident => $body:expr) => {
        match $v {
            AnyValue::I8($x) => $body,
            AnyValue::U8($x) => $body,
            AnyValue::I16($x) => $body,
            AnyValue::U16($x) => $body,
            AnyValue::I32($x) => $body,
            AnyValue::U32($x) => $body,
            AnyValue::I64($x) => $body,
            AnyValue::U64($x) => $body,
            AnyValue::F32($x) => $body,
            AnyValue::F64($x) => $body,
        }
    };
}

/// Runs `$body` on the typed value inside an `AnyValue` of an integer type.
macro_rules! each_int {
    ($v:expr, $x:ident => $body:expr, $other:pat => $else:expr) => {
        match $v {
            AnyValue::I8($x) => $body,
            AnyValue::U8($x) => $body,
            AnyValue::I16($x) => $body,
            AnyValue::U16($x) => $body,
            AnyValue::I32($x) => $body,
            AnyValue::U32($x) => $body,
            AnyValue::I64($x) => $body,
            AnyValue::U64($x) => $body,
            $other => $else,
        }
    };
}

impl AnyValue {
    fn open(
        py: Python<'_>,
        name: &str,
        code: char,
        init: &Bound<'_, PyAny>,
        mode: u32,
        create: bool,
        create_new: bool,
    ) -> PyResult<AnyValue> {
        macro_rules! open_as {
            ($variant:ident, $t:ty) => {{
                let init: $t = init.extract()?;
                let opts = Value::<$t>::options()
                    .mode(mode)
                    .create(create)
                    .create_new(create_new);
                AnyValue::$variant(py.detach(|| opts.open(name, init)).or_py()?)
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

/// One number in a named shared-memory segment, read and written in place
/// by every process that opens the name: `.value`, `fetch_add`. Every
/// operation is a single hardware atomic instruction.
#[pyclass(name = "Value", module = "shmdict", subclass, frozen)]
pub(crate) struct PyValue {
    name: String,
    typecode: char,
    handle: Handle<AnyValue>,
}

#[pymethods]
impl PyValue {
    #[new]
    #[pyo3(signature = (name, typecode, init=None, *, create=true, create_new=false, mode=0o600))]
    fn new(
        py: Python<'_>,
        name: String,
        typecode: &str,
        init: Option<Bound<'_, PyAny>>,
        create: bool,
        create_new: bool,
        mode: u32,
    ) -> PyResult<PyValue> {
        let code = check_typecode(typecode)?;
        let init = init.unwrap_or_else(|| 0i64.into_bound_py_any(py).expect("int"));
        let v = AnyValue::open(py, &name, code, &init, mode, create, create_new)?;
        let zero = 0i64;
        let reopen_name = name.clone();
        Ok(PyValue {
            handle: Handle::new(v, move || {
                // Attach only (create(false)): never recreate a name
                // unlinked meanwhile; accept the mode the parent accepted.
                Python::attach(|py| {
                    let zero = zero.into_bound_py_any(py).expect("int");
                    AnyValue::open(py, &reopen_name, code, &zero, mode, false, false)
                })
                .map_err(|e| shmdict::Error::InvalidArgument {
                    segment: reopen_name.clone(),
                    reason: format!("reattaching after fork: {e}"),
                })
            }),
            typecode: code,
            name,
        })
    }

    /// Removes the name (FileNotFoundError if missing).
    #[staticmethod]
    fn unlink(name: &str) -> PyResult<()> {
        // Every Value<T> unlinks the same way.
        Value::<u8>::unlink(name).or_py()
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

    /// The current value.
    #[getter]
    fn get_value<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.handle.get()?;
        each!(v, x => x.load().into_bound_py_any(py))
    }

    #[setter]
    fn set_value(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = self.handle.get()?;
        each!(v, x => x.store(value.extract()?));
        Ok(())
    }

    /// Adds `n` atomically and returns the previous value. Integers wrap
    /// around on overflow (like C and Rust atomics); floats add exactly as
    /// `a + n`.
    fn fetch_add<'py>(&self, n: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = n.py();
        let v = self.handle.get()?;
        each_int!(v, x => {
            let n: i128 = n.extract()?;
            // Wrapping: `as` keeps the low bits (two's complement).
            x.fetch_add(n as _).into_bound_py_any(py)
        }, other => match other {
            AnyValue::F32(x) => {
                let n: f32 = n.extract()?;
                let mut prev = 0.0;
                x.update(|old| { prev = old; old + n });
                prev.into_bound_py_any(py)
            }
            AnyValue::F64(x) => {
                let n: f64 = n.extract()?;
                let mut prev = 0.0;
                x.update(|old| { prev = old; old + n });
                prev.into_bound_py_any(py)
            }
            _ => unreachable!("integer variants are handled above"),
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "shmdict.Value({:?}, {:?}, value={})",
            self.name,
            self.typecode,
            self.get_value(py)?.repr()?
        ))
    }
}
