//! Checks on what a node sends at enrolment, and hostname de-duplication.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Longest DNS label, hence longest node name.
pub const MAX_HOSTNAME_LEN: usize = 63;

/// A WireGuard public key must be standard base64 of exactly 32 bytes.
/// Returns the canonical encoding.
pub fn public_key(text: &str) -> Result<String, String> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| "public_key is not valid base64".to_string())?;
    if bytes.len() != 32 {
        return Err(format!("public_key must be 32 bytes, got {}", bytes.len()));
    }
    Ok(STANDARD.encode(bytes))
}

/// A hostname must be a DNS label: 1–63 of `a-z 0-9 -`, not starting or
/// ending with `-`. Upper case is folded to lower case.
pub fn hostname(text: &str) -> Result<String, String> {
    let name = text.trim().to_ascii_lowercase();
    if name.is_empty() {
        return Err("hostname is empty".into());
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(format!(
            "hostname is longer than {MAX_HOSTNAME_LEN} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("hostname may only contain letters, digits and '-'".into());
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("hostname must not start or end with '-'".into());
    }
    Ok(name)
}

/// The `n`-th candidate name for `base` (`n` ≥ 2): `base-n`, with `base`
/// shortened so the result still fits in a DNS label.
pub fn suffixed(base: &str, n: u32) -> String {
    let suffix = format!("-{n}");
    let keep = MAX_HOSTNAME_LEN
        .saturating_sub(suffix.len())
        .min(base.len());
    let stem = base[..keep].trim_end_matches('-');
    format!("{stem}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_must_be_32_bytes_of_base64() {
        let key = STANDARD.encode([7u8; 32]);
        assert_eq!(public_key(&key), Ok(key.clone()));
        assert!(public_key("not base64!").is_err());
        assert!(public_key(&STANDARD.encode([7u8; 31])).is_err());
        assert!(public_key("").is_err());
    }

    #[test]
    fn hostnames_are_dns_labels() {
        assert_eq!(hostname("Web-1"), Ok("web-1".into()));
        assert!(hostname("").is_err());
        assert!(hostname("-web").is_err());
        assert!(hostname("web-").is_err());
        assert!(hostname("web.example").is_err());
        assert!(hostname("wéb").is_err());
        assert!(hostname(&"a".repeat(63)).is_ok());
        assert!(hostname(&"a".repeat(64)).is_err());
    }

    #[test]
    fn suffixed_names_stay_within_a_label() {
        assert_eq!(suffixed("web", 2), "web-2");
        let long = "a".repeat(63);
        let s = suffixed(&long, 12);
        assert_eq!(s.len(), 63);
        assert!(s.ends_with("-12"));
        assert!(hostname(&suffixed(&format!("{}-b", "a".repeat(59)), 2)).is_ok());
    }
}
