//! Checks on what a node sends at enrolment, and hostname de-duplication.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Longest DNS label, hence longest node name.
pub const MAX_HOSTNAME_LEN: usize = 63;

/// The small-order points of Curve25519 as X25519 u-coordinates (libsodium's
/// blocklist in `crypto_scalarmult_curve25519`): 0, 1, the two points of
/// order 8, and p − 1, p, p + 1. X25519 ignores bit 255, so each also has a
/// non-canonical twin with that bit set; [`is_low_order`] masks it.
const LOW_ORDER: [[u8; 32]; 7] = {
    let mut p_minus_1 = [0xff; 32];
    p_minus_1[0] = 0xec;
    p_minus_1[31] = 0x7f;
    let mut p = p_minus_1;
    p[0] = 0xed;
    let mut p_plus_1 = p_minus_1;
    p_plus_1[0] = 0xee;
    let mut one = [0; 32];
    one[0] = 1;
    [
        [0; 32],
        one,
        [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ],
        [
            0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83,
            0xef, 0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd,
            0xd0, 0x9f, 0x11, 0x57,
        ],
        p_minus_1,
        p,
        p_plus_1,
    ]
};

/// Whether `key` is a point of small order (in any of its encodings). A
/// Diffie-Hellman with such a key gives a result the other side can predict
/// without any private key, so it proves nothing and protects nothing.
pub fn is_low_order(key: &[u8; 32]) -> bool {
    let mut masked = *key;
    masked[31] &= 0x7f;
    LOW_ORDER.contains(&masked)
}

/// A WireGuard public key must be standard base64 of exactly 32 bytes and
/// not a low-order point. Returns the canonical encoding and the bytes.
pub fn public_key(text: &str) -> Result<(String, [u8; 32]), String> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| "public_key is not valid base64".to_string())?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("public_key must be 32 bytes, got {}", b.len()))?;
    if is_low_order(&bytes) {
        return Err("public_key is a low-order point, not a usable X25519 key".into());
    }
    Ok((STANDARD.encode(bytes), bytes))
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
        assert_eq!(public_key(&key), Ok((key.clone(), [7u8; 32])));
        assert!(public_key("not base64!").is_err());
        assert!(public_key(&STANDARD.encode([7u8; 31])).is_err());
        assert!(public_key("").is_err());
    }

    #[test]
    fn low_order_points_are_refused_in_every_encoding() {
        let mut refused = 0;
        for point in LOW_ORDER {
            for high_bit in [0, 0x80] {
                let mut key = point;
                key[31] |= high_bit;
                assert!(is_low_order(&key), "{key:02x?}");
                assert!(public_key(&STANDARD.encode(key)).is_err());
                refused += 1;
            }
        }
        assert_eq!(refused, 14);
        assert!(public_key(&STANDARD.encode([0u8; 32]))
            .unwrap_err()
            .contains("low-order"));
        // p − 1 is 2^255 − 20: little-endian ec ff … ff 7f.
        let mut p_minus_1 = [0xffu8; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        assert!(is_low_order(&p_minus_1));
        // Real keys pass: the base point 9 and a generated key.
        let mut nine = [0u8; 32];
        nine[0] = 9;
        assert!(!is_low_order(&nine));
        let real = overlay_proto::enrol::public_key(&[42u8; 32]);
        assert!(public_key(&STANDARD.encode(real)).is_ok());
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
