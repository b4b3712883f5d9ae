//! The strict JSON reader held to serde_json: an RFC 8259 edge corpus, generated and mutated documents, and the
//! word-at-a-time string scan against a byte-at-a-time one.

use proptest::prelude::*;
use serde_json::Value;

use crate::json_writer::special;
use crate::jwt::Violation;
use crate::jwt::json::json_object;

/// The reference the strict JSON reader is held to: serde_json, with each object's keys checked for repeats
/// when the object closes (where the reader checks them too, so that both report the first fault alike).
mod reference {
    use std::fmt;

    use serde::Deserialize;
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};

    use crate::jwt::Violation;

    struct Strict(Value);

    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(StrictVisitor)
        }
    }

    struct StrictVisitor;

    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = Strict;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
            Ok(Strict(Value::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
            Ok(Strict(Value::from(v)))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
            Ok(Strict(Value::from(v)))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
            Ok(Strict(Value::from(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
            Ok(Strict(Value::String(v.to_owned())))
        }
        fn visit_unit<E>(self) -> Result<Strict, E> {
            Ok(Strict(Value::Null))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
            let mut items = Vec::new();
            while let Some(Strict(v)) = seq.next_element()? {
                items.push(v);
            }
            Ok(Strict(Value::Array(items)))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
            let mut members: Vec<(String, Value)> = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                let Strict(value) = map.next_value()?;
                members.push((key, value));
            }
            let mut object = Map::new();
            for (key, value) in members {
                if object.insert(key, value).is_some() {
                    return Err(serde::de::Error::custom("duplicate key"));
                }
            }
            Ok(Strict(Value::Object(object)))
        }
    }

    /// serde_json's reading of `bytes` as the strict reader must read it.
    pub(super) fn read(bytes: &[u8]) -> Result<Value, Violation> {
        match serde_json::from_slice::<Strict>(bytes) {
            Ok(Strict(v @ Value::Object(_))) => Ok(v),
            Err(e) if e.to_string().starts_with("duplicate key") => Err(Violation::DuplicateKey),
            _ => Err(Violation::Malformed),
        }
    }

    /// Equal, except that floats may differ in their last place (serde_json's default float parsing is not
    /// correctly rounded; the reader's, std's, is).
    pub(super) fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x == y || ((x - y) / x).abs() < 1e-15,
                    _ => false,
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((kx, vx), (ky, vy))| kx == ky && same(vx, vy))
            }
            _ => a == b,
        }
    }
}

/// What the strict reader makes of `bytes`, in the reference's terms.
fn read_strictly(bytes: &[u8]) -> Result<Value, Violation> {
    json_object(bytes).map(|doc| Value::Object(doc.root().to_map()))
}

fn assert_agrees(bytes: &[u8]) {
    let (mine, theirs) = (read_strictly(bytes), reference::read(bytes));
    let agree = match (&mine, &theirs) {
        (Ok(a), Ok(b)) => reference::same(a, b),
        (a, b) => a == b,
    };
    assert!(
        agree,
        "{:?}: reader {mine:?}, serde_json {theirs:?}",
        String::from_utf8_lossy(bytes)
    );
}

/// Edges of RFC 8259 where readers differ: numbers, escapes and surrogates, whitespace, trailing text, repeats.
#[test]
fn reader_agrees_with_serde_json_on_the_edges() {
    let cases: &[&[u8]] = &[
        br#"{}"#,
        br#" {"a" : [ 1 , 2 ] } "#,
        br#"{"a":-0}"#,
        br#"{"a":-0.0}"#,
        br#"{"a":0}"#,
        br#"{"a":01}"#,
        br#"{"a":-}"#,
        br#"{"a":1.}"#,
        br#"{"a":.5}"#,
        br#"{"a":+1}"#,
        br#"{"a":1E+2}"#,
        br#"{"a":1e-2}"#,
        br#"{"a":1e}"#,
        br#"{"a":1e400}"#,
        br#"{"a":-1e400}"#,
        br#"{"a":1e-400}"#,
        br#"{"a":9223372036854775807}"#,
        br#"{"a":9223372036854775808}"#,
        br#"{"a":18446744073709551615}"#,
        br#"{"a":18446744073709551616}"#,
        br#"{"a":-9223372036854775808}"#,
        br#"{"a":-9223372036854775809}"#,
        br#"{"a":0.1e1}"#,
        br#"{"a":"\u00e9\/\b\f\n\r\t\"\\"}"#,
        br#"{"a":"\ud83d\ude00"}"#,
        br#"{"a":"\ud800"}"#,
        br#"{"a":"\udc00"}"#,
        br#"{"a":"\ud800\u0041"}"#,
        br#"{"a":"\ud800\\"}"#,
        br#"{"a":"\u00G0"}"#,
        br#"{"a":"\u00"}"#,
        br#"{"a":"\x"}"#,
        br#"{"a":"\u0000"}"#,
        b"{\"a\":\"tab\there\"}",
        b"{\"a\":\"\x7f\"}",
        b"{\"a\":\"\xc3\xa9\"}",
        b"{\"a\":\"\xc3\"}",
        b"{\"a\":\xc3\xa9}",
        b"\xef\xbb\xbf{}",
        b"{\"a\":1\x0c}",
        b"{\"a\":\n1\r}",
        br#"{"a":tru}"#,
        br#"{"a":true}"#,
        br#"{"a":nul}"#,
        br#"{"a":null,"b":false}"#,
        br#"{"a":1}x"#,
        br#"{"a":1}{}"#,
        br#"{"a":1,}"#,
        br#"{,}"#,
        br#"{"a" 1}"#,
        br#"{"a":[1,]}"#,
        br#"{"a":[,1]}"#,
        br#"{"a":[1 2]}"#,
        br#"{a:1}"#,
        br#"{'a':1}"#,
        br#"{"\u0061":1,"a":2}"#,
        br#"{"a":{"b":1,"b":2}}"#,
        br#"{"a":1,"a":[}"#,
        br#"{"a":1,"a":2,"#,
        br#"{"":1,"":2}"#,
        br#"[]"#,
        br#""x""#,
        br#"1"#,
        b"",
        br#"{"#,
        br#"{"a":"#,
        br#"{"a":"unterminated}"#,
    ];
    for case in cases {
        assert_agrees(case);
    }
    // Depth: 127 levels are read, the 128th is refused; 5,000 do not reach the stack's end.
    for n in [125, 126, 127, 128, 5_000] {
        let deep = format!(r#"{{"a":{}{}}}"#, "[".repeat(n - 1), "]".repeat(n - 1));
        assert_agrees(deep.as_bytes());
    }
    assert!(
        read_strictly(format!(r#"{{"a":{}{}}}"#, "[".repeat(126), "]".repeat(126)).as_bytes())
            .is_ok()
    );
    assert!(
        read_strictly(format!(r#"{{"a":{}{}}}"#, "[".repeat(127), "]".repeat(127)).as_bytes())
            .is_err()
    );
}

/// JSON text from a small grammar, with keys from a tiny alphabet (so objects often repeat one, spelt plainly
/// or escaped), strings with every escape, and numbers of every shape.
fn json_text() -> impl Strategy<Value = String> {
    let ws = "[ \t\n\r]{0,2}";
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?",
        "\"([a-c ]|é|\\\\[\"\\\\/bfnrt]|\\\\u00[0-7][0-9a-fA-F]|\\\\u[dD]83[dD]\\\\u[dD][eE]00|\\\\u[dD]800){0,6}\"",
    ];
    let key = "\"([ab]|\\\\u006[12]){1,2}\"";
    leaf.prop_recursive(4, 40, 5, move |inner| {
        prop_oneof![
            (proptest::collection::vec(inner.clone(), 0..5), ws)
                .prop_map(|(items, ws)| format!("[{ws}{}{ws}]", items.join(&format!("{ws},")))),
            (proptest::collection::vec((key, inner), 0..5), ws).prop_map(|(members, ws)| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{ws}{k}{ws}:{v}"))
                    .collect();
                format!("{{{}{ws}}}", members.join(","))
            }),
        ]
    })
    .prop_map(|v| format!("{{\"root\":{v}}}"))
}

/// An edit of JSON text: delete, insert or replace one byte, from bytes that matter to the grammar.
fn mutate(text: String, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    const BYTES: &[u8] = b"{}[]\",:\\u0123456789eE.+- \ttnfalr\x00\x1f\xc3\xa9";
    let mut bytes = text.into_bytes();
    for &(at, kind, with) in edits {
        let at = at % (bytes.len() + 1);
        let with = BYTES[usize::from(with) % BYTES.len()];
        match kind % 3 {
            0 if at < bytes.len() => {
                bytes.remove(at);
            }
            1 => bytes.insert(at, with),
            _ if at < bytes.len() => bytes[at] = with,
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The strict reader and serde_json (with repeats refused) accept the same texts, read the same values
    /// and refuse the same way.
    #[test]
    fn reader_agrees_with_serde_json(
        text in json_text(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
    ) {
        assert_agrees(text.as_bytes());
        assert_agrees(&mutate(text, &edits));
    }
}

proptest! {
    /// The word-at-a-time scan for the end of plain string text finds what a byte-at-a-time scan finds.
    #[test]
    fn string_scan_finds_the_first_quote_backslash_or_control(
        bytes in proptest::collection::vec(
            prop_oneof![Just(b'"'), Just(b'\\'), 0u8..0x20, 0x20u8..=0xff], 0..40),
        plain in 0usize..40,
    ) {
        // A run of plain bytes first, so that the special byte lands at every place in a word.
        let mut text = vec![b'a'; plain];
        text.extend(&bytes);
        let expected = text.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
        prop_assert_eq!(special(&text), expected);
    }
}
