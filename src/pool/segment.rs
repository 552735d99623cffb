//! Private coordination segments and the names of their keys.

use super::*;

// ---------------------------------------------------------------------------
// Private segments and their names.
// ---------------------------------------------------------------------------

pub(super) static SEGMENTS: AtomicU64 = AtomicU64::new(0);

/// A private dictionary with a unique name, unlinked when dropped (or
/// earlier, by [`Private::drop_name`], once every process that needs it has
/// attached).
pub(super) struct Private {
    pub(super) dict: Option<ShmDict>,
    pub(super) name: String,
    pub(super) named: Cell<bool>,
}

impl Private {
    pub(super) fn create(kind: &str) -> Result<Private, PoolError> {
        loop {
            let name = format!(
                "shmdict-{kind}-{}-{}",
                std::process::id(),
                // Relaxed: only uniqueness matters.
                SEGMENTS.fetch_add(1, Ordering::Relaxed)
            );
            match ShmDict::options()
                .capacity(1 << 16)
                .create_new(true)
                .open(&name)
            {
                Ok(dict) => {
                    return Ok(Private {
                        dict: Some(dict),
                        name,
                        named: Cell::new(true),
                    })
                }
                // Left by a dead process whose pid we reuse: take another.
                Err(Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) fn dict(&self) -> &ShmDict {
        self.dict.as_ref().expect("present until dropped")
    }

    /// Removes the segment's name now. Processes attached keep using it;
    /// the memory goes when the last of them detaches or dies. So once
    /// every child has attached, a parent SIGKILLed later leaves nothing
    /// in /dev/shm.
    pub(super) fn drop_name(&self) {
        if self.named.replace(false) {
            let _ = ShmDict::unlink(&self.name);
        }
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        drop(self.dict.take());
        self.drop_name();
    }
}

pub(super) fn get_u64(d: &ShmDict, key: &str) -> crate::Result<Option<u64>> {
    Ok(d.get(key)?
        .and_then(|v| Some(u64::from_le_bytes(v.try_into().ok()?))))
}

pub(super) fn set_u64(d: &ShmDict, key: &str, v: u64) -> crate::Result<()> {
    d.insert(key, v.to_le_bytes())
}

pub(super) fn le(v: Option<&[u8]>) -> u64 {
    v.and_then(|b| Some(u64::from_le_bytes(b.try_into().ok()?)))
        .unwrap_or(0)
}

pub(super) fn cur_key(w: usize) -> String {
    format!("cur/{w}")
}

pub(super) fn result_key(w: usize, k: u64) -> String {
    format!("r/{w}/{k}")
}
