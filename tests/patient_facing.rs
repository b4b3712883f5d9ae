//! The patient-facing door (`[patient_facing]`): NHS login access tokens verified against a JWKS served over https
//! (rotated while the proxy runs), the patient's practice from the token or the lookup file, the supplier's token
//! obtained by an RFC 8693 exchange at a real token endpoint that checks the client assertion, every refusal with
//! its R4 OperationOutcome and records, per-app limits, and one audit chain with the clinical door.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Method, Request};
use ssp::demo::auth::{AuthState, Expect, PatientTokens, TokenMode, auth_tls, serve_auth};
use support::*;

const PF_ASID: &str = "200000000999";
const PF_TO: &str = "918999198995";
const PRACTICE: &str = "P12345";
const ISSUER: &str = "https://auth.login.test";
const AUDIENCE: &str = "ssp-patient-facing";
const SCOPE: &str = "gp-connect:patient";

/// A ten-digit NHS number with a valid modulus 11 check digit, the `n`th such from 900000000.
fn nhs_number(n: u32) -> String {
    let mut found = 0;
    for base in 900_000_000u32.. {
        let digits: Vec<u32> = base
            .to_string()
            .chars()
            .map(|c| c.to_digit(10).unwrap())
            .collect();
        let sum: u32 = digits
            .iter()
            .enumerate()
            .map(|(i, d)| d * (10 - i as u32))
            .sum();
        let check = match 11 - sum % 11 {
            11 => 0,
            10 => continue,
            c => c,
        };
        if found == n {
            return format!("{base}{check}");
        }
        found += 1;
    }
    unreachable!()
}

struct PfWorld {
    world: World,
    auth: Arc<AuthState>,
    k1: PatientTokens,
    k2: PatientTokens,
    consumer: Consumer,
    /// Patients registered at the practice in the lookup file (no ODS claim in their tokens).
    listed: String,
}

fn key_pem() -> String {
    rcgen::KeyPair::generate().unwrap().serialize_pem()
}

/// A world with the patient-facing door; with `read_patients`, `[audit.patients]` on and the JWKS a file
/// (`jwks.json` in the world's folder), else the JWKS served over https.
async fn start(read_patients: bool) -> PfWorld {
    let pki = Pki::generate();
    let dir = pki.dir.path().to_path_buf();
    let (k1, k2) = (
        PatientTokens::new(&key_pem(), "k1", ISSUER, AUDIENCE).unwrap(),
        PatientTokens::new(&key_pem(), "k2", ISSUER, AUDIENCE).unwrap(),
    );
    let assertion = rcgen::KeyPair::generate().unwrap();
    std::fs::write(
        dir.join("certs/pf-assertion.key"),
        assertion.serialize_pem(),
    )
    .unwrap();
    let auth_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth_addr: SocketAddr = auth_listener.local_addr().unwrap();
    let token_url = format!("https://localhost:{}/token", auth_addr.port());
    let auth = AuthState::new(
        PatientTokens::jwks(&[&k1]),
        Expect {
            client_id: "ssp-test".into(),
            key_id: "ssp-key-1".into(),
            token_url: token_url.clone(),
            audience: "https://supplier.test/gpc".into(),
            assertion_public_pem: assertion.public_key_pem(),
            expires_in: 300,
        },
    );
    let tls = auth_tls(
        &pki.path("provider.crt"),
        &pki.path("provider.key"),
        &pki.ca(),
    )
    .unwrap();
    tokio::spawn(serve_auth(
        auth_listener,
        tls,
        Arc::clone(&auth),
        std::future::pending(),
    ));
    let listed = nhs_number(1);
    std::fs::write(
        dir.join("practices.csv"),
        format!("# nhs_number,ods\n{listed},{PRACTICE}\n"),
    )
    .unwrap();
    let patients = if read_patients {
        std::fs::write(dir.join("certs/patient.key"), [7u8; 32]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("certs/patient.key"),
            std::fs::Permissions::from_mode(0o400),
        )
        .unwrap();
        "[audit.patients]\nkey = \"certs/patient.key\"\nread_bodies = true\n"
    } else {
        ""
    };
    let extra_config = format!(
        r#"
[patient_facing]
listen = "127.0.0.1:0"
asid = "{PF_ASID}"
{platform}
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks = "{jwks}"
jwks_refresh = "1s"
jwks_stale = "3s"
leeway = "30s"
scope = "{SCOPE}"
min_proofing = "P9"
ods_claim = "gp_registration_details.gp_ods_code"
practices = "practices.csv"
assertion_key = "certs/pf-assertion.key"
exchange_backoff = "60s"
requests_per_minute_per_app = 5

[[patient_facing.route]]
path = "/fhir/metadata"
interaction = "{METADATA}"

[[patient_facing.route]]
path = "/fhir/Patient"
methods = ["GET", "POST"]
interaction = "{STRUCTURED}"
"#,
        // The second world's door asks for the platform's certificate, checked against the CA's CRL.
        platform = if read_patients {
            "client_ca = [\"certs/ca.crt\"]\ncrl = [\"certs/ca.crl\"]"
        } else {
            ""
        },
        jwks = if read_patients {
            // The second world reads its keys from a file.
            std::fs::write(dir.join("jwks.json"), PatientTokens::jwks(&[&k1])).unwrap();
            "jwks.json".to_owned()
        } else {
            format!("https://localhost:{}/jwks", auth_addr.port())
        },
    );
    let extra_policy = format!(
        r#"
[[system]]
asid = "{PF_ASID}"
name = "NHS App (test)"
ods = "X26"
fqdn = "{fqdn}"
interactions = ["{METADATA}", "{STRUCTURED}"]

[[endpoint]]
asid = "{PF_TO}"
party_key = "{PRACTICE}-1"
cpa_id = "S1"
ods = "{PRACTICE}"
url = "PROVIDER_URL/pfs"
interactions = ["{METADATA}", "{STRUCTURED}"]
supplier = "Test Supplier"

[[supplier]]
name = "Test Supplier"
token_endpoint = "{token_url}"
client_id = "ssp-test"
key_id = "ssp-key-1"
audience = "https://supplier.test/gpc"

[[agreement]]
id = "DSA-PF"
from = "{PF_ASID}"
to = "{PF_TO}"
interactions = [{granted}]
"#,
        // With the platform's certificate, check 5 compares it with the door's system.
        fqdn = if read_patients {
            CONSUMER_NAME
        } else {
            "nhs-app.test"
        },
        granted = if read_patients {
            format!("\"{METADATA}\", \"{STRUCTURED}\"")
        } else {
            format!("\"{METADATA}\"")
        },
    );
    let setup = Setup {
        extra_config: format!("{extra_config}\n"),
        extra_audit: patients.into(),
        extra_policy,
        ..Setup::default()
    };
    let world = start_world(pki, setup).await;
    let stem = read_patients.then_some("consumer");
    let consumer = Consumer::new(&world.pki, stem, world.patient_facing.unwrap(), false);
    PfWorld {
        world,
        auth,
        k1,
        k2,
        consumer,
        listed,
    }
}

/// `World::start_in`, with the endpoint URL (which names the provider's port) filled into the policy.
async fn start_world(pki: Pki, mut setup: Setup) -> World {
    // The provider's port is known once it runs: the policy names it through a placeholder.
    let provider = Provider::start(&pki).await;
    setup.extra_policy = setup
        .extra_policy
        .replace("PROVIDER_URL", &endpoint_url(provider.addr));
    World::start_with_provider(pki, provider, setup).await
}

impl PfWorld {
    fn request(&self, method: Method, path: &str, token: Option<&str>) -> http::request::Builder {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "ssp.dev.localhost")
            .header("x-request-id", uuid::Uuid::new_v4().to_string());
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder
    }

    async fn get(&self, token: Option<&str>) -> Answer {
        let req = self
            .request(Method::GET, "/fhir/metadata", token)
            .body(empty())
            .unwrap();
        self.consumer.fetch(req).await.unwrap()
    }

    /// `method path` with `token` and the extra header fields, answered whole.
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut builder = self.request(method, path, token);
        for (name, value) in extra {
            builder = builder.header(*name, *value);
        }
        self.consumer
            .fetch(builder.body(empty()).unwrap())
            .await
            .unwrap()
    }

    /// A P9 token from `k1` for `nhs` issued to `app`, naming the practice in its claims.
    fn token(&self, nhs: &str, app: &str) -> serde_json::Value {
        let mut claims = self.k1.claims(nhs, app, SCOPE);
        claims["gp_registration_details"] = serde_json::json!({ "gp_ods_code": PRACTICE });
        claims
    }

    fn records(&self) -> Vec<serde_json::Value> {
        ssp::audit::query(&self.world.audit_dir(), &ssp::audit::Filter::default()).unwrap()
    }

    /// The request record of the request `id`, once written.
    async fn request_record(&self, id: &str) -> serde_json::Value {
        within("the request record", async {
            loop {
                if let Some(r) = self
                    .records()
                    .into_iter()
                    .find(|r| r["kind"] == "request" && r["trace_id"] == id)
                {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

/// Asserts an R4 OperationOutcome with this status and refusal code.
fn assert_refused(answer: &Answer, status: u16, code: &str) {
    assert_eq!(
        answer.status.as_u16(),
        status,
        "{code}: body {:?}",
        answer.body
    );
    let v = answer.json();
    assert_eq!(v["resourceType"], "OperationOutcome");
    let coding = &v["issue"][0]["details"]["coding"][0];
    assert_eq!(coding["code"], code, "{v}");
    assert_eq!(coding["system"], "urn:ssp:patient-facing:refusal");
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_facing_requests_are_verified_exchanged_recorded_and_refused_by_their_codes() {
    let pf = start(false).await;
    let nhs = nhs_number(0);

    // 1. A permitted request: the token verified, the practice from its claim, the supplier's token exchanged.
    // Its query may name the patient's own number.
    let patient_token = pf.k1.sign(&pf.token(&nhs, "app-1"));
    let own =
        format!("/fhir/metadata?_format=json&patient=https://fhir.nhs.uk/Id/nhs-number|{nhs}");
    let req = pf
        .request(Method::GET, &own, Some(&patient_token))
        .header("x-correlation-id", "corr-1")
        // A consumer's own Ssp-* field must not reach the provider.
        .header("ssp-from", FROM)
        // Nor do fields a provider's stack might act on: only the door's list of end-to-end fields goes on.
        .header("x-original-url", "/fhir/Patient/9434765919")
        .header("x-http-method-override", "DELETE")
        .header("forwarded", "for=192.0.2.1")
        .body(empty())
        .unwrap();
    let request_id = req.headers()["x-request-id"].to_str().unwrap().to_owned();
    let answer = pf.consumer.fetch(req).await.unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.headers["x-request-id"], request_id.as_str());
    assert_eq!(answer.headers["x-correlation-id"], "corr-1");
    assert!(pf.auth.malformed().is_empty(), "{:?}", pf.auth.malformed());
    let exchanges = pf.auth.exchanges();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].subject_token, patient_token);
    assert_eq!(
        exchanges[0].client_cn.as_deref(),
        Some(PROXY_CLIENT_NAME),
        "TLS MA to the token endpoint"
    );
    let seen = pf.world.provider.seen();
    let at_provider = seen.last().unwrap();
    assert_eq!(at_provider.path_and_query, format!("/gp/pfs{own}"));
    assert_eq!(
        at_provider.headers["authorization"],
        "Bearer supplier-token-1"
    );
    assert!(
        !at_provider.headers.values().any(|v| v
            .as_bytes()
            .windows(patient_token.len())
            .any(|w| w == patient_token.as_bytes())),
        "the patient's token reached the provider"
    );
    assert_eq!(at_provider.headers["ssp-from"], PF_ASID);
    assert_eq!(at_provider.headers["ssp-to"], PF_TO);
    assert_eq!(at_provider.headers["ssp-interactionid"], METADATA);
    assert_eq!(at_provider.headers["ssp-traceid"], request_id.as_str());
    assert_eq!(at_provider.headers.get_all("ssp-from").iter().count(), 1);
    assert!(at_provider.headers.get("x-original-url").is_none());
    assert!(at_provider.headers.get("x-http-method-override").is_none());
    assert!(
        !at_provider.headers["forwarded"]
            .to_str()
            .unwrap()
            .contains("192.0.2.1")
    );
    assert!(!String::from_utf8_lossy(&answer.body).contains("supplier-token"));
    let record = pf.request_record(&request_id).await;
    assert_eq!(record["decision"], "permit");
    assert_eq!(record["from"], PF_ASID);
    assert_eq!(record["to"], PF_TO);
    let access = &record["patient_facing"];
    assert_eq!(access["client_id"], "app-1");
    assert_eq!(access["nhs_number"], nhs.as_str());
    assert_eq!(access["proofing"], "P9");
    assert_eq!(access["practice"], PRACTICE);
    assert_eq!(access["practice_from"], "token");
    assert_eq!(access["supplier"], "Test Supplier");
    assert_eq!(access["exchange"], "exchanged");
    assert_eq!(access["correlation_id"], "corr-1");
    assert!(
        !record.to_string().contains(&patient_token),
        "the token is not in the record"
    );
    assert!(
        !record.to_string().contains("supplier-token"),
        "nor the supplier's"
    );
    let response = response_record(&pf.world.audit_dir(), &request_id).await;
    assert_eq!(response["status"], 200);

    // 2. The same token again: the supplier's token comes from the cache. Another token of the same patient and
    // app (another proofing level or scope could be in it) is exchanged anew.
    let answer = pf.get(Some(&patient_token)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(pf.auth.token_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        pf.world.provider.seen().last().unwrap().headers["authorization"],
        "Bearer supplier-token-1"
    );

    // 3. Proxy access: a composite token (an acting person) for a patient whose practice is in the lookup file.
    let mut claims = pf.k1.claims(&pf.listed, "app-2", SCOPE);
    claims["act"] = serde_json::json!({ "sub": "proxy-user-7" });
    let req = pf
        .request(Method::GET, "/fhir/metadata", Some(&pf.k1.sign(&claims)))
        .body(empty())
        .unwrap();
    let id = req.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(pf.consumer.fetch(req).await.unwrap().status, 200);
    let access = pf.request_record(&id).await["patient_facing"].clone();
    assert_eq!(access["acting"], "proxy-user-7");
    assert_eq!(access["nhs_number"], pf.listed.as_str());
    assert_eq!(access["practice_from"], "lookup");
    assert_eq!(
        pf.world.provider.seen().last().unwrap().headers["authorization"],
        "Bearer supplier-token-2"
    );

    // 4. Every refusal of the token, the request and the routing: status, code, and its two records.
    let calls_before = pf.auth.token_calls.load(Ordering::SeqCst);
    let app = |n: u32| format!("app-refused-{n}");
    let mut refusals: Vec<(Answer, u16, &str, String)> = Vec::new();
    refusals.push((
        pf.get(None).await,
        401,
        "ACCESS_TOKEN_MISSING",
        "ACCESS_TOKEN_MISSING".into(),
    ));
    let forged = PatientTokens::new(&key_pem(), "k1", ISSUER, AUDIENCE).unwrap();
    refusals.push((
        pf.get(Some(&forged.sign(&pf.token(&nhs, &app(1))))).await,
        401,
        "ACCESS_TOKEN_INVALID",
        "ACCESS_TOKEN_INVALID: bad_signature".into(),
    ));
    // `alg: none`, with claims that would otherwise pass.
    let unsigned = {
        use base64::Engine;
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": "k1"})),
            b64(&pf.token(&nhs, &app(2)))
        )
    };
    refusals.push((
        pf.get(Some(&unsigned)).await,
        401,
        "ACCESS_TOKEN_INVALID",
        "ACCESS_TOKEN_INVALID: algorithm_not_allowed".into(),
    ));
    for (field, value, why) in [
        (
            "iss",
            serde_json::json!("https://elsewhere.test"),
            "wrong_issuer",
        ),
        ("aud", serde_json::json!("another-api"), "wrong_audience"),
        ("exp", serde_json::json!(ssp_now() - 600), "expired"),
        ("nbf", serde_json::json!(ssp_now() + 600), "not_yet_valid"),
        (
            "iat",
            serde_json::json!(ssp_now() + 600),
            "issued_in_future",
        ),
        (
            "exp",
            serde_json::json!(ssp_now() + 2 * 86_400),
            "lifetime_too_long",
        ),
        // A number past i64, or a float, is bounded as well.
        ("exp", serde_json::json!(1e12), "lifetime_too_long"),
        ("exp", serde_json::json!(u64::MAX), "lifetime_too_long"),
        (
            "iat",
            serde_json::json!(ssp_now() as f64 + 600.5),
            "issued_in_future",
        ),
    ] {
        let mut claims = pf.token(&nhs, &app(3));
        claims[field] = value;
        let text = format!("ACCESS_TOKEN_INVALID: {why}");
        let answer = pf.get(Some(&pf.k1.sign(&claims))).await;
        assert_refused(&answer, 401, "ACCESS_TOKEN_INVALID");
        assert!(String::from_utf8_lossy(&answer.body).contains(why), "{why}");
        refusals.push((answer, 401, "ACCESS_TOKEN_INVALID", text));
    }
    let mut low = pf.token(&nhs, &app(4));
    low["identity_proofing_level"] = "P5".into();
    refusals.push((
        pf.get(Some(&pf.k1.sign(&low))).await,
        403,
        "PROOFING_LEVEL_TOO_LOW",
        "PROOFING_LEVEL_TOO_LOW".into(),
    ));
    let mut unscoped = pf.token(&nhs, &app(5));
    unscoped["scope"] = "openid profile".into();
    refusals.push((
        pf.get(Some(&pf.k1.sign(&unscoped))).await,
        403,
        "SCOPE_MISSING",
        "SCOPE_MISSING".into(),
    ));
    let mut anonymous = pf.token(&nhs, &app(6));
    anonymous.as_object_mut().unwrap().remove("nhs_number");
    refusals.push((
        pf.get(Some(&pf.k1.sign(&anonymous))).await,
        403,
        "NHS_NUMBER_MISSING",
        "NHS_NUMBER_MISSING".into(),
    ));
    let unlisted = pf.k1.claims(&nhs_number(2), &app(7), SCOPE);
    refusals.push((
        pf.get(Some(&pf.k1.sign(&unlisted))).await,
        404,
        "PRACTICE_NOT_FOUND",
        "PRACTICE_NOT_FOUND".into(),
    ));
    let good = pf.k1.sign(&pf.token(&nhs, &app(8)));
    // Parties an app names itself are not what its refused request's records say.
    refusals.push((
        pf.send(
            Method::GET,
            "/fhir/Appointment/1",
            Some(&good),
            &[("ssp-from", FROM), ("ssp-to", TO)],
        )
        .await,
        404,
        "ROUTE_NOT_FOUND",
        "ROUTE_NOT_FOUND".into(),
    ));
    // A route's path matches at a segment boundary only; a route's methods only.
    refusals.push((
        pf.send(Method::GET, "/fhir/metadataX", Some(&good), &[])
            .await,
        404,
        "ROUTE_NOT_FOUND",
        "ROUTE_NOT_FOUND".into(),
    ));
    refusals.push((
        pf.send(Method::POST, "/fhir/metadata", Some(&good), &[])
            .await,
        405,
        "METHOD_NOT_ALLOWED",
        "METHOD_NOT_ALLOWED".into(),
    ));
    // Another patient's number in the path or the query: refused before anything else is looked up.
    let other = nhs_number(9);
    refusals.push((
        pf.send(
            Method::GET,
            &format!("/fhir/Patient/{other}"),
            Some(&good),
            &[],
        )
        .await,
        403,
        "PATIENT_MISMATCH",
        "PATIENT_MISMATCH".into(),
    ));
    let query =
        format!("/fhir/metadata?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{other}");
    refusals.push((
        pf.send(Method::GET, &query, Some(&good), &[]).await,
        403,
        "PATIENT_MISMATCH",
        "PATIENT_MISMATCH".into(),
    ));
    // A route the front's agreements do not cover: refused by check 8 on the request as the front sends it.
    refusals.push((
        pf.send(Method::GET, "/fhir/Patient/1", Some(&good), &[])
            .await,
        403,
        "ACCESS_DENIED",
        "ACCESS_DENIED: fot_check_failed".into(),
    ));
    let req = Request::get("/fhir/metadata")
        .header("host", "ssp.dev.localhost")
        .header("authorization", format!("Bearer {good}"))
        .body(empty())
        .unwrap();
    refusals.push((
        pf.consumer.fetch(req).await.unwrap(),
        400,
        "INVALID_REQUEST_ID",
        "INVALID_REQUEST_ID".into(),
    ));
    // Read strictly before its signature is checked: a duplicate claim (the last `nhs_number` the patient's own,
    // the first another's) and a `crit` extension refuse a token its issuer signed.
    let other_first = pf.token(&nhs, &app(10)).to_string().replacen(
        "\"nhs_number\"",
        &format!("\"nhs_number\":\"{}\",\"nhs_number\"", nhs_number(9)),
        1,
    );
    let header = r#"{"alg":"ES256","typ":"JWT","kid":"k1"}"#;
    refusals.push((
        pf.get(Some(&pf.k1.sign_raw(header, &other_first))).await,
        401,
        "ACCESS_TOKEN_INVALID",
        "ACCESS_TOKEN_INVALID: malformed".into(),
    ));
    let crit = r#"{"alg":"ES256","typ":"JWT","kid":"k1","crit":["x-ssp-test"],"x-ssp-test":1}"#;
    refusals.push((
        pf.get(Some(
            &pf.k1.sign_raw(crit, &pf.token(&nhs, &app(11)).to_string()),
        ))
        .await,
        401,
        "ACCESS_TOKEN_INVALID",
        "ACCESS_TOKEN_INVALID: crit_not_understood".into(),
    ));
    // Two Authorization fields: which is the token would be a guess.
    refusals.push((
        pf.send(
            Method::GET,
            "/fhir/metadata",
            Some(&good),
            &[("authorization", "Bearer x")],
        )
        .await,
        401,
        "ACCESS_TOKEN_INVALID",
        "ACCESS_TOKEN_INVALID: two_authorization_fields".into(),
    ));
    // A token in the query is refused, and not recorded.
    let req = pf
        .request(
            Method::GET,
            &format!("/fhir/metadata?access_token={good}"),
            None,
        )
        .body(empty())
        .unwrap();
    let in_query = pf.consumer.fetch(req).await.unwrap();
    let in_query_id = in_query.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    refusals.push((
        in_query,
        400,
        "ACCESS_TOKEN_IN_QUERY",
        "ACCESS_TOKEN_IN_QUERY".into(),
    ));
    // `..;` is a dot segment to a servlet container: refused as `..` is.
    refusals.push((
        pf.send(
            Method::GET,
            "/fhir/metadata/..;/..;/other",
            Some(&good),
            &[],
        )
        .await,
        400,
        "INVALID_PATH",
        "INVALID_PATH: DotSegment".into(),
    ));
    // Another patient's number anywhere a provider might read it, `+` for the spaces of a form-encoded query too.
    let spaced = {
        let n = nhs_number(9);
        format!(
            "/fhir/metadata?subject=Patient/{}+{}+{}",
            &n[..3],
            &n[3..6],
            &n[6..]
        )
    };
    refusals.push((
        pf.send(Method::GET, &spaced, Some(&good), &[]).await,
        403,
        "PATIENT_MISMATCH",
        "PATIENT_MISMATCH".into(),
    ));
    refusals.push((
        pf.send(
            Method::GET,
            &format!("/fhir/metadata?nhs_number={}", nhs_number(9)),
            Some(&good),
            &[],
        )
        .await,
        403,
        "PATIENT_MISMATCH",
        "PATIENT_MISMATCH".into(),
    ));
    for (answer, status, code, text) in &refusals {
        assert_refused(answer, *status, code);
        if *status == 401 {
            assert!(
                answer.headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer")
            );
        }
        match *code {
            "METHOD_NOT_ALLOWED" => assert_eq!(answer.headers["allow"], "GET"),
            "SCOPE_MISSING" => assert_eq!(
                answer.headers["www-authenticate"],
                "Bearer error=\"insufficient_scope\""
            ),
            _ => {}
        }
        let Some(id) = answer.headers.get("x-request-id") else {
            assert_eq!(*code, "INVALID_REQUEST_ID");
            continue;
        };
        let record = pf.request_record(id.to_str().unwrap()).await;
        assert_eq!(record["decision"], "deny", "{code}");
        assert_eq!(record["from"], PF_ASID, "{record}");
        assert!(record.get("to").is_none(), "{record}");
        assert_eq!(record["reason"], text.as_str(), "{record}");
        let response = response_record(&pf.world.audit_dir(), id.to_str().unwrap()).await;
        assert_eq!(response["status"], *status);
        assert_eq!(response["outcome"], "denied");
    }
    assert_eq!(
        pf.auth.token_calls.load(Ordering::SeqCst),
        calls_before,
        "a refused token is never exchanged"
    );
    let in_query = pf.request_record(&in_query_id).await;
    assert!(!in_query.to_string().contains("access_token"), "{in_query}");
    // A token refused for a claim after its signature still names its app and patient.
    let low_record = pf
        .records()
        .into_iter()
        .find(|r| r["reason"] == "PROOFING_LEVEL_TOO_LOW")
        .unwrap();
    assert_eq!(low_record["patient_facing"]["client_id"], app(4).as_str());
    assert_eq!(low_record["patient_facing"]["proofing"], "P5");
    assert_eq!(low_record["from"], PF_ASID);

    // 5. Per-app limit: five a minute, then 429 with the rate headers. The supplier's token is cached per token.
    let app5 = pf.k1.sign(&pf.token(&nhs, "app-5"));
    for _ in 0..5 {
        assert_eq!(pf.get(Some(&app5)).await.status, 200);
    }
    let answer = pf.get(Some(&app5)).await;
    assert_refused(&answer, 429, "APP_RATE_LIMIT");
    assert_eq!(answer.headers["x-rate-limit-limit"], "5");
    assert_eq!(answer.headers["x-rate-limit-remaining"], "0");
    assert!(
        answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );

    // 6. Key rotation: a new kid is picked up by the next fetch (one a refresh interval, 1 s here, at most), a
    // removed one refused after the stale period.
    pf.auth.set_mode(TokenMode::Issue);
    pf.auth.set_jwks(PatientTokens::jwks(&[&pf.k1, &pf.k2]));
    // The first token under the new kid fetches the set (no unknown kid has in this refresh interval).
    let k2_token = pf.k2.sign(&pf.token(&nhs, "app-6"));
    let answer = pf.get(Some(&k2_token)).await;
    assert_eq!(
        answer.status, 200,
        "the new kid at its first token: {:?}",
        answer.body
    );
    pf.auth.set_jwks(PatientTokens::jwks(&[&pf.k2]));
    let removed = Instant::now();
    // Within the stale period (3 s) the removed key still verifies.
    assert_eq!(
        pf.get(Some(&pf.k1.sign(&pf.token(&nhs, "app-7"))))
            .await
            .status,
        200
    );
    let refused_after = within("the removed key to go stale", async {
        for n in 0.. {
            let answer = pf
                .get(Some(&pf.k1.sign(&pf.token(&nhs, &format!("app-8-{n}")))))
                .await;
            if answer.status == 401 {
                assert_refused(&answer, 401, "ACCESS_TOKEN_INVALID");
                return removed.elapsed();
            }
            assert_eq!(answer.status, 200);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        unreachable!()
    })
    .await;
    assert!(
        refused_after >= Duration::from_secs(1),
        "refused after {refused_after:?}"
    );
    // Invented kids: at most one fetch per refresh interval, however many tokens name them.
    let fetches = pf.auth.jwks_fetches.load(Ordering::SeqCst);
    let started = Instant::now();
    for n in 0..10 {
        let stranger =
            PatientTokens::new(&key_pem(), &format!("invented-{n}"), ISSUER, AUDIENCE).unwrap();
        let answer = pf.get(Some(&stranger.sign(&pf.token(&nhs, "app-9")))).await;
        assert_refused(&answer, 401, "ACCESS_TOKEN_INVALID");
    }
    // Kid-triggered fetches at most one a second, and the periodic ones one a second.
    let intervals = 2 * (started.elapsed().as_secs() + 1) + 1;
    let fetched = pf.auth.jwks_fetches.load(Ordering::SeqCst) - fetches;
    assert!(
        fetched as u64 <= intervals,
        "{fetched} fetches in {:?}",
        started.elapsed()
    );

    // 7. The supplier refuses the exchange: 403, recorded as refused. (Tokens are signed by k2 from here on.)
    pf.auth.set_mode(TokenMode::Refuse);
    let answer = pf
        .get(Some(&pf.k2.sign(&pf.token(&nhs_number(3), "app-3"))))
        .await;
    assert_refused(&answer, 403, "TOKEN_EXCHANGE_REFUSED");
    let id = answer.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(
        pf.request_record(&id).await["patient_facing"]["exchange"],
        "refused"
    );

    // 8. The token endpoint fails: 502 once it has been asked, then no call at all during the back-off.
    pf.auth.set_mode(TokenMode::Fail);
    let calls = pf.auth.token_calls.load(Ordering::SeqCst);
    let answer = pf
        .get(Some(&pf.k2.sign(&pf.token(&nhs_number(4), "app-4"))))
        .await;
    assert_refused(&answer, 502, "TOKEN_EXCHANGE_FAILED");
    assert_eq!(pf.auth.token_calls.load(Ordering::SeqCst), calls + 1);
    for n in 5..10 {
        let answer = pf
            .get(Some(
                &pf.k2.sign(&pf.token(&nhs_number(n), &format!("app-4-{n}"))),
            ))
            .await;
        assert_refused(&answer, 502, "TOKEN_EXCHANGE_FAILED");
    }
    assert_eq!(
        pf.auth.token_calls.load(Ordering::SeqCst),
        calls + 1,
        "no retry storm"
    );
    // A cached token still serves its request while the endpoint is down.
    assert_eq!(pf.get(Some(&k2_token)).await.status, 200);
    let metrics = metrics_text(pf.world.admin).await;
    assert!(
        metrics.contains(r#"ssp_patient_facing_token_exchanges_total{outcome="failed"} 6"#),
        "{metrics}"
    );
    // Cached: part 2, four of part 5, the one above.
    assert!(metrics.contains(r#"ssp_patient_facing_token_exchanges_total{outcome="cached"} 6"#));

    // 9. One chain: the clinical door's requests and these verify together.
    assert_eq!(pf.world.get("/fhir/metadata").await.status(), 200);
    let verified = ssp::audit::verify(&pf.world.audit_dir()).unwrap();
    assert!(verified.records > 40, "{verified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_patient_index_the_number_is_an_hmac_from_the_token_and_keys_come_from_a_file() {
    let pf = start(true).await;
    let nhs = nhs_number(0);
    let req = pf
        .request(
            Method::GET,
            "/fhir/metadata",
            Some(&pf.k1.sign(&pf.token(&nhs, "app-1"))),
        )
        .body(empty())
        .unwrap();
    let id = req.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(pf.consumer.fetch(req).await.unwrap().status, 200);
    let record = pf.request_record(&id).await;
    assert!(
        record["patient_facing"].get("nhs_number").is_none(),
        "{record}"
    );
    assert!(!record.to_string().contains(&nhs));
    let ids = &record["patients"]["ids"];
    assert_eq!(ids[0]["in"], "token");
    assert_eq!(ids[0]["check"], "valid");
    let key = ssp::audit::patients::PatientKey::from_bytes(&[7u8; 32]).unwrap();
    assert_eq!(ids[0]["hmac"], key.hmac(&nhs));
    assert_eq!(
        pf.auth.jwks_fetches.load(Ordering::SeqCst),
        0,
        "the keys came from the file"
    );

    // The platform's certificate: none, or a revoked one, and the handshake is refused.
    let addr = pf.world.patient_facing.unwrap();
    for stem in [None, Some("consumer-revoked")] {
        let platform = Consumer::new(&pf.world.pki, stem, addr, false);
        let req = pf
            .request(
                Method::GET,
                "/fhir/metadata",
                Some(&pf.k1.sign(&pf.token(&nhs, "app-1"))),
            )
            .body(empty())
            .unwrap();
        assert!(platform.fetch(req).await.is_err(), "{stem:?} was let in");
    }

    // A structured record request whose body names another patient: forwarded (the supplier's token scopes it),
    // and the body's number is in the response record. One connection, one X-Request-ID twice: a refused decoy
    // first, then that request. The other patient's trail shows the real one, by someone signed in as another
    // patient; the patient's own shows their accesses as theirs.
    let other = nhs_number(9);
    let mut sender = pf.consumer.connect().await.unwrap();
    let reused = uuid::Uuid::new_v4().to_string();
    let token = pf.k1.sign(&pf.token(&nhs, "app-2"));
    for (method, path, body) in [
        (Method::GET, "/fhir/Nope", String::new()),
        (
            Method::POST,
            "/fhir/Patient/$gpc.getstructuredrecord",
            format!(
                r#"{{"resourceType":"Parameters","parameter":[{{"name":"patientNHSNumber","valueIdentifier":{{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"{other}"}}}}]}}"#
            ),
        ),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "ssp.dev.localhost")
            .header("x-request-id", reused.as_str())
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/fhir+json")
            .body(full(body))
            .unwrap();
        let answer = Answer::read(sender.send(req).await.unwrap()).await.unwrap();
        assert!(answer.status.as_u16() < 500, "{:?}", answer.body);
    }
    let trail_of = |number: &str| {
        let index = ssp::audit::patients::index::catch_up(&pf.world.audit_dir()).unwrap();
        let hmac = key.hmac(number);
        let entries = index.lookup(&hmac).unwrap();
        ssp::audit::patients::trail::rows(&pf.world.audit_dir(), &hmac, &entries, None, None)
            .unwrap()
            .rows
    };
    let victim = within("the body's number in the other patient's trail", async {
        loop {
            let rows = trail_of(&other);
            if let Some(row) = rows
                .into_iter()
                .find(|r| r.trace_id.as_deref() == Some(reused.as_str()))
            {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(victim.found_in, "body");
    assert_eq!(victim.decision.as_deref(), Some("permit"), "{victim:?}");
    assert_eq!(victim.interaction.as_deref(), Some(STRUCTURED));
    assert_eq!(
        victim.user_name.as_deref(),
        Some("someone signed in as another patient, in app app-2")
    );
    assert!(
        trail_of(&nhs)
            .iter()
            .any(|r| r.user_name.as_deref() == Some("the patient, in app app-2"))
    );

    // A consumer that goes away while the supplier's token is being exchanged: the exchange still completes
    // (cached for the next request, no second call), and the abandoned request has its records.
    pf.auth.set_delay(Duration::from_millis(600));
    let calls = pf.auth.token_calls.load(Ordering::SeqCst);
    let slow = pf.k1.sign(&pf.token(&nhs, "app-9"));
    let req = pf
        .request(Method::GET, "/fhir/metadata", Some(&slow))
        .body(empty())
        .unwrap();
    let gone = req.headers()["x-request-id"].to_str().unwrap().to_owned();
    let abandoned = tokio::time::timeout(Duration::from_millis(200), pf.consumer.fetch(req)).await;
    assert!(abandoned.is_err(), "answered before the token endpoint did");
    let record = pf.request_record(&gone).await;
    assert_eq!(record["reason"], "CLIENT_CLOSED_DURING_TOKEN_EXCHANGE");
    let closed = response_record(&pf.world.audit_dir(), &gone).await;
    assert_eq!(closed["outcome"], "client_closed");
    assert_eq!(closed["status"], 499);
    pf.auth.set_delay(Duration::ZERO);
    let answer = pf.get(Some(&slow)).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        pf.auth.token_calls.load(Ordering::SeqCst),
        calls + 1,
        "the abandoned request's exchange was kept"
    );

    // The file is read again each refresh interval: a key written into it is taken up.
    let answer = pf.get(Some(&pf.k2.sign(&pf.token(&nhs, "app-2")))).await;
    assert_refused(&answer, 401, "ACCESS_TOKEN_INVALID");
    std::fs::write(
        pf.world.pki.dir.path().join("jwks.json"),
        PatientTokens::jwks(&[&pf.k1, &pf.k2]),
    )
    .unwrap();
    within("the key written into the file to be taken up", async {
        for n in 0.. {
            let answer = pf
                .get(Some(&pf.k2.sign(&pf.token(&nhs, &format!("app-3-{n}")))))
                .await;
            if answer.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

fn ssp_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
