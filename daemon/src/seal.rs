//! Sealed signaling: a [`SealedSignal`] travels through the coordination server as
//! NaCl `crypto_box` from the sender's WireGuard key to the target's. The server
//! routes it without reading it, and since only the holder of the sender's private
//! key (or ours) can produce a box that opens with the sender's public key, a node
//! opens only what the claimed sender (or itself) really sealed. The box is the
//! same both ways, so *which* of the two sealed it, for whom, and whether it is
//! new, is read from the plaintext by [`crate::node::signaling`].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use crypto_box::aead::Aead;
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use overlay_proto::signal::{SealedSignal, MAX_SEALED_LEN, NONCE_LEN};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed signal is too large")]
    TooLarge,
    #[error("sealed signal is not valid base64 or too short")]
    Malformed,
    #[error("sealed signal did not open with the sender's key")]
    Forged,
    #[error("signal is not valid JSON: {0}")]
    Json(String),
}

/// Precomputed box between us and one peer.
pub struct Sealer {
    salsa: SalsaBox,
}

impl Sealer {
    pub fn new(our_secret: [u8; 32], their_public: [u8; 32]) -> Self {
        let salsa = SalsaBox::new(&PublicKey::from(their_public), &SecretKey::from(our_secret));
        Sealer { salsa }
    }

    pub fn seal(&self, signal: &SealedSignal) -> String {
        let plaintext = serde_json::to_vec(signal).unwrap_or_default();
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = Nonce::from(nonce_bytes);
        // Encryption with a valid key cannot fail; an empty box would be refused
        // by the peer, never misread.
        let ciphertext = self
            .salsa
            .encrypt(&nonce, plaintext.as_slice())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ciphertext);
        B64.encode(out)
    }

    pub fn open(&self, payload: &str) -> Result<SealedSignal, SealError> {
        if payload.len() > MAX_SEALED_LEN {
            return Err(SealError::TooLarge);
        }
        let bytes = B64.decode(payload).map_err(|_| SealError::Malformed)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::clone_from_slice(nonce);
        let plaintext = self
            .salsa
            .decrypt(&nonce, ciphertext)
            .map_err(|_| SealError::Forged)?;
        serde_json::from_slice(&plaintext).map_err(|e| SealError::Json(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_proto::signal::PeerSignal;

    fn keypair() -> ([u8; 32], [u8; 32]) {
        let secret: [u8; 32] = rand::random();
        let public = *PublicKey::from(&SecretKey::from(secret)).as_bytes();
        (secret, public)
    }

    #[test]
    fn sealed_signal_opens_for_the_target_only_from_the_sender() {
        let (a_sec, a_pub) = keypair();
        let (b_sec, b_pub) = keypair();
        let (m_sec, _) = keypair();
        let signal = SealedSignal {
            from: 1,
            to: 2,
            counter: 1,
            signal: PeerSignal::RestartRequest { reason: "x".into() },
        };

        let sealed = Sealer::new(a_sec, b_pub).seal(&signal);
        assert_eq!(Sealer::new(b_sec, a_pub).open(&sealed), Ok(signal.clone()));

        // A third node claiming to be `a` cannot produce a box that opens.
        let forged = Sealer::new(m_sec, b_pub).seal(&signal);
        assert_eq!(
            Sealer::new(b_sec, a_pub).open(&forged),
            Err(SealError::Forged)
        );
    }

    #[test]
    fn garbage_is_refused() {
        let (a_sec, _) = keypair();
        let (_, b_pub) = keypair();
        let s = Sealer::new(a_sec, b_pub);
        assert_eq!(s.open("!!"), Err(SealError::Malformed));
        assert_eq!(s.open("AAAA"), Err(SealError::Malformed));
        assert_eq!(
            s.open(&"A".repeat(MAX_SEALED_LEN + 1)),
            Err(SealError::TooLarge)
        );
    }
}
