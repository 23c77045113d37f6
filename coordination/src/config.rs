//! Server configuration: the TOML file, command-line overrides, and the
//! resolved [`Config`] the rest of the crate reads.
//!
//! Precedence is flag > file > embedded default. Every file error names the
//! file, and `toml` adds the line, column and key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use overlay_proto::config_file;
pub use overlay_proto::config_file::ConfigError;
use overlay_proto::coord::DnsConfig;
use serde::Deserialize;

use crate::acme::{self, AcmeConfig};
use crate::dns;

/// Default address of the HTTP/WebSocket listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default state directory (SQLite store, generated TURN secret).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/overlay-coord";
/// Default mesh network (the CGNAT range, like Tailscale).
pub const DEFAULT_NETWORK: &str = "100.64.0.0/10";
/// Default UDP port of the embedded STUN/TURN server.
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// Default lifetime of TURN credentials handed to nodes. Short, so that a
/// credential that leaks (or outlives its node) is soon worthless; nodes
/// ask for fresh ones (`RefreshIce`) before it runs out.
pub const DEFAULT_TURN_TTL: Duration = Duration::from_secs(3600);
/// Default bound on concurrent control sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 20_000;
/// Default bound on TURN allocations per username (one node's credential).
/// Today's daemon holds one allocation per ICE session, so per peer it is
/// negotiating or relaying with at once: 64 covers a node behind a symmetric NAT
/// with 64 peers active at the same time; beyond that, the extra peers use the
/// coordination relay (issue #13 moves the daemon to one shared allocation).
pub const DEFAULT_TURN_ALLOCATIONS_PER_USER: usize = 64;
/// Default bound on all TURN allocations of the embedded server (each is a
/// UDP socket, so a file descriptor).
pub const DEFAULT_TURN_MAX_ALLOCATIONS: usize = 8192;
/// Default bound on connections from one source (IPv4 address or IPv6 /64)
/// that are not yet an authenticated WebSocket session.
pub const DEFAULT_PENDING_CONNS_PER_IP: usize = 64;
/// Default bound on all connections from one source, sessions included:
/// high, since many nodes can share one NAT address.
pub const DEFAULT_CONNS_PER_IP: usize = 4096;

/// The TOML file, field for field. Every field is optional: the file only
/// overrides the embedded defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub network: Option<Ipv4Net>,
    /// The mesh's IPv6 prefix (checked by [`crate::mesh6::parse`]).
    pub network6: Option<String>,
    /// One address, or a list with at most one per family.
    pub public_addr: Option<PublicAddrs>,
    pub allow_http: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_sessions: Option<usize>,
    pub pending_conns_per_ip: Option<usize>,
    pub conns_per_ip: Option<usize>,
    /// The coordination relay's sustained rate per node session, MiB/s.
    pub relay_rate_mib: Option<usize>,
    /// What a node session may relay at once above that rate, MiB.
    pub relay_burst_mib: Option<usize>,
    /// The replicas' bus, `nats://host:port` (several replicas share it).
    pub bus: Option<String>,
    /// PostgreSQL holding the store (`postgres://…`); without it, SQLite in
    /// the state directory.
    pub database: Option<String>,
    #[serde(default)]
    pub turn: FileTurn,
    #[serde(default)]
    pub dns: FileDns,
    #[serde(default)]
    pub acme: FileAcme,
}

/// `public_addr = "203.0.113.10"` or `public_addr = ["203.0.113.10", "2001:db8::10"]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "an IP address, or a list of IP addresses with at most one per family"
)]
pub enum PublicAddrs {
    One(IpAddr),
    Many(Vec<IpAddr>),
}

impl PublicAddrs {
    fn into_vec(self) -> Vec<IpAddr> {
        match self {
            PublicAddrs::One(ip) => vec![ip],
            PublicAddrs::Many(ips) => ips,
        }
    }
}

/// `[acme]`: a certificate obtained and renewed by the coordinator itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAcme {
    pub domain: Option<String>,
    pub directory: Option<String>,
    pub email: Option<String>,
    pub ca: Option<PathBuf>,
}

/// `[dns]`: the mesh's names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDns {
    /// `false` turns the nodes' resolver off (like `--no-dns`).
    pub enabled: Option<bool>,
    pub domain: Option<String>,
    #[serde(default)]
    pub records: Vec<FileDnsRecord>,
}

/// `[[dns.records]]`: a name under the domain for an address of the
/// administrator's choosing (a service behind a node, a host off the mesh).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDnsRecord {
    /// Relative to the domain (`grafana`) or under it (`grafana.overlay.internal`).
    pub name: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTurn {
    pub embedded: Option<bool>,
    pub port: Option<u16>,
    pub secret: Option<String>,
    pub allow_private: Option<bool>,
    /// A duration such as `1h`.
    pub ttl: Option<String>,
    pub allocations_per_user: Option<usize>,
    pub max_allocations: Option<usize>,
    #[serde(default)]
    pub external: Vec<ExternalTurn>,
}

/// A TURN server run by someone else (typically coturn with
/// `use-auth-secret`), announced to nodes with REST credentials.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalTurn {
    /// `turn:`/`turns:` URLs get credentials; `stun:` URLs are announced as STUN.
    pub urls: Vec<String>,
    /// Shared secret of that server; defaults to `turn.secret`.
    pub secret: Option<String>,
}

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub network: Option<Ipv4Net>,
    pub network6: Option<Ipv6Net>,
    /// `--public-addr`, once per family; empty when not given.
    pub public_addrs: Vec<IpAddr>,
    pub stun_port: Option<u16>,
    pub no_embedded_turn: bool,
    pub turn_secret: Option<String>,
    pub turn_allow_private: bool,
    pub turn_ttl: Option<Duration>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub allow_http: bool,
    pub max_sessions: Option<usize>,
    pub dns_domain: Option<String>,
    pub no_dns: bool,
    pub acme_domain: Option<String>,
    pub acme_directory: Option<String>,
    pub acme_email: Option<String>,
    pub acme_ca: Option<PathBuf>,
    pub bus: Option<String>,
    pub database: Option<String>,
}

/// The resolved configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub network: Ipv4Net,
    /// The mesh's IPv6 prefix as configured; `None`: the one in the store,
    /// or a random ULA /48 stored on first start ([`crate::mesh6`]).
    pub network6: Option<Ipv6Net>,
    /// Addresses announced in STUN/TURN URLs, at most one per family (see
    /// [`Config::announced`]). One is required when the embedded TURN server
    /// runs and `listen` is unspecified (0.0.0.0 or [::]).
    pub public_addrs: Vec<IpAddr>,
    pub transport: Transport,
    pub turn: TurnConfig,
    pub limits: Limits,
    /// What every node is sent after its netmap; `None` turns the nodes'
    /// resolver off (the address stays reserved: see [`crate::ipam`]).
    pub dns: Option<DnsConfig>,
    /// The replicas' bus (NATS URL); `None`: a single coordinator, the hub's
    /// own in-process broadcast is the bus.
    pub bus: Option<String>,
    /// PostgreSQL connection string of the store; `None`: SQLite in `state_dir`.
    pub database: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tls {
        cert: PathBuf,
        key: PathBuf,
    },
    /// A certificate obtained and renewed with ACME.
    Acme(AcmeConfig),
    PlainHttp,
}

#[derive(Debug, Clone)]
pub struct TurnConfig {
    pub embedded: bool,
    /// UDP port of the embedded server; 0 picks an ephemeral port (tests).
    pub port: u16,
    /// Shared secret; `None` means "generate once and keep in the state dir".
    pub secret: Option<String>,
    pub allow_private: bool,
    pub ttl: Duration,
    pub external: Vec<ExternalTurn>,
    /// Allocations one username (one node's credential) may hold at once.
    pub allocations_per_user: usize,
    /// Allocations the embedded server holds at once, all users together.
    pub max_allocations: usize,
}

/// Bounds on what a remote can make the server hold or do.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sessions: usize,
    /// Sustained text messages per second per session.
    pub msg_rate: f64,
    /// Text-message burst per session.
    pub msg_burst: f64,
    /// Sustained relay bytes per second a session may send (datagrams and
    /// their record headers); excess datagrams are dropped and counted
    /// (`relay_dropped_frames_total{reason="rate_limited"}`). The relay is
    /// the only path for nodes without UDP, so the default (128 MiB/s, about
    /// 1 Gbit/s) is above what one session carries on a small server: it
    /// bounds abuse, it does not shape real traffic.
    pub relay_rate: f64,
    /// Bytes a session may send at once above `relay_rate`: a TCP stream's
    /// window arriving at once passes without a drop.
    pub relay_burst: f64,
    /// Direct messages (signals, pongs, errors) queued per session.
    pub control_queue: usize,
    /// Relay messages (single frames or batches) queued towards one session;
    /// more are dropped.
    pub relay_queue: usize,
    /// Relay bytes queued towards one session; datagrams beyond it are
    /// dropped and counted (`reason="queue_full"`), so a node that reads
    /// slowly costs the server at most this, and a TCP stream through the
    /// relay sees a drop, not a growing delay (1 MiB is 8 ms at 1 Gbit/s).
    pub relay_queue_bytes: usize,
    /// Netmap deltas buffered for the slowest session before it is dropped.
    pub delta_backlog: usize,
    /// Peers' JSON per netmap message: a larger netmap is sent as a Welcome
    /// and `PeerBatch` parts. Every session keeps a write buffer as large as
    /// its largest message, so this bounds per-session memory, and it keeps
    /// frames well under what a node accepts (`MAX_FRAME_BYTES`).
    pub netmap_part_bytes: usize,
    pub ping_interval: Duration,
    /// A session that sent nothing (not even a pong) for this long is dropped.
    pub idle_timeout: Duration,
    /// Largest accepted `POST /v1/register` body.
    pub register_body_max: usize,
    /// How often the server polls the store for nodes removed by the CLI
    /// (an indexed read; 200 ms keeps a removal within a second everywhere).
    pub store_poll: Duration,
    /// Connections from one source that are not (yet) an authenticated
    /// WebSocket session: TLS handshakes and requests. More are refused.
    pub pending_conns_per_ip: usize,
    /// All connections from one source, sessions included.
    pub conns_per_ip: usize,
    /// Longest a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Longest a client may take to send a request head, counted from the
    /// connection's start or the end of its previous response.
    pub header_read_timeout: Duration,
    /// A connection that is not a WebSocket session and moved no byte for
    /// this long is closed (a stalled body or an unread response).
    pub http_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: DEFAULT_MAX_SESSIONS,
            msg_rate: 200.0,
            msg_burst: 400.0,
            relay_rate: 128.0 * 1024.0 * 1024.0,
            relay_burst: 16.0 * 1024.0 * 1024.0,
            control_queue: 256,
            relay_queue: 512,
            relay_queue_bytes: 1024 * 1024,
            delta_backlog: 32_768,
            netmap_part_bytes: 8 * 1024,
            ping_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            register_body_max: 8 * 1024,
            store_poll: Duration::from_millis(200),
            pending_conns_per_ip: DEFAULT_PENDING_CONNS_PER_IP,
            conns_per_ip: DEFAULT_CONNS_PER_IP,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Reads and parses a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    config_file::load(path)
}

/// Parses the text of a config file (`path` only names it in errors).
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    config_file::parse(path, text)
}

/// The database an admin command uses: flag, else file; `None` is SQLite in
/// the state directory. Checked as [`Config::resolve`] checks it.
pub fn database(
    file: Option<&FileConfig>,
    flag: Option<&str>,
) -> Result<Option<String>, ConfigError> {
    let url = flag
        .map(str::to_owned)
        .or_else(|| file.and_then(|f| f.database.clone()));
    if let Some(url) = &url {
        check_database(url).map_err(|e| ConfigError::Invalid(format!("database: {e}")))?;
    }
    Ok(url)
}

/// A PostgreSQL connection string the store can use (`postgres://` or
/// `postgresql://` URL, or `key=value` pairs); the message never repeats it,
/// since it may hold a password.
fn check_database(url: &str) -> Result<(), String> {
    let looks_like_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !looks_like_url && !url.contains('=') {
        return Err("not a PostgreSQL connection string (postgres://USER@HOST/DB)".into());
    }
    url.parse::<postgres::Config>()
        .map(drop)
        .map_err(|e| format!("not a PostgreSQL connection string: {e}"))
}

/// The state directory an admin command uses: flag, else file, else default.
pub fn state_dir(file: Option<&FileConfig>, flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| file.and_then(|f| f.state_dir.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

impl Config {
    /// Where the store is: the database if one is given, else SQLite in the
    /// state directory.
    pub fn store_location(&self) -> crate::store::Location {
        crate::store::Location::new(&self.state_dir, self.database.as_deref())
    }

    /// Merges defaults, the file (named by `path` for error messages) and the flags.
    pub fn resolve(
        file: Option<(&Path, FileConfig)>,
        flags: Overrides,
    ) -> Result<Config, ConfigError> {
        let (path, file) = match file {
            Some((p, f)) => (Some(p.to_path_buf()), f),
            None => (None, FileConfig::default()),
        };
        let bad_key =
            |key: &str, message: String| ConfigError::bad_key(path.as_deref(), key, message);

        let listen = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
        let state_dir = state_dir(Some(&file), flags.state_dir.as_deref());
        let network = flags
            .network
            .or(file.network)
            .unwrap_or(Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default())
            .trunc();
        let network6 = match (flags.network6, &file.network6) {
            (Some(net), _) => Some(
                crate::mesh6::check(net)
                    .map_err(|e| ConfigError::Invalid(format!("--network6: {e}")))?,
            ),
            (None, Some(text)) => {
                Some(crate::mesh6::parse(text).map_err(|e| bad_key("network6", e))?)
            }
            (None, None) => None,
        };

        let ttl = match (flags.turn_ttl, &file.turn.ttl) {
            (Some(d), _) => d,
            (None, Some(text)) => parse_duration(text).map_err(|e| bad_key("turn.ttl", e))?,
            (None, None) => DEFAULT_TURN_TTL,
        };
        if ttl.as_secs() == 0 {
            return Err(ConfigError::Invalid(
                "the TURN credential lifetime must be at least one second".into(),
            ));
        }
        let turn = TurnConfig {
            embedded: !flags.no_embedded_turn && file.turn.embedded.unwrap_or(true),
            port: flags
                .stun_port
                .or(file.turn.port)
                .unwrap_or(DEFAULT_STUN_PORT),
            secret: flags.turn_secret.or(file.turn.secret),
            allow_private: flags.turn_allow_private || file.turn.allow_private.unwrap_or(false),
            ttl,
            external: file.turn.external,
            allocations_per_user: file
                .turn
                .allocations_per_user
                .unwrap_or(DEFAULT_TURN_ALLOCATIONS_PER_USER),
            max_allocations: file
                .turn
                .max_allocations
                .unwrap_or(DEFAULT_TURN_MAX_ALLOCATIONS),
        };
        for (key, value) in [
            ("turn.allocations_per_user", turn.allocations_per_user),
            ("turn.max_allocations", turn.max_allocations),
        ] {
            if value == 0 {
                return Err(bad_key(key, "must be at least 1".into()));
            }
        }
        if let Some(s) = &turn.secret {
            if s.is_empty() {
                return Err(ConfigError::Invalid(
                    "the TURN secret must not be empty".into(),
                ));
            }
        }
        for ext in &turn.external {
            if ext.urls.is_empty() {
                return Err(bad_key(
                    "turn.external",
                    "an external TURN server needs at least one URL".into(),
                ));
            }
        }

        let cert = flags.tls_cert.or(file.tls_cert);
        let key = flags.tls_key.or(file.tls_key);
        let allow_http = flags.allow_http || file.allow_http.unwrap_or(false);
        let acme_flags = FileAcme {
            domain: flags.acme_domain,
            directory: flags.acme_directory,
            email: flags.acme_email,
            ca: flags.acme_ca,
        };
        let acme = acme::resolve_config(acme_flags, file.acme, path.as_deref())?;
        let transport = match (cert, key, acme) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "give either a TLS certificate (--tls-cert, --tls-key) or an ACME domain (--acme-domain), not both".into(),
                ))
            }
            (None, None, Some(acme)) => Transport::Acme(acme),
            (Some(cert), Some(key), None) => Transport::Tls { cert, key },
            (Some(_), None, None) | (None, Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "TLS needs both --tls-cert and --tls-key".into(),
                ))
            }
            (None, None, None) if allow_http => Transport::PlainHttp,
            (None, None, None) => {
                return Err(ConfigError::Invalid(
                    "no TLS certificate given: pass --tls-cert and --tls-key, --acme-domain NAME, or --allow-http to serve plain HTTP".into(),
                ))
            }
        };

        let public_addrs = if flags.public_addrs.is_empty() {
            let addrs = file
                .public_addr
                .map(PublicAddrs::into_vec)
                .unwrap_or_default();
            check_public_addrs(&addrs).map_err(|e| bad_key("public_addr", e))?;
            addrs
        } else {
            check_public_addrs(&flags.public_addrs)
                .map_err(|e| ConfigError::Invalid(format!("--public-addr: {e}")))?;
            flags.public_addrs
        };
        if turn.embedded && announced(&public_addrs, listen.ip()).is_empty() {
            return Err(ConfigError::Invalid(format!(
                "listening on {} announces no usable STUN/TURN address: give --public-addr (or `public_addr`), or --no-embedded-turn",
                listen.ip()
            )));
        }

        let limits = Limits {
            max_sessions: flags
                .max_sessions
                .or(file.max_sessions)
                .unwrap_or(DEFAULT_MAX_SESSIONS),
            pending_conns_per_ip: file
                .pending_conns_per_ip
                .unwrap_or(DEFAULT_PENDING_CONNS_PER_IP),
            conns_per_ip: file.conns_per_ip.unwrap_or(DEFAULT_CONNS_PER_IP),
            ..Limits::default()
        };
        let mib = |v: usize| v as f64 * 1024.0 * 1024.0;
        let limits = Limits {
            relay_rate: file.relay_rate_mib.map_or(limits.relay_rate, mib),
            relay_burst: file.relay_burst_mib.map_or(limits.relay_burst, mib),
            ..limits
        };
        for (key, value) in [
            ("max_sessions", limits.max_sessions),
            ("pending_conns_per_ip", limits.pending_conns_per_ip),
            ("conns_per_ip", limits.conns_per_ip),
            ("relay_rate_mib", file.relay_rate_mib.unwrap_or(1)),
            ("relay_burst_mib", file.relay_burst_mib.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(bad_key(key, "must be at least 1".into()));
            }
        }

        let dns_enabled = !flags.no_dns && file.dns.enabled.unwrap_or(true);
        let dns = if dns_enabled {
            let domain = match (flags.dns_domain, file.dns.domain) {
                (Some(text), _) => dns::domain(&text)
                    .map_err(|e| ConfigError::Invalid(format!("--dns-domain: {e}")))?,
                (None, Some(text)) => dns::domain(&text).map_err(|e| bad_key("dns.domain", e))?,
                (None, None) => dns::DEFAULT_DOMAIN.to_owned(),
            };
            let records: Vec<(String, Ipv4Addr)> = file
                .dns
                .records
                .into_iter()
                .map(|r| (r.name, r.ip))
                .collect();
            if crate::ipam::resolver_addr(network).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "the network {network} has no address to spare for the mesh resolver: \
                     give a /30 or larger, or --no-dns (`dns.enabled = false`)"
                )));
            }
            Some(dns::config(domain, &records, network).map_err(|e| bad_key("dns.records", e))?)
        } else {
            None
        };

        let bus = flags.bus.or(file.bus);
        // One URL, or the servers of a NATS cluster separated by commas.
        for url in bus.iter().flat_map(|b| b.split(',')).map(str::trim) {
            if !(url.starts_with("nats://") || url.starts_with("tls://")) {
                return Err(bad_key(
                    "bus",
                    format!("`{url}` is not a NATS URL (nats://host:port or tls://host:port)"),
                ));
            }
        }

        let database = flags.database.or(file.database);
        if let Some(url) = &database {
            check_database(url).map_err(|e| bad_key("database", e))?;
        }

        Ok(Config {
            database,
            listen,
            state_dir,
            network,
            network6,
            public_addrs,
            transport,
            turn,
            limits,
            dns,
            bus,
        })
    }

    /// The addresses announced in STUN/TURN URLs, IPv4 first: the public
    /// address of each family, else the listen address when it is one
    /// (not 0.0.0.0 or [::]). The embedded STUN/TURN server serves exactly
    /// these families.
    pub fn announced(&self) -> Vec<IpAddr> {
        announced(&self.public_addrs, self.listen.ip())
    }
}

/// See [`Config::announced`].
fn announced(public: &[IpAddr], listen: IpAddr) -> Vec<IpAddr> {
    let listen = listen.to_canonical();
    let of_family = |v4: bool| {
        let public = public
            .iter()
            .map(|ip| ip.to_canonical())
            .find(|ip| ip.is_ipv4() == v4);
        public.or_else(|| (listen.is_ipv4() == v4 && !listen.is_unspecified()).then_some(listen))
    };
    [of_family(true), of_family(false)]
        .into_iter()
        .flatten()
        .collect()
}

/// At most one public address per family, each one a node could send to.
fn check_public_addrs(addrs: &[IpAddr]) -> Result<(), String> {
    for ip in addrs {
        let ip = ip.to_canonical();
        let unusable = ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
            || matches!(ip, IpAddr::V6(v6) if is_link_local(v6));
        if unusable {
            return Err(format!(
                "{ip} cannot be announced to nodes: give the address they reach this server at"
            ));
        }
    }
    for v4 in [true, false] {
        let same: Vec<String> = addrs
            .iter()
            .map(|ip| ip.to_canonical())
            .filter(|ip| ip.is_ipv4() == v4)
            .map(|ip| ip.to_string())
            .collect();
        if same.len() > 1 {
            return Err(format!(
                "give at most one IPv4 and one IPv6 address, not {}",
                same.join(" and ")
            ));
        }
    }
    Ok(())
}

fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Parses `90s`, `30m`, `12h`, `7d` or a combination such as `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => {
                return Err(format!(
                    "invalid duration `{text}` (use e.g. 90s, 30m, 12h, 7d)"
                ))
            }
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid duration `{text}` (a number must precede `{c}`)"))?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration `{text}` is too large"))?;
    }
    if !digits.is_empty() {
        return Err(format!(
            "invalid duration `{text}` (missing unit: s, m, h or d)"
        ));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
