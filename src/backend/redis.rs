//! [`RedisDict`]: the [`Dict`] operations on a Redis server or cluster.
//!
//! Key layout (all keys of a dictionary share the hash tag `{NAME}`, so in a
//! cluster they live on one slot, and scripts may touch several of them):
//!
//! | key                        | type   | holds                                              |
//! |----------------------------|--------|----------------------------------------------------|
//! | `shmdict:{NAME}:h`         | hash   | the dictionary: field = key bytes, value = value   |
//! | `shmdict:{NAME}:w`         | stream | one entry per write while someone waits (`wait_for`) |
//! | `shmdict:{NAME}:wf`        | string | "someone waits" flag, expiring with the last waiter |
//! | `shmdict:{NAME}:r`         | stream | one entry per release of the lock or a key lease   |
//! | `shmdict:{NAME}:lock`      | string | fencing token of the `lock()` holder, with the lease as TTL |
//! | `shmdict:{NAME}:held`      | string | the same token, no TTL: deleted only by a release  |
//! | `shmdict:{NAME}:fence`     | string | the fencing counter (INCR)                         |
//! | `shmdict:{NAME}:g:KEY`     | string | lease of `get_or_insert_with` on KEY               |
//!
//! Every write runs as one Lua script (atomic on the server): the hash
//! change and the notification of waiters together. `len` is `HLEN` of the
//! hash, exact by construction. See `docs/design.md` for why each guarantee
//! holds.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use redis::{Connection, RedisError, RedisResult, Value};

use super::{Dict, DictLock};
use crate::error::{Error, Result};

/// Default lease of `lock()` and of `get_or_insert_with`'s key lease.
const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// Default socket timeout of every call.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest single blocking read (`XREAD BLOCK`); longer waits re-check
/// and block again, so a waiter sends a few commands a minute at most.
const MAX_BLOCK: Duration = Duration::from_secs(30);
/// Idle connections kept per dictionary handle.
const MAX_IDLE: usize = 16;
/// MOVED redirections followed by one call before giving up.
const MAX_REDIRECTS: usize = 5;

/// A Lua script, sent with `EVALSHA` (loaded on `NOSCRIPT`).
struct Script {
    src: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    const fn new(src: &'static str) -> Script {
        Script {
            src,
            sha: OnceLock::new(),
        }
    }
}

/// Appends an entry to the writes stream if a waiter's flag is up.
/// KEYS[2] = flag, KEYS[3] = stream, ARGV[1] = the key written.
macro_rules! notify {
    () => {
        "if redis.call('EXISTS', KEYS[2]) == 1 then \
           redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 'k', ARGV[1]) \
         end "
    };
}

/// The id of the last entry of stream `$k` ("0-0" if none) into `id`.
macro_rules! last_id {
    ($k:literal) => {
        concat!(
            "local id = '0-0' \
             local last = redis.call('XREVRANGE', ",
            $k,
            ", '+', '-', 'COUNT', 1) \
             if #last > 0 then id = last[1][1] end "
        )
    };
}

/// KEYS: hash, flag, stream. ARGV: key, value.
static INSERT: Script = Script::new(concat!(
    "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) ",
    notify!(),
    "return 1"
));

/// KEYS: hash, flag, stream. ARGV: key. Returns 1 if the key was present.
static REMOVE: Script = Script::new(concat!(
    "local n = redis.call('HDEL', KEYS[1], ARGV[1]) \
     if n == 1 then ",
    notify!(),
    "end return n"
));

/// Compare-and-set. KEYS: hash, flag, stream. ARGV: key, expected present
/// ('1'/'0'), expected value, new present ('1'/'0'), new value. Returns {1}
/// on success, {0} or {0, current} on a conflict.
static CAS: Script = Script::new(concat!(
    "local cur = redis.call('HGET', KEYS[1], ARGV[1]) \
     if ARGV[2] == '1' then \
       if cur ~= ARGV[3] then return {0, cur} end \
     elseif cur then return {0, cur} end \
     if ARGV[4] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[5]) \
     elseif cur then redis.call('HDEL', KEYS[1], ARGV[1]) \
     else return {1} end ",
    notify!(),
    "return {1}"
));

/// `wait_for`'s check. KEYS: hash, flag, stream. ARGV: key, flag lifetime
/// (ms). Returns {1, value}, or {0, last stream id} after raising the flag.
static WAIT_CHECK: Script = Script::new(concat!(
    "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
     if v then return {1, v} end \
     if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then \
       redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) \
     end ",
    last_id!("KEYS[3]"),
    "return {0, id}"
));

/// `watch`'s check. KEYS: hash, flag, stream. ARGV: key, flag lifetime
/// (ms). Raises the flag; returns {last stream id, value or nothing}.
static WATCH_CHECK: Script = Script::new(concat!(
    "if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then \
       redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) \
     end ",
    last_id!("KEYS[3]"),
    "return {id, redis.call('HGET', KEYS[1], ARGV[1])}"
));

/// `lock()`. KEYS: lock, held, fence, releases stream. ARGV: lease (ms).
/// Returns {1, token, recovered} or {0, remaining lease (ms), last id}.
static LOCK: Script = Script::new(concat!(
    "if redis.call('EXISTS', KEYS[1]) == 1 then ",
    last_id!("KEYS[4]"),
    "  return {0, redis.call('PTTL', KEYS[1]), id} \
     end \
     local recovered = redis.call('EXISTS', KEYS[2]) \
     local t = redis.call('INCR', KEYS[3]) \
     redis.call('SET', KEYS[1], t, 'PX', ARGV[1]) \
     redis.call('SET', KEYS[2], t) \
     return {1, t, recovered}"
));

/// `get_or_insert_with`'s lease. KEYS: hash, lease, fence, releases stream.
/// ARGV: key, lease (ms). Returns {2, value} if the key is present, {1,
/// token} when the lease is taken, {0, remaining lease (ms), last id}.
static KEY_LEASE: Script = Script::new(concat!(
    "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
     if v then return {2, v} end \
     if redis.call('EXISTS', KEYS[2]) == 1 then ",
    last_id!("KEYS[4]"),
    "  return {0, redis.call('PTTL', KEYS[2]), id} \
     end \
     local t = redis.call('INCR', KEYS[3]) \
     redis.call('SET', KEYS[2], t, 'PX', ARGV[2]) \
     return {1, t}"
));

/// Release. KEYS: lease, held marker, releases stream. ARGV: token.
static RELEASE: Script = Script::new(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end \
     if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end \
     redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 't', ARGV[1]) \
     return 1",
);

/// Renewal. KEYS: lease. ARGV: token, lease (ms). 1 if still ours.
static RENEW: Script = Script::new(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then \
       redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 \
     end return 0",
);

/// Where the dictionary's server is.
#[derive(Debug, Clone)]
enum Endpoint {
    /// One server, `host:port`.
    Single(String),
    /// A cluster: nodes to ask which primary holds the dictionary's slot.
    Cluster(Vec<String>),
}

/// The server currently addressed, and idle connections to it.
#[derive(Default)]
struct NodeState {
    /// `host:port` of the server (for a cluster: the slot's primary, once
    /// known).
    addr: Option<String>,
    /// Bumped whenever `addr` changes: connections of an older epoch are
    /// dropped instead of pooled.
    epoch: u64,
    idle: Vec<Connection>,
}

/// A connection on loan from the pool.
struct Conn {
    con: Connection,
    addr: String,
    epoch: u64,
    /// Taken from the pool (it may have been closed by the server since).
    pooled: bool,
}

/// The key names of one dictionary.
#[derive(Debug)]
struct Keys {
    hash: String,
    writes: String,
    flag: String,
    releases: String,
    lock: String,
    held: String,
    fence: String,
    lease_prefix: String,
}

impl Keys {
    fn new(name: &str) -> Keys {
        let k = |suffix: &str| format!("shmdict:{{{name}}}:{suffix}");
        Keys {
            hash: k("h"),
            writes: k("w"),
            flag: k("wf"),
            releases: k("r"),
            lock: k("lock"),
            held: k("held"),
            fence: k("fence"),
            lease_prefix: k("g:"),
        }
    }

    fn key_lease(&self, key: &[u8]) -> Vec<u8> {
        let mut k = self.lease_prefix.as_bytes().to_vec();
        k.extend_from_slice(key);
        k
    }
}

struct Inner {
    name: String,
    endpoint: Endpoint,
    /// `user:password@`, or empty.
    userinfo: String,
    timeout: Duration,
    lease: Duration,
    keys: Keys,
    state: Mutex<NodeState>,
}

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
/// an unreachable, closed or frozen server gives [`Error::Io`] whose message
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

/// Splits `redis://…/NAME` into the server part and NAME.
fn split_target(target: &str) -> Result<(&str, &str)> {
    let scheme_end = target.find("://").map_or(0, |i| i + 3);
    match target[scheme_end..].find('/') {
        Some(i) => Ok((&target[..scheme_end + i], &target[scheme_end + i + 1..])),
        None => Ok((target, "")),
    }
}

/// Parses a server URL into an endpoint and the `user:password@` part.
fn parse_server(url: &str) -> Result<(Endpoint, String)> {
    let bad = |reason: &str| Error::InvalidArgument {
        segment: url.to_owned(),
        reason: format!(
            "{reason}; expected redis://HOST:PORT or redis+cluster://HOST:PORT,HOST:PORT"
        ),
    };
    let (cluster, rest) = if let Some(r) = url.strip_prefix("redis://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("redis+cluster://") {
        (true, r)
    } else {
        return Err(bad("unknown scheme"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err(bad("a path after the server (use RedisDict::open's name)"));
    }
    let (userinfo, hosts) = match rest.rfind('@') {
        Some(i) => (format!("{}@", &rest[..i]), &rest[i + 1..]),
        None => (String::new(), rest),
    };
    let mut nodes = Vec::new();
    for h in hosts.split(',') {
        if h.is_empty() {
            return Err(bad("no host"));
        }
        let host_port = if let Some(after) = h.strip_prefix('[') {
            // [IPv6]:PORT or [IPv6]
            match after.split_once(']') {
                Some((_, "")) => format!("{h}:6379"),
                Some((_, p))
                    if p.strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok()) =>
                {
                    h.to_owned()
                }
                _ => return Err(bad("bad address")),
            }
        } else {
            match h.split_once(':') {
                None => format!("{h}:6379"),
                Some((host, p)) if !host.is_empty() && p.parse::<u16>().is_ok() => h.to_owned(),
                _ => return Err(bad("bad address")),
            }
        };
        nodes.push(host_port);
    }
    if cluster {
        Ok((Endpoint::Cluster(nodes), userinfo))
    } else if nodes.len() == 1 {
        Ok((Endpoint::Single(nodes.remove(0)), userinfo))
    } else {
        Err(bad("several hosts need redis+cluster://"))
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
            match last {
                // Timed out: raise the flag again and go on.
                None => {
                    check()?;
                }
                Some(last) if !hit => id = last,
                Some(_) => {
                    let (now, value) = check()?;
                    id = now;
                    if each(value)? {
                        return Ok(());
                    }
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

impl Inner {
    fn target(&self) -> String {
        let addr = self.state().addr.clone();
        match (&self.endpoint, addr) {
            (Endpoint::Single(a), _) => format!("redis://{a}/{}", self.name),
            (Endpoint::Cluster(_), Some(a)) => format!("redis+cluster://{a}/{}", self.name),
            (Endpoint::Cluster(seeds), None) => {
                format!("redis+cluster://{}/{}", seeds.join(","), self.name)
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, NodeState> {
        // A panic while holding this lock leaves consistent data (a Vec and
        // a String): take it anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io_error(&self, addr: &str, op: &'static str, e: &RedisError) -> Error {
        let kind = match e.kind() {
            redis::ErrorKind::Io => {
                if e.is_timeout() {
                    io::ErrorKind::TimedOut
                } else if e.is_connection_refusal() {
                    io::ErrorKind::ConnectionRefused
                } else {
                    io::ErrorKind::ConnectionAborted
                }
            }
            _ => io::ErrorKind::Other,
        };
        let scheme = match self.endpoint {
            Endpoint::Single(_) => "redis",
            Endpoint::Cluster(_) => "redis+cluster",
        };
        Error::Io {
            segment: Some(format!("{scheme}://{addr}/{}", self.name)),
            op,
            source: io::Error::new(kind, format!("server {addr}: {e}")),
        }
    }

    /// A new connection to `addr`, with the socket timeouts set.
    fn connect(&self, addr: &str) -> RedisResult<Connection> {
        let client = redis::Client::open(format!("redis://{}{addr}/", self.userinfo))?;
        let con = client.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        Ok(con)
    }

    /// The primary holding the dictionary's slot, asked of each seed node in
    /// turn.
    fn resolve(&self, seeds: &[String]) -> Result<String> {
        let mut last = None;
        for seed in seeds {
            match self.ask_slot_owner(seed) {
                Ok(addr) => return Ok(addr),
                Err(e) => last = Some(self.io_error(seed, "finding the slot's primary", &e)),
            }
        }
        Err(last.unwrap_or_else(|| Error::InvalidArgument {
            segment: self.name.clone(),
            reason: "no cluster node given".into(),
        }))
    }

    fn ask_slot_owner(&self, seed: &str) -> RedisResult<String> {
        let mut con = self.connect(seed)?;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&self.keys.hash)
            .query(&mut con)?;
        let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut con)?;
        let seed_host = seed.rsplit_once(':').map_or(seed, |(h, _)| h);
        let not_found = || {
            RedisError::from((
                redis::ErrorKind::Client,
                "no primary serves the slot",
                format!("slot {slot}"),
            ))
        };
        let Value::Array(ranges) = slots else {
            return Err(not_found());
        };
        for r in ranges {
            let Value::Array(r) = r else { continue };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
                (r.first(), r.get(1), r.get(2))
            else {
                continue;
            };
            if !(*start..=*end).contains(&slot) {
                continue;
            }
            let host = match node.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => String::new(),
            };
            let host = if host.is_empty() || host == "?" {
                seed_host.to_owned()
            } else if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host
            };
            if let Some(Value::Int(port)) = node.get(1) {
                return Ok(format!("{host}:{port}"));
            }
        }
        Err(not_found())
    }

    /// A connection to the dictionary's server: an idle one, or a new one.
    fn take(&self, op: &'static str) -> Result<Conn> {
        let (addr, epoch) = {
            let mut st = self.state();
            if let Some(con) = st.idle.pop() {
                let addr = st.addr.clone().unwrap_or_default();
                return Ok(Conn {
                    con,
                    addr,
                    epoch: st.epoch,
                    pooled: true,
                });
            }
            let addr = match (&st.addr, &self.endpoint) {
                (Some(a), _) => a.clone(),
                (None, Endpoint::Single(a)) => a.clone(),
                (None, Endpoint::Cluster(_)) => String::new(),
            };
            if st.addr.is_none() && !addr.is_empty() {
                st.addr = Some(addr.clone());
            }
            (addr, st.epoch)
        };
        let addr = if addr.is_empty() {
            let Endpoint::Cluster(seeds) = &self.endpoint else {
                unreachable!("a single server always has an address")
            };
            let a = self.resolve(seeds)?;
            self.set_addr(Some(a.clone()), epoch);
            a
        } else {
            addr
        };
        let con = self
            .connect(&addr)
            .map_err(|e| self.io_error(&addr, op, &e))?;
        let epoch = self.state().epoch;
        Ok(Conn {
            con,
            addr,
            epoch,
            pooled: false,
        })
    }

    /// Points the handle at `addr` (`None`: ask the cluster again), if no
    /// other thread did since `epoch`.
    fn set_addr(&self, addr: Option<String>, epoch: u64) {
        let mut st = self.state();
        if st.epoch == epoch && st.addr != addr {
            st.addr = addr;
            st.epoch += 1;
            st.idle.clear();
        }
    }

    fn give_back(&self, c: Conn) {
        let mut st = self.state();
        if st.epoch == c.epoch && st.idle.len() < MAX_IDLE {
            st.idle.push(c.con);
        }
    }

    /// Runs `f` on a connection to the dictionary's server. Follows MOVED
    /// redirections; an `idempotent` call whose pooled connection turns out
    /// closed is retried once on a new connection. Any other failure is
    /// `Io` naming the server.
    fn call<T>(
        &self,
        op: &'static str,
        idempotent: bool,
        mut f: impl FnMut(&mut Connection) -> RedisResult<T>,
    ) -> Result<T> {
        let mut redirects = 0;
        let mut retried = false;
        loop {
            let mut c = self.take(op)?;
            match f(&mut c.con) {
                Ok(v) => {
                    self.give_back(c);
                    return Ok(v);
                }
                Err(e) => {
                    if let Some((addr, _slot)) = e.redirect_node() {
                        let moved = matches!(
                            e.kind(),
                            redis::ErrorKind::Server(redis::ServerErrorKind::Moved)
                        );
                        if moved
                            && matches!(self.endpoint, Endpoint::Cluster(_))
                            && redirects < MAX_REDIRECTS
                        {
                            redirects += 1;
                            self.set_addr(Some(addr.to_owned()), c.epoch);
                            continue;
                        }
                    }
                    let dropped = e.is_connection_dropped() || e.is_io_error();
                    if dropped && matches!(self.endpoint, Endpoint::Cluster(_)) {
                        // Perhaps a failover: ask the cluster again next time.
                        self.set_addr(None, c.epoch);
                    }
                    if dropped && c.pooled && idempotent && !retried && !e.is_timeout() {
                        retried = true;
                        // Other idle connections may be as stale.
                        self.state().idle.clear();
                        continue;
                    }
                    let err = self.io_error(&c.addr, op, &e);
                    if !dropped && e.kind() != redis::ErrorKind::Parse {
                        // A server error reply: the connection is fine.
                        self.give_back(c);
                    }
                    return Err(err);
                }
            }
        }
    }
}

/// Runs `script` with `EVALSHA`, loading it first if the server lacks it.
fn eval(con: &mut Connection, s: &Script, keys: &[&[u8]], args: &[&[u8]]) -> RedisResult<Value> {
    let run = |con: &mut Connection, sha: &str| {
        redis::cmd("EVALSHA")
            .arg(sha)
            .arg(keys.len())
            .arg(keys)
            .arg(args)
            .query::<Value>(con)
    };
    if let Some(sha) = s.sha.get() {
        match run(con, sha) {
            Err(e) if e.code() == Some("NOSCRIPT") => {}
            r => return r,
        }
    }
    let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(s.src).query(con)?;
    let sha = s.sha.get_or_init(|| sha).clone();
    run(con, &sha)
}

/// A reply that does not have the expected shape.
fn bad_reply(what: &str, v: &Value) -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        format!("{what}: {v:?}"),
    ))
}

fn as_array(v: Value, what: &str) -> RedisResult<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        v => Err(bad_reply(what, &v)),
    }
}

fn as_int(v: Option<&Value>, what: &str) -> RedisResult<i64> {
    match v {
        Some(Value::Int(i)) => Ok(*i),
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_reply(what, &Value::BulkString(b.clone()))),
        other => Err(bad_reply(what, other.unwrap_or(&Value::Nil))),
    }
}

fn as_bytes(v: Option<Value>, what: &str) -> RedisResult<Vec<u8>> {
    match v {
        Some(Value::BulkString(b)) => Ok(b),
        Some(Value::SimpleString(s)) => Ok(s.into_bytes()),
        other => Err(bad_reply(what, &other.unwrap_or(Value::Nil))),
    }
}

fn as_string(v: Option<Value>, what: &str) -> RedisResult<String> {
    let b = as_bytes(v, what)?;
    String::from_utf8(b).map_err(|e| bad_reply(what, &Value::BulkString(e.into_bytes())))
}

/// `d` in whole milliseconds, rounded up (a block of `millis(d)` ends no
/// earlier than `d`), at least 1 (0 means "forever" to Redis).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Blocks on a stream until an entry after `id` arrives or `block` passes.
/// Uses a connection of its own, whose read timeout covers the block.
fn block_on_stream(
    inner: &Inner,
    op: &'static str,
    stream: &str,
    id: &str,
    block: Duration,
) -> Result<()> {
    let block = block.clamp(Duration::from_millis(1), MAX_BLOCK);
    inner.call(op, true, |c| {
        c.set_read_timeout(Some(block + inner.timeout))?;
        let r = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(millis(block))
            .arg("STREAMS")
            .arg(stream)
            .arg(id)
            .query::<Value>(c);
        c.set_read_timeout(Some(inner.timeout))?;
        r.map(|_| ())
    })
}

/// From an `XREAD` reply on one stream: the id of its last entry (`None`
/// if the read timed out) and whether an entry's `k` field is `key`.
fn stream_entries_name(v: Value, key: &[u8]) -> RedisResult<(Option<String>, bool)> {
    let streams = match v {
        Value::Nil => return Ok((None, false)),
        Value::Array(a) => a,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        v => return Err(bad_reply("XREAD", &v)),
    };
    let mut last = None;
    let mut hit = false;
    for s in streams {
        let mut s = as_array(s, "XREAD stream")?.into_iter();
        s.next();
        for e in as_array(s.next().unwrap_or(Value::Nil), "XREAD entries")? {
            let mut e = as_array(e, "XREAD entry")?.into_iter();
            last = Some(as_string(e.next(), "XREAD entry id")?);
            let fields = as_array(e.next().unwrap_or(Value::Nil), "XREAD fields")?;
            let mut f = fields.into_iter();
            while let (Some(name), Some(value)) = (f.next(), f.next()) {
                if as_bytes(Some(name), "XREAD field")? == b"k"
                    && as_bytes(Some(value), "XREAD value")? == key
                {
                    hit = true;
                }
            }
        }
    }
    Ok((last, hit))
}

/// A lease renewed by a background thread every third of its length until
/// dropped.
struct Renewer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    lost: Arc<AtomicBool>,
}

impl Renewer {
    fn start(inner: Arc<Inner>, key: Vec<u8>, token: u64) -> Renewer {
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

    fn stop(&mut self) {
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
    dict: &'a RedisDict,
    token: u64,
    recovered: bool,
    renewer: Option<RenewerHandle>,
}

/// Opaque renewal state (for `Debug`).
struct RenewerHandle(Renewer);

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
    /// [`Dict::lock`] with the concrete guard type (fencing token,
    /// [`still_held`](RedisLock::still_held)).
    pub fn lock_lease(&self) -> Result<RedisLock<'_>> {
        let inner = &self.inner;
        let k = &inner.keys;
        let lease = millis(inner.lease).to_string();
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
        let keys = self.write_keys();
        self.inner.call("insert", false, |c| {
            eval(c, &INSERT, &keys, &[key, value]).map(|_| ())
        })
    }

    fn remove(&self, key: &[u8]) -> Result<bool> {
        let keys = self.write_keys();
        self.inner.call("remove", false, |c| {
            let v = eval(c, &REMOVE, &keys, &[key])?;
            Ok(as_int(Some(&v), "remove")? == 1)
        })
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

enum KeyLease {
    Present(Vec<u8>),
    Taken(u64),
    Busy(i64, String),
}

/// A held `get_or_insert_with` lease: renewed while `f` runs, released on
/// drop (a failed release only leaves the lease to expire).
struct KeyLeaseGuard<'a> {
    inner: &'a Arc<Inner>,
    key: Vec<u8>,
    token: u64,
    renewer: Renewer,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (e, u) = parse_server("redis://127.0.0.1:6380").expect("ok");
        assert!(
            matches!(e, Endpoint::Single(ref a) if a == "127.0.0.1:6380"),
            "{e:?}"
        );
        assert_eq!(u, "");
        let (e, _) = parse_server("redis://example.org/").expect("ok");
        assert!(
            matches!(e, Endpoint::Single(ref a) if a == "example.org:6379"),
            "{e:?}"
        );
        let (e, u) = parse_server("redis+cluster://u:p@a:1,b:2").expect("ok");
        assert!(
            matches!(e, Endpoint::Cluster(ref n) if n == &["a:1", "b:2"]),
            "{e:?}"
        );
        assert_eq!(u, "u:p@");
        for bad in [
            "http://a:1",
            "redis://",
            "redis://a:1,b:2",
            "redis://a:x",
            "redis://a:1/db",
            "redis+cluster://a:1,,b:2",
        ] {
            assert!(
                matches!(parse_server(bad), Err(Error::InvalidArgument { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            split_target("redis://h:1/jobs").expect("ok"),
            ("redis://h:1", "jobs")
        );
        assert_eq!(
            split_target("redis://h:1").expect("ok"),
            ("redis://h:1", "")
        );
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("jobs");
        for key in [
            &k.hash,
            &k.writes,
            &k.flag,
            &k.releases,
            &k.lock,
            &k.held,
            &k.fence,
        ] {
            assert!(key.starts_with("shmdict:{jobs}:"), "{key}");
        }
        assert!(k.key_lease(b"x}{y").starts_with(b"shmdict:{jobs}:g:"));
    }
}
