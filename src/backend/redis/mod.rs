//! [`RedisDict`]: the [`Dict`] operations on a Redis server or cluster.
//!
//! A dictionary NAME is the hash `shmdict:{NAME}:h` (field = key, value =
//! value) plus a few keys for waiting and leases, all with the hash tag
//! `{NAME}`, so that in a cluster they live on one slot. `insert` and
//! `remove` are one `HSET`/`HDEL` (pipelined with a check for waiters, who
//! are then woken through a stream); `update` and the leases are Lua
//! scripts (`scripts.rs`), each one atomic step. Connections, timeouts and the cluster are in
//! `conn.rs`, the lock and the per-key leases in `lease.rs`. The key layout,
//! the scripts and why each guarantee holds: `docs/design.md`, "The Redis
//! backend".

mod conn;
mod lease;
mod scripts;

use crate::sync::local::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Value;

use self::conn::{block_on_stream, millis, parse_server, split_target, Inner, Keys, NodeState};
pub use self::lease::RedisLock;
use self::lease::{Held, KeyLease, KeyLeaseGuard, Renewer};
use self::scripts::{
    as_array, as_bytes, as_int, as_string, eval, stream_entries_name, CAS, KEY_LEASE, WAIT_CHECK,
    WATCH_CHECK,
};
use super::{Dict, DictLock};
use crate::error::Result;

/// Default lease of `lock()` and of `get_or_insert_with`'s key lease.
const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// Default socket timeout of every call.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest single blocking read (`XREAD BLOCK`); longer waits re-check
/// and block again, so a waiter sends a few commands a minute at most.
const MAX_BLOCK: Duration = Duration::from_secs(30);

/// A dictionary stored in Redis, with the [`Dict`] operations (cargo
/// feature `redis`).
///
/// Opened by a server URL and a dictionary name, or through
/// [`connect`](crate::connect) with `redis://HOST:PORT/NAME` (one server) or
/// `redis+cluster://HOST:PORT,HOST:PORT/NAME` (a Redis Cluster, any of whose
/// nodes are listed). All keys of a dictionary carry the hash tag `{NAME}`,
/// so in a cluster a dictionary lives on one slot, and the handle talks to
/// the primary that owns it (following `MOVED` redirections and finding
/// the new primary after a failover).
///
/// Every call has a socket timeout (default 5 s, [`RedisOptions::timeout`]):
/// an unreachable, closed or frozen server gives [`Error::Io`](crate::Error::Io) whose message
/// names `host:port` and the dictionary. A failed call leaves unknown
/// whether a write it sent took effect (as with any network store).
///
/// A handle may be shared by threads; each call borrows a connection from
/// the handle's pool (blocking calls get their own, with a read timeout
/// above the block time, as redis-rs advises).
///
/// ```no_run
/// use shmdict::{Dict, RedisDict};
/// let d = RedisDict::open("redis://127.0.0.1:6379", "jobs")?;
/// d.insert(b"job/7", b"queued")?;
/// assert_eq!(d.get(b"job/7")?.as_deref(), Some(&b"queued"[..]));
/// # Ok::<(), shmdict::Error>(())
/// ```
pub struct RedisDict {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDict")
            .field("target", &self.inner.target())
            .field("timeout", &self.inner.timeout)
            .field("lease", &self.inner.lease)
            .finish()
    }
}

/// Options of a [`RedisDict`]: `RedisDict::options().lease(..).open(url, name)`.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    timeout: Duration,
    lease: Duration,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions {
            timeout: DEFAULT_TIMEOUT,
            lease: DEFAULT_LEASE,
        }
    }
}

impl RedisOptions {
    /// The socket timeout of every call (connecting, sending, reading a
    /// reply); default 5 s. Blocking calls (`wait_for`, waiting for a lock)
    /// wait this much longer than their own block time.
    pub fn timeout(mut self, t: Duration) -> RedisOptions {
        self.timeout = t.max(Duration::from_millis(1));
        self
    }

    /// The lease of `lock()` and of `get_or_insert_with`'s per-key lease;
    /// default 10 s. It is renewed every third of it while held.
    pub fn lease(mut self, t: Duration) -> RedisOptions {
        self.lease = t.max(Duration::from_millis(30));
        self
    }

    /// Opens dictionary `name` on the server (or cluster) at `url`:
    /// `redis://[USER:PASSWORD@]HOST[:PORT][/]` or
    /// `redis+cluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT[/]`. Checks that
    /// the server answers (`PING`); `Io` naming it if not.
    pub fn open(self, url: &str, name: &str) -> Result<RedisDict> {
        crate::name::validate(name)?;
        let (endpoint, userinfo) = parse_server(url)?;
        let inner = Inner {
            name: name.to_owned(),
            endpoint,
            userinfo,
            timeout: self.timeout,
            lease: self.lease,
            keys: Keys::new(name),
            state: Mutex::new(NodeState::default()),
        };
        let d = RedisDict {
            inner: Arc::new(inner),
        };
        d.inner.call("open (PING)", true, |c| {
            redis::cmd("PING").query::<String>(c).map(|_| ())
        })?;
        Ok(d)
    }
}

impl RedisDict {
    /// Opens dictionary `name` on the Redis server at `url`
    /// (`redis://HOST:PORT`, or `redis+cluster://HOST:PORT,HOST:PORT` for a
    /// cluster) with the default options. Nothing is created until the
    /// first write. `Io` naming the server if it does not answer.
    pub fn open(url: &str, name: &str) -> Result<RedisDict> {
        RedisOptions::default().open(url, name)
    }

    /// Options: socket timeout, lease length.
    pub fn options() -> RedisOptions {
        RedisOptions::default()
    }

    /// Opens `redis://HOST:PORT/NAME` (what [`connect`](crate::connect)
    /// passes on).
    pub(crate) fn connect_target(target: &str) -> Result<RedisDict> {
        let (server, name) = split_target(target)?;
        RedisDict::open(server, name)
    }

    /// Removes every key of dictionary `name` (its entries, lock, streams).
    /// `Ok` if it had none. Handles still open keep working on an empty
    /// dictionary. Leases of `get_or_insert_with` in progress expire on
    /// their own.
    pub fn unlink(url: &str, name: &str) -> Result<()> {
        let d = RedisDict::open(url, name)?;
        let k = &d.inner.keys;
        d.inner.call("unlink (UNLINK)", true, |c| {
            redis::cmd("UNLINK")
                .arg(&k.hash)
                .arg(&k.writes)
                .arg(&k.flag)
                .arg(&k.releases)
                .arg(&k.lock)
                .arg(&k.held)
                .arg(&k.fence)
                .query::<i64>(c)
                .map(|_| ())
        })
    }

    /// Opens `redis://HOST:PORT/NAME` or
    /// `redis+cluster://HOST:PORT,HOST:PORT/NAME` with the default options.
    pub fn open_target(target: &str) -> Result<RedisDict> {
        RedisDict::connect_target(target)
    }

    /// Calls `each` with the value of `key` now (`None` if absent), then
    /// after every write or removal of it, until `each` returns `Ok(true)`
    /// (or an error). Blocks in Redis between writes (`XREAD BLOCK` on the
    /// dictionary's writes stream); writes in quick succession may be seen
    /// as one, and the latest value is always passed.
    pub fn watch(
        &self,
        key: &[u8],
        mut each: impl FnMut(Option<Vec<u8>>) -> Result<bool>,
    ) -> Result<()> {
        let inner = &self.inner;
        let keys = self.write_keys();
        let flag_ms = millis(MAX_BLOCK + inner.timeout + Duration::from_secs(1)).to_string();
        let check = || {
            inner.call("watch (check)", true, |c| {
                let v = eval(c, &WATCH_CHECK, &keys, &[key, flag_ms.as_bytes()])?;
                let mut a = as_array(v, "watch")?.into_iter();
                let id = as_string(a.next(), "watch")?;
                let value = match a.next() {
                    None | Some(Value::Nil) => None,
                    v => Some(as_bytes(v, "watch")?),
                };
                Ok((id, value))
            })
        };
        let (mut id, value) = check()?;
        let mut raised = Instant::now();
        let mut last_value = value.clone();
        if each(value)? {
            return Ok(());
        }
        loop {
            // Entries after `id`: (last id seen, whether one names `key`).
            let (last, hit) = inner.call("watch (XREAD BLOCK)", true, |c| {
                c.set_read_timeout(Some(MAX_BLOCK + inner.timeout))?;
                let r = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(millis(MAX_BLOCK))
                    .arg("STREAMS")
                    .arg(&inner.keys.writes)
                    .arg(&id)
                    .query::<Value>(c);
                c.set_read_timeout(Some(inner.timeout))?;
                stream_entries_name(r?, key)
            })?;
            if let (Some(last), false) = (&last, hit) {
                id = last.clone();
                if raised.elapsed() < MAX_BLOCK {
                    continue;
                }
            }
            // The key was written, or the flag needs raising again (before
            // it expires; if it did expire, a write may have gone
            // unannounced, so a changed value is passed on too).
            let (now, value) = check()?;
            raised = Instant::now();
            id = now;
            if hit || value != last_value {
                last_value = value.clone();
                if each(value)? {
                    return Ok(());
                }
            }
        }
    }

    /// The dictionary's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Where the dictionary lives: `redis://HOST:PORT/NAME` (for a cluster,
    /// the primary currently holding its slot, if known).
    pub fn target(&self) -> String {
        self.inner.target()
    }

    /// The fencing token the next `lock()` will get is greater than every
    /// token handed out so far; this is the last one handed out (0 if none).
    pub fn last_fencing_token(&self) -> Result<u64> {
        let k = &self.inner.keys;
        self.inner.call("last_fencing_token (GET)", true, |c| {
            redis::cmd("GET")
                .arg(&k.fence)
                .query::<Option<u64>>(c)
                .map(|t| t.unwrap_or(0))
        })
    }
}

impl RedisDict {
    /// Tells waiters that `key` was written: appends it to the writes
    /// stream. Called after a plain `HSET`/`HDEL` whose pipelined `EXISTS`
    /// found the waiters' flag up. No waiter is missed although the write
    /// and this are separate steps: the server runs the write, then the
    /// `EXISTS`, in order, and a waiter's check script (which reads the key,
    /// raises the flag and reads the stream's last id, atomically) runs
    /// either before the write (so the `EXISTS` sees its flag, and this
    /// entry comes after the id it read) or after it (so it sees the value).
    fn announce(&self, key: &[u8]) -> Result<()> {
        let w = &self.inner.keys.writes;
        self.inner.call("notifying waiters (XADD)", false, |c| {
            redis::cmd("XADD")
                .arg(w)
                .arg("MAXLEN")
                .arg("~")
                .arg(100)
                .arg("*")
                .arg("k")
                .arg(key)
                .query::<Value>(c)
                .map(|_| ())
        })
    }

    fn write_keys(&self) -> [&[u8]; 3] {
        let k = &self.inner.keys;
        [k.hash.as_bytes(), k.flag.as_bytes(), k.writes.as_bytes()]
    }
}

/// Counts `update`'s conflicts (for tests and tuning).
static UPDATE_RETRIES: AtomicU64 = AtomicU64::new(0);

impl RedisDict {
    /// How many times, in this process, an `update` found its key changed
    /// between its read and its compare-and-set and ran its closure again.
    pub fn update_retries() -> u64 {
        // Relaxed: a statistic.
        UPDATE_RETRIES.load(Ordering::Relaxed)
    }
}

impl Dict for RedisDict {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let h = &self.inner.keys.hash;
        self.inner.call("get (HGET)", true, |c| {
            redis::cmd("HGET").arg(h).arg(key).query(c)
        })
    }

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let k = &self.inner.keys;
        // HSET, then (same round trip, executed after it) is a waiter's
        // flag up? See `announce`.
        let waiting = self.inner.call("insert (HSET)", false, |c| {
            let (_, flag): (i64, i64) = redis::pipe()
                .cmd("HSET")
                .arg(&k.hash)
                .arg(key)
                .arg(value)
                .cmd("EXISTS")
                .arg(&k.flag)
                .query(c)?;
            Ok(flag == 1)
        })?;
        if waiting {
            self.announce(key)?;
        }
        Ok(())
    }

    fn remove(&self, key: &[u8]) -> Result<bool> {
        let k = &self.inner.keys;
        let (removed, waiting) = self.inner.call("remove (HDEL)", false, |c| {
            let (n, flag): (i64, i64) = redis::pipe()
                .cmd("HDEL")
                .arg(&k.hash)
                .arg(key)
                .cmd("EXISTS")
                .arg(&k.flag)
                .query(c)?;
            Ok((n == 1, flag == 1))
        })?;
        if removed && waiting {
            self.announce(key)?;
        }
        Ok(removed)
    }

    fn contains_key(&self, key: &[u8]) -> Result<bool> {
        let h = &self.inner.keys.hash;
        self.inner.call("contains_key (HEXISTS)", true, |c| {
            redis::cmd("HEXISTS").arg(h).arg(key).query(c)
        })
    }

    #[allow(clippy::type_complexity)] // The contract spells the closure type out.
    fn update(
        &self,
        key: &[u8],
        f: &mut dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        let keys = self.write_keys();
        let mut cur = self.get(key)?;
        loop {
            let new = f(cur.as_deref());
            let (exp_p, exp) = match &cur {
                Some(v) => (&b"1"[..], &v[..]),
                None => (&b"0"[..], &b""[..]),
            };
            let (new_p, newv) = match &new {
                Some(v) => (&b"1"[..], &v[..]),
                None => (&b"0"[..], &b""[..]),
            };
            let r = self.inner.call("update (compare-and-set)", false, |c| {
                let v = eval(c, &CAS, &keys, &[key, exp_p, exp, new_p, newv])?;
                let mut a = as_array(v, "update")?.into_iter();
                let first = a.next();
                if as_int(first.as_ref(), "update")? == 1 {
                    return Ok(None);
                }
                Ok(Some(match a.next() {
                    None | Some(Value::Nil) => None,
                    v => Some(as_bytes(v, "update")?),
                }))
            })?;
            match r {
                None => return Ok(new),
                Some(now) => {
                    // Relaxed: a statistic.
                    UPDATE_RETRIES.fetch_add(1, Ordering::Relaxed);
                    cur = now;
                }
            }
        }
    }

    fn len(&self) -> Result<usize> {
        let h = &self.inner.keys.hash;
        self.inner
            .call("len (HLEN)", true, |c| redis::cmd("HLEN").arg(h).query(c))
    }

    fn keys(&self) -> Result<Vec<Vec<u8>>> {
        let h = &self.inner.keys.hash;
        let mut seen = std::collections::HashSet::new();
        let mut cursor = String::from("0");
        loop {
            let (next, batch) = self.inner.call("keys (HSCAN)", true, |c| {
                let v = redis::cmd("HSCAN")
                    .arg(h)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query::<Value>(c)?;
                let mut a = as_array(v, "HSCAN")?.into_iter();
                let next = as_string(a.next(), "HSCAN cursor")?;
                let items = as_array(a.next().unwrap_or(Value::Nil), "HSCAN items")?;
                let mut keys = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let Some(k) = it.next() {
                    keys.push(as_bytes(Some(k), "HSCAN key")?);
                    it.next();
                }
                Ok((next, keys))
            })?;
            seen.extend(batch);
            if next == "0" {
                return Ok(seen.into_iter().collect());
            }
            cursor = next;
        }
    }

    fn wait_for(&self, key: &[u8], timeout: Duration) -> Result<Option<Vec<u8>>> {
        let inner = &self.inner;
        let keys = self.write_keys();
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let remaining =
                deadline.map_or(MAX_BLOCK, |d| d.saturating_duration_since(Instant::now()));
            let block = remaining.min(MAX_BLOCK);
            if block.is_zero() {
                // No time left: a plain read (raising no flag).
                return self.get(key);
            }
            // The flag outlives this wait's block and the socket timeout.
            let flag_ms = millis(block + inner.timeout + Duration::from_secs(1)).to_string();
            let r = inner.call("wait_for (check)", true, |c| {
                let v = eval(c, &WAIT_CHECK, &keys, &[key, flag_ms.as_bytes()])?;
                let mut a = as_array(v, "wait_for")?.into_iter();
                let first = a.next();
                let found = as_int(first.as_ref(), "wait_for")? == 1;
                let rest = as_bytes(a.next(), "wait_for")?;
                Ok((found, rest))
            })?;
            match r {
                (true, value) => return Ok(Some(value)),
                (false, id) => {
                    let id = String::from_utf8_lossy(&id).into_owned();
                    block_on_stream(
                        inner,
                        "wait_for (XREAD BLOCK)",
                        &inner.keys.writes,
                        &id,
                        block,
                    )?;
                }
            }
        }
    }

    fn get_or_insert_with(&self, key: &[u8], f: &mut dyn FnMut() -> Vec<u8>) -> Result<Vec<u8>> {
        if let Some(v) = self.get(key)? {
            return Ok(v);
        }
        let inner = &self.inner;
        let k = &inner.keys;
        let lease_key = k.key_lease(key);
        let _held = Held::enter(inner, &lease_key, "get_or_insert_with of the same key")?;
        let lease = millis(inner.lease).to_string();
        loop {
            let r = inner.call("get_or_insert_with (lease)", false, |c| {
                let v = eval(
                    c,
                    &KEY_LEASE,
                    &[
                        k.hash.as_bytes(),
                        &lease_key,
                        k.fence.as_bytes(),
                        k.releases.as_bytes(),
                    ],
                    &[key, lease.as_bytes()],
                )?;
                let mut a = as_array(v, "get_or_insert_with")?.into_iter();
                let first = a.next();
                match as_int(first.as_ref(), "get_or_insert_with")? {
                    2 => Ok(KeyLease::Present(as_bytes(a.next(), "get_or_insert_with")?)),
                    1 => {
                        let t = a.next();
                        Ok(KeyLease::Taken(
                            as_int(t.as_ref(), "get_or_insert_with")? as u64
                        ))
                    }
                    _ => {
                        let t = a.next();
                        let pttl = as_int(t.as_ref(), "get_or_insert_with")?;
                        Ok(KeyLease::Busy(
                            pttl,
                            as_string(a.next(), "get_or_insert_with")?,
                        ))
                    }
                }
            })?;
            match r {
                KeyLease::Present(v) => return Ok(v),
                KeyLease::Busy(pttl, id) => {
                    let pttl = if pttl > 0 { pttl as u64 } else { 1 };
                    block_on_stream(
                        inner,
                        "get_or_insert_with (waiting for the computing client)",
                        &k.releases,
                        &id,
                        Duration::from_millis(pttl + 1),
                    )?;
                }
                KeyLease::Taken(token) => {
                    // Released on every path out, a panic in `f` included.
                    let _lease = KeyLeaseGuard {
                        inner,
                        key: lease_key.clone(),
                        token,
                        renewer: Renewer::start(inner.clone(), lease_key.clone(), token),
                    };
                    let value = f();
                    self.insert(key, &value)?;
                    return Ok(value);
                }
            }
        }
    }

    fn lock(&self) -> Result<Box<dyn DictLock + '_>> {
        Ok(Box::new(self.lock_lease()?))
    }
}
