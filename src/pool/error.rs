//! [`PoolError`]: what went wrong in a map or a spawned child.

use super::*;

/// What went wrong in a [`Pool::map`] or a [`spawn`]ed child.
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolError {
    /// The calling process has other threads: forking it could deadlock the
    /// children (see the module docs, "Fork caveats").
    MultiThreaded {
        /// Threads running in the calling process.
        threads: usize,
    },
    /// A work function (or `init`, or a spawned closure) panicked.
    Panicked {
        /// The item it was working on (`None`: in `init` or in a spawned child).
        item: Option<usize>,
        /// The panic message and its location.
        message: String,
    },
    /// A worker process or spawned child was killed by a signal.
    Killed {
        /// The item it was running (`None`: between items, or a spawned child).
        item: Option<usize>,
        /// The signal number (e.g. `libc::SIGKILL`).
        signal: i32,
        /// The process id of the dead process.
        pid: u32,
    },
    /// A worker process exited in the middle of an item (for example a work
    /// function called `std::process::exit`), or without reporting.
    Exited {
        /// The item it was running, if known.
        item: Option<usize>,
        /// Its exit code (`None` if unknown: `SIGCHLD` ignored).
        code: Option<i32>,
        /// Its process id.
        pid: u32,
    },
    /// A worker failed in the pool's machinery (for example its coordination
    /// segment refused a write, or a result could not be encoded).
    Worker {
        /// The item concerned, if any.
        item: Option<usize>,
        /// What happened.
        reason: String,
    },
    /// A shared-memory operation of the pool failed in the calling process.
    Shm(Error),
    /// `fork` or `waitpid` failed.
    Io {
        /// The failed call.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::MultiThreaded { threads } => write!(
                f,
                "the pool must be used from a single-threaded process: {threads} threads are \
                 running (fork copies only the calling thread; locks held by the others would \
                 never be released in the children)"
            ),
            PoolError::Panicked {
                item: Some(i),
                message,
            } => write!(f, "the work function panicked on item {i}: {message}"),
            PoolError::Panicked {
                item: None,
                message,
            } => write!(f, "the child process panicked: {message}"),
            PoolError::Killed { item, signal, pid } => write!(
                f,
                "process {pid} was killed by signal {signal} ({}) while running {}",
                signal_name(*signal),
                item_desc(item, "a spawned closure or between items")
            ),
            PoolError::Exited { item, code, pid } => write!(
                f,
                "process {pid} exited (code {}) without reporting {}",
                code.map_or("unknown".to_owned(), |c| c.to_string()),
                item_or(item, "its result")
            ),
            PoolError::Worker { item, reason } => {
                write!(
                    f,
                    "worker failure on {}: {reason}",
                    item_desc(item, "no item")
                )
            }
            PoolError::Shm(e) => write!(f, "pool coordination: {e}"),
            PoolError::Io { op, source } => write!(f, "{op} failed: {source}"),
        }
    }
}

fn item_desc(i: &Option<usize>, none: &str) -> String {
    i.map_or(none.to_owned(), |i| format!("item {i}"))
}

fn item_or(i: &Option<usize>, none: &str) -> String {
    i.map_or(none.to_owned(), |i| format!("the result of item {i}"))
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Shm(e) => Some(e),
            PoolError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for PoolError {
    fn from(e: Error) -> PoolError {
        PoolError::Shm(e)
    }
}

/// The conventional name of a signal number, for messages.
fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        _ => "signal",
    }
}
