//! overlay's own programs in the lab: a running coordination server, running node
//! daemons, and `overlayctl` against them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use overlay_proto::api::{PathKind, PeerStatus, Status};

use crate::bin;
use crate::lab::{Host, Lab, Segment};
use crate::process::{self, Proc};
use crate::wait::{fatal, wait_until, Wait};

/// The coordinator's HTTP/WebSocket port in the lab.
pub const COORD_PORT: u16 = 8080;
/// The TUN interface name every lab daemon uses (each is in its own namespace).
pub const MESH_IFACE: &str = "ovl0";
/// How long a freshly started program may take to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `RUST_LOG` for the programs under test, unless the environment sets one.
fn rust_log() -> String {
    std::env::var("RUST_LOG")
        .unwrap_or_else(|_| "info,overlayd=debug,overlay_coord=debug".to_string())
}

/// A running `overlay-coord serve` on a lab host.
pub struct Coordinator {
    pub host: Host,
    pub ip: Ipv4Addr,
    /// `http://IP:PORT`, what daemons are given as `--coordinator`.
    pub url: String,
    /// The server's IPv6 address, when it is dual-stack
    /// ([`Coordinator::start_dual_stack`]).
    pub ip6: Option<Ipv6Addr>,
    /// `http://[IP6]:PORT`, for daemons on IPv6-only sites.
    pub url6: Option<String>,
    pub state_dir: PathBuf,
    pub proc: Proc,
}

impl Coordinator {
    /// Starts the server on `ip` (an address of `host`) and waits until it listens.
    /// `extra` is appended to the `serve` arguments.
    pub fn start(
        lab: &Lab,
        host: &Host,
        ip: Ipv4Addr,
        extra: &[&str],
    ) -> anyhow::Result<Coordinator> {
        let state_dir = lab.subdir(&format!("{}-state", host.name))?;
        Coordinator::start_in(lab, host, ip, state_dir, extra)
    }

    /// As [`Coordinator::start`], with the state in `state_dir` (replicas
    /// on one SQLite file share one).
    pub fn start_in(
        lab: &Lab,
        host: &Host,
        ip: Ipv4Addr,
        state_dir: PathBuf,
        extra: &[&str],
    ) -> anyhow::Result<Coordinator> {
        Coordinator::launch(lab, host, ip, None, state_dir, extra)
    }

    /// A dual-stack server: HTTP/WebSocket on every address of `host` (`[::]`,
    /// both families), and STUN/TURN announced on `ip` and `ip6`, one
    /// `--public-addr` per family.
    pub fn start_dual_stack(
        lab: &Lab,
        host: &Host,
        ip: Ipv4Addr,
        ip6: Ipv6Addr,
        extra: &[&str],
    ) -> anyhow::Result<Coordinator> {
        let state_dir = lab.subdir(&format!("{}-state", host.name))?;
        Coordinator::launch(lab, host, ip, Some(ip6), state_dir, extra)
    }

    fn launch(
        lab: &Lab,
        host: &Host,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
        state_dir: PathBuf,
        extra: &[&str],
    ) -> anyhow::Result<Coordinator> {
        let listen = match ip6 {
            Some(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, COORD_PORT)),
            None => SocketAddr::from((ip, COORD_PORT)),
        };
        let mut cmd = Command::new(bin("overlay-coord")?);
        cmd.arg("serve")
            .args(["--listen", &listen.to_string()])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--public-addr", &ip.to_string()]);
        if let Some(ip6) = ip6 {
            cmd.args(["--public-addr", &ip6.to_string()]);
        }
        cmd.arg("--allow-http")
            // The lab's "internet" is documentation space (203.0.113.0/24),
            // which the embedded TURN server refuses to relay to by default.
            .arg("--turn-allow-private")
            .args(extra)
            .env("RUST_LOG", rust_log())
            .env("NO_COLOR", "1");
        let mut proc = lab.spawn(host, &format!("coord-{}", host.name), cmd)?;
        wait_listening(lab, host, &mut proc, COORD_PORT, "overlay-coord")?;
        Ok(Coordinator {
            host: host.clone(),
            ip,
            url: format!("http://{}", SocketAddr::from((ip, COORD_PORT))),
            ip6,
            url6: ip6.map(|ip6| format!("http://{}", SocketAddr::from((ip6, COORD_PORT)))),
            state_dir,
            proc,
        })
    }

    /// Runs an admin subcommand of `overlay-coord` against this server's state.
    pub fn admin(&self, lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
        let program = bin("overlay-coord")?;
        let mut cmd = lab.command(&self.host, program);
        cmd.args(args).arg("--state-dir").arg(&self.state_dir);
        process::checked(&mut cmd)
    }

    /// `keys create --reusable`: a key any number of nodes can enrol with.
    pub fn create_key(&self, lab: &Lab) -> anyhow::Result<String> {
        let out = self.admin(lab, &["keys", "create", "--reusable"])?;
        let key = out.trim();
        ensure!(
            !key.is_empty() && !key.contains(char::is_whitespace),
            "`overlay-coord keys create` should print only the key, printed {out:?}"
        );
        Ok(key.to_string())
    }

    /// `nodes list --json`.
    pub fn nodes(&self, lab: &Lab) -> anyhow::Result<serde_json::Value> {
        let out = self.admin(lab, &["nodes", "list", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("`nodes list --json` printed {out:?}"))
    }

    /// `nodes remove NAME`.
    pub fn remove_node(&self, lab: &Lab, name: &str) -> anyhow::Result<()> {
        self.admin(lab, &["nodes", "remove", name]).map(|_| ())
    }
}

/// One `overlayd` on a lab host, which can be stopped and started again with the
/// same state.
pub struct Daemon {
    pub host: Host,
    pub name: String,
    pub coordinator: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub proc: Option<Proc>,
    /// More `overlayd up` arguments, e.g. `--ca-cert FILE`.
    pub extra_args: Vec<String>,
    /// More environment for `overlayd`, e.g. `OVERLAY_TUN_OFFLOAD=0`.
    pub extra_env: Vec<(String, String)>,
    starts: u32,
}

impl Daemon {
    /// A daemon for `host` named `name`, not started yet.
    pub fn new(lab: &Lab, host: &Host, name: &str, coordinator: &str) -> anyhow::Result<Daemon> {
        let dir = lab.subdir(&format!("{name}-node"))?;
        Ok(Daemon {
            host: host.clone(),
            name: name.to_string(),
            coordinator: coordinator.to_string(),
            state_dir: dir.join("state"),
            socket: dir.join("overlayd.sock"),
            proc: None,
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            starts: 0,
        })
    }

    /// Starts `overlayd up` (with `auth_key` on first enrolment, `None` to reuse the
    /// stored credential) and waits until its local API answers `status`.
    pub fn start(&mut self, lab: &Lab, auth_key: Option<&str>) -> anyhow::Result<()> {
        self.launch(lab, auth_key)?;
        self.wait_ready().map(|_| ())
    }

    /// Spawns `overlayd up` without waiting for it, so that several daemons can be
    /// started at one moment (timing tests); follow with [`Daemon::wait_ready`].
    pub fn launch(&mut self, lab: &Lab, auth_key: Option<&str>) -> anyhow::Result<()> {
        ensure!(self.proc.is_none(), "{} is already running", self.name);
        let mut cmd = Command::new(bin("overlayd")?);
        cmd.arg("up")
            .args(["--coordinator", &self.coordinator])
            .args(["--hostname", &self.name])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--interface", MESH_IFACE])
            .arg("--socket")
            .arg(&self.socket)
            .env("RUST_LOG", rust_log())
            .env("NO_COLOR", "1");
        if let Some(key) = auth_key {
            cmd.args(["--auth-key", key]);
        }
        // Lab daemons never touch the machine's DNS (systemd-resolved is the
        // host's, not the namespace's); a test that wants a mode says so.
        if !self.extra_args.iter().any(|a| a == "--dns") {
            cmd.args(["--dns", "off"]);
        }
        cmd.args(&self.extra_args);
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        self.starts += 1;
        // Each start gets its own log so a restart's output is not mixed in.
        let label = format!("overlayd-{}-{}", self.name, self.starts);
        self.proc = Some(lab.spawn(&self.host, &label, cmd)?);
        Ok(())
    }

    /// Waits until a launched daemon's local API answers `status`, and returns it.
    pub fn wait_ready(&mut self) -> anyhow::Result<Status> {
        let what = format!("overlayd {} to answer status", self.name);
        wait_until(START_TIMEOUT, &what, || {
            self.proc
                .as_mut()
                .with_context(|| format!("{} was not launched", self.name))
                .map_err(fatal)?
                .ensure_running()
                .map_err(fatal)?;
            Ok(self.status()?)
        })
    }

    /// Stops the daemon with SIGTERM and checks it exits cleanly and promptly.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let mut proc = self
            .proc
            .take()
            .with_context(|| format!("{} is not running", self.name))?;
        let (status, killed) = proc.stop_within(Duration::from_secs(10))?;
        ensure!(
            !killed,
            "overlayd {} ignored SIGTERM for 10s and was killed",
            self.name
        );
        Ok(status)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc
            .as_mut()
            .is_some_and(|p| matches!(p.try_exit(), Ok(None)))
    }

    /// For a [`wait_until`] condition: a daemon that exited ends the wait
    /// at once (nothing it waits for can happen any more).
    pub fn alive(&mut self) -> Result<(), Wait> {
        if self.is_running() {
            Ok(())
        } else {
            Err(fatal(anyhow::anyhow!("overlayd {} exited", self.name)))
        }
    }

    /// Runs `overlayctl --socket S args…` (from the root namespace: the socket is a
    /// file, and overlayctl makes no network traffic).
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bin("overlayctl")?);
        cmd.arg("--socket").arg(&self.socket).args(args);
        process::output(&mut cmd)
    }

    /// `overlayctl … --json` parsed as `T`; a failure carries overlayctl's stderr.
    pub fn ctl_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> anyhow::Result<T> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ctl(&all)?;
        if !out.status.success() {
            bail!(
                "overlayctl {} on {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&text)
            .with_context(|| format!("overlayctl {} --json printed {text:?}", args.join(" ")))
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        self.ctl_json(&["status"])
    }

    pub fn peers(&self) -> anyhow::Result<Vec<PeerStatus>> {
        self.ctl_json(&["peers"])
    }

    /// Wakes the idle peer `peer` as a user would: one `overlayctl ping`.
    /// New peers start idle (no ICE until the first packet), so a test that
    /// waits for a path sends this first. Whether it is answered is not the
    /// point: the request alone wakes both sides.
    pub fn wake(&self, peer: &str) -> anyhow::Result<()> {
        self.ctl(&["ping", "-c", "1", "-W", "0.5", peer])?;
        Ok(())
    }
}

/// Waits until `proc` (a server started on `host`) listens on TCP `port`;
/// fails at once if it exits.
pub fn wait_listening(
    lab: &Lab,
    host: &Host,
    proc: &mut Proc,
    port: u16,
    what: &str,
) -> anyhow::Result<()> {
    let port = port.to_string();
    wait_until(START_TIMEOUT, &format!("{what} to listen"), || {
        proc.ensure_running().map_err(fatal)?;
        if tcp_listening(lab, host, &port)? {
            Ok(())
        } else {
            Err(Wait::NotYet(format!("nothing listens on TCP port {port}")))
        }
    })
}

/// Whether something in `host` listens on TCP `port` (checked with `ss` inside the
/// namespace, so no packet is sent anywhere).
pub fn tcp_listening(lab: &Lab, host: &Host, port: &str) -> anyhow::Result<bool> {
    let out = lab.exec(host, "ss", &["-Hltn", &format!("sport = :{port}")])?;
    Ok(!out.trim().is_empty())
}

/// Whether something in `host` listens on UDP `port` (checked with `ss`, like
/// [`tcp_listening`]).
pub fn udp_listening(lab: &Lab, host: &Host, port: &str) -> anyhow::Result<bool> {
    let out = lab.exec(host, "ss", &["-Hlun", &format!("sport = :{port}")])?;
    Ok(!out.trim().is_empty())
}

/// Runs ping(8) in `host` and returns `(transmitted, received)` from its summary.
/// An IPv6 `target` is pinged with `ping -6`.
pub fn ping(
    lab: &Lab,
    host: &Host,
    target: impl Into<IpAddr>,
    args: &[&str],
) -> anyhow::Result<(u32, u32)> {
    let target = target.into();
    let mut all: Vec<&str> = Vec::new();
    if target.is_ipv6() {
        all.push("-6");
    }
    all.extend_from_slice(args);
    let target = target.to_string();
    all.push(&target);
    let out = lab.output(host, "ping", &all)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_ping_summary(&text).with_context(|| {
        format!(
            "ping {} from {}: no summary in output {text:?} (stderr {:?}); {}",
            all.join(" "),
            host.name,
            String::from_utf8_lossy(&out.stderr),
            network_state(lab, host)
        )
    })
}

/// `ip addr` and `ip route` of `host`, for error messages about unreachable targets.
pub fn network_state(lab: &Lab, host: &Host) -> String {
    let show = |args: &[&str]| {
        lab.exec(host, "ip", args)
            .unwrap_or_else(|e| format!("{e:#}"))
            .trim_end()
            .replace('\n', "; ")
    };
    format!(
        "addresses in {}: [{}], routes: [{}], IPv6 routes: [{}]",
        host.name,
        show(&["-br", "addr"]),
        show(&["route"]),
        show(&["-6", "route"])
    )
}

/// `(transmitted, received)` from ping(8)'s `N packets transmitted, M received` line.
pub fn parse_ping_summary(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut parts = line.split(',');
    let sent = parts.next()?.split_whitespace().next()?.parse().ok()?;
    let received = parts.next()?.split_whitespace().next()?.parse().ok()?;
    Some((sent, received))
}

/// A coordinator and two enrolled, running nodes `a` and `b` on one LAN segment.
/// Fields drop in order: the daemons stop before the coordinator.
pub struct LanPair {
    pub a_host: Host,
    pub a: Daemon,
    pub b_host: Host,
    pub b: Daemon,
    pub coord_host: Host,
    pub coord: Coordinator,
    /// The segment all three are on; more hosts may be attached to it.
    pub lan: Segment,
}

impl LanPair {
    /// `subnet` like `10.77.2.0/24`: the coordinator gets `.1`, a and b the next.
    pub fn start(lab: &Lab, subnet: &str) -> anyhow::Result<LanPair> {
        Self::start_with(lab, subnet, &[], |_| {})
    }

    /// As [`LanPair::start`], with more `serve` arguments for the coordinator and
    /// a say in each daemon's arguments and environment before it starts.
    pub fn start_with(
        lab: &Lab,
        subnet: &str,
        coord_args: &[&str],
        configure: impl Fn(&mut Daemon),
    ) -> anyhow::Result<LanPair> {
        let lan = lab.segment("lan", subnet)?;
        Self::start_on(lab, lan, coord_args, configure)
    }

    /// As [`LanPair::start`] on a dual-stack LAN (`subnet6` a /64, see
    /// [`Lab::segment6`]): the nodes have both families on the LAN. The
    /// coordinator is reached over IPv4.
    pub fn start_dual_stack(lab: &Lab, subnet: &str, subnet6: &str) -> anyhow::Result<LanPair> {
        let lan = lab.segment6("lan", subnet, subnet6)?;
        Self::start_on(lab, lan, &[], |_| {})
    }

    fn start_on(
        lab: &Lab,
        lan: Segment,
        coord_args: &[&str],
        configure: impl Fn(&mut Daemon),
    ) -> anyhow::Result<LanPair> {
        let coord_host = lab.host("coord")?;
        let coord_ip = lab.attach(&coord_host, &lan)?.ip;
        let coord = Coordinator::start(lab, &coord_host, coord_ip, coord_args)?;
        let key = coord.create_key(lab)?;
        let a_host = lab.host("a")?;
        lab.attach(&a_host, &lan)?;
        let b_host = lab.host("b")?;
        lab.attach(&b_host, &lan)?;
        let mut a = Daemon::new(lab, &a_host, "a", &coord.url)?;
        configure(&mut a);
        a.start(lab, Some(&key))?;
        let mut b = Daemon::new(lab, &b_host, "b", &coord.url)?;
        configure(&mut b);
        b.start(lab, Some(&key))?;
        Ok(LanPair {
            a_host,
            a,
            b_host,
            b,
            coord_host,
            coord,
            lan,
        })
    }
}

/// Waits until `d` shows `peer` on a path of kind `want`; returns how long it
/// took. An idle peer is woken with a ping (see [`Daemon::wake`]), unless idle
/// is what is awaited.
pub fn wait_path(
    d: &mut Daemon,
    peer: &str,
    want: overlay_proto::api::PathKind,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    let what = format!("{} to see {peer} on {want:?}", d.name);
    wait_until(timeout, &what, || {
        d.alive()?;
        let peers = d.peers()?;
        match peers.iter().find(|p| p.name == peer) {
            Some(p) if p.path_kind == want => Ok(()),
            Some(p) if p.path_kind == PathKind::Idle => {
                d.wake(peer)?;
                Err(Wait::NotYet("idle: pinged it to wake it".into()))
            }
            Some(p) => Err(Wait::NotYet(format!("path is {}", p.path))),
            None => Err(Wait::NotYet(format!("{peer} not listed"))),
        }
    })?;
    Ok(started.elapsed())
}

/// Sends `bytes` of TCP from `from` to `to_ip:5001` on `to` with `tcp_blast`
/// (path in `blast`) and checks both ends saw the same length and hash.
pub fn bulk_transfer(
    lab: &Lab,
    blast: &str,
    from: &Host,
    to: &Host,
    to_ip: impl Into<IpAddr>,
    bytes: u64,
) -> anyhow::Result<()> {
    let listen = SocketAddr::new(to_ip.into(), 5001).to_string();
    let mut cmd = Command::new(blast);
    cmd.args(["serve", &listen]);
    let mut server = lab.spawn(to, &format!("tcp-blast-{}", to.name), cmd)?;
    server.wait_for_log("ready on", Duration::from_secs(10))?;
    let count = bytes.to_string();
    let sent = lab.output(from, blast, &["send", &listen, &count])?;
    ensure!(
        sent.status.success(),
        "tcp_blast send: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_string();
    server.wait_exit(Duration::from_secs(60))?;
    let log = server.log();
    let received = log.lines().last().unwrap_or_default().trim().to_string();
    ensure!(
        sent.starts_with(&format!("{count} ")) && received == sent,
        "{} sent {sent:?}, {} received {received:?}",
        from.name,
        to.name
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary_is_parsed() {
        let text = "PING 100.64.0.3 (100.64.0.3) 56(84) bytes of data.\n\
                    64 bytes from 100.64.0.3: icmp_seq=1 ttl=64 time=0.5 ms\n\n\
                    --- 100.64.0.3 ping statistics ---\n\
                    20 packets transmitted, 19 received, 5% packet loss, time 3804ms\n";
        assert_eq!(parse_ping_summary(text), Some((20, 19)));
        let errors = "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2ms\n";
        assert_eq!(parse_ping_summary(errors), Some((3, 0)));
        assert_eq!(parse_ping_summary("ping: unknown host"), None);
    }
}
