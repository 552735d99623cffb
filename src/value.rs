//! `Value<T>`: one plain-data value in a named segment, read and written in
//! place by any number of processes.
//!
//! Two representations, chosen by the size of `T` (and recorded in the
//! header, so every process agrees):
//!
//! - **Atomic word** (sizes 0, 1, 2, 4, 8): the value is the first 1, 2, 4
//!   or 8 bytes of the data area, accessed only through the hardware atomic
//!   of that width (`AtomicU8` .. `AtomicU64`, whatever the alignment of
//!   `T`: the data area is page aligned). `load`/`store`/`swap`/
//!   `compare_exchange`/`fetch_*` are single instructions; `update` is a
//!   compare-exchange loop. Nothing can be torn, nothing can be left
//!   half-done by a killed process, and no operation ever waits.
//! - **Double buffer** (every other size): two slots of the value's words
//!   and a sequence word `seq` in the header; the current value is slot
//!   `seq & 1`. Writers are serialized by the exclusive lock word (owner
//!   token, taken over from a dead owner: `rwlock.rs`); a writer fills the
//!   *other* slot with atomic word stores, then publishes it by storing
//!   `seq + 1`. A reader loads `seq`, copies slot `seq & 1` with atomic word
//!   loads, and accepts the copy if `seq` is unchanged afterwards (it retries
//!   otherwise: a later writer may have been rewriting that slot).
//!
//!   Why this is safe under SIGKILL: a writer killed at any instruction has
//!   at worst half-written the slot that is *not* current, and `seq` still
//!   names the complete current slot. Readers therefore never wait for a
//!   writer, dead or alive (no odd "writing" state exists); they only retry
//!   while writers keep publishing. The dead writer's lock word is cleared
//!   by the next writer once it sees that the owner's process is gone, and
//!   that writer rewrites the whole slot. Compared with a classic seqlock
//!   (readers wait while the sequence is odd), this costs a second copy of
//!   the value and gains that a crash can never stall or mislead a reader.
//!
//! Memory ordering of the double buffer: the writer issues a Release fence
//! before its data stores and publishes with a Release store of `seq`; the
//! reader loads `seq` with Acquire, copies, then issues an Acquire fence
//! before re-reading `seq`. If the reader's copy saw any store of a writer
//! that started after the reader's first `seq` load, the fences synchronize
//! and the re-read sees the newer `seq`, so the copy is discarded.

#[cfg(not(loom))]
use crate::sync::mapped::{AtomicU16, AtomicU32, AtomicU8};
use std::fmt;
use std::marker::PhantomData;

use bytemuck::Pod;

use crate::error::Result;
#[cfg(not(loom))]
use crate::prim::data_atomic;
use crate::prim::{self, word, Create, Segment, Spec, DATA_OFF, KIND_VALUE, P_SEQ};
use crate::shm::rwlock;
use crate::sync::{fence, AtomicU64, Ordering};

/// Header value of `P_REPR`: the value is one atomic word.
const REPR_WORD: u64 = 1;
/// Header value of `P_REPR`: the value is double buffered.
const REPR_BUFFERED: u64 = 2;

/// A value of a plain-data type `T` in a named shared-memory segment.
///
/// Every process that opens the same name with the same `T` reads and
/// writes the same value in place: no server, no serialization. All
/// operations are atomic (linearizable) across processes, and no read ever
/// returns a torn value. For `T` of 1, 2, 4 or 8 bytes they are single
/// hardware atomic instructions; larger types use a double-buffered
/// sequence lock whose readers never wait (see [`Value::is_lock_free`]).
///
/// Integer values also have `fetch_add`, `fetch_sub`, `fetch_and`,
/// `fetch_or`, `fetch_xor`, `fetch_max` and `fetch_min`, with the wrapping
/// semantics of the std atomics, e.g. [`Value::<u64>::fetch_add`](Value::fetch_add).
///
/// ```
/// use shmdict::Value;
/// # let name = format!("doc-value-{}", std::process::id());
/// let hits = Value::<u64>::open(&name, 0)?;
/// hits.fetch_add(1);
/// assert_eq!(hits.load(), 1);
/// assert_eq!(hits.update(|n| n * 10), 10);
/// Value::<u64>::unlink(&name)?;
/// # Ok::<(), shmdict::Error>(())
/// ```
///
/// The segment records the size, alignment and type name of `T` (hashed);
/// opening it with another `T` is [`Error::Incompatible`](crate::Error).
/// Type names come from the compiler: a build whose compiler names `T`
/// differently also gets `Incompatible`, never a reinterpretation.
///
/// `Value<T>` is `Send + Sync`. Dropping it detaches this handle; the value
/// stays until [`Value::unlink`] and the last handle's drop.
///
/// After `fork`, open the name again in the child rather than using a
/// handle inherited from the parent: the locks a handle takes name the
/// process that opened it.
pub struct Value<T> {
    seg: Segment,
    buffered: bool,
    _t: PhantomData<T>,
}

/// How to open or create a [`Value`]: see [`Value::options`].
pub struct ValueOptions<T> {
    create: Create,
    _t: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for ValueOptions<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValueOptions")
            .field("mode", &format_args!("{:#o}", self.create.mode))
            .field("create_new", &self.create.create_new)
            .field("allow_other_owner", &self.create.allow_other_owner)
            .finish()
    }
}

impl<T> Clone for ValueOptions<T> {
    fn clone(&self) -> ValueOptions<T> {
        ValueOptions {
            create: self.create,
            _t: PhantomData,
        }
    }
}

impl<T: Pod> ValueOptions<T> {
    /// Permission bits of a new segment, applied exactly (not filtered by
    /// the umask). Default `0o600`. When attaching, the most an existing
    /// segment may grant: see [`Options::mode`](crate::Options::mode).
    pub fn mode(mut self, unix_mode: u32) -> ValueOptions<T> {
        self.create.mode = unix_mode;
        self
    }

    /// Attach to an existing segment even if another user owns it or its
    /// mode grants more than [`mode`](ValueOptions::mode) (default `false`:
    /// `Error::PermissionDenied`); see
    /// [`Options::allow_other_owner`](crate::Options::allow_other_owner).
    pub fn allow_other_owner(mut self, yes: bool) -> ValueOptions<T> {
        self.create.allow_other_owner = yes;
        self
    }

    /// Whether a missing segment is created (default `true`). With `false`,
    /// `open` only attaches: `Error::NotFound` if there is no segment of that
    /// name.
    pub fn create(mut self, yes: bool) -> ValueOptions<T> {
        self.create.create = yes;
        self
    }

    /// Insist on creating a fresh segment: `Error::AlreadyExists` if the
    /// name is taken.
    pub fn create_new(mut self, yes: bool) -> ValueOptions<T> {
        self.create.create_new = yes;
        self
    }

    /// Attaches to the value `name`, or creates it holding `init`.
    ///
    /// Creation is race-free: processes opening the same new name at once
    /// all end up on one segment, holding the `init` of one of them.
    #[cfg(not(loom))]
    pub fn open(self, name: &str, init: T) -> Result<Value<T>> {
        let size = std::mem::size_of::<T>() as u64;
        let buffered = !matches!(size, 0 | 1 | 2 | 4 | 8);
        let (repr, data_bytes) = if buffered {
            (
                REPR_BUFFERED,
                size.checked_next_multiple_of(8)
                    .and_then(|s| s.checked_mul(2)),
            )
        } else {
            (REPR_WORD, Some(8))
        };
        let spec = Spec::of::<T>(name, KIND_VALUE, 1, repr, data_bytes)?;
        let seg = prim::open(name, &spec, self.create, |r| {
            // Relaxed (all): the segment is not published yet; linkat
            // orders these stores before any other process's open.
            if buffered {
                write_slot(r, 0, &init, Ordering::Relaxed);
            } else {
                store_bits(r, size, to_bits(&init), Ordering::Relaxed);
            }
        })?;
        Ok(Value {
            seg,
            buffered,
            _t: PhantomData,
        })
    }
}

impl<T: Pod> Value<T> {
    /// Attaches to the value `name`, or creates it holding `init` (`init` is
    /// used only on creation). Default mode `0o600`.
    #[cfg(not(loom))]
    pub fn open(name: &str, init: T) -> Result<Value<T>> {
        Value::options().open(name, init)
    }

    /// Options for opening or creating a value.
    pub fn options() -> ValueOptions<T> {
        ValueOptions {
            create: Create::default(),
            _t: PhantomData,
        }
    }

    /// Removes the name `name`. Processes already attached keep working on
    /// the segment; it is freed when the last one detaches.
    /// `Error::NotFound` if there is no such name.
    #[cfg(not(loom))]
    pub fn unlink(name: &str) -> Result<()> {
        prim::unlink(name)
    }

    /// A double-buffered value holding `init` on a heap region (loom
    /// models), with one handle, which threads of the model share.
    #[cfg(loom)]
    pub(crate) fn on_heap(init: T) -> Value<T> {
        let size = std::mem::size_of::<T>() as u64;
        assert!(
            !matches!(size, 0 | 1 | 2 | 4 | 8),
            "loom models only the double buffer"
        );
        let data_bytes = size.next_multiple_of(8) * 2;
        let region = crate::shm::region::Region::heap((DATA_OFF + data_bytes) as usize);
        // Relaxed: as in `open`; the model's threads are spawned after this.
        write_slot(&region, 0, &init, Ordering::Relaxed);
        Value {
            seg: prim::attach_region("heap", region, None).expect("attach"),
            buffered: true,
            _t: PhantomData,
        }
    }

    /// The segment (loom models forge what a killed writer leaves there).
    #[cfg(loom)]
    pub(crate) fn segment(&self) -> &Segment {
        &self.seg
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.seg.name
    }

    /// Whether every operation is a single hardware atomic instruction (or,
    /// for `update`, a compare-exchange loop): `T` has 0, 1, 2, 4 or 8
    /// bytes. Otherwise writers take a lock (readers still never wait).
    pub fn is_lock_free(&self) -> bool {
        !self.buffered
    }

    const SIZE: u64 = std::mem::size_of::<T>() as u64;

    /// The current value.
    pub fn load(&self) -> T {
        if self.buffered {
            self.load_buffered().0
        } else {
            from_bits(load_bits(&self.seg.region, Self::SIZE))
        }
    }

    /// Replaces the value.
    pub fn store(&self, v: T) {
        if self.buffered {
            self.locked(|| self.publish(&v));
        } else {
            // SeqCst: every operation on a small Value is sequentially
            // consistent, like a std atomic used with SeqCst throughout.
            store_bits(&self.seg.region, Self::SIZE, to_bits(&v), Ordering::SeqCst);
        }
    }

    /// Replaces the value and returns the previous one.
    pub fn swap(&self, v: T) -> T {
        if self.buffered {
            self.locked(|| {
                let old = self.current_locked();
                self.publish(&v);
                old
            })
        } else {
            from_bits(swap_bits(&self.seg.region, Self::SIZE, to_bits(&v)))
        }
    }

    /// Stores `new` if the value is (byte for byte) `current`. Returns the
    /// previous value: `Ok` if it was replaced, `Err` with the value found
    /// otherwise.
    pub fn compare_exchange(&self, current: T, new: T) -> Result<T, T> {
        if self.buffered {
            self.locked(|| {
                let old = self.current_locked();
                if bytemuck::bytes_of(&old) == bytemuck::bytes_of(&current) {
                    self.publish(&new);
                    Ok(old)
                } else {
                    Err(old)
                }
            })
        } else {
            cas_bits(
                &self.seg.region,
                Self::SIZE,
                to_bits(&current),
                to_bits(&new),
            )
            .map(from_bits)
            .map_err(from_bits)
        }
    }

    /// Atomically replaces the value `v` by `f(v)` and returns the new
    /// value. `f` may run more than once (when another process changed the
    /// value meanwhile); it runs without any lock held.
    pub fn update(&self, mut f: impl FnMut(T) -> T) -> T {
        if self.buffered {
            loop {
                let (snapshot, seq) = self.load_buffered();
                let new = f(snapshot);
                let done = self.locked(|| {
                    // Relaxed: the lock word's Acquire ordered the last
                    // publication before this load.
                    let unchanged = word(&self.seg.region, P_SEQ).load(Ordering::Relaxed) == seq;
                    if unchanged {
                        self.publish(&new);
                    }
                    unchanged
                });
                if done {
                    return new;
                }
            }
        } else {
            let r = &self.seg.region;
            let mut cur = load_bits(r, Self::SIZE);
            loop {
                let new = f(from_bits(cur));
                match cas_bits(r, Self::SIZE, cur, to_bits(&new)) {
                    Ok(_) => return new,
                    Err(actual) => cur = actual,
                }
            }
        }
    }

    // --- The double buffer ---

    /// A consistent copy of the current value and the sequence it belongs to.
    fn load_buffered(&self) -> (T, u64) {
        let r = &self.seg.region;
        let seq = word(r, P_SEQ);
        loop {
            // Acquire: pairs with the Release store of `publish`: the slot
            // it names is complete.
            let s = seq.load(Ordering::Acquire);
            let v = read_slot::<T>(r, s & 1);
            // Acquire fence: pairs with the Release fence in `publish`; if
            // the copy saw a later writer's store, the re-read sees its
            // newer sequence.
            fence(Ordering::Acquire);
            // Relaxed: ordered by the fence.
            if seq.load(Ordering::Relaxed) == s {
                return (v, s);
            }
            crate::sync::spin_hint();
        }
    }

    /// The current value, read by the lock holder (no writer can change it).
    fn current_locked(&self) -> T {
        let r = &self.seg.region;
        // Relaxed: the lock word's Acquire ordered the last publication.
        let s = word(r, P_SEQ).load(Ordering::Relaxed);
        read_slot(r, s & 1)
    }

    /// Writes `v` into the spare slot and makes it current. Lock held.
    fn publish(&self, v: &T) {
        let r = &self.seg.region;
        let seq = word(r, P_SEQ);
        // Relaxed: only lock holders store `seq`, and the lock orders them.
        let s = seq.load(Ordering::Relaxed);
        // Release fence: pairs with the reader's Acquire fence (see the
        // module docs): a reader that sees any of the stores below also
        // sees every publication before them.
        fence(Ordering::Release);
        write_slot(r, (s.wrapping_add(1)) & 1, v, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `load_buffered`.
        seq.store(s.wrapping_add(1), Ordering::Release);
    }

    /// Runs `f` holding the writers' lock word. `f` is our own code and
    /// never panics or calls back into user code.
    fn locked<R>(&self, f: impl FnOnce() -> R) -> R {
        let (r, l) = (&self.seg.region, &self.seg.enter().local);
        rwlock::lock_word(r, l);
        let out = f();
        rwlock::unlock_word(r, l);
        out
    }
}

impl<T> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Value")
            .field("name", &self.seg.name)
            .field("type", &std::any::type_name::<T>())
            .field("lock_free", &!self.buffered)
            .finish()
    }
}

// --- Atomic word representation: `T` <-> the bits of a 1..8-byte atomic ---

/// The bytes of `v` (at most 8) as the integer an atomic of that width holds.
fn to_bits<T: Pod>(v: &T) -> u64 {
    let b = bytemuck::bytes_of(v);
    let mut buf = [0u8; 8];
    let n = b.len().min(8);
    buf[..n].copy_from_slice(&b[..n]);
    match n {
        1 => buf[0] as u64,
        2 => u16::from_ne_bytes([buf[0], buf[1]]) as u64,
        4 => u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64,
        _ => u64::from_ne_bytes(buf),
    }
}

/// The inverse of [`to_bits`].
fn from_bits<T: Pod>(bits: u64) -> T {
    let mut v = T::zeroed();
    let out = bytemuck::bytes_of_mut(&mut v);
    let n = out.len().min(8);
    let mut buf = [0u8; 8];
    match n {
        1 => buf[0] = bits as u8,
        2 => buf[..2].copy_from_slice(&(bits as u16).to_ne_bytes()),
        4 => buf[..4].copy_from_slice(&(bits as u32).to_ne_bytes()),
        _ => buf = bits.to_ne_bytes(),
    }
    out[..n].copy_from_slice(&buf[..n]);
    v
}

// SeqCst (all operations on the atomic word): a Value is "synchronized by
// default": its operations form one total order with each other and with
// the SeqCst operations of other values, as multiprocessing's do.
//
// Loom models only the double buffer: these are stubs there (the atomics of
// 1, 2 and 4 bytes have no loom counterpart on a region of 64-bit words).

#[cfg(loom)]
fn load_bits(_: &crate::shm::region::Region, _: u64) -> u64 {
    unreachable!("loom models only double-buffered values")
}

#[cfg(loom)]
fn store_bits(_: &crate::shm::region::Region, _: u64, _: u64, _: Ordering) {
    unreachable!("loom models only double-buffered values")
}

#[cfg(loom)]
fn swap_bits(_: &crate::shm::region::Region, _: u64, _: u64) -> u64 {
    unreachable!("loom models only double-buffered values")
}

#[cfg(loom)]
fn cas_bits(_: &crate::shm::region::Region, _: u64, _: u64, _: u64) -> Result<u64, u64> {
    unreachable!("loom models only double-buffered values")
}

#[cfg(not(loom))]
fn load_bits(r: &crate::shm::region::Region, size: u64) -> u64 {
    // SeqCst: as in `Value::store`.
    let o = Ordering::SeqCst;
    match size {
        1 => data_atomic::<AtomicU8>(r).load(o) as u64,
        2 => data_atomic::<AtomicU16>(r).load(o) as u64,
        4 => data_atomic::<AtomicU32>(r).load(o) as u64,
        8 => data_atomic::<AtomicU64>(r).load(o),
        _ => 0, // Zero-sized: nothing to read.
    }
}

#[cfg(not(loom))]
fn store_bits(r: &crate::shm::region::Region, size: u64, bits: u64, o: Ordering) {
    match size {
        1 => data_atomic::<AtomicU8>(r).store(bits as u8, o),
        2 => data_atomic::<AtomicU16>(r).store(bits as u16, o),
        4 => data_atomic::<AtomicU32>(r).store(bits as u32, o),
        8 => data_atomic::<AtomicU64>(r).store(bits, o),
        _ => {}
    }
}

#[cfg(not(loom))]
fn swap_bits(r: &crate::shm::region::Region, size: u64, bits: u64) -> u64 {
    // SeqCst: as in `Value::store`.
    let o = Ordering::SeqCst;
    match size {
        1 => data_atomic::<AtomicU8>(r).swap(bits as u8, o) as u64,
        2 => data_atomic::<AtomicU16>(r).swap(bits as u16, o) as u64,
        4 => data_atomic::<AtomicU32>(r).swap(bits as u32, o) as u64,
        8 => data_atomic::<AtomicU64>(r).swap(bits, o),
        _ => 0,
    }
}

#[cfg(not(loom))]
fn cas_bits(r: &crate::shm::region::Region, size: u64, cur: u64, new: u64) -> Result<u64, u64> {
    let (s, f) = (Ordering::SeqCst, Ordering::SeqCst);
    match size {
        1 => data_atomic::<AtomicU8>(r)
            .compare_exchange(cur as u8, new as u8, s, f)
            .map(u64::from)
            .map_err(u64::from),
        2 => data_atomic::<AtomicU16>(r)
            .compare_exchange(cur as u16, new as u16, s, f)
            .map(u64::from)
            .map_err(u64::from),
        4 => data_atomic::<AtomicU32>(r)
            .compare_exchange(cur as u32, new as u32, s, f)
            .map(u64::from)
            .map_err(u64::from),
        8 => data_atomic::<AtomicU64>(r).compare_exchange(cur, new, s, f),
        _ => Ok(0),
    }
}

// --- Double-buffer slots: words of the data area, accessed atomically ---

fn slot_words<T>(r: &crate::shm::region::Region, slot: u64) -> &[AtomicU64] {
    let words = (std::mem::size_of::<T>() as u64).div_ceil(8);
    r.words(DATA_OFF + slot * words * 8, words)
        .expect("both slots lie inside every validated Value segment")
}

/// Copies slot `slot` with atomic word loads (never a plain read of bytes a
/// writer may be changing).
fn read_slot<T: Pod>(r: &crate::shm::region::Region, slot: u64) -> T {
    let mut v = T::zeroed();
    let out = bytemuck::bytes_of_mut(&mut v);
    for (chunk, w) in out.chunks_mut(8).zip(slot_words::<T>(r, slot)) {
        // Relaxed: ordered by the sequence protocol (see `load_buffered`).
        let b = w.load(Ordering::Relaxed).to_ne_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    v
}

/// Writes `v` into slot `slot` with atomic word stores.
fn write_slot<T: Pod>(r: &crate::shm::region::Region, slot: u64, v: &T, o: Ordering) {
    for (chunk, w) in bytemuck::bytes_of(v)
        .chunks(8)
        .zip(slot_words::<T>(r, slot))
    {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        w.store(u64::from_ne_bytes(b), o);
    }
}

// --- Integer operations ---

#[cfg(not(loom))]
macro_rules! int_ops {
    ($($t:ty => $a:ty),* $(,)?) => {$(
        impl Value<$t> {
            #[inline]
            fn atomic(&self) -> &$a {
                data_atomic::<$a>(&self.seg.region)
            }

            #[doc = concat!("Adds `n` (wrapping on overflow, like `", stringify!($a), "::fetch_add`); returns the previous value.")]
            #[inline]
            pub fn fetch_add(&self, n: $t) -> $t {
                // SeqCst: see "synchronized by default" above.
                self.atomic().fetch_add(n, Ordering::SeqCst)
            }

            /// Subtracts `n` (wrapping on overflow); returns the previous value.
            #[inline]
            pub fn fetch_sub(&self, n: $t) -> $t {
                // SeqCst: as above.
                self.atomic().fetch_sub(n, Ordering::SeqCst)
            }

            /// Bitwise "and" with `n`; returns the previous value.
            #[inline]
            pub fn fetch_and(&self, n: $t) -> $t {
                // SeqCst: as above.
                self.atomic().fetch_and(n, Ordering::SeqCst)
            }

            /// Bitwise "or" with `n`; returns the previous value.
            #[inline]
            pub fn fetch_or(&self, n: $t) -> $t {
                // SeqCst: as above.
                self.atomic().fetch_or(n, Ordering::SeqCst)
            }

            /// Bitwise "xor" with `n`; returns the previous value.
            #[inline]
            pub fn fetch_xor(&self, n: $t) -> $t {
                // SeqCst: as above.
                self.atomic().fetch_xor(n, Ordering::SeqCst)
            }

            /// Stores the maximum of the value and `n`; returns the previous value.
            #[inline]
            pub fn fetch_max(&self, n: $t) -> $t {
                // SeqCst: as above.
                self.atomic().fetch_max(n, Ordering::SeqCst)
            }

            /// Stores the minimum of the value and `n`; returns the previous value.
            #[inline]
            pub fn fetch_min(&self, n: $t) -> $t {
                // SeqCst: as above.
                self.atomic().fetch_min(n, Ordering::SeqCst)
            }
        }
    )*};
}

#[cfg(not(loom))]
int_ops!(
    u8 => AtomicU8,
    u16 => AtomicU16,
    u32 => AtomicU32,
    u64 => AtomicU64,
    usize => crate::sync::mapped::AtomicUsize,
    i8 => crate::sync::mapped::AtomicI8,
    i16 => crate::sync::mapped::AtomicI16,
    i32 => crate::sync::mapped::AtomicI32,
    i64 => crate::sync::mapped::AtomicI64,
    isize => crate::sync::mapped::AtomicIsize,
);

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip() {
        assert_eq!(from_bits::<u8>(to_bits(&0xabu8)), 0xab);
        assert_eq!(from_bits::<i16>(to_bits(&-2i16)), -2);
        assert_eq!(from_bits::<[u8; 4]>(to_bits(&[1u8, 2, 3, 4])), [1, 2, 3, 4]);
        assert_eq!(from_bits::<f64>(to_bits(&1.5f64)), 1.5);
        assert_eq!(from_bits::<u64>(to_bits(&u64::MAX)), u64::MAX);
        assert_eq!(
            to_bits(&0xffu8),
            0xff,
            "no sign extension into the high bits"
        );
        from_bits::<()>(to_bits(&()));
    }

    #[test]
    fn slots_round_trip() {
        let r = crate::shm::region::Region::heap((DATA_OFF + 128) as usize);
        let v: [u8; 20] = std::array::from_fn(|i| i as u8);
        write_slot(&r, 1, &v, Ordering::Relaxed);
        assert_eq!(read_slot::<[u8; 20]>(&r, 1), v);
        assert_eq!(read_slot::<[u8; 20]>(&r, 0), [0; 20]);
    }
}
