//! The TUN's mesh IPv6 address, set the way the daemon sets it, in a network
//! namespace of the test's own (needs root, as the lab tests do): the address
//! is there with the mesh prefix, usable without duplicate address
//! detection (a TUN has no ARP), the prefix routes to the interface, a new address
//! replaces the old, and IPv6 is switched on for the interface when the
//! host's default had it off.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use overlayd::dataplane::tun_device::{self, Ipv6Error};

const NAME: &str = "ovl6test0";

/// Kernel flag of an address still in duplicate address detection.
const IFA_F_TENTATIVE: u32 = 0x40;
/// How soon a TUN's address must be usable: well under the one second
/// duplicate address detection takes at least (RFC 4862, one probe).
const DAD_SKIPPED_WITHIN: Duration = Duration::from_millis(500);

/// This thread's IPv6 addresses on `NAME`: (address, prefix length, flags).
fn addresses() -> Vec<(Ipv6Addr, u8, u32)> {
    let text = std::fs::read_to_string("/proc/thread-self/net/if_inet6").expect("if_inet6");
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(5) != Some(&NAME) {
                return None;
            }
            let addr = u128::from_str_radix(f[0], 16).ok()?;
            let prefix = u8::from_str_radix(f[2], 16).ok()?;
            let flags = u32::from_str_radix(f[4], 16).ok()?;
            Some((Ipv6Addr::from(addr), prefix, flags))
        })
        .collect()
}

/// Whether this thread's IPv6 routing table sends `prefix/len` to `NAME`.
fn routes(prefix: Ipv6Addr, len: u8) -> bool {
    let text = std::fs::read_to_string("/proc/thread-self/net/ipv6_route").expect("ipv6_route");
    let want = format!("{:032x} {len:02x}", u128::from(prefix));
    text.lines()
        .any(|l| l.starts_with(&want) && l.split_whitespace().last() == Some(NAME))
}

/// Runs `test` on a thread in a new network namespace (the namespace goes
/// away with the thread, and the TUN with it).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The TUN as overlayd makes it (IPv4 mesh address, MTU 1280), in a
/// namespace whose new interfaces start with IPv6 off; inside a runtime.
fn new_tun() -> tun_device::Tun {
    std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").expect("sysctl");
    tun_device::create(
        NAME,
        Ipv4Addr::new(100, 64, 0, 5),
        "100.64.0.0/10".parse().unwrap(),
        1280,
    )
    .expect("TUN")
}

fn in_own_netns(test: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) on this thread only; no memory is involved.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {} (the test needs root)",
            std::io::Error::last_os_error()
        );
        test();
    })
    .join()
    .expect("test thread");
}

#[test]
fn the_tun_gets_its_mesh_ipv6_address_and_the_prefix_route() {
    in_own_netns(|| {
        let rt = runtime();
        let _guard = rt.enter();
        let tun = new_tun();
        assert!(addresses().is_empty());

        let net: Ipv6Addr = "fd7a:115c:a1e0::".parse().unwrap();
        let first: Ipv6Addr = "fd7a:115c:a1e0::6440:5".parse().unwrap();
        tun_device::set_ipv6(NAME, tun.mtu, None, Some((first, 48))).expect("set");
        let have = addresses();
        assert!(
            have.iter().any(|&(a, p, _)| (a, p) == (first, 48)),
            "{have:?}"
        );
        // The kernel clears "tentative" from its address work right away on
        // a TUN (IFF_NOARP: no duplicate address detection, whose one probe
        // alone would take a second); poll briefly for it.
        let deadline = Instant::now() + DAD_SKIPPED_WITHIN;
        let flags = loop {
            let flags = addresses()
                .iter()
                .find(|(a, ..)| *a == first)
                .map(|&(.., f)| f)
                .expect("address");
            if flags & IFA_F_TENTATIVE == 0 || Instant::now() > deadline {
                break flags;
            }
            std::thread::yield_now();
        };
        assert_eq!(
            flags & IFA_F_TENTATIVE,
            0,
            "still tentative after {DAD_SKIPPED_WITHIN:?}: duplicate address detection ran"
        );
        assert!(routes(net, 48), "the mesh prefix routes to the TUN");

        // A new prefix replaces the address (and its route).
        let other_net: Ipv6Addr = "fd00:1:2::".parse().unwrap();
        let second: Ipv6Addr = "fd00:1:2::6440:5".parse().unwrap();
        tun_device::set_ipv6(NAME, tun.mtu, Some((first, 48)), Some((second, 48)))
            .expect("replace");
        let have = addresses();
        assert!(have.iter().any(|&(a, ..)| a == second), "{have:?}");
        assert!(!have.iter().any(|&(a, ..)| a == first), "{have:?}");
        assert!(routes(other_net, 48) && !routes(net, 48));

        // Setting what is there already is no error; taking it away works.
        tun_device::set_ipv6(NAME, tun.mtu, Some((second, 48)), Some((second, 48))).expect("again");
        tun_device::set_ipv6(NAME, tun.mtu, Some((second, 48)), None).expect("remove");
        assert!(!addresses().iter().any(|&(a, ..)| a == second));

        // Below IPv6's minimum MTU the kernel would not keep it: refused up front.
        let low = tun_device::set_ipv6(NAME, 1200, None, Some((first, 48)));
        assert!(matches!(low, Err(Ipv6Error::Mtu { .. })), "{low:?}");
        drop(tun);
    });
}

#[test]
fn a_host_that_keeps_ipv6_off_on_the_interface_is_refused_in_one_clear_error() {
    in_own_netns(|| {
        // A mount namespace of this thread's own, where the interface's
        // disable_ipv6 switch is read-only: IPv6 stays off whatever we try.
        // SAFETY: unshare(2) on this thread only.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNS): {}",
            std::io::Error::last_os_error()
        );
        let run = |args: &[&str]| {
            let out = std::process::Command::new("mount")
                .args(args)
                .output()
                .expect("mount");
            assert!(out.status.success(), "mount {args:?}: {out:?}");
        };
        run(&["--make-rprivate", "/"]);
        let rt = runtime();
        let _guard = rt.enter();
        let tun = new_tun();
        let switch = format!("/proc/sys/net/ipv6/conf/{NAME}/disable_ipv6");
        run(&["--bind", &switch, &switch]);
        run(&["-o", "remount,ro,bind", &switch]);

        let addr: Ipv6Addr = "fd7a:115c:a1e0::6440:5".parse().unwrap();
        let refused = tun_device::set_ipv6(NAME, tun.mtu, None, Some((addr, 48)));
        let Err(e @ Ipv6Error::Disabled { .. }) = refused else {
            panic!("expected Disabled, got {refused:?}");
        };
        assert!(e.to_string().contains(NAME), "{e}");
        assert!(addresses().is_empty());
        drop(tun);
    });
}
