//! The policy store and reload through the running proxy: reload under load with every response matching the
//! generation recorded for it, refused reloads, restart on the last good generation, crash safety of imports,
//! SIGHUP on the real binary, and `ssp policy check` / `history` / `show`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

fn policy_path(w: &World) -> std::path::PathBuf {
    w.pki.dir.path().join("policies/test.toml")
}

/// The test policy with `FROM` no longer accredited for the metadata interaction.
fn revoked(original: &str) -> String {
    let from = format!("interactions = [\"{METADATA}\", \"{STRUCTURED}\"]");
    assert!(original.contains(&from));
    original.replacen(&from, &format!("interactions = [\"{STRUCTURED}\"]"), 1)
}

/// Policies change under load: no request is lost, and every answer is the one the generation recorded in its
/// audit record gives (200 where the sender is accredited, 403 where it is not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing_and_answers_per_generation() {
    let w = Arc::new(World::start().await);
    let original = std::fs::read_to_string(policy_path(&w)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (w, stop) = (w.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut sender = w.consumer("consumer").connect().await.unwrap();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let trace_id = ssp::ids::TraceId::new_random().as_str().to_owned();
                let mut req =
                    ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
                        .body(empty())
                        .unwrap();
                req.headers_mut()
                    .insert("ssp-traceid", trace_id.parse().unwrap());
                let response = sender
                    .send(req)
                    .await
                    .expect("a request was lost during reload");
                let status = response.status();
                drain(response.into_body()).await.unwrap();
                seen.push((trace_id, status));
            }
            seen
        }));
    }
    // Generation 1 (the original) permits; alternate.
    let mut permits = HashMap::from([(1u64, true)]);
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(80)).await;
        let allowed = i % 2 == 1;
        let text = if allowed {
            original.clone()
        } else {
            revoked(&original)
        };
        std::fs::write(policy_path(&w), text).unwrap();
        let (generation, new) = ssp::lifecycle::reload_policy(&w.config, &w.handle)
            .await
            .unwrap();
        assert!(new);
        permits.insert(generation, allowed);
    }
    tokio::time::sleep(Duration::from_millis(80)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for c in clients {
        seen.extend(c.await.unwrap());
    }
    assert!(seen.len() > 30, "too little load: {}", seen.len());
    let records = w.records(seen.len() * 2).await;
    let generation_of: HashMap<&str, u64> = records
        .iter()
        .filter(|r| r["kind"] == "request")
        .map(|r| {
            (
                r["trace_id"].as_str().unwrap(),
                r["policy_generation"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut by_generation: HashMap<u64, usize> = HashMap::new();
    for (trace_id, status) in &seen {
        let generation = generation_of[trace_id.as_str()];
        let want = if permits[&generation] {
            StatusCode::OK
        } else {
            StatusCode::FORBIDDEN
        };
        assert_eq!(
            *status, want,
            "request {trace_id} decided by generation {generation}"
        );
        *by_generation.entry(generation).or_default() += 1;
    }
    assert!(
        by_generation.len() >= 4,
        "requests should span generations: {by_generation:?}"
    );
}

/// A broken set of files is refused whole; the running generation keeps serving.
#[tokio::test]
async fn broken_files_are_refused_and_the_old_generation_serves() {
    let w = World::start().await;
    let original = std::fs::read_to_string(policy_path(&w)).unwrap();
    std::fs::write(
        policy_path(&w),
        original.replacen("asid = \"918999198993\"", "asid = \"9189x\"", 1),
    )
    .unwrap();
    let err = ssp::lifecycle::reload_policy(&w.config, &w.handle)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("\"9189x\" is not an ASID"),
        "{err}"
    );
    assert_eq!(w.handle.policy().generation, 1);
    let answer = w.get("/fhir/metadata").await;
    assert_eq!(answer.status(), StatusCode::OK);

    // A restart with the broken files starts on the last good generation.
    let policy = ssp::app::start_policy(&w.config).unwrap();
    assert_eq!(policy.generation, 1);
    assert!(
        policy
            .endpoint(&ssp::ids::Asid::parse(TO).unwrap())
            .is_some()
    );

    // With no good generation at all, start fails with the problems.
    let mut fresh = w.config.clone();
    fresh.policy.store = w.pki.dir.path().join("data/empty-store");
    let err = ssp::app::start_policy(&fresh).unwrap_err();
    assert!(err.to_string().contains("9189x"), "{err}");
}

/// A large policy for the import crash test: `n` systems and endpoints, 5 agreements per system.
fn large_policy(n: usize, salt: usize) -> String {
    let mut text = format!("# salt {salt}\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[system]]\nasid = \"{}\"\nname = \"System {i}\"\nods = \"S{i}\"\nfqdn = \"s{i}.example\"\ninteractions = [\"{METADATA}\"]\n\n",
            300_000_000_000u64 + i as u64
        ));
        text.push_str(&format!(
            "[[endpoint]]\nasid = \"{}\"\nparty_key = \"P{i}\"\ncpa_id = \"C{i}\"\nods = \"E{i}\"\nurl = \"https://e{i}.example/fhir\"\ninteractions = [\"{METADATA}\"]\n\n",
            400_000_000_000u64 + i as u64
        ));
    }
    for i in 0..n {
        for k in 0..5 {
            text.push_str(&format!(
                "[[agreement]]\nid = \"A{i}-{k}\"\nfrom = \"{}\"\nto = \"{}\"\ninteractions = [\"*\"]\n\n",
                300_000_000_000u64 + i as u64,
                400_000_000_000u64 + ((i + k) % n) as u64
            ));
        }
    }
    text
}

/// `kill -9` at any moment of an import leaves the store on a complete generation.
#[tokio::test]
async fn kill_9_during_import_leaves_a_complete_generation() {
    let pki = Pki::generate();
    let config_arg = offline_config(&pki).await;
    let big = pki.dir.path().join("policies/big.toml");
    let store_path = pki.dir.path().join("data/policy");
    let mut completed = 0;
    for (i, delay_ms) in [5u64, 30, 80, 150, 300, 600, 1200].into_iter().enumerate() {
        std::fs::write(&big, large_policy(800, i)).unwrap();
        let mut child = Command::new(ssp_bin())
            .args(["policy", "import", "--config", &config_arg])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_some() {
            completed += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        // Whatever the moment, the pointer names a generation that is whole and compiles.
        if let Ok(store) = ssp::policy::store::Store::open(&store_path)
            && let Some(current) = store.current().unwrap()
        {
            assert_eq!(
                current.sha256,
                current.source.sha256(),
                "generation {} is not whole",
                current.number
            );
            ssp::policy::Policy::compile(&current.source, current.number).unwrap();
        }
    }
    assert!(
        completed < 7,
        "no import was interrupted: make the policy larger"
    );
    let (code, out) = ssp_cmd(&["policy", "import", "--config", &config_arg]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = ssp_cmd(&["policy", "history", "--config", &config_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with('*')), "{out}");
}

/// SIGHUP to the real binary puts new policy files in force without a restart; `history` and `show` see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let url = endpoint_url(provider.addr);
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let get = || {
        ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
            .body(empty())
            .unwrap()
    };
    assert_eq!(
        within("before", consumer.fetch(get()))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );

    let path = pki.dir.path().join("policies/test.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, revoked(&original)).unwrap();
    signal(served.child.id(), "HUP");
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let answer = within("after", consumer.fetch(get())).await.unwrap();
        if answer.status == StatusCode::FORBIDDEN {
            answer.assert_outcome(
                403,
                "forbidden",
                &format!("ASID_CHECK_FAILED_MESSAGESENDER_{FROM}"),
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = pki.dir.path().join("ssp.toml").display().to_string();
    let (code, out) = ssp_cmd(&["policy", "history", "--config", &config]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("*        2")), "{out}");
    let (code, out) = ssp_cmd(&["policy", "show", "1", "--config", &config]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "interactions = [\"{METADATA}\", \"{STRUCTURED}\"]"
        )),
        "{out}"
    );
}

/// `ssp policy check` explains a permit (exit 0) and a refusal at each of checks 5 to 9 (exit 1).
#[tokio::test]
async fn policy_check_command() {
    let pki = Pki::generate();
    let provider = closed_port().await;
    let config = write_config(
        &pki,
        provider,
        closed_port().await,
        "127.0.0.1:0".parse().unwrap(),
        &Setup::default(),
    );
    let config = config.display().to_string();
    let url = format!("{}/fhir/metadata", endpoint_url(provider));
    let cases: [(&str, &str, &str, &str, &str, i32, &str); 6] = [
        (
            FROM,
            TO,
            METADATA,
            &url,
            CONSUMER_NAME,
            0,
            "decision: PERMIT",
        ),
        (
            FROM,
            TO,
            METADATA,
            &url,
            CONSUMER2_NAME,
            1,
            "DENY  403 FQDN_CHECK_FAILED_MESSAGESENDER_200000000359",
        ),
        (
            FROM,
            TO,
            APPOINTMENT,
            &url,
            CONSUMER_NAME,
            1,
            "DENY  403 ASID_CHECK_FAILED_MESSAGESENDER_200000000359",
        ),
        (
            FROM,
            "999999999999",
            METADATA,
            &url,
            CONSUMER_NAME,
            1,
            "DENY  403 PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_999999999999",
        ),
        (
            FROM_2,
            TO,
            METADATA,
            &url,
            CONSUMER2_NAME,
            1,
            "DENY  403 FOT_CHECK_FAILED_MESSAGESENDER_200000000360_MESSAGERECEIVER_918999198993",
        ),
        (
            FROM,
            TO,
            METADATA,
            "https://127.0.0.1/gp/fhir/metadata",
            CONSUMER_NAME,
            1,
            "DENY  400 ENDPOINT_",
        ),
    ];
    for (from, to, interaction, url, fqdn, code, expect) in cases {
        let (got, out) = ssp_cmd(&[
            "policy",
            "check",
            "--config",
            &config,
            "--from",
            from,
            "--to",
            to,
            "--interaction",
            interaction,
            "--url",
            url,
            "--fqdn",
            fqdn,
        ]);
        assert_eq!(got, code, "{out}");
        assert!(out.contains(expect), "expected {expect:?} in\n{out}");
        for n in 5..=9 {
            assert!(out.contains(&format!("check {n}")), "{out}");
        }
    }
    let (code, out) = ssp_cmd(&[
        "policy",
        "check",
        "--config",
        &config,
        "--from",
        "x",
        "--to",
        TO,
        "--interaction",
        METADATA,
        "--url",
        &url,
    ]);
    assert_eq!(code, 64, "{out}");
}
