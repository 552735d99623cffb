//! Open-file-description locks on segment files: facts the kernel keeps
//! about who still has a segment open.
//!
//! An OFD lock (`F_OFD_SETLK`, Linux 3.15) belongs to an open file
//! description, not to a process or a thread: it is released when the last
//! file descriptor referring to that description is closed, which the kernel
//! does for every descriptor of a process when the process dies, whatever
//! its pid namespace. The locks are advisory and may lie past the end of the
//! file; they never touch the segment's bytes.
//!
//! Every handle opens its own description of the segment file, so two
//! handles (in one process or in two) conflict with each other. Bytes used:
//!
//! | byte      | lock                                                        |
//! |-----------|-------------------------------------------------------------|
//! | 0         | shared by every open handle, for its whole life; exclusive  |
//! |           | by `segments::gc` while it decides and unlinks              |
//! | 1 + i     | exclusive by the handle that claimed attach entry `i`       |
//!
//! `F_OFD_GETLK` reports locks of *other* descriptions only: a handle asking
//! about a byte it holds itself is told it is free. Callers never ask about
//! their own entry (their own holds are decided by their hold counts).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The byte every open handle locks shared (see the module doc).
pub(crate) const OPEN_BYTE: u64 = 0;

/// The byte that the owner of attach entry `index` locks.
pub(crate) fn entry_byte(index: u64) -> u64 {
    1 + index
}

fn flock(kind: libc::c_int, byte: u64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid
    // value of it (and `l_pid` must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(fd: BorrowedFd<'_>, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: `fd` is an open descriptor borrowed for the call; `fl` is a
        // valid, exclusively borrowed `flock` that the kernel reads and (for
        // GETLK) writes; the OFD commands take exactly that argument.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, fl as *mut libc::flock) };
        if rc != -1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Takes the lock on `byte` without waiting: `Ok(false)` if another open
/// file description holds a conflicting lock.
pub(crate) fn try_lock(fd: BorrowedFd<'_>, byte: u64, exclusive: bool) -> io::Result<bool> {
    let kind = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    match fcntl_lock(fd, libc::F_OFD_SETLK, &mut flock(kind, byte)) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes the lock on `byte`, waiting while another description holds a
/// conflicting one.
pub(crate) fn lock_wait(fd: BorrowedFd<'_>, byte: u64, exclusive: bool) -> io::Result<()> {
    let kind = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    fcntl_lock(fd, libc::F_OFD_SETLKW, &mut flock(kind, byte))
}

/// Releases this description's lock on `byte` (if any).
pub(crate) fn unlock(fd: BorrowedFd<'_>, byte: u64) -> io::Result<()> {
    fcntl_lock(fd, libc::F_OFD_SETLK, &mut flock(libc::F_UNLCK, byte))
}

/// Whether another open file description holds any lock on `byte`.
pub(crate) fn held_by_other(fd: BorrowedFd<'_>, byte: u64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn reopen(f: &std::fs::File) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .unwrap()
    }

    #[test]
    fn descriptions_conflict_and_closing_releases() {
        let dir = std::env::temp_dir().join(format!("shmdict-ofd-{}", std::process::id()));
        let a = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        let _ = std::fs::remove_file(&dir);
        let b = reopen(&a);
        assert!(try_lock(a.as_fd(), 5, true).unwrap());
        assert!(
            !try_lock(b.as_fd(), 5, true).unwrap(),
            "another description"
        );
        assert!(!try_lock(b.as_fd(), 5, false).unwrap());
        assert!(held_by_other(b.as_fd(), 5).unwrap());
        assert!(
            !held_by_other(a.as_fd(), 5).unwrap(),
            "our own lock is not reported"
        );
        assert!(!held_by_other(b.as_fd(), 6).unwrap(), "one byte only");
        // Shared locks share.
        assert!(try_lock(a.as_fd(), 0, false).unwrap());
        assert!(try_lock(b.as_fd(), 0, false).unwrap());
        assert!(!try_lock(b.as_fd(), 0, true).unwrap());
        // A duplicated descriptor is the same description: closing one copy
        // keeps the lock; closing the last releases it.
        let a2 = a.try_clone().unwrap();
        drop(a);
        assert!(held_by_other(b.as_fd(), 5).unwrap());
        drop(a2);
        assert!(!held_by_other(b.as_fd(), 5).unwrap());
        assert!(try_lock(b.as_fd(), 0, true).unwrap());
        unlock(b.as_fd(), 0).unwrap();
    }
}
