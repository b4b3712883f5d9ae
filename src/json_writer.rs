//! JSON text (RFC 8259): finding the end of a run of plain string bytes, for the token reader, and writing an
//! object a field at a time, for the audit trail's lines.
//!
//! Why the audit trail does not write its lines with serde_json: a `perf` profile of the proxy at 32 connections
//! with serde_json writing them put serde's per-field calls and its byte-at-a-time string escaping at about 5% of
//! the proxy's CPU, most of the audit thread's time (`benches/RESULTS.md`). [`ObjectWriter`] writes what serde_json's compact serializer writes for the same
//! values, byte for byte (`src/audit/record/tests.rs` holds it to that), with the same integer and float
//! formatting crates (itoa, zmij), and copies runs of plain string text whole.

/// Where the first byte of `bytes` that ends a run of plain string text is: a quote, a backslash or a control
/// character (below 0x20). Eight bytes at a time: a byte of a word is flagged when it equals a quote or a
/// backslash (their XOR is zero) or is below 0x20. A borrow can flag a byte above a flagged one, never below it,
/// so the lowest flag is exact (the zero-byte test of Hacker's Delight, section 6-1).
pub fn special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..).and_then(<[u8]>::first_chunk::<8>) {
        let word = u64::from_le_bytes(*chunk);
        let flags = below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word, 0x20);
        if flags != 0 {
            return Some(at + (flags.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let tail = bytes.get(at..)?;
    tail.iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|n| at + n)
}

/// Appends `text` as a JSON string: quoted, with `"` and `\` escaped, the two-character escapes for backspace,
/// form feed, line feed, carriage return and tab, and `\u00xx` (lower-case hex) for the other control
/// characters (RFC 8259 section 7). Everything else, non-ASCII included, is copied as it is.
pub fn string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    escaped(out, text);
    out.push(b'"');
}

/// Appends `text` escaped as the inside of a JSON string.
fn escaped(out: &mut Vec<u8>, text: &str) {
    let mut rest = text.as_bytes();
    while let Some(at) = special(rest) {
        out.extend_from_slice(&rest[..at]);
        let byte = rest[at];
        let short = match byte {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            0x08 => Some(b'b'),
            0x0c => Some(b'f'),
            b'\n' => Some(b'n'),
            b'\r' => Some(b'r'),
            b'\t' => Some(b't'),
            _ => None,
        };
        match short {
            Some(c) => out.extend_from_slice(&[b'\\', c]),
            None => {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&crate::hex::hex_pair(byte));
            }
        }
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
}

/// A JSON object being written onto a buffer: fields in the order they are added, no white space. Keys are
/// static text that needs no escaping (checked in debug builds). [`ObjectWriter::close`] ends it.
#[derive(Debug)]
pub struct ObjectWriter<'b> {
    out: &'b mut Vec<u8>,
    empty: bool,
}

impl<'b> ObjectWriter<'b> {
    /// Starts an object at the end of `out`.
    pub fn open(out: &'b mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    /// Continues an object whose `{` and first fields are written elsewhere, later: every field written through
    /// it starts with a comma, and nothing closes it (the fields are spliced into the object by [`ObjectWriter::fields`]).
    pub fn continued(out: &'b mut Vec<u8>) -> Self {
        Self { out, empty: false }
    }

    /// Fields a [`ObjectWriter::continued`] wrote (each `,"key":value`), added as they are. The caller vouches for them.
    pub fn fields(&mut self, fields: &[u8]) {
        // Each begins with its comma, so they can only follow a field.
        debug_assert!(fields.is_empty() || (!self.empty && fields[0] == b','));
        self.out.extend_from_slice(fields);
    }

    fn key(&mut self, key: &'static str) -> &mut Vec<u8> {
        debug_assert!(special(key.as_bytes()).is_none(), "{key}");
        if !std::mem::replace(&mut self.empty, false) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// `"key":"value"`.
    pub fn str(&mut self, key: &'static str, value: &str) {
        string(self.key(key), value);
    }

    /// `"key":"value"` where the value is `parts` one after another, written without joining them first.
    pub fn str_parts(&mut self, key: &'static str, parts: &[&str]) {
        let out = self.key(key);
        out.push(b'"');
        for part in parts {
            escaped(out, part);
        }
        out.push(b'"');
    }

    /// `"key":"value"` where the value is `parts` one after another, copied as they are: each must need no
    /// escaping (no quote, backslash or character below U+0020, RFC 8259 section 7), as a range of the text of a
    /// JSON string read without escapes needs none. The caller vouches (checked in debug builds): the output is
    /// then the bytes [`ObjectWriter::str_parts`] would write, without the scan for characters to escape.
    pub fn verbatim_parts(&mut self, key: &'static str, parts: &[&str]) {
        let out = self.key(key);
        out.push(b'"');
        for part in parts {
            debug_assert!(special(part.as_bytes()).is_none(), "{part:?}");
            out.extend_from_slice(part.as_bytes());
        }
        out.push(b'"');
    }

    /// `"key":"value"`, `value` copied as it is: text of a type that admits no character JSON escapes (digits,
    /// hex, a UUID, an RFC 9110 token). The caller vouches, as for [`ObjectWriter::verbatim_parts`].
    pub fn verbatim(&mut self, key: &'static str, value: &str) {
        self.verbatim_parts(key, &[value]);
    }

    /// `"key":"value"`, or nothing when there is no value.
    pub fn str_if(&mut self, key: &'static str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    /// `"key":"value"`, or `"key":null`.
    pub fn str_or_null(&mut self, key: &'static str, value: Option<&str>) {
        match value {
            Some(value) => self.str(key, value),
            None => self.null(key),
        }
    }

    /// `"key":null`.
    pub fn null(&mut self, key: &'static str) {
        self.key(key).extend_from_slice(b"null");
    }

    /// An unsigned integer.
    pub fn u64(&mut self, key: &'static str, value: u64) {
        let mut digits = itoa::Buffer::new();
        let text = digits.format(value);
        self.key(key).extend_from_slice(text.as_bytes());
    }

    /// A signed integer, or `null`.
    pub fn i64_or_null(&mut self, key: &'static str, value: Option<i64>) {
        let Some(value) = value else {
            return self.null(key);
        };
        let mut digits = itoa::Buffer::new();
        let text = digits.format(value);
        self.key(key).extend_from_slice(text.as_bytes());
    }

    /// A number in its shortest round-trip form (`1.5`, `0.0`); a NaN or an infinity, which JSON cannot
    /// represent, is `null`, as serde_json writes it.
    pub fn f64(&mut self, key: &'static str, value: f64) {
        if !value.is_finite() {
            return self.null(key);
        }
        let mut digits = zmij::Buffer::new();
        let text = digits.format_finite(value);
        self.key(key).extend_from_slice(text.as_bytes());
    }

    /// `true` or `false`.
    pub fn bool(&mut self, key: &'static str, value: bool) {
        let text: &[u8] = if value { b"true" } else { b"false" };
        self.key(key).extend_from_slice(text);
    }

    /// An array of strings.
    pub fn strs<'s>(&mut self, key: &'static str, values: impl IntoIterator<Item = &'s str>) {
        let out = self.key(key);
        out.push(b'[');
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, value);
        }
        out.push(b']');
    }

    /// A field whose value is JSON text already (an object written once and kept, say). The caller vouches
    /// that `json` is one well-formed JSON value.
    pub fn raw(&mut self, key: &'static str, json: &str) {
        self.key(key).extend_from_slice(json.as_bytes());
    }

    /// A field whose value is an object, written by `fill`.
    pub fn obj(&mut self, key: &'static str, fill: impl FnOnce(&mut ObjectWriter<'_>)) {
        let mut inner = ObjectWriter::open(self.key(key));
        fill(&mut inner);
        inner.close();
    }

    /// An array of objects, one per item, each written by `fill`.
    pub fn arr<T>(
        &mut self,
        key: &'static str,
        items: &[T],
        mut fill: impl FnMut(&mut ObjectWriter<'_>, &T),
    ) {
        let out = self.key(key);
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let mut inner = ObjectWriter::open(&mut *out);
            fill(&mut inner, item);
            inner.close();
        }
        out.push(b']');
    }

    /// Ends the object.
    pub fn close(self) {
        self.out.push(b'}');
    }
}
