use super::*;

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    config_file::parse(path, text)
}

fn flags_http() -> Overrides {
    Overrides {
        allow_http: true,
        public_addrs: vec!["192.0.2.1".parse().unwrap()],
        ..Overrides::default()
    }
}

#[test]
fn durations_parse_with_units_and_combinations() {
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
    assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
    assert!(parse_duration("12").is_err());
    assert!(parse_duration("h").is_err());
    assert!(parse_duration("3w").is_err());
    assert!(parse_duration("").is_err());
}

#[test]
fn defaults_apply_without_file() {
    let c = Config::resolve(None, flags_http()).unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.network.to_string(), DEFAULT_NETWORK);
    assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert!(c.turn.embedded);
    assert_eq!(c.turn.port, DEFAULT_STUN_PORT);
    assert_eq!(c.turn.ttl, DEFAULT_TURN_TTL);
    assert_eq!(c.transport, Transport::PlainHttp);
    assert_eq!(c.limits.max_sessions, DEFAULT_MAX_SESSIONS);
}

#[test]
fn unknown_key_names_file_and_key() {
    let err = parse_file(
        Path::new("/etc/coord.toml"),
        "listen = \"127.0.0.1:1\"\nlisten_addr = 3\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/etc/coord.toml"), "{err}");
    assert!(err.contains("listen_addr"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn unknown_turn_key_is_rejected() {
    let err = parse_file(Path::new("c.toml"), "[turn]\nembeded = false\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("embeded"), "{err}");
}

#[test]
fn bad_value_is_rejected_with_key() {
    let err = parse_file(Path::new("c.toml"), "network = \"not-a-cidr\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("network"), "{err}");
}

#[test]
fn bad_ttl_in_file_names_file_and_key() {
    let file = parse_file(
        Path::new("c.toml"),
        "allow_http = true\npublic_addr = \"192.0.2.1\"\n[turn]\nttl = \"soon\"\n",
    )
    .unwrap();
    let err = Config::resolve(Some((Path::new("c.toml"), file)), Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("c.toml") && err.contains("turn.ttl"), "{err}");
}

#[test]
fn full_file_parses_and_flags_override_it() {
    let text = r#"
        listen = "127.0.0.1:9000"
        state_dir = "/tmp/x"
        network = "10.20.0.0/16"
        allow_http = true
        max_sessions = 10
        [turn]
        embedded = false
        port = 4000
        secret = "s3"
        allow_private = true
        ttl = "1h"
        [[turn.external]]
        urls = ["turn:turn.example.com:3478?transport=udp"]
    "#;
    let file = parse_file(Path::new("c.toml"), text).unwrap();
    let flags = Overrides {
        listen: Some("127.0.0.1:9001".parse().unwrap()),
        max_sessions: Some(20),
        ..Overrides::default()
    };
    let c = Config::resolve(Some((Path::new("c.toml"), file)), flags).unwrap();
    assert_eq!(c.listen.port(), 9001);
    assert_eq!(c.limits.max_sessions, 20);
    assert_eq!(c.network.to_string(), "10.20.0.0/16");
    assert!(!c.turn.embedded);
    assert_eq!(c.turn.secret.as_deref(), Some("s3"));
    assert_eq!(c.turn.ttl, Duration::from_secs(3600));
    assert_eq!(c.turn.external.len(), 1);
}

#[test]
fn neither_tls_nor_http_is_refused() {
    let flags = Overrides {
        allow_http: false,
        ..flags_http()
    };
    let err = Config::resolve(None, flags).unwrap_err().to_string();
    assert!(err.contains("--allow-http"), "{err}");
}

#[test]
fn unspecified_listen_without_public_addr_is_refused_with_embedded_turn() {
    let flags = Overrides {
        public_addrs: vec![],
        ..flags_http()
    };
    assert!(Config::resolve(None, flags.clone()).is_err());
    let flags = Overrides {
        no_embedded_turn: true,
        ..flags
    };
    assert!(Config::resolve(None, flags).is_ok());
}

#[test]
fn network_is_truncated_to_its_prefix() {
    let flags = Overrides {
        network: Some("10.1.2.3/24".parse().unwrap()),
        ..flags_http()
    };
    let c = Config::resolve(None, flags).unwrap();
    assert_eq!(c.network.to_string(), "10.1.2.0/24");
}

#[test]
fn example_config_parses() {
    let text = include_str!("../coord.example.toml");
    let file = parse_file(Path::new("coord.example.toml"), text).unwrap();
    assert_eq!(file.turn.ttl.as_deref(), Some("1h"));
    let c = Config::resolve(
        Some((Path::new("coord.example.toml"), file)),
        Overrides::default(),
    )
    .unwrap();
    assert!(matches!(c.transport, Transport::Tls { .. }));
    assert_eq!(
        c.announced(),
        vec!["203.0.113.10".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        c.turn.allocations_per_user,
        DEFAULT_TURN_ALLOCATIONS_PER_USER
    );
    assert_eq!(c.limits.conns_per_ip, DEFAULT_CONNS_PER_IP);
    let dns = c.dns.expect("DNS on in the example");
    assert_eq!(dns.domain, "overlay.internal");
    assert_eq!(dns.records[0].name, "grafana.overlay.internal");
}

#[test]
fn connection_and_allocation_bounds_come_from_the_file_and_must_be_positive() {
    let text = "pending_conns_per_ip = 3\nconns_per_ip = 7\nrelay_rate_mib = 64\nrelay_burst_mib = 4\n[turn]\nallocations_per_user = 2\nmax_allocations = 9\n";
    let file = parse_file(Path::new("c.toml"), text).unwrap();
    let c = Config::resolve(
        Some((Path::new("c.toml"), file)),
        Overrides {
            allow_http: true,
            no_embedded_turn: true,
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(
        (c.limits.pending_conns_per_ip, c.limits.conns_per_ip),
        (3, 7)
    );
    assert_eq!(
        (c.turn.allocations_per_user, c.turn.max_allocations),
        (2, 9)
    );
    assert_eq!(
        (c.limits.relay_rate, c.limits.relay_burst),
        (64.0 * 1024.0 * 1024.0, 4.0 * 1024.0 * 1024.0)
    );
    assert_eq!(c.turn.ttl, DEFAULT_TURN_TTL);
    assert_eq!(DEFAULT_TURN_TTL, Duration::from_secs(3600));
    for zero in [
        "conns_per_ip = 0",
        "pending_conns_per_ip = 0",
        "relay_rate_mib = 0",
        "relay_burst_mib = 0",
        "[turn]\nmax_allocations = 0",
        "[turn]\nallocations_per_user = 0",
    ] {
        let file = parse_file(Path::new("c.toml"), zero).unwrap();
        let err = Config::resolve(Some((Path::new("c.toml"), file)), flags_http())
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be at least 1"), "{zero}: {err}");
    }
}

#[test]
fn dns_is_on_by_default_with_the_internal_domain_and_100_100_100_100() {
    let c = Config::resolve(None, flags_http()).unwrap();
    let dns = c.dns.expect("DNS on by default");
    assert_eq!(dns.domain, "overlay.internal");
    assert_eq!(
        dns.resolver,
        "100.100.100.100".parse::<std::net::Ipv4Addr>().unwrap()
    );
    assert!(dns.records.is_empty());
}

#[test]
fn dns_domain_flag_overrides_the_file_and_records_come_from_the_file() {
    let path = Path::new("c.toml");
    let text = r#"
network = "10.20.0.0/16"
[dns]
domain = "file.internal"
[[dns.records]]
name = "grafana"
ip = "10.20.0.9"
[[dns.records]]
name = "Wiki.Corp.Internal."
ip = "192.0.2.80"
"#;
    let file = parse_file(path, text).unwrap();
    let flags = Overrides {
        dns_domain: Some("Corp.Internal".into()),
        ..flags_http()
    };
    let dns = Config::resolve(Some((path, file)), flags)
        .unwrap()
        .dns
        .unwrap();
    assert_eq!(dns.domain, "corp.internal");
    assert_eq!(dns.resolver.to_string(), "10.20.255.254");
    let names: Vec<_> = dns
        .records
        .iter()
        .map(|r| (r.name.as_str(), r.ip.to_string()))
        .collect();
    assert_eq!(
        names,
        [
            ("grafana.corp.internal", "10.20.0.9".to_string()),
            ("wiki.corp.internal", "192.0.2.80".to_string())
        ]
    );
    let file = parse_file(path, text).unwrap();
    let dns = Config::resolve(Some((path, file)), flags_http())
        .unwrap()
        .dns
        .unwrap();
    assert_eq!(dns.domain, "file.internal");
}

#[test]
fn no_dns_flag_or_key_turns_dns_off() {
    let flags = Overrides {
        no_dns: true,
        ..flags_http()
    };
    assert!(Config::resolve(None, flags).unwrap().dns.is_none());
    let path = Path::new("c.toml");
    let file = parse_file(path, "[dns]\nenabled = false\n").unwrap();
    assert!(Config::resolve(Some((path, file)), flags_http())
        .unwrap()
        .dns
        .is_none());
    // Off, a network too small for the resolver is fine.
    let flags = Overrides {
        no_dns: true,
        network: Some("10.0.0.0/31".parse().unwrap()),
        ..flags_http()
    };
    assert!(Config::resolve(None, flags).unwrap().dns.is_none());
}

#[test]
fn bad_dns_settings_name_the_flag_or_key() {
    let flags = Overrides {
        dns_domain: Some("my_mesh.internal".into()),
        ..flags_http()
    };
    let e = Config::resolve(None, flags).unwrap_err().to_string();
    assert!(e.contains("--dns-domain") && e.contains('_'), "{e}");

    let path = Path::new("c.toml");
    let file = parse_file(path, "[dns]\ndomain = \"a..b\"\n").unwrap();
    let e = Config::resolve(Some((path, file)), flags_http())
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.toml") && e.contains("dns.domain"), "{e}");

    let file = parse_file(
        path,
        "[[dns.records]]\nname = \"bad name\"\nip = \"10.0.0.1\"\n",
    )
    .unwrap();
    let e = Config::resolve(Some((path, file)), flags_http())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dns.records") && e.contains("bad name"), "{e}");

    let file = parse_file(
        path,
        "[[dns.records]]\nname = \"overlay.internal\"\nip = \"10.0.0.1\"\n",
    )
    .unwrap();
    let e = Config::resolve(Some((path, file)), flags_http())
        .unwrap_err()
        .to_string();
    assert!(e.contains("domain itself"), "{e}");

    let e = parse_file(path, "[[dns.records]]\nname = \"x\"\nip = \"fd00::1\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ip"), "{e}");

    let flags = Overrides {
        network: Some("10.0.0.0/31".parse().unwrap()),
        ..flags_http()
    };
    let e = Config::resolve(None, flags).unwrap_err().to_string();
    assert!(e.contains("10.0.0.0/31") && e.contains("--no-dns"), "{e}");
}

#[test]
fn acme_from_the_file_is_overridden_by_flags_and_defaults_to_lets_encrypt() {
    let path = Path::new("/etc/overlay/coord.toml");
    let file = parse_file(
        path,
        "[acme]\ndomain = \"Coord.Example.com\"\nemail = \"ops@example.com\"\n",
    )
    .unwrap();
    let c = Config::resolve(Some((path, file)), flags_http()).unwrap();
    let Transport::Acme(acme) = c.transport else {
        panic!("ACME transport expected, got {:?}", c.transport);
    };
    assert_eq!(acme.domain, "coord.example.com");
    assert_eq!(acme.directory, crate::acme::LETS_ENCRYPT);
    assert_eq!(acme.email.as_deref(), Some("ops@example.com"));

    let file = parse_file(path, "[acme]\ndomain = \"a.example.com\"\n").unwrap();
    let flags = Overrides {
        acme_domain: Some("b.example.com".into()),
        acme_directory: Some("https://pebble:14000/dir".into()),
        acme_ca: Some("/tmp/pebble.pem".into()),
        ..flags_http()
    };
    let c = Config::resolve(Some((path, file)), flags).unwrap();
    let Transport::Acme(acme) = c.transport else {
        panic!("ACME transport expected, got {:?}", c.transport);
    };
    assert_eq!(acme.domain, "b.example.com");
    assert_eq!(acme.directory, "https://pebble:14000/dir");
    assert_eq!(acme.ca, Some(PathBuf::from("/tmp/pebble.pem")));
}

#[test]
fn acme_refuses_ips_wildcards_plain_http_directories_and_a_second_certificate() {
    let with = |f: fn(&mut Overrides)| {
        let mut flags = flags_http();
        flags.acme_domain = Some("coord.example.com".into());
        f(&mut flags);
        Config::resolve(None, flags)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(with(|f| f.acme_domain = Some("192.0.2.1".into())).contains("IP address"));
    assert!(with(|f| f.acme_domain = Some("*.example.com".into())).contains("wildcard"));
    assert!(with(|f| f.acme_domain = Some("coord".into())).contains("not a DNS name"));
    assert!(with(|f| f.acme_directory = Some("http://ca/dir".into())).contains("https://"));
    assert!(with(|f| f.acme_email = Some("nobody".into())).contains("email"));
    assert!(with(|f| {
        f.tls_cert = Some("/c".into());
        f.tls_key = Some("/k".into());
    })
    .contains("not both"));
    let mut flags = flags_http();
    flags.acme_email = Some("ops@example.com".into());
    let err = Config::resolve(None, flags).unwrap_err().to_string();
    assert!(err.contains("need --acme-domain"), "{err}");
}

#[test]
fn database_comes_from_the_flag_or_the_file_and_defaults_to_sqlite() {
    let c = Config::resolve(None, flags_http()).unwrap();
    assert_eq!(c.database, None);
    assert_eq!(
        c.store_location(),
        crate::store::Location::Sqlite(PathBuf::from(DEFAULT_STATE_DIR))
    );
    let path = Path::new("c.toml");
    let file = || parse_file(path, "database = \"postgres://coord@db1/overlay\"\n").unwrap();
    let c = Config::resolve(Some((path, file())), flags_http()).unwrap();
    assert_eq!(c.database.as_deref(), Some("postgres://coord@db1/overlay"));
    assert_eq!(
        c.store_location(),
        crate::store::Location::Postgres("postgres://coord@db1/overlay".into())
    );
    let flags = Overrides {
        database: Some("host=/run/postgresql dbname=overlay".into()),
        ..flags_http()
    };
    let c = Config::resolve(Some((path, file())), flags).unwrap();
    assert_eq!(
        c.database.as_deref(),
        Some("host=/run/postgresql dbname=overlay")
    );
    // The admin commands read it the same way.
    assert_eq!(
        database(Some(&file()), None).unwrap().as_deref(),
        Some("postgres://coord@db1/overlay")
    );
    assert_eq!(database(None, None).unwrap(), None);
}

#[test]
fn a_bad_database_is_refused_without_repeating_it() {
    let path = Path::new("c.toml");
    for bad in [
        "mysql://u:hunter2@db/x",
        "postgres://u:hunter2@db:notaport/x",
    ] {
        let file = parse_file(path, &format!("database = \"{bad}\"\n")).unwrap();
        let err = Config::resolve(Some((path, file)), flags_http())
            .unwrap_err()
            .to_string();
        assert!(err.contains("database"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = database(None, Some(bad)).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn the_bus_is_one_or_several_nats_urls() {
    let with_bus = |bus: &str| {
        Config::resolve(
            None,
            Overrides {
                bus: Some(bus.into()),
                ..flags_http()
            },
        )
    };
    assert_eq!(Config::resolve(None, flags_http()).unwrap().bus, None);
    let c = with_bus("nats://10.0.0.1:4222, tls://10.0.0.2:4222").unwrap();
    assert_eq!(
        c.bus.as_deref(),
        Some("nats://10.0.0.1:4222, tls://10.0.0.2:4222")
    );
    let err = with_bus("nats://10.0.0.1:4222,http://x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`http://x` is not a NATS URL"), "{err}");
    let file = parse_file(
        Path::new("c.toml"),
        "bus = \"redis://x\"\nallow_http = true\npublic_addr = \"192.0.2.1\"\n",
    )
    .unwrap();
    let err = Config::resolve(Some((Path::new("c.toml"), file)), Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("bus") && err.contains("c.toml"), "{err}");
}

#[test]
fn replica_example_config_parses() {
    let text = include_str!("../../packaging/replicas/coord.toml.example");
    let path = Path::new("replicas/coord.toml.example");
    let file = parse_file(path, text).unwrap();
    let c = Config::resolve(Some((path, file)), Overrides::default()).unwrap();
    assert!(c.database.is_some());
    assert_eq!(c.bus.as_deref().map(|b| b.split(',').count()), Some(3));
}

#[test]
fn network6_comes_from_the_flag_or_the_file_and_is_checked() {
    let c = Config::resolve(None, flags_http()).unwrap();
    assert_eq!(
        c.network6, None,
        "none given: the store's, or a generated one"
    );
    let flags = Overrides {
        network6: Some("fd12:3456:789a::7/48".parse().unwrap()),
        ..flags_http()
    };
    let c = Config::resolve(None, flags).unwrap();
    assert_eq!(c.network6.unwrap().to_string(), "fd12:3456:789a::/48");

    let file = parse_file(Path::new("c.toml"), "network6 = \"fd00:1:2::/64\"\n").unwrap();
    let c = Config::resolve(Some((Path::new("c.toml"), file)), flags_http()).unwrap();
    assert_eq!(c.network6.unwrap().to_string(), "fd00:1:2::/64");

    for (text, says) in [
        ("fd00:1:2::/112", "longer than /96"),
        ("10.0.0.0/8", "IPv4 network"),
        ("fe80::/64", "cannot be the mesh IPv6 prefix"),
    ] {
        let file = parse_file(Path::new("c.toml"), &format!("network6 = \"{text}\"\n")).unwrap();
        let err = Config::resolve(Some((Path::new("c.toml"), file)), flags_http())
            .unwrap_err()
            .to_string();
        assert!(err.contains("network6") && err.contains(says), "{err}");
    }
    let flags = Overrides {
        network6: Some("fd00:1:2::/100".parse().unwrap()),
        ..flags_http()
    };
    let err = Config::resolve(None, flags).unwrap_err().to_string();
    assert!(err.contains("--network6") && err.contains("/96"), "{err}");
}

#[test]
fn public_addr_is_one_address_or_one_per_family() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let resolve = |text: &str| {
        let file = parse_file(Path::new("c.toml"), text)?;
        Config::resolve(
            Some((Path::new("c.toml"), file)),
            Overrides {
                public_addrs: vec![],
                ..flags_http()
            },
        )
    };
    let c = resolve("public_addr = \"203.0.113.10\"\n").unwrap();
    assert_eq!(c.announced(), vec![ip("203.0.113.10")]);
    // Listed IPv6 first, announced IPv4 first.
    let c = resolve("public_addr = [\"2001:db8::10\", \"203.0.113.10\"]\n").unwrap();
    assert_eq!(c.announced(), vec![ip("203.0.113.10"), ip("2001:db8::10")]);
    let c = resolve("public_addr = [\"2001:db8::10\"]\n").unwrap();
    assert_eq!(c.announced(), vec![ip("2001:db8::10")]);

    let err = resolve("public_addr = [\"203.0.113.10\", \"203.0.113.11\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("at most one IPv4 and one IPv6") && err.contains("203.0.113.11"),
        "{err}"
    );
    let err = resolve("public_addr = \"::\"\n").unwrap_err().to_string();
    assert!(err.contains("cannot be announced"), "{err}");
    let err = resolve("public_addr = 7\n").unwrap_err().to_string();
    assert!(err.contains("at most one per family"), "{err}");

    let flags = Overrides {
        public_addrs: vec![ip("2001:db8::1"), ip("2001:db8::2")],
        ..flags_http()
    };
    let err = Config::resolve(None, flags).unwrap_err().to_string();
    assert!(err.contains("--public-addr"), "{err}");
}

#[test]
fn a_specific_listen_address_is_announced_for_its_family() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let listen = |l: &str, public: &[&str]| {
        Config::resolve(
            None,
            Overrides {
                listen: Some(l.parse().unwrap()),
                public_addrs: public.iter().map(|s| ip(s)).collect(),
                ..flags_http()
            },
        )
        .map(|c| c.announced())
    };
    assert_eq!(
        listen("[2001:db8::5]:8080", &[]).unwrap(),
        vec![ip("2001:db8::5")]
    );
    assert_eq!(
        listen("192.0.2.5:8080", &["2001:db8::1"]).unwrap(),
        vec![ip("192.0.2.5"), ip("2001:db8::1")]
    );
    // A public address of the listen address's family wins over it.
    assert_eq!(
        listen("192.0.2.5:8080", &["203.0.113.1"]).unwrap(),
        vec![ip("203.0.113.1")]
    );
    // [::] alone names no address to announce.
    assert!(listen("[::]:8080", &[]).is_err());
    assert_eq!(
        listen("[::]:8080", &["2001:db8::1"]).unwrap(),
        vec![ip("2001:db8::1")]
    );
}
