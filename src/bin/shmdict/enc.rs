//! Byte strings on the command line and in output: text, hex, base64, and
//! the binary-safe JSON objects of `dump`, `load` and `--json`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{Map, Value};

/// How a byte string is written on the command line and in output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enc {
    /// UTF-8 text, as is.
    Text,
    /// Lowercase hexadecimal, two digits per byte.
    Hex,
    /// Standard base64 with padding.
    Base64,
}

impl Enc {
    pub(crate) fn from_flags(hex: bool, base64: bool) -> Enc {
        match (hex, base64) {
            (true, _) => Enc::Hex,
            (_, true) => Enc::Base64,
            _ => Enc::Text,
        }
    }

    /// Decodes an argument. `what` names it in the error message.
    pub(crate) fn decode(self, s: &str, what: &str) -> Result<Vec<u8>, String> {
        match self {
            Enc::Text => Ok(s.as_bytes().to_vec()),
            Enc::Hex => hex_decode(s)
                .ok_or_else(|| format!("{what} {s:?} is not hexadecimal (two digits per byte)")),
            Enc::Base64 => B64
                .decode(s.trim())
                .map_err(|e| format!("{what} {s:?} is not base64: {e}")),
        }
    }

    /// Encodes bytes for output. Text that is not UTF-8 is an error that
    /// suggests the binary-safe encodings.
    pub(crate) fn encode(self, b: &[u8], what: &str) -> Result<String, String> {
        match self {
            Enc::Text => String::from_utf8(b.to_vec()).map_err(|_| {
                format!("{what} is not UTF-8 text: print it with --hex, --base64 or --json")
            }),
            Enc::Hex => Ok(hex_encode(b)),
            Enc::Base64 => Ok(B64.encode(b)),
        }
    }
}

pub(crate) fn hex_encode(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

pub(crate) fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Puts `bytes` into `obj` as `field` (a JSON string) if it is UTF-8, else
/// as `field_b64` (base64). This is the binary-safe encoding of `dump`,
/// `load` and every `--json` output.
pub(crate) fn put_bytes(obj: &mut Map<String, Value>, field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => obj.insert(field.to_owned(), Value::String(s.to_owned())),
        Err(_) => obj.insert(format!("{field}_b64"), Value::String(B64.encode(bytes))),
    };
}

/// Reads the byte string `field` or `field_b64` from `obj`: `Ok(None)` if
/// neither is there.
pub(crate) fn get_bytes(obj: &Map<String, Value>, field: &str) -> Result<Option<Vec<u8>>, String> {
    let b64_field = format!("{field}_b64");
    match (obj.get(field), obj.get(&b64_field)) {
        (Some(_), Some(_)) => Err(format!("both \"{field}\" and \"{b64_field}\"")),
        (Some(Value::String(s)), None) => Ok(Some(s.as_bytes().to_vec())),
        (Some(_), None) => Err(format!("\"{field}\" is not a string")),
        (None, Some(Value::String(s))) => B64
            .decode(s)
            .map(Some)
            .map_err(|e| format!("\"{b64_field}\" is not base64: {e}")),
        (None, Some(_)) => Err(format!("\"{b64_field}\" is not a string")),
        (None, None) => Ok(None),
    }
}

/// A `{"key": …, "value": …}` object; `value: null` when absent.
pub(crate) fn key_value(key: &[u8], value: Option<&[u8]>) -> Value {
    let mut obj = Map::new();
    put_bytes(&mut obj, "key", key);
    match value {
        Some(v) => put_bytes(&mut obj, "value", v),
        None => {
            obj.insert("value".into(), Value::Null);
        }
    }
    Value::Object(obj)
}

/// Parses one line of a dump: a key and a value.
pub(crate) fn parse_entry(line: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("not a JSON object".into());
    };
    if let Some(extra) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "key" | "key_b64" | "value" | "value_b64"))
    {
        return Err(format!("unexpected field \"{extra}\""));
    }
    let key = get_bytes(&obj, "key")?.ok_or("no \"key\" or \"key_b64\"")?;
    let value = get_bytes(&obj, "value")?.ok_or("no \"value\" or \"value_b64\"")?;
    Ok((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xff, b'a'];
        for enc in [Enc::Hex, Enc::Base64] {
            let s = enc.encode(&bytes, "value").unwrap();
            assert_eq!(enc.decode(&s, "value").unwrap(), bytes);
        }
        assert_eq!(hex_encode(&[0xab, 0x01]), "ab01");
        assert_eq!(hex_decode("AB01"), Some(vec![0xab, 1]));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
        assert!(Enc::Text.encode(&bytes, "value").is_err());
        assert_eq!(Enc::Text.encode(b"hi", "value").unwrap(), "hi");
    }

    #[test]
    fn json_entries_are_binary_safe() {
        let line = key_value(&[0xff, 0], Some(b"text")).to_string();
        assert!(line.contains("key_b64") && line.contains("\"value\":\"text\""));
        assert_eq!(
            parse_entry(&line).unwrap(),
            (vec![0xff, 0], b"text".to_vec())
        );
        assert!(parse_entry("{\"key\":\"a\"}").is_err());
        assert!(parse_entry("{\"key\":\"a\",\"value\":1}").is_err());
        assert!(parse_entry("{\"key\":\"a\",\"key_b64\":\"YQ==\",\"value\":\"v\"}").is_err());
        assert!(parse_entry("[1]").is_err());
        assert!(parse_entry("{\"key\":\"a\",\"value\":\"b\",\"x\":0}").is_err());
    }
}
