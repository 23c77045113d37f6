//! Both configuration files, parsed and resolved as `overlayd up` and
//! `overlay-coord serve` do, without touching the file system.

use std::path::Path;

use overlay_coord::config as coord;
use overlayd::config as daemon;

/// `overlayd.toml`. The auth key is given as a flag so that no `auth_key_file`
/// the fuzzer names is ever read. Errors are one line, as the user sees them.
pub fn daemon_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/overlay/overlayd.toml");
    match daemon::FileConfig::parse(path, text) {
        Ok(file) => {
            let flags = daemon::Overrides {
                auth_key: Some("fuzz".into()),
                ..Default::default()
            };
            if let Ok(config) = daemon::Config::resolve(file, flags) {
                assert!((576..=9000).contains(&config.mtu));
            }
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
    }
}

/// `coord.toml`, and the text as a `turn.ttl` duration.
pub fn coord_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = coord::parse_duration(text);
    let path = Path::new("/etc/overlay/coord.toml");
    match coord::parse_file(path, text) {
        Ok(file) => {
            if let Ok(config) = coord::Config::resolve(Some((path, file)), Default::default()) {
                assert!(config.limits.max_sessions >= 1);
                assert!(config.turn.ttl.as_secs() >= 1);
            }
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
    }
}
