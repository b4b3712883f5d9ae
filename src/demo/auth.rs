//! The dev authorisation service of the patient-facing door: the NHS login stand-in's JWKS (`GET /jwks`) and a GP
//! supplier's token endpoint (`POST /token`) that checks what a real one would: an RFC 8693 token exchange
//! (`grant_type`, `subject_token`, `subject_token_type`, `audience`) authenticated with a `private_key_jwt`
//! client assertion (RFC 7523 section 2.2: signature by the registered key and `kid`, `iss` = `sub` = the client
//! id, `aud` the token endpoint, unexpired, a `jti` not seen before). It issues `supplier-token-<n>` tokens. The
//! demo runs it; the tests and the benchmark drive it, switching it to refuse or fail.
//!
//! Also here: [`PatientTokens`], the dev NHS login issuer that signs patients' access tokens.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::DemoError;

/// How the token endpoint answers a well-formed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    /// A token, valid `expires_in` seconds.
    Issue,
    /// `400 {"error": "invalid_grant"}`: the supplier refuses the patient.
    Refuse,
    /// `503`: the token service is failing.
    Fail,
}

/// What the token endpoint expects of its client (one `[[supplier]]` of the directory, from its side).
#[derive(Debug, Clone)]
pub struct Expect {
    pub client_id: String,
    pub key_id: String,
    /// The token endpoint's own URL: the assertion's `aud`.
    pub token_url: String,
    /// The exchange's `audience`.
    pub audience: String,
    /// The client's registered public key (PEM, EC P-256 or RSA).
    pub assertion_public_pem: String,
    pub expires_in: u64,
}

/// One exchange the endpoint accepted.
#[derive(Debug, Clone)]
pub struct Exchanged {
    pub subject_token: String,
    pub issued: String,
    /// The CN of the client certificate presented, if any.
    pub client_cn: Option<String>,
}

/// The service's state, shared with whoever drives it.
#[derive(Debug)]
pub struct AuthState {
    jwks: Mutex<String>,
    mode: Mutex<TokenMode>,
    /// How long the token endpoint takes to answer.
    delay: Mutex<std::time::Duration>,
    expect: Expect,
    seen_jti: Mutex<HashSet<String>>,
    /// `POST /token` calls, whatever their fate.
    pub token_calls: AtomicUsize,
    /// `GET /jwks` calls.
    pub jwks_fetches: AtomicUsize,
    /// Exchanges it issued a token for.
    pub exchanged: Mutex<Vec<Exchanged>>,
    /// Calls it refused as malformed, with why (a test fails on any).
    pub malformed: Mutex<Vec<String>>,
}

impl AuthState {
    pub fn new(jwks: String, expect: Expect) -> Arc<Self> {
        Arc::new(Self {
            jwks: Mutex::new(jwks),
            mode: Mutex::new(TokenMode::Issue),
            delay: Mutex::new(std::time::Duration::ZERO),
            expect,
            seen_jti: Mutex::default(),
            token_calls: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
            exchanged: Mutex::default(),
            malformed: Mutex::default(),
        })
    }

    /// Serves `jwks` from now on.
    pub fn set_jwks(&self, jwks: String) {
        *self.jwks.lock().unwrap_or_else(PoisonError::into_inner) = jwks;
    }

    pub fn set_mode(&self, mode: TokenMode) {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }

    /// The token endpoint answers this much later from now on.
    pub fn set_delay(&self, delay: std::time::Duration) {
        *self.delay.lock().unwrap_or_else(PoisonError::into_inner) = delay;
    }

    /// The exchanges accepted so far.
    pub fn exchanges(&self) -> Vec<Exchanged> {
        self.exchanged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The calls refused as malformed so far.
    pub fn malformed(&self) -> Vec<String> {
        self.malformed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The service's TLS: its certificate; a client certificate chained to `ca` is asked for but not required (the
/// JWKS is public, the token endpoint sees the proxy's).
pub fn auth_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: &[std::path::PathBuf],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let roots = crate::tls::load_roots("auth ca", ca)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls::provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            crate::tls::load_certs("auth cert", cert)?,
            crate::tls::load_key("auth key", key)?,
        )
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `/jwks` and `/token` on `listener` until `shutdown`.
pub async fn serve_auth(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<AuthState>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
            () = &mut shutdown => return,
        };
        let (acceptor, state) = (acceptor.clone(), Arc::clone(&state));
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let client_cn = super::provider::client_cn(&stream);
            let service = service_fn(move |request: Request<Incoming>| {
                let (state, client_cn) = (Arc::clone(&state), client_cn.clone());
                async move { Ok::<_, std::convert::Infallible>(route(request, &state, client_cn).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn route(
    request: Request<Incoming>,
    state: &AuthState,
    client_cn: Option<String>,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/jwks") => {
            state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            let jwks = state
                .jwks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            answer(StatusCode::OK, jwks)
        }
        (&Method::POST, "/token") => {
            state.token_calls.fetch_add(1, Ordering::SeqCst);
            let delay = *state.delay.lock().unwrap_or_else(PoisonError::into_inner);
            tokio::time::sleep(delay).await;
            let body = match Limited::new(request.into_body(), 64 * 1024).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => return answer(StatusCode::BAD_REQUEST, r#"{"error":"invalid_request"}"#),
            };
            token(&body, state, client_cn)
        }
        _ => answer(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
    }
}

/// RFC 6749 section 5.2's error answer, and the reason noted as malformed.
fn malformed(state: &AuthState, error: &str, why: String) -> Response<Full<Bytes>> {
    state
        .malformed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(why);
    let status = if error == "invalid_client" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    answer(status, format!(r#"{{"error":"{error}"}}"#))
}

fn token(body: &[u8], state: &AuthState, client_cn: Option<String>) -> Response<Full<Bytes>> {
    let form: Vec<(String, String)> = form_urlencoded(body);
    let get = |name: &str| {
        let mut values = form
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        match (values.next(), values.next()) {
            (Some(v), None) => Some(v),
            _ => None,
        }
    };
    let expect = &state.expect;
    for (name, want) in [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("audience", expect.audience.as_str()),
    ] {
        if get(name) != Some(want) {
            return malformed(
                state,
                "invalid_request",
                format!("{name} is {:?}, not {want:?}", get(name)),
            );
        }
    }
    let Some(subject_token) = get("subject_token").filter(|t| !t.is_empty()) else {
        return malformed(state, "invalid_request", "no subject_token".into());
    };
    let Some(assertion) = get("client_assertion") else {
        return malformed(state, "invalid_client", "no client_assertion".into());
    };
    if let Err(why) = check_assertion(assertion, expect, state) {
        return malformed(state, "invalid_client", why);
    }
    let mode = *state.mode.lock().unwrap_or_else(PoisonError::into_inner);
    match mode {
        TokenMode::Refuse => answer(StatusCode::BAD_REQUEST, r#"{"error":"invalid_grant"}"#),
        TokenMode::Fail => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"temporarily_unavailable"}"#,
        ),
        TokenMode::Issue => {
            let mut exchanged = state
                .exchanged
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let issued = format!("supplier-token-{}", exchanged.len() + 1);
            exchanged.push(Exchanged {
                subject_token: subject_token.to_owned(),
                issued: issued.clone(),
                client_cn,
            });
            let body = serde_json::json!({
                "access_token": issued,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
                "expires_in": expect.expires_in,
            });
            answer(StatusCode::OK, body.to_string())
        }
    }
}

/// The client assertion: signed with the registered key under its `kid`, `iss` = `sub` = the client id, `aud` the
/// token endpoint, unexpired and at most five minutes long, its `jti` new.
fn check_assertion(assertion: &str, expect: &Expect, state: &AuthState) -> Result<(), String> {
    let header =
        jsonwebtoken::decode_header(assertion).map_err(|e| format!("assertion header: {e}"))?;
    if header.kid.as_deref() != Some(expect.key_id.as_str()) {
        return Err(format!("assertion kid {:?}", header.kid));
    }
    let pem = expect.assertion_public_pem.as_bytes();
    let key = jsonwebtoken::DecodingKey::from_ec_pem(pem)
        .or_else(|_| jsonwebtoken::DecodingKey::from_rsa_pem(pem))
        .map_err(|e| format!("registered key: {e}"))?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&[&expect.client_id]);
    validation.set_audience(&[&expect.token_url]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &validation)
        .map_err(|e| format!("assertion: {e}"))?
        .claims;
    if claims["sub"] != expect.client_id.as_str() {
        return Err("assertion sub is not the client id".into());
    }
    let (iat, exp) = (claims["iat"].as_i64(), claims["exp"].as_i64());
    if !matches!((iat, exp), (Some(iat), Some(exp)) if exp > iat && exp - iat <= 300) {
        return Err("assertion lifetime not within 5 minutes".into());
    }
    let jti = claims["jti"].as_str().ok_or("assertion without jti")?;
    if !state
        .seen_jti
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(jti.to_owned())
    {
        return Err("assertion jti replayed".into());
    }
    Ok(())
}

/// `application/x-www-form-urlencoded` pairs (`+` is a space, `%XX` a byte).
fn form_urlencoded(body: &[u8]) -> Vec<(String, String)> {
    let decode = |text: &[u8]| {
        let plus: Vec<u8> = text
            .iter()
            .map(|b| if *b == b'+' { b' ' } else { *b })
            .collect();
        percent_encoding::percent_decode(&plus)
            .decode_utf8_lossy()
            .into_owned()
    };
    body.split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut kv = pair.splitn(2, |b| *b == b'=');
            let k = decode(kv.next().unwrap_or_default());
            let v = decode(kv.next().unwrap_or_default());
            (k, v)
        })
        .collect()
}

/// The dev NHS login stand-in: an EC P-256 key under `kid` that signs patients' access tokens, and its JWKS.
pub struct PatientTokens {
    kid: String,
    issuer: String,
    audience: String,
    key: jsonwebtoken::EncodingKey,
    /// The public JWK (without the surrounding set).
    jwk: serde_json::Value,
}

impl std::fmt::Debug for PatientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatientTokens")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl PatientTokens {
    /// From a PKCS#8 PEM EC P-256 private key.
    pub fn new(pem: &str, kid: &str, issuer: &str, audience: &str) -> Result<Self, DemoError> {
        use base64::Engine;
        let pair = rcgen::KeyPair::from_pem(pem)?;
        // The uncompressed point: 0x04, then X and Y, 32 bytes each.
        let point = pair.public_key_raw();
        if point.len() != 65 || point[0] != 4 {
            return Err("not an EC P-256 key".into());
        }
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Ok(Self {
            kid: kid.to_owned(),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            key: jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes())?,
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64(&point[1..33]), "y": b64(&point[33..]),
            }),
        })
    }

    /// The public JWK.
    pub fn jwk(&self) -> serde_json::Value {
        self.jwk.clone()
    }

    /// A JWKS of `keys`' public JWKs.
    pub fn jwks(keys: &[&PatientTokens]) -> String {
        serde_json::json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
    }

    /// The claims of a P9 patient's access token for `nhs_number`, issued to `client_id`, valid five minutes
    /// from now, for `scope`; the caller may change any of them before [`PatientTokens::sign`].
    pub fn claims(&self, nhs_number: &str, client_id: &str, scope: &str) -> serde_json::Value {
        let now = crate::clock::unix_now();
        serde_json::json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": format!("nhs-login-{nhs_number}"),
            "iat": now,
            "nbf": now - 5,
            "exp": now + 300,
            "jti": uuid::Uuid::new_v4().to_string(),
            "client_id": client_id,
            "scope": format!("openid {scope}"),
            "nhs_number": nhs_number,
            "identity_proofing_level": "P9",
        })
    }

    /// `header` and `payload` (JSON texts, as they are: a test's duplicate member or `crit` included) base64url
    /// encoded and signed ES256 with this key.
    pub fn sign_raw(&self, header: &str, payload: &str) -> String {
        use base64::Engine;
        let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        let message = format!("{}.{}", b64(header), b64(payload));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &self.key,
            jsonwebtoken::Algorithm::ES256,
        )
        .unwrap_or_default();
        format!("{message}.{signature}")
    }

    /// `claims` signed ES256 under this key's `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap_or_default()
    }
}
