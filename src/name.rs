//! Segment name rules, shared by dictionaries, values and arrays.

use crate::error::{Error, Result};

/// Longest accepted name, in characters.
pub(crate) const MAX_NAME_LEN: usize = 200;

/// Accepts 1..=200 characters of `[A-Za-z0-9._-]`, except `.` and `..`
/// (which name directories, not files).
pub(crate) fn validate(name: &str) -> Result<()> {
    let reject = |reason| {
        Err(Error::InvalidName {
            name: name.chars().take(MAX_NAME_LEN + 10).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return reject("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return reject("it is longer than 200 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return reject("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed");
    }
    if name == "." || name == ".." {
        return reject("'.' and '..' are not file names");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        for ok in ["a", "A-z_0.9", &"x".repeat(200), "-", ".hidden", "..."] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(201),
            "a/b",
            "/a",
            "a b",
            "é",
            "a\0",
            ".",
            "..",
            "a:b",
        ] {
            assert!(
                matches!(validate(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
