//! Mesh names end to end (issue #11): three nodes and a lab resolver.
//!
//! ```text
//!   coord (.1)   upstream (.2)       a (.3)               b (.4)   c (.5)   d (.6, joins later)
//!                dnsmasq:            --dns resolv-conf
//!                outside.test        resolv.conf → upstream
//!      └────────────┴──────────────────┴────────────────────┴────────┴──────── 10.77.31.0/24
//! ```
//!
//! From a: `dig @RESOLVER` answers peers' names (UDP and TCP), their reverse
//! names and NXDOMAIN; with the managed resolv.conf, `getent hosts` and
//! `ping NAME` work and names outside the mesh still reach the old upstream.
//! A node that joins resolves within a second; a removed one stops resolving
//! within a second. Garbage queries are counted and the resolver keeps
//! answering. The original resolv.conf comes back byte for byte on
//! `overlayctl down`, on SIGTERM, and on the next start after a SIGKILL.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use overlay_tests::process::signal;
use overlay_tests::{lab_test, wait_until, Coordinator, Daemon, Host, Lab, Wait};

const DOMAIN: &str = "overlay.internal";
const PROBE: &str = env!("CARGO_BIN_EXE_udp_probe");
/// How long fresh nodes on one LAN may take to see each other.
const SETTLE: Duration = Duration::from_secs(30);
/// What the issue promises for a join or a removal to show in names.
const PROPAGATION: Duration = Duration::from_secs(1);
/// What a name outside the mesh resolves to at the lab's upstream.
const OUTSIDE: &str = "192.0.2.7";

fn original(upstream: Ipv4Addr) -> String {
    format!(
        "# the lab host's own resolv.conf\nnameserver {upstream}\nsearch lab.test\noptions timeout:1 attempts:2\n"
    )
}

/// `dig` from `host` with short timeouts; its stdout.
fn dig(
    lab: &Lab,
    host: &Host,
    resolver: impl Into<IpAddr>,
    args: &[&str],
) -> anyhow::Result<String> {
    let resolver = resolver.into();
    let server = format!("@{resolver}");
    let mut all = vec![server.as_str(), "+time=1", "+tries=1"];
    all.extend_from_slice(args);
    let out = lab.output(host, "dig", &all)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `dig +short NAME` (or other args): the first answer line, trimmed.
fn short(
    lab: &Lab,
    host: &Host,
    resolver: impl Into<IpAddr>,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    Ok(dig(lab, host, resolver, &all)?
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned())
}

fn fqdn(name: &str) -> String {
    format!("{name}.{DOMAIN}")
}

/// Waits until `dig +short NAME` on `host` gives `want` ("" for no answer).
fn wait_answer(
    lab: &Lab,
    host: &Host,
    resolver: Ipv4Addr,
    name: &str,
    want: &str,
    within: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    wait_until(within, &format!("{name} to resolve to {want:?}"), || {
        let got = short(lab, host, resolver, &[name])?;
        if got == want {
            Ok(())
        } else {
            Err(Wait::NotYet(format!("answer {got:?}")))
        }
    })?;
    Ok(t0.elapsed())
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Waits until the namespace's resolv.conf is (`managed`) or is not ours.
fn wait_file(path: &std::path::Path, resolver: Ipv4Addr, managed: bool) -> anyhow::Result<()> {
    let line = format!("nameserver {resolver}");
    wait_until(Duration::from_secs(10), "resolv.conf to change", || {
        if read(path)?.contains(&line) == managed {
            Ok(())
        } else {
            Err(Wait::NotYet(read(path)?))
        }
    })
}

fn start_node(
    lab: &Lab,
    lan: &overlay_tests::Segment,
    coord: &Coordinator,
    key: &str,
    name: &str,
    args: &[&str],
) -> anyhow::Result<Daemon> {
    let host = lab.host(name)?;
    lab.attach(&host, lan)?;
    let mut d = Daemon::new(lab, &host, name, &coord.url)?;
    d.extra_args = args.iter().map(|a| a.to_string()).collect();
    d.start(lab, Some(key))?;
    Ok(d)
}

#[test]
fn peers_resolve_by_name_and_the_hosts_resolv_conf_comes_back_intact() {
    lab_test(|lab| {
        let lan = lab.segment("lan", "10.77.31.0/24")?;
        let coord_host = lab.host("coord")?;
        let coord_ip = lab.attach(&coord_host, &lan)?.ip;
        let coord = Coordinator::start(lab, &coord_host, coord_ip, &[])?;
        let key = coord.create_key(lab)?;

        // The "ISP" resolver names in its original resolv.conf.
        let upstream = lab.host("isp")?;
        let upstream_ip = lab.attach(&upstream, &lan)?.ip;
        let outside: Ipv4Addr = OUTSIDE.parse()?;
        let _dnsmasq = overlay_tests::dnsmasq::start(
            lab,
            &upstream,
            upstream_ip,
            &[("outside.test", outside)],
        )?;

        let a_host = lab.host("a")?;
        lab.attach(&a_host, &lan)?;
        let before = original(upstream_ip);
        let resolv_conf = lab.resolv_conf(&a_host, &before)?;
        let mut a = Daemon::new(lab, &a_host, "a", &coord.url)?;
        a.extra_args = vec!["--dns".into(), "resolv-conf".into()];
        a.start(lab, Some(&key))?;
        let b = start_node(lab, &lan, &coord, &key, "b", &[])?;
        let c = start_node(lab, &lan, &coord, &key, "c", &[])?;
        let (b_ip, c_ip) = (b.status()?.mesh_ip, c.status()?.mesh_ip);

        let resolver = wait_until(SETTLE, "a to serve the mesh's DNS with b and c", || {
            let dns = a
                .status()?
                .dns
                .ok_or_else(|| Wait::NotYet("no DNS settings yet".into()))?;
            let names = a.peers()?.len();
            if names == 2 {
                Ok(dns.resolver)
            } else {
                Err(Wait::NotYet(format!("{names} peers")))
            }
        })?;
        let status = a.status()?.dns.context("dns status")?;
        ensure!(status.domain == DOMAIN, "domain {}", status.domain);
        ensure!(status.mode == "resolv-conf", "mode {}", status.mode);
        println!("resolver {resolver}, host: {}", status.host);

        // dig: A over UDP and TCP, PTR, NXDOMAIN.
        wait_answer(
            lab,
            &a_host,
            resolver,
            &fqdn("b"),
            &b_ip.to_string(),
            SETTLE,
        )?;
        let tcp = short(lab, &a_host, resolver, &["+tcp", &fqdn("c")])?;
        ensure!(tcp == c_ip.to_string(), "TCP query for c: {tcp:?}");
        let ptr = short(lab, &a_host, resolver, &["-x", &b_ip.to_string()])?;
        ensure!(ptr == format!("{}.", fqdn("b")), "PTR of b: {ptr:?}");
        let nx = dig(lab, &a_host, resolver, &[&fqdn("nobody")])?;
        ensure!(nx.contains("status: NXDOMAIN"), "unknown name: {nx}");
        let edns = dig(lab, &a_host, resolver, &["+edns=0", &fqdn("b")])?;
        ensure!(edns.contains("udp: 1232"), "EDNS0 answer: {edns}");

        // The managed resolv.conf: every program resolves mesh names, and
        // names outside the mesh still go to the old upstream.
        let managed = read(&resolv_conf)?;
        ensure!(
            managed.contains(&format!("nameserver {resolver}"))
                && managed.contains(&format!("search {DOMAIN} lab.test")),
            "resolv.conf not managed: {managed}"
        );
        // `getent hosts` asks for IPv6 first, so the IPv4 checks ask for
        // IPv4 alone, and the mesh IPv6 address is checked on its own.
        let getent = lab.exec(&a_host, "getent", &["ahostsv4", &fqdn("b")])?;
        ensure!(getent.starts_with(&b_ip.to_string()), "getent: {getent:?}");
        let b_ip6 = b.status()?.mesh_ip6.context("b has no mesh IPv6 address")?;
        let getent6 = lab.exec(&a_host, "getent", &["ahostsv6", &fqdn("b")])?;
        ensure!(
            getent6.starts_with(&b_ip6.to_string()),
            "getent ahostsv6: {getent6:?}"
        );
        let ptr6 = short(lab, &a_host, resolver, &["-x", &b_ip6.to_string()])?;
        ensure!(
            ptr6 == format!("{}.", fqdn("b")),
            "PTR of b's IPv6: {ptr6:?}"
        );
        // The resolver answers at its IPv6 address too, over UDP and TCP.
        let resolver6 = status.resolver6.context("no IPv6 resolver address")?;
        let aaaa = short(lab, &a_host, resolver6, &["AAAA", &fqdn("b")])?;
        ensure!(
            aaaa == b_ip6.to_string(),
            "AAAA of b from {resolver6}: {aaaa:?}"
        );
        let tcp6 = short(lab, &a_host, resolver6, &["+tcp", &fqdn("c")])?;
        ensure!(
            tcp6 == c_ip.to_string(),
            "TCP query for c to {resolver6}: {tcp6:?}"
        );
        // Anything but port 53 there is refused as at the IPv4 address.
        let ping = lab.output(
            &a_host,
            "ping",
            &["-6", "-c", "1", "-W", "2", &resolver6.to_string()],
        )?;
        let ping = String::from_utf8_lossy(&ping.stdout);
        ensure!(
            ping.contains(&format!("From {resolver6}")) && ping.contains("Destination unreachable"),
            "ping -6 {resolver6}: {ping}"
        );
        let by_search = lab.exec(&a_host, "getent", &["ahostsv4", "c"])?;
        ensure!(
            by_search.starts_with(&c_ip.to_string()),
            "getent c: {by_search:?}"
        );
        let ping = lab.output(&a_host, "ping", &["-c", "1", "-W", "3", &fqdn("b")])?;
        ensure!(ping.status.success(), "ping b by name: {ping:?}");
        let outside = lab.exec(&a_host, "getent", &["hosts", "www.outside.test"])?;
        ensure!(outside.starts_with(OUTSIDE), "outside name: {outside:?}");
        let query: serde_json::Value = a.ctl_json(&["dns", "query", &fqdn("b")])?;
        ensure!(
            query["answers"].to_string().contains(&b_ip.to_string()),
            "overlayctl dns query: {query}"
        );
        let named = a
            .peers()?
            .into_iter()
            .any(|p| p.dns_name.as_deref() == Some(&format!("{}.", fqdn("b"))));
        ensure!(named, "overlayctl peers shows no DNS name for b");

        // A node that joins resolves within a second; a removed one stops.
        let d = start_node(lab, &lan, &coord, &key, "d", &[])?;
        let joined = wait_answer(
            lab,
            &a_host,
            resolver,
            &fqdn("d"),
            &d.status()?.mesh_ip.to_string(),
            PROPAGATION,
        )?;
        println!("join → d resolves on a after {joined:?}");
        coord.remove_node(lab, "c")?;
        let removed = wait_answer(lab, &a_host, resolver, &fqdn("c"), "", PROPAGATION)?;
        println!("removal → c stops resolving on a after {removed:?}");

        // Garbage is counted and the resolver keeps answering.
        let target = format!("{resolver}:53");
        let junk = lab.output(&a_host, PROBE, &["garbage", &target, "2000"])?;
        ensure!(junk.status.success(), "udp_probe garbage: {junk:?}");
        wait_answer(
            lab,
            &a_host,
            resolver,
            &fqdn("b"),
            &b_ip.to_string(),
            Duration::from_secs(5),
        )?;
        let bad = a.status()?.dns.context("dns status")?.bad;
        println!("garbage: {bad} malformed queries counted");
        ensure!(bad > 0, "no malformed query was counted");

        // Restored byte for byte: `overlayctl down`, SIGTERM, SIGKILL + restart.
        a.ctl(&["down"])?;
        let mut proc = a.proc.take().context("a's process")?;
        proc.wait_exit(Duration::from_secs(10))?;
        ensure!(
            read(&resolv_conf)? == before,
            "not restored after overlayctl down"
        );

        a.start(lab, None)?;
        wait_file(&resolv_conf, resolver, true)?;
        a.stop()?;
        ensure!(read(&resolv_conf)? == before, "not restored after SIGTERM");

        a.start(lab, None)?;
        wait_file(&resolv_conf, resolver, true)?;
        let mut proc = a.proc.take().context("a's process")?;
        signal(proc.pid(), "KILL")?;
        proc.wait_exit(Duration::from_secs(10))?;
        ensure!(
            read(&resolv_conf)? != before,
            "a SIGKILLed daemon cannot have restored the file"
        );
        // The next start puts the original back first (here with DNS off, so
        // nothing is rewritten after).
        a.extra_args = vec!["--dns".into(), "off".into()];
        a.start(lab, None)?;
        wait_until(
            Duration::from_secs(10),
            "the next start to restore resolv.conf",
            || {
                if read(&resolv_conf)? == before {
                    Ok(())
                } else {
                    Err(Wait::NotYet(read(&resolv_conf)?))
                }
            },
        )?;
        if !a
            .proc
            .as_ref()
            .is_some_and(|p| p.log().contains("restored"))
        {
            bail!("the restart did not say it restored resolv.conf");
        }
        drop((b, d));
        Ok(())
    })
}
