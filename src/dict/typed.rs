//! Typed values on a dictionary, encoded with postcard.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::dict::{Op, ShmDict};
use crate::error::{Error, Result};

/// A view of a [`ShmDict`] whose values are `T`, encoded with
/// [postcard](https://docs.rs/postcard) (a documented, stable wire format).
///
/// Obtained from [`ShmDict::typed`]. Keys are still byte strings. Reading a
/// value that does not decode as `T` is `Error::Codec`.
pub struct Typed<'a, T> {
    dict: &'a ShmDict,
    _marker: PhantomData<fn(T) -> T>,
}

impl<T> fmt::Debug for Typed<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Typed")
            .field("dict", &self.dict.name())
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<'a, T: Serialize + DeserializeOwned> Typed<'a, T> {
    pub(crate) fn new(dict: &'a ShmDict) -> Typed<'a, T> {
        Typed {
            dict,
            _marker: PhantomData,
        }
    }

    fn encode(&self, value: &T) -> Result<Vec<u8>> {
        postcard::to_allocvec(value).map_err(|source| Error::Codec {
            segment: self.dict.name().to_owned(),
            source,
        })
    }

    /// Decodes a whole value: bytes left over mean the value is not a `T`
    /// (postcard's `from_bytes` would ignore them).
    fn decode(&self, bytes: &[u8]) -> Result<T> {
        let codec = |source| Error::Codec {
            segment: self.dict.name().to_owned(),
            source,
        };
        match postcard::take_from_bytes(bytes) {
            Ok((value, [])) => Ok(value),
            Ok(_) => Err(codec(postcard::Error::DeserializeBadEncoding)),
            Err(e) => Err(codec(e)),
        }
    }

    /// The value of `key`, decoded.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<T>> {
        self.dict.get(key)?.map(|b| self.decode(&b)).transpose()
    }

    /// Sets `key` to `value`.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: &T) -> Result<()> {
        self.dict.insert(key, self.encode(value)?)
    }

    /// Atomically replaces the value of `key` with `f(current)`; `None`
    /// removes it. `f` may run more than once. Returns what was stored. If
    /// the current value does not decode as `T`, nothing is written and the
    /// result is `Error::Codec`.
    pub fn update(
        &self,
        key: impl AsRef<[u8]>,
        mut f: impl FnMut(Option<T>) -> Option<T>,
    ) -> Result<Option<T>> {
        let mut stored = None;
        self.dict.read_modify_write(key.as_ref(), |old| {
            let old = old.map(|b| self.decode(b)).transpose()?;
            stored = f(old);
            Ok(match &stored {
                Some(v) => Op::Set(self.encode(v)?),
                None => Op::Remove,
            })
        })?;
        Ok(stored)
    }

    /// The value of `key`, computing, storing and returning `f()` if absent:
    /// shared memoization (see [`ShmDict::get_or_insert_with`]; `f` runs in
    /// at most one process at a time for a key). If the stored bytes do not
    /// decode as `T`, the result is `Error::Codec`.
    #[cfg(not(loom))]
    pub fn get_or_insert_with(&self, key: impl AsRef<[u8]>, f: impl FnOnce() -> T) -> Result<T> {
        let mut computed = None;
        let (bytes, ours) = self.dict.memoize(key.as_ref(), || {
            let v = f();
            let bytes = self.encode(&v)?;
            computed = Some(v);
            Ok(bytes)
        })?;
        match computed {
            Some(v) if ours => Ok(v),
            _ => self.decode(&bytes),
        }
    }
}
