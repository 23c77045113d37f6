//! Topologies of network namespaces: hosts, LAN segments, point-to-point links and
//! NAT routers.
//!
//! Naming: every namespace is `<prefix>-<name>` with a random `ovlXXXX` prefix per
//! lab (at most 15 characters in all). Interfaces are created directly inside their
//! namespaces (`ip link add … netns A type veth peer … netns B`), so the root
//! namespace never sees them and `ip netns del` removes them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, ensure, Context};
use rand::Rng;

pub use crate::lab6::{firewall6_ruleset, Subnet6};
use crate::process::{self, tail, Proc};

/// One lab at a time per test process: the machine has two cores and the daemons
/// under test are timing-sensitive.
static LAB_LOCK: Mutex<()> = Mutex::new(());

/// Longest host name: `ovlXXXX-` leaves 7 of the 15 characters a name may have.
const MAX_NAME: usize = 7;

/// Set to keep the lab directory (logs, state dirs, captures) after the test.
pub const KEEP_ENV: &str = "OVERLAY_KEEP_LAB";

/// File in a lab directory holding the pid of the test process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// An IPv4 subnet from which the lab numbers interfaces: `base + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/len`.
    pub fn parse(text: &str) -> anyhow::Result<Subnet> {
        let (addr, len) = text
            .split_once('/')
            .with_context(|| format!("subnet {text:?} has no /prefix"))?;
        let base: Ipv4Addr = addr.parse().with_context(|| format!("subnet {text:?}"))?;
        let prefix: u8 = len.parse().with_context(|| format!("subnet {text:?}"))?;
        ensure!(
            (8..=30).contains(&prefix),
            "subnet {text:?}: prefix must be 8..=30"
        );
        Ok(Subnet { base, prefix })
    }

    /// The `n`th address of the subnet.
    pub fn host(&self, n: u32) -> anyhow::Result<Ipv4Addr> {
        let size = 1u32 << (32 - u32::from(self.prefix));
        ensure!(n > 0 && n < size - 1, "host number {n} outside {self}");
        Ok(Ipv4Addr::from(u32::from(self.base) + n))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// A network namespace standing for one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The short name given by the test (`a`, `coord`).
    pub name: String,
    /// The namespace: `<prefix>-<name>`.
    pub ns: String,
}

/// An interface the lab gave a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Name inside the host's namespace (`eth0`, `eth1`, …, in attach order).
    pub name: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// The interface's IPv6 address, on a dual-stack segment.
    pub ip6: Option<Ipv6Addr>,
}

/// A LAN: a bridge in its own "switch" namespace, one veth port per attached host.
#[derive(Debug)]
pub struct Segment {
    pub name: String,
    /// The switch namespace holding `br0`.
    pub ns: String,
    pub subnet: Subnet,
    /// The segment's IPv6 /64 when it is dual-stack ([`Lab::segment6`]).
    pub subnet6: Option<Subnet6>,
    pub(crate) next_host: Cell<u32>,
    next_port: Cell<u32>,
    /// IPv6 prefixes reachable through routers on this segment (site LANs),
    /// and each router's address here: every host attached gets the routes.
    pub(crate) routes6: RefCell<Vec<(Subnet6, Ipv6Addr)>>,
    /// The namespaces attached so far, for routes added later.
    pub(crate) members: RefCell<Vec<String>>,
}

/// How a NAT router between a site LAN and the public segment behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping (Linux masquerade keeps the source port), with
    /// address-and-port-dependent filtering: a "port-restricted cone", the common
    /// home router. Hole punching works.
    Cone,
    /// A new, random external port for every destination (`masquerade
    /// fully-random`): server-reflexive candidates are useless to peers.
    Symmetric,
    /// Forwards TCP only: no UDP leaves the site at all.
    UdpBlocked,
    /// No IPv4 leaves the site: an IPv6-only access network (the LAN keeps its
    /// private IPv4, which goes nowhere). Only with [`Lab::ipv6_only_site`].
    Ipv6Only,
}

/// A site behind a NAT router: `site LAN ── router ── public segment`.
///
/// ```text
///   site host ── eth0   [site LAN 10.77.N.0/24]   eth1 ── router ── eth0 [public]
/// ```
#[derive(Debug)]
pub struct Site {
    pub name: String,
    pub kind: NatKind,
    pub router: Host,
    /// The router's address on the public segment, which the site's traffic wears.
    pub wan: Iface,
    /// The router's address on the site LAN: the hosts' default gateway.
    pub gateway: Iface,
    pub lan: Segment,
}

/// A set of namespaces and processes, all removed when the `Lab` is dropped.
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    /// Every namespace created, in creation order.
    namespaces: RefCell<Vec<String>>,
    /// Every process log, to print when a test fails.
    logs: RefCell<Vec<(String, PathBuf)>>,
    /// Interfaces handed out per namespace, to name the next `ethN`.
    ifaces: RefCell<HashMap<String, u32>>,
    segments: Cell<u32>,
    // Declared last so the lock is released only after `Drop::drop` has run.
    _lock: MutexGuard<'static, ()>,
}

/// Where `ip netns exec` finds a namespace's own /etc files.
const NETNS_ETC: &str = "/etc/netns";

/// Runs one lab test: creates the [`Lab`], runs `test`, and on failure prints the
/// tail of every process log before failing with the error.
///
/// Processes created inside `test` are dropped (stopped) when it returns, before
/// the namespaces are deleted.
pub fn lab_test(test: impl FnOnce(&Lab) -> anyhow::Result<()>) {
    let lab = match Lab::new() {
        Ok(lab) => lab,
        Err(err) => panic!("{err:#}"),
    };
    if let Err(err) = test(&lab) {
        lab.dump_logs();
        drop(lab);
        panic!("{err:#}");
    }
}

impl Lab {
    /// A new, empty lab. Fails unless running as root.
    pub fn new() -> anyhow::Result<Lab> {
        ensure_root()?;
        let lock = LAB_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        reap_stale_labs();
        let (prefix, dir) = claim_prefix()?;
        Ok(Lab {
            prefix,
            dir,
            namespaces: RefCell::default(),
            logs: RefCell::default(),
            ifaces: RefCell::default(),
            segments: Cell::new(0),
            _lock: lock,
        })
    }

    /// The random `ovlXXXX` prefix of this lab's names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A directory for this lab's logs, state and captures.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A subdirectory of [`Lab::dir`], created.
    pub fn subdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path)
    }

    fn add_namespace(&self, name: &str) -> anyhow::Result<String> {
        ensure!(
            !name.is_empty()
                && name.len() <= MAX_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "lab name {name:?} must be 1..={MAX_NAME} lowercase letters or digits"
        );
        let ns = format!("{}-{name}", self.prefix);
        ensure!(
            !self.namespaces.borrow().contains(&ns),
            "lab already has a namespace named {name:?}"
        );
        process::checked(Command::new("ip").args(["netns", "add", &ns]))?;
        self.namespaces.borrow_mut().push(ns.clone());
        // IPv6 on, as on any machine today: every interface gets a link-local
        // address (and global ones on dual-stack segments). Set before any
        // interface exists, so all inherit it. Deterministic: no duplicate
        // address detection (the lab numbers addresses uniquely, and a
        // tentative address would make the first packets depend on timing),
        // no router solicitations and no autoconfiguration from stray router
        // advertisements: only the addresses and routes the lab gives.
        process::checked(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_ra=0",
            "net.ipv6.conf.default.accept_ra=0",
            "net.ipv6.conf.all.router_solicitations=0",
            "net.ipv6.conf.default.router_solicitations=0",
        ]))
        .with_context(|| format!("turning IPv6 on in {ns} (the lab needs IPv6 in the kernel)"))?;
        self.ip(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A new host: a namespace with loopback up and nothing else. IPv6 is on,
    /// as on any machine today: its interfaces get link-local addresses, and
    /// global ones on dual-stack segments ([`Lab::segment6`]).
    pub fn host(&self, name: &str) -> anyhow::Result<Host> {
        let ns = self.add_namespace(name)?;
        Ok(Host {
            name: name.to_string(),
            ns,
        })
    }

    /// A new LAN segment numbered from `subnet` (e.g. `10.77.1.0/24`). Lab subnets
    /// exist only inside the lab's namespaces.
    pub fn segment(&self, name: &str, subnet: &str) -> anyhow::Result<Segment> {
        let subnet = Subnet::parse(subnet)?;
        let index = self.segments.get();
        self.segments.set(index + 1);
        let ns = self.add_namespace(&format!("sw{index}"))?;
        // Without multicast snooping the bridge floods neighbour discovery to
        // every port, whether or not a host's MLD report got there first.
        self.ip(
            &ns,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        self.ip(&ns, &["link", "set", "br0", "up"])?;
        Ok(Segment {
            name: name.to_string(),
            ns,
            subnet,
            subnet6: None,
            next_host: Cell::new(1),
            next_port: Cell::new(0),
            routes6: RefCell::default(),
            members: RefCell::default(),
        })
    }

    fn next_iface(&self, ns: &str) -> String {
        let mut counts = self.ifaces.borrow_mut();
        let count = counts.entry(ns.to_string()).or_insert(0);
        let name = format!("eth{count}");
        *count += 1;
        name
    }

    /// Plugs `host` into `segment` with the segment's next free address.
    pub fn attach(&self, host: &Host, segment: &Segment) -> anyhow::Result<Iface> {
        let n = segment.next_host.get();
        segment.next_host.set(n + 1);
        self.attach_at(host, segment, n)
    }

    /// Plugs `host` into `segment` with address number `n` of its subnet.
    pub fn attach_at(&self, host: &Host, segment: &Segment, n: u32) -> anyhow::Result<Iface> {
        let ip = segment.subnet.host(n)?;
        let port = format!("p{}", segment.next_port.get());
        segment.next_port.set(segment.next_port.get() + 1);
        let name = self.next_iface(&host.ns);
        self.veth(&host.ns, &name, &segment.ns, &port)?;
        self.ip(&segment.ns, &["link", "set", &port, "master", "br0"])?;
        self.ip(&segment.ns, &["link", "set", &port, "up"])?;
        self.address(&host.ns, &name, ip, segment.subnet.prefix)?;
        let ip6 = match segment.subnet6 {
            Some(subnet6) => {
                let ip6 = subnet6.host(n)?;
                self.address6(&host.ns, &name, ip6)?;
                for (prefix, via) in segment.routes6.borrow().iter() {
                    self.route6(&host.ns, *prefix, *via)?;
                }
                Some(ip6)
            }
            None => None,
        };
        segment.members.borrow_mut().push(host.ns.clone());
        Ok(Iface {
            name,
            ip,
            prefix: segment.subnet.prefix,
            ip6,
        })
    }

    /// A point-to-point link between two hosts, numbered `.1` (a) and `.2` (b).
    pub fn link(&self, a: &Host, b: &Host, subnet: &str) -> anyhow::Result<(Iface, Iface)> {
        let subnet = Subnet::parse(subnet)?;
        let (name_a, name_b) = (self.next_iface(&a.ns), self.next_iface(&b.ns));
        self.veth(&a.ns, &name_a, &b.ns, &name_b)?;
        let (ip_a, ip_b) = (subnet.host(1)?, subnet.host(2)?);
        self.address(&a.ns, &name_a, ip_a, subnet.prefix)?;
        self.address(&b.ns, &name_b, ip_b, subnet.prefix)?;
        Ok((
            Iface {
                name: name_a,
                ip: ip_a,
                prefix: subnet.prefix,
                ip6: None,
            },
            Iface {
                name: name_b,
                ip: ip_b,
                prefix: subnet.prefix,
                ip6: None,
            },
        ))
    }

    fn veth(&self, ns_a: &str, name_a: &str, ns_b: &str, name_b: &str) -> anyhow::Result<()> {
        process::checked(Command::new("ip").args([
            "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b, "netns",
            ns_b,
        ]))
        .map(|_| ())
    }

    fn address(&self, ns: &str, dev: &str, ip: Ipv4Addr, prefix: u8) -> anyhow::Result<()> {
        self.ip(ns, &["addr", "add", &format!("{ip}/{prefix}"), "dev", dev])?;
        self.ip(ns, &["link", "set", dev, "up"])?;
        Ok(())
    }

    /// `ip -n NS args…`
    pub(crate) fn ip(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        process::checked(Command::new("ip").arg("-n").arg(ns).args(args))
    }

    /// Sets `host`'s default route.
    pub fn default_route(&self, host: &Host, via: Ipv4Addr) -> anyhow::Result<()> {
        self.ip(
            &host.ns,
            &["route", "add", "default", "via", &via.to_string()],
        )
        .map(|_| ())
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: &Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.ns]).arg(program);
        cmd
    }

    /// Runs `program args…` in `host` and returns its output, whatever the status.
    pub fn output(
        &self,
        host: &Host,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> anyhow::Result<Output> {
        process::output(self.command(host, program).args(args))
    }

    /// Runs `program args…` in `host`; a nonzero exit is an error. Returns stdout.
    pub fn exec(
        &self,
        host: &Host,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> anyhow::Result<String> {
        process::checked(self.command(host, program).args(args))
    }

    /// Starts a long-lived process in `host`, logging to `<lab dir>/<label>.log`.
    /// The log is printed if the test fails.
    pub fn spawn(&self, host: &Host, label: &str, cmd: Command) -> anyhow::Result<Proc> {
        let log = self.dir.join(format!("{label}.log"));
        let mut wrapped = self.command(host, cmd.get_program());
        wrapped.args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        let proc = Proc::spawn(label, wrapped, &log)?;
        let mut logs = self.logs.borrow_mut();
        if !logs.iter().any(|(_, path)| path == &log) {
            logs.push((label.to_string(), log));
        }
        Ok(proc)
    }

    /// Gives `host` its own `/etc/resolv.conf`: `ip netns exec` bind-mounts
    /// `/etc/netns/<ns>/resolv.conf` over it for every command run in the
    /// host. Removed with the lab. Returns the file's path (as seen from
    /// outside the host).
    pub fn resolv_conf(&self, host: &Host, text: &str) -> anyhow::Result<PathBuf> {
        let dir = Path::new(NETNS_ETC).join(&host.ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("resolv.conf");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Loads an nftables ruleset into `host`'s namespace.
    pub fn nft(&self, host: &Host, ruleset: &str) -> anyhow::Result<()> {
        let file = self.dir.join(format!("nft-{}.conf", host.name));
        std::fs::write(&file, ruleset).with_context(|| format!("writing {}", file.display()))?;
        let path = file.to_string_lossy().into_owned();
        self.exec(host, "nft", &["-f", &path]).map(|_| ())
    }

    /// Turns IPv4 forwarding on in `host` (its namespace only).
    pub fn enable_forwarding(&self, host: &Host) -> anyhow::Result<()> {
        self.exec(host, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])
            .map(|_| ())
    }

    /// A site behind a NAT router of the given kind, connected to `public`.
    ///
    /// The router is host `<name>gw` (so `name` has at most 5 characters); its WAN
    /// is `eth0` on `public`, its LAN `eth1` at `.1` of `10.77.<100+i>.0/24`. Add
    /// machines with [`Lab::site_host`].
    pub fn nat_site(&self, name: &str, kind: NatKind, public: &Segment) -> anyhow::Result<Site> {
        ensure!(
            kind != NatKind::Ipv6Only,
            "site {name:?}: an IPv6-only site is made with Lab::ipv6_only_site"
        );
        self.site(name, kind, public, false)
    }

    pub(crate) fn site(
        &self,
        name: &str,
        kind: NatKind,
        public: &Segment,
        v6: bool,
    ) -> anyhow::Result<Site> {
        ensure!(name.len() + 2 <= MAX_NAME, "site name {name:?} is too long");
        let router = self.host(&format!("{name}gw"))?;
        let wan = self.attach(&router, public)?;
        let index = self.segments.get();
        let lan_name = format!("{name}-lan");
        let lan_v4 = format!("10.77.{}.0/24", 100 + index);
        let lan = if v6 {
            self.segment6(
                &lan_name,
                &lan_v4,
                &format!("2001:db8:{}::/64", 100 + index),
            )?
        } else {
            self.segment(&lan_name, &lan_v4)?
        };
        let gateway = self.attach_at(&router, &lan, 1)?;
        lan.next_host.set(10);
        self.enable_forwarding(&router)?;
        self.nft(&router, &nat_ruleset(kind, &wan.name, &gateway.name))?;
        if let (Some(prefix), Some(via)) = (lan.subnet6, wan.ip6) {
            self.exec(
                &router,
                "sysctl",
                &["-qw", "net.ipv6.conf.all.forwarding=1"],
            )?;
            let rules = firewall6_ruleset(kind, &wan.name, &gateway.name);
            let file = self.dir.join(format!("nft6-{}.conf", router.name));
            std::fs::write(&file, rules).with_context(|| format!("writing {}", file.display()))?;
            self.exec(&router, "nft", &["-f", &file.to_string_lossy()])?;
            self.announce6(public, prefix, via, &router)?;
        }
        Ok(Site {
            name: name.to_string(),
            kind,
            router,
            wan,
            gateway,
            lan,
        })
    }

    /// A machine on `site`'s LAN, routed through its NAT router (with no IPv4
    /// default route on an IPv6-only site: IPv4 beyond the LAN fails at once,
    /// as there).
    pub fn site_host(&self, site: &Site, name: &str) -> anyhow::Result<(Host, Iface)> {
        let host = self.host(name)?;
        let iface = self.attach(&host, &site.lan)?;
        if site.kind != NatKind::Ipv6Only {
            self.default_route(&host, site.gateway.ip)?;
        }
        if let Some(gateway6) = site.gateway.ip6 {
            self.default_route6(&host, gateway6)?;
        }
        Ok((host, iface))
    }

    /// The "rest of the Internet" beyond `public`: a host `inet` on it that forwards
    /// nothing. Give public machines a default route via its address (see
    /// [`Lab::default_route`]) and, like real servers, they can send to any address:
    /// what is not on the segment (a peer's private 10.77.x host candidate, say)
    /// goes to `inet` and vanishes silently, instead of failing the send with
    /// "network unreachable" — which some servers (coturn) treat as fatal for the
    /// whole TURN allocation.
    ///
    /// ```text
    ///   coord ── public 203.0.113.0/24 ── inet (IPv4 forwarding off: drops)
    /// ```
    ///
    /// On a dual-stack segment the same holds for IPv6 (see [`Lab::default_route6`]).
    pub fn upstream(&self, public: &Segment) -> anyhow::Result<Iface> {
        let host = self.host("inet")?;
        let iface = self.attach(&host, public)?;
        // A new namespace starts with forwarding off; say so rather than rely on it.
        self.exec(
            &host,
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=0",
                "net.ipv6.conf.all.forwarding=0",
            ],
        )?;
        Ok(iface)
    }

    /// Prints the tail of every process log to stderr (the test's output).
    pub fn dump_logs(&self) {
        eprintln!("==== lab {} ({}) ====", self.prefix, self.dir.display());
        for (label, path) in self.logs.borrow().iter() {
            let text = std::fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
            eprintln!(
                "---- {label}: last {LOG_TAIL_LINES} lines of {} ----",
                path.display()
            );
            eprintln!("{}", tail(&text, LOG_TAIL_LINES));
        }
        eprintln!("==== end of lab logs ====");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os(KEEP_ENV).is_some() {
            // Without an owner the directory is never reaped by a later run.
            let _ = std::fs::remove_file(self.dir.join(OWNER_FILE));
            eprintln!("lab {}: kept {}", self.prefix, self.dir.display());
            remove_lab(&self.prefix, &self.namespaces.borrow(), None);
        } else {
            remove_lab(&self.prefix, &self.namespaces.borrow(), Some(&self.dir));
        }
    }
}

/// A fresh random prefix and its directory, created atomically so two labs (of
/// this or another test process) never share one.
fn claim_prefix() -> anyhow::Result<(String, PathBuf)> {
    for _ in 0..32 {
        let prefix = format!("ovl{:04x}", rand::thread_rng().gen::<u16>());
        let dir = std::env::temp_dir().join(&prefix);
        let taken = process::checked(Command::new("ip").args(["netns", "list"]))?
            .lines()
            .any(|l| l.starts_with(&format!("{prefix}-")));
        if taken {
            continue;
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                let owner = dir.join(OWNER_FILE);
                std::fs::write(&owner, std::process::id().to_string())
                    .with_context(|| format!("writing {}", owner.display()))?;
                return Ok((prefix, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no free lab prefix after 32 tries; stale /tmp/ovl* directories or namespaces?")
}

/// Removes one lab's namespaces (killing what runs in them) and its directory.
fn remove_lab(prefix: &str, namespaces: &[String], dir: Option<&Path>) {
    for ns in namespaces.iter().rev() {
        // A process left in the namespace would keep it (and its interfaces)
        // alive after `ip netns del`.
        if let Ok(pids) = process::checked(Command::new("ip").args(["netns", "pids", ns])) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                let _ = process::signal(pid, "KILL");
            }
        }
        if let Err(err) = process::checked(Command::new("ip").args(["netns", "del", ns])) {
            eprintln!("lab {prefix} cleanup: {err:#}");
        }
        // Per-namespace /etc files (see `Lab::resolv_conf`).
        let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC).join(ns));
    }
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Cleans up after test processes that died without running their `Drop`
/// (SIGKILL, Ctrl-C): a lab directory whose owner process is gone, and the
/// namespaces with its prefix. Labs of live processes are left alone.
fn reap_stale_labs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let Ok(listing) = process::checked(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_lab = name.len() == 7
            && name.starts_with("ovl")
            && name[3..].bytes().all(|b| b.is_ascii_hexdigit());
        if !is_lab {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(entry.path().join(OWNER_FILE)) else {
            continue;
        };
        let alive = owner
            .trim()
            .parse::<u32>()
            .map(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .unwrap_or(false);
        if alive {
            continue;
        }
        let namespaces: Vec<String> = listing
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|ns| ns.starts_with(&format!("{name}-")))
            .map(str::to_string)
            .collect();
        eprintln!(
            "lab: removing stale lab {name} ({} namespaces)",
            namespaces.len()
        );
        remove_lab(&name, &namespaces, Some(&entry.path()));
    }
}

/// The router's nftables rules for `kind`. `wan` faces the public segment, `lan`
/// the site. Unsolicited traffic from the WAN is never forwarded in, nor accepted
/// by the router itself.
///
/// The `input` chain matters for hole punching, as on any real router's firewall:
/// without it, a peer's first probe to the router's mapped port (sent before the
/// site host has sent anything to that peer) reaches the router's own stack, and
/// conntrack confirms an entry `peer:Q → wan:P`. The site host's own packet to
/// `peer:Q` then clashes with that entry, and masquerade gives it a new source
/// port: the mapping stops being endpoint-independent exactly for the peer being
/// punched to. Dropped in `input`, the probe's entry is never confirmed.
pub fn nat_ruleset(kind: NatKind, wan: &str, lan: &str) -> String {
    let (masquerade, outbound) = match kind {
        NatKind::Cone => (
            "masquerade",
            format!("iifname \"{lan}\" oifname \"{wan}\" accept"),
        ),
        NatKind::Symmetric => (
            "masquerade fully-random",
            format!("iifname \"{lan}\" oifname \"{wan}\" accept"),
        ),
        NatKind::UdpBlocked => (
            "masquerade",
            format!("iifname \"{lan}\" oifname \"{wan}\" meta l4proto tcp accept"),
        ),
        NatKind::Ipv6Only => ("masquerade", format!("# {lan} to {wan}: nothing")),
    };
    format!(
        "table ip ovl_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"{wan}\" {masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        {outbound}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname \"{wan}\" ct state new drop
    }}
}}
"
    )
}

/// The lab needs root for namespaces; say so plainly instead of failing obscurely.
fn ensure_root() -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u32>().ok());
    match euid {
        Some(0) => Ok(()),
        Some(uid) => bail!(
            "the end-to-end lab needs root (network namespaces); running as uid {uid}. \
             Run the suite with sudo (see README)"
        ),
        None => bail!("cannot tell the effective uid from /proc/self/status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_numbers_hosts_inside_the_range() {
        let net = Subnet::parse("10.77.1.0/24").expect("valid");
        assert_eq!(net.host(1).expect("first"), Ipv4Addr::new(10, 77, 1, 1));
        assert_eq!(net.host(254).expect("last"), Ipv4Addr::new(10, 77, 1, 254));
        assert!(net.host(0).is_err());
        assert!(net.host(255).is_err());
        assert_eq!(net.to_string(), "10.77.1.0/24");
        assert!(Subnet::parse("10.77.1.0").is_err());
        assert!(Subnet::parse("10.77.1.0/99").is_err());
    }

    #[test]
    fn nat_rules_differ_only_where_the_kinds_do() {
        let cone = nat_ruleset(NatKind::Cone, "eth0", "eth1");
        assert!(cone.contains("oifname \"eth0\" masquerade\n"));
        assert!(cone.contains("policy drop"));
        assert!(cone.contains("iifname \"eth0\" ct state new drop"));
        let sym = nat_ruleset(NatKind::Symmetric, "eth0", "eth1");
        assert!(sym.contains("masquerade fully-random"));
        let blocked = nat_ruleset(NatKind::UdpBlocked, "eth0", "eth1");
        assert!(blocked.contains("meta l4proto tcp accept"));
        let v6_only = nat_ruleset(NatKind::Ipv6Only, "eth0", "eth1");
        assert!(v6_only.contains("policy drop"));
        assert!(!v6_only.contains("iifname \"eth1\" oifname \"eth0\""));
    }
}
