//! The raw process layer: fork, exit, reaping; the only `unsafe` of the pool.

use super::*;

// ---------------------------------------------------------------------------
// The raw process layer: the only `unsafe` of the pool.
// ---------------------------------------------------------------------------

/// Refuses unless the calling process runs exactly one thread.
pub(super) fn check_single_threaded() -> Result<(), PoolError> {
    let count = || -> Result<usize, PoolError> {
        Ok(std::fs::read_dir("/proc/self/task")
            .map_err(|source| PoolError::Io {
                op: "reading /proc/self/task",
                source,
            })?
            .count())
    };
    // A thread that was just joined can stay listed for a moment after
    // `join` returns (it is past all user code by then): look again briefly
    // before refusing.
    for _ in 0..20 {
        if count()? == 1 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    match count()? {
        1 => Ok(()),
        threads => Err(PoolError::MultiThreaded { threads }),
    }
}

/// Forks. In the child, runs `child` and ends the process with its exit
/// code: the child never returns into the caller's code. In the parent,
/// returns the child's pid. Check `check_single_threaded` first.
///
/// The child dies with the calling process: it gets SIGKILL when the parent
/// dies (`PR_SET_PDEATHSIG`), and exits at once if the parent died before
/// that was set up (see [`sys::child::die_with_parent`]).
pub(super) fn fork_child(child: impl FnOnce() -> i32) -> Result<Pid, PoolError> {
    // Nothing buffered by the parent may be printed again by the child.
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // Read before the fork: the child compares it with its `getppid`.
    let parent = rustix::process::getpid();
    // SAFETY: fork has no memory-safety preconditions of its own; what makes
    // running Rust code in the child sound is that the process is
    // single-threaded (checked by every caller just before, and nothing
    // between that check and this call starts a thread), so no lock in the
    // child's copy of memory is held by a thread that does not exist there.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(PoolError::Io {
            op: "fork",
            source: io::Error::last_os_error(),
        }),
        0 => {
            sys::child::die_with_parent(parent);
            let code = panic::catch_unwind(AssertUnwindSafe(child)).unwrap_or(EXIT_POST_FAILED);
            exit_now(code)
        }
        pid => Pid::from_raw(pid).ok_or_else(|| PoolError::Io {
            op: "fork",
            source: io::Error::other("fork returned a negative pid"),
        }),
    }
}

/// Ends this (child) process at once with `code`.
pub(super) fn exit_now(code: i32) -> ! {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: `_exit` only ends the process. Unlike `exit` it runs no
    // `atexit` handlers and no destructors, which belong to the parent's
    // copy of the program state: the forked child must not run them.
    unsafe { libc::_exit(code) }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    Code(i32),
    Signal(i32),
    /// Reaped by someone else (`SIGCHLD` ignored).
    Unknown,
}

pub(super) fn ended(st: WaitStatus) -> Option<Ended> {
    if let Some(sig) = st.terminating_signal() {
        Some(Ended::Signal(sig))
    } else {
        st.exit_status().map(Ended::Code)
    }
}

/// Reaps `pid` if it has ended (`block`: waits until it does).
pub(super) fn reap(pid: Pid, block: bool) -> Result<Option<Ended>, PoolError> {
    let opts = if block {
        WaitOptions::empty()
    } else {
        WaitOptions::NOHANG
    };
    loop {
        match rustix::process::waitpid(Some(pid), opts) {
            Ok(Some((_, st))) => match ended(st) {
                Some(e) => return Ok(Some(e)),
                None => continue, // stopped or continued: not an end
            },
            Ok(None) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::CHILD) => return Ok(Some(Ended::Unknown)),
            Err(e) => {
                return Err(PoolError::Io {
                    op: "waitpid",
                    source: e.into(),
                })
            }
        }
    }
}
