//! The tuple space's bucket engine: how a bucket's value is read, edited
//! and written back (copy-on-write through the dictionary, with the
//! full-arena reserves and the claims of `take_into`), the wake-up
//! channels, and the scan behind every take and read. `mod.rs` holds the
//! public API and the protocol's description; this file the machinery.

use super::*;

/// What one bucket update does besides resolving dead claims.
#[derive(Clone, Copy)]
pub(super) enum Want<'a> {
    /// Remove the first available match.
    Take(&'a Pattern),
    /// Claim the first available match for this inbox.
    Claim(&'a Pattern, &'a [u8]),
    /// Remove our claimed entry.
    Finish(Id),
    /// Undo our claim.
    Unclaim(Id),
    /// Only resolve dead claims.
    Recover,
}

/// The outcome of a bucket edit.
pub(super) enum Step {
    Keep,
    Set(Vec<u8>),
    Remove,
}

/// Liveness of claimants, cached for one operation. A claim names the
/// claiming handle's attach token, whose liveness the kernel keeps (see
/// `attach.rs`): a claimant in another pid namespace is never taken for dead.
pub(super) struct Liveness<'a> {
    dict: &'a ShmDict,
    cache: HashMap<u64, bool>,
}

impl<'a> Liveness<'a> {
    fn new(dict: &'a ShmDict) -> Liveness<'a> {
        Liveness {
            dict,
            cache: HashMap::new(),
        }
    }

    fn alive(&mut self, claim: u64) -> bool {
        let d = self.dict;
        *self.cache.entry(claim).or_insert_with(|| {
            crate::shm::attach::token_alive(
                &d.region,
                d.me.registered().lock_fd,
                crate::shm::attach::Token(claim),
            )
        })
    }
}

/// A fresh tuple id.
pub(super) fn next_id() -> Id {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    // Relaxed: only uniqueness matters, which fetch_add gives.
    // The process identity (pid and start time) makes ids unique across
    // processes; the sequence, within one.
    Id(
        crate::shm::attach::process_identity(),
        SEQ.fetch_add(1, Ordering::Relaxed), // Relaxed: only uniqueness matters.
    )
}

pub(super) fn bucket_key(arity: usize, bucket: u64) -> Vec<u8> {
    format!("ts1/b/{arity}/{bucket}").into_bytes()
}

/// Hash of a first field (0 for the empty tuple).
pub(super) fn first_hash(first: Option<&Field>) -> u64 {
    first.map_or(0, |f| hash_key(&f.index_bytes()))
}

/// Wake-up hash of the waiters on one (arity, first field).
pub(super) fn wake_first(arity: usize, h1: u64) -> u64 {
    hash_key(format!("ts1/w/{arity}/{h1:016x}").as_bytes())
}

/// Wake-up hash of the waiters on any tuple of an arity.
pub(super) fn wake_arity(arity: usize) -> u64 {
    hash_key(format!("ts1/w/{arity}").as_bytes())
}

pub(super) fn inbox_key(name: &str) -> Vec<u8> {
    [INBOX_PREFIX, name.as_bytes()].concat()
}

/// The reserve key of a bucket key (`ts1/b/..` -> `ts1/r/..`).
pub(super) fn reserve_key(bucket_key: &[u8]) -> Vec<u8> {
    let rest = bucket_key.strip_prefix(b"ts1/b/").unwrap_or(bucket_key);
    [RESERVE_PREFIX.as_bytes(), rest].concat()
}

pub(super) fn inbox_reserve_key(name: &str) -> Vec<u8> {
    [INBOX_RESERVE_PREFIX, name.as_bytes()].concat()
}

/// An error from a read-modify-write closure that means "no change" or
/// "grow the reserve first", told apart by the caller's own flags.
pub(super) fn declined() -> Error {
    Error::InvalidArgument {
        segment: String::new(),
        reason: "no change".into(),
    }
}

impl Space {
    pub(super) fn corrupt(&self, why: impl Into<String>) -> Error {
        Error::corrupt(self.name(), why)
    }

    pub(super) fn invalid(&self, why: String) -> Error {
        Error::InvalidArgument {
            segment: self.name().to_owned(),
            reason: why,
        }
    }

    pub(super) fn check_arity(&self, arity: usize) -> Result<()> {
        if arity > MAX_ARITY {
            return Err(self.invalid(format!(
                "a tuple or pattern has {arity} fields; at most {MAX_ARITY} are supported"
            )));
        }
        Ok(())
    }

    /// Whether tuples of `arity` were ever posted (`ts1/arities`).
    pub(super) fn arity_known(&self, arity: usize) -> Result<bool> {
        let (word, bit) = (arity / 64, 1u64 << (arity % 64));
        // Relaxed: a process-local cache of a bit that is never cleared.
        if self.arities[word].load(Ordering::Relaxed) & bit != 0 {
            return Ok(true);
        }
        let map = self.dict.get(ARITIES_KEY)?.unwrap_or_default();
        self.absorb_arities(&map);
        Ok(self.arities[word].load(Ordering::Relaxed) & bit != 0)
    }

    pub(super) fn absorb_arities(&self, map: &[u8]) {
        for (i, chunk) in map.chunks_exact(8).take(4).enumerate() {
            let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            self.arities[i].fetch_or(w, Ordering::Relaxed); // Relaxed: a cache.
        }
    }

    /// Records `arity` in `ts1/arities` before the first tuple of that arity
    /// is posted, so wildcard scans never miss a posted tuple.
    pub(super) fn register_arity(&self, arity: usize) -> Result<()> {
        if self.arity_known(arity)? {
            return Ok(());
        }
        let stored = self.dict.update(ARITIES_KEY, |old| {
            let mut map = old.map_or_else(|| vec![0; 32], <[u8]>::to_vec);
            map.resize(32, 0);
            map[arity / 8] |= 1 << (arity % 8);
            Some(map)
        })?;
        self.absorb_arities(&stored.unwrap_or_default());
        Ok(())
    }

    /// Atomic read-modify-write of `key` whose `f` may decline to write
    /// (`Step::Keep`). Returns whether it wrote.
    pub(super) fn edit(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<&[u8]>) -> Result<Step>,
    ) -> Result<bool> {
        let mut kept = false;
        let r = self.dict.read_modify_write(key, |old| {
            kept = false;
            match f(old)? {
                Step::Set(v) => Ok(Op::Set(v)),
                Step::Remove => Ok(Op::Remove),
                Step::Keep => {
                    // An error from the closure aborts the update with
                    // nothing written; `kept` tells it from a real error.
                    kept = true;
                    Err(declined())
                }
            }
        });
        match r {
            Ok(_) => Ok(true),
            Err(_) if kept => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Like [`edit`](Space::edit) for a bucket key, but never fails for
    /// lack of room while the bucket has its reserve: a full arena makes
    /// the write draw on the reserve's block
    /// ([`ShmDict::read_modify_write_reserved`]). Afterwards the reserve is
    /// re-created if it was used (from the room the bucket's old block
    /// left), and removed with the bucket.
    pub(super) fn edit_reserved(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<&[u8]>) -> Result<Step>,
    ) -> Result<bool> {
        let rkey = reserve_key(key);
        let mut kept = false;
        let mut new_len: Option<usize> = None;
        let r = self.dict.read_modify_write_reserved(key, &rkey, |old| {
            kept = false;
            match f(old)? {
                Step::Set(v) => {
                    new_len = Some(v.len());
                    Ok(Op::Set(v))
                }
                Step::Remove => {
                    new_len = None;
                    Ok(Op::Remove)
                }
                Step::Keep => {
                    kept = true;
                    Err(declined())
                }
            }
        });
        match r {
            Ok((_, used)) => {
                match new_len {
                    // An emptied bucket needs no reserve. (An `out` racing
                    // with this may find it gone and create it again.)
                    None => {
                        let _ = self.dict.remove(&rkey);
                    }
                    // Best effort: the bucket's old block was just freed.
                    Some(len) if used => {
                        let _ = self.ensure_reserve(&rkey, len);
                    }
                    Some(_) => {}
                }
                Ok(true)
            }
            Err(_) if kept => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the reserve `rkey` large enough for a bucket of `len` bytes
    /// plus a claim ([`CLAIM_SLACK`]). `Full` if there is no room for it.
    pub(super) fn ensure_reserve(&self, rkey: &[u8], len: usize) -> Result<()> {
        let want = len + CLAIM_SLACK;
        self.edit(rkey, |old| {
            Ok(match old {
                Some(v) if v.len() >= want => Step::Keep,
                _ => Step::Set(vec![0; want]),
            })
        })
        .map(|_| ())
    }

    /// Whether the reserve `rkey` is large enough for a bucket of `len`
    /// bytes (`have`: its current block order).
    pub(super) fn reserve_covers(rkey: &[u8], have: Option<u32>, len: usize) -> bool {
        match (
            have,
            crate::shm::layout::order_for(rkey.len(), len + CLAIM_SLACK),
        ) {
            (Some(have), Some(need)) => need <= have,
            _ => false,
        }
    }

    /// Whether inbox `name` records the entry `id` (a claim that completed
    /// its record step).
    pub(super) fn inbox_holds(&self, name: &[u8], id: Id) -> Result<bool> {
        let key = [INBOX_PREFIX, name].concat();
        Ok(self
            .dict
            .get(key)?
            .is_some_and(|v| Id::from_bytes(&v) == Some(id)))
    }

    pub(super) fn decode(&self, bytes: &[u8]) -> Result<Tuple> {
        Tuple::decode_stored(bytes).ok_or_else(|| self.corrupt("a stored tuple does not decode"))
    }

    /// Builds the new value of a bucket for `want`, resolving claims of dead
    /// processes on the way. `picked` receives the entry taken or claimed.
    ///
    /// Entries are visited oldest first and the visit stops once `want` is
    /// done: the rest of the value is copied as it is, so taking from the
    /// front of a long bucket parses one entry. Dead claims behind that
    /// point are resolved by a later visit that reaches them (every search
    /// that finds nothing visits the whole bucket).
    pub(super) fn edit_bucket(
        &self,
        cur: Option<&[u8]>,
        want: Want<'_>,
        live: &mut Liveness<'_>,
        picked: &mut Option<(Id, Tuple)>,
        resolved: &mut u64,
    ) -> Result<Step> {
        *picked = None;
        *resolved = 0;
        let Some(cur) = cur else {
            return Ok(Step::Keep);
        };
        let me = self.claimant()?;
        // The new value is `out` followed by `cur[copied..]`.
        let mut out = Vec::new();
        let mut copied = 0;
        let mut changed = false;
        for e in bucket::entries(cur) {
            let e = e.map_err(|m| self.corrupt(m))?;
            let mut new: Option<Entry<'_>> = Some(e);
            let mut done = false;
            if e.claim != 0 && e.claim != me && !live.alive(e.claim) {
                *resolved += 1;
                if !e.inbox.is_empty() && self.inbox_holds(e.inbox, e.id)? {
                    new = None; // the move completed: the tuple is in the inbox
                } else {
                    new = Some(Entry {
                        claim: 0,
                        inbox: &[],
                        ..e
                    });
                }
            }
            if let Some(n) = new {
                match want {
                    Want::Take(p) | Want::Claim(p, _) if n.claim == 0 => {
                        let t = self.decode(n.tuple)?;
                        self.examined.fetch_add(1, Ordering::Relaxed); // Relaxed: a statistic.
                        if p.matches(&t) {
                            *picked = Some((n.id, t));
                            done = true;
                            new = match want {
                                Want::Claim(_, inbox) => Some(Entry {
                                    claim: me,
                                    inbox,
                                    ..n
                                }),
                                _ => None,
                            };
                        }
                    }
                    Want::Finish(id) if n.id == id && n.claim == me => {
                        *picked = Some((n.id, self.decode(n.tuple)?));
                        done = true;
                        new = None;
                    }
                    Want::Unclaim(id) if n.id == id && n.claim == me => {
                        done = true;
                        new = Some(Entry {
                            claim: 0,
                            inbox: &[],
                            ..n
                        });
                    }
                    _ => {}
                }
            }
            let unchanged = matches!(new, Some(n) if n.claim == e.claim && n.inbox == e.inbox);
            if !unchanged {
                changed = true;
                out.extend_from_slice(&cur[copied..e.start]);
                if let Some(n) = new {
                    bucket::push_entry(&mut out, &n);
                }
                copied = e.end;
            }
            if done {
                break;
            }
        }
        if !changed {
            return Ok(Step::Keep);
        }
        out.extend_from_slice(&cur[copied..]);
        Ok(if out.is_empty() {
            Step::Remove
        } else {
            Step::Set(out)
        })
    }

    /// Runs one bucket update; returns the picked entry.
    pub(super) fn update_bucket(&self, key: &[u8], want: Want<'_>) -> Result<Option<(Id, Tuple)>> {
        let mut live = Liveness::new(&self.dict);
        let mut picked = None;
        let mut resolved = 0;
        let wrote = self.edit_reserved(key, |cur| {
            self.edit_bucket(cur, want, &mut live, &mut picked, &mut resolved)
        })?;
        if !wrote {
            return Ok(None);
        }
        if resolved > 0 {
            // Relaxed: a statistic.
            self.recovered.fetch_add(resolved, Ordering::Relaxed);
            // Rolled-back claims made tuples available again.
            self.wake_bucket_waiters(key)?;
        }
        Ok(picked)
    }

    /// Wakes every waiter that a tuple in bucket `key` could concern.
    pub(super) fn wake_bucket_waiters(&self, key: &[u8]) -> Result<()> {
        let mut buf = Vec::new();
        if !self.dict.get_into(key, &mut buf)? {
            return Ok(());
        }
        for e in bucket::entries(&buf) {
            let e = e.map_err(|m| self.corrupt(m))?;
            if e.claim == 0 {
                let t = self.decode(e.tuple)?;
                self.notify(t.len(), first_hash(t.get(0)));
            }
        }
        Ok(())
    }

    pub(super) fn notify(&self, arity: usize, h1: u64) {
        crate::dict::wait::notify(&self.dict.region, wake_first(arity, h1));
        crate::dict::wait::notify(&self.dict.region, wake_arity(arity));
    }

    /// The buckets a pattern must look at.
    pub(super) fn buckets_of(&self, p: &Pattern) -> Result<std::ops::Range<u64>> {
        self.check_arity(p.arity())?;
        Ok(match p.exact_first() {
            Some(first) => {
                let b = first_hash(first) % BUCKETS;
                b..b + 1
            }
            None if self.arity_known(p.arity())? => 0..BUCKETS,
            None => 0..0,
        })
    }

    pub(super) fn wake_hash_of(p: &Pattern) -> u64 {
        match p.exact_first() {
            Some(first) => wake_first(p.arity(), first_hash(first)),
            None => wake_arity(p.arity()),
        }
    }

    /// One attempt at `want` over the pattern's buckets.
    pub(super) fn try_once(
        &self,
        p: &Pattern,
        claim_inbox: Option<&[u8]>,
    ) -> Result<Option<(Id, Tuple)>> {
        self.scans.fetch_add(1, Ordering::Relaxed); // Relaxed: a statistic.
        let buckets = self.buckets_of(p)?;
        let wildcard = buckets.end - buckets.start > 1;
        for b in buckets {
            let key = bucket_key(p.arity(), b);
            // Most of a wildcard's 64 buckets are usually absent: a read
            // (no write gate, no fence) skips them.
            if wildcard && !self.dict.contains_key(&key)? {
                continue;
            }
            let want = match claim_inbox {
                Some(inbox) => Want::Claim(p, inbox),
                None => Want::Take(p),
            };
            if let Some(found) = self.update_bucket(&key, want)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// What this process's claims of tuples say: its handle's attach token
    /// (registered first in a forked child).
    pub(super) fn claimant(&self) -> Result<u64> {
        Ok(self.dict.registration()?.local.token.0)
    }

    /// One attempt at a read.
    pub(super) fn try_read_once(&self, p: &Pattern) -> Result<Option<Tuple>> {
        self.scans.fetch_add(1, Ordering::Relaxed); // Relaxed: a statistic.
        let mut buf = Vec::new();
        let me = self.claimant()?;
        let mut live = Liveness::new(&self.dict);
        for b in self.buckets_of(p)? {
            let key = bucket_key(p.arity(), b);
            for round in 0..2 {
                if !self.dict.get_into(&key, &mut buf)? {
                    break;
                }
                let mut dead_claims = false;
                for e in bucket::entries(&buf) {
                    let e = e.map_err(|m| self.corrupt(m))?;
                    if e.claim != 0 {
                        dead_claims |= e.claim != me && !live.alive(e.claim);
                        continue;
                    }
                    let t = self.decode(e.tuple)?;
                    self.examined.fetch_add(1, Ordering::Relaxed); // Relaxed: a statistic.
                    if p.matches(&t) {
                        return Ok(Some(t));
                    }
                }
                if !dead_claims || round == 1 {
                    break;
                }
                // A dead claim may hide a match: resolve it, then look again.
                self.update_bucket(&key, Want::Recover)?;
            }
        }
        Ok(None)
    }

    /// Sleeps on the pattern's wake-up channel until `op` finds something
    /// or `timeout` passes.
    pub(super) fn blocking<T>(
        &self,
        p: &Pattern,
        timeout: Duration,
        op: impl FnMut() -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        self.check_arity(p.arity())?;
        let deadline = Instant::now().checked_add(timeout);
        crate::dict::wait::wait_until(&self.dict.region, Space::wake_hash_of(p), deadline, op)
    }

    /// Runs the finish or un-claim step of a `take_into`, which must not
    /// leave the tuple claimed by this (live) process. Both shrink the
    /// bucket, so its reserve lets them through a full arena; the reserve
    /// can only be missing when another process's write took the room
    /// freed meanwhile, so `Full` is retried (for up to about a second,
    /// while takes elsewhere free room) before it is returned.
    pub(super) fn settle(&self, key: &[u8], want: Want<'_>) -> Result<Option<(Id, Tuple)>> {
        let mut tries = 0;
        loop {
            match self.update_bucket(key, want) {
                Err(Error::Full { .. }) if tries < SETTLE_TRIES => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }
}
