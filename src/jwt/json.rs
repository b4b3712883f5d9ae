//! The strict JSON reader for token headers and claims (RFC 8259).
//!
//! A document is read into one flat list of nodes (a tape): an object or array node records where its subtree
//! ends, and an object's members follow it as key, value, key, value. A string is a byte range of the text
//! unless it holds escapes, in which case its unescaped copy is kept beside the tape. Reading a typical claims
//! set therefore takes one allocation. Objects that repeat a key (compared after unescaping) are refused, at
//! every depth: two readers of the same token (this proxy and the provider) must not be able to see different
//! claims.
//!
//! Why not serde_json, which ssp uses everywhere else: this reader is one of the checks, on every request, and
//! serde's visitor dispatch per value cost more than the whole budget for decoding and validating a token. The
//! tests hold it to serde_json: on generated and mutated documents both accept the same texts, read the same
//! values and refuse the same repeats (`src/jwt/tests.rs`, `reader_agrees_with_serde_json`).

use serde_json::{Map, Value};

use super::Violation;
use crate::json_writer::special;

/// Nodes reserved up front: a GP Connect claims set has about sixty.
const TYPICAL_NODES: usize = 96;

/// Arrays and objects nested deeper than this are refused (serde_json's limit: 127 levels read, the 128th not).
const MAX_DEPTH: usize = 127;

/// Members of an object compared pairwise for repeats; a larger object is sorted instead.
const PAIRWISE_MEMBERS: usize = 16;

/// One node of the tape. Offsets are byte offsets into the text (a token is at most `MAX_TOKEN_BYTES`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX` that fits a `u64`.
    Big(u64),
    /// Any other number: one with a fraction or an exponent, or an integer too large for 64 bits.
    Float(f64),
    /// A string without escapes: the text between its quotes.
    Str(u32, u32),
    /// A string with escapes: its unescaped text is the `n`th kept copy.
    Escaped(u32),
    /// An object member's key, as a string; its value follows.
    Key(u32, u32),
    EscapedKey(u32),
    /// An array; its elements follow, up to `end` (exclusive).
    Arr {
        end: u32,
    },
    /// An object; its members follow, up to `end` (exclusive).
    Obj {
        end: u32,
    },
}

/// A JSON document read from text, borrowing its strings from it.
#[derive(Debug)]
pub(super) struct Doc<'a> {
    text: &'a str,
    nodes: Vec<Node>,
    /// The unescaped text of strings and keys that held escapes.
    unescaped: Vec<String>,
}

impl Doc<'_> {
    /// The top-level object.
    pub(super) fn root(&self) -> Obj<'_> {
        Obj(Json { doc: self, at: 0 })
    }
}

/// Reads a JSON object whose keys are distinct at every depth from `bytes` (UTF-8, RFC 8259 section 8.1).
/// Anything else, including a document that is not an object or has trailing text, is `Malformed`; a repeated
/// key is `DuplicateKey` (the first of the two faults met, reading from the start).
pub(super) fn json_object(bytes: &[u8]) -> Result<Doc<'_>, Violation> {
    match std::str::from_utf8(bytes) {
        Ok(text) => json_text(text),
        // The text up to the first byte that is not UTF-8 may hold an earlier fault (a repeated key).
        Err(e) => Err(std::str::from_utf8(&bytes[..e.valid_up_to()])
            .map_or(Violation::Malformed, |text| {
                json_text(text).err().unwrap_or(Violation::Malformed)
            })),
    }
}

/// [`json_object`] for text already known to be UTF-8.
pub(super) fn json_text(text: &str) -> Result<Doc<'_>, Violation> {
    let bytes = text.as_bytes();
    let mut reader = Reader {
        doc: Doc {
            text,
            // A node takes at least two bytes of text, except the last.
            nodes: Vec::with_capacity(TYPICAL_NODES.min(text.len() / 2 + 1)),
            unescaped: Vec::new(),
        },
        bytes,
        at: 0,
        depth: 0,
    };
    reader.value()?;
    reader.skip_whitespace();
    if reader.at != bytes.len() || !matches!(reader.doc.nodes.first(), Some(Node::Obj { .. })) {
        return Err(Violation::Malformed);
    }
    Ok(reader.doc)
}

/// Reads one document onto a tape.
struct Reader<'a> {
    doc: Doc<'a>,
    bytes: &'a [u8],
    at: usize,
    depth: usize,
}

/// A text offset or tape index as stored in a node (a token is at most 16 KiB, so it always fits).
fn offset(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// The next byte, consumed.
    fn next(&mut self) -> Result<u8, Violation> {
        let b = self.peek().ok_or(Violation::Malformed)?;
        self.at += 1;
        Ok(b)
    }

    /// RFC 8259 section 2: space, tab, line feed, carriage return.
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn push(&mut self, node: Node) {
        self.doc.nodes.push(node);
    }

    fn value(&mut self) -> Result<(), Violation> {
        self.skip_whitespace();
        let node = match self.peek().ok_or(Violation::Malformed)? {
            b'{' => return self.object(),
            b'[' => return self.array(),
            b'"' => {
                let (start, end, escaped) = self.string()?;
                match escaped {
                    None => Node::Str(start, end),
                    Some(n) => Node::Escaped(n),
                }
            }
            b't' => self.literal(b"true", Node::Bool(true))?,
            b'f' => self.literal(b"false", Node::Bool(false))?,
            b'n' => self.literal(b"null", Node::Null)?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return Err(Violation::Malformed),
        };
        self.push(node);
        Ok(())
    }

    fn literal(&mut self, word: &[u8], node: Node) -> Result<Node, Violation> {
        if !self.bytes[self.at..].starts_with(word) {
            return Err(Violation::Malformed);
        }
        self.at += word.len();
        Ok(node)
    }

    fn enter(&mut self) -> Result<(), Violation> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Violation::Malformed);
        }
        self.at += 1;
        Ok(())
    }

    fn array(&mut self) -> Result<(), Violation> {
        self.enter()?;
        let start = self.doc.nodes.len();
        self.push(Node::Arr { end: 0 });
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.at += 1;
        } else {
            loop {
                self.value()?;
                self.skip_whitespace();
                match self.next()? {
                    b',' => {}
                    b']' => break,
                    _ => return Err(Violation::Malformed),
                }
            }
        }
        self.doc.nodes[start] = Node::Arr {
            end: offset(self.doc.nodes.len()),
        };
        self.depth -= 1;
        Ok(())
    }

    fn object(&mut self) -> Result<(), Violation> {
        self.enter()?;
        let start = self.doc.nodes.len();
        self.push(Node::Obj { end: 0 });
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
        } else {
            loop {
                self.skip_whitespace();
                if self.peek() != Some(b'"') {
                    return Err(Violation::Malformed);
                }
                let (s, e, escaped) = self.string()?;
                self.push(match escaped {
                    None => Node::Key(s, e),
                    Some(n) => Node::EscapedKey(n),
                });
                self.skip_whitespace();
                if self.next()? != b':' {
                    return Err(Violation::Malformed);
                }
                self.value()?;
                self.skip_whitespace();
                match self.next()? {
                    b',' => {}
                    b'}' => break,
                    _ => return Err(Violation::Malformed),
                }
            }
        }
        self.doc.nodes[start] = Node::Obj {
            end: offset(self.doc.nodes.len()),
        };
        self.depth -= 1;
        let object = Obj(Json {
            doc: &self.doc,
            at: start,
        });
        if object.repeats_a_key() {
            return Err(Violation::DuplicateKey);
        }
        Ok(())
    }

    /// A string (RFC 8259 section 7), from its opening quote: the byte range between its quotes, and, when it
    /// held escapes, the index of its unescaped copy. Control characters must be escaped; `\u` escapes of
    /// UTF-16 surrogates must come in pairs.
    fn string(&mut self) -> Result<(u32, u32, Option<u32>), Violation> {
        self.at += 1;
        let start = self.at;
        let mut copy: Option<String> = None;
        let mut run = start;
        loop {
            self.at += special(&self.bytes[self.at..]).ok_or(Violation::Malformed)?;
            match self.next()? {
                b'"' => break,
                b'\\' => {
                    let copy = copy.get_or_insert_with(String::new);
                    copy.push_str(&self.doc.text[run..self.at - 1]);
                    let c = match self.next()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(Violation::Malformed),
                    };
                    copy.push(c);
                    run = self.at;
                }
                // A control character (RFC 8259 section 7: it must be escaped).
                _ => return Err(Violation::Malformed),
            }
        }
        let end = self.at - 1;
        let escaped = copy.map(|mut copy| {
            copy.push_str(&self.doc.text[run..end]);
            self.doc.unescaped.push(copy);
            offset(self.doc.unescaped.len() - 1)
        });
        Ok((offset(start), offset(end), escaped))
    }

    /// The character of a `\u` escape, after the `u`: four hex digits, and for a high surrogate the `\u` escape
    /// of its low surrogate (RFC 8259 section 7).
    fn unicode_escape(&mut self) -> Result<char, Violation> {
        let high = self.hex4()?;
        let code = match high {
            0xD800..=0xDBFF => {
                if !self.bytes[self.at..].starts_with(b"\\u") {
                    return Err(Violation::Malformed);
                }
                self.at += 2;
                let low = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return Err(Violation::Malformed);
                }
                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(Violation::Malformed),
            _ => high,
        };
        char::from_u32(code).ok_or(Violation::Malformed)
    }

    fn hex4(&mut self) -> Result<u32, Violation> {
        let digits = self
            .bytes
            .get(self.at..self.at + 4)
            .ok_or(Violation::Malformed)?;
        let mut n = 0;
        for &d in digits {
            let v = char::from(d).to_digit(16).ok_or(Violation::Malformed)?;
            n = n * 16 + v;
        }
        self.at += 4;
        Ok(n)
    }

    /// A number (RFC 8259 section 6): `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`. An integer is
    /// kept as `i64` when it fits, then `u64`; anything else as `f64`, refused when it does not fit one.
    fn number(&mut self) -> Result<Node, Violation> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return Err(Violation::Malformed),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.one_or_more_digits()?;
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.one_or_more_digits()?;
            integer = false;
        }
        let text = &self.doc.text[start..self.at];
        if integer {
            match text.parse::<i64>() {
                // serde_json reads `-0` as the float -0.0, and so does this reader.
                Ok(0) if text.starts_with('-') => return Ok(Node::Float(-0.0)),
                Ok(n) => return Ok(Node::Int(n)),
                Err(_) => {}
            }
            if let Ok(n) = text.parse::<u64>() {
                return Ok(Node::Big(n));
            }
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Node::Float(f)),
            _ => Err(Violation::Malformed),
        }
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn one_or_more_digits(&mut self) -> Result<(), Violation> {
        let from = self.at;
        self.digits();
        if self.at == from {
            return Err(Violation::Malformed);
        }
        Ok(())
    }
}

/// A value in a document: a place on its tape.
#[derive(Debug, Clone, Copy)]
pub(super) struct Json<'d> {
    doc: &'d Doc<'d>,
    at: usize,
}

/// An object in a document.
#[derive(Debug, Clone, Copy)]
pub(super) struct Obj<'d>(Json<'d>);

impl<'d> Json<'d> {
    fn node(&self) -> Node {
        self.doc.nodes[self.at]
    }

    /// Where the next sibling starts.
    fn next(&self) -> usize {
        match self.node() {
            Node::Arr { end } | Node::Obj { end } => end as usize,
            _ => self.at + 1,
        }
    }

    /// The bytes of a string or key node's text (no UTF-8 boundary checks: for comparing).
    fn bytes(&self) -> &'d [u8] {
        let doc = self.doc;
        match self.node() {
            Node::Str(start, end) | Node::Key(start, end) => doc
                .text
                .as_bytes()
                .get(start as usize..end as usize)
                .unwrap_or_default(),
            Node::Escaped(n) | Node::EscapedKey(n) => doc
                .unescaped
                .get(n as usize)
                .map_or(&[][..], |s| s.as_bytes()),
            _ => &[],
        }
    }

    /// The text of a string or key node.
    fn text(&self) -> Option<&'d str> {
        let doc = self.doc;
        match self.node() {
            Node::Str(start, end) | Node::Key(start, end) => {
                doc.text.get(start as usize..end as usize)
            }
            Node::Escaped(n) | Node::EscapedKey(n) => {
                doc.unescaped.get(n as usize).map(String::as_str)
            }
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> Option<&'d str> {
        match self.node() {
            Node::Str(..) | Node::Escaped(_) => self.text(),
            _ => None,
        }
    }

    /// Like `serde_json::Value::as_i64`: an integer that fits, never a float.
    pub(super) fn as_i64(self) -> Option<i64> {
        match self.node() {
            Node::Int(n) => Some(n),
            _ => None,
        }
    }

    pub(super) fn as_object(self) -> Option<Obj<'d>> {
        matches!(self.node(), Node::Obj { .. }).then_some(Obj(self))
    }

    /// The elements of an array; `None` for anything else.
    pub(super) fn as_array(self) -> Option<impl Iterator<Item = Json<'d>>> {
        let Node::Arr { end } = self.node() else {
            return None;
        };
        let (doc, end) = (self.doc, end as usize);
        let mut at = self.at + 1;
        Some(std::iter::from_fn(move || {
            (at < end).then(|| {
                let item = Json { doc, at };
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
            Node::Null | Node::Key(..) | Node::EscapedKey(_) => Value::Null,
            Node::Bool(b) => Value::Bool(b),
            Node::Int(n) => Value::from(n),
            Node::Big(n) => Value::from(n),
            Node::Float(f) => Value::from(f),
            Node::Str(..) | Node::Escaped(_) => {
                Value::String(self.text().unwrap_or_default().to_owned())
            }
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
    /// The members, in order: each key (as a node) and its value.
    fn members(self) -> impl Iterator<Item = (Json<'d>, Json<'d>)> {
        let doc = self.0.doc;
        let end = self.0.next();
        let mut at = self.0.at + 1;
        std::iter::from_fn(move || {
            if at + 1 >= end {
                return None;
            }
            let key = Json { doc, at };
            let value = Json { doc, at: at + 1 };
            at = value.next();
            Some((key, value))
        })
    }

    /// The members, in order, each key as its (unescaped) bytes.
    pub(super) fn entries(self) -> impl Iterator<Item = (&'d [u8], Json<'d>)> {
        self.members().map(|(k, v)| (k.bytes(), v))
    }

    pub(super) fn get(self, key: &str) -> Option<Json<'d>> {
        let key = key.as_bytes();
        self.members()
            .find(|(k, _)| k.bytes() == key)
            .map(|(_, v)| v)
    }

    pub(super) fn len(self) -> usize {
        self.members().count()
    }

    pub(super) fn to_map(self) -> Map<String, Value> {
        self.members()
            .map(|(k, v)| (k.text().unwrap_or_default().to_owned(), v.to_value()))
            .collect()
    }

    /// True when two members share a key: pairwise for a small object, sorted for a large one.
    fn repeats_a_key(self) -> bool {
        let mut small: [&[u8]; PAIRWISE_MEMBERS] = [&[]; PAIRWISE_MEMBERS];
        for (n, (key, _)) in self.members().enumerate() {
            let key = key.bytes();
            if n == PAIRWISE_MEMBERS {
                let mut sorted: Vec<&[u8]> = self.members().map(|(k, _)| k.bytes()).collect();
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
