//! Command line: `serve` and the admin commands on the same store.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::{self, Config, FileConfig, Overrides};
use crate::store::{now_unix, KeyProblem, Location, Store};

#[derive(Debug, Parser)]
#[command(
    name = "overlay-coord",
    version,
    about = "overlay's coordination server"
)]
pub struct Cli {
    /// TOML configuration file (flags override it).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory holding the store [default: /var/lib/overlay-coord].
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// PostgreSQL holding the store (postgres://USER[:PASSWORD]@HOST[:PORT]/DB,
    /// or key=value pairs) instead of SQLite in the state directory; replicas
    /// of `serve` share it.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "OVERLAY_COORD_DATABASE",
        hide_env_values = true
    )]
    pub database: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordination server and its embedded STUN/TURN server.
    Serve(Box<ServeArgs>),
    /// Manage auth keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage enrolled nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// The access policy: who may reach whom (see README, "Access policy").
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Make TLS certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Write a new CA (ca.crt) and a server certificate it signs (coord.crt,
    /// coord.key) for labs and private meshes, then print the flags to use: nodes
    /// trust the CA with `overlayd up --ca-cert DIR/ca.crt`. The CA's key is not
    /// kept, so nothing else can ever be signed with it.
    SelfSigned {
        /// An IP address the coordinator is reached at (repeatable).
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<IpAddr>,
        /// A DNS name the coordinator is reached at (repeatable).
        #[arg(long = "dns", value_name = "NAME")]
        names: Vec<String>,
        /// Directory to write the files to (created).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// Years the certificates are valid.
        #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=30))]
        years: u16,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HTTP/WebSocket listen address [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Mesh network, any IPv4 CIDR [default: 100.64.0.0/10].
    #[arg(long, value_name = "CIDR")]
    pub network: Option<Ipv4Net>,
    /// The mesh's IPv6 prefix, /96 or shorter (nodes' IPv4 mesh addresses
    /// fill its low 32 bits) [default: a random unique local /48, chosen once
    /// and kept in the store].
    #[arg(long, value_name = "PREFIX", value_parser = parse_network6)]
    pub network6: Option<Ipv6Net>,
    /// Address announced in STUN/TURN URLs; give it once per family (an IPv4
    /// and an IPv6 one) to serve both [default: the listen IP].
    #[arg(long = "public-addr", value_name = "IP")]
    pub public_addr: Vec<IpAddr>,
    /// UDP port of the embedded STUN/TURN server [default: 3478].
    #[arg(long, value_name = "PORT")]
    pub stun_port: Option<u16>,
    /// Do not run the embedded STUN/TURN server.
    #[arg(long)]
    pub no_embedded_turn: bool,
    /// Shared TURN secret [default: generated once in the state directory].
    #[arg(
        long,
        value_name = "S",
        env = "OVERLAY_COORD_TURN_SECRET",
        hide_env_values = true
    )]
    pub turn_secret: Option<String>,
    /// Let the embedded TURN server relay to private addresses.
    #[arg(long)]
    pub turn_allow_private: bool,
    /// Lifetime of TURN credentials [default: 12h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub turn_ttl: Option<Duration>,
    /// PEM certificate chain for TLS.
    #[arg(long, value_name = "F", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, value_name = "F", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP (only behind a TLS-terminating proxy, or for tests).
    #[arg(long)]
    pub allow_http: bool,
    /// Maximum concurrent node sessions [default: 20000].
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// Domain of the mesh's names: nodes resolve NAME.DOMAIN [default: overlay.internal].
    #[arg(long, value_name = "DOMAIN")]
    pub dns_domain: Option<String>,
    /// Turn the nodes' mesh resolver off (the resolver address stays reserved).
    #[arg(long, conflicts_with = "dns_domain")]
    pub no_dns: bool,
    /// Obtain and renew the TLS certificate for this DNS name with ACME
    /// (TLS-ALPN-01: the name must reach this listener on port 443). Kept in
    /// STATE_DIR/acme. Using it agrees to the ACME CA's terms of service.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub acme_domain: Option<String>,
    /// ACME directory URL [default: Let's Encrypt production].
    #[arg(long, value_name = "URL")]
    pub acme_directory: Option<String>,
    /// Contact email given to the ACME CA (expiry and policy notices).
    #[arg(long, value_name = "ADDR")]
    pub acme_email: Option<String>,
    /// PEM CA certificate to trust for the ACME directory's HTTPS, besides
    /// the system's roots (a private or test CA such as pebble).
    #[arg(long, value_name = "FILE")]
    pub acme_ca: Option<PathBuf>,
    /// The replicas' bus: several `serve` processes sharing one database and
    /// this NATS server act as one coordinator [default: none, a single one].
    #[arg(long, value_name = "nats://HOST:PORT", env = "OVERLAY_COORD_BUS")]
    pub bus: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an auth key; prints only the key on stdout.
    Create {
        /// Allow the key to enrol more than one node.
        #[arg(long)]
        reusable: bool,
        /// Expire the key after this long (e.g. 24h, 7d) [default: never].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<Duration>,
        /// A tag the nodes this key enrols get (repeatable).
        #[arg(long = "tag", value_name = "TAG", value_parser = parse_tag)]
        tags: Vec<String>,
    },
    /// List auth keys (never the keys themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an auth key by id: it enrols no more nodes. Nodes it already
    /// enrolled stay enrolled and connected unless --remove-nodes is given.
    Revoke {
        id: u64,
        /// Also remove every node this key enrolled (as `nodes remove` does:
        /// their sessions are closed and they cannot reconnect).
        #[arg(long)]
        remove_nodes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List nodes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a node: its session is closed and it cannot reconnect.
    Remove { name: String },
    /// Add (+TAG) and remove (-TAG) a node's tags; prints its tags after.
    Tag {
        name: String,
        /// +TAG to add, -TAG to remove.
        #[arg(required = true, allow_hyphen_values = true, value_name = "+TAG|-TAG")]
        changes: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file against the enrolled nodes and run its tests.
    Check { file: PathBuf },
    /// Check a policy file, then put it in force (the running server applies
    /// it within a second). A file that fails changes nothing.
    Set { file: PathBuf },
    /// Print the policy in force, exactly as it was set.
    Get,
    /// Remove the policy: everyone may reach everyone again.
    Clear,
    /// Say which rule lets SRC reach DST on PORT/PROTO (22/tcp, 53/udp, icmp).
    Explain {
        /// A node name or tag:NAME.
        src: String,
        /// A node name or tag:NAME.
        dst: String,
        /// PORT/tcp, PORT/udp or icmp.
        #[arg(value_name = "PORT/PROTO")]
        port: String,
    },
}

impl Cli {
    /// `nodes tag NAME -TAG` takes values that start with '-', so clap hands
    /// the global flags after them (`--state-dir DIR`, `--config FILE`) to
    /// the tag list; take them back out.
    pub fn with_global_flags_after_tags(mut self) -> Result<Cli> {
        let Command::Nodes {
            command: NodesCommand::Tag { changes, .. },
        } = &mut self.command
        else {
            return Ok(self);
        };
        let mut kept = Vec::new();
        let mut rest = std::mem::take(changes).into_iter();
        while let Some(arg) = rest.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            if !flag.starts_with("--") {
                kept.push(arg);
                continue;
            }
            let value = match flag.as_str() {
                "--state-dir" | "--config" | "--database" => inline
                    .or_else(|| rest.next())
                    .with_context(|| format!("{flag} needs a value"))?,
                f => bail!("unexpected option {f:?} among the tag changes"),
            };
            match flag.as_str() {
                "--state-dir" => self.state_dir = Some(PathBuf::from(value)),
                "--config" => self.config = Some(PathBuf::from(value)),
                _ => self.database = Some(value),
            }
        }
        if kept.is_empty() {
            bail!("nodes tag needs at least one +TAG or -TAG");
        }
        *changes = kept;
        Ok(self)
    }
}

fn parse_tag(s: &str) -> Result<String, String> {
    let name = s.strip_prefix("tag:").unwrap_or(s);
    if overlay_proto::filter::is_valid_tag(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "bad tag {s:?}: {}",
            overlay_proto::filter::TAG_RULE
        ))
    }
}

fn parse_network6(s: &str) -> Result<Ipv6Net, String> {
    crate::mesh6::parse(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

fn load_file(path: Option<&Path>) -> Result<Option<FileConfig>> {
    path.map(|p| config::load_file(p).map_err(anyhow::Error::from))
        .transpose()
}

/// The resolved `serve` configuration.
pub fn serve_config(cli: &Cli, args: &ServeArgs) -> Result<Config> {
    let file = load_file(cli.config.as_deref())?;
    let flags = Overrides {
        listen: args.listen,
        state_dir: cli.state_dir.clone(),
        network: args.network,
        network6: args.network6,
        public_addrs: args.public_addr.clone(),
        stun_port: args.stun_port,
        no_embedded_turn: args.no_embedded_turn,
        turn_secret: args.turn_secret.clone(),
        turn_allow_private: args.turn_allow_private,
        turn_ttl: args.turn_ttl,
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        allow_http: args.allow_http,
        max_sessions: args.max_sessions,
        dns_domain: args.dns_domain.clone(),
        no_dns: args.no_dns,
        acme_domain: args.acme_domain.clone(),
        acme_directory: args.acme_directory.clone(),
        acme_email: args.acme_email.clone(),
        acme_ca: args.acme_ca.clone(),
        bus: args.bus.clone(),
        database: cli.database.clone(),
    };
    let file = match (&cli.config, file) {
        (Some(path), Some(f)) => Some((path.as_path(), f)),
        _ => None,
    };
    Ok(Config::resolve(file, flags)?)
}

fn open_store(cli: &Cli) -> Result<Store> {
    let file = load_file(cli.config.as_deref())?;
    let dir = config::state_dir(file.as_ref(), cli.state_dir.as_deref());
    let database = config::database(file.as_ref(), cli.database.as_deref())?;
    let location = Location::new(&dir, database.as_deref());
    Store::open_at(&location).with_context(|| format!("opening the store {location}"))
}

/// `cert …`: needs no store.
pub fn cert(command: &CertCommand) -> Result<()> {
    let CertCommand::SelfSigned {
        ips,
        names,
        out,
        years,
    } = command;
    let written = crate::selfsigned::write(out, ips, names, *years)?;
    eprintln!(
        "wrote {} (the CA, for nodes), {} and {} (the coordinator's, key mode 0600)",
        written.ca.display(),
        written.cert.display(),
        written.key.display()
    );
    eprintln!(
        "coordinator: overlay-coord serve --tls-cert {} --tls-key {}",
        written.cert.display(),
        written.key.display()
    );
    eprintln!("nodes: overlayd up --ca-cert {} ...", written.ca.display());
    println!("--ca-cert {}", written.ca.display());
    Ok(())
}

/// Runs an admin command (everything but `serve`).
pub fn admin(cli: &Cli) -> Result<()> {
    let store = open_store(cli)?;
    let now = now_unix();
    let mut out = std::io::stdout().lock();
    match &cli.command {
        Command::Serve(_) | Command::Cert { .. } => {
            unreachable!("serve and cert are not store commands")
        }
        Command::Keys { command } => match command {
            KeysCommand::Create {
                reusable,
                expires,
                tags,
            } => {
                let expires_at = expires.map(|d| now.saturating_add(d.as_secs()));
                let (id, key) = store.create_key_with_tags(*reusable, expires_at, tags, now)?;
                writeln!(out, "{key}")?;
                eprintln!(
                    "created auth key {id} ({}{}, {}); it is shown only this once",
                    if *reusable { "reusable" } else { "single-use" },
                    if tags.is_empty() {
                        String::new()
                    } else {
                        format!(", tags {}", tags.join(","))
                    },
                    match expires_at {
                        Some(t) => format!("expires {}", fmt_time(t)),
                        None => "never expires".into(),
                    }
                );
            }
            KeysCommand::List { json } => {
                let keys = store.list_keys()?;
                if *json {
                    serde_json::to_writer_pretty(&mut out, &keys)?;
                    writeln!(out)?;
                } else {
                    writeln!(
                        out,
                        "{:<5} {:<11} {:>5}  {:<20} {:<20} {:<8} TAGS",
                        "ID", "KIND", "USES", "CREATED", "EXPIRES", "STATUS"
                    )?;
                    for k in keys {
                        let status = match k.problem(now) {
                            None => "valid",
                            Some(KeyProblem::Expired) => "expired",
                            Some(KeyProblem::Revoked) => "revoked",
                            Some(KeyProblem::Spent) => "spent",
                            Some(KeyProblem::Unknown) => "unknown",
                        };
                        let tags = if k.tags.is_empty() {
                            "-".to_owned()
                        } else {
                            k.tags.join(",")
                        };
                        writeln!(
                            out,
                            "{:<5} {:<11} {:>5}  {:<20} {:<20} {status:<8} {tags}",
                            k.id,
                            if k.reusable { "reusable" } else { "single-use" },
                            k.uses,
                            fmt_time(k.created_at),
                            k.expires_at.map(fmt_time).unwrap_or_else(|| "never".into()),
                        )?;
                    }
                }
            }
            KeysCommand::Revoke {
                id,
                remove_nodes: false,
            } => {
                if !store.revoke_key(*id, now)? {
                    bail!("no auth key with id {id}");
                }
                eprintln!(
                    "revoked auth key {id}; nodes it enrolled stay (use --remove-nodes to remove them)"
                );
            }
            KeysCommand::Revoke {
                id,
                remove_nodes: true,
            } => {
                let Some(removed) = store.revoke_key_removing_nodes(*id, now)? else {
                    bail!("no auth key with id {id}");
                };
                for (node, name) in &removed {
                    eprintln!("removed node {name} (id {node})");
                }
                eprintln!(
                    "revoked auth key {id} and removed the {} node(s) it enrolled",
                    removed.len()
                );
            }
        },
        Command::Nodes { command } => match command {
            NodesCommand::List { json } => {
                let nodes = store.list_nodes()?;
                if *json {
                    serde_json::to_writer_pretty(&mut out, &nodes)?;
                    writeln!(out)?;
                } else {
                    writeln!(
                        out,
                        "{:<24} {:<15} {:<25} {:<44} {:<7} {:<20} TAGS",
                        "NAME", "MESH IP", "MESH IPV6", "PUBLIC KEY", "ONLINE", "LAST SEEN"
                    )?;
                    for n in nodes {
                        let last_seen = if n.online {
                            "now".to_string()
                        } else {
                            n.last_seen.map(fmt_time).unwrap_or_else(|| "never".into())
                        };
                        writeln!(
                            out,
                            "{:<24} {:<15} {:<25} {:<44} {:<7} {last_seen:<20} {}",
                            n.name,
                            n.mesh_ip.to_string(),
                            n.mesh_ip6
                                .map_or_else(|| "-".to_string(), |ip| ip.to_string()),
                            n.public_key,
                            if n.online { "yes" } else { "no" },
                            if n.tags.is_empty() {
                                "-".to_string()
                            } else {
                                n.tags.join(",")
                            },
                        )?;
                    }
                }
            }
            NodesCommand::Remove { name } => match store.remove_node(name, now)? {
                Some(id) => eprintln!("removed node {name} (id {id})"),
                None => bail!("no node named {name:?}"),
            },
            NodesCommand::Tag { name, changes } => {
                let (mut add, mut remove) = (Vec::new(), Vec::new());
                for change in changes {
                    let (list, tag) = match (change.strip_prefix('+'), change.strip_prefix('-')) {
                        (Some(t), _) => (&mut add, t),
                        (_, Some(t)) => (&mut remove, t),
                        _ => {
                            bail!("bad tag change {change:?}: write +TAG to add or -TAG to remove")
                        }
                    };
                    list.push(parse_tag(tag).map_err(anyhow::Error::msg)?);
                }
                match store.tag_node(name, &add, &remove)? {
                    Some(tags) => writeln!(
                        out,
                        "{name}: {}",
                        if tags.is_empty() {
                            "(no tags)".to_string()
                        } else {
                            tags.join(" ")
                        }
                    )?,
                    None => bail!("no node named {name:?}"),
                }
            }
        },
        Command::Policy { command } => crate::cli_policy::run(&store, command, &mut out)?,
    }
    out.flush()?;
    Ok(())
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn fmt_time(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_state_dir_works_after_subcommands() {
        let cli = Cli::try_parse_from([
            "overlay-coord",
            "keys",
            "create",
            "--reusable",
            "--expires",
            "24h",
            "--state-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert_eq!(cli.state_dir, Some(PathBuf::from("/tmp/x")));
        match cli.command {
            Command::Keys {
                command:
                    KeysCommand::Create {
                        reusable, expires, ..
                    },
            } => {
                assert!(reusable);
                assert_eq!(expires, Some(Duration::from_secs(86_400)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn global_flags_after_tag_changes_are_taken_back() {
        let cli = Cli::try_parse_from([
            "overlay-coord",
            "nodes",
            "tag",
            "db1",
            "+server",
            "-old",
            "--state-dir",
            "/tmp/x",
        ])
        .unwrap()
        .with_global_flags_after_tags()
        .unwrap();
        assert_eq!(cli.state_dir, Some(PathBuf::from("/tmp/x")));
        match cli.command {
            Command::Nodes {
                command: NodesCommand::Tag { name, changes },
            } => {
                assert_eq!(name, "db1");
                assert_eq!(changes, vec!["+server", "-old"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn database_is_global_and_taken_back_from_after_tag_changes() {
        let cli = Cli::try_parse_from([
            "overlay-coord",
            "nodes",
            "tag",
            "db1",
            "+server",
            "--database=postgres://coord@db/overlay",
        ])
        .unwrap()
        .with_global_flags_after_tags()
        .unwrap();
        assert_eq!(cli.database.as_deref(), Some("postgres://coord@db/overlay"));
        let cli = Cli::try_parse_from([
            "overlay-coord",
            "keys",
            "list",
            "--database",
            "host=/run/postgresql",
        ])
        .unwrap();
        assert_eq!(cli.database.as_deref(), Some("host=/run/postgresql"));
    }

    #[test]
    fn time_formats_as_utc() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00");
    }
}
