//! `ssp policy sds`: the directory built from Spine Directory Service answers, from saved Bundles
//! (`tests/fixtures/sds/`, written for the project from the SDS FHIR API's shapes) and live from a local HTTPS
//! server that checks the `apikey` header and the query, pages, and answers 429 once; then a consumer permitted
//! through the proxy on a directory built this way. The real binary throughout.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a failed test"
)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Value, json};
use support::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sds");
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const INTERACTION_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsServiceInteractionId";

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

const GOOD: [&str; 5] = [
    "provider-devices.json",
    "provider-endpoints-1.json",
    "provider-endpoints-2.json",
    "consumer-devices.json",
    "consumer-endpoints.json",
];

/// A config whose `[sds]` section resolves RXX01 (consumers) and B82617 (providers), plus `extra` lines.
async fn sds_config(pki: &Pki, extra: &str) -> String {
    let config = offline_config(pki).await;
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[sds]\nsystems = [\"RXX01\"]\nendpoints = [\"B82617\"]\ninteractions = [\"{METADATA}\", \"{STRUCTURED}\"]\n{extra}\n"
    ));
    std::fs::write(&config, text).unwrap();
    config
}

fn run(config: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(ssp_bin())
        .args(["policy", "sds", "--config", config])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bundle_args(names: &[String]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| ["--bundle".to_owned(), n.clone()])
        .collect()
}

fn good_args() -> Vec<String> {
    bundle_args(&GOOD.map(|n| fixture(n).display().to_string()))
}

/// A searchset Bundle of these resources.
fn bundle(resources: Vec<Value>) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": resources.into_iter().map(|r| json!({ "resource": r })).collect::<Vec<_>>(),
    })
}

fn device(
    id: &str,
    asid: Option<&str>,
    party_key: &str,
    ods: &str,
    interactions: &[&str],
) -> Value {
    let mut identifier =
        vec![json!({ "system": "https://fhir.nhs.uk/Id/nhsMhsPartyKey", "value": party_key })];
    if let Some(asid) = asid {
        identifier.push(json!({ "system": "https://fhir.nhs.uk/Id/nhsSpineASID", "value": asid }));
    }
    for i in interactions {
        identifier
            .push(json!({ "system": "https://fhir.nhs.uk/Id/nhsEndpointServiceId", "value": i }));
    }
    json!({
        "resourceType": "Device",
        "id": id,
        "identifier": identifier,
        "owner": { "identifier": { "system": ODS_SYSTEM, "value": ods } },
    })
}

fn endpoint(
    id: &str,
    party_key: &str,
    address: &str,
    fqdn: &str,
    ods: &str,
    interaction: &str,
) -> Value {
    json!({
        "resourceType": "Endpoint",
        "id": id,
        "address": address,
        "managingOrganization": { "identifier": { "system": ODS_SYSTEM, "value": ods } },
        "identifier": [
            { "system": "https://fhir.nhs.uk/Id/nhsMhsFQDN", "value": fqdn },
            { "system": "https://fhir.nhs.uk/Id/nhsMhsPartyKey", "value": party_key },
            { "system": "https://fhir.nhs.uk/Id/nhsMhsCPAId", "value": format!("CPA-{party_key}") },
        ],
        "extension": [{
            "url": "https://fhir.nhs.uk/StructureDefinition/Extension-SDS-NhsServiceInteractionId",
            "valueReference": { "identifier": { "system": INTERACTION_SYSTEM, "value": interaction } },
        }],
    })
}

fn write_json(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path.display().to_string()
}

// ---------------------------------------------------------------------------------------------------------------
// From saved answers.

/// The saved Bundles (one Device and Endpoints over two pages for a provider, one of each for a consumer) give an
/// ordinary policy file: sorted, the same bytes on every run, each entry commented with its SDS resources, the
/// address's trailing slash removed, the FQDN lower-cased; and the normal import takes it with a hand-written
/// agreement.
#[tokio::test]
async fn saved_answers_give_a_stable_policy_file() {
    let pki = Pki::generate();
    let config = sds_config(&pki, "").await;
    let args = good_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, first, err) = run(&config, &args);
    assert_eq!(code, 0, "{err}");
    let (_, second, _) = run(&config, &args);
    assert_eq!(first, second, "not stable across runs");
    let expected = format!(
        "# SDS Device 0A1B2C3D-CONSUMER; Endpoint 9F8E7D6C-CONSUMER; from consumer-devices.json, consumer-endpoints.json
[[system]]
asid = \"200000000001\"
name = \"RXX01 RXX01-000001\"
ods = \"RXX01\"
fqdn = \"epr.hospital.example.nhs.uk\"
interactions = [
    \"{STRUCTURED}\",
    \"{METADATA}\",
]

# SDS Device F0F0E921-92CA-4A88-A550-2DBB36F703AF; Endpoint E1A2B3C4-0001, E1A2B3C4-0002; from provider-devices.json, provider-endpoints-1.json, provider-endpoints-2.json
[[endpoint]]
asid = \"918999190001\"
party_key = \"B82617-807724\"
cpa_id = \"S20001A000123\"
ods = \"B82617\"
url = \"https://gp.example.nhs.uk/B82617/STU3/1/gpconnect\"
interactions = [
    \"{STRUCTURED}\",
    \"{METADATA}\",
]
"
    );
    assert!(first.ends_with(&expected), "{first}");
    assert!(
        first.starts_with("# Directory from the Spine Directory Service"),
        "{first}"
    );

    // Into a policy folder beside a hand-written agreement: the normal checks take it.
    let dir = pki.dir.path().join("sds-policies");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("sds.toml");
    let mut with_out = args.clone();
    let out_text = out.display().to_string();
    with_out.extend(["--out", out_text.as_str()]);
    let (code, _, err) = run(&config, &with_out);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), first);
    std::fs::write(
        dir.join("agreements.toml"),
        "[[agreement]]\nid = \"DSA-SDS\"\nfrom = \"200000000001\"\nto = \"918999190001\"\ninteractions = [\"*\"]\n",
    )
    .unwrap();
    let policy = ssp::policy::Policy::load_dir(&dir, 0).unwrap();
    assert_eq!(policy.counts(), (1, 1, 1));
}

/// Each bad answer is named by resource and field, and by default nothing is written; `--partial` writes the good
/// entries and lists the bad.
#[tokio::test]
async fn bad_answers_are_named_and_nothing_is_written() {
    let pki = Pki::generate();
    let config = sds_config(&pki, "").await;
    let dir = tempfile::tempdir().unwrap();
    let good_provider = [
        device(
            "d-good",
            Some("918999190002"),
            "B82617-000002",
            "B82617",
            &[METADATA],
        ),
        endpoint(
            "e-good",
            "B82617-000002",
            "https://gp2.example.nhs.uk/fhir",
            "gp2.example.nhs.uk",
            "B82617",
            METADATA,
        ),
    ];
    let cases: Vec<(&str, Vec<Value>, &str)> = vec![
        (
            "no ASID",
            vec![device("d-1", None, "B82617-1", "B82617", &[METADATA])],
            "Device d-1: no ASID (identifier system https://fhir.nhs.uk/Id/nhsSpineASID)",
        ),
        (
            "two party keys for one ASID",
            vec![
                device(
                    "d-2a",
                    Some("918999190009"),
                    "B82617-2A",
                    "B82617",
                    &[METADATA],
                ),
                device(
                    "d-2b",
                    Some("918999190009"),
                    "B82617-2B",
                    "B82617",
                    &[METADATA],
                ),
                endpoint(
                    "e-2",
                    "B82617-2A",
                    "https://gp.example.nhs.uk/fhir",
                    "gp.example.nhs.uk",
                    "B82617",
                    METADATA,
                ),
            ],
            "two Devices claim ASID 918999190009: d-2a (party key B82617-2A, ODS B82617) and d-2b (party key B82617-2B",
        ),
        (
            "http address",
            vec![
                device(
                    "d-3",
                    Some("918999190003"),
                    "B82617-3",
                    "B82617",
                    &[METADATA],
                ),
                endpoint(
                    "e-3",
                    "B82617-3",
                    "http://gp.example.nhs.uk/fhir",
                    "gp.example.nhs.uk",
                    "B82617",
                    METADATA,
                ),
            ],
            "Endpoint e-3: address \"http://gp.example.nhs.uk/fhir\" is not https",
        ),
        (
            "Device without Endpoint",
            vec![device(
                "d-4",
                Some("918999190004"),
                "B82617-4",
                "B82617",
                &[METADATA],
            )],
            "party key B82617-4: Device d-4 (ASID 918999190004) has no Endpoint",
        ),
        (
            "Endpoint without Device",
            vec![endpoint(
                "e-5",
                "B82617-5",
                "https://gp.example.nhs.uk/fhir",
                "gp.example.nhs.uk",
                "B82617",
                METADATA,
            )],
            "party key B82617-5: Endpoint e-5 has no Device",
        ),
        (
            "id that would end its comment",
            vec![device(
                "X\n[[agreement]]\nid = \"INJECTED\"\nfrom = \"918999190002\"\nto = \"918999190002\"\n#",
                Some("918999190008"),
                "B82617-8",
                "B82617",
                &[METADATA],
            )],
            "is not a FHIR id (letters, digits, - and ., at most 64)",
        ),
        (
            "address the policy would refuse",
            vec![
                device(
                    "d-9",
                    Some("918999190009"),
                    "B82617-9",
                    "B82617",
                    &[METADATA],
                ),
                endpoint(
                    "e-9",
                    "B82617-9",
                    "https://user@gp.example.nhs.uk/fhir",
                    "gp.example.nhs.uk",
                    "B82617",
                    METADATA,
                ),
            ],
            "Endpoint e-9: address \"https://user@gp.example.nhs.uk/fhir\" is not a URL the policy accepts",
        ),
        (
            "Endpoint of another organisation",
            vec![
                device(
                    "d-10",
                    Some("918999190010"),
                    "B82617-10",
                    "B82617",
                    &[METADATA],
                ),
                endpoint(
                    "e-10",
                    "B82617-10",
                    "https://gp.example.nhs.uk/fhir",
                    "gp.example.nhs.uk",
                    "RXX01",
                    METADATA,
                ),
            ],
            "party key B82617-10: Device d-10 (ASID 918999190010) belongs to ODS B82617 but its Endpoint e-10 to ODS RXX01",
        ),
        (
            "malformed interaction",
            vec![device(
                "d-6",
                Some("918999190006"),
                "B82617-6",
                "B82617",
                &["gpconnect read metadata"],
            )],
            "Device d-6: interaction \"gpconnect read metadata\" is not a well-formed URN",
        ),
    ];
    for (name, resources, message) in cases {
        let mut all = resources;
        all.extend(good_provider.iter().cloned());
        let file = write_json(
            dir.path(),
            &format!("{}.json", name.replace(' ', "-")),
            &bundle(all),
        );
        let out = dir.path().join(format!("{}.toml", name.replace(' ', "-")));
        let out_text = out.display().to_string();
        let (code, stdout, stderr) = run(&config, &["--bundle", &file, "--out", &out_text]);
        assert_eq!(code, 1, "{name}: {stdout}{stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
        assert!(stderr.contains("nothing written"), "{name}: {stderr}");
        assert!(!out.exists(), "{name}: written despite a bad entry");
        // --partial: the good provider is written, the bad entry listed.
        let (code, _, stderr) = run(
            &config,
            &["--bundle", &file, "--out", &out_text, "--partial"],
        );
        assert_eq!(code, 1, "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
        let written = std::fs::read_to_string(&out).unwrap();
        assert!(!written.contains("[[agreement]]"), "{name}: {written}");
        assert!(
            written.contains("asid = \"918999190002\""),
            "{name}: {written}"
        );
        assert_eq!(
            written.matches("[[endpoint]]").count(),
            1,
            "{name}: {written}"
        );
    }
    // Not a searchset, not a Bundle.
    for (value, message) in [
        (
            json!({"resourceType": "Bundle", "type": "collection", "entry": []}),
            "Bundle type is \"collection\", not \"searchset\"",
        ),
        (
            json!({"resourceType": "OperationOutcome"}),
            "resourceType is \"OperationOutcome\", not \"Bundle\"",
        ),
    ] {
        let file = write_json(dir.path(), "other.json", &value);
        let (code, _, stderr) = run(&config, &["--bundle", &file]);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
    }
}

/// `--diff` names, by ASID, what the directory would add, remove (only for the ODS codes SDS answers for) and
/// change in the policy in force.
#[tokio::test]
async fn diff_against_the_policy_in_force() {
    let pki = Pki::generate();
    let config = sds_config(&pki, "").await;
    let policy_dir = pki.dir.path().join("policies");
    // In force: the provider with an older URL and one interaction, and a B82617 endpoint SDS no longer lists.
    std::fs::write(
        policy_dir.join("sds.toml"),
        format!(
            "[[endpoint]]\nasid = \"918999190001\"\nparty_key = \"B82617-807724\"\ncpa_id = \"S20001A000123\"\n\
             ods = \"B82617\"\nurl = \"https://old.example.nhs.uk/gpconnect\"\ninteractions = [\"{METADATA}\"]\n\n\
             [[endpoint]]\nasid = \"918999190099\"\nparty_key = \"B82617-999\"\ncpa_id = \"S1\"\nods = \"B82617\"\n\
             url = \"https://gone.example.nhs.uk/gpconnect\"\ninteractions = [\"{METADATA}\"]\n"
        ),
    )
    .unwrap();
    let args = good_args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("--diff");
    let (code, stdout, stderr) = run(&config, &args);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"+ system 200000000001 (RXX01 RXX01-000001, ODS RXX01, fqdn epr.hospital.example.nhs.uk)"), "{stdout}");
    assert!(lines.contains(&format!(
        "~ endpoint 918999190001: url \"https://old.example.nhs.uk/gpconnect\" -> \"https://gp.example.nhs.uk/B82617/STU3/1/gpconnect\"; interaction +{STRUCTURED}"
    ).as_str()), "{stdout}");
    assert!(
        lines.contains(
            &"- endpoint 918999190099 (https://gone.example.nhs.uk/gpconnect, ODS B82617)"
        ),
        "{stdout}"
    );
    // The test world's own systems (ODS RXX01, RYY01...) are hand-written: RXX01 is SDS's, so it shows as removed;
    // RYY01 is not in [sds], so it does not.
    assert!(!stdout.contains("RYY01"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------------------------
// Live, from a local HTTPS server.

/// What the test SDS server saw: (path and query, apikey header).
type SeenRequests = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// An HTTPS SDS stand-in on 127.0.0.1 with the PKI's `localhost` certificate: requires `apikey: test-key`,
/// answers the first request with 429 (`Retry-After: 1`), serves the fixtures by resource and ODS code, the
/// B82617 Endpoint search in two pages, and `hostile_next` as page 1's next link when given.
async fn sds_server(
    pki: &Pki,
    hostile_next: Option<String>,
    fhir_version: &'static str,
) -> (SocketAddr, SeenRequests) {
    let config = rustls::ServerConfig::builder_with_provider(ssp::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            ssp::tls::load_certs("c", &pki.path("provider.crt")).unwrap(),
            ssp::tls::load_key("k", &pki.path("provider.key")).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: SeenRequests = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log, hostile_next) =
                (acceptor.clone(), Arc::clone(&log), hostile_next.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (log, hostile_next) = (Arc::clone(&log), hostile_next.clone());
                    async move {
                        Ok::<_, Infallible>(answer(&req, addr, &log, hostile_next, fhir_version))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn answer(
    req: &Request<Incoming>,
    addr: SocketAddr,
    log: &Mutex<Vec<(String, Option<String>)>>,
    hostile_next: Option<String>,
    fhir_version: &str,
) -> Response<Full<Bytes>> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let key = req
        .headers()
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let first = {
        let mut log = log.lock().unwrap();
        log.push((pq.clone(), key.clone()));
        log.len() == 1
    };
    let reply = |status: StatusCode, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header(
                "content-type",
                format!("application/fhir+json; fhirVersion={fhir_version}"),
            )
            .header("retry-after", "1")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if key.as_deref() != Some("test-key") {
        return reply(StatusCode::UNAUTHORIZED, b"{}".to_vec());
    }
    if first {
        return reply(StatusCode::TOO_MANY_REQUESTS, b"{}".to_vec());
    }
    let ods = if pq.contains("ods-organization-code%7CB82617") {
        "provider"
    } else if pq.contains("ods-organization-code%7CRXX01") {
        "consumer"
    } else {
        return reply(StatusCode::BAD_REQUEST, b"{}".to_vec());
    };
    if !pq.contains(&format!(
        "identifier=https://fhir.nhs.uk/Id/nhsServiceInteractionId%7C{METADATA}"
    )) {
        return reply(StatusCode::BAD_REQUEST, b"{}".to_vec());
    }
    let base = format!("https://localhost:{}/FHIR/R4", addr.port());
    let name = match (
        pq.starts_with("/FHIR/R4/Device?"),
        ods,
        pq.contains("_page=2"),
    ) {
        (true, _, _) => format!("{ods}-devices.json"),
        (false, "provider", false) => "provider-endpoints-1.json".into(),
        (false, "provider", true) => "provider-endpoints-2.json".into(),
        (false, _, _) => "consumer-endpoints.json".into(),
    };
    let mut bundle: Value =
        serde_json::from_slice(&std::fs::read(fixture(&name)).unwrap()).unwrap();
    // Page links point at this server (or, for the hostile case, elsewhere).
    for link in bundle["link"].as_array_mut().unwrap() {
        if link["relation"] == "next" {
            let hostile_next = hostile_next
                .clone()
                .map(|h| h.replace("PLACEHOLDER", &format!("https://localhost:{}", addr.port())));
            link["url"] = json!(hostile_next.unwrap_or_else(|| format!(
                "{base}/Endpoint?organization={ODS_SYSTEM}%7CB82617&identifier={INTERACTION_SYSTEM}%7C{METADATA}&_page=2"
            )));
        }
    }
    reply(StatusCode::OK, serde_json::to_vec(&bundle).unwrap())
}

/// A config for the live server at `addr`, resolving the metadata interaction only: 2 ODS codes x 2 resources
/// = 4 searches, one of them two pages.
async fn live_config(pki: &Pki, addr: SocketAddr) -> String {
    std::fs::write(pki.path("sds-apikey"), "test-key\n").unwrap();
    let extra = format!(
        "base_url = \"https://localhost:{}/FHIR/R4\"\napi_key_file = \"certs/sds-apikey\"\nca = [\"certs/ca.crt\"]\ntimeout = \"5s\"\n",
        addr.port()
    );
    let config = sds_config(pki, &extra).await;
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!(", \"{STRUCTURED}\""), "");
    std::fs::write(&config, text).unwrap();
    config
}

/// Live: the `apikey` header on every request, the query parameters of each search, the `next` page followed, a
/// 429 waited out and retried; the entries are those the saved answers give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_fetch_pages_retries_429_and_sends_the_key() {
    let pki = Pki::generate();
    let (addr, seen) = sds_server(&pki, None, "4.0").await;
    let config = live_config(&pki, addr).await;
    let started = std::time::Instant::now();
    let (code, live, stderr) = tokio::task::spawn_blocking(move || run(&config, &[]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "the 429's Retry-After was not waited"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(_, key)| key.as_deref() == Some("test-key"))
    );
    assert_eq!(
        seen[0].0, seen[1].0,
        "the 429 was not retried with the same request"
    );
    assert!(
        seen.iter().any(|(pq, _)| pq.contains("_page=2")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|(pq, _)| pq.starts_with("/FHIR/R4/Device?organization=https://fhir.nhs.uk/Id/ods-organization-code%7CRXX01&identifier=")));
    // The same entries as from the saved answers (interactions limited to metadata here).
    assert!(
        live.contains("[[system]]\nasid = \"200000000001\""),
        "{live}"
    );
    assert!(
        live.contains("url = \"https://gp.example.nhs.uk/B82617/STU3/1/gpconnect\""),
        "{live}"
    );
    assert!(live.contains("; fetched 20"), "{live}");
    assert!(
        !live.contains("test-key"),
        "the API key leaked into the output"
    );
}

/// Live answers that must be refused: a `next` link leaving the base URL (it would carry the API key elsewhere),
/// and an answer that is not FHIR R4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_answers_leaving_the_base_url_or_not_r4_are_refused() {
    let pki = Pki::generate();
    let (addr, _) = sds_server(
        &pki,
        Some("https://elsewhere.example/FHIR/R4/Endpoint?x=1".into()),
        "4.0",
    )
    .await;
    let config = live_config(&pki, addr).await;
    let (code, _, stderr) = tokio::task::spawn_blocking(move || run(&config, &[]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("leaves the SDS base URL"), "{stderr}");

    // Same host, but out of the base path: dot segments, encoded dots, a sibling path sharing the prefix.
    for hostile in [
        "/FHIR/R4/../../admin/steal",
        "/FHIR/R4evil/x",
        "/FHIR/R4/%2e%2e/admin",
    ] {
        let pki = Pki::generate();
        let (addr, seen) = sds_server(&pki, Some(format!("PLACEHOLDER{hostile}")), "4.0").await;
        let config = live_config(&pki, addr).await;
        let (code, _, stderr) = tokio::task::spawn_blocking(move || run(&config, &[]))
            .await
            .unwrap();
        assert_eq!(code, 1, "{hostile}: {stderr}");
        assert!(
            stderr.contains("leaves the SDS base URL"),
            "{hostile}: {stderr}"
        );
        let followed = seen
            .lock()
            .unwrap()
            .iter()
            .any(|(pq, _)| pq.contains("admin") || pq.contains("evil"));
        assert!(!followed, "{hostile}: followed");
    }

    let pki = Pki::generate();
    let (addr, _) = sds_server(&pki, None, "3.0").await;
    let config = live_config(&pki, addr).await;
    let (code, _, stderr) = tokio::task::spawn_blocking(move || run(&config, &[]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not R4 (4.0)"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------------------------
// End to end.

/// A consumer and a provider known only from SDS answers: the directory is built, put beside a hand-written
/// agreement, and a request from that consumer is permitted through the proxy to that provider.
#[tokio::test]
async fn a_consumer_is_permitted_on_a_directory_built_from_sds() {
    const SDS_FROM: &str = "200000000777";
    const SDS_TO: &str = "918999190777";
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let url = endpoint_url(provider.addr);
    let dir = tempfile::tempdir().unwrap();
    let answers = bundle(vec![
        device(
            "d-consumer",
            Some(SDS_FROM),
            "RXX07-0001",
            "RXX07",
            &[METADATA],
        ),
        endpoint(
            "e-consumer",
            "RXX07-0001",
            "https://consumer.dev.localhost/mhs",
            CONSUMER_NAME,
            "RXX07",
            METADATA,
        ),
        device(
            "d-provider",
            Some(SDS_TO),
            "B82777-0001",
            "B82777",
            &[METADATA],
        ),
        endpoint(
            "e-provider",
            "B82777-0001",
            &format!("{url}/"),
            "provider.dev.localhost",
            "B82777",
            METADATA,
        ),
    ]);
    let file = write_json(dir.path(), "answers.json", &answers);
    let config = offline_config(&pki).await;
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[sds]\nsystems = [\"RXX07\"]\nendpoints = [\"B82777\"]\ninteractions = [\"{METADATA}\"]\n"
    ));
    std::fs::write(&config, text).unwrap();
    let out = pki
        .dir
        .path()
        .join("policies/sds.toml")
        .display()
        .to_string();
    let (code, _, stderr) = run(&config, &["--bundle", &file, "--out", &out]);
    assert_eq!(code, 0, "{stderr}");

    let w = World::start_in(
        pki,
        Setup {
            extra_resolve: format!("\"provider.dev.localhost:{}\" = \"{}\"\n", provider.addr.port(), provider.addr),
            extra_policy: format!(
                "\n[[agreement]]\nid = \"DSA-SDS\"\nfrom = \"{SDS_FROM}\"\nto = \"{SDS_TO}\"\ninteractions = [\"*\"]\n"
            ),
            ..Setup::default()
        },
    )
    .await;
    let mut req = ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut()
        .insert("ssp-from", SDS_FROM.parse().unwrap());
    req.headers_mut().insert("ssp-to", SDS_TO.parse().unwrap());
    let answer = within("sds consumer", w.consumer("consumer").fetch(req))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json());
    assert_eq!(provider.seen().len(), 1);
    let records = w.records(1).await;
    assert_eq!(records[0]["from"], SDS_FROM);
    assert_eq!(records[0]["decision"], "permit");
}
