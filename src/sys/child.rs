//! Helpers for forked children (pool workers, spawned children, space
//! `eval` workers): dying with the parent, and reporting to the parent
//! whether the child managed to attach its segments.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use rustix::process::{Pid, Signal};

/// Exit code of a forked child whose parent was already gone when it
/// started (nobody waits for it; the code only shows up in traces).
pub(crate) const PARENT_GONE_EXIT_CODE: i32 = 92;

/// Call first thing in a forked child, with the parent's pid read *before*
/// the fork: makes the kernel SIGKILL this process when the parent dies,
/// and exits at once if the parent has died already (between the fork and
/// the `prctl`, where the death signal would not have been sent).
///
/// The death signal is tied to the thread that forked; the pool and `eval`
/// fork only from single-threaded processes, whose only thread is the
/// process, so "that thread ends" means "the parent process ends" except
/// when its main thread calls `pthread_exit` while other threads go on.
pub(crate) fn die_with_parent(parent: Pid) {
    let set = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    // `getppid` after the prctl: if the parent died before it, we were
    // reparented (to init or a subreaper) and no signal is coming.
    if set.is_err() || rustix::process::getppid() != Some(parent) {
        let _ = io::stderr().flush();
        // SAFETY: `_exit` only ends the process; a forked child must not run
        // the parent's `atexit` handlers or destructors, which it would with
        // `exit`.
        unsafe { libc::_exit(PARENT_GONE_EXIT_CODE) }
    }
}

/// A close-on-exec pipe: (read end, write end). The child reports on the
/// write end; the parent reads until end of file, which also comes when the
/// child dies without reporting.
pub(crate) fn report_pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill; on
    // success both are new descriptors owned by nobody else, which the
    // `OwnedFd`s below take over (each exactly once).
    let (r, w) = unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    Ok((File::from(r), File::from(w)))
}

/// What a child reports through [`report_pipe`] once it has attached.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Attach {
    /// The child attached its segments and runs.
    Attached,
    /// The segment's name does not exist (any more).
    NotFound,
    /// Another failure, with its message.
    Failed(String),
    /// The child ended without reporting.
    Died,
}

impl Attach {
    /// Writes this report (in the child) and closes the pipe.
    pub(crate) fn send(&self, mut w: File) {
        let bytes: Vec<u8> = match self {
            Attach::Attached => vec![0],
            Attach::NotFound => vec![1],
            Attach::Failed(m) => [&[2u8][..], m.as_bytes()].concat(),
            Attach::Died => vec![3],
        };
        // A parent that is gone does not read: nothing to do about it.
        let _ = w.write_all(&bytes);
    }

    /// Reads the child's report (in the parent, after closing its own copy
    /// of the write end).
    pub(crate) fn receive(mut r: File) -> Attach {
        let mut buf = Vec::new();
        loop {
            match r.read_to_end(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        match buf.split_first() {
            Some((0, _)) => Attach::Attached,
            Some((1, _)) => Attach::NotFound,
            Some((2, m)) => Attach::Failed(String::from_utf8_lossy(m).into_owned()),
            _ => Attach::Died,
        }
    }
}
