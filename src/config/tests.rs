use super::*;

const MINIMAL: &str = r#"
[server]
cert = "c.crt"
key = "c.key"
client_ca = ["ca.crt"]
[upstream]
cert = "u.crt"
key = "u.key"
ca = ["ca.crt"]
"#;

#[test]
fn defaults_and_relative_paths() {
    let c = Config::parse(MINIMAL, Path::new("/etc/ssp/ssp.toml")).unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:8443".parse().unwrap());
    assert_eq!(c.server.cert, PathBuf::from("/etc/ssp/c.crt"));
    assert_eq!(
        c.server.tls_versions,
        vec![TlsVersion::Tls12, TlsVersion::Tls13]
    );
    assert_eq!(c.server.methods.len(), 5);
    assert_eq!(c.upstream.response_timeout, Duration::from_secs(60));
    assert_eq!(c.policy.dir, PathBuf::from("/etc/ssp/policies"));
    assert_eq!(c.policy.store, PathBuf::from("/etc/ssp/data/policy"));
    assert_eq!(c.policy.keep_generations, 20);
    assert_eq!(c.jwt.mode, crate::jwt::Mode::Enforce);
    assert_eq!(c.jwt.profile, crate::jwt::Profile::GpConnect1);
    assert_eq!(c.jwt.max_future_skew, Duration::from_secs(300));
    assert_eq!(c.audit.dir, PathBuf::from("/etc/ssp/data/audit"));
    assert_eq!(c.audit.durability, crate::audit::Durability::Batched);
    assert_eq!(c.audit.segment_size, 64 << 20);
    assert!(!c.audit.instance.is_empty());
    assert_eq!(
        c.log,
        LogConfig {
            json: false,
            level: "info".into()
        }
    );
    assert_eq!(c.limits, LimitsConfig::default());
    assert_eq!(c.limits.max_header_bytes, 64 * 1024);
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let text = MINIMAL.replace("key = \"c.key\"", "key = \"c.key\"\nlisten_port = 1");
    let err = Config::parse(&text, Path::new("ssp.toml")).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    let line = &err.problems[0];
    assert!(line.starts_with("ssp.toml: line 5"), "{line}");
    assert!(line.contains("listen_port"), "{line}");
    assert!(!line.contains('\n'));
}

#[test]
fn every_bad_value_is_reported() {
    let text = MINIMAL.replace(
            "[upstream]",
            "listen = \"nowhere\"\ntls_versions = [\"1.1\"]\nmethods = [\"TRACE\", \"get\"]\nhandshake_timeout = \"10 seconds\"\n[upstream]\nresolve = { \"nohost\" = \"1.2.3.4:5\", \"h:443\" = \"h:443\" }",
        ) + "[jwt]\nmode = \"strict\"\nprofile = \"gpconnect-2\"\n"
            + "[limits]\nper_consumer_rps = 5\nper_consumer_burst = 0\nper_provider_connections = 0\nmax_header_bytes = \"64\"\nmax_header_count = 3\n";
    let err = Config::parse(&text, Path::new("ssp.toml")).unwrap_err();
    let all = err.to_string();
    for key in [
        "server.listen",
        "server.tls_versions",
        "server.methods: TRACE",
        "server.methods: \"get\"",
        "server.handshake_timeout",
        "upstream.resolve.\"nohost\"",
        "upstream.resolve.\"h:443\"",
        "jwt.mode",
        "jwt.profile",
        "limits.per_consumer_burst",
        "limits.per_provider_connections",
        "limits.max_header_bytes",
        "limits.max_header_count",
    ] {
        assert!(all.contains(key), "missing {key} in {all}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("10"), None);
    assert_eq!(parse_duration("s"), None);
    assert_eq!(parse_duration("1.5s"), None);
    assert_eq!(parse_size("64MiB"), Some(64 << 20));
    assert_eq!(parse_size("4KiB"), Some(4096));
    assert_eq!(parse_size("64mb"), None);
}

/// The repository's dev config and the sample production config stay valid as keys change.
#[test]
fn shipped_configs_parse() {
    for (name, text) in [
        ("ssp.toml", include_str!("../../ssp.toml")),
        ("systemd/ssp.toml", include_str!("../../systemd/ssp.toml")),
    ] {
        if let Err(e) = Config::parse(text, Path::new(name)) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
}

/// `server.workers`: 0 (the default) is one per CPU available, a number is taken as it is, past 1024 is refused.
#[test]
fn workers_default_to_the_cpus_available() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let c = Config::parse(MINIMAL, Path::new("ssp.toml")).unwrap();
    assert_eq!(c.server.workers, cpus);
    let with = |n: &str| MINIMAL.replace("[upstream]", &format!("workers = {n}\n[upstream]"));
    let c = Config::parse(&with("0"), Path::new("ssp.toml")).unwrap();
    assert_eq!(c.server.workers, cpus);
    let c = Config::parse(&with("3"), Path::new("ssp.toml")).unwrap();
    assert_eq!(c.server.workers, 3);
    let err = Config::parse(&with("5000"), Path::new("ssp.toml")).unwrap_err();
    assert!(err.to_string().contains("server.workers"), "{err}");
}

#[test]
fn wrong_types_and_unknown_keys_are_all_reported_and_the_rest_is_read() {
    let text = MINIMAL.replace(
        "client_ca = [\"ca.crt\"]",
        "client_ca = [\"ca.crt\"]\nmax_connections = \"many\"\nworkers = -1\ncolour = \"red\"\nlisten = \"nowhere\"",
    ) + "[limits]\nmax_header_count = true\n";
    let checked = Config::check(&text, Path::new("ssp.toml"));
    let all = checked.problems.join("\n");
    for want in [
        "ssp.toml: line 6, column 19: server.max_connections: invalid type",
        "ssp.toml: line 7, column 11: server.workers: invalid value",
        "ssp.toml: line 8, column 1: server.colour: unknown field",
        "ssp.toml: line 9: server.listen: \"nowhere\" is not an ip:port",
        "ssp.toml: line 15, column 20: limits.max_header_count: invalid type",
    ] {
        assert!(all.contains(want), "{want:?} not in:\n{all}");
    }
    assert_eq!(checked.problems.len(), 5, "{all}");
    // The rest was read, the refused values left at their defaults.
    let config = checked.config.unwrap();
    assert_eq!(config.server.cert, PathBuf::from("c.crt"));
    assert_eq!(
        config.limits.max_header_count,
        LimitsConfig::default().max_header_count
    );
    assert!(Config::parse(&text, Path::new("ssp.toml")).is_err());

    // A required key refused: said once, not again as missing; the rest is read with a placeholder for it, and
    // what it names is not checked.
    let text = MINIMAL.replace("cert = \"c.crt\"", "cert = 5");
    let file = Path::new("ssp.toml");
    let checked = Config::check(&text, file);
    assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
    assert!(
        checked.problems[0].contains("server.cert: invalid type"),
        "{:?}",
        checked.problems
    );
    assert_eq!(checked.unusable, ["server.cert"]);
    assert_eq!(checked.lines["server.key"], 4);
    assert_eq!(
        checked.place(file, "server.cert: : cannot read".into()),
        None
    );
    assert_eq!(
        checked
            .place(file, "server.key: c.key: cannot read".into())
            .as_deref(),
        Some("ssp.toml: line 4: server.key: c.key: cannot read")
    );
    assert_eq!(
        checked.config.unwrap().upstream.cert,
        PathBuf::from("u.crt")
    );
}

#[test]
fn every_missing_required_key_is_reported_at_once() {
    let text = "[server]\nlisten = \"127.0.0.1:1\"\n";
    let checked = Config::check(text, Path::new("d.toml"));
    assert_eq!(
        checked.problems,
        [
            "d.toml: line 1: server.cert: missing (required)",
            "d.toml: line 1: server.key: missing (required)",
            "d.toml: line 1: server.client_ca: missing (required)",
            "d.toml: upstream.cert: missing (required)",
            "d.toml: upstream.key: missing (required)",
            "d.toml: upstream.ca: missing (required)",
        ]
    );
    assert_eq!(checked.unusable.len(), 6);
    // The rest of the config was read.
    assert_eq!(
        checked.config.unwrap().server.listen,
        "127.0.0.1:1".parse().unwrap()
    );
    // A required table given as another type is refused once, not reported as missing keys.
    let text = format!(
        "server = 5\n{}",
        &MINIMAL[MINIMAL.find("[upstream]").unwrap()..]
    );
    let checked = Config::check(&text, Path::new("e.toml"));
    assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
    assert!(
        checked.problems[0].contains("server: invalid type"),
        "{:?}",
        checked.problems
    );
}

#[test]
fn audit_ship_defaults_to_tls_with_the_upstream_certificate_and_refuses_what_cannot_work() {
    let text = format!(
        "{MINIMAL}[audit]\ninstance = \"ssp-a\"\n[audit.ship]\ncollector = \"syslog.example.nhs.uk:6514\"\n\
         ca = [\"collector-ca.pem\"]\nhead_key = \"head.key\"\n"
    );
    let c = Config::parse(&text, Path::new("/etc/ssp/ssp.toml")).unwrap();
    let ship = c.ship.unwrap();
    assert_eq!(
        ship.transport,
        ShipTransport::Tls {
            ca: vec![PathBuf::from("/etc/ssp/collector-ca.pem")],
            cert: PathBuf::from("/etc/ssp/u.crt"),
            key: PathBuf::from("/etc/ssp/u.key"),
            server_name: "syslog.example.nhs.uk".into(),
        }
    );
    assert_eq!(ship.head_key, PathBuf::from("/etc/ssp/head.key"));
    assert_eq!(ship.head_interval, Duration::from_secs(60));
    assert_eq!(ship.confirm_interval, Duration::from_secs(1));
    assert_eq!(ship.hostname, "ssp-a");
    assert!(
        Config::parse(MINIMAL, Path::new("ssp.toml"))
            .unwrap()
            .ship
            .is_none()
    );

    for (ship, expect) in [
        // Plain TCP leaves the host only to a relay on loopback.
        (
            "collector = \"10.0.0.5:514\"\ntransport = \"tcp\"",
            "must be a loopback ip:port",
        ),
        (
            "collector = \"syslog:6514\"",
            "audit.ship.ca: at least one CA file",
        ),
        (
            "collector = \"syslog\"\nca = [\"c.pem\"]",
            "is not \"host:port\"",
        ),
        (
            "collector = \"[::1]:514\"\ntransport = \"udp\"",
            "is not \"tls\" or \"tcp\"",
        ),
        (
            "collector = \"127.0.0.1:514\"\ntransport = \"tcp\"\nhostname = \"two words\"",
            "RFC 5424 HOSTNAME",
        ),
        (
            "collector = \"127.0.0.1:514\"\ntransport = \"tcp\"\nhead_interval = \"soon\"",
            "audit.ship.head_interval",
        ),
    ] {
        let text = format!("{MINIMAL}[audit.ship]\n{ship}\nhead_key = \"h.key\"\n");
        let err = Config::parse(&text, Path::new("ssp.toml")).unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.contains(expect)),
            "{ship}: {err}"
        );
    }
    let text =
        format!("{MINIMAL}[audit.ship]\ncollector = \"127.0.0.1:514\"\ntransport = \"tcp\"\n");
    let err = Config::parse(&text, Path::new("ssp.toml")).unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.contains("audit.ship.head_key: missing (required)")),
        "{err}"
    );
    let loopback = format!(
        "{MINIMAL}[audit.ship]\ncollector = \"[::1]:5514\"\ntransport = \"tcp\"\nhead_key = \"h.key\"\n"
    );
    let c = Config::parse(&loopback, Path::new("ssp.toml")).unwrap();
    assert_eq!(c.ship.unwrap().transport, ShipTransport::Tcp);
}

#[test]
fn patient_facing_defaults_and_what_it_refuses() {
    let good = format!(
        "{MINIMAL}
[patient_facing]
listen = \"127.0.0.1:8444\"
asid = \"200000000999\"
issuer = \"https://auth.login.nhs.uk\"
audience = \"ssp\"
jwks = \"keys/jwks.json\"
scope = \"gp-connect:patient\"
practices = \"practices.csv\"
assertion_key = \"keys/assertion.pem\"
[[patient_facing.route]]
path = \"/fhir/Patient\"
interaction = \"urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1\"
"
    );
    let c = Config::parse(&good, Path::new("/etc/ssp/ssp.toml")).unwrap();
    let pf = c.patient_facing.unwrap();
    assert_eq!(pf.cert, c.server.cert, "the server certificate by default");
    assert_eq!(
        pf.jwks,
        JwksSource::File(PathBuf::from("/etc/ssp/keys/jwks.json"))
    );
    assert_eq!(pf.algorithms.len(), 3);
    assert_eq!(pf.min_proofing, Proofing::P9);
    assert_eq!(pf.leeway, Duration::from_secs(30));
    assert_eq!(pf.jwks_refresh, Duration::from_secs(300));
    assert_eq!(pf.jwks_stale, Duration::from_secs(3600));
    assert_eq!(pf.routes[0].methods, vec![Method::GET]);
    assert_eq!(pf.requests_per_minute_per_app, 0);

    for (change, key) in [
        (
            (
                "jwks = \"keys/jwks.json\"",
                "jwks = \"http://keys.example/jwks\"",
            ),
            "patient_facing.jwks",
        ),
        (
            ("scope = \"gp-connect:patient\"", "scope = \"a b\""),
            "patient_facing.scope",
        ),
        (
            (
                "issuer = \"https://auth.login.nhs.uk\"",
                "algorithms = [\"HS256\"]",
            ),
            "patient_facing.issuer",
        ),
        (
            (
                "audience = \"ssp\"",
                "audience = \"ssp\"\nalgorithms = [\"none\"]",
            ),
            "patient_facing.algorithms",
        ),
        (
            (
                "audience = \"ssp\"",
                "audience = \"ssp\"\nmin_proofing = \"P7\"",
            ),
            "patient_facing.min_proofing",
        ),
        (
            ("audience = \"ssp\"", "audience = \"ssp\"\nleeway = \"10m\""),
            "patient_facing.leeway",
        ),
        (
            (
                "audience = \"ssp\"",
                "audience = \"ssp\"\njwks_refresh = \"2h\"",
            ),
            "patient_facing.jwks_stale",
        ),
        (
            ("practices = \"practices.csv\"", ""),
            "patient_facing.practices",
        ),
        (
            ("path = \"/fhir/Patient\"", "path = \"/fhir/../Patient\""),
            "patient_facing.route",
        ),
        (
            ("listen = \"127.0.0.1:8444\"", "listen = \"127.0.0.1:8443\""),
            "patient_facing.listen",
        ),
    ] {
        let text = good.replace(change.0, change.1);
        let err = Config::parse(&text, Path::new("ssp.toml")).unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.contains(key)),
            "{change:?}: {:?}",
            err.problems
        );
    }
}

#[test]
fn defaults_taken_from_other_keys_are_resolved_once() {
    let text = format!(
        "{MINIMAL}
[audit.ship]
collector = \"logs.example:6514\"
ca = [\"ca.crt\"]
head_key = \"head.key\"
[patient_facing]
listen = \"127.0.0.1:8444\"
asid = \"200000000999\"
issuer = \"https://auth.login.nhs.uk\"
audience = \"ssp\"
jwks = \"jwks.json\"
scope = \"gp-connect:patient\"
practices = \"practices.csv\"
assertion_key = \"assertion.pem\"
[[patient_facing.route]]
path = \"/fhir/Patient\"
interaction = \"urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1\"
"
    );
    // A relative config path with a folder: `conf/c.crt`, not `conf/conf/c.crt`.
    let c = Config::parse(&text, Path::new("conf/ssp.toml")).unwrap();
    let pf = c.patient_facing.unwrap();
    assert_eq!(pf.cert, PathBuf::from("conf/c.crt"));
    assert_eq!(pf.key, PathBuf::from("conf/c.key"));
    match c.ship.unwrap().transport {
        ShipTransport::Tls { cert, key, .. } => {
            assert_eq!(cert, PathBuf::from("conf/u.crt"));
            assert_eq!(key, PathBuf::from("conf/u.key"));
        }
        ShipTransport::Tcp => panic!("tls by default"),
    }
}
