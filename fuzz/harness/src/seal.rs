//! Sealed signals, as a node opens them: first what a malicious coordinator can
//! send (any payload: it cannot forge a box, so this reaches base64, lengths and
//! the MAC), then what a malicious *peer* can send (any plaintext in a valid box,
//! so the `PeerSignal` parser and the ICE candidate parser behind it are reached).

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use crypto_box::aead::Aead;
use crypto_box::{Nonce, SalsaBox, SecretKey};
use overlay_proto::signal::{PeerSignal, MAX_SEALED_LEN, NONCE_LEN};
use overlayd::seal::{SealError, Sealer};

const SENDER_SECRET: [u8; 32] = [0x11; 32];
const TARGET_SECRET: [u8; 32] = [0x22; 32];

fn public(secret: [u8; 32]) -> [u8; 32] {
    *SecretKey::from(secret).public_key().as_bytes()
}

/// The target's side: opens what the sender sealed. Built once: the X25519
/// agreement would otherwise dominate every run.
fn target() -> &'static Sealer {
    static TARGET: OnceLock<Sealer> = OnceLock::new();
    TARGET.get_or_init(|| Sealer::new(TARGET_SECRET, public(SENDER_SECRET)))
}

/// The sender's side, as `Sealer` and as the raw box it seals with.
fn sender() -> &'static (Sealer, SalsaBox) {
    static SENDER: OnceLock<(Sealer, SalsaBox)> = OnceLock::new();
    SENDER.get_or_init(|| {
        let salsa = SalsaBox::new(
            &SecretKey::from(TARGET_SECRET).public_key(),
            &SecretKey::from(SENDER_SECRET),
        );
        (Sealer::new(SENDER_SECRET, public(TARGET_SECRET)), salsa)
    })
}

/// Any payload the coordinator might deliver as `ServerMsg::Signal`.
pub fn sealed_signal(data: &[u8]) {
    let payload = String::from_utf8_lossy(data);
    if let Ok(signal) = target().open(&payload) {
        // Only a box from the sender's key opens; the fuzzer cannot make one
        // without the key, so an `Ok` here means the MAC check is broken.
        panic!("a payload not sealed by the sender opened: {signal:?}");
    }
}

/// Any plaintext a peer might seal, boxed as the sender's `Sealer::seal` does
/// (`base64(nonce || box)`), then opened and parsed on the target's side.
pub fn sealed_plaintext(data: &[u8]) {
    let (sender, salsa) = sender();
    let nonce = [0x5a; NONCE_LEN];
    let Ok(ciphertext) = salsa.encrypt(&Nonce::from(nonce), data) else {
        return;
    };
    let mut sealed = nonce.to_vec();
    sealed.extend_from_slice(&ciphertext);
    let payload = B64.encode(sealed);
    let target = target();
    match target.open(&payload) {
        Ok(signal) => {
            let resealed = sender.seal(&signal);
            // Re-serializing can grow the JSON (an omitted `None` is written out),
            // so only a re-sealed signal within the limit must open again.
            if resealed.len() <= MAX_SEALED_LEN {
                assert_eq!(
                    target.open(&resealed).as_ref(),
                    Ok(&signal),
                    "re-sealed signal opens"
                );
            }
            if let PeerSignal::Candidate { candidate, .. } = &signal.signal {
                // What `IceSession::add_remote_candidate` does with it first.
                let _ = webrtc_ice::candidate::candidate_base::unmarshal_candidate(candidate);
            }
        }
        Err(SealError::TooLarge) => assert!(payload.len() > MAX_SEALED_LEN),
        Err(SealError::Json(_)) => {}
        Err(e) => panic!("a box the sender sealed did not open: {e}"),
    }
}
