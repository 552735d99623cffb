//! The stored format of an index bucket: the tuples of one (arity,
//! first-field hash class), in the order they were posted.
//!
//! A bucket's value is a sequence of entries, back to back, each:
//!
//! | bytes | field                                                        |
//! |-------|--------------------------------------------------------------|
//! | 8     | id, high word: identity of the posting process (pid, start)   |
//! | 8     | id, low word: that process's sequence number                  |
//! | 8     | claim: 0 = available, else identity of the claiming process   |
//! | 2     | inbox name length `n` (0 unless claimed by `take_into`)       |
//! | n     | inbox name                                                     |
//! | 4     | tuple length `m`                                               |
//! | m     | the tuple, as `Tuple::encode` writes it (see `tuple.rs`)        |
//!
//! The tuple's bytes are shmdict's own format, not postcard: its arity, then
//! per field a kind tag and the field's bytes (only an `Opaque` field's
//! bytes are postcard, of the serde value it holds).
//!
//! All integers little-endian. Nothing read from the segment is trusted:
//! [`entries`] reports any length that runs past the value as corrupt.

/// Identifies one posted tuple for its whole life: (posting process
/// identity, that process's sequence number). Unique without a shared
/// counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Id(pub(crate) u64, pub(crate) u64);

impl Id {
    pub(crate) fn to_bytes(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.0.to_le_bytes());
        b[8..].copy_from_slice(&self.1.to_le_bytes());
        b
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Option<Id> {
        Some(Id(le64(b.get(..8)?)?, le64(b.get(8..16)?)?))
    }
}

/// One entry of a bucket, borrowing from the bucket's bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry<'a> {
    /// Byte range of the entry in the bucket value.
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) id: Id,
    pub(crate) claim: u64,
    pub(crate) inbox: &'a [u8],
    pub(crate) tuple: &'a [u8],
}

/// Appends an entry to `out`. `inbox` is at most `u16::MAX` bytes and
/// `tuple` at most `u32::MAX` (the callers check).
pub(crate) fn push(out: &mut Vec<u8>, id: Id, claim: u64, inbox: &[u8], tuple: &[u8]) {
    out.reserve(30 + inbox.len() + tuple.len());
    out.extend_from_slice(&id.to_bytes());
    out.extend_from_slice(&claim.to_le_bytes());
    out.extend_from_slice(&(inbox.len() as u16).to_le_bytes());
    out.extend_from_slice(inbox);
    out.extend_from_slice(&(tuple.len() as u32).to_le_bytes());
    out.extend_from_slice(tuple);
}

/// Appends `e` to `out` unchanged.
pub(crate) fn push_entry(out: &mut Vec<u8>, e: &Entry<'_>) {
    push(out, e.id, e.claim, e.inbox, e.tuple);
}

fn le64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// The entries of a bucket value; an `Err` (and nothing after it) if the
/// bytes are not a well-formed sequence of entries.
pub(crate) fn entries(buf: &[u8]) -> Entries<'_> {
    Entries { buf, pos: 0 }
}

/// Iterator returned by [`entries`].
#[derive(Debug)]
pub(crate) struct Entries<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Entries<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn entry(&mut self) -> Option<Entry<'a>> {
        let start = self.pos;
        let id = Id::from_bytes(self.take(16)?)?;
        let claim = le64(self.take(8)?)?;
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        let inbox = self.take(n)?;
        let m = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        let tuple = self.take(m)?;
        Some(Entry {
            start,
            end: self.pos,
            id,
            claim,
            inbox,
            tuple,
        })
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        match self.entry() {
            Some(e) => Some(Ok(e)),
            None => {
                // Stop after reporting: nothing after a bad length is usable.
                self.pos = self.buf.len();
                Some(Err("tuple-space bucket entry runs past the value"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_truncation_is_an_error() {
        let mut v = Vec::new();
        push(&mut v, Id(1, 2), 0, b"", b"abc");
        push(&mut v, Id(3, 4), 77, b"inbox", b"");
        let es: Vec<_> = entries(&v).collect::<Result<_, _>>().unwrap();
        assert_eq!(es.len(), 2);
        assert_eq!(
            (es[0].id, es[0].claim, es[0].tuple),
            (Id(1, 2), 0, &b"abc"[..])
        );
        assert_eq!(
            (es[1].id, es[1].claim, es[1].inbox),
            (Id(3, 4), 77, &b"inbox"[..])
        );
        for cut in 1..v.len() {
            let r: Result<Vec<_>, _> = entries(&v[..cut]).collect();
            assert!(r.is_err() || cut == 33, "prefix of {cut} bytes");
        }
        // A huge length is an error, not a panic or an allocation.
        let mut bad = v[..16 + 8].to_vec();
        bad.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(entries(&bad).next().unwrap().is_err());
    }
}
