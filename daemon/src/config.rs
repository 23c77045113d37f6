//! The daemon's configuration: a TOML file (default `/etc/overlay/overlayd.toml`)
//! overlaid with command-line flags. Every mistake names the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use overlay_proto::config_file;
pub use overlay_proto::config_file::ConfigError;
use serde::Deserialize;

/// Where `overlayd up` looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/overlay/overlayd.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/overlay";
pub const DEFAULT_INTERFACE: &str = "overlay0";
/// Small enough that WireGuard (32 bytes), UDP/IP (28) and TURN channel framing
/// (4) fit inside a 1400-byte path MTU with room to spare.
pub const DEFAULT_MTU: u16 = 1280;

/// The file's shape. Unknown keys are errors, so a typo never silently does nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// One URL, several separated by commas, or a list of URLs (replicas).
    pub coordinator: Option<Coordinators>,
    pub auth_key: Option<String>,
    pub auth_key_file: Option<PathBuf>,
    pub hostname: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub interface: Option<String>,
    pub socket: Option<PathBuf>,
    pub mtu: Option<u16>,
    pub ca_cert: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub dns: Option<DnsMode>,
    /// Seconds without data before a peer turns idle; 0: never.
    pub idle_timeout: Option<u64>,
    /// A `RUST_LOG`-style filter, used when `RUST_LOG` is not set.
    pub log: Option<String>,
}

/// `coordinator = "https://a"`, `"https://a,https://b"` or `["https://a", "https://b"]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Coordinators {
    One(String),
    Many(Vec<String>),
}

impl Coordinators {
    /// The list as the daemon keeps it: URLs separated by commas.
    pub fn joined(self) -> String {
        match self {
            Coordinators::One(list) => list,
            Coordinators::Many(urls) => urls.join(","),
        }
    }
}

/// How the host is told about the mesh resolver.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DnsMode {
    /// With systemd-resolved: split DNS, only the mesh domain goes to the mesh
    /// resolver. Without it: the host's DNS is left alone.
    #[default]
    Auto,
    /// Manage /etc/resolv.conf: the mesh resolver first, other names
    /// forwarded to the servers it named before; restored exactly on exit.
    ResolvConf,
    /// Never touch the host's DNS (the resolver still answers on its address).
    Off,
}

impl DnsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsMode::Auto => "auto",
            DnsMode::ResolvConf => "resolv-conf",
            DnsMode::Off => "off",
        }
    }
}

/// What the flags can override; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub coordinator: Option<String>,
    pub auth_key: Option<String>,
    pub auth_key_file: Option<PathBuf>,
    pub hostname: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub interface: Option<String>,
    pub socket: Option<PathBuf>,
    pub mtu: Option<u16>,
    pub ca_cert: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub dns: Option<DnsMode>,
    pub idle_timeout: Option<u64>,
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The coordinator's URL, or its replicas' separated by commas; `None`
    /// only when the state directory already knows them.
    pub coordinator: Option<String>,
    pub auth_key: Option<String>,
    pub hostname: String,
    pub state_dir: PathBuf,
    pub interface: String,
    pub socket: PathBuf,
    pub mtu: u16,
    pub ca_cert: Option<PathBuf>,
    /// Where to serve Prometheus metrics over HTTP; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    pub dns: DnsMode,
    /// How long a peer may go without data packets before it turns idle (no
    /// ICE session, no keepalives); `None`: peers never do.
    pub idle_timeout: Option<Duration>,
    pub log: Option<String>,
}

impl FileConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        config_file::parse(path, text)
    }

    /// Reads `path`; a missing file is an empty config only when it is the default
    /// path (so `overlayd up --coordinator ...` works without any file).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => config_file::load(path),
            None => config_file::load_if_present(Path::new(DEFAULT_CONFIG)),
        }
    }
}

impl Config {
    pub fn resolve(file: FileConfig, flags: Overrides) -> Result<Self, ConfigError> {
        let auth_key_file = flags.auth_key_file.or(file.auth_key_file);
        let auth_key = match (flags.auth_key.or(file.auth_key), auth_key_file) {
            (Some(key), _) => Some(key),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "cannot read auth_key_file {}: {e}",
                        path.display()
                    ))
                })?;
                Some(text.trim().to_owned())
            }
            (None, None) => None,
        };
        let interface = flags
            .interface
            .or(file.interface)
            .unwrap_or_else(|| DEFAULT_INTERFACE.to_owned());
        validate_interface(&interface)?;
        let mtu = flags.mtu.or(file.mtu).unwrap_or(DEFAULT_MTU);
        if !(576..=9000).contains(&mtu) {
            return Err(ConfigError::Invalid(format!(
                "mtu {mtu} is out of range (576..=9000)"
            )));
        }
        let coordinator = flags
            .coordinator
            .or(file.coordinator.map(Coordinators::joined));
        if let Some(list) = &coordinator {
            crate::control::failover::parse_urls(list)
                .map_err(|e| ConfigError::Invalid(format!("coordinator: {e}")))?;
        }
        let hostname = match flags.hostname.or(file.hostname) {
            Some(h) => h,
            None => system_hostname(),
        };
        Ok(Config {
            coordinator,
            auth_key: auth_key.filter(|k| !k.is_empty()),
            hostname,
            state_dir: flags
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            interface,
            socket: flags
                .socket
                .or(file.socket)
                .unwrap_or_else(|| overlay_proto::api::DEFAULT_SOCKET.into()),
            mtu,
            ca_cert: flags.ca_cert.or(file.ca_cert),
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            dns: flags.dns.or(file.dns).unwrap_or_default(),
            idle_timeout: match flags.idle_timeout.or(file.idle_timeout) {
                None => Some(crate::node::idle::DEFAULT_IDLE_TIMEOUT),
                Some(0) => None,
                Some(secs) => Some(Duration::from_secs(secs)),
            },
            log: file.log,
        })
    }
}

fn validate_interface(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "interface name {name:?} is not valid (1-15 characters: letters, digits, - _ .)"
        )))
    }
}

fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = FileConfig::parse(Path::new("/etc/o.toml"), "coordinatr = \"x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/etc/o.toml"), "{msg}");
        assert!(msg.contains("coordinatr"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig::parse(
            Path::new("f"),
            "coordinator = \"http://a:1\"\nhostname = \"h\"\nmtu = 1400\n",
        )
        .unwrap();
        let cfg = Config::resolve(
            file,
            Overrides {
                hostname: Some("flag".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.hostname, "flag");
        assert_eq!(cfg.mtu, 1400);
        assert_eq!(cfg.coordinator.as_deref(), Some("http://a:1"));
        assert_eq!(cfg.interface, DEFAULT_INTERFACE);
        assert_eq!(
            cfg.idle_timeout,
            Some(crate::node::idle::DEFAULT_IDLE_TIMEOUT)
        );
    }

    #[test]
    fn coordinator_replicas_as_a_list_or_separated_by_commas() {
        let list = "coordinator = [\"http://a:1\", \"https://b\"]\n";
        let cfg = Config::resolve(
            FileConfig::parse(Path::new("f"), list).unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.coordinator.as_deref(), Some("http://a:1,https://b"));
        let flags = Overrides {
            coordinator: Some("http://a:1, http://c:2".into()),
            ..Default::default()
        };
        let file = FileConfig::parse(Path::new("f"), list).unwrap();
        let cfg = Config::resolve(file, flags).unwrap();
        assert_eq!(cfg.coordinator.as_deref(), Some("http://a:1, http://c:2"));
        let bad = Overrides {
            coordinator: Some("http://a:1,ftp://x".into()),
            ..Default::default()
        };
        let err = Config::resolve(FileConfig::default(), bad).unwrap_err();
        assert!(err.to_string().contains("ftp://x"), "{err}");
    }

    #[test]
    fn idle_timeout_comes_from_file_or_flag_and_zero_turns_it_off() {
        let file = || FileConfig::parse(Path::new("f"), "idle_timeout = 60\n").unwrap();
        let cfg = Config::resolve(file(), Overrides::default()).unwrap();
        assert_eq!(cfg.idle_timeout, Some(Duration::from_secs(60)));
        let off = Overrides {
            idle_timeout: Some(0),
            ..Default::default()
        };
        assert_eq!(Config::resolve(file(), off).unwrap().idle_timeout, None);
    }

    #[test]
    fn bad_values_are_refused() {
        let bad_mtu = Overrides {
            mtu: Some(100),
            ..Default::default()
        };
        assert!(Config::resolve(FileConfig::default(), bad_mtu).is_err());
        let bad_if = Overrides {
            interface: Some("a/b".into()),
            ..Default::default()
        };
        assert!(Config::resolve(FileConfig::default(), bad_if).is_err());
        let bad_url = Overrides {
            coordinator: Some("ftp://x".into()),
            ..Default::default()
        };
        assert!(Config::resolve(FileConfig::default(), bad_url).is_err());
    }

    #[test]
    fn unreadable_auth_key_file_is_named_as_such() {
        let flags = Overrides {
            auth_key_file: Some("/nonexistent/overlay-key".into()),
            ..Default::default()
        };
        let err = Config::resolve(FileConfig::default(), flags)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read auth_key_file /nonexistent/overlay-key"),
            "{err}"
        );
    }
}
