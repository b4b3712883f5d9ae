//! The strict, borrowing JSON reader for token headers and claims.
//!
//! A document is read into one flat list of nodes (a tape): an object or array node records where its subtree
//! ends, and an object's members follow it as key, value, key, value. Reading a token's claims set therefore
//! takes one allocation instead of one per object and array, and strings borrow the decoded bytes unless they
//! hold escapes. Objects that repeat a key are refused while reading, at every depth: two readers of the same
//! token (this proxy and the provider) must not be able to see different claims.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::Violation;

/// Nodes reserved up front: a GP Connect claims set has about sixty.
const TYPICAL_NODES: usize = 96;

/// Members of an object compared pairwise for repeats; a larger object is sorted instead.
const PAIRWISE_MEMBERS: usize = 16;

/// One node of the tape.
#[derive(Debug, Clone, PartialEq)]
enum Node<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX`.
    Big(u64),
    Float(f64),
    Str(Cow<'a, str>),
    /// An object member's key; its value follows.
    Key(Cow<'a, str>),
    /// An array; its elements follow, up to `end` (exclusive).
    Arr {
        end: usize,
    },
    /// An object; its members follow, up to `end` (exclusive).
    Obj {
        end: usize,
    },
}

/// A JSON document read from bytes, borrowing its strings from them.
#[derive(Debug)]
pub(super) struct Doc<'a> {
    nodes: Vec<Node<'a>>,
}

impl<'a> Doc<'a> {
    /// The top-level object.
    pub(super) fn root(&self) -> Obj<'_> {
        Obj(Json {
            nodes: &self.nodes,
            at: 0,
        })
    }
}

/// Reads a JSON object whose keys are distinct at every depth from `bytes`.
pub(super) fn json_object(bytes: &[u8]) -> Result<Doc<'_>, Violation> {
    // serde_json bounds nesting (128 levels) and the token size bounds everything else.
    let mut reader = serde_json::Deserializer::from_slice(bytes);
    let mut nodes = Vec::with_capacity(TYPICAL_NODES);
    let parsed = Tape(&mut nodes)
        .deserialize(&mut reader)
        .and_then(|()| reader.end());
    match parsed {
        Ok(()) if matches!(nodes.first(), Some(Node::Obj { .. })) => Ok(Doc { nodes }),
        Err(e) if e.to_string().starts_with(DUPLICATE_KEY) => Err(Violation::DuplicateKey),
        _ => Err(Violation::Malformed),
    }
}

const DUPLICATE_KEY: &str = "duplicate key";

/// A value in a document: a place on its tape.
#[derive(Debug, Clone, Copy)]
pub(super) struct Json<'d> {
    nodes: &'d [Node<'d>],
    at: usize,
}

/// An object in a document.
#[derive(Debug, Clone, Copy)]
pub(super) struct Obj<'d>(Json<'d>);

impl<'d> Json<'d> {
    fn node(&self) -> &'d Node<'d> {
        &self.nodes[self.at]
    }

    /// Where the next sibling starts.
    fn next(&self) -> usize {
        match self.node() {
            Node::Arr { end } | Node::Obj { end } => *end,
            _ => self.at + 1,
        }
    }

    pub(super) fn as_str(self) -> Option<&'d str> {
        match self.node() {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Like `serde_json::Value::as_i64`: an integer that fits, never a float.
    pub(super) fn as_i64(self) -> Option<i64> {
        match self.node() {
            Node::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub(super) fn as_object(self) -> Option<Obj<'d>> {
        matches!(self.node(), Node::Obj { .. }).then_some(Obj(self))
    }

    /// The elements of an array; `None` for anything else.
    pub(super) fn as_array(self) -> Option<impl Iterator<Item = Json<'d>>> {
        let Node::Arr { end } = *self.node() else {
            return None;
        };
        let nodes = self.nodes;
        let mut at = self.at + 1;
        Some(std::iter::from_fn(move || {
            (at < end).then(|| {
                let item = Json { nodes, at };
                at = item.next();
                item
            })
        }))
    }

    /// A member of an object; `None` for anything else.
    pub(super) fn get(self, key: &str) -> Option<Json<'d>> {
        self.as_object()?.get(key)
    }

    fn to_value(self) -> Value {
        match self.node() {
            Node::Null | Node::Key(_) => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(n) => Value::from(*n),
            Node::Big(n) => Value::from(*n),
            Node::Float(f) => Value::from(*f),
            Node::Str(s) => Value::String(s.to_string()),
            Node::Arr { .. } => Value::Array(
                self.as_array()
                    .into_iter()
                    .flatten()
                    .map(Json::to_value)
                    .collect(),
            ),
            Node::Obj { .. } => Value::Object(Obj(self).to_map()),
        }
    }
}

impl<'d> Obj<'d> {
    /// The members, in order.
    fn members(self) -> impl Iterator<Item = (&'d str, Json<'d>)> {
        let nodes = self.0.nodes;
        let end = self.0.next();
        let mut at = self.0.at + 1;
        std::iter::from_fn(move || {
            if at + 1 >= end {
                return None;
            }
            let key = match &nodes[at] {
                Node::Key(k) => k.as_ref(),
                _ => return None,
            };
            let value = Json { nodes, at: at + 1 };
            at = value.next();
            Some((key, value))
        })
    }

    pub(super) fn get(self, key: &str) -> Option<Json<'d>> {
        self.members().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub(super) fn len(self) -> usize {
        self.members().count()
    }

    pub(super) fn to_map(self) -> Map<String, Value> {
        self.members()
            .map(|(k, v)| (k.to_owned(), v.to_value()))
            .collect()
    }

    /// True when two members share a key: pairwise for a small object, sorted for a large one.
    fn repeats_a_key(self) -> bool {
        let mut small: [&str; PAIRWISE_MEMBERS] = [""; PAIRWISE_MEMBERS];
        for (n, (key, _)) in self.members().enumerate() {
            if n == PAIRWISE_MEMBERS {
                let mut sorted: Vec<&str> = self.members().map(|(k, _)| k).collect();
                sorted.sort_unstable();
                return sorted.windows(2).any(|w| w[0] == w[1]);
            }
            if small[..n].contains(&key) {
                return true;
            }
            small[n] = key;
        }
        false
    }
}

/// Reads one value onto the tape.
struct Tape<'v, 'a>(&'v mut Vec<Node<'a>>);

impl<'de> DeserializeSeed<'de> for Tape<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Tape<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.push(Node::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.push(Node::Int(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0
            .push(i64::try_from(v).map_or(Node::Big(v), Node::Int));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.push(Node::Float(v));
        Ok(())
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<(), E> {
        self.0.push(Node::Str(Cow::Borrowed(v)));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.push(Node::Str(Cow::Owned(v.to_owned())));
        Ok(())
    }

    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.0.push(Node::Str(Cow::Owned(v)));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push(Node::Null);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let start = self.0.len();
        self.0.push(Node::Arr { end: 0 });
        while seq.next_element_seed(Tape(self.0))?.is_some() {}
        let end = self.0.len();
        self.0[start] = Node::Arr { end };
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let start = self.0.len();
        self.0.push(Node::Obj { end: 0 });
        while map.next_key_seed(KeySeed(self.0))?.is_some() {
            map.next_value_seed(Tape(self.0))?;
        }
        let end = self.0.len();
        self.0[start] = Node::Obj { end };
        let object = Obj(Json {
            nodes: self.0,
            at: start,
        });
        if object.repeats_a_key() {
            return Err(serde::de::Error::custom(DUPLICATE_KEY));
        }
        Ok(())
    }
}

/// Reads an object key onto the tape, borrowed when it holds no escapes (serde's own `Cow` always copies).
struct KeySeed<'v, 'a>(&'v mut Vec<Node<'a>>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<(), E> {
        self.0.push(Node::Key(Cow::Borrowed(v)));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.push(Node::Key(Cow::Owned(v.to_owned())));
        Ok(())
    }
}
