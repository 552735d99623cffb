//! Acknowledged writes: values that follow from their key alone, and the
//! append-only logs in which writer processes acknowledge each insert that
//! returned `Ok` before they start the next one, so that a parent can tell,
//! after SIGKILLing them, exactly which keys must be present.
//!
//! The logs are plain files (outside /dev/shm, so they neither depend on the
//! library under test nor take room from a small /dev/shm), one record of 8
//! bytes per `write(2)`: a SIGKILL lands before or after a record, never
//! inside one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::mix;

/// Lengths of the values of [`keyed_value`] before their 8-byte checksum:
/// small ones, and several hundred bytes, so that the arena grows as well as
/// the index.
pub(crate) const KEYED_LENS: [usize; 8] = [0, 5, 16, 40, 100, 260, 480, 900];

fn key_hash(key: &[u8]) -> u64 {
    key.iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
        .wrapping_add(key.len() as u64)
}

/// The value `key` is stored with: the key's bytes repeated to a length
/// chosen by its hash, then a checksum of key and length. A value of
/// another key, a torn or a truncated one, never equals it.
pub(crate) fn keyed_value(key: &[u8]) -> Vec<u8> {
    let h = mix(key_hash(key));
    let len = KEYED_LENS[(h % KEYED_LENS.len() as u64) as usize];
    let mut v: Vec<u8> = key.iter().copied().cycle().take(len).collect();
    v.extend_from_slice(&mix(h ^ len as u64).to_le_bytes());
    v
}

/// Panics unless `got` is `key`'s value, saying what differs.
pub(crate) fn assert_keyed(key: &[u8], got: &[u8], who: &str) {
    let want = keyed_value(key);
    if got != want.as_slice() {
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "{who}: wrong value for key {:?}: {} bytes, expected {}; first difference at byte {first_diff:?}",
            String::from_utf8_lossy(key),
            got.len(),
            want.len()
        );
    }
}

static DIRS: AtomicU64 = AtomicU64::new(0);

/// A fresh directory for acknowledgement logs, removed (with its logs) when
/// dropped.
pub(crate) struct AckDir(PathBuf);

impl AckDir {
    pub(crate) fn new(tag: &str) -> AckDir {
        let dir = std::env::temp_dir().join(format!(
            "shmdict-test-{tag}-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        AckDir(dir)
    }

    /// The directory, as a child-process argument.
    pub(crate) fn path(&self) -> String {
        self.0.display().to_string()
    }

    /// The log of writer `who`, as a child-process argument.
    pub(crate) fn log(&self, who: &str) -> String {
        self.0.join(format!("{who}.acks")).display().to_string()
    }
}

impl Drop for AckDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The writer's end of a log: each record is one `write(2)` of 8 bytes on a
/// file opened `O_APPEND`.
pub(crate) struct AckLog(File);

impl AckLog {
    pub(crate) fn create(path: &str) -> AckLog {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        AckLog(f)
    }

    pub(crate) fn record(&mut self, r: u64) {
        // One write of 8 bytes to a regular file: the kernel copies it
        // whole before a fatal signal is acted on.
        let n = self
            .0
            .write(&r.to_le_bytes())
            .expect("append an acknowledgement");
        assert_eq!(n, 8, "short write of an acknowledgement");
    }
}

/// Every record of the log at `path` (none if it does not exist yet).
pub(crate) fn read_log(path: impl AsRef<Path>) -> Vec<u64> {
    let path = path.as_ref();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    assert_eq!(
        bytes.len() % 8,
        0,
        "{}: a torn acknowledgement record",
        path.display()
    );
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The last record of the log at `path`, reading only its tail (for a
/// parent polling a writer closely).
pub(crate) fn last_record(path: impl AsRef<Path>) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if len < 8 {
        return None;
    }
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, len / 8 * 8 - 8).ok()?;
    Some(u64::from_le_bytes(b))
}
