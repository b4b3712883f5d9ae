//! The live side of `ssp policy sds`: searches the Spine Directory Service FHIR API (R4) for the `Device` and
//! `Endpoint` records of the configured ODS codes and interactions, over the project's own TLS client stack
//! (`crate::oneshot`: hyper HTTP/1.1 on tokio-rustls, aws-lc-rs), with the `apikey` header, following `next` links and honouring 429 with
//! `Retry-After` a bounded number of times.
//!
//! Everything an answer carries is untrusted: the status, the content type (FHIR JSON, and when it names a FHIR
//! version, 4.0), the size (at most [`MAX_ANSWER_BYTES`]), the Bundle's shape (see [`super`]) and every
//! `next` link (it must stay under the configured base URL: an answer cannot send the API key elsewhere). The API
//! key is read from its file and never printed.

use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, Uri, header};

use super::{Bundle, INTERACTION_SYSTEM, ODS_SYSTEM, Page};
use crate::config::SdsConfig;

/// Largest answer read.
pub(crate) const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Most pages followed for one search.
pub(crate) const MAX_PAGES: usize = 100;
/// Longest wait a `Retry-After` may ask for.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// A client of one SDS FHIR API base URL.
pub(crate) struct SdsClient {
    tls: Arc<rustls::ClientConfig>,
    base: Uri,
    base_text: String,
    api_key: String,
    timeout: Duration,
    max_retries: u32,
}

impl std::fmt::Debug for SdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdsClient")
            .field("base", &self.base_text)
            .finish_non_exhaustive()
    }
}

impl SdsClient {
    /// A client for `[sds]`; fails naming the key when the base URL, API key file or roots are missing or bad.
    pub(crate) fn new(cfg: &SdsConfig) -> Result<Self, String> {
        let base_text = cfg
            .base_url
            .clone()
            .ok_or("sds.base_url: required to fetch from SDS (or give --bundle files)")?;
        let base: Uri = base_text
            .parse()
            .map_err(|e| format!("sds.base_url: {base_text:?}: {e}"))?;
        let key_file = cfg
            .api_key_file
            .as_ref()
            .ok_or("sds.api_key_file: required to fetch from SDS")?;
        let api_key = std::fs::read_to_string(key_file)
            .map_err(|e| format!("sds.api_key_file: {}: {e}", key_file.display()))?
            .trim()
            .to_owned();
        if api_key.is_empty()
            || !api_key.bytes().all(|b| b.is_ascii_graphic())
            || api_key.len() > 1024
        {
            return Err(format!(
                "sds.api_key_file: {}: not an API key (one line of visible ASCII)",
                key_file.display()
            ));
        }
        let roots = crate::tls::load_roots("sds.ca", &cfg.ca)?;
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("sds: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: Arc::new(config),
            base,
            base_text,
            api_key,
            timeout: cfg.timeout,
            max_retries: cfg.max_retries,
        })
    }

    /// Every page of the `Device` and `Endpoint` searches for each ODS code and interaction, in a fixed order.
    pub(crate) async fn fetch_all(
        &self,
        ods_codes: &[String],
        interactions: &[String],
    ) -> Result<Vec<Page>, String> {
        if interactions.is_empty() {
            return Err(
                "sds.interactions: at least one interaction URN is needed to search SDS".into(),
            );
        }
        let mut pages = Vec::new();
        for ods in ods_codes {
            for urn in interactions {
                for resource in ["Device", "Endpoint"] {
                    let first = format!(
                        "{}/{resource}?organization={}&identifier={}",
                        self.base_text,
                        query_value(&format!("{ODS_SYSTEM}|{ods}")),
                        query_value(&format!("{INTERACTION_SYSTEM}|{urn}")),
                    );
                    self.search(first, &mut pages).await?;
                }
            }
        }
        Ok(pages)
    }

    /// One search, page after page.
    async fn search(&self, first: String, pages: &mut Vec<Page>) -> Result<(), String> {
        let mut url = first;
        for _ in 0..MAX_PAGES {
            let bundle = self.get(&url).await?;
            let next = bundle.next().map(str::to_owned);
            pages.push(Page {
                origin: url.clone(),
                bundle,
            });
            match next {
                None => return Ok(()),
                Some(next) => {
                    self.check_next(&url, &next)?;
                    url = next;
                }
            }
        }
        Err(format!("{url}: more than {MAX_PAGES} pages"))
    }

    /// A `next` link must stay under the base URL (same scheme, authority and path prefix).
    fn check_next(&self, from: &str, next: &str) -> Result<(), String> {
        let uri: Uri = next
            .parse()
            .map_err(|_| format!("{from}: next link {next:?} is not a URL"))?;
        let same_authority = match (uri.authority(), self.base.authority()) {
            (Some(a), Some(b)) => a.as_str().eq_ignore_ascii_case(b.as_str()),
            _ => false,
        };
        let base_path = self.base.path().trim_end_matches('/');
        let path = uri.path();
        let under_base = path == base_path
            || path
                .strip_prefix(base_path)
                .is_some_and(|rest| rest.starts_with('/'));
        // No dot segments, encoded dots or separators: the path is compared as text, so it must mean what it says.
        let lower = path.to_ascii_lowercase();
        let plain = !path.split('/').any(|seg| seg == "." || seg == "..")
            && !lower.contains("%2e")
            && !lower.contains("%2f")
            && !lower.contains("%5c")
            && !path.contains('\\');
        if uri.scheme_str() != Some("https") || !same_authority || !under_base || !plain {
            return Err(format!(
                "{from}: next link {next:?} leaves the SDS base URL {}",
                self.base_text
            ));
        }
        Ok(())
    }

    /// GET one page: 429 waits for `Retry-After` (capped) and tries again, at most `max_retries` times.
    async fn get(&self, url: &str) -> Result<Bundle, String> {
        let mut attempt = 0;
        loop {
            let request_id = uuid::Uuid::new_v4().to_string();
            let crate::oneshot::Answer {
                status,
                headers,
                body,
            } = crate::oneshot::call(
                Arc::clone(&self.tls),
                &crate::oneshot::Resolve::new(),
                crate::oneshot::Call {
                    url,
                    headers: &[
                        ("accept", "application/fhir+json"),
                        ("apikey", &self.api_key),
                        ("x-request-id", &request_id),
                    ],
                    form: None,
                    max_bytes: MAX_ANSWER_BYTES,
                    timeout: self.timeout,
                },
            )
            .await?;
            match status {
                StatusCode::OK => {
                    check_content_type(url, headers.get(header::CONTENT_TYPE))?;
                    return Bundle::parse(url, &body);
                }
                StatusCode::TOO_MANY_REQUESTS if attempt < self.max_retries => {
                    attempt += 1;
                    let wait = retry_after(headers.get(header::RETRY_AFTER));
                    tracing::info!(
                        url,
                        wait_s = wait.as_secs_f64(),
                        attempt,
                        "SDS rate limit (429); waiting"
                    );
                    tokio::time::sleep(wait).await;
                }
                status => {
                    return Err(format!(
                        "{url}: SDS answered {status} ({} tries)",
                        attempt + 1
                    ));
                }
            }
        }
    }
}

/// An answer must be FHIR JSON; when its media type names a FHIR version, it must be R4 (4.0).
fn check_content_type(url: &str, value: Option<&http::HeaderValue>) -> Result<(), String> {
    let text = value.and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut parts = text.split(';').map(str::trim);
    let media = parts.next().unwrap_or("").to_ascii_lowercase();
    if media != "application/fhir+json" && media != "application/json" {
        return Err(format!("{url}: answer is {text:?}, not FHIR JSON"));
    }
    for param in parts {
        if let Some((name, version)) = param.split_once('=')
            && name.trim().eq_ignore_ascii_case("fhirVersion")
            && !matches!(version.trim().trim_matches('"'), v if v == "4.0" || v.starts_with("4.0."))
        {
            return Err(format!("{url}: answer is FHIR {version}, not R4 (4.0)"));
        }
    }
    Ok(())
}

/// `Retry-After` as seconds or an HTTP date (RFC 9110 section 10.2.3), at most [`MAX_RETRY_AFTER`]; 1 s when absent
/// or unreadable.
fn retry_after(value: Option<&http::HeaderValue>) -> Duration {
    let Some(text) = value.and_then(|v| v.to_str().ok()).map(str::trim) else {
        return Duration::from_secs(1);
    };
    let wait = if let Ok(seconds) = text.parse::<u64>() {
        Duration::from_secs(seconds)
    } else if let Ok(at) =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc2822)
    {
        let left = at - time::OffsetDateTime::now_utc();
        Duration::try_from(left).unwrap_or(Duration::ZERO)
    } else {
        Duration::from_secs(1)
    };
    wait.min(MAX_RETRY_AFTER)
}

/// A query parameter value: the characters SDS identifiers use pass, `|` and anything else is percent-encoded.
fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn retry_after_is_bounded() {
        let v = |s: &'static str| Some(http::HeaderValue::from_static(s));
        assert_eq!(retry_after(v("2").as_ref()), Duration::from_secs(2));
        assert_eq!(retry_after(v("3600").as_ref()), MAX_RETRY_AFTER);
        assert_eq!(retry_after(None), Duration::from_secs(1));
        assert_eq!(retry_after(v("soon").as_ref()), Duration::from_secs(1));
        assert_eq!(
            retry_after(v("Sun, 06 Nov 1994 08:49:37 GMT").as_ref()),
            Duration::ZERO
        );
    }

    #[test]
    fn content_types() {
        let v = |s: &'static str| Some(http::HeaderValue::from_static(s));
        assert!(check_content_type("u", v("application/fhir+json").as_ref()).is_ok());
        assert!(
            check_content_type("u", v("application/fhir+json; fhirVersion=4.0").as_ref()).is_ok()
        );
        assert!(
            check_content_type("u", v("application/fhir+json; fhirVersion=3.0").as_ref()).is_err()
        );
        assert!(
            check_content_type("u", v("application/fhir+json; fhirVersion=4.0.1").as_ref()).is_ok()
        );
        assert!(
            check_content_type("u", v("application/fhir+json; fhirVersion=4.01").as_ref()).is_err()
        );
        assert!(check_content_type("u", v("text/html").as_ref()).is_err());
        assert!(check_content_type("u", None).is_err());
    }

    #[test]
    fn query_values_encode_the_separator() {
        assert_eq!(
            query_value("https://fhir.nhs.uk/Id/ods-organization-code|B82617"),
            "https://fhir.nhs.uk/Id/ods-organization-code%7CB82617"
        );
    }
}
