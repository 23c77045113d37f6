//! The mesh's DNS settings handed to every node (`ServerMsg::Dns`): the
//! domain its names live under, the address of the resolver each node runs
//! (reserved by [`crate::ipam::resolver_addr`]) and extra records from the
//! config file. The coordinator only checks and announces them; nodes answer.
//!
//! Names are checked as DNS host names (RFC 1123 labels: letters, digits,
//! hyphens, not at either end; 1–63 bytes each, 253 in all) and kept in
//! lowercase without a trailing dot, the form the node expects.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use overlay_proto::coord::{DnsConfig, DnsRecord, ServerMsg};

use crate::ipam;

/// The domain when none is configured. `.internal` is the top-level domain
/// ICANN reserved for private use (2024), so it never clashes with a
/// public name.
pub const DEFAULT_DOMAIN: &str = "overlay.internal";

/// Longest name, without the trailing dot (RFC 1035 §2.3.4: 255 bytes on
/// the wire).
pub const MAX_NAME_LEN: usize = 253;

/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Largest `Dns` message, in bytes of JSON. Every session's write buffer
/// keeps the capacity of the largest message it sent, and every node gets
/// this one, so it bounds per-session memory like the netmap parts do
/// (`Limits::netmap_part_bytes`): about 250 records of typical length.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// `text` as a domain: lowercase, without a trailing dot, checked.
pub fn domain(text: &str) -> Result<String, String> {
    let name = normalize(text);
    check_name(&name)?;
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{text}` is not a domain: its last label is all digits"
        ));
    }
    Ok(name)
}

/// A record's name, relative to `domain` (`grafana`) or under it
/// (`grafana.overlay.internal`), as the full name under `domain`: one form
/// that no node can read two ways.
pub fn record_name(domain: &str, text: &str) -> Result<String, String> {
    let name = normalize(text);
    if name == domain {
        return Err(format!(
            "`{text}` is the domain itself; a record names something under it"
        ));
    }
    let full = match name.strip_suffix(domain) {
        Some(rest) if rest.ends_with('.') => name,
        _ => format!("{name}.{domain}"),
    };
    check_name(&full).map_err(|e| format!("record `{text}`: {e}"))?;
    Ok(full)
}

/// The settings nodes get: `records` are (name, address) pairs as written in
/// the config, `domain` already checked by [`domain`].
pub fn config(
    domain: String,
    records: &[(String, Ipv4Addr)],
    network: Ipv4Net,
) -> Result<DnsConfig, String> {
    let resolver = ipam::resolver_addr(network).ok_or_else(|| {
        format!("the network {network} has no address to spare for the mesh resolver (a /30 or larger has)")
    })?;
    let records = records
        .iter()
        .map(|(name, ip)| {
            Ok(DnsRecord {
                name: record_name(&domain, name)?,
                ip: *ip,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let dns = DnsConfig {
        domain,
        resolver,
        records,
    };
    let size = message(Some(&dns)).len();
    if size > MAX_MESSAGE_BYTES {
        return Err(format!(
            "{} records make a {size}-byte message to every node; the limit is {MAX_MESSAGE_BYTES}",
            dns.records.len()
        ));
    }
    Ok(dns)
}

/// `ServerMsg::Dns` as the session sends it.
pub fn message(dns: Option<&DnsConfig>) -> String {
    // Serializing these plain structs cannot fail.
    serde_json::to_string(&ServerMsg::Dns { dns: dns.cloned() }).unwrap_or_default()
}

/// DNS is case-insensitive and a trailing dot only says "absolute".
fn normalize(text: &str) -> String {
    let text = text.trim();
    text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase()
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a name must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "`{name}` is {} bytes long; a DNS name has at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    for label in name.split('.') {
        check_label(label).map_err(|e| format!("`{name}`: {e}"))?;
    }
    Ok(())
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label (two dots in a row, or a leading dot)".into());
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label `{label}` is {} bytes long; a label has at most {MAX_LABEL_LEN}",
            label.len()
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "label `{label}` has `{c}`; only letters, digits and hyphens are allowed"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label `{label}` starts or ends with a hyphen"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_domain_is_valid() {
        assert_eq!(domain(DEFAULT_DOMAIN).unwrap(), DEFAULT_DOMAIN);
    }

    #[test]
    fn domains_are_lowercased_and_lose_a_trailing_dot() {
        assert_eq!(
            domain("Mesh.Example.Internal.").unwrap(),
            "mesh.example.internal"
        );
        assert_eq!(domain("corp-1.internal").unwrap(), "corp-1.internal");
        assert_eq!(domain("mesh").unwrap(), "mesh");
    }

    #[test]
    fn malformed_domains_are_refused_with_the_reason() {
        let refused = |text: &str, why: &str| {
            let e = domain(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        };
        refused("", "empty");
        refused(".", "empty");
        refused("a..internal", "empty label");
        refused(".internal", "empty label");
        refused("my_mesh.internal", "`_`");
        refused("mesh internal", "` `");
        refused("mésh.internal", "`é`");
        refused("-mesh.internal", "hyphen");
        refused("mesh-.internal", "hyphen");
        refused("mesh.10", "all digits");
        refused(&format!("{}.internal", "a".repeat(64)), "at most 63");
        let long = format!("{}.internal", vec!["a".repeat(61); 4].join("."));
        refused(&long, "at most 253");
        // The limits themselves pass.
        assert!(domain(&format!("{}.internal", "a".repeat(63))).is_ok());
        let exact = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
        assert_eq!(exact.len(), MAX_NAME_LEN);
        assert!(domain(&exact).is_ok());
        assert!(domain(&format!("{exact}b")).is_err());
    }

    #[test]
    fn record_names_relative_or_under_the_domain_become_full_names() {
        let d = "overlay.internal";
        assert_eq!(
            record_name(d, "grafana").unwrap(),
            "grafana.overlay.internal"
        );
        assert_eq!(
            record_name(d, "Grafana.Overlay.Internal.").unwrap(),
            "grafana.overlay.internal"
        );
        assert_eq!(record_name(d, "db.eu").unwrap(), "db.eu.overlay.internal");
        // A name that only ends like the domain is relative.
        assert_eq!(
            record_name(d, "myoverlay.internal").unwrap(),
            "myoverlay.internal.overlay.internal"
        );
    }

    #[test]
    fn bad_record_names_are_refused() {
        let d = "overlay.internal";
        assert!(record_name(d, "overlay.internal")
            .unwrap_err()
            .contains("domain itself"));
        assert!(record_name(d, "").unwrap_err().contains("empty label"));
        assert!(record_name(d, "graf ana").unwrap_err().contains("` `"));
        assert!(record_name(d, "*.apps").unwrap_err().contains("`*`"));
        let e = record_name(d, &vec!["a".repeat(63); 4].join(".")).unwrap_err();
        assert!(e.contains("at most 253"), "{e}");
    }

    #[test]
    fn config_carries_the_resolver_of_the_network_and_full_record_names() {
        let dns = config(
            DEFAULT_DOMAIN.into(),
            &[
                ("grafana".into(), ip("100.64.0.9")),
                ("www.overlay.internal".into(), ip("192.0.2.7")),
            ],
            net("100.64.0.0/10"),
        )
        .unwrap();
        assert_eq!(dns.resolver, ip("100.100.100.100"));
        assert_eq!(
            dns.records,
            vec![
                DnsRecord {
                    name: "grafana.overlay.internal".into(),
                    ip: ip("100.64.0.9")
                },
                DnsRecord {
                    name: "www.overlay.internal".into(),
                    ip: ip("192.0.2.7")
                },
            ]
        );
        let small = config(DEFAULT_DOMAIN.into(), &[], net("10.0.0.0/24")).unwrap();
        assert_eq!(small.resolver, ip("10.0.0.254"));
    }

    #[test]
    fn config_is_refused_for_a_network_without_room_or_too_many_records() {
        let e = config(DEFAULT_DOMAIN.into(), &[], net("10.0.0.0/31")).unwrap_err();
        assert!(e.contains("10.0.0.0/31"), "{e}");
        let many: Vec<_> = (0..1000)
            .map(|i| (format!("host-{i}"), Ipv4Addr::new(10, 0, 0, 1)))
            .collect();
        let e = config(DEFAULT_DOMAIN.into(), &many, net("100.64.0.0/10")).unwrap_err();
        assert!(e.contains("1000 records"), "{e}");
        assert!(config(DEFAULT_DOMAIN.into(), &many[..200], net("100.64.0.0/10")).is_ok());
    }

    #[test]
    fn message_is_the_dns_server_message() {
        let dns = config(DEFAULT_DOMAIN.into(), &[], net("100.64.0.0/10")).unwrap();
        let parsed: ServerMsg = serde_json::from_str(&message(Some(&dns))).unwrap();
        assert_eq!(parsed, ServerMsg::Dns { dns: Some(dns) });
        let parsed: ServerMsg = serde_json::from_str(&message(None)).unwrap();
        assert_eq!(parsed, ServerMsg::Dns { dns: None });
    }
}
