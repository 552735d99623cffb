//! The contents of an arena block, read and written one atomic word at a time.
//!
//! | bytes            | contents                                        |
//! |------------------|-------------------------------------------------|
//! | 0..8             | key length (low 32 bits), value length (high 32)|
//! | 8..16            | the key's hash                                  |
//! | 16..16+pad16(k)  | key bytes, zero-padded to a multiple of 16      |
//! | then             | value bytes, zero-padded to a whole word        |
//!
//! Blocks start 64-aligned, so a value starts 16-aligned: a borrowed value
//! can be viewed as any plain type of alignment up to 16
//! (`ValueRef::as_pod`).
//!
//! While a block is on a free list, word 0 holds the free-list link instead.
//!
//! Blocks are written only before they are published and read by processes
//! that may race with a recycling writer, so every access is an atomic load or
//! store of a whole word (a data race on plain bytes would be undefined
//! behaviour even when the reader discards the result). Word values are in
//! native byte order: a segment never leaves its machine.

use crate::shm::layout::BLOCK_HEADER;
use crate::sync::{AtomicU64, Ordering};

/// Word index where the key starts.
const KEY_WORD: usize = (BLOCK_HEADER / 8) as usize;

fn value_word(key_len: usize) -> usize {
    KEY_WORD + 2 * key_len.div_ceil(16)
}

/// Writes a key and value into a block owned by the caller (taken from the
/// slab and not yet published). The block must be large enough
/// (`layout::order_for`); returns `None` otherwise.
pub(crate) fn write(words: &[AtomicU64], key: &[u8], hash: u64, value: &[u8]) -> Option<()> {
    let vw = value_word(key.len());
    if vw + value.len().div_ceil(8) > words.len() {
        return None;
    }
    // Relaxed stores throughout: the block becomes visible only through the
    // entry word, published under the slot's Release unlock; recycling races
    // are ordered by the fences described in seqlock::read_validate.
    words[0].store(
        key.len() as u64 | (value.len() as u64) << 32,
        Ordering::Relaxed,
    );
    words[1].store(hash, Ordering::Relaxed);
    store_bytes(&words[KEY_WORD..vw], key);
    store_bytes(&words[vw..], value);
    Some(())
}

/// What reading a block found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// The block holds `key`; the value was copied if asked for.
    Match,
    /// The block holds another key.
    Mismatch,
    /// The lengths do not fit the block: it is being recycled, or corrupt.
    Invalid,
}

/// The (key, value) lengths of a block, if they fit in it (also what
/// `check()` asks of every published block).
pub(crate) fn lengths(words: &[AtomicU64]) -> Option<(usize, usize)> {
    let w0 = words.first()?.load(Ordering::Relaxed); // Relaxed: validated by the caller's seqlock.
    let (k, v) = ((w0 & 0xffff_ffff) as usize, (w0 >> 32) as usize);
    (value_word(k) + v.div_ceil(8) <= words.len()).then_some((k, v))
}

/// Compares the block's key with `key` and, on a match, copies the value into
/// `out` (replacing its contents).
pub(crate) fn read(words: &[AtomicU64], key: &[u8], hash: u64, out: Option<&mut Vec<u8>>) -> Read {
    let Some((k, v)) = lengths(words) else {
        return Read::Invalid;
    };
    // Relaxed: validated by the caller's seqlock.
    if k != key.len() || words[1].load(Ordering::Relaxed) != hash {
        return Read::Mismatch;
    }
    let vw = value_word(k);
    if !eq_bytes(&words[KEY_WORD..vw], key) {
        return Read::Mismatch;
    }
    if let Some(out) = out {
        load_bytes(&words[vw..], v, out);
    }
    Read::Match
}

/// Where the value of a block holding `key` lies (byte offset from the
/// block's start, length), for a reader that does not need a seqlock: the
/// block is immutable while the reader holds it (a pinned reader,
/// `epoch.rs`). `Err(())`: the lengths do not fit the block.
#[inline]
pub(crate) fn match_value(
    words: &[AtomicU64],
    key: &[u8],
    hash: u64,
) -> Result<Option<(usize, usize)>, ()> {
    let (k, v) = lengths(words).ok_or(())?;
    // Relaxed: the block is immutable while held (see above).
    if k != key.len() || words[1].load(Ordering::Relaxed) != hash {
        return Ok(None);
    }
    let vw = value_word(k);
    Ok(eq_bytes(&words[KEY_WORD..vw], key).then_some((vw * 8, v)))
}

/// Copies the block's key into `out`. `false` if the lengths are invalid.
pub(crate) fn read_key(words: &[AtomicU64], out: &mut Vec<u8>) -> bool {
    match lengths(words) {
        Some((k, _)) => {
            load_bytes(&words[KEY_WORD..], k, out);
            true
        }
        None => false,
    }
}

fn store_bytes(words: &[AtomicU64], bytes: &[u8]) {
    let chunks = bytes.chunks_exact(8);
    let tail = chunks.remainder();
    let mut words = words.iter();
    for (chunk, w) in chunks.zip(words.by_ref()) {
        let word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        w.store(word, Ordering::Relaxed); // Relaxed: see `write`.
    }
    if !tail.is_empty() {
        let mut buf = [0u8; 8];
        buf[..tail.len()].copy_from_slice(tail);
        if let Some(w) = words.next() {
            w.store(u64::from_ne_bytes(buf), Ordering::Relaxed); // Relaxed: see `write`.
        }
    }
}

/// Replaces `out` with `len` bytes from `words` (which must hold them, or
/// `out` gets only the bytes they hold).
///
/// Words are loaded into a stack buffer of [`COPY_WORDS`] and appended a
/// buffer at a time: no zero-fill of `out` first, and one `memcpy` per 256
/// bytes instead of a bounds-checked copy per word.
fn load_bytes(words: &[AtomicU64], len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(len);
    let words = &words[..len.div_ceil(8).min(words.len())];
    let mut left = len;
    let mut buf = [0u64; COPY_WORDS];
    for chunk in words.chunks(COPY_WORDS) {
        for (b, w) in buf.iter_mut().zip(chunk) {
            // Relaxed: validated by the caller's seqlock.
            *b = w.load(Ordering::Relaxed);
        }
        let bytes: &[u8] = bytemuck::cast_slice(&buf[..chunk.len()]);
        let n = bytes.len().min(left);
        out.extend_from_slice(&bytes[..n]);
        left -= n;
    }
}

/// Words per chunk of [`load_bytes`].
const COPY_WORDS: usize = 32;

fn eq_bytes(words: &[AtomicU64], bytes: &[u8]) -> bool {
    if words.len() < bytes.len().div_ceil(8) {
        return false;
    }
    let chunks = bytes.chunks_exact(8);
    let tail = chunks.remainder();
    for (chunk, w) in chunks.zip(words) {
        // Relaxed: validated by the caller's seqlock.
        if w.load(Ordering::Relaxed) != u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) {
            return false;
        }
    }
    if tail.is_empty() {
        return true;
    }
    // Relaxed: validated by the caller's seqlock.
    let have = words[bytes.len() / 8].load(Ordering::Relaxed).to_ne_bytes();
    have[..tail.len()] == *tail
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn block(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn round_trip_all_lengths() {
        let b = block(64);
        let mut out = Vec::new();
        for klen in [0, 1, 7, 8, 9, 16, 33] {
            for vlen in [0, 1, 8, 63, 100] {
                let key: Vec<u8> = (0..klen as u8).collect();
                let val: Vec<u8> = (0..vlen).map(|i| (i * 7) as u8).collect();
                write(&b, &key, 42, &val).unwrap();
                assert_eq!(read(&b, &key, 42, Some(&mut out)), Read::Match);
                assert_eq!(out, val);
                assert_eq!(read(&b, &key, 43, None), Read::Mismatch);
                let mut other = key.clone();
                other.push(1);
                assert_eq!(read(&b, &other, 42, None), Read::Mismatch);
                assert!(read_key(&b, &mut out));
                assert_eq!(out, key);
            }
        }
        assert!(
            write(&b, &[0; 100], 0, &[0; 500]).is_none(),
            "too large for the block"
        );
        b[0].store(u64::MAX, Ordering::Relaxed);
        assert_eq!(read(&b, b"k", 0, None), Read::Invalid);
    }
}
