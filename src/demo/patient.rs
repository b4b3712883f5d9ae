//! The demo's patient-facing part, when the config has `[patient_facing]`: the dev authorisation service (the NHS
//! login stand-in's JWKS and the dev supplier's token endpoint, `demo::auth`) on the address `upstream.resolve`
//! gives the supplier's token endpoint, and the patient-facing requests of the tour: a patient, a proxy user
//! acting for them, and two refusals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;

use super::DemoError;
use super::auth::{AuthState, Expect, PatientTokens, auth_tls, serve_auth};
use crate::config::Config;
use crate::policy::Policy;

/// The dev patient (a test NHS number) and their practice, the dev provider's.
const PATIENT: &str = "9690937286";
const PRACTICE: &str = "B82617";

/// The running dev authorisation service and the issuer of the demo's patient tokens.
pub(super) struct PatientDemo {
    tokens: PatientTokens,
    scope: String,
    ods_claim: Option<Vec<String>>,
    /// The path and method of the first route.
    route: (Method, String),
    _auth: Arc<AuthState>,
}

/// Starts the dev authorisation service for `config`'s `[patient_facing]` (none: `None`) until `stopped`.
pub(super) async fn start(
    config: &Config,
    certs: &Path,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Option<PatientDemo>, DemoError> {
    let Some(pf) = &config.patient_facing else {
        return Ok(None);
    };
    let policy = Policy::load_dir(&config.policy.dir, 0)?;
    let supplier = policy
        .endpoints()
        .into_iter()
        .find_map(|e| e.org.supplier.as_deref().and_then(|s| policy.supplier(s)))
        .ok_or("the demo's patient-facing part needs an [[endpoint]] whose supplier has a [[supplier]]")?;
    let url: http::Uri = supplier.token_endpoint.parse()?;
    let host_port = format!(
        "{}:{}",
        url.host().unwrap_or_default(),
        url.port_u16().unwrap_or(443)
    );
    let listen: SocketAddr = *config.upstream.resolve.get(&host_port).ok_or_else(|| {
        format!("the demo needs [upstream.resolve] \"{host_port}\" for the dev token endpoint")
    })?;
    let assertion = std::fs::read_to_string(&pf.assertion_key)?;
    let tokens = PatientTokens::new(
        &std::fs::read_to_string(certs.join("nhs-login.key"))?,
        "dev-nhs-login-1",
        &pf.issuer,
        &pf.audience,
    )?;
    let auth = AuthState::new(
        PatientTokens::jwks(&[&tokens]),
        Expect {
            client_id: supplier.client_id.clone(),
            key_id: supplier.key_id.clone(),
            token_url: supplier.token_endpoint.clone(),
            audience: supplier.audience.clone(),
            assertion_public_pem: rcgen::KeyPair::from_pem(&assertion)?.public_key_pem(),
            expires_in: 300,
        },
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot start the dev token endpoint on {listen}: {e}"))?;
    let tls = auth_tls(
        &certs.join("provider.crt"),
        &certs.join("provider.key"),
        &config.upstream.ca,
    )?;
    tokio::spawn(serve_auth(listener, tls, Arc::clone(&auth), stopped));
    let route = pf
        .routes
        .first()
        .map(|r| {
            let method = r.methods.first().cloned().unwrap_or(Method::GET);
            (method, r.path.clone())
        })
        .ok_or("[patient_facing] has no route")?;
    println!("dev NHS login JWKS and supplier token endpoint on https://{listen} (as {host_port})");
    Ok(Some(PatientDemo {
        tokens,
        scope: pf.scope.clone(),
        ods_claim: pf.ods_claim.clone(),
        route,
        _auth: auth,
    }))
}

/// (check, request, expected, got, ok), as the demo's table shows them.
type Row = (String, String, String, String, bool);

impl PatientDemo {
    /// A signed token for the dev patient issued to `app`, the practice in its claims when the config reads it
    /// from there; `edit` changes the claims first.
    fn token(&self, app: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut claims = self.tokens.claims(PATIENT, app, &self.scope);
        if let Some(path) = &self.ods_claim {
            let mut at = &mut claims;
            for name in path {
                at = &mut at[name.as_str()];
            }
            *at = serde_json::Value::from(PRACTICE);
        }
        edit(&mut claims);
        self.tokens.sign(&claims)
    }

    /// Sends the demo's patient-facing requests to the listener at `addr`.
    pub(super) async fn run(&self, addr: SocketAddr, ca: &[PathBuf]) -> Vec<Row> {
        let cases: [(&str, &str, &str, Option<String>); 4] = [
            (
                "pf",
                "patient, NHS login P9",
                "200",
                Some(self.token("dev-app", |_| {})),
            ),
            (
                "pf",
                "proxy user acting for the patient",
                "200",
                Some(self.token("dev-app", |c| {
                    c["act"] = serde_json::json!({ "sub": "dev-proxy-user" });
                })),
            ),
            ("pf token", "no access token", "401", None),
            (
                "pf token",
                "proofing level P5",
                "403",
                Some(self.token("dev-app", |c| c["identity_proofing_level"] = "P5".into())),
            ),
        ];
        let mut rows = Vec::new();
        for (check, what, expect, token) in cases {
            let got = match super::Client::new(addr, ca, None) {
                Err(e) => Err(e),
                Ok(client) => client.send(self.request(token.as_deref())).await,
            };
            let (text, ok) = match got {
                Ok(answer) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&answer.body).unwrap_or_default();
                    let detail = match v["resourceType"].as_str() {
                        Some("OperationOutcome") => v["issue"][0]["details"]["coding"][0]["code"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        Some(kind) => {
                            format!("{kind} ({} bytes from the provider)", answer.body.len())
                        }
                        None => format!("{} bytes", answer.body.len()),
                    };
                    let status = answer.status.as_u16().to_string();
                    (format!("{status} {detail}"), status == expect)
                }
                Err(e) => (format!("refused: {e}"), false),
            };
            rows.push((check.into(), what.into(), expect.into(), text, ok));
        }
        rows
    }

    /// The route's path; a patient search names the patient.
    fn path(&self) -> String {
        let path = &self.route.1;
        if path.ends_with("/Patient") {
            format!("{path}?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{PATIENT}")
        } else {
            path.clone()
        }
    }

    fn request(&self, token: Option<&str>) -> Request<Full<Bytes>> {
        let (method, path) = (&self.route.0, self.path());
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path.as_str())
            .header("host", "ssp.dev.localhost")
            .header("accept", "application/fhir+json")
            .header("x-request-id", uuid::Uuid::new_v4().to_string());
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder
            .body(Full::new(Bytes::new()))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }

    /// A curl line for the patient-facing listener at `addr`, with a token valid five minutes.
    pub(super) fn curl(&self, addr: SocketAddr, ca: &str) -> String {
        let (method, path) = (&self.route.0, self.path());
        format!(
            "# patient-facing (token valid 5 minutes):\ncurl --cacert {ca} -X {method} \\\n    -H \"X-Request-ID: $(cat /proc/sys/kernel/random/uuid)\" \\\n    -H 'Authorization: Bearer {}' \\\n    'https://{addr}{path}'",
            self.token("dev-app", |_| {})
        )
    }
}
