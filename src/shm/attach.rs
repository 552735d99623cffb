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
//! | 3    | 0..64  | inode of the process's pid namespace (0: unknown)   |
//! | 4..8 |        | per kind of segment: a dictionary's key count and   |
//! |      |        | pending change (words 4, 5: `livecount.rs`, kept    |
//! |      |        | when the entry is claimed again) and the generation |
//! |      |        | epoch whose slots were swept (word 6,               |
//! |      |        | `index::sweep_slots_on_attach`); an `Array`'s       |
//! |      |        | shared holds (word 4: `rwlock.rs`)                  |
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
//!
//! # Who is alive: facts the kernel keeps
//!
//! The owner of entry `i` holds an exclusive OFD lock on byte `1 + i` of the
//! segment file through its handle's own open file description
//! (`sys/ofd.rs`), taken *before* it writes the entry and released after it
//! clears it. The kernel releases the lock when the owner's description is
//! closed, so when its process dies, in whatever pid namespace, with
//! whatever /proc visibility. So:
//!
//! - claiming entry `i` *is* taking that lock (never waiting): whoever gets
//!   it owns the entry, and whatever the entry still says belongs to a dead
//!   or departed owner;
//! - an entry is alive while another description holds its byte; free means
//!   dead. The pid and start time are only a second opinion that can declare
//!   death, never life: when they *prove* the owner exited (same pid
//!   namespace, and `kill(pid, 0)` says no such process or the pid was
//!   reused; see `sys::process_gone`), the entry is dead even if its lock is
//!   still held (a forked child that could not be given its own
//!   description still holds the parent's). "Cannot tell" is never "dead".
//!
//! Regions without a file (heap regions in unit tests) use the second
//! opinion alone; loom models use [`LOOM_DEAD_IDENTITY`].

use crate::shm::layout::{ATTACH_ENTRIES, ATTACH_ENTRY_BYTES, HEADER_BYTES};
use crate::shm::region::Region;
use crate::sync::{AtomicU64, Ordering};

/// Byte offset, inside an entry, of the count of write operations in flight.
pub(crate) const E_ACTIVE: u64 = 16;
/// Byte offset, inside an entry, of the owner's pid namespace inode.
pub(crate) const E_PIDNS: u64 = 24;
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
pub(crate) const E_SWEPT: u64 = 48;

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
pub(crate) fn short_token_alive(r: &Region, fd: LockFd, short: u64) -> bool {
    let index = short_index(short);
    let Some(gen) = r.word(entry_off(index) + 8) else {
        return false;
    };
    // Acquire: pairs with the claim in `attach`.
    let full = Token::new(index, gen.load(Ordering::Acquire));
    full.short() == short & SHORT_MASK && token_alive(r, fd, full)
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
    /// How this handle asks the kernel about other entries.
    pub(crate) lock_fd: LockFd,
    /// Process-local, never in the segment. See the table above.
    holds: AtomicU64,
    /// Threads of this handle using its count record (`livecount.rs`), by
    /// the same rule as `holds`: a thread that finds the record BUSY while
    /// this is 1 (itself) knows the word is corrupted, not in use.
    /// Process-local.
    pub(crate) record_users: AtomicU64,
}

/// A handle's view of the entries' OFD locks: its own open file description
/// of the segment (none for heap regions and loom models) and its own entry,
/// which it never asks about (the kernel does not report a description's own
/// locks to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockFd {
    #[cfg(not(loom))]
    fd: Option<std::os::fd::RawFd>,
    own: u64,
}

impl LockFd {
    /// No file: liveness from the pid check alone (heap regions, loom).
    pub(crate) const NONE: LockFd = LockFd {
        #[cfg(not(loom))]
        fd: None,
        own: u64::MAX,
    };

    /// The descriptor `fd` of a handle whose entry is `own` (`u64::MAX`: none).
    ///
    /// The descriptor must stay open for as long as this value is used.
    #[cfg(not(loom))]
    pub(crate) fn new(fd: std::os::fd::RawFd, own: u64) -> LockFd {
        LockFd { fd: Some(fd), own }
    }

    #[cfg(not(loom))]
    fn borrowed(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // SAFETY: `new`'s caller keeps the descriptor open while this value
        // is used (a handle keeps its file for as long as its holders live).
        self.fd
            .map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
    }
}

/// Bit of `Holder::holds`: a word naming our token is being released.
const CLEARING: u64 = 1 << 63;

impl Holder {
    #[cfg(any(test, loom))]
    pub(crate) fn new(token: Token) -> Holder {
        Holder::with_lock_fd(token, LockFd::NONE)
    }

    pub(crate) fn with_lock_fd(token: Token, lock_fd: LockFd) -> Holder {
        Holder {
            token,
            lock_fd,
            holds: AtomicU64::new(0),
            record_users: AtomicU64::new(0),
        }
    }

    /// The free-list shard this handle prefers.
    pub(crate) fn shard(&self) -> u64 {
        self.token.index() % crate::shm::layout::FREE_SHARDS
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
        !token_alive(r, me.lock_fd, t) && release()
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
        !short_token_alive(r, me.lock_fd, short) && release()
    }
}

/// This process's identity word (pid and start time), read once per
/// process: the cache is keyed by the pid, so a child forked after the first
/// call reads its own identity instead of inheriting its parent's (which
/// would make what it holds look alive for as long as the parent lives).
#[cfg(not(loom))]
pub(crate) fn process_identity() -> u64 {
    static IDENT: crate::sync::local::AtomicU64 = crate::sync::local::AtomicU64::new(0);
    let pid = std::process::id();
    // Relaxed: a per-process cache of an immutable fact; a value cached by
    // another process (before a fork) is recognized by its pid.
    let cached = IDENT.load(crate::sync::local::Ordering::Relaxed);
    if cached != 0 && cached & PID_MASK == pid as u64 & PID_MASK {
        return cached;
    }
    let (pid, start) = crate::sys::self_identity();
    let w = identity_word(pid, start);
    IDENT.store(w, crate::sync::local::Ordering::Relaxed); // Relaxed: as above.
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

/// Whether the process named by an identity word may still run: `false`
/// only if it provably exited (see `sys::process_gone`; `ns` is the pid
/// namespace its entry records). For regions without a file.
pub(crate) fn identity_alive(ident: u64, ns: u64) -> bool {
    if ident == 0 {
        return false;
    }
    #[cfg(loom)]
    {
        let _ = ns;
        ident != LOOM_DEAD_IDENTITY
    }
    #[cfg(not(loom))]
    {
        !crate::sys::process_gone((ident & PID_MASK) as u32, ident >> PID_BITS, START_MASK, ns)
    }
}

/// Whether entry `index` belongs to a live handle (see the module doc): its
/// byte is locked by another open file description and its process did not
/// provably exit. The asker's own entry is alive.
pub(crate) fn entry_alive(r: &Region, fd: LockFd, index: u64) -> bool {
    let off = entry_off(index);
    let Some(w) = r.word(off) else { return false };
    // Acquire: pairs with the claim in `attach`.
    let ident = w.load(Ordering::Acquire);
    if ident == 0 {
        return false;
    }
    if index == fd.own {
        return true;
    }
    // Relaxed: written with the claim, before the identity's Release.
    let ns = r
        .word(off + E_PIDNS)
        .map_or(0, |w| w.load(Ordering::Relaxed));
    #[cfg(not(loom))]
    if let Some(f) = fd.borrowed() {
        return match crate::sys::ofd::held_by_other(f, crate::sys::ofd::entry_byte(index)) {
            Ok(false) => false,
            // Held, or the kernel would not say: alive unless proven gone.
            Ok(true) | Err(_) => identity_alive(ident, ns),
        };
    }
    identity_alive(ident, ns)
}

/// Claims a free entry for a handle of the process `ident` whose open file
/// description of the segment is `fd` (see the module doc). Entries of dead
/// processes are reclaimed. `None` if every entry belongs to a live handle.
pub(crate) fn attach(r: &Region, fd: LockFd, ident: u64) -> Option<(u64, Token)> {
    #[cfg(not(loom))]
    let ns = crate::sys::pid_namespace();
    #[cfg(loom)]
    let ns = 1;
    for reclaim_dead in [false, true] {
        for i in 0..ATTACH_ENTRIES {
            let w = r.word(entry_off(i))?;
            let cur = w.load(Ordering::Relaxed); // Relaxed: a hint; the claim decides.
            if cur != 0 && !reclaim_dead {
                continue;
            }
            if !claim(r, fd, w, i, cur) {
                continue;
            }
            // Relaxed: published by the Release store of the identity below.
            r.word(entry_off(i) + E_PIDNS)?.store(ns, Ordering::Relaxed);
            // A dead previous owner may have died inside write operations.
            // Relaxed: published by our first gate entry (SeqCst).
            r.word(entry_off(i) + E_ACTIVE)?.store(0, Ordering::Relaxed);
            // Release: the entry's other words (above) happen before the
            // identity that askers read with Acquire.
            w.store(ident, Ordering::Release);
            // AcqRel: the generation counter orders claims of this entry; a
            // token checker reads it with Acquire.
            let gen = r.word(entry_off(i) + 8)?.fetch_add(1, Ordering::AcqRel) + 1;
            return Some((i, Token::new(i, gen)));
        }
    }
    None
}

/// Takes entry `i` (whose word was `cur`) for a new owner: its OFD lock, or
/// without a file a CAS of the word from a free or dead value.
fn claim(r: &Region, fd: LockFd, w: &AtomicU64, i: u64, cur: u64) -> bool {
    #[cfg(loom)]
    let _ = fd;
    #[cfg(not(loom))]
    if let Some(f) = fd.borrowed() {
        return crate::sys::ofd::try_lock(f, crate::sys::ofd::entry_byte(i), true).unwrap_or(false);
    }
    let ns = r
        .word(entry_off(i) + E_PIDNS)
        .map_or(0, |w| w.load(Ordering::Relaxed)); // Relaxed: a hint.
    let claimable = cur == 0 || !identity_alive(cur, ns);
    // AcqRel: pairs with the Release of `detach` and of other claims. The
    // value stored is a placeholder until `attach` stores the identity: any
    // non-zero value keeps other claimers off.
    claimable
        && w.compare_exchange(cur, u64::MAX - 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
}

/// Releases the entry claimed by [`attach`]: clears the identity (a CAS, so
/// an entry reclaimed meanwhile, when we were wrongly thought dead, stays
/// intact), then the entry's OFD lock.
pub(crate) fn detach(r: &Region, fd: LockFd, index: u64, ident: u64) {
    if let Some(w) = r.word(entry_off(index)) {
        // Release: pairs with the Acquire of the next owner's claim.
        let _ = w.compare_exchange(ident, 0, Ordering::Release, Ordering::Relaxed);
    }
    #[cfg(not(loom))]
    if let Some(f) = fd.borrowed() {
        let _ = crate::sys::ofd::unlock(f, crate::sys::ofd::entry_byte(index));
    }
    #[cfg(loom)]
    let _ = fd;
}

/// Clears the identity of entry `index` if it still names the dead `ident`
/// (an asker that found the owner dead; the next owner's claim does not
/// depend on it).
pub(crate) fn clear_dead(r: &Region, index: u64, ident: u64) {
    if let Some(w) = r.word(entry_off(index)) {
        // Release: as in `detach`. Fails harmlessly if a new owner claimed it.
        let _ = w.compare_exchange(ident, 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// Whether the handle named by `token` is still attached and its process
/// still runs. Tokens that name no valid entry count as dead (they can only
/// come from a corrupted segment), so their holds are taken over.
pub(crate) fn token_alive(r: &Region, fd: LockFd, token: Token) -> bool {
    if token.index() >= ATTACH_ENTRIES {
        return false;
    }
    let Some(gen) = r.word(entry_off(token.index()) + 8) else {
        return false;
    };
    // Acquire: pairs with the generation's AcqRel increment in `attach`.
    if gen.load(Ordering::Acquire) & GEN_MASK != token.generation() {
        return false;
    }
    entry_alive(r, fd, token.index())
}

/// Whether every live entry records our own pid namespace, so that a
/// thread id that does not exist here exists nowhere (see `sys/robust_mutex.rs`).
#[cfg(not(loom))]
pub(crate) fn peers_share_pid_ns(r: &Region, fd: LockFd) -> bool {
    let ours = crate::sys::pid_namespace();
    if ours == 0 {
        return false;
    }
    (0..ATTACH_ENTRIES).all(|i| {
        let off = entry_off(i);
        // Acquire: pairs with the Release store of the identity in
        // `attach`, so the namespace word it published is read below. The
        // caller read the futex word first: a holder's claim happened
        // before it took the mutex (see `sys/robust_mutex.rs`).
        let free = r.word(off).is_none_or(|w| w.load(Ordering::Acquire) == 0);
        // Relaxed: ordered after the Acquire above.
        let ns = r
            .word(off + E_PIDNS)
            .map_or(0, |w| w.load(Ordering::Relaxed));
        free || ns == ours || !entry_alive(r, fd, i)
    })
}

/// Whether the thread `tid` (a number in our pid namespace, read from a
/// robust mutex's futex word) provably holds nothing of this segment: every
/// live entry is in our pid namespace, and no such thread exists, or its
/// process (read from /proc, when /proc shows our namespace) owns no live
/// entry. A holder attaches before it takes a mutex, so a thread of an
/// unattached process (pid 2, say, in a corrupted word) is no holder.
/// "Cannot tell" is `false`.
#[cfg(not(loom))]
pub(crate) fn thread_holds_nothing(r: &Region, fd: LockFd, tid: u32) -> bool {
    if !peers_share_pid_ns(r, fd) {
        return false;
    }
    if !crate::sys::thread_exists(tid) {
        return true;
    }
    let Some(tgid) = crate::sys::thread_group(tid) else {
        return false;
    };
    !(0..ATTACH_ENTRIES).any(|i| {
        // Relaxed: a process that owns the mutex claimed its entry before
        // taking it, and the caller read the futex word first.
        let ident = r
            .word(entry_off(i))
            .map_or(0, |w| w.load(Ordering::Relaxed));
        ident != 0 && ident & PID_MASK == u64::from(tgid) & PID_MASK && entry_alive(r, fd, i)
    })
}

/// Number of entries whose process is alive, and the dead ones.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn census(r: &Region, fd: LockFd) -> (u64, u64) {
    let (mut live, mut dead) = (0, 0);
    for i in 0..ATTACH_ENTRIES {
        let Some(w) = r.word(entry_off(i)) else { break };
        let ident = w.load(Ordering::Relaxed); // Relaxed: a statistic.
        if ident == 0 {
            continue;
        }
        if entry_alive(r, fd, i) {
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
    use crate::shm::layout::INDEX_OFF;
    use std::os::fd::AsRawFd;

    fn me() -> u64 {
        let (pid, start) = crate::sys::self_identity();
        identity_word(pid, start)
    }

    #[test]
    fn claim_release_and_generations() {
        let r = Region::heap(INDEX_OFF as usize);
        let fd = LockFd::NONE;
        let (i, t) = attach(&r, fd, me()).unwrap();
        let (j, u) = attach(&r, fd, me()).unwrap();
        assert_ne!(i, j);
        assert!(token_alive(&r, fd, t) && token_alive(&r, fd, u));
        detach(&r, fd, i, me());
        assert!(!token_alive(&r, fd, t), "a released entry's token is dead");
        let (k, v) = attach(&r, fd, me()).unwrap();
        assert_eq!(k, i, "the free entry is reused");
        assert_ne!(v, t, "with a new generation");
        assert!(!token_alive(&r, fd, t) && token_alive(&r, fd, v));
        assert_eq!(census(&r, fd), (2, 0));
    }

    #[test]
    fn dead_entries_are_reclaimed_when_full() {
        let r = Region::heap(INDEX_OFF as usize);
        let dead = identity_word(pid_of_exited_child(), 12345);
        let ns = crate::sys::pid_namespace();
        for i in 0..ATTACH_ENTRIES {
            r.word(entry_off(i)).unwrap().store(dead, Ordering::Relaxed);
            r.word(entry_off(i) + E_PIDNS)
                .unwrap()
                .store(ns, Ordering::Relaxed);
        }
        assert_eq!(census(&r, LockFd::NONE), (0, ATTACH_ENTRIES));
        let (_, t) = attach(&r, LockFd::NONE, me()).unwrap();
        assert!(token_alive(&r, LockFd::NONE, t));
    }

    #[test]
    fn without_proof_of_death_an_entry_stays_alive() {
        // A pid from another (or an unknown) pid namespace proves nothing.
        let r = Region::heap(INDEX_OFF as usize);
        let gone = identity_word(pid_of_exited_child(), 12345);
        r.word(entry_off(0)).unwrap().store(gone, Ordering::Relaxed);
        r.word(entry_off(0) + E_PIDNS)
            .unwrap()
            .store(7, Ordering::Relaxed);
        assert!(entry_alive(&r, LockFd::NONE, 0));
        assert_eq!(census(&r, LockFd::NONE), (1, 0));
    }

    /// The kernel's lock decides: an entry whose description is closed is
    /// dead even though its process (this one) lives; one whose description
    /// is open is alive even though its identity names an exited process in
    /// another pid namespace.
    #[test]
    fn ofd_locks_decide_liveness() {
        let path = std::env::temp_dir().join(format!("shmdict-attach-{}", std::process::id()));
        let a = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let reopen = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/self/fd/{}", a.as_raw_fd()))
                .unwrap()
        };
        let (b, c) = (reopen(), reopen());
        let r = Region::heap(INDEX_OFF as usize);
        let (i, t) = attach(&r, LockFd::new(a.as_raw_fd(), u64::MAX), me()).unwrap();
        let fa = LockFd::new(a.as_raw_fd(), i);
        let fb = LockFd::new(b.as_raw_fd(), u64::MAX);
        let (j, _) = attach(&r, LockFd::new(c.as_raw_fd(), u64::MAX), me()).unwrap();
        assert_ne!(i, j, "the entry's lock keeps other claimers off");
        assert!(token_alive(&r, fb, t) && token_alive(&r, fa, t));
        // Another namespace's dead pid in the entry: the lock still says alive.
        let gone = identity_word(pid_of_exited_child(), 1);
        r.word(entry_off(i)).unwrap().store(gone, Ordering::Relaxed);
        r.word(entry_off(i) + E_PIDNS)
            .unwrap()
            .store(7, Ordering::Relaxed);
        assert!(token_alive(&r, fb, t));
        // The same pid in our namespace is proof of death, lock or not (a
        // child that kept its parent's description).
        let ns = crate::sys::pid_namespace();
        r.word(entry_off(i) + E_PIDNS)
            .unwrap()
            .store(ns, Ordering::Relaxed);
        assert!(!token_alive(&r, fb, t));
        // Our live identity, but the description closed: dead.
        r.word(entry_off(i)).unwrap().store(me(), Ordering::Relaxed);
        assert!(token_alive(&r, fb, t));
        drop(a);
        assert!(!token_alive(&r, fb, t), "closing the description is death");
        assert_eq!(census(&r, fb), (1, 1));
        use std::os::fd::AsFd;
        let byte = crate::sys::ofd::entry_byte(i);
        assert!(
            crate::sys::ofd::try_lock(b.as_fd(), byte, true).unwrap(),
            "a dead entry can be claimed"
        );
        drop(c);
    }

    fn pid_of_exited_child() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }
}
