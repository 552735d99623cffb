//! Tuples, their fields, and the patterns that select them.

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// One field of a [`Tuple`]: a small, self-describing set of kinds.
///
/// Equality is exact and bitwise for floats: `F64(0.0) != F64(-0.0)`, and a
/// NaN equals a NaN with the same bits. That is what makes a field usable as
/// an index key (equal fields have equal encodings). Serde values of any
/// other type travel as [`Field::Opaque`] bytes: see [`Field::opaque`].
#[derive(Clone, Debug)]
pub enum Field {
    /// A signed integer. Every integer type up to 32 bits, and `i64`,
    /// converts into this.
    I64(i64),
    /// A float (`f32` converts into this too).
    F64(f64),
    /// A UTF-8 string.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A boolean.
    Bool(bool),
    /// A serde value of the caller's choice, encoded with postcard. Matched
    /// only by its bytes.
    Opaque(Vec<u8>),
}

/// The kind of a [`Field`], for patterns that match any value of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FieldKind {
    /// [`Field::I64`].
    I64,
    /// [`Field::F64`].
    F64,
    /// [`Field::Str`].
    Str,
    /// [`Field::Bytes`].
    Bytes,
    /// [`Field::Bool`].
    Bool,
    /// [`Field::Opaque`].
    Opaque,
}

impl Field {
    /// Encodes a serde value as an opaque field (postcard).
    pub fn opaque<T: Serialize + ?Sized>(value: &T) -> Result<Field, postcard::Error> {
        postcard::to_allocvec(value).map(Field::Opaque)
    }

    /// Decodes an opaque field as `T`; `None` if the field is not opaque or
    /// its bytes are not a whole `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Option<T> {
        match self {
            Field::Opaque(b) => match postcard::take_from_bytes(b) {
                Ok((v, [])) => Some(v),
                _ => None,
            },
            _ => None,
        }
    }

    /// The field's kind.
    pub fn kind(&self) -> FieldKind {
        match self {
            Field::I64(_) => FieldKind::I64,
            Field::F64(_) => FieldKind::F64,
            Field::Str(_) => FieldKind::Str,
            Field::Bytes(_) => FieldKind::Bytes,
            Field::Bool(_) => FieldKind::Bool,
            Field::Opaque(_) => FieldKind::Opaque,
        }
    }

    /// The integer, if this is an `I64`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Field::I64(v) => Some(*v),
            _ => None,
        }
    }

    /// The float, if this is an `F64`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Field::F64(v) => Some(*v),
            _ => None,
        }
    }

    /// The string, if this is a `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(v) => Some(v),
            _ => None,
        }
    }

    /// The bytes, if this is `Bytes`.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Field::Bytes(v) => Some(v),
            _ => None,
        }
    }

    /// The boolean, if this is a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Field::Bool(v) => Some(*v),
            _ => None,
        }
    }

    /// The bytes that identify this field for the index: a kind tag, then
    /// the value (floats by their bits). Equal fields, and only they, give
    /// equal bytes.
    pub(crate) fn index_bytes(&self) -> Vec<u8> {
        let (tag, body): (u8, &[u8]) = match self {
            Field::I64(v) => return [&[0u8][..], &v.to_le_bytes()].concat(),
            Field::F64(v) => return [&[1u8][..], &v.to_bits().to_le_bytes()].concat(),
            Field::Str(s) => (2, s.as_bytes()),
            Field::Bytes(b) => (3, b),
            Field::Bool(b) => return vec![4, *b as u8],
            Field::Opaque(b) => (5, b),
        };
        let mut v = Vec::with_capacity(1 + body.len());
        v.push(tag);
        v.extend_from_slice(body);
        v
    }
}

impl PartialEq for Field {
    fn eq(&self, other: &Field) -> bool {
        match (self, other) {
            (Field::I64(a), Field::I64(b)) => a == b,
            (Field::F64(a), Field::F64(b)) => a.to_bits() == b.to_bits(),
            (Field::Str(a), Field::Str(b)) => a == b,
            (Field::Bytes(a), Field::Bytes(b)) => a == b,
            (Field::Bool(a), Field::Bool(b)) => a == b,
            (Field::Opaque(a), Field::Opaque(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Field {}

impl Hash for Field {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.index_bytes().hash(state);
    }
}

macro_rules! field_from {
    ($variant:ident: $($t:ty => $conv:expr),* $(,)?) => {
        $(
            impl From<$t> for Field {
                #[allow(clippy::redundant_closure_call)]
                fn from(v: $t) -> Field {
                    Field::$variant(($conv)(v))
                }
            }
        )*
    };
}

field_from!(I64:
    i8 => i64::from, i16 => i64::from, i32 => i64::from, i64 => |v| v,
    u8 => i64::from, u16 => i64::from, u32 => i64::from,
);
field_from!(F64: f32 => f64::from, f64 => |v| v);
field_from!(Str: &str => str::to_owned, String => |v| v, &String => String::clone);
field_from!(Bytes: &[u8] => <[u8]>::to_vec, Vec<u8> => |v| v);
field_from!(Bool: bool => |v| v);

impl<const N: usize> From<&[u8; N]> for Field {
    fn from(v: &[u8; N]) -> Field {
        Field::Bytes(v.to_vec())
    }
}

/// An ordered sequence of [`Field`]s: what a tuple space holds.
///
/// Build one with the [`tuple!`](crate::tuple) macro:
/// `tuple!("sum", 0)` is `("sum", 0)`, a tuple of arity 2. At most
/// [`MAX_ARITY`](crate::space::MAX_ARITY) fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple(Vec<Field>);

impl Tuple {
    /// A tuple of these fields.
    pub fn new(fields: Vec<Field>) -> Tuple {
        Tuple(fields)
    }

    /// The fields.
    pub fn fields(&self) -> &[Field] {
        &self.0
    }

    /// The fields, by value.
    pub fn into_fields(self) -> Vec<Field> {
        self.0
    }

    /// The arity (number of fields).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the tuple has no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Field `i`, if the tuple has one.
    pub fn get(&self, i: usize) -> Option<&Field> {
        self.0.get(i)
    }

    /// Field `i` as an integer (`None` if absent or another kind).
    pub fn i64(&self, i: usize) -> Option<i64> {
        self.get(i).and_then(Field::as_i64)
    }

    /// Field `i` as a float.
    pub fn f64(&self, i: usize) -> Option<f64> {
        self.get(i).and_then(Field::as_f64)
    }

    /// Field `i` as a string.
    pub fn str(&self, i: usize) -> Option<&str> {
        self.get(i).and_then(Field::as_str)
    }

    /// Field `i` as bytes.
    pub fn bytes(&self, i: usize) -> Option<&[u8]> {
        self.get(i).and_then(Field::as_bytes)
    }

    /// Field `i` as a boolean.
    pub fn bool(&self, i: usize) -> Option<bool> {
        self.get(i).and_then(Field::as_bool)
    }

    /// Field `i` decoded from an opaque serde value.
    pub fn decode<T: DeserializeOwned>(&self, i: usize) -> Option<T> {
        self.get(i).and_then(Field::decode)
    }

    /// The stored encoding (see [`crate::space`], "Key scheme"): the arity
    /// (u8), then per field a kind tag (u8) and its value: `I64` 0 and
    /// `F64` 1 as 8 bytes LE (floats by their bits), `Bool` 4 as one byte
    /// 0 or 1, `Str` 2, `Bytes` 3 and `Opaque` 5 as a u32 LE length and the
    /// bytes. The caller keeps the arity and lengths in range.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 9 * self.0.len());
        out.push(self.0.len() as u8);
        for f in &self.0 {
            let var: (u8, &[u8]) = match f {
                Field::I64(v) => {
                    out.push(0);
                    out.extend_from_slice(&v.to_le_bytes());
                    continue;
                }
                Field::F64(v) => {
                    out.push(1);
                    out.extend_from_slice(&v.to_bits().to_le_bytes());
                    continue;
                }
                Field::Bool(b) => {
                    out.extend_from_slice(&[4, *b as u8]);
                    continue;
                }
                Field::Str(s) => (2, s.as_bytes()),
                Field::Bytes(b) => (3, b),
                Field::Opaque(b) => (5, b),
            };
            out.push(var.0);
            out.extend_from_slice(&(var.1.len() as u32).to_le_bytes());
            out.extend_from_slice(var.1);
        }
        out
    }

    /// The largest length a variable-size field may have.
    pub(crate) fn max_field_len(&self) -> usize {
        self.0
            .iter()
            .map(|f| match f {
                Field::Str(s) => s.len(),
                Field::Bytes(b) | Field::Opaque(b) => b.len(),
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// Decodes a stored tuple; `None` unless `bytes` is exactly one
    /// well-formed tuple (nothing in the segment is trusted).
    pub(crate) fn decode_stored(bytes: &[u8]) -> Option<Tuple> {
        fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if rest.len() < n {
                return None;
            }
            let (head, tail) = rest.split_at(n);
            *rest = tail;
            Some(head)
        }
        let (&arity, mut rest) = bytes.split_first()?;
        let mut fields = Vec::with_capacity(arity as usize);
        for _ in 0..arity {
            let tag = take(&mut rest, 1)?[0];
            let f = match tag {
                0 => Field::I64(i64::from_le_bytes(take(&mut rest, 8)?.try_into().ok()?)),
                1 => Field::F64(f64::from_bits(u64::from_le_bytes(
                    take(&mut rest, 8)?.try_into().ok()?,
                ))),
                4 => match take(&mut rest, 1)?[0] {
                    0 => Field::Bool(false),
                    1 => Field::Bool(true),
                    _ => return None,
                },
                2 | 3 | 5 => {
                    let n = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
                    let body = take(&mut rest, n)?.to_vec();
                    match tag {
                        2 => Field::Str(String::from_utf8(body).ok()?),
                        3 => Field::Bytes(body),
                        _ => Field::Opaque(body),
                    }
                }
                _ => return None,
            };
            fields.push(f);
        }
        rest.is_empty().then_some(Tuple(fields))
    }
}

impl From<Vec<Field>> for Tuple {
    fn from(fields: Vec<Field>) -> Tuple {
        Tuple(fields)
    }
}

/// How a pattern matches one field.
pub enum Match {
    /// Any value.
    Any,
    /// Exactly this value (see [`Field`] for float equality).
    Exact(Field),
    /// Any value of this kind.
    Kind(FieldKind),
    /// Whatever the function accepts. It runs in the caller's process, on
    /// fields of candidate tuples (so it is never serialized), and may run
    /// more than once per field. It must not call into the space.
    Pred(Box<dyn Fn(&Field) -> bool + Send + Sync>),
}

impl Match {
    /// A predicate match (lindypy's "functional patterns").
    pub fn pred(f: impl Fn(&Field) -> bool + Send + Sync + 'static) -> Match {
        Match::Pred(Box::new(f))
    }

    /// Whether `field` matches.
    pub fn matches(&self, field: &Field) -> bool {
        match self {
            Match::Any => true,
            Match::Exact(f) => f == field,
            Match::Kind(k) => field.kind() == *k,
            Match::Pred(p) => p(field),
        }
    }
}

impl fmt::Debug for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Any => f.write_str("Any"),
            Match::Exact(v) => f.debug_tuple("Exact").field(v).finish(),
            Match::Kind(k) => f.debug_tuple("Kind").field(k).finish(),
            Match::Pred(_) => f.write_str("Pred(..)"),
        }
    }
}

impl From<FieldKind> for Match {
    fn from(k: FieldKind) -> Match {
        Match::Kind(k)
    }
}

impl From<Field> for Match {
    fn from(f: Field) -> Match {
        Match::Exact(f)
    }
}

macro_rules! match_from {
    ($($t:ty),* $(,)?) => {
        $(
            impl From<$t> for Match {
                fn from(v: $t) -> Match {
                    Match::Exact(Field::from(v))
                }
            }
        )*
    };
}

match_from!(
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    f32,
    f64,
    &str,
    String,
    &String,
    &[u8],
    Vec<u8>,
    bool
);

impl<const N: usize> From<&[u8; N]> for Match {
    fn from(v: &[u8; N]) -> Match {
        Match::Exact(Field::from(v))
    }
}

/// A template that selects tuples: one [`Match`] per field, and the arity.
///
/// Build one with the [`pattern!`](crate::pattern) macro: `pattern!("sum",
/// _)` matches every 2-tuple whose first field is the string `"sum"`.
#[derive(Debug, Default)]
pub struct Pattern(Vec<Match>);

impl Pattern {
    /// A pattern of these matches.
    pub fn new(matches: Vec<Match>) -> Pattern {
        Pattern(matches)
    }

    /// The matches, one per field.
    pub fn matches_list(&self) -> &[Match] {
        &self.0
    }

    /// The arity of the tuples it matches.
    pub fn arity(&self) -> usize {
        self.0.len()
    }

    /// Whether `t` matches: same arity, every field matches.
    pub fn matches(&self, t: &Tuple) -> bool {
        t.len() == self.0.len() && self.0.iter().zip(t.fields()).all(|(m, f)| m.matches(f))
    }

    /// The first field, if the pattern fixes it exactly (or the arity is 0):
    /// then the pattern looks only at one index bucket.
    pub(crate) fn exact_first(&self) -> Option<Option<&Field>> {
        match self.0.first() {
            None => Some(None),
            Some(Match::Exact(f)) => Some(Some(f)),
            Some(_) => None,
        }
    }
}

impl From<Vec<Match>> for Pattern {
    fn from(matches: Vec<Match>) -> Pattern {
        Pattern(matches)
    }
}

/// Builds a [`Tuple`](crate::space::Tuple): each argument is anything that
/// converts into a [`Field`](crate::space::Field) (integers, floats, `&str`,
/// `String`, `&[u8]`, `Vec<u8>`, `bool`, or a `Field`).
///
/// ```
/// use shmdict::space::Field;
/// let t = shmdict::tuple!("point", 3, 4.5, true);
/// assert_eq!(t.len(), 4);
/// assert_eq!(t.get(1), Some(&Field::I64(3)));
/// ```
#[macro_export]
macro_rules! tuple {
    ($($field:expr),* $(,)?) => {
        $crate::space::Tuple::new(::std::vec![$($crate::space::Field::from($field)),*])
    };
}

/// Builds a [`Pattern`](crate::space::Pattern). Each argument is one of:
///
/// - `_`: any value;
/// - a value (anything [`tuple!`](crate::tuple) accepts): exactly that value;
/// - a [`FieldKind`](crate::space::FieldKind): any value of that kind;
/// - a [`Match`](crate::space::Match), e.g. `Match::pred(|f| ...)`.
///
/// ```
/// use shmdict::space::{Field, FieldKind, Match};
/// use shmdict::{pattern, tuple};
/// let p = pattern!("job", FieldKind::I64, Match::pred(|f| f.as_i64() > Some(2)), _);
/// assert!(p.matches(&tuple!("job", 1, 3, "x")));
/// assert!(!p.matches(&tuple!("job", 1, 2, "x")));
/// assert!(!p.matches(&tuple!("job", "1", 3, "x")));
/// assert!(!p.matches(&tuple!("job", 1, 3)));
/// ```
#[macro_export]
macro_rules! pattern {
    ($($items:tt)*) => {
        $crate::__pattern_items!([] $($items)*)
    };
}

/// Implementation detail of [`pattern!`](crate::pattern): turns the items
/// into `Match` expressions one at a time, then builds the pattern.
#[doc(hidden)]
#[macro_export]
macro_rules! __pattern_items {
    ([$($done:expr,)*]) => {
        $crate::space::Pattern::new(::std::vec![$($done),*])
    };
    ([$($done:expr,)*] _ $(, $($rest:tt)*)?) => {
        $crate::__pattern_items!([$($done,)* $crate::space::Match::Any,] $($($rest)*)?)
    };
    ([$($done:expr,)*] $e:expr $(, $($rest:tt)*)?) => {
        $crate::__pattern_items!([$($done,)* $crate::space::Match::from($e),] $($($rest)*)?)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_compare_bitwise_and_encode_distinctly() {
        assert_ne!(Field::from(0.0), Field::from(-0.0));
        assert_eq!(Field::from(f64::NAN), Field::from(f64::NAN));
        assert_ne!(Field::from(1).index_bytes(), Field::from(1.0).index_bytes());
        assert_ne!(
            Field::from("a").index_bytes(),
            Field::from(&b"a"[..]).index_bytes()
        );
    }

    #[test]
    fn tuples_round_trip_and_reject_trailing_bytes() {
        let t = crate::tuple!(
            "x",
            1,
            2.5,
            true,
            b"raw",
            Field::opaque(&(1u8, "s")).unwrap()
        );
        let enc = t.encode();
        assert_eq!(Tuple::decode_stored(&enc), Some(t.clone()));
        let mut longer = enc.clone();
        longer.push(0);
        assert_eq!(Tuple::decode_stored(&longer), None);
        assert_eq!(Tuple::decode_stored(&enc[..enc.len() - 1]), None);
        assert_eq!(t.decode::<(u8, String)>(5), Some((1, "s".to_owned())));
    }

    #[test]
    fn pattern_macro_forms() {
        let p = crate::pattern!(_, "a", FieldKind::Bool,);
        assert_eq!(p.arity(), 3);
        assert!(p.matches(&crate::tuple!(9, "a", false)));
        assert!(p.exact_first().is_none());
        assert!(crate::pattern!().exact_first().is_some());
        assert!(crate::pattern!("a").exact_first().is_some());
    }
}
