//! RFC 5424 messages as the shipper writes them and as `verify --witness` reads them back from a collector's file.
//!
//! A record travels as `<110>1 TIMESTAMP HOSTNAME ssp PROCID record [ssp-record@32473 seq=".." instance=".."
//! hash=".." len=".."] LINE`: facility 13 (log audit) and severity 6 (informational) give PRI 110 (RFC 5424 section
//! 6.2.1); TIMESTAMP is the record's own `ts`; LINE is the record exactly as written in its segment. A chain head
//! is the same with MSGID `head` and `[ssp-head@32473 ...]`. On the wire each message is preceded by its length
//! in octets and a space (octet counting: RFC 5425 section 4.3, RFC 6587 section 3.4.1).
//!
//! 32473 is the private enterprise number RFC 5612 sets aside for documentation: ssp has none of its own, and a
//! name of ours must carry one after its `@` (RFC 5424 section 6.3.2: names without `@` are IANA's).

/// The SD-ID of a record's structured data.
pub const RECORD_SD: &str = "ssp-record@32473";
/// The SD-ID of a signed chain head's structured data.
pub const HEAD_SD: &str = "ssp-head@32473";

/// Facility 13 (log audit) * 8 + severity 6 (informational).
const PRI: &str = "<110>1";

/// Appends one octet-counted message to `out`: `LEN SP <110>1 TS HOST ssp PROCID MSGID [SD-ID k="v"...] MSG`.
/// `ts` must be an RFC 3339 time as RFC 5424 section 6.2.3 narrows it (anything else is sent as the NILVALUE
/// `-`); parameter values are escaped as RFC 5424 section 6.3.3 says (`"`, `\` and `]`). Written in place, then
/// its length put in front: one copy of the message, no allocation once `out` has grown.
pub fn frame(
    out: &mut Vec<u8>,
    header: &Header<'_>,
    msgid: &str,
    sd_id: &str,
    params: &[(&str, &str)],
    msg: &[u8],
) {
    let start = out.len();
    out.extend_from_slice(PRI.as_bytes());
    out.push(b' ');
    out.extend_from_slice(if timestamp(header.ts) { header.ts } else { "-" }.as_bytes());
    for field in [header.hostname, "ssp", header.procid, msgid] {
        out.push(b' ');
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(b" [");
    out.extend_from_slice(sd_id.as_bytes());
    for (name, value) in params {
        out.push(b' ');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"=\"");
        for b in value.bytes() {
            if matches!(b, b'"' | b'\\' | b']') {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    }
    out.extend_from_slice(b"] ");
    out.extend_from_slice(msg);
    let mut len = itoa::Buffer::new();
    let len = len.format(out.len() - start);
    out.splice(start..start, len.bytes().chain([b' ']));
}

/// Whether `ts` is an RFC 5424 TIMESTAMP: `YYYY-MM-DDTHH:MM:SS`, an optional fraction of 1 to 6 digits, then `Z`
/// or `+HH:MM` / `-HH:MM` (section 6.2.3).
fn timestamp(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && b.get(10) == Some(&b'T')
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19);
    if !shape {
        return false;
    }
    let mut rest = &b[19..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|d| d.is_ascii_digit()).count();
        if !(1..=6).contains(&n) {
            return false;
        }
        rest = &frac[n..];
    }
    match rest {
        b"Z" => true,
        [sign, h1, h2, b':', m1, m2] => {
            matches!(sign, b'+' | b'-') && [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit())
        }
        _ => false,
    }
}

/// The header fields that are the same for every message of an instance, and the time of this one.
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    pub ts: &'a str,
    pub hostname: &'a str,
    pub procid: &'a str,
}

/// One message as a collector wrote it to its file: its structured data and its MSG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// SD-ID and its parameters, unescaped, in order.
    pub sd: Vec<(String, Vec<(String, String)>)>,
    pub msg: &'a str,
}

impl Parsed<'_> {
    /// The value of parameter `name` of element `id`.
    pub fn param(&self, id: &str, name: &str) -> Option<&str> {
        self.sd
            .iter()
            .find(|(i, _)| i == id)?
            .1
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one line of a collector's file as an RFC 5424 message, whichever of the usual forms the collector wrote
/// (`%rawmsg%`, or rsyslog's `RSYSLOG_SyslogProtocol23Format`, which may drop PRI or change the header fields):
/// the header's seven fields are skipped, the structured data is parsed strictly, and MSG is the rest with a
/// leading space or UTF-8 BOM removed. `None` for a line that is not of that shape (a collector's own messages).
pub fn parse(line: &str) -> Option<Parsed<'_>> {
    let mut rest = line;
    // PRI VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID: six space-separated fields before the SD.
    for _ in 0..6 {
        let (field, after) = rest.split_once(' ')?;
        if field.is_empty() {
            return None;
        }
        rest = after;
    }
    if !line.starts_with('<') {
        return None;
    }
    let mut sd = Vec::new();
    if let Some(after) = rest.strip_prefix('-') {
        rest = after;
    } else {
        while let Some(after) = rest.strip_prefix('[') {
            let (element, after) = element(after)?;
            sd.push(element);
            rest = after;
        }
        if sd.is_empty() {
            return None;
        }
    }
    let msg = rest.strip_prefix(' ').unwrap_or(rest);
    let msg = msg.strip_prefix('\u{feff}').unwrap_or(msg);
    Some(Parsed { sd, msg })
}

type Element = (String, Vec<(String, String)>);

/// `SD-ID *(SP NAME="VALUE")]`, after the `[`; returns the element and the text after its `]`.
fn element(text: &str) -> Option<(Element, &str)> {
    let name_end = |s: &str| s.find([' ', ']', '=', '"']).unwrap_or(s.len());
    let id_len = name_end(text);
    if id_len == 0 || id_len > 32 {
        return None;
    }
    let id = text[..id_len].to_owned();
    let mut rest = &text[id_len..];
    let mut params = Vec::new();
    loop {
        if let Some(after) = rest.strip_prefix(']') {
            return Some(((id, params), after));
        }
        rest = rest.strip_prefix(' ')?;
        let len = name_end(rest);
        if len == 0 || len > 32 {
            return None;
        }
        let name = rest[..len].to_owned();
        rest = rest[len..].strip_prefix("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => {
                    let (_, c) = chars.next()?;
                    if !matches!(c, '"' | '\\' | ']') {
                        value.push('\\');
                    }
                    value.push(c);
                }
                (_, c) => value.push(c),
            }
        };
        params.push((name, value));
        rest = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_message_reads_back_with_its_structured_data_and_line() {
        let mut out = Vec::new();
        let header = Header {
            ts: "2026-12-07T10:00:00.123456Z",
            hostname: "ssp-a",
            procid: "42",
        };
        let line = br#"{"seq":7,"instance":"a]\"b","kind":"request"}"#;
        frame(
            &mut out,
            &header,
            "record",
            RECORD_SD,
            &[("seq", "7"), ("instance", "a]\"b\\")],
            line,
        );
        let text = std::str::from_utf8(&out).unwrap();
        let (len, message) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), message.len());
        assert!(message.starts_with(
            "<110>1 2026-12-07T10:00:00.123456Z ssp-a ssp 42 record [ssp-record@32473 "
        ));
        let parsed = parse(message).unwrap();
        assert_eq!(parsed.param(RECORD_SD, "seq"), Some("7"));
        assert_eq!(parsed.param(RECORD_SD, "instance"), Some("a]\"b\\"));
        assert_eq!(parsed.msg.as_bytes(), line);
        // rsyslog's protocol-23 template writes the same with its own header fields.
        let rewritten = message.replacen(
            "2026-12-07T10:00:00.123456Z",
            "2026-12-07T10:00:00.123456+00:00",
            1,
        );
        assert_eq!(parse(&rewritten).unwrap().msg.as_bytes(), line);
    }

    #[test]
    fn a_time_that_is_not_rfc3339_is_sent_as_nil_and_bad_lines_are_not_messages() {
        let mut out = Vec::new();
        let header = Header {
            ts: "yesterday",
            hostname: "h",
            procid: "-",
        };
        frame(&mut out, &header, "head", HEAD_SD, &[], b"{}");
        assert!(
            std::str::from_utf8(&out)
                .unwrap()
                .contains("<110>1 - h ssp - head [ssp-head@32473] {}")
        );
        for bad in [
            "",
            "plain text from the collector itself",
            "<110>1 t h a p m [unterminated x=\"1\"",
            "<110>1 t h a p m [x y=\"1] {}",
            "<110>1 t h a p m {}",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
