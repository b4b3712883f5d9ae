//! FHIR `OperationOutcome` bodies for refusals, in JSON or XML, shaped as the live SSP shapes them
//! (SSP-DOMAIN.md section 4): a GUID `id`, one issue whose `details.coding` carries the GP Connect response-code
//! system, the HTTP status as `code` and the machine text as `display`, repeated in `diagnostics`.
//!
//! Owns the body and its content type only; which status and text a failure gets is decided in `proxy`.

use bytes::Bytes;
use http::HeaderValue;

/// The coding system every SSP refusal names.
pub const CODING_SYSTEM: &str = "http://fhir.nhs.net/ValueSet/gpconnect-schedule-response-code-1-0";

pub(crate) const CONTENT_TYPE_JSON: &str = "application/fhir+json; charset=utf-8";
pub(crate) const CONTENT_TYPE_XML: &str = "application/fhir+xml; charset=utf-8";

/// A FHIR R4 `OperationOutcome` (`application/fhir+json`) with a fresh GUID `id` and one issue: severity `error`,
/// `issue` (R4's `issue-type` value set), `code` as both the coding's `code` and `display` in `system`, and
/// `diagnostics` when it is not empty. The patient-facing door's refusals.
pub(crate) fn render_r4(system: &str, code: &str, issue: &'static str, diagnostics: &str) -> Bytes {
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    let body = Body {
        resource_type: "OperationOutcome",
        id: &id,
        meta: None,
        issue: [Issue {
            severity: "error",
            code: issue,
            details: Details {
                coding: [Coding {
                    system,
                    code,
                    display: code,
                }],
            },
            diagnostics,
        }],
    };
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// The JSON body's members, in the order FHIR serialisers write them, `resourceType` first (serde keeps a struct's
/// field order; a `serde_json::Value` map would sort them).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    resource_type: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<Meta>,
    issue: [Issue<'a>; 1],
}

#[derive(serde::Serialize)]
struct Meta {
    profile: [&'static str; 1],
}

#[derive(serde::Serialize)]
struct Issue<'a> {
    severity: &'static str,
    code: &'static str,
    details: Details<'a>,
    #[serde(skip_serializing_if = "str::is_empty")]
    diagnostics: &'a str,
}

#[derive(serde::Serialize)]
struct Details<'a> {
    coding: [Coding<'a>; 1],
}

#[derive(serde::Serialize)]
struct Coding<'a> {
    system: &'a str,
    code: &'a str,
    display: &'a str,
}

/// The FHIR `issue.code` of a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    Forbidden,
    Transient,
    /// A limit was hit (429, or 503 for a provider's).
    Throttled,
    /// The request is too large to read (431).
    TooLong,
    /// The request uses something ssp does not implement (501: a transfer coding it does not decode).
    NotSupported,
}

impl IssueCode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Forbidden => "forbidden",
            IssueCode::Transient => "transient",
            IssueCode::Throttled => "throttled",
            IssueCode::TooLong => "too-long",
            IssueCode::NotSupported => "not-supported",
        }
    }
}

/// The FHIR `issue.severity` of a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Fatal => "fatal",
        }
    }
}

/// The wire format of an OperationOutcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Xml,
}

impl Format {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Json => CONTENT_TYPE_JSON,
            Format::Xml => CONTENT_TYPE_XML,
        }
    }

    /// Chooses the format from an `Accept` header: XML only when an XML FHIR type is preferred (a higher `q`)
    /// over every JSON-compatible range, JSON otherwise (also when the header is absent or unreadable).
    pub(crate) fn negotiate(accept: Option<&HeaderValue>) -> Format {
        let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
            return Format::Json;
        };
        let mut best_xml = 0u16;
        let mut best_json = 0u16;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(parse_qvalue)
                .unwrap_or(1000);
            let is = |names: &[&str]| names.iter().any(|n| media.eq_ignore_ascii_case(n));
            if is(&[
                "application/fhir+xml",
                "application/xml+fhir",
                "application/xml",
            ]) {
                best_xml = best_xml.max(q);
            } else if is(&[
                "application/fhir+json",
                "application/json+fhir",
                "application/json",
                "application/*",
                "*/*",
            ]) {
                best_json = best_json.max(q);
            }
        }
        if best_xml > best_json {
            Format::Xml
        } else {
            Format::Json
        }
    }
}

/// Parses an HTTP qvalue (`0`, `0.5`, `1.000`) into thousandths.
fn parse_qvalue(text: &str) -> Option<u16> {
    let value: f32 = text.trim().parse().ok()?;
    (0.0..=1.0)
        .contains(&value)
        .then(|| (value * 1000.0).round() as u16)
}

/// One refusal, ready to render.
#[derive(Clone, Copy, Debug)]
pub struct OperationOutcome<'a> {
    /// The HTTP status, repeated as the coding's `code`.
    pub status: u16,
    pub code: IssueCode,
    pub severity: Severity,
    /// The machine text (`ASID_CHECK_FAILED_MESSAGESENDER_...`), the coding's `display` and the `diagnostics`.
    pub text: &'a str,
}

impl OperationOutcome<'_> {
    /// Renders the body with a fresh GUID `id`.
    pub(crate) fn render(&self, format: Format) -> Bytes {
        let id = uuid::Uuid::new_v4();
        match format {
            Format::Json => self.render_json(&id.hyphenated().to_string()),
            Format::Xml => self.render_xml(&id.hyphenated().to_string()),
        }
    }

    /// Members in the order FHIR serialisers write them, `resourceType` first (serde keeps a struct's field order;
    /// a `serde_json::Value` map would sort them).
    fn render_json(&self, id: &str) -> Bytes {
        let status = self.status.to_string();
        let body = Body {
            resource_type: "OperationOutcome",
            id,
            meta: Some(Meta {
                profile: [
                    "https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-OperationOutcome-1",
                ],
            }),
            issue: [Issue {
                severity: self.severity.as_str(),
                code: self.code.as_str(),
                details: Details {
                    coding: [Coding {
                        system: CODING_SYSTEM,
                        code: &status,
                        display: self.text,
                    }],
                },
                diagnostics: self.text,
            }],
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    fn render_xml(&self, id: &str) -> Bytes {
        let text = xml_escape(self.text);
        Bytes::from(format!(
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                r#"<OperationOutcome xmlns="http://hl7.org/fhir">"#,
                r#"<id value="{id}"/>"#,
                r#"<meta><profile value="https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-OperationOutcome-1"/></meta>"#,
                r#"<issue><severity value="{severity}"/><code value="{code}"/>"#,
                r#"<details><coding><system value="{system}"/><code value="{status}"/><display value="{text}"/></coding></details>"#,
                r#"<diagnostics value="{text}"/></issue></OperationOutcome>"#
            ),
            id = id,
            severity = self.severity.as_str(),
            code = self.code.as_str(),
            system = CODING_SYSTEM,
            status = self.status,
            text = text,
        ))
    }
}

/// Escapes text for an XML attribute value.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> Format {
        Format::negotiate(Some(&HeaderValue::from_str(v).unwrap()))
    }

    #[test]
    fn json_unless_xml_is_preferred() {
        assert_eq!(Format::negotiate(None), Format::Json);
        assert_eq!(accept("application/fhir+json"), Format::Json);
        assert_eq!(accept("application/fhir+xml"), Format::Xml);
        assert_eq!(accept("application/xml+fhir"), Format::Xml);
        assert_eq!(accept("application/xml"), Format::Xml);
        assert_eq!(accept("application/fhir+xml, */*"), Format::Json);
        assert_eq!(accept("application/fhir+xml, */*;q=0.8"), Format::Xml);
        assert_eq!(
            accept("application/fhir+json;q=0.5, application/fhir+xml;q=0.9"),
            Format::Xml
        );
        assert_eq!(accept("text/html"), Format::Json);
        assert_eq!(accept("application/xml;q=banana"), Format::Xml);
    }

    #[test]
    fn json_body_has_the_ssp_shape() {
        let outcome = OperationOutcome {
            status: 403,
            code: IssueCode::Forbidden,
            severity: Severity::Error,
            text: "ASID_CHECK_FAILED_MESSAGESENDER_100000000001",
        };
        let body = outcome.render(Format::Json);
        assert!(
            body.starts_with(br#"{"resourceType":"OperationOutcome","id":""#),
            "{body:?}"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert!(uuid::Uuid::parse_str(v["id"].as_str().unwrap()).is_ok());
        let issue = &v["issue"][0];
        assert_eq!(issue["severity"], "error");
        assert_eq!(issue["code"], "forbidden");
        let coding = &issue["details"]["coding"][0];
        assert_eq!(coding["system"], CODING_SYSTEM);
        assert_eq!(coding["code"], "403");
        assert_eq!(
            coding["display"],
            "ASID_CHECK_FAILED_MESSAGESENDER_100000000001"
        );
        assert_eq!(
            issue["diagnostics"],
            "ASID_CHECK_FAILED_MESSAGESENDER_100000000001"
        );
    }

    #[test]
    fn xml_body_escapes_the_text() {
        let outcome = OperationOutcome {
            status: 400,
            code: IssueCode::Invalid,
            severity: Severity::Error,
            text: "ENDPOINT_x_VARIES_FROM_TARGETURL_https://h/p?a=1&b=\"<2>\"",
        };
        let xml = String::from_utf8(outcome.render(Format::Xml).to_vec()).unwrap();
        assert!(xml.contains(r#"<code value="400"/>"#));
        assert!(xml.contains(r#"<code value="invalid"/>"#));
        assert!(xml.contains("a=1&amp;b=&quot;&lt;2&gt;&quot;"));
        assert!(!xml.contains("&b="));
    }
}
