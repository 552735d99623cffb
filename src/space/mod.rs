//! A Linda tuple space on a shared dictionary: `out`, blocking `take`
//! (Linda's `in`) and `read` (`rd`), their non-blocking forms (`inp`,
//! `rdp`), and `eval` workers, shared by unrelated processes that open the
//! same name.
//!
//! ```
//! use std::time::Duration;
//! use shmdict::space::{FieldKind, Space};
//! use shmdict::{pattern, tuple};
//!
//! let name = format!("doc-space-{}", std::process::id());
//! # struct Unlink<'a>(&'a str);
//! # impl Drop for Unlink<'_> { fn drop(&mut self) { let _ = Space::unlink(self.0); } }
//! # let _cleanup = Unlink(&name);
//! let space = Space::open(&name)?; // any process opening `name` shares it
//! space.out(tuple!("sum", 0))?;
//!
//! // A worker process (a fork of this one) adds up 4-tuples of integers.
//! let mut worker = space.eval(|ts| {
//!     let any4 = pattern!(FieldKind::I64, FieldKind::I64, FieldKind::I64, FieldKind::I64);
//!     // Leave when no 4-tuple comes for a while (a real worker would loop on).
//!     while let Some(t) = ts.take(&any4, Duration::from_millis(500)).unwrap() {
//!         let n: i64 = t.fields().iter().filter_map(|f| f.as_i64()).sum();
//!         let sum = ts.take(&pattern!("sum", _), Duration::MAX).unwrap().unwrap();
//!         ts.out(tuple!("sum", sum.i64(1).unwrap() + n)).unwrap();
//!     }
//! })?;
//! space.out(tuple!(1, 2, 3, 4))?;
//! space.out(tuple!(4, 5, 6, 7))?;
//! assert!(worker.join()?.success());
//!
//! // `read` leaves the tuple in the space; `take` removes it.
//! let sum = space.read(&pattern!("sum", FieldKind::I64), Duration::from_secs(5))?;
//! assert_eq!(sum, Some(tuple!("sum", 32)));
//! assert_eq!(space.len()?, 1);
//! assert!(space.try_take(&pattern!("sum", _))?.is_some());
//! assert_eq!(space.take(&pattern!("sum", _), Duration::from_millis(10))?, None);
//!
//! // A worker that panics posts an error tuple instead of dying silently.
//! let mut bad = space.eval(|_| panic!("no such file"))?;
//! assert!(!bad.join()?.success());
//! let err = space.try_take(&pattern!("error", FieldKind::Str))?.unwrap();
//! assert!(err.str(1).unwrap().contains("no such file"));
//! # Ok::<(), shmdict::Error>(())
//! ```
//!
//! # Tuples and patterns
//!
//! A [`Tuple`] is a list of up to [`MAX_ARITY`] [`Field`]s: integers,
//! floats, strings, bytes, booleans, and any serde value as opaque postcard
//! bytes ([`Field::opaque`]). A [`Pattern`] has one [`Match`] per field:
//! any value, an exact value, a [`FieldKind`], or a predicate closure that
//! runs in the caller's process. A pattern matches tuples of its own arity
//! only. The [`tuple!`](crate::tuple) and [`pattern!`](crate::pattern)
//! macros build both.
//!
//! # Key scheme
//!
//! A space is an ordinary [`ShmDict`] whose keys start with `ts1/`
//! (the `1` is this format's version); it inherits the dictionary's crash
//! safety, bounds checks and futex waiting. Other keys may live in the same
//! dictionary.
//!
//! | key                      | value                                              |
//! |--------------------------|----------------------------------------------------|
//! | `ts1/b/<arity>/<bucket>` | the tuples of that arity whose first field hashes to `bucket` (0..64), oldest first (format in `bucket.rs`) |
//! | `ts1/arities`            | 32-byte bitmap of the arities ever posted           |
//! | `ts1/inbox/<name>`       | the last tuple moved into inbox `name` by [`Space::take_into`]: its 16-byte id, then the tuple |
//! | `ts1/r/<arity>/<bucket>` | the bucket's reserve: zero bytes, at least the bucket's length plus 64 (see "Full arenas") |
//! | `ts1/ir/<name>`          | inbox `name`'s reserve: zero bytes, as long as the largest record it held |
//!
//! A stored tuple is its arity (one byte), then each field as a kind tag
//! (one byte: `I64` 0, `F64` 1, `Str` 2, `Bytes` 3, `Bool` 4, `Opaque` 5)
//! and its value: integers and floats as 8 bytes little-endian (floats by
//! their bits), booleans as one byte, strings and byte strings as a 32-bit
//! little-endian length and the bytes.
//!
//! `bucket` is `xxh3(kind tag, value) mod 64` of the first field (0 for the
//! empty tuple). Every write is one atomic `update` of one bucket key, so
//! the bucket is the unit of consistency, and there is no global hot key:
//! posting to different buckets never touches the same key, and no shared
//! counter hands out ids (an id is the poster's pid and start time plus a
//! per-process sequence number).
//!
//! # Indexing
//!
//! A pattern whose first field is an exact value reads one bucket; any
//! other pattern reads the 64 buckets of its arity (skipped entirely if the
//! arity was never posted). No pattern reads tuples of another arity. Within
//! a bucket, tuples are matched in the order they were posted (a search
//! stops at the first match), so a bucket used as a queue is FIFO. A
//! bucket's value is copied whole on every change, so an operation costs a
//! few copies of its bucket: this suits coordination (thousands of tuples
//! per first field), not bulk data. Keep large payloads in the dictionary
//! and pass keys in tuples.
//!
//! # Taking, exactly once
//!
//! [`take`](Space::take) is, per candidate bucket (in bucket order), a
//! single atomic `update` whose closure picks the first available matching
//! tuple of the bucket's *current* value and removes it; when nothing
//! matches, nothing is written. That update is the linearization point: two
//! takers can never remove the same tuple (the loser's update re-runs on
//! the value without it and picks another or none), and a concurrent `out`
//! is never lost (it is an update of the same key, so one of the two
//! re-runs on the other's result). A taker SIGKILLed at any instruction
//! before that update commits leaves the tuple in the space; one killed
//! after it has *taken* the tuple: that take completed, even though its
//! caller never saw the tuple.
//!
//! [`take_into`](Space::take_into) closes that last gap for callers that
//! must not lose a tuple: the tuple is moved into a named *inbox* key, so
//! it is always in the space or in the inbox, never neither, whatever
//! instruction the taker is killed at. It takes three steps:
//!
//! 1. *claim*: an update marks the first matching available entry as
//!    claimed by this process (pid and start time) for inbox `name`;
//! 2. *record*: the entry's id and tuple are written to `ts1/inbox/<name>`;
//! 3. *remove*: an update removes the claimed entry.
//!
//! Claimed entries are invisible to other takes and reads. Whoever next
//! updates the bucket and finds a claim whose process is dead resolves it
//! inside the same atomic update: if the claim's inbox holds the entry's
//! id, the move had completed up to step 2 and the entry is dropped;
//! otherwise the claim is rolled back and the tuple is available again
//! (and waiters are woken). A live claimant is never overruled: liveness is
//! the pid *and* its start time, so a reused pid is not mistaken for it
//! (and a stopped claimant, e.g. under SIGSTOP, keeps its tuple hidden
//! until it continues or dies).
//!
//! # Full arenas
//!
//! A bucket's value is copy-on-write: removing a tuple publishes a new,
//! smaller value in a new block before the old block is freed. In a full
//! arena there is no new block, so without help a full space could not be
//! drained, and a `take_into` whose last step (removing the claimed entry)
//! or un-claim found no room would leave the tuple claimed by its live
//! caller, hidden from everybody until that process died.
//!
//! So every bucket has a *reserve*, a key (`ts1/r/..`) whose value is at
//! least as long as the bucket plus 64 bytes. `out` grows a bucket only
//! while its reserve covers the new length: otherwise it grows the reserve
//! first, and if that fails it posts nothing and returns `Full`. Every
//! other bucket write (take, claim, finish, un-claim, resolving a dead
//! claim) shrinks the bucket, or grows it by a claim's inbox name (up to
//! 64 bytes). When such a write finds the arena full, it takes the reserve
//! over (the reserve key is removed and the new bucket value is written
//! into its block, within one process, so no other writer can take that
//! room in between), then re-creates the reserve from the room the
//! bucket's old block left. Likewise `take_into`'s record step draws on the
//! inbox's reserve (`ts1/ir/..`, as long as the largest record that inbox
//! held; created after a record, so an inbox used for the first time in a
//! full arena can get `Full`, cleanly: the tuple is un-claimed; removed by
//! [`clear_inbox`](Space::clear_inbox)).
//!
//! Guarantees: in a full arena, every tuple can be taken with `take`, and
//! moved with `take_into` into an inbox that held a record at least as
//! large before. The finish and un-claim steps of `take_into` draw on the
//! bucket's reserve, and the reserve can only be missing when, between a
//! write that used it and the re-creation, another process's write took the
//! freed room (concurrent `out`s into a full arena). Then those steps retry
//! for about a second (takes elsewhere free room) before returning the
//! error; only a space that stays full and keeps being written to by others
//! for that long can leave a tuple claimed by a live process.
//!
//! The price is memory: a bucket's reserve is as large as the bucket, so
//! tuples take about twice their size in the arena. Buckets emptied by
//! takes drop their reserve.
//!
//! # Waiting
//!
//! A blocked `take` or `read` sleeps on one of the dictionary's 1024 futex
//! channels (see "Waiting" in `docs/design.md`), chosen by a wake-up hash:
//! of (arity, first field) for a pattern with an exact first field, of the
//! arity alone otherwise. `out` wakes both channels of its tuple. So a
//! blocked take is woken only by tuples of its arity (and first field, if
//! fixed), except for the remaining false sharing of 1024 channels among all
//! (arity, first field) pairs and the dictionary's own keys (every write of
//! a bucket key also notifies that key's channel): an unrelated write on
//! the same channel costs one spurious wake-up and re-check. Waiters on the
//! same (arity, first field) are all woken by a tuple there; one takes it
//! and the others sleep again.
//! Timeouts are honoured; [`Duration::MAX`] waits forever.
//!
//! # `eval`
//!
//! See [`Space::eval`]: workers are `fork`s of a single-threaded caller.

mod bucket;
mod engine;
use engine::*;
mod eval;
mod tuple;

use crate::sync::{AtomicU64, Ordering};
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use crate::dict::Op;
use crate::error::{Error, Result};
use crate::shm::layout::hash_key;
use crate::ShmDict;
use bucket::{Entry, Id};

pub use eval::{Worker, OPEN_FAILED_EXIT_CODE, PANIC_EXIT_CODE};
pub use tuple::{Field, FieldKind, Match, Pattern, Tuple};

/// The largest arity a tuple or pattern may have.
pub const MAX_ARITY: usize = 255;
/// Index buckets per arity (part of the format).
const BUCKETS: u64 = 64;
const ARITIES_KEY: &[u8] = b"ts1/arities";
const INBOX_PREFIX: &[u8] = b"ts1/inbox/";
/// Longest inbox name (the bucket format stores its length in 16 bits).
pub const MAX_INBOX_NAME: usize = 1024;
/// Bucket reserves: `ts1/r/<arity>/<bucket>` (see "Full arenas").
const RESERVE_PREFIX: &str = "ts1/r/";
/// Inbox reserves: `ts1/ir/<name>`.
const INBOX_RESERVE_PREFIX: &[u8] = b"ts1/ir/";
/// Room a bucket's reserve keeps beyond the bucket's length: what a claim
/// for an inbox name of up to this many bytes adds to the bucket.
const CLAIM_SLACK: usize = 64;
/// How long a `take_into` retries a finish or un-claim step that failed
/// (each failure means the reserve was taken by another process's write).
const SETTLE_TRIES: u32 = 200;

/// A named tuple space in shared memory. See the [module docs](self).
///
/// `Space` is `Send + Sync`: share `&Space` between threads.
pub struct Space {
    dict: ShmDict,
    /// Arities this handle has seen registered (a cache of `ts1/arities`).
    arities: [AtomicU64; 4],
    /// Counters behind [`Space::stats`].
    scans: AtomicU64,
    examined: AtomicU64,
    recovered: AtomicU64,
}

/// Diagnostic counters of one [`Space`] handle: see [`Space::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SpaceStats {
    /// Searches for a match: each `try_*` call is one, and a blocked call
    /// searches once more after every wake-up. A blocked `take` that is not
    /// woken by unrelated tuples searches only a few times.
    pub scans: u64,
    /// Stored tuples decoded and compared with a pattern. Shows the index at
    /// work: a search looks only at tuples of its pattern's arity and, if
    /// the first field is exact, of that field's bucket.
    pub examined: u64,
    /// Claims of killed [`take_into`](Space::take_into) callers resolved
    /// (rolled back, or completed from the inbox).
    pub recovered_claims: u64,
}

impl Space {
    /// Attaches to the space `name`, creating its dictionary with default
    /// sizing if it does not exist. The name rules are the dictionary's.
    pub fn open(name: &str) -> Result<Space> {
        ShmDict::open(name).map(Space::from_dict)
    }

    /// Attaches to (or creates) the space `name` with the dictionary
    /// options `options`: its size, `mode`, `create`/`create_new`, and
    /// [`allow_other_owner`](crate::Options::allow_other_owner) to attach
    /// a space that another user owns or whose mode grants more than
    /// `mode` (refused with `Error::PermissionDenied` otherwise, as by
    /// [`open`](Space::open)).
    pub fn open_with(options: crate::Options, name: &str) -> Result<Space> {
        options.open(name).map(Space::from_dict)
    }

    /// A space on an open dictionary (for example one created with
    /// [`ShmDict::options`] to choose its size). The space uses the keys
    /// starting with `ts1/`; the others are left alone.
    pub fn from_dict(dict: ShmDict) -> Space {
        Space {
            dict,
            arities: Default::default(),
            scans: AtomicU64::new(0),
            examined: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
        }
    }

    /// Removes the name `name` (see [`ShmDict::unlink`]).
    pub fn unlink(name: &str) -> Result<()> {
        ShmDict::unlink(name)
    }

    /// The space's name.
    pub fn name(&self) -> &str {
        self.dict.name()
    }

    /// The dictionary the space lives in.
    pub fn dict(&self) -> &ShmDict {
        &self.dict
    }

    /// Posts a tuple (Linda's `out`). Wakes the processes blocked on its
    /// arity and first field.
    ///
    /// `InvalidArgument` for more than [`MAX_ARITY`] fields; `Full` if the
    /// dictionary has no room (nothing already in the space is lost).
    pub fn out(&self, t: Tuple) -> Result<()> {
        self.check_arity(t.len())?;
        if t.max_field_len() > u32::MAX as usize / 2 {
            return Err(self.invalid("a tuple field of 2 GiB or more".into()));
        }
        let bytes = t.encode();
        if bytes.len() > u32::MAX as usize {
            return Err(self.invalid(format!("a tuple of {} bytes is too large", bytes.len())));
        }
        self.register_arity(t.len())?;
        let h1 = first_hash(t.get(0));
        let mut entry = Vec::new();
        bucket::push(&mut entry, next_id(), 0, &[], &bytes);
        let key = bucket_key(t.len(), h1 % BUCKETS);
        let rkey = reserve_key(&key);
        // The bucket grows only while its reserve covers the new length
        // (so that taking from it never needs new room): otherwise the
        // reserve grows first, and `Full` there posts nothing.
        let mut rounds = 0;
        loop {
            rounds += 1;
            // Checked inside the update, against the length it appends to.
            // A few rounds settle races with other writers of the bucket;
            // past them, post anyway (the reserve is then re-grown by the
            // next write that finds it short).
            let have = if rounds <= 8 {
                Some(self.dict.value_order(&rkey)?)
            } else {
                None
            };
            let mut short: Option<usize> = None;
            let r = self.dict.read_modify_write(&key, |old| {
                let len = old.map_or(0, <[u8]>::len) + entry.len();
                short = None;
                if let Some(have) = have {
                    if !Space::reserve_covers(&rkey, have, len) {
                        short = Some(len);
                        return Err(declined());
                    }
                }
                let mut v = Vec::with_capacity(len);
                v.extend_from_slice(old.unwrap_or_default());
                v.extend_from_slice(&entry);
                Ok(Op::Set(v))
            });
            match (r, short) {
                (Ok(_), _) => break,
                (Err(_), Some(len)) => self.ensure_reserve(&rkey, len)?,
                (Err(e), None) => return Err(e),
            }
        }
        self.notify(t.len(), h1);
        Ok(())
    }

    /// Removes and returns a tuple matching `p` (Linda's `in`), waiting up to
    /// `timeout` for one to be posted; `None` on timeout. Sleeps on a futex
    /// while waiting ([`Duration::MAX`]: no limit).
    ///
    /// Each tuple is taken by exactly one `take`. If several match, the
    /// oldest of one bucket is taken.
    pub fn take(&self, p: &Pattern, timeout: Duration) -> Result<Option<Tuple>> {
        self.blocking(p, timeout, || Ok(self.try_once(p, None)?.map(|(_, t)| t)))
    }

    /// Removes and returns a tuple matching `p` if there is one now (Linda's
    /// `inp`).
    pub fn try_take(&self, p: &Pattern) -> Result<Option<Tuple>> {
        Ok(self.try_once(p, None)?.map(|(_, t)| t))
    }

    /// Returns a copy of a tuple matching `p`, leaving it in the space
    /// (Linda's `rd`), waiting up to `timeout` for one; `None` on timeout.
    pub fn read(&self, p: &Pattern, timeout: Duration) -> Result<Option<Tuple>> {
        self.blocking(p, timeout, || self.try_read_once(p))
    }

    /// Returns a copy of a tuple matching `p` if there is one now (Linda's
    /// `rdp`).
    pub fn try_read(&self, p: &Pattern) -> Result<Option<Tuple>> {
        self.try_read_once(p)
    }

    /// Like [`take`](Space::take), but the tuple is moved into the inbox
    /// `inbox` (a key of the space) before it leaves the space, so that it
    /// is never lost, even if this process is killed at any instruction:
    /// afterwards it is either still in the space or in the inbox (see the
    /// module docs for the protocol). Read the inbox with
    /// [`inbox`](Space::inbox); a supervisor that finds a worker dead can
    /// re-post what its inbox holds.
    ///
    /// An inbox holds the last tuple moved into it. Use one inbox per
    /// thread at a time (a worker's own name, say): two concurrent
    /// `take_into`s to one inbox can overwrite each other's record.
    pub fn take_into(&self, p: &Pattern, timeout: Duration, inbox: &str) -> Result<Option<Tuple>> {
        if inbox.is_empty() || inbox.len() > MAX_INBOX_NAME {
            return Err(self.invalid(format!(
                "an inbox name has 1 to {MAX_INBOX_NAME} bytes, not {}",
                inbox.len()
            )));
        }
        let Some((id, t)) =
            self.blocking(p, timeout, || self.try_once(p, Some(inbox.as_bytes())))?
        else {
            return Ok(None);
        };
        let key = bucket_key(p.arity(), first_hash(t.get(0)) % BUCKETS);
        let mut record = id.to_bytes().to_vec();
        record.extend_from_slice(&t.encode());
        let rkey = inbox_reserve_key(inbox);
        let recorded = self
            .dict
            .read_modify_write_reserved(&inbox_key(inbox), &rkey, |_| Ok(Op::Set(record.clone())));
        if let Err(e) = recorded {
            // Give the tuple back. Un-claiming shrinks the bucket, which its
            // reserve makes possible in a full arena.
            self.settle(&key, Want::Unclaim(id))?;
            self.notify(t.len(), first_hash(t.get(0)));
            return Err(e);
        }
        // Keep a reserve as large as this record for the inbox's next use
        // (best effort: the record's previous block was just freed).
        let _ = self.edit(&rkey, |old| {
            Ok(match old {
                Some(v) if v.len() >= record.len() => Step::Keep,
                _ => Step::Set(vec![0; record.len()]),
            })
        });
        match self.settle(&key, Want::Finish(id))? {
            Some(_) => Ok(Some(t)),
            None => Err(self.corrupt("a claimed tuple vanished from its bucket")),
        }
    }

    /// The tuple that the last [`take_into`](Space::take_into) to `inbox`
    /// moved there, if any.
    pub fn inbox(&self, inbox: &str) -> Result<Option<Tuple>> {
        match self.dict.get(inbox_key(inbox))? {
            None => Ok(None),
            Some(v) => Ok(Some(self.decode(v.get(16..).unwrap_or_default())?)),
        }
    }

    /// Empties `inbox` and returns what it held. Resolves first a claim
    /// that a dead taker left for this inbox, so the tuple cannot be both
    /// re-posted by the caller and rolled back into the space.
    ///
    /// Also removes the inbox's reserve (see "Full arenas" in the module
    /// docs): an inbox used again starts without one.
    pub fn clear_inbox(&self, inbox: &str) -> Result<Option<Tuple>> {
        let Some(t) = self.inbox(inbox)? else {
            self.dict.remove(inbox_reserve_key(inbox))?;
            return Ok(None);
        };
        if t.len() <= MAX_ARITY {
            let key = bucket_key(t.len(), first_hash(t.get(0)) % BUCKETS);
            self.update_bucket(&key, Want::Recover)?;
        }
        self.dict.remove(inbox_key(inbox))?;
        self.dict.remove(inbox_reserve_key(inbox))?;
        Ok(Some(t))
    }

    /// The number of tuples in the space (including any a `take_into` is
    /// moving out at this moment). Reads every bucket of every arity posted
    /// so far: for monitoring and tests, not hot loops.
    pub fn len(&self) -> Result<usize> {
        let map = self.dict.get(ARITIES_KEY)?.unwrap_or_default();
        let mut n = 0;
        let mut buf = Vec::new();
        for arity in 0..=MAX_ARITY {
            if map.get(arity / 8).is_none_or(|b| b & 1 << (arity % 8) == 0) {
                continue;
            }
            for b in 0..BUCKETS {
                if self.dict.get_into(bucket_key(arity, b), &mut buf)? {
                    for e in bucket::entries(&buf) {
                        e.map_err(|m| self.corrupt(m))?;
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Whether the space holds no tuples.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// This handle's diagnostic counters.
    pub fn stats(&self) -> SpaceStats {
        // Relaxed: statistics.
        SpaceStats {
            scans: self.scans.load(Ordering::Relaxed),
            examined: self.examined.load(Ordering::Relaxed),
            recovered_claims: self.recovered.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Space").field("name", &self.name()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim naming no live handle: the token of an attach entry that was
    /// never claimed (its generation is still 0).
    fn dead_ident() -> u64 {
        (crate::shm::layout::ATTACH_ENTRIES - 1) | 1 << 12
    }

    fn space() -> Space {
        Space::from_dict(ShmDict::on_heap(64, 1 << 20))
    }

    #[test]
    fn space_and_patterns_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Space>();
        check::<Pattern>();
        check::<Tuple>();
    }

    #[test]
    fn dead_claims_roll_back_or_complete_from_the_inbox() {
        let s = space();
        let (t1, t2) = (crate::tuple!("j", 1), crate::tuple!("j", 2));
        let key = bucket_key(2, first_hash(t1.get(0)) % BUCKETS);
        let mut v = Vec::new();
        // Killed after recording into its inbox: the move completed.
        bucket::push(&mut v, Id(1, 1), dead_ident(), b"ib", &t1.encode());
        // Killed before recording: the claim is rolled back.
        bucket::push(&mut v, Id(1, 2), dead_ident(), b"ib2", &t2.encode());
        s.register_arity(2).unwrap();
        s.dict.insert(&key, &v).unwrap();
        let mut record = Id(1, 1).to_bytes().to_vec();
        record.extend_from_slice(&t1.encode());
        s.dict.insert(inbox_key("ib"), record).unwrap();
        assert_eq!(s.len().unwrap(), 2);

        assert_eq!(
            s.try_read(&crate::pattern!("j", _)).unwrap(),
            Some(t2.clone())
        );
        assert_eq!(s.stats().recovered_claims, 2);
        assert_eq!(s.len().unwrap(), 1);
        assert_eq!(s.try_take(&crate::pattern!("j", _)).unwrap(), Some(t2));
        assert!(s.is_empty().unwrap());
        assert_eq!(s.inbox("ib").unwrap(), Some(t1.clone()));
        assert_eq!(s.clear_inbox("ib").unwrap(), Some(t1));
        assert_eq!(s.inbox("ib").unwrap(), None);
    }

    #[test]
    fn live_claims_are_skipped_and_take_into_completes() {
        let s = space();
        let t = crate::tuple!("j", 1);
        let key = bucket_key(2, first_hash(t.get(0)) % BUCKETS);
        let mut v = Vec::new();
        bucket::push(&mut v, Id(1, 1), s.claimant().unwrap(), b"ib", &t.encode());
        s.register_arity(2).unwrap();
        s.dict.insert(&key, &v).unwrap();
        // A live claimant (another thread of ours) is never overruled.
        assert_eq!(s.try_take(&crate::pattern!("j", _)).unwrap(), None);
        assert_eq!(s.try_read(&crate::pattern!(_, _)).unwrap(), None);
        assert_eq!(s.len().unwrap(), 1);
        s.dict.remove(&key).unwrap();

        s.out(t.clone()).unwrap();
        let got = s
            .take_into(&crate::pattern!("j", _), Duration::ZERO, "me")
            .unwrap();
        assert_eq!(got, Some(t.clone()));
        assert_eq!(s.inbox("me").unwrap(), Some(t));
        assert!(s.is_empty().unwrap());
        assert_eq!(s.stats().recovered_claims, 0);
    }

    #[test]
    fn a_corrupt_bucket_is_an_error_not_a_panic() {
        let s = space();
        s.register_arity(2).unwrap();
        let key = bucket_key(2, first_hash(Some(&Field::from("j"))) % BUCKETS);
        // Truncated entries, a huge length, a well-formed entry whose tuple
        // does not decode.
        for (junk, entries_ok) in [
            (&b"x"[..], false),
            (&[0xff; 40][..], false),
            (&[0; 30][..], true),
        ] {
            s.dict.insert(&key, junk).unwrap();
            let r = s.try_take(&crate::pattern!("j", _));
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{junk:?}: {r:?}");
            assert!(s.try_read(&crate::pattern!(_, _)).is_err());
            assert_eq!(s.len().is_ok(), entries_ok);
        }
    }
}
