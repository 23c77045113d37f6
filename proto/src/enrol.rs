//! Proof of possession at enrolment: a node shows it holds the private half of
//! the public key it registers, bound to one fresh server challenge.
//!
//! ```text
//!  node                                         overlay-coord
//!   │ POST /v1/register/challenge ─────────────▶ │ challenge c (CHALLENGE_LEN bytes),
//!   │ ◀──────────── { challenge, server_key } ── │ ephemeral X25519 key E derived from c
//!   │ proof = nonce ‖ crypto_box(node secret → E, transcript)
//!   │ POST /v1/register { …, challenge, proof } ▶ │ checks c, derives E again, opens the
//!   │                                             │ box with (E secret, claimed node key)
//! ```
//!
//! The box opens only with the node's private key or with E's, and E's never
//! leaves the server; so a valid proof for a claimed public key came from its
//! holder. The transcript names the challenge (no replay), the public key, the
//! auth key's hash and the hostname, so a proof cannot be moved to another request.
//!
//! The challenge is opaque to the node: it sends it back as received. The
//! server keeps no state per challenge; the layout it uses (issue time, random
//! bytes, a MAC) is overlay-coord's business (its `challenge` module).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use crypto_box::aead::Aead;
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use sha2::{Digest, Sha256};

use crate::coord::{ChallengeResponse, RegisterRequest};

/// Domain separator at the start of every transcript. v2: challenges grew
/// from 32 to [`CHALLENGE_LEN`] bytes when the server stopped storing them.
pub const TRANSCRIPT_DOMAIN: &[u8] = b"overlay-register-v2";
/// Length of a challenge, decoded from its base64.
pub const CHALLENGE_LEN: usize = 40;
/// Length of an X25519 key.
pub const KEY_LEN: usize = 32;
/// Length of the `crypto_box` nonce that starts a proof.
pub const PROOF_NONCE_LEN: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("{0} is not base64 of the expected length")]
    BadField(&'static str),
    #[error("proof is not base64 or too short")]
    Malformed,
    #[error("proof does not open with the claimed public key")]
    Forged,
    #[error("proof was made for another request")]
    WrongTranscript,
}

/// Decodes a base64 field that must be exactly `N` bytes.
fn decode_fixed<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], ProofError> {
    // Longer text cannot decode to N bytes; refuse it before decoding.
    if text.len() > 4 * N.div_ceil(3) + 8 {
        return Err(ProofError::BadField(field));
    }
    B64.decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(ProofError::BadField(field))
}

/// Decodes a base64 field that must be exactly 32 bytes (a key).
pub fn decode_32(field: &'static str, text: &str) -> Result<[u8; KEY_LEN], ProofError> {
    decode_fixed(field, text)
}

/// Decodes a challenge as the server sent it.
pub fn decode_challenge(text: &str) -> Result<[u8; CHALLENGE_LEN], ProofError> {
    decode_fixed("challenge", text)
}

/// The X25519 public key of `secret`.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    *SecretKey::from(*secret).public_key().as_bytes()
}

/// What the proof encrypts:
/// `domain ‖ 0 ‖ challenge ‖ public key ‖ sha256(auth key) ‖ u16 len ‖ hostname`,
/// every field fixed-length or length-prefixed so no two requests share one.
pub fn transcript(
    challenge: &[u8; CHALLENGE_LEN],
    public_key: &[u8; KEY_LEN],
    auth_key: &str,
    hostname: &str,
) -> Vec<u8> {
    let host = hostname.as_bytes();
    let host_len = u16::try_from(host.len()).unwrap_or(u16::MAX);
    let host = &host[..usize::from(host_len)];
    let mut t = Vec::with_capacity(
        TRANSCRIPT_DOMAIN.len() + 1 + CHALLENGE_LEN + 2 * KEY_LEN + 2 + host.len(),
    );
    t.extend_from_slice(TRANSCRIPT_DOMAIN);
    t.push(0);
    t.extend_from_slice(challenge);
    t.extend_from_slice(public_key);
    t.extend_from_slice(&Sha256::digest(auth_key.as_bytes()));
    t.extend_from_slice(&host_len.to_be_bytes());
    t.extend_from_slice(host);
    t
}

/// `base64(nonce ‖ crypto_box(node_secret → server_key, transcript))`.
pub fn prove(node_secret: &[u8; 32], server_key: &[u8; 32], transcript: &[u8]) -> String {
    let salsa = SalsaBox::new(
        &PublicKey::from(*server_key),
        &SecretKey::from(*node_secret),
    );
    let nonce_bytes: [u8; PROOF_NONCE_LEN] = rand::random();
    // Encryption with a valid key cannot fail; an empty box is refused, never misread.
    let sealed = salsa
        .encrypt(&Nonce::from(nonce_bytes), transcript)
        .unwrap_or_default();
    let mut out = Vec::with_capacity(PROOF_NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&sealed);
    B64.encode(out)
}

/// Checks a proof on the server: it must open with (the challenge's ephemeral
/// secret, the claimed node key) and hold exactly `expected`.
pub fn verify(
    server_secret: &[u8; 32],
    node_public: &[u8; 32],
    expected: &[u8],
    proof: &str,
) -> Result<(), ProofError> {
    // A transcript is a few hundred bytes; refuse to decode anything much larger.
    if proof.len() > 4 * (PROOF_NONCE_LEN + expected.len() + 64) {
        return Err(ProofError::Malformed);
    }
    let bytes = B64
        .decode(proof.trim())
        .map_err(|_| ProofError::Malformed)?;
    if bytes.len() < PROOF_NONCE_LEN {
        return Err(ProofError::Malformed);
    }
    let (nonce, sealed) = bytes.split_at(PROOF_NONCE_LEN);
    let salsa = SalsaBox::new(
        &PublicKey::from(*node_public),
        &SecretKey::from(*server_secret),
    );
    let opened = salsa
        .decrypt(Nonce::from_slice(nonce), sealed)
        .map_err(|_| ProofError::Forged)?;
    if opened != expected {
        return Err(ProofError::WrongTranscript);
    }
    Ok(())
}

/// A complete `RegisterRequest` answering `challenge`: what every client builds.
pub fn register_request(
    challenge: &ChallengeResponse,
    node_secret: &[u8; 32],
    auth_key: &str,
    hostname: &str,
    credential: Option<String>,
) -> Result<RegisterRequest, ProofError> {
    let nonce = decode_challenge(&challenge.challenge)?;
    let server_key = decode_32("server_key", &challenge.server_key)?;
    let public = public_key(node_secret);
    let transcript = transcript(&nonce, &public, auth_key, hostname);
    Ok(RegisterRequest {
        auth_key: auth_key.to_owned(),
        public_key: B64.encode(public),
        hostname: hostname.to_owned(),
        challenge: challenge.challenge.clone(),
        proof: prove(node_secret, &server_key, &transcript),
        credential,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_challenge() -> [u8; CHALLENGE_LEN] {
        let mut c = [0u8; CHALLENGE_LEN];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut c);
        c
    }

    fn server_challenge() -> ([u8; 32], ChallengeResponse) {
        let secret: [u8; 32] = rand::random();
        let c = ChallengeResponse {
            challenge: B64.encode(random_challenge()),
            server_key: B64.encode(public_key(&secret)),
            expires_in: 60,
        };
        (secret, c)
    }

    fn check(server_secret: &[u8; 32], req: &RegisterRequest) -> Result<(), ProofError> {
        let nonce = decode_challenge(&req.challenge)?;
        let node = decode_32("public_key", &req.public_key)?;
        let t = transcript(&nonce, &node, &req.auth_key, &req.hostname);
        verify(server_secret, &node, &t, &req.proof)
    }

    #[test]
    fn proof_from_the_key_holder_verifies() {
        let (server, c) = server_challenge();
        let node: [u8; 32] = rand::random();
        let req = register_request(&c, &node, "ovk_x", "web", None).unwrap();
        assert_eq!(check(&server, &req), Ok(()));
    }

    #[test]
    fn proof_for_another_public_key_is_forged() {
        let (server, c) = server_challenge();
        let attacker: [u8; 32] = rand::random();
        let victim = public_key(&rand::random());
        let mut req = register_request(&c, &attacker, "ovk_x", "web", None).unwrap();
        req.public_key = B64.encode(victim);
        assert_eq!(check(&server, &req), Err(ProofError::Forged));
    }

    #[test]
    fn proof_does_not_move_to_another_request() {
        let (server, c) = server_challenge();
        let node: [u8; 32] = rand::random();
        let req = register_request(&c, &node, "ovk_x", "web", None).unwrap();
        for change in [
            |r: &mut RegisterRequest| r.hostname = "other".into(),
            |r: &mut RegisterRequest| r.auth_key = "ovk_y".into(),
            |r: &mut RegisterRequest| r.challenge = B64.encode([9u8; CHALLENGE_LEN]),
        ] {
            let mut moved = req.clone();
            change(&mut moved);
            assert_eq!(check(&server, &moved), Err(ProofError::WrongTranscript));
        }
        // Another server key (another challenge) does not open it at all.
        let (other_server, _) = server_challenge();
        assert_eq!(check(&other_server, &req), Err(ProofError::Forged));
    }

    #[test]
    fn garbage_proofs_are_refused() {
        let (server, c) = server_challenge();
        let node: [u8; 32] = rand::random();
        let mut req = register_request(&c, &node, "k", "h", None).unwrap();
        for proof in ["", "!!", "AAAA", &"A".repeat(100_000)] {
            req.proof = proof.into();
            assert!(check(&server, &req).is_err(), "{proof:.10}");
        }
        for challenge in [
            "AAAA".to_string(),
            B64.encode([0u8; 32]),
            "A".repeat(100_000),
        ] {
            assert_eq!(
                decode_challenge(&challenge),
                Err(ProofError::BadField("challenge"))
            );
        }
        assert_eq!(
            decode_challenge(&B64.encode([7u8; CHALLENGE_LEN])),
            Ok([7u8; CHALLENGE_LEN])
        );
    }

    #[test]
    fn transcript_fields_cannot_run_into_each_other() {
        let c = [1u8; CHALLENGE_LEN];
        let k = [2u8; KEY_LEN];
        assert_ne!(transcript(&c, &k, "ab", "c"), transcript(&c, &k, "a", "bc"));
        assert!(transcript(&c, &k, "a", "h").starts_with(TRANSCRIPT_DOMAIN));
    }
}
