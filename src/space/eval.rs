//! `eval`: worker processes that run a function with the space (Linda's
//! `eval`, lindypy's `ts.eval(worker)`).
//!
//! A worker is a `fork` of the caller. The child opens the space again by
//! name (a handle inherited through `fork` names the parent's attach entry,
//! so the child must not write through it), runs the function under
//! `catch_unwind`, posts `("error", message)` if it panicked, and ends with
//! `_exit`, so none of the parent's exit-time code (buffered output,
//! destructors of the caller's stack, test harness) runs twice.
//!
//! `fork` copies only the calling thread. If the process had other threads,
//! a lock one of them held (in the allocator, stdio, ...) would stay locked
//! forever in the child, so `eval` refuses to fork a multi-threaded process
//! (`/proc/self/task` has more than one entry): start workers before
//! starting threads, or spawn a fresh executable instead.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitStatus;

use rustix::process::{Pid, Signal, WaitOptions};

use super::Space;
use crate::error::{Error, Result};
use crate::sys;
use crate::sys::child::Attach;

/// The exit code of a worker whose function panicked (Rust's own code for
/// a panicking `main`).
pub const PANIC_EXIT_CODE: i32 = 101;
/// The exit code of a worker that could not open the space.
pub const OPEN_FAILED_EXIT_CODE: i32 = 102;

/// A worker process started by [`Space::eval`].
///
/// Dropping a `Worker` neither kills nor waits for it: the worker runs on,
/// and, until [`join`](Worker::join) or the parent's exit, stays a zombie
/// once it ends. Call [`kill`](Worker::kill) and `join` to stop one.
#[derive(Debug)]
pub struct Worker {
    pid: Pid,
    space: String,
    status: Option<ExitStatus>,
}

impl Worker {
    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get() as u32
    }

    fn wait(&mut self, opts: WaitOptions) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            let waited = loop {
                match rustix::process::waitpid(Some(self.pid), opts) {
                    Err(rustix::io::Errno::INTR) => continue,
                    other => break other,
                }
            };
            match waited.map_err(|e| Error::io(&self.space, "waitpid", e))? {
                Some((_, status)) => {
                    self.status = Some(ExitStatus::from_raw(status.as_raw()));
                }
                None => return Ok(None),
            }
        }
        Ok(self.status)
    }

    /// Waits for the worker to end and returns its exit status: success if
    /// its function returned, code [`PANIC_EXIT_CODE`] if it panicked (after
    /// posting the error tuple), a signal if it was killed.
    pub fn join(&mut self) -> Result<ExitStatus> {
        loop {
            if let Some(s) = self.wait(WaitOptions::empty())? {
                return Ok(s);
            }
        }
    }

    /// The exit status if the worker has ended, without waiting.
    pub fn try_join(&mut self) -> Result<Option<ExitStatus>> {
        self.wait(WaitOptions::NOHANG)
    }

    /// Sends SIGKILL to the worker (if it has not been reaped yet). Call
    /// [`join`](Worker::join) afterwards to reap it.
    pub fn kill(&mut self) -> Result<()> {
        if self.status.is_none() {
            rustix::process::kill_process(self.pid, Signal::KILL)
                .map_err(|e| Error::io(&self.space, "kill", e))?;
        }
        Ok(())
    }
}

/// The number of threads of this process.
fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

impl Space {
    /// Starts a worker process that runs `f` with this space (Linda's
    /// `eval`), and returns at once.
    ///
    /// The worker is a `fork` of this process that opens the space again by
    /// name, so `f` may capture anything (it is never serialized). If `f`
    /// panics, the worker posts `("error", "worker <pid> panicked: <message>")`
    /// and exits with [`PANIC_EXIT_CODE`]: a failing worker never dies
    /// silently. When `f` returns, the worker exits with status 0.
    ///
    /// `InvalidArgument` if this process has more than one thread: `fork`
    /// copies only the calling thread, so locks held by the others would
    /// stay held in the child forever. Start workers before any thread.
    ///
    /// `eval` returns once the worker has attached the space (it opens it
    /// with [`Options::create(false)`](crate::Options::create)): if the
    /// space's name was unlinked, the result is `NotFound` (and the worker
    /// has ended), never a new, empty space of that name.
    ///
    /// A worker dies with this process: it gets SIGKILL when this process
    /// ends (`PR_SET_PDEATHSIG`), so no worker outlives a killed parent
    /// waiting forever in a `take`. A worker may itself be SIGKILLed in the
    /// middle of a `take`; use [`take_into`](Space::take_into) for tuples
    /// that must not be lost.
    pub fn eval<F>(&self, f: F) -> Result<Worker>
    where
        F: FnOnce(&Space),
    {
        let name = self.name().to_owned();
        let threads = thread_count().map_err(|e| Error::io(&name, "reading /proc/self/task", e))?;
        if threads != 1 {
            return Err(Error::InvalidArgument {
                segment: name,
                reason: format!(
                    "eval forks, which is only safe in a single-threaded process; this one has {threads} threads"
                ),
            });
        }
        let (report_r, report_w) =
            sys::child::report_pipe().map_err(|e| Error::io(&name, "pipe", e))?;
        // Buffered output would otherwise be written by both processes.
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // Read before the fork: the child compares it with its `getppid`.
        let parent = rustix::process::getpid();
        // SAFETY: fork has no memory-safety preconditions of its own; what
        // makes the child sound is that this process has a single thread
        // (checked just above, and no thread can be started concurrently:
        // we are that thread), so no lock is held by a thread that the
        // child lacks. The child only runs Rust code and leaves with
        // `_exit` (in `worker_main`), never returning into the caller.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::io(&name, "fork", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            sys::child::die_with_parent(parent);
            worker_main(&name, self.dict.reattach_options(), report_w, f);
        }
        drop(report_w);
        let mut worker = Worker {
            pid: Pid::from_raw(pid).ok_or_else(|| Error::corrupt(&name, "fork returned pid 0"))?,
            space: name,
            status: None,
        };
        let failed = match Attach::receive(report_r) {
            Attach::Attached => return Ok(worker),
            Attach::NotFound => Error::NotFound {
                segment: worker.space.clone(),
            },
            Attach::Failed(m) => Error::io(
                &worker.space,
                "opening the space in an eval worker",
                std::io::Error::other(m),
            ),
            Attach::Died => Error::io(
                &worker.space,
                "starting an eval worker",
                std::io::Error::other("the worker died before it attached the space"),
            ),
        };
        worker.join()?;
        Err(failed)
    }
}

/// The body of a worker process; never returns.
fn worker_main<F: FnOnce(&Space)>(
    name: &str,
    reattach: crate::Options,
    report: std::fs::File,
    f: F,
) -> ! {
    // Attach only: if the name was unlinked, creating a new empty space
    // under it would leak it and serve nobody. The worker accepts the
    // segment's owner and mode as the parent's handle did.
    let opened = reattach.open(name);
    match &opened {
        Ok(_) => Attach::Attached,
        Err(Error::NotFound { .. }) => Attach::NotFound,
        Err(e) => Attach::Failed(e.to_string()),
    }
    .send(report);
    let code = match opened.map(Space::from_dict) {
        Ok(space) => {
            let code = match catch_unwind(AssertUnwindSafe(|| f(&space))) {
                Ok(()) => 0,
                Err(payload) => {
                    let msg = format!(
                        "worker {} panicked: {}",
                        std::process::id(),
                        panic_message(&*payload)
                    );
                    // Never drop the payload: its destructor could panic.
                    std::mem::forget(payload);
                    if let Err(e) = space.out(crate::tuple!("error", msg)) {
                        eprintln!("shmdict eval worker: posting the error tuple failed: {e}");
                    }
                    PANIC_EXIT_CODE
                }
            };
            drop(space);
            code
        }
        Err(e) => {
            eprintln!("shmdict eval worker: cannot open space '{name}': {e}");
            OPEN_FAILED_EXIT_CODE
        }
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process at once; it has no preconditions.
    // It is used instead of `exit` so that the parent's atexit handlers and
    // stdio buffers copied by fork are not run or flushed a second time.
    unsafe { libc::_exit(code) }
}
