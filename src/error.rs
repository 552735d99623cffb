//! The one error type of the public API.

use std::fmt;
use std::io;

/// Everything that can go wrong in shmdict.
///
/// Each message names the segment it concerns and the cause. Match variants
/// with `{ .. }`: fields may be added.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No room for the key or the value (arena, index or attach table). Nothing
    /// already stored was lost; freeing space makes room again.
    Full {
        /// The segment's name.
        segment: String,
        /// What ran out, e.g. `"arena"` or `"index (capacity 1000 keys)"`.
        what: String,
    },
    /// `create_new(true)` was asked for and a segment of that name exists.
    AlreadyExists {
        /// The segment's name.
        segment: String,
    },
    /// There is no segment of that name.
    NotFound {
        /// The segment's name.
        segment: String,
    },
    /// The name is not 1 to 200 characters of `[A-Za-z0-9._-]`.
    InvalidName {
        /// The rejected name (possibly shortened).
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The segment holds another format version, another kind of object, or
    /// another type or layout than asked for.
    Incompatible {
        /// The segment's name.
        segment: String,
        /// What differs.
        reason: String,
    },
    /// The segment failed a validity check.
    Corrupt {
        /// The segment's name.
        segment: String,
        /// The check that failed.
        reason: String,
    },
    /// A typed value could not be encoded or decoded with postcard.
    Codec {
        /// The segment's name.
        segment: String,
        /// The codec's message.
        source: postcard::Error,
    },
    /// A value is not a valid rkyv archive of the type asked for
    /// ([`ValueRef::access_archived`](crate::ValueRef::access_archived),
    /// feature `rkyv`).
    #[cfg(feature = "rkyv")]
    Archive {
        /// The segment's name.
        segment: String,
        /// What rkyv's validation found.
        source: rkyv::rancor::Error,
    },
    /// An argument is out of the supported range (for example a capacity that
    /// does not fit the format).
    InvalidArgument {
        /// The segment's name.
        segment: String,
        /// What is wrong.
        reason: String,
    },
    /// A segment of that name exists but belongs to another user, or its
    /// permission bits grant more than the opener's `mode` would: /dev/shm
    /// is one namespace for every user, so someone else may have taken the
    /// name first. Attaching anyway needs `allow_other_owner(true)` (on
    /// [`Options`](crate::Options), the `Value`/`Array` option builders, or
    /// for a space [`Space::open_with`](crate::space::Space::open_with)).
    PermissionDenied {
        /// The segment's name.
        segment: String,
        /// The uid that owns the segment.
        owner_uid: u32,
        /// The segment's permission bits (`st_mode & 0o7777`).
        mode: u32,
        /// What was refused: another owner, or bits beyond the mode asked for.
        reason: String,
    },
    /// An operating-system call failed.
    Io {
        /// The segment's name, if the error concerns one.
        segment: Option<String>,
        /// The operation that failed, e.g. `"shm_open"`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(segment: &str, op: &'static str, source: impl Into<io::Error>) -> Error {
        Error::Io {
            segment: Some(segment.to_owned()),
            op,
            source: source.into(),
        }
    }

    pub(crate) fn corrupt(segment: &str, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            segment: segment.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn incompatible(segment: &str, reason: impl Into<String>) -> Error {
        Error::Incompatible {
            segment: segment.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn full(segment: &str, what: impl Into<String>) -> Error {
        Error::Full {
            segment: segment.to_owned(),
            what: what.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Full { segment, what } => {
                write!(
                    f,
                    "shmdict segment '{segment}' is full: no room in the {what}"
                )
            }
            Error::AlreadyExists { segment } => {
                write!(f, "shmdict segment '{segment}' already exists")
            }
            Error::NotFound { segment } => write!(f, "shmdict segment '{segment}' does not exist"),
            Error::InvalidName { name, reason } => {
                write!(f, "invalid shmdict segment name '{name}': {reason}")
            }
            Error::Incompatible { segment, reason } => {
                write!(f, "shmdict segment '{segment}' is incompatible: {reason}")
            }
            Error::Corrupt { segment, reason } => {
                write!(f, "shmdict segment '{segment}' is corrupt: {reason}")
            }
            Error::Codec { segment, source } => {
                write!(
                    f,
                    "shmdict segment '{segment}': value codec error: {source}"
                )
            }
            #[cfg(feature = "rkyv")]
            Error::Archive { segment, source } => {
                write!(
                    f,
                    "shmdict segment '{segment}': the value is not a valid archive of the type asked for: {source}"
                )
            }
            Error::InvalidArgument { segment, reason } => {
                write!(f, "shmdict segment '{segment}': invalid argument: {reason}")
            }
            Error::PermissionDenied {
                segment,
                owner_uid,
                mode,
                reason,
            } => write!(
                f,
                "shmdict segment '{segment}' (owner uid {owner_uid}, mode {mode:04o}) was not \
                 attached: {reason}; to attach anyway, open it with allow_other_owner(true) \
                 (CLI: --allow-other-owner)"
            ),
            Error::Io {
                segment: Some(segment),
                op,
                source,
            } => write!(f, "shmdict segment '{segment}': {op} failed: {source}"),
            Error::Io {
                segment: None,
                op,
                source,
            } => write!(f, "shmdict: {op} failed: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Codec { source, .. } => Some(source),
            #[cfg(feature = "rkyv")]
            Error::Archive { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Error {
        Error::Io {
            segment: None,
            op: "I/O",
            source,
        }
    }
}

/// `Result<T, shmdict::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_segment_and_cause() {
        let e = Error::full("jobs", "arena");
        assert_eq!(
            e.to_string(),
            "shmdict segment 'jobs' is full: no room in the arena"
        );
        let e = Error::io(
            "jobs",
            "shm_open",
            io::Error::from_raw_os_error(libc::EACCES),
        );
        let msg = e.to_string();
        assert!(msg.contains("'jobs'") && msg.contains("shm_open"), "{msg}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
