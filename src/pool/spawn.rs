//! [`spawn`]: one child process sharing a dictionary.

use super::*;

/// Starts one child process that opens `dict` again by name and runs
/// `f(&dict)` there (remoteD's `newProc`); returns a handle to
/// [`join`](Child::join) it for `f`'s result.
///
/// Like [`Pool::map`], the child is forked: `f` may capture anything (it
/// gets the child's copy), and the calling process must be single-threaded
/// ([`PoolError::MultiThreaded`] otherwise). The result crosses back
/// encoded with postcard, through a private segment whose name is removed
/// as soon as the child has attached it.
///
/// The child attaches `dict` by name
/// ([`Options::create(false)`](crate::Options::create)) and `spawn` returns
/// once it has: if the name
/// was unlinked, `spawn` returns [`PoolError::Shm`]`(`[`Error::NotFound`]`)`
/// instead of the child creating a new, empty dictionary. The child gets
/// SIGKILL when the calling process dies.
///
/// ```
/// use shmdict::{pool, ShmDict};
///
/// let name = format!("doc-spawn-{}", std::process::id());
/// let dict = ShmDict::open(&name)?;
/// let child = pool::spawn(&dict, |shared| {
///     shared.insert("myresult", "Hello World").expect("insert");
///     std::process::id()
/// })?;
/// let child_pid = child.join()?;
/// assert_ne!(child_pid, std::process::id());
/// assert_eq!(dict.get("myresult")?.as_deref(), Some(&b"Hello World"[..]));
/// ShmDict::unlink(&name)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn spawn<R, F>(dict: &ShmDict, f: F) -> Result<Child<R>, PoolError>
where
    R: Serialize + DeserializeOwned,
    F: FnOnce(&ShmDict) -> R,
{
    check_single_threaded()?;
    let out = Private::create("spawn")?;
    let (dict_name, out_name) = (dict.name(), out.name.as_str());
    // The child accepts the segment's owner and mode as `dict` did.
    let reattach = dict.reattach_options();
    let (report_r, report_w) =
        sys::child::report_pipe().map_err(|source| PoolError::Io { op: "pipe", source })?;
    let pid = fork_child(move || {
        // Attach only: an unlinked name is an error, not a new empty
        // segment created (and leaked) under it.
        let (d, o) = match (
            reattach.open(dict_name),
            ShmDict::options().create(false).open(out_name),
        ) {
            (Ok(d), Ok(o)) => (d, o),
            (Err(e), _) | (_, Err(e)) => {
                match e {
                    Error::NotFound { .. } => Attach::NotFound,
                    e => Attach::Failed(e.to_string()),
                }
                .send(report_w);
                return EXIT_NO_SEGMENT;
            }
        };
        Attach::Attached.send(report_w);
        install_panic_hook();
        let entry: Entry = match panic::catch_unwind(AssertUnwindSafe(|| f(&d))) {
            Ok(r) => match postcard::to_allocvec(&r) {
                Ok(v) => (0, TAG_OK, v),
                Err(e) => (
                    0,
                    TAG_FAILED,
                    format!("cannot encode the result: {e}").into_bytes(),
                ),
            },
            Err(p) => (0, TAG_PANIC, panic_message(&*p).into_bytes()),
        };
        let posted = postcard::to_allocvec(&entry)
            .map_err(|e| e.to_string())
            .and_then(|b| o.insert("result", b).map_err(|e| e.to_string()));
        match posted {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("shmdict spawn: cannot post the result: {e}");
                EXIT_POST_FAILED
            }
        }
    })?;
    // The closure (and our copy of the write end) is gone: the read below
    // ends when the child reports or dies.
    let report = Attach::receive(report_r);
    let mut child = Child {
        pid,
        out,
        ended: None,
        _r: PhantomData,
    };
    let failed = match report {
        Attach::Attached => {
            // The child has attached both segments: nobody opens the result
            // segment by name again.
            child.out.drop_name();
            return Ok(child);
        }
        Attach::NotFound => PoolError::Shm(Error::NotFound {
            segment: dict_name.to_owned(),
        }),
        Attach::Failed(reason) => PoolError::Worker { item: None, reason },
        // It died before reporting: `join` says how.
        Attach::Died => return Ok(child),
    };
    child.ended = reap(child.pid, true)?;
    Err(failed)
}

/// A child process started by [`spawn`]. Dropping it without
/// [`join`](Child::join) still waits for the process to end (it is always
/// reaped) and discards its result.
pub struct Child<R> {
    pub(super) pid: Pid,
    pub(super) out: Private,
    pub(super) ended: Option<Ended>,
    pub(super) _r: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for Child<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Child")
            .field("pid", &self.pid())
            .field("ended", &self.ended)
            .finish()
    }
}

impl<R> Child<R> {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get() as u32
    }
}

impl<R: DeserializeOwned> Child<R> {
    /// Waits for the child to end and returns its closure's result, or why
    /// there is none: [`PoolError::Panicked`] with the panic message,
    /// [`PoolError::Killed`] with the signal, [`PoolError::Exited`] if it
    /// ended without posting a result.
    pub fn join(mut self) -> Result<R, PoolError> {
        let ended = reap(self.pid, true)?.unwrap_or(Ended::Unknown);
        self.ended = Some(ended);
        let pid = self.pid();
        if let Ended::Signal(signal) = ended {
            return Err(PoolError::Killed {
                item: None,
                signal,
                pid,
            });
        }
        let d = self.out.dict();
        let Some(bytes) = d.get("result")? else {
            return Err(PoolError::Exited {
                item: None,
                code: match ended {
                    Ended::Code(c) => Some(c),
                    _ => None,
                },
                pid,
            });
        };
        let (_, tag, payload): Entry = decode(d, &bytes)?;
        match tag {
            TAG_OK => decode(d, &payload),
            TAG_PANIC => Err(PoolError::Panicked {
                item: None,
                message: String::from_utf8_lossy(&payload).into_owned(),
            }),
            _ => Err(PoolError::Worker {
                item: None,
                reason: String::from_utf8_lossy(&payload).into_owned(),
            }),
        }
    }
}

impl<R> Drop for Child<R> {
    fn drop(&mut self) {
        if self.ended.is_none() {
            let _ = reap(self.pid, true);
        }
        // `out` unlinks its segment.
    }
}
