//! The lab itself: segments connect hosts, and nothing is left behind, even when a
//! test panics. Needs root; no overlay binaries.

use std::process::Command;

use overlay_tests::overlay::ping;
use overlay_tests::{lab_test, Lab};

/// The lab namespaces currently present whose names start with `prefix`.
fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn hosts_on_a_segment_reach_each_other_and_drop_removes_everything() {
    let lab = Lab::new().expect("lab");
    let prefix = lab.prefix().to_string();
    let dir = lab.dir().to_path_buf();
    {
        let lan = lab.segment("lan", "10.77.1.0/24").expect("segment");
        let a = lab.host("a").expect("host a");
        let b = lab.host("b").expect("host b");
        let ia = lab.attach(&a, &lan).expect("attach a");
        let ib = lab.attach(&b, &lan).expect("attach b");
        assert_eq!(ia.name, "eth0");
        assert_eq!(ia.ip.to_string(), "10.77.1.1");
        assert_eq!(ib.ip.to_string(), "10.77.1.2");
        let (sent, received) =
            ping(&lab, &a, ib.ip, &["-c", "3", "-i", "0.2", "-W", "2"]).expect("ping");
        assert_eq!((sent, received), (3, 3));

        // A process left running inside a namespace must not keep it alive.
        let mut sleeper = Command::new("sleep");
        sleeper.arg("600");
        std::mem::forget(lab.spawn(&b, "sleeper", sleeper).expect("spawn"));
        assert_eq!(namespaces_with(&prefix).len(), 3);
    }
    drop(lab);
    assert!(
        namespaces_with(&prefix).is_empty(),
        "left behind: {:?}",
        namespaces_with(&prefix)
    );
    assert!(!dir.exists(), "lab directory {} left behind", dir.display());
}

#[test]
fn a_panicking_lab_test_still_cleans_up() {
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        lab_test(|lab| {
            *prefix.lock().expect("lock") = lab.prefix().to_string();
            let a = lab.host("a")?;
            let b = lab.host("b")?;
            lab.link(&a, &b, "10.77.2.0/30")?;
            anyhow::bail!("deliberate failure");
        })
    });
    assert!(result.is_err(), "lab_test must panic when the test fails");
    let prefix = prefix.into_inner().expect("lock");
    assert!(prefix.starts_with("ovl") && prefix.len() == 7, "{prefix}");
    assert!(namespaces_with(&prefix).is_empty());
}

#[test]
fn point_to_point_links_are_numbered_1_and_2() {
    lab_test(|lab| {
        let a = lab.host("a")?;
        let b = lab.host("b")?;
        let (ia, ib) = lab.link(&a, &b, "10.77.3.0/30")?;
        assert_eq!(
            (ia.ip.to_string(), ib.ip.to_string()),
            ("10.77.3.1".into(), "10.77.3.2".into())
        );
        assert_eq!(ping(lab, &b, ia.ip, &["-c", "1", "-W", "2"])?, (1, 1));
        Ok(())
    });
}
