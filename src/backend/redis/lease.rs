//! Leases: `lock()` (with a fencing token) and `get_or_insert_with`'s
//! per-key lease, each renewed by a background thread while held and
//! released on drop.

use crate::sync::local::{AtomicBool, Ordering};
use std::cell::RefCell;
use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use redis::Value;

use super::conn::{block_on_stream, millis, Inner};
use super::scripts::{as_array, as_int, as_string, eval, LOCK, RELEASE, RENEW};
use super::RedisDict;
use crate::backend::DictLock;
use crate::error::{Error, Result};

thread_local! {
    /// The leases this thread holds or waits for, as (server, lease key):
    /// asking for one of them again would wait for itself.
    static HELD: RefCell<HashSet<(String, Vec<u8>)>> = RefCell::new(HashSet::new());
}

/// This thread's claim on a lease (see [`HELD`]); not `Send`, since it is
/// registered in this thread's set.
#[derive(Debug)]
pub(super) struct Held {
    id: (String, Vec<u8>),
    _not_send: PhantomData<*const ()>,
}

impl Held {
    /// `InvalidArgument` if this thread already holds (or waits for) the
    /// lease `key` of `inner`'s server.
    pub(super) fn enter(inner: &Inner, key: &[u8], what: &str) -> Result<Held> {
        let id = (inner.server_id(), key.to_vec());
        let fresh = HELD.with(|h| h.borrow_mut().insert(id.clone()));
        if !fresh {
            return Err(Error::InvalidArgument {
                segment: inner.target(),
                reason: format!("{what} again while this thread holds it would wait for itself"),
            });
        }
        Ok(Held {
            id,
            _not_send: PhantomData,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = HELD.try_with(|h| h.borrow_mut().remove(&self.id));
    }
}

/// A lease renewed by a background thread every third of its length until
/// dropped.
pub(super) struct Renewer {
    pub(super) stop: Option<mpsc::Sender<()>>,
    pub(super) thread: Option<thread::JoinHandle<()>>,
    pub(super) lost: Arc<AtomicBool>,
}

impl Renewer {
    pub(super) fn start(inner: Arc<Inner>, key: Vec<u8>, token: u64) -> Renewer {
        let (tx, rx) = mpsc::channel::<()>();
        let lost = Arc::new(AtomicBool::new(false));
        let lost2 = lost.clone();
        let thread = thread::Builder::new()
            .name("shmdict-lease".into())
            .spawn(move || {
                let period = inner.lease / 3;
                let lease = millis(inner.lease).to_string();
                let token = token.to_string();
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(period) {
                    let r = inner.call("renewing a lease", true, |c| {
                        eval(c, &RENEW, &[&key], &[token.as_bytes(), lease.as_bytes()])
                    });
                    if let Ok(Value::Int(0)) = r {
                        // Expired and perhaps taken by another holder.
                        lost2.store(true, Ordering::Relaxed);
                        return;
                    }
                    // A failed renewal (server unreachable) is retried at
                    // the next period; the lease runs out if it stays so.
                }
            })
            .ok();
        Renewer {
            stop: Some(tx),
            thread,
            lost,
        }
    }

    pub(super) fn stop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The held `lock()` of a [`RedisDict`]: a lease with a fencing token,
/// renewed in the background while the guard lives, released on drop.
#[derive(Debug)]
pub struct RedisLock<'a> {
    pub(super) dict: &'a RedisDict,
    pub(super) token: u64,
    pub(super) recovered: bool,
    pub(super) renewer: Option<RenewerHandle>,
    /// Refuses a second `lock()` by this thread; makes the guard `!Send`.
    pub(super) _held: Held,
}

/// Opaque renewal state (for `Debug`).
pub(super) struct RenewerHandle(Renewer);

impl std::fmt::Debug for RenewerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Renewer")
    }
}

impl RedisLock<'_> {
    /// Whether the previous holder's lease expired without a release (it
    /// died, lost its connection, or was paused past its lease).
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// The fencing token of this acquisition: greater than every earlier
    /// holder's.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// False once a renewal found the lease expired (this process was
    /// paused or cut off longer than the lease): another holder may have
    /// the lock now.
    pub fn still_held(&self) -> bool {
        !self
            .renewer
            .as_ref()
            .is_some_and(|r| r.0.lost.load(Ordering::Relaxed))
    }
}

impl DictLock for RedisLock<'_> {
    fn recovered(&self) -> bool {
        self.recovered
    }
    fn fencing_token(&self) -> Option<u64> {
        Some(self.token)
    }
}

impl Drop for RedisLock<'_> {
    fn drop(&mut self) {
        if let Some(mut r) = self.renewer.take() {
            r.0.stop();
        }
        let k = &self.dict.inner.keys;
        let token = self.token.to_string();
        // Errors cannot be reported from drop; an unreleased lease expires.
        let _ = self.dict.inner.call("releasing the lock", false, |c| {
            eval(
                c,
                &RELEASE,
                &[k.lock.as_bytes(), k.held.as_bytes(), k.releases.as_bytes()],
                &[token.as_bytes()],
            )
        });
    }
}

impl RedisDict {
    /// [`Dict::lock`](crate::Dict::lock) with the concrete guard type (fencing token,
    /// [`still_held`](RedisLock::still_held)).
    pub fn lock_lease(&self) -> Result<RedisLock<'_>> {
        let inner = &self.inner;
        let k = &inner.keys;
        let lease = millis(inner.lease).to_string();
        let held = Held::enter(inner, k.lock.as_bytes(), "lock()")?;
        loop {
            let r = inner.call("lock", false, |c| {
                let v = eval(
                    c,
                    &LOCK,
                    &[
                        k.lock.as_bytes(),
                        k.held.as_bytes(),
                        k.fence.as_bytes(),
                        k.releases.as_bytes(),
                    ],
                    &[lease.as_bytes()],
                )?;
                let mut a = as_array(v, "lock")?.into_iter();
                let first = a.next();
                let got = as_int(first.as_ref(), "lock")?;
                let second = a.next();
                let n = as_int(second.as_ref(), "lock")?;
                if got == 1 {
                    let third = a.next();
                    let recovered = as_int(third.as_ref(), "lock")? == 1;
                    Ok(Ok((n as u64, recovered)))
                } else {
                    Ok(Err((n, as_string(a.next(), "lock")?)))
                }
            })?;
            match r {
                Ok((token, recovered)) => {
                    let renewer = Renewer::start(inner.clone(), k.lock.as_bytes().to_vec(), token);
                    return Ok(RedisLock {
                        dict: self,
                        token,
                        recovered,
                        renewer: Some(RenewerHandle(renewer)),
                        _held: held,
                    });
                }
                Err((pttl, id)) => {
                    let pttl = if pttl > 0 { pttl as u64 } else { 1 };
                    block_on_stream(
                        inner,
                        "lock (waiting for the holder)",
                        &k.releases,
                        &id,
                        Duration::from_millis(pttl + 1),
                    )?;
                }
            }
        }
    }
}

pub(super) enum KeyLease {
    Present(Vec<u8>),
    Taken(u64),
    Busy(i64, String),
}

/// A held `get_or_insert_with` lease: renewed while `f` runs, released on
/// drop (a failed release only leaves the lease to expire).
pub(super) struct KeyLeaseGuard<'a> {
    pub(super) inner: &'a Arc<Inner>,
    pub(super) key: Vec<u8>,
    pub(super) token: u64,
    pub(super) renewer: Renewer,
}

impl Drop for KeyLeaseGuard<'_> {
    fn drop(&mut self) {
        self.renewer.stop();
        let t = self.token.to_string();
        let releases = self.inner.keys.releases.as_bytes();
        let _ = self.inner.call("get_or_insert_with (release)", false, |c| {
            eval(
                c,
                &RELEASE,
                &[&self.key, &self.key, releases],
                &[t.as_bytes()],
            )
        });
    }
}
