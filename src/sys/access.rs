//! Who may attach an existing segment: /dev/shm is one namespace for every
//! user, so a name may have been taken first by someone else. An opener
//! attaches only to a segment it owns whose permission bits grant nothing
//! beyond the `mode` it asked for, unless it allows more explicitly.
//!
//! The check runs on the opened file descriptor (`fstat` after `shm_open`),
//! so it concerns exactly the object that will be mapped: no window
//! between a check of the name and the open.

use std::fs::File;

use super::{create_or_attach, open_existing};
use crate::error::{Error, Result};
use crate::shm::region::Region;

/// What an opener accepts of an existing segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    /// The permission bits asked for (`Options::mode`): the segment may
    /// grant these, and no more.
    pub(crate) mode: u32,
    /// Attach whatever the owner and mode (`allow_other_owner(true)`).
    pub(crate) allow_other_owner: bool,
}

/// Refuses (`PermissionDenied`) the open segment `file` if another user
/// owns it or its permission bits grant more than `access.mode`, unless
/// `access.allow_other_owner`.
pub(crate) fn check(name: &str, file: &File, access: Access) -> Result<()> {
    if access.allow_other_owner {
        return Ok(());
    }
    let st = rustix::fs::fstat(file).map_err(|e| Error::io(name, "fstat", e))?;
    let me = rustix::process::geteuid().as_raw();
    let mode = st.st_mode & 0o7777;
    let denied = |reason: String| Error::PermissionDenied {
        segment: name.to_owned(),
        owner_uid: st.st_uid,
        mode,
        reason,
    };
    if st.st_uid != me {
        return Err(denied(format!(
            "it belongs to uid {}, not to this process's uid {me}",
            st.st_uid
        )));
    }
    let extra = mode & 0o777 & !access.mode;
    if extra != 0 {
        return Err(denied(format!(
            "its mode {:04o} grants {extra:04o} beyond the mode {:04o} asked for",
            mode & 0o777,
            access.mode
        )));
    }
    Ok(())
}

/// [`open_existing`], refusing a segment that `access` does not accept.
pub(crate) fn open_existing_checked(name: &str, access: Access) -> Result<(File, u64)> {
    let (file, len) = open_existing(name)?;
    check(name, &file, access)?;
    Ok((file, len))
}

/// [`create_or_attach`], refusing an existing segment (also one that won a
/// creation race) that `access` does not accept. A segment this call
/// creates is the caller's, with mode `access.mode`.
pub(crate) fn create_or_attach_checked<T>(
    name: &str,
    access: Access,
    len: u64,
    create_new: bool,
    init: impl Fn(&Region) -> Result<()>,
    created: impl FnOnce(File, Region) -> Result<T>,
    existing: impl FnOnce(File, u64) -> Result<T>,
) -> Result<T> {
    create_or_attach(
        name,
        access.mode,
        len,
        create_new,
        init,
        created,
        |file, len| {
            check(name, &file, access)?;
            existing(file, len)
        },
    )
}
