//! The Lua scripts that make each write one atomic step on the server,
//! `EVALSHA` with loading on `NOSCRIPT`, and checked parsing of replies (a
//! reply of an unexpected shape is an error, never a panic).

use std::sync::OnceLock;

use redis::{Connection, RedisError, RedisResult, Value};

/// A Lua script, sent with `EVALSHA` (loaded on `NOSCRIPT`).
pub(super) struct Script {
    pub(super) src: &'static str,
    pub(super) sha: OnceLock<String>,
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

/// Compare-and-set. KEYS: hash, flag, stream. ARGV: key, expected present
/// ('1'/'0'), expected value, new present ('1'/'0'), new value. Returns {1}
/// on success, {0} or {0, current} on a conflict.
pub(super) static CAS: Script = Script::new(concat!(
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
pub(super) static WAIT_CHECK: Script = Script::new(concat!(
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
pub(super) static WATCH_CHECK: Script = Script::new(concat!(
    "if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then \
       redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) \
     end ",
    last_id!("KEYS[3]"),
    "return {id, redis.call('HGET', KEYS[1], ARGV[1])}"
));

/// `lock()`. KEYS: lock, held, fence, releases stream. ARGV: lease (ms).
/// Returns {1, token, recovered} or {0, remaining lease (ms), last id}.
pub(super) static LOCK: Script = Script::new(concat!(
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
pub(super) static KEY_LEASE: Script = Script::new(concat!(
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
pub(super) static RELEASE: Script = Script::new(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end \
     if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end \
     redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 't', ARGV[1]) \
     return 1",
);

/// Renewal. KEYS: lease. ARGV: token, lease (ms). 1 if still ours.
pub(super) static RENEW: Script = Script::new(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then \
       redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 \
     end return 0",
);

/// Runs `script` with `EVALSHA`, loading it first if the server lacks it.
pub(super) fn eval(
    con: &mut Connection,
    s: &Script,
    keys: &[&[u8]],
    args: &[&[u8]],
) -> RedisResult<Value> {
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
pub(super) fn bad_reply(what: &str, v: &Value) -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        format!("{what}: {v:?}"),
    ))
}

pub(super) fn as_array(v: Value, what: &str) -> RedisResult<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        v => Err(bad_reply(what, &v)),
    }
}

pub(super) fn as_int(v: Option<&Value>, what: &str) -> RedisResult<i64> {
    match v {
        Some(Value::Int(i)) => Ok(*i),
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_reply(what, &Value::BulkString(b.clone()))),
        other => Err(bad_reply(what, other.unwrap_or(&Value::Nil))),
    }
}

pub(super) fn as_bytes(v: Option<Value>, what: &str) -> RedisResult<Vec<u8>> {
    match v {
        Some(Value::BulkString(b)) => Ok(b),
        Some(Value::SimpleString(s)) => Ok(s.into_bytes()),
        other => Err(bad_reply(what, &other.unwrap_or(Value::Nil))),
    }
}

pub(super) fn as_string(v: Option<Value>, what: &str) -> RedisResult<String> {
    let b = as_bytes(v, what)?;
    String::from_utf8(b).map_err(|e| bad_reply(what, &Value::BulkString(e.into_bytes())))
}

/// From an `XREAD` reply on one stream: the id of its last entry (`None`
/// if the read timed out) and whether an entry's `k` field is `key`.
pub(super) fn stream_entries_name(v: Value, key: &[u8]) -> RedisResult<(Option<String>, bool)> {
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
