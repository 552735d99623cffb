//! `shmdict::Error` to Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileExistsError, PyFileNotFoundError, PyOSError, PyPermissionError,
    PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;

create_exception!(
    shmdict,
    Error,
    PyException,
    "Base class of shmdict's own errors."
);
create_exception!(
    shmdict,
    FullError,
    Error,
    "No room for the key or the value; nothing already stored was lost."
);
create_exception!(
    shmdict,
    CorruptError,
    Error,
    "The segment failed a validity check."
);
create_exception!(
    shmdict,
    IncompatibleError,
    Error,
    "The segment holds another format version, kind of object, type or layout."
);

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("FullError", py.get_type::<FullError>())?;
    m.add("CorruptError", py.get_type::<CorruptError>())?;
    m.add("IncompatibleError", py.get_type::<IncompatibleError>())?;
    Ok(())
}

/// The Python exception for a crate error (see the package docs).
pub(crate) fn to_py(e: shmdict::Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        shmdict::Error::Full { .. } => FullError::new_err(msg),
        shmdict::Error::AlreadyExists { .. } => PyFileExistsError::new_err(msg),
        shmdict::Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        shmdict::Error::InvalidName { .. } | shmdict::Error::InvalidArgument { .. } => {
            PyValueError::new_err(msg)
        }
        shmdict::Error::Incompatible { .. } => IncompatibleError::new_err(msg),
        shmdict::Error::Corrupt { .. } => CorruptError::new_err(msg),
        // Another user's segment, or one more open than asked for.
        shmdict::Error::PermissionDenied { .. } => PyPermissionError::new_err(msg),
        shmdict::Error::Io { source, .. } => match source.raw_os_error() {
            // OSError(errno, message) picks the subclass (PermissionError
            // for EACCES, FileNotFoundError for ENOENT, ...).
            Some(errno) => PyOSError::new_err((errno, msg)),
            None if source.kind() == std::io::ErrorKind::TimedOut => PyTimeoutError::new_err(msg),
            None => PyOSError::new_err(msg),
        },
        // Codec errors and variants added later.
        _ => Error::new_err(msg),
    }
}

/// `.map_err(to_py)` as a method.
pub(crate) trait OrPy<T> {
    fn or_py(self) -> PyResult<T>;
}

impl<T> OrPy<T> for shmdict::Result<T> {
    fn or_py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
