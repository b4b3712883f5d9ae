//! Who accessed this patient: a log of 3,000 transactions over 50 NHS numbers (valid and invalid check digits; in
//! the query raw and percent-encoded, in the path, in JSON and XML structured record bodies, one past the 16 KiB
//! bound; some refused) made through the running proxy with `[audit.patients]` redacting and reading bodies. The
//! trail of every number is exactly the transactions sent for it; no clear number is left anywhere under the audit
//! folder and the chain verifies; a deleted index is rebuilt to the same answers; a wrong, missing or loose key is
//! refused; every lookup is in the chain (written by the proxy while it runs, by the command once it has stopped).
//! Then the evidence pack: verified, byte-identical when made twice, and any flipped byte named.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use http::Method;
use ssp::audit::patients::{PatientKey, index, trail};
use support::*;

const TRANSACTIONS: u32 = 3_000;
const CONNECTIONS: u32 = 4;

/// Number `i` of the 50: ten digits from a seed, with the right check digit for 40 of them and a wrong one for
/// the last 10.
fn nhs_number(i: u32) -> String {
    let mut n = 900_000_000 + i * 7_919;
    loop {
        let digits: Vec<u32> = n
            .to_string()
            .chars()
            .map(|c| c.to_digit(10).unwrap())
            .collect();
        let sum: u32 = digits.iter().zip((2..=10).rev()).map(|(d, w)| d * w).sum();
        let check = match 11 - sum % 11 {
            11 => 0,
            10 => {
                n += 1;
                continue;
            }
            c => c,
        };
        let check = if i >= 40 { (check + 1) % 10 } else { check };
        return format!("{n}{check}");
    }
}

/// How transaction `t` names its patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    QueryRaw,
    QueryEncoded,
    Path,
    JsonBody,
    XmlBody,
    /// Refused (an unknown `Ssp-To`): the number is in the query of what was refused.
    Refused,
    /// No number at all.
    Noise,
}

const SHAPES: [Shape; 7] = [
    Shape::QueryRaw,
    Shape::QueryEncoded,
    Shape::Path,
    Shape::JsonBody,
    Shape::XmlBody,
    Shape::Refused,
    Shape::Noise,
];

fn json_body(number: &str) -> String {
    format!(
        r#"{{"resourceType":"Parameters","parameter":[{{"name":"patientNHSNumber","valueIdentifier":{{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"{number}"}}}},{{"name":"includeAllergies","part":[{{"name":"includeResolvedAllergies","valueBoolean":true}}]}}]}}"#
    )
}

fn xml_body(number: &str) -> String {
    format!(
        r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="patientNHSNumber"/><valueIdentifier><system value="https://fhir.nhs.uk/Id/nhs-number"/><value value="{number}"/></valueIdentifier></parameter></Parameters>"#
    )
}

/// The request of transaction `t` for `number`.
fn request(url: &str, t: u32, number: &str, shape: Shape) -> http::Request<TestBody> {
    let system = "https://fhir.nhs.uk/Id/nhs-number";
    let (method, tail, interaction, body) = match shape {
        Shape::QueryRaw | Shape::Refused => (
            Method::GET,
            format!("/Patient?identifier={system}|{number}"),
            METADATA,
            None,
        ),
        Shape::QueryEncoded => (
            Method::GET,
            format!(
                "/DocumentReference?subject%3APatient.identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{number}"
            ),
            METADATA,
            None,
        ),
        Shape::Path => (Method::GET, format!("/Patient/{number}"), METADATA, None),
        Shape::JsonBody => (
            Method::POST,
            "/Patient/$gpc.getstructuredrecord".into(),
            STRUCTURED,
            Some(json_body(number)),
        ),
        Shape::XmlBody => (
            Method::POST,
            "/Patient/$gpc.getstructuredrecord".into(),
            STRUCTURED,
            Some(xml_body(number)),
        ),
        Shape::Noise => (Method::GET, "/metadata".into(), METADATA, None),
    };
    let builder = ssp_request(method, &format!("/{url}{tail}"), interaction);
    let mut request = match body {
        Some(body) => builder.body(full(body)).unwrap(),
        None => builder.body(empty()).unwrap(),
    };
    let headers = request.headers_mut();
    headers.insert("ssp-traceid", trace_id(t).parse().unwrap());
    if shape == Shape::Refused {
        headers.insert("ssp-to", "999999999999".parse().unwrap());
    }
    request
}

fn write_private(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).unwrap();
}

/// The trail's trace ids for `number`, read the way `ssp audit subject` reads them.
fn trail_of(dir: &Path, key: &PatientKey, number: &str) -> BTreeSet<String> {
    let index = index::catch_up(dir).unwrap();
    let hmac = key.hmac(number);
    let entries = index.lookup(&hmac).unwrap();
    let trail = trail::rows(dir, &hmac, &entries, None, None).unwrap();
    assert_eq!(trail.unbacked, 0);
    trail
        .rows
        .into_iter()
        .map(|r| r.trace_id.unwrap())
        .collect()
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else if entry.file_type().unwrap().is_file() {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_of_each_patient_is_exactly_its_accesses_and_nothing_clear_is_kept() {
    let pki = Pki::generate();
    let key_bytes = [0x5au8; 32];
    write_private(&pki.dir.path().join("patient.key"), &key_bytes);
    let evidence_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    write_private(
        &pki.dir.path().join("evidence.key"),
        evidence_key.serialize_pem().as_bytes(),
    );
    let world = World::start_in(
        pki,
        Setup {
            extra_audit:
                "[audit.patients]\nkey = \"patient.key\"\nredact = true\nread_bodies = true\n\n\
                          [evidence]\nkey = \"evidence.key\"\n"
                    .into(),
            ..Setup::default()
        },
    )
    .await;
    let key = PatientKey::from_bytes(&key_bytes).unwrap();
    let numbers: Vec<String> = (0..50).map(nhs_number).collect();
    // The expected trail: trace ids by number.
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let consumer = world.consumer("consumer");
        let url = world.url.clone();
        let numbers = numbers.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = consumer.connect().await.unwrap();
            let mut sent = Vec::new();
            for t in (c..TRANSACTIONS).step_by(CONNECTIONS as usize) {
                let number = &numbers[(t % 50) as usize];
                let shape = SHAPES[((t / 50) % 7) as usize];
                let response = sender.send(request(&url, t, number, shape)).await.unwrap();
                let answer = Answer::read(response).await.unwrap();
                assert_eq!(
                    answer.status.is_success(),
                    shape != Shape::Refused,
                    "{t} {shape:?}: {:?}",
                    answer.body
                );
                if shape != Shape::Noise {
                    sent.push((number.clone(), trace_id(t)));
                }
            }
            sent
        }));
    }
    for task in tasks {
        for (number, trace) in within("the transactions", task).await.unwrap() {
            expected.entry(number).or_default().insert(trace);
        }
    }
    // One structured record request whose number lies past the 16 KiB bound: not indexed.
    let past = nhs_number(49);
    let padded = format!(
        r#"{{"resourceType":"Parameters","meta":{{"tag":[{{"display":"{}"}}]}},"parameter":[{{"name":"patientNHSNumber","valueIdentifier":{{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"{past}"}}}}]}}"#,
        "x".repeat(20_000)
    );
    let mut req = ssp_request(
        Method::POST,
        &format!("/{}/Patient/$gpc.getstructuredrecord", world.url),
        STRUCTURED,
    )
    .body(full(padded))
    .unwrap();
    req.headers_mut()
        .insert("ssp-traceid", trace_id(99_999).parse().unwrap());
    let answer = world.consumer("consumer").fetch(req).await.unwrap();
    assert_eq!(answer.status, http::StatusCode::OK);
    let dir = world.audit_dir();
    // Every transaction's records, then the last one's response record, are in the log.
    world.records(2 * TRANSACTIONS as usize + 2).await;
    response_record(&dir, &trace_id(99_999)).await;

    for (i, number) in numbers.iter().enumerate() {
        assert_eq!(
            trail_of(&dir, &key, number),
            expected[number],
            "number {i} ({})",
            if i >= 40 {
                "invalid check digit"
            } else {
                "valid"
            }
        );
    }
    let entries = index::catch_up(&dir)
        .unwrap()
        .lookup(&key.hmac(&past))
        .unwrap();
    assert!(
        entries
            .iter()
            .all(|e| e.trace_id.as_deref() != Some(trace_id(99_999).as_str()))
    );
    let checks: BTreeSet<String> = entries.iter().map(|e| e.check.clone()).collect();
    assert_eq!(checks, BTreeSet::from(["invalid_check_digit".to_owned()]));
    let sources: BTreeSet<String> = index::catch_up(&dir)
        .unwrap()
        .lookup(&key.hmac(&numbers[0]))
        .unwrap()
        .into_iter()
        .map(|e| e.source)
        .collect();
    assert_eq!(
        sources,
        BTreeSet::from(["body", "path", "query"].map(String::from))
    );

    // A refused target cut at the 8 KiB bound inside a number: the piece of the number is not kept either.
    let cut_number = &numbers[5];
    let head = format!("{}/", world.url);
    let pad = "p".repeat(8192 - 5 - head.len() - "/Patient/".len());
    let mut req = ssp_request(
        Method::GET,
        &format!("/{head}{pad}/Patient/{cut_number}"),
        METADATA,
    )
    .body(empty())
    .unwrap();
    req.headers_mut()
        .insert("ssp-traceid", trace_id(99_998).parse().unwrap());
    req.headers_mut()
        .insert("ssp-to", "999999999999".parse().unwrap());
    let answer = world.consumer("consumer").fetch(req).await.unwrap();
    assert!(answer.status.is_client_error(), "{:?}", answer.status);
    let cut = response_record(&dir, &trace_id(99_998)).await;
    let request = audit_records(&dir, 1)
        .await
        .into_iter()
        .find(|r| r["kind"] == "request" && r["trace_id"] == cut["trace_id"])
        .unwrap();
    let target = request["target"].as_str().unwrap();
    assert!(
        target.len() < 8192 && target.ends_with("/Patient/"),
        "{}",
        &target[target.len() - 40..]
    );

    // An entry added to the index that the log does not back is left out of the trail, and counted.
    let genuine = index::catch_up(&dir)
        .unwrap()
        .lookup(&key.hmac(&numbers[0]))
        .unwrap();
    let mut forged = genuine[0].clone();
    forged.hmac = key.hmac(&numbers[1]);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(index::INDEX_FILE))
        .unwrap();
    use std::io::Write;
    writeln!(file, "{}", serde_json::to_string(&forged).unwrap()).unwrap();
    drop(file);
    let entries = index::catch_up(&dir).unwrap().lookup(&forged.hmac).unwrap();
    let trail = trail::rows(&dir, &forged.hmac, &entries, None, None).unwrap();
    assert_eq!(trail.unbacked, 1);
    let rows: BTreeSet<String> = trail
        .rows
        .into_iter()
        .map(|r| r.trace_id.unwrap())
        .collect();
    assert_eq!(rows, expected[&numbers[1]]);
    std::fs::remove_file(dir.join(index::INDEX_FILE)).unwrap();
    std::fs::remove_file(dir.join(index::STATE_FILE)).unwrap();

    // Redacted: no number in clear in any byte of any file under the audit folder; the chain verifies.
    index::catch_up(&dir).unwrap();
    let mut files = Vec::new();
    files_under(&dir, &mut files);
    // A segment, the certificate inventory, the index and its state.
    assert!(files.len() >= 4, "{files:?}");
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        for number in numbers.iter().chain([&past]) {
            assert!(
                memchr::memmem::find(&bytes, number.as_bytes()).is_none(),
                "{number} in clear in {}",
                path.display()
            );
        }
    }
    let config = world.pki.dir.path().join("ssp.toml").display().to_string();
    let (code, out) = ssp_cmd(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}");

    // A second proxy on the same folder stops before it reads or changes anything in it (one writer a chain).
    let segments = ssp::audit::segment_paths(&dir).unwrap();
    let (code, out) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || ssp_cmd(&["serve", "--config", &config]))
            .await
            .unwrap()
    };
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("being written by another process"), "{out}");
    assert_eq!(ssp::audit::segment_paths(&dir).unwrap(), segments);

    // Rebuilt from the chain alone, the index gives the same answers.
    let before: Vec<_> = numbers.iter().map(|n| trail_of(&dir, &key, n)).collect();
    std::fs::remove_file(dir.join(index::INDEX_FILE)).unwrap();
    std::fs::remove_file(dir.join(index::STATE_FILE)).unwrap();
    let (code, out) = ssp_cmd(&["audit", "reindex", "--config", &config]);
    assert_eq!(code, 0, "{out}");
    let after: Vec<_> = numbers.iter().map(|n| trail_of(&dir, &key, n)).collect();
    assert_eq!(before, after);

    // The command: the number from a file; the trail as JSON; its lookup recorded by the running proxy.
    let number_file = world.pki.dir.path().join("number.txt");
    std::fs::write(&number_file, format!("{}\n", numbers[3])).unwrap();
    let subject = |config: &str| {
        let config = config.to_owned();
        let number_file = number_file.display().to_string();
        tokio::task::spawn_blocking(move || {
            ssp_cmd(&[
                "audit",
                "subject",
                "--config",
                &config,
                "--nhs-number-file",
                &number_file,
                "--format",
                "json",
            ])
        })
    };
    let (code, out) = subject(&config).await.unwrap();
    assert_eq!(code, 0, "{out}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let traces: BTreeSet<String> = rows
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(traces, expected[&numbers[3]]);
    let refused = rows.iter().filter(|r| r["decision"] == "deny").count();
    assert!(refused > 0 && refused < rows.len(), "{out}");
    assert!(
        rows.iter()
            .all(|r| r["ods_code"] == "RXX01" || r["decision"] == "deny"),
        "{out}"
    );
    assert!(
        rows.iter()
            .any(|r| r["interaction_words"] == "Retrieve the patient's structured record")
    );
    let lookups: Vec<serde_json::Value> = audit_records(&dir, 1)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "subject_lookup")
        .collect();
    assert_eq!(lookups.len(), 1, "{lookups:?}");
    assert_eq!(lookups[0]["hmac"], key.hmac(&numbers[3]));
    assert_eq!(lookups[0]["written_by"], "proxy");
    assert_eq!(lookups[0]["uid"], u64::from(rustix_uid()));

    // A key the records were not written with, a missing one, and one others can read: refused.
    let other_key = world.pki.dir.path().join("other.key");
    write_private(&other_key, &[0x11; 32]);
    let other_config = world.pki.dir.path().join("other.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &other_config,
        text.replace("\"patient.key\"", "\"other.key\""),
    )
    .unwrap();
    let (code, out) = subject(&other_config.display().to_string()).await.unwrap();
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("is not one the log's records were written with"),
        "{out}"
    );
    std::fs::write(
        &other_config,
        text.replace("\"patient.key\"", "\"absent.key\""),
    )
    .unwrap();
    let (code, out) = subject(&other_config.display().to_string()).await.unwrap();
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("absent.key"), "{out}");
    std::fs::set_permissions(&other_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(
        &other_config,
        text.replace("\"patient.key\"", "\"other.key\""),
    )
    .unwrap();
    let other = other_config.display().to_string();
    let (code, out) =
        tokio::task::spawn_blocking(move || ssp_cmd(&["check-config", "--config", &other]))
            .await
            .unwrap();
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("audit.patients.key") && out.contains("0644"),
        "{out}"
    );
    // None of the refused runs was recorded as a lookup.
    let lookups = audit_records(&dir, 1)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "subject_lookup")
        .count();
    assert_eq!(lookups, 1);

    // The evidence pack, made twice: the same bytes; verified; every flipped byte named.
    let (from, to) = ("2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z");
    let pack = |out: &Path| {
        let (config, out) = (config.clone(), out.display().to_string());
        tokio::task::spawn_blocking(move || {
            ssp_cmd(&[
                "evidence", "--config", &config, "--from", from, "--to", to, "--out", &out,
            ])
        })
    };
    let (one, two) = (
        world.pki.dir.path().join("pack1"),
        world.pki.dir.path().join("pack2"),
    );
    let (code, out) = pack(&one).await.unwrap();
    assert_eq!(code, 0, "{out}");
    let (code, out) = pack(&two).await.unwrap();
    assert_eq!(code, 0, "{out}");
    let mut packed = Vec::new();
    files_under(&one, &mut packed);
    assert!(packed.len() >= 10, "{packed:?}");
    for path in &packed {
        let rel = path.strip_prefix(&one).unwrap();
        assert_eq!(
            std::fs::read(path).unwrap(),
            std::fs::read(two.join(rel)).unwrap(),
            "{rel:?}"
        );
    }
    let transactions = std::fs::read_to_string(one.join("transactions.csv")).unwrap();
    let total: u64 = transactions
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, u64::from(TRANSACTIONS) + 2, "{transactions}");
    let lookups = std::fs::read_to_string(one.join("subject-lookups.csv")).unwrap();
    assert!(lookups.contains(&key.hmac(&numbers[3])), "{lookups}");
    let verify = |dir: &Path| {
        let dir = dir.display().to_string();
        ssp_cmd(&["evidence", "verify", &dir])
    };
    let (code, out) = verify(&one);
    assert_eq!(code, 0, "{out}");
    for path in &packed {
        let name = path.strip_prefix(&one).unwrap().display().to_string();
        let original = std::fs::read(path).unwrap();
        let mut flipped = original.clone();
        flipped[original.len() / 2] ^= 0x01;
        std::fs::write(path, &flipped).unwrap();
        let (code, out) = verify(&one);
        assert_eq!(code, 1, "{name}: {out}");
        assert!(out.contains(name.as_str()), "{name}: {out}");
        std::fs::write(path, &original).unwrap();
    }
    assert_eq!(verify(&one).0, 0);
    std::fs::write(one.join("added.csv"), "x\n").unwrap();
    let (code, out) = verify(&one);
    assert!(
        code == 1 && out.contains("added.csv: not in MANIFEST"),
        "{out}"
    );

    // The socket gone while the proxy runs: the command finds the log held, writes nothing, shows nothing.
    let socket = dir.join(ssp::audit::patients::lookup::SOCKET_FILE);
    std::fs::remove_file(&socket).unwrap();
    let (code, out) = subject(&config).await.unwrap();
    assert_eq!(code, 70, "{out}");
    assert!(
        out.contains("held by a running proxy") && out.lines().all(|l| !l.starts_with('{')),
        "{out}"
    );
    let (code, out) = ssp_cmd(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}");

    // Stopped, the proxy cannot write a lookup's record: the command writes it to the chain itself (once the
    // proxy's last segment is sealed, its lock is let go).
    drop(world.proxy);
    within("the proxy to stop", async {
        loop {
            let newest = ssp::audit::segment_paths(&dir).unwrap().pop().unwrap();
            let text = std::fs::read_to_string(newest).unwrap();
            if text
                .lines()
                .last()
                .is_some_and(|l| l.contains("\"sealed\":\"shutdown\""))
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let (code, out) = subject(&config).await.unwrap();
    assert_eq!(code, 0, "{out}");
    let lookups: Vec<serde_json::Value> = audit_records(&dir, 1)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "subject_lookup")
        .collect();
    assert_eq!(lookups.len(), 2);
    assert_eq!(lookups[1]["written_by"], "command");
    let (code, out) = ssp_cmd(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}");
}

fn rustix_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}
