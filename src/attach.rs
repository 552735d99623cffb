//! The attach table: who is using a segment, and owner tokens for locks.
//!
//! Every open handle claims one entry of the table in the segment header.
//! Anything a handle holds in the segment (a slot being written, a bucket's
//! insert lock, the defragmentation lock) is marked with the handle's
//! [`Token`], so another process that finds it held for long can ask whether
//! the holder still lives and, if not, take it over.
//!
//! Entry `i` (64 bytes at `HEADER_BYTES + 64 * i`, a cache line each):
//!
//! | word | bits   | meaning                                             |
//! |------|--------|-----------------------------------------------------|
//! | 0    | 0..23  | pid of the attached process (0 = entry free)        |
//! | 0    | 23..64 | its start time in clock ticks after boot, truncated |
//! | 1    | 0..64  | generation, incremented on every claim              |
//! | 2    | 0..64  | write operations of this handle in flight (`gate`)  |
//! | 3    | 0..64  | dictionaries: generation epoch (`generation >> 11`) whose slots were swept (`index::sweep_slots_on_attach`) |
//! | 4..8 |        | reserved (zero; `Value`/`Array` segments use word 4) |
//!
//! A [`Token`] names the handle that holds something:
//!
//! | bits   | meaning                                          |
//! |--------|--------------------------------------------------|
//! | 0..12  | attach index                                     |
//! | 12..62 | generation mod 2^50                              |
//!
//! 62 bits: a lock word is `HELD (bit 63) | token`, bit 62 always clear. A
//! token whose generation no longer matches its entry belongs to a handle
//! that is gone; 2^50 claims of one entry (a claim per microsecond for 35
//! years) would be needed before a dead holder looked alive again.
//!
//! A slot's control word has room for only 23 bits of owner
//! ([`Token::short`]: index and generation mod 2^11), so 2,048 claims of an
//! entry make its short tokens repeat. The claimer of a dictionary entry
//! therefore releases every slot still WRITING under that entry's index
//! whenever the generation enters a new epoch of 2^11 claims, before it uses
//! its token (`index::sweep_slots_on_attach`): a slot's short owner then
//! never names a live handle it does not belong to.

use crate::layout::{ATTACH_ENTRIES, ATTACH_ENTRY_BYTES, HEADER_BYTES};
use crate::region::Region;
use crate::sync::{AtomicU64, Ordering};

/// Byte offset, inside an entry, of the count of write operations in flight.
pub(crate) const E_ACTIVE: u64 = 16;

const PID_BITS: u32 = 23;
const PID_MASK: u64 = (1 << PID_BITS) - 1;
/// Mask applied to start times before storing them.
pub(crate) const START_MASK: u64 = (1 << (64 - PID_BITS)) - 1;
const INDEX_BITS: u32 = 12;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const GEN_BITS: u32 = 50;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
/// Number of bits a token occupies (see the module docs).
pub(crate) const TOKEN_BITS: u32 = INDEX_BITS + GEN_BITS;
/// Generation bits of a [`Token::short`].
pub(crate) const SHORT_GEN_BITS: u32 = 11;
/// Number of bits a short token (a slot's owner) occupies.
pub(crate) const SHORT_TOKEN_BITS: u32 = INDEX_BITS + SHORT_GEN_BITS;
const SHORT_MASK: u64 = (1 << SHORT_TOKEN_BITS) - 1;
const _: () = assert!(ATTACH_ENTRIES <= 1 << INDEX_BITS);
const _: () = assert!(TOKEN_BITS <= 62, "a lock word is HELD (bit 63) | token");
/// Offset, inside an entry, of the generation epoch whose slots were swept.
pub(crate) const E_SWEPT: u64 = 24;

/// Names the handle that holds something in the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token(pub(crate) u64);

impl Token {
    fn new(index: u64, generation: u64) -> Token {
        Token(index | (generation & GEN_MASK) << INDEX_BITS)
    }
    pub(crate) fn index(self) -> u64 {
        self.0 & INDEX_MASK
    }
    fn generation(self) -> u64 {
        self.0 >> INDEX_BITS
    }
    /// The generation epoch: which run of 2^11 claims of the entry the
    /// token belongs to (see the module docs).
    pub(crate) fn epoch(self) -> u64 {
        self.generation() >> SHORT_GEN_BITS
    }
    /// The token truncated to the 23 bits a slot's control word holds:
    /// index and generation mod 2^11.
    pub(crate) fn short(self) -> u64 {
        self.0 & SHORT_MASK
    }
}

/// The attach index a short token (see [`Token::short`]) names.
pub(crate) fn short_index(short: u64) -> u64 {
    short & INDEX_MASK
}

/// Whether the handle a short token names is still attached and alive: the
/// entry's generation agrees mod 2^11 and [`token_alive`] says so for the
/// full token. Short tokens that name no valid entry count as dead.
pub(crate) fn short_token_alive(r: &Region, short: u64) -> bool {
    let index = short_index(short);
    let Some(gen) = r.word(entry_off(index) + 8) else {
        return false;
    };
    // Acquire: pairs with the claim in `attach`.
    let full = Token::new(index, gen.load(Ordering::Acquire));
    full.short() == short & SHORT_MASK && token_alive(r, full)
}

/// The handle on whose behalf this process takes slots and lock words: its
/// token, and the holds its threads have in flight.
///
/// All threads of a handle put the same token into the words they hold, so
/// a word naming our token may be held by another thread of ours (wait for
/// it) or may merely *name* our token because the segment was corrupted
/// (nobody will ever release it: release it ourselves, or a waiter waits for
/// itself forever). The process-local `holds` word tells them apart, and
/// lets a thread release such a word without racing with its own threads:
///
/// | bits   | meaning                                                    |
/// |--------|------------------------------------------------------------|
/// | 0..63  | holds in flight: threads between `begin_hold` and `end_hold` |
/// | 63     | `CLEARING`: a thread is releasing a word that names our token |
///
/// [`Holder::release_own`] sets `CLEARING` only from 0 (no thread of ours
/// holds anything), and while it is set no thread of ours can begin a hold
/// (`begin_hold` backs out and waits). So between the two, no word naming
/// our token is held by a thread of ours, and the CAS that releases one
/// cannot hit a hold that began after the check. (Reading "count is 0" and
/// then CASing the word, as before issue 10, raced: another thread could
/// unlock and relock the same word in between, the word's value was the
/// same, and two threads held it.)
#[derive(Debug)]
pub(crate) struct Holder {
    pub(crate) token: Token,
    /// Process-local, never in the segment. See the table above.
    holds: AtomicU64,
}

/// Bit of `Holder::holds`: a word naming our token is being released.
const CLEARING: u64 = 1 << 63;

impl Holder {
    pub(crate) fn new(token: Token) -> Holder {
        Holder {
            token,
            holds: AtomicU64::new(0),
        }
    }

    /// The free-list shard this handle prefers.
    pub(crate) fn shard(&self) -> u64 {
        self.token.index() % crate::layout::FREE_SHARDS
    }

    /// Call before trying to take a word for this handle. Waits while
    /// another thread of this handle releases a word naming our token.
    #[inline]
    pub(crate) fn begin_hold(&self) {
        loop {
            // Acquire: pairs with the Release that ends `release_own`, so
            // the word it released is seen released by our CAS that follows.
            let before = self.holds.fetch_add(1, Ordering::Acquire);
            if before & CLEARING == 0 {
                return;
            }
            self.back_out();
        }
    }

    #[cold]
    fn back_out(&self) {
        // Relaxed: this increment granted nothing; `release_own` ignores
        // the count while CLEARING is set.
        self.holds.fetch_sub(1, Ordering::Relaxed);
        // Relaxed: a hint; the fetch_add in `begin_hold` decides.
        while self.holds.load(Ordering::Relaxed) & CLEARING != 0 {
            crate::sync::spin_hint();
        }
    }

    /// Call after releasing a word, or after failing to take it.
    #[inline]
    pub(crate) fn end_hold(&self) {
        // Release: pairs with the Acquire CAS of `release_own`: the word's
        // release, made before this, is visible to its CAS of the word.
        self.holds.fetch_sub(1, Ordering::Release);
    }

    /// Runs `release` (a CAS of a word naming our token, from the value
    /// seen, to its released value) if no thread of this handle holds
    /// anything, with every thread of this handle kept from beginning a hold
    /// meanwhile. Returns what `release` returned, or `false` if some thread
    /// of ours holds something (then the word may be one of its holds).
    pub(crate) fn release_own(&self, release: impl FnOnce() -> bool) -> bool {
        // Acquire: pairs with the Release of `end_hold`, so every hold of
        // ours that ended (and the word it released) is visible.
        if self
            .holds
            .compare_exchange(0, CLEARING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let released = release();
        // Release: pairs with the Acquire of `begin_hold`: our CAS of the
        // word happens before any later hold of ours.
        self.holds.fetch_sub(CLEARING, Ordering::Release);
        released
    }
}

/// Releases something `t` holds, through `release` (a CAS from the value
/// seen), if its holder can no longer release it: a dead or detached handle,
/// or our own handle when none of its threads holds anything (see
/// [`Holder::release_own`]). Returns whether `release` ran and succeeded.
pub(crate) fn release_if_dead(
    r: &Region,
    me: &Holder,
    t: Token,
    release: impl FnOnce() -> bool,
) -> bool {
    if t == me.token {
        me.release_own(release)
    } else {
        !token_alive(r, t) && release()
    }
}

/// [`release_if_dead`] for a slot's owner, a short token (see
/// [`Token::short`]).
pub(crate) fn release_slot_if_dead(
    r: &Region,
    me: &Holder,
    short: u64,
    release: impl FnOnce() -> bool,
) -> bool {
    if short == me.token.short() {
        me.release_own(release)
    } else {
        !short_token_alive(r, short) && release()
    }
}

/// This process's identity word (pid and start time), read once per
/// process: the cache is keyed by the pid, so a child forked after the first
/// call reads its own identity instead of inheriting its parent's (which
/// would make what it holds look alive for as long as the parent lives).
#[cfg(not(loom))]
pub(crate) fn process_identity() -> u64 {
    static IDENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let pid = std::process::id();
    // Relaxed: a per-process cache of an immutable fact; a value cached by
    // another process (before a fork) is recognized by its pid.
    let cached = IDENT.load(std::sync::atomic::Ordering::Relaxed);
    if cached != 0 && cached & PID_MASK == pid as u64 & PID_MASK {
        return cached;
    }
    let (pid, start) = crate::sys::self_identity();
    let w = identity_word(pid, start);
    IDENT.store(w, std::sync::atomic::Ordering::Relaxed); // Relaxed: as above.
    w
}

/// Under loom every handle belongs to one live "process" (see
/// [`identity_alive`]).
#[cfg(loom)]
pub(crate) fn process_identity() -> u64 {
    1
}

/// The identity word of an attach entry.
pub(crate) fn identity_word(pid: u32, start_ticks: u64) -> u64 {
    (pid as u64 & PID_MASK) | (start_ticks & START_MASK) << PID_BITS
}

pub(crate) fn entry_off(index: u64) -> u64 {
    HEADER_BYTES + index * ATTACH_ENTRY_BYTES
}

/// Under loom every non-zero identity is alive except this one, which the
/// models write into the attach entry of a handle whose process "was
/// killed" (see `__loom` in `lib.rs`).
#[cfg(loom)]
pub(crate) const LOOM_DEAD_IDENTITY: u64 = u64::MAX;

/// Whether the process named by an identity word still runs.
pub(crate) fn identity_alive(ident: u64) -> bool {
    if ident == 0 {
        return false;
    }
    #[cfg(loom)]
    {
        ident != LOOM_DEAD_IDENTITY
    }
    #[cfg(not(loom))]
    {
        crate::sys::process_alive((ident & PID_MASK) as u32, ident >> PID_BITS, START_MASK)
    }
}

/// Claims a free entry for a handle of the process `ident`. If the table is
/// full, entries of dead processes are reclaimed first. `None` if every entry
/// belongs to a live process.
pub(crate) fn attach(r: &Region, ident: u64) -> Option<(u64, Token)> {
    for reclaim_dead in [false, true] {
        for i in 0..ATTACH_ENTRIES {
            let w = r.word(entry_off(i))?;
            let cur = w.load(Ordering::Relaxed); // Relaxed: a hint; the CAS decides.
            let claimable = cur == 0 || (reclaim_dead && !identity_alive(cur));
            // AcqRel: pairs with the Release of `detach` and of other claims, so
            // the generation read below is the latest.
            if claimable
                && w.compare_exchange(cur, ident, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                // AcqRel: the generation counter orders claims of this entry.
                let gen = r.word(entry_off(i) + 8)?.fetch_add(1, Ordering::AcqRel) + 1;
                // A dead previous owner may have died inside write operations.
                // Relaxed: published by our first gate entry (SeqCst).
                r.word(entry_off(i) + E_ACTIVE)?.store(0, Ordering::Relaxed);
                return Some((i, Token::new(i, gen)));
            }
        }
    }
    None
}

/// Releases the entry claimed by [`attach`].
pub(crate) fn detach(r: &Region, index: u64, ident: u64) {
    if let Some(w) = r.word(entry_off(index)) {
        // Release: pairs with the AcqRel claim of the next owner. The CAS keeps
        // an entry that was reclaimed meanwhile (we were thought dead) intact.
        let _ = w.compare_exchange(ident, 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// Whether the handle named by `token` is still attached and its process
/// still runs. Tokens that name no valid entry count as dead (they can only
/// come from a corrupted segment), so their holds are taken over.
pub(crate) fn token_alive(r: &Region, token: Token) -> bool {
    if token.index() >= ATTACH_ENTRIES {
        return false;
    }
    let off = entry_off(token.index());
    let (Some(ident), Some(gen)) = (r.word(off), r.word(off + 8)) else {
        return false;
    };
    // Acquire: pairs with the claim in `attach`.
    let gen = gen.load(Ordering::Acquire);
    if gen & GEN_MASK != token.generation() {
        return false;
    }
    identity_alive(ident.load(Ordering::Acquire))
}

/// Number of entries whose process is alive, and the dead ones.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn census(r: &Region) -> (u64, u64) {
    let (mut live, mut dead) = (0, 0);
    for i in 0..ATTACH_ENTRIES {
        let Some(w) = r.word(entry_off(i)) else { break };
        let ident = w.load(Ordering::Relaxed); // Relaxed: a statistic.
        if ident == 0 {
            continue;
        }
        if identity_alive(ident) {
            live += 1;
        } else {
            dead += 1;
        }
    }
    (live, dead)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::layout::INDEX_OFF;

    #[test]
    fn claim_release_and_generations() {
        let r = Region::heap(INDEX_OFF as usize);
        let (pid, start) = crate::sys::self_identity();
        let me = identity_word(pid, start);
        let (i, t) = attach(&r, me).unwrap();
        let (j, u) = attach(&r, me).unwrap();
        assert_ne!(i, j);
        assert!(token_alive(&r, t) && token_alive(&r, u));
        detach(&r, i, me);
        assert!(!token_alive(&r, t), "a released entry's token is dead");
        let (k, v) = attach(&r, me).unwrap();
        assert_eq!(k, i, "the free entry is reused");
        assert_ne!(v, t, "with a new generation");
        assert!(!token_alive(&r, t) && token_alive(&r, v));
        assert_eq!(census(&r), (2, 0));
    }

    #[test]
    fn dead_entries_are_reclaimed_when_full() {
        let r = Region::heap(INDEX_OFF as usize);
        let dead = identity_word(pid_of_exited_child(), 12345);
        for i in 0..ATTACH_ENTRIES {
            r.word(entry_off(i)).unwrap().store(dead, Ordering::Relaxed);
        }
        assert_eq!(census(&r), (0, ATTACH_ENTRIES));
        let (pid, start) = crate::sys::self_identity();
        let (_, t) = attach(&r, identity_word(pid, start)).unwrap();
        assert!(token_alive(&r, t));
    }

    fn pid_of_exited_child() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }
}
