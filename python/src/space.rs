//! `shmdict._shmdict.Space`: the tuple space of `shmdict::space`, with
//! fields and patterns already encoded by `shmdict/__init__.py`.
//!
//! A field crosses this boundary as `(kind, value)`: kind 0 int (i64),
//! 1 float, 2 str, 3 bytes, 4 bool, 5 opaque bytes (Python pickles other
//! objects into these). A pattern element is `(0,)` any value, `(1, field)`
//! this exact field, `(2, [kinds], opaque_pred)` any field of these kinds or an opaque field
//! that `opaque_pred` (may be None) accepts, or
//! `(3, callable)` a predicate called with the field's `(kind, value)`.

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use shmdict::space::{Field, FieldKind, Match, Pattern, Space, Tuple};

use crate::errors::OrPy;
use crate::{deadline, wait_in_slices, Handle};

fn kind_of(k: u8) -> PyResult<FieldKind> {
    Ok(match k {
        0 => FieldKind::I64,
        1 => FieldKind::F64,
        2 => FieldKind::Str,
        3 => FieldKind::Bytes,
        4 => FieldKind::Bool,
        5 => FieldKind::Opaque,
        _ => return Err(PyValueError::new_err(format!("unknown field kind {k}"))),
    })
}

fn field_from_py(o: &Bound<'_, PyAny>) -> PyResult<Field> {
    let (k, v): (u8, Bound<'_, PyAny>) = o.extract()?;
    Ok(match kind_of(k)? {
        FieldKind::I64 => Field::I64(v.extract()?),
        FieldKind::F64 => Field::F64(v.extract()?),
        FieldKind::Str => Field::Str(v.extract()?),
        FieldKind::Bytes => Field::Bytes(v.extract()?),
        FieldKind::Bool => Field::Bool(v.extract()?),
        FieldKind::Opaque => Field::Opaque(v.extract()?),
    })
}

fn field_to_py<'py>(py: Python<'py>, f: &Field) -> PyResult<Bound<'py, PyTuple>> {
    match f {
        Field::I64(v) => (0u8, *v).into_pyobject(py),
        Field::F64(v) => (1u8, *v).into_pyobject(py),
        Field::Str(v) => (2u8, v.as_str()).into_pyobject(py),
        Field::Bytes(v) => (3u8, PyBytes::new(py, v)).into_pyobject(py),
        Field::Bool(v) => (4u8, *v).into_pyobject(py),
        Field::Opaque(v) => (5u8, PyBytes::new(py, v)).into_pyobject(py),
    }
}

fn tuple_to_py<'py>(py: Python<'py>, t: &Tuple) -> PyResult<Bound<'py, PyList>> {
    let fields = t
        .fields()
        .iter()
        .map(|f| field_to_py(py, f))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, fields)
}

/// The first exception raised by a predicate of a pattern.
type Failure = Arc<Mutex<Option<PyErr>>>;

fn pattern_from_py(p: &Bound<'_, PyAny>, failure: &Failure) -> PyResult<Pattern> {
    let mut matches = Vec::new();
    for m in p.try_iter()? {
        let m = m?;
        let tag: u8 = m.get_item(0)?.extract()?;
        matches.push(match tag {
            0 => Match::Any,
            1 => Match::Exact(field_from_py(&m.get_item(1)?)?),
            2 => {
                let kinds = m
                    .get_item(1)?
                    .extract::<Vec<u8>>()?
                    .into_iter()
                    .map(kind_of)
                    .collect::<PyResult<Vec<_>>>()?;
                let opaque = match m.get_item(2) {
                    Ok(p) if !p.is_none() => Some(py_pred(p.unbind(), failure)),
                    _ => None,
                };
                match (&kinds[..], opaque) {
                    ([k], None) => Match::Kind(*k),
                    (_, None) => Match::pred(move |f| kinds.contains(&f.kind())),
                    (_, Some(pred)) => Match::pred(move |f| {
                        kinds.contains(&f.kind()) || (f.kind() == FieldKind::Opaque && pred(f))
                    }),
                }
            }
            3 => Match::pred(py_pred(m.get_item(1)?.unbind(), failure)),
            _ => return Err(PyTypeError::new_err(format!("unknown pattern tag {tag}"))),
        });
    }
    Ok(Pattern::new(matches))
}

/// A predicate calling the Python callable `pred` with the field's
/// `(kind, value)`; an exception is kept in `failure` and makes every
/// later call false.
fn py_pred(pred: Py<PyAny>, failure: &Failure) -> impl Fn(&Field) -> bool + Send + Sync + 'static {
    let failure = Arc::clone(failure);
    move |f| {
        Python::attach(|py| {
            let mut slot = failure.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                // After an exception nothing matches: the call ends without
                // taking anything and raises it.
                return false;
            }
            let r = field_to_py(py, f)
                .and_then(|arg| pred.bind(py).call1((arg,)))
                .and_then(|r| r.is_truthy());
            match r {
                Ok(yes) => yes,
                Err(e) => {
                    *slot = Some(e);
                    false
                }
            }
        })
    }
}

fn raise_failure(failure: &Failure) -> PyResult<()> {
    match failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The Rust half of `shmdict.Space` (which encodes tuples and patterns).
#[pyclass(name = "_Space", module = "shmdict._shmdict", subclass, frozen)]
pub(crate) struct PySpace {
    name: String,
    handle: Handle<Space>,
}

#[pymethods]
impl PySpace {
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
    ) -> PyResult<PySpace> {
        let opts = crate::dict_options(&crate::DictArgs {
            capacity,
            arena_bytes,
            create,
            create_new,
            mode,
            max_bytes,
            fixed_size,
        });
        let dict = py.detach(|| opts.open(&name)).or_py()?;
        let reopen_name = name.clone();
        Ok(PySpace {
            handle: Handle::new(Space::from_dict(dict), move || {
                crate::reattach_options(mode)
                    .open(&reopen_name)
                    .map(Space::from_dict)
            }),
            name,
        })
    }

    #[staticmethod]
    fn unlink(name: &str) -> PyResult<()> {
        Space::unlink(name).or_py()
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    fn __len__(&self) -> PyResult<usize> {
        self.handle.get()?.len().or_py()
    }

    fn _out(&self, fields: &Bound<'_, PyAny>) -> PyResult<()> {
        let fields = fields
            .try_iter()?
            .map(|f| field_from_py(&f?))
            .collect::<PyResult<Vec<_>>>()?;
        self.handle.get()?.out(Tuple::new(fields)).or_py()
    }

    #[pyo3(signature = (pattern, take, timeout))]
    fn _wait<'py>(
        &self,
        py: Python<'py>,
        pattern: &Bound<'py, PyAny>,
        take: bool,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let failure = Failure::default();
        let p = pattern_from_py(pattern, &failure)?;
        let space = self.handle.get()?;
        let s: &Space = space;
        let pr = &p;
        let found = wait_in_slices(py, deadline(timeout)?, |py, slice| {
            let r = py
                .detach(|| {
                    if take {
                        s.take(pr, slice)
                    } else {
                        s.read(pr, slice)
                    }
                })
                .or_py();
            raise_failure(&failure)?;
            r
        })?;
        found.map(|t| tuple_to_py(py, &t)).transpose()
    }

    fn _try<'py>(
        &self,
        py: Python<'py>,
        pattern: &Bound<'py, PyAny>,
        take: bool,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let failure = Failure::default();
        let p = pattern_from_py(pattern, &failure)?;
        let space = self.handle.get()?;
        // Predicates run here with the GIL held (no waiting).
        let r = if take {
            space.try_take(&p)
        } else {
            space.try_read(&p)
        }
        .or_py();
        raise_failure(&failure)?;
        r?.map(|t| tuple_to_py(py, &t)).transpose()
    }
}
