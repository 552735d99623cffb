//! Connections to the dictionary's server: the endpoint (one server, or
//! the primary of the dictionary's cluster slot), a pool of idle
//! connections, socket timeouts, `MOVED` redirections, and errors that name
//! the server.

use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use redis::{Connection, RedisError, RedisResult, Value};

use super::MAX_BLOCK;
use crate::error::{Error, Result};

/// Idle connections kept per dictionary handle.
pub(super) const MAX_IDLE: usize = 16;
/// MOVED redirections followed by one call before giving up.
pub(super) const MAX_REDIRECTS: usize = 5;

/// Where the dictionary's server is.
#[derive(Debug, Clone)]
pub(super) enum Endpoint {
    /// One server, `host:port`.
    Single(String),
    /// A cluster: nodes to ask which primary holds the dictionary's slot.
    Cluster(Vec<String>),
}

/// The server currently addressed, and idle connections to it.
#[derive(Default)]
pub(super) struct NodeState {
    /// `host:port` of the server (for a cluster: the slot's primary, once
    /// known).
    pub(super) addr: Option<String>,
    /// Bumped whenever `addr` changes: connections of an older epoch are
    /// dropped instead of pooled.
    pub(super) epoch: u64,
    pub(super) idle: Vec<Connection>,
}

/// A connection on loan from the pool.
pub(super) struct Conn {
    pub(super) con: Connection,
    pub(super) addr: String,
    pub(super) epoch: u64,
    /// Taken from the pool (it may have been closed by the server since).
    pub(super) pooled: bool,
}

/// The key names of one dictionary.
#[derive(Debug)]
pub(super) struct Keys {
    pub(super) hash: String,
    pub(super) writes: String,
    pub(super) flag: String,
    pub(super) releases: String,
    pub(super) lock: String,
    pub(super) held: String,
    pub(super) fence: String,
    pub(super) lease_prefix: String,
}

impl Keys {
    pub(super) fn new(name: &str) -> Keys {
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

    pub(super) fn key_lease(&self, key: &[u8]) -> Vec<u8> {
        let mut k = self.lease_prefix.as_bytes().to_vec();
        k.extend_from_slice(key);
        k
    }
}

pub(super) struct Inner {
    pub(super) name: String,
    pub(super) endpoint: Endpoint,
    /// `user:password@`, or empty.
    pub(super) userinfo: String,
    pub(super) timeout: Duration,
    pub(super) lease: Duration,
    pub(super) keys: Keys,
    pub(super) state: Mutex<NodeState>,
}

/// Splits `redis://…/NAME` into the server part and NAME.
pub(super) fn split_target(target: &str) -> Result<(&str, &str)> {
    let scheme_end = target.find("://").map_or(0, |i| i + 3);
    match target[scheme_end..].find('/') {
        Some(i) => Ok((&target[..scheme_end + i], &target[scheme_end + i + 1..])),
        None => Ok((target, "")),
    }
}

/// Parses a server URL into an endpoint and the `user:password@` part.
pub(super) fn parse_server(url: &str) -> Result<(Endpoint, String)> {
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

impl Inner {
    /// The server (or cluster seeds) this handle was opened on.
    pub(super) fn server_id(&self) -> String {
        match &self.endpoint {
            Endpoint::Single(a) => a.clone(),
            Endpoint::Cluster(seeds) => seeds.join(","),
        }
    }

    pub(super) fn target(&self) -> String {
        let addr = self.state().addr.clone();
        match (&self.endpoint, addr) {
            (Endpoint::Single(a), _) => format!("redis://{a}/{}", self.name),
            (Endpoint::Cluster(_), Some(a)) => format!("redis+cluster://{a}/{}", self.name),
            (Endpoint::Cluster(seeds), None) => {
                format!("redis+cluster://{}/{}", seeds.join(","), self.name)
            }
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, NodeState> {
        // A panic while holding this lock leaves consistent data (a Vec and
        // a String): take it anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn io_error(&self, addr: &str, op: &'static str, e: &RedisError) -> Error {
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
    pub(super) fn connect(&self, addr: &str) -> RedisResult<Connection> {
        let client = redis::Client::open(format!("redis://{}{addr}/", self.userinfo))?;
        let con = client.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        Ok(con)
    }

    /// The primary holding the dictionary's slot, asked of each seed node in
    /// turn.
    pub(super) fn resolve(&self, seeds: &[String]) -> Result<String> {
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

    pub(super) fn ask_slot_owner(&self, seed: &str) -> RedisResult<String> {
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
    pub(super) fn take(&self, op: &'static str) -> Result<Conn> {
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
        let addr = match &self.endpoint {
            Endpoint::Cluster(seeds) if addr.is_empty() => {
                let a = self.resolve(seeds)?;
                self.set_addr(Some(a.clone()), epoch);
                a
            }
            _ => addr,
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
    pub(super) fn set_addr(&self, addr: Option<String>, epoch: u64) {
        let mut st = self.state();
        if st.epoch == epoch && st.addr != addr {
            st.addr = addr;
            st.epoch += 1;
            st.idle.clear();
        }
    }

    pub(super) fn give_back(&self, c: Conn) {
        let mut st = self.state();
        if st.epoch == c.epoch && st.idle.len() < MAX_IDLE {
            st.idle.push(c.con);
        }
    }

    /// Runs `f` on a connection to the dictionary's server. Follows MOVED
    /// redirections; an `idempotent` call whose pooled connection turns out
    /// closed is retried once on a new connection. Any other failure is
    /// `Io` naming the server.
    pub(super) fn call<T>(
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
                    let moved = matches!(
                        e.kind(),
                        redis::ErrorKind::Server(redis::ServerErrorKind::Moved)
                    );
                    if moved
                        && matches!(self.endpoint, Endpoint::Cluster(_))
                        && redirects < MAX_REDIRECTS
                    {
                        // The command was not executed: send it where the
                        // slot is now (named in the reply, or, for a
                        // pipeline, whose error does not carry the
                        // address, as the cluster says).
                        redirects += 1;
                        let to = e.redirect_node().map(|(addr, _slot)| addr.to_owned());
                        self.set_addr(to, c.epoch);
                        continue;
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

/// `d` in whole milliseconds, rounded up (a block of `millis(d)` ends no
/// earlier than `d`), at least 1 (0 means "forever" to Redis).
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Blocks on a stream until an entry after `id` arrives or `block` passes.
/// Uses a connection of its own, whose read timeout covers the block.
pub(super) fn block_on_stream(
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
