//! Registration challenges that cost the server nothing to issue, sans-IO:
//! time comes in as `now` (seconds), randomness as bytes.
//!
//! ```text
//!  challenge  = issued (u64 BE, unix secs) ‖ random (16) ‖ tag (16)
//!  tag        = HMAC-SHA256(master, "challenge" ‖ issued ‖ random)[..16]
//!  E secret   = clamp(HMAC-SHA256(master, "server-key" ‖ challenge))
//!  server_key = X25519 public key of E secret
//! ```
//!
//! `master` is 32 random bytes drawn at start and never stored, so issuing a
//! challenge allocates nothing: the challenge carries its own issue time and
//! proves it came from this process, and its ephemeral secret is derived again
//! when the node answers. An anonymous client can ask for challenges as fast
//! as it likes and no server table grows. A restart draws a new master and so
//! voids every outstanding challenge; the node asks again (it retries on
//! `bad_proof`).
//!
//! Single use needs memory, but only for registrations that succeed: the
//! register route checks tag and age ([`ChallengeKey::check`]), then the proof,
//! and only then claims the challenge in [`UsedChallenges`] for the store
//! transaction that checks the auth key; a refusal by the store (bad auth key,
//! key already enrolled, full pool: the transaction rolled back) releases it.
//! So an entry outlives its request only for a registration that passed every
//! check, i.e. one made with a valid auth key, and it is forgotten when its
//! challenge expires. The set is bounded by [`MAX_USED`] all the same: when
//! full, a registration is refused (503) rather than the set growing.

use std::collections::BTreeSet;
use std::time::Duration;

use hmac::{Hmac, Mac};
use overlay_proto::enrol::{self, CHALLENGE_LEN, KEY_LEN};
use sha2::Sha256;

/// How long a challenge can be answered. A node asks and answers in one round
/// trip, so a minute is generous even over a slow link.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Most challenges remembered as used at once: successful registrations
/// within one [`CHALLENGE_TTL`] (about 1,000 a second sustained, beyond what
/// the store's one-transaction-per-registration does on a small server).
/// Each entry is 24 bytes plus B-tree overhead: about 3 MiB when full.
pub const MAX_USED: usize = 65_536;

const TIME_LEN: usize = 8;
const RANDOM_LEN: usize = 16;
const TAG_LEN: usize = 16;
const _: () = assert!(TIME_LEN + RANDOM_LEN + TAG_LEN == CHALLENGE_LEN);

/// HMAC inputs start with one of these labels, so a tag can never serve as a
/// derived key or the other way round.
const TAG_LABEL: &[u8] = b"challenge";
const SERVER_KEY_LABEL: &[u8] = b"server-key";

type HmacSha256 = Hmac<Sha256>;

/// A fresh challenge, ready for the node.
pub struct Issued {
    pub challenge: [u8; CHALLENGE_LEN],
    /// Public half of the challenge's ephemeral X25519 key.
    pub server_key: [u8; KEY_LEN],
}

/// A challenge this process issued and that has not expired.
pub struct Valid {
    /// The ephemeral secret whose public half went to the node.
    pub server_secret: [u8; KEY_LEN],
    id: UsedId,
}

/// Identifies a challenge in [`UsedChallenges`]: its expiry first, so the
/// set is ordered for pruning, then its random part.
type UsedId = (u64, [u8; RANDOM_LEN]);

/// Why a challenge cannot be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "challenge was not issued by this server, or the server restarted since; ask for a new one"
    )]
    NotOurs,
    #[error("challenge has expired; ask for a new one")]
    Expired,
    #[error("challenge was already used; ask for a new one")]
    Used,
    #[error("too many registrations in the last minute; retry in a few seconds")]
    Full,
}

/// The per-process master secret: issues challenges and checks them.
/// Deliberately not `Debug`.
pub struct ChallengeKey {
    master: [u8; 32],
    ttl_secs: u64,
}

impl ChallengeKey {
    pub fn new(master: [u8; 32]) -> Self {
        ChallengeKey {
            master,
            ttl_secs: CHALLENGE_TTL.as_secs(),
        }
    }

    /// A challenge issued at `now` around `random`. Takes `&self`: issuing
    /// changes nothing in the server.
    pub fn issue(&self, random: [u8; RANDOM_LEN], now: u64) -> Issued {
        let mut challenge = [0u8; CHALLENGE_LEN];
        challenge[..TIME_LEN].copy_from_slice(&now.to_be_bytes());
        challenge[TIME_LEN..TIME_LEN + RANDOM_LEN].copy_from_slice(&random);
        let tag = self.tag(&challenge[..TIME_LEN + RANDOM_LEN]).finalize();
        challenge[TIME_LEN + RANDOM_LEN..].copy_from_slice(&tag.into_bytes()[..TAG_LEN]);
        Issued {
            challenge,
            server_key: enrol::public_key(&self.server_secret(&challenge)),
        }
    }

    /// Checks that this process issued `challenge` (tag compared in constant
    /// time) and that it is at most [`CHALLENGE_TTL`] old at `now`; then
    /// derives its ephemeral secret. Says nothing about earlier use.
    pub fn check(&self, challenge: &[u8; CHALLENGE_LEN], now: u64) -> Result<Valid, Refused> {
        let (signed, tag) = challenge.split_at(TIME_LEN + RANDOM_LEN);
        self.tag(signed)
            .verify_truncated_left(tag)
            .map_err(|_| Refused::NotOurs)?;
        let (time, random) = signed.split_at(TIME_LEN);
        let issued = u64::from_be_bytes(time.try_into().map_err(|_| Refused::NotOurs)?);
        // A challenge from the future has a valid tag only if `now` went
        // back; the caller's clock must not, so treat it as stale.
        match now.checked_sub(issued) {
            Some(age) if age <= self.ttl_secs => {}
            _ => return Err(Refused::Expired),
        }
        Ok(Valid {
            server_secret: self.server_secret(challenge),
            id: (
                issued.saturating_add(self.ttl_secs),
                random.try_into().map_err(|_| Refused::NotOurs)?,
            ),
        })
    }

    fn tag(&self, signed: &[u8]) -> HmacSha256 {
        let mut mac = self.mac();
        mac.update(TAG_LABEL);
        mac.update(signed);
        mac
    }

    /// The challenge's ephemeral X25519 secret, clamped.
    fn server_secret(&self, challenge: &[u8; CHALLENGE_LEN]) -> [u8; KEY_LEN] {
        let mut mac = self.mac();
        mac.update(SERVER_KEY_LABEL);
        mac.update(challenge);
        let mut secret: [u8; KEY_LEN] = mac.finalize().into_bytes().into();
        secret[0] &= 248;
        secret[31] &= 127;
        secret[31] |= 64;
        secret
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; 32 bytes never fails.
        <HmacSha256 as Mac>::new_from_slice(&self.master)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }
}

/// Challenges answered by a registration that passed (or is passing) every
/// check, until they expire. Bounded by its capacity.
pub struct UsedChallenges {
    set: BTreeSet<UsedId>,
    capacity: usize,
}

impl Default for UsedChallenges {
    fn default() -> Self {
        UsedChallenges::new(MAX_USED)
    }
}

impl UsedChallenges {
    pub fn new(capacity: usize) -> Self {
        UsedChallenges {
            set: BTreeSet::new(),
            capacity,
        }
    }

    /// Marks `challenge` used, unless it already is ([`Refused::Used`]) or
    /// the set is full of unexpired entries ([`Refused::Full`]).
    pub fn claim(&mut self, challenge: &Valid, now: u64) -> Result<(), Refused> {
        self.expire(now);
        if self.set.contains(&challenge.id) {
            return Err(Refused::Used);
        }
        if self.set.len() >= self.capacity {
            return Err(Refused::Full);
        }
        self.set.insert(challenge.id);
        Ok(())
    }

    /// Undoes a claim whose registration the store refused (and so changed
    /// nothing): a client without a valid auth key holds no entry past its
    /// own request.
    pub fn release(&mut self, challenge: &Valid) {
        self.set.remove(&challenge.id);
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Forgets challenges that [`ChallengeKey::check`] refuses anyway.
    fn expire(&mut self, now: u64) {
        while self.set.first().is_some_and(|(expires, _)| *expires < now) {
            self.set.pop_first();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;
    const TTL: u64 = CHALLENGE_TTL.as_secs();

    fn key() -> ChallengeKey {
        ChallengeKey::new([7; 32])
    }

    #[test]
    fn issued_challenge_checks_and_yields_the_key_the_node_got() {
        let k = key();
        let issued = k.issue([1; 16], T0);
        let valid = k.check(&issued.challenge, T0 + TTL).expect("fresh");
        assert_eq!(enrol::public_key(&valid.server_secret), issued.server_key);
        // Each challenge has its own ephemeral key.
        assert_ne!(k.issue([2; 16], T0).server_key, issued.server_key);
        assert_ne!(k.issue([1; 16], T0 + 1).server_key, issued.server_key);
    }

    #[test]
    fn tampered_challenge_is_not_ours() {
        let k = key();
        let issued = k.issue([1; 16], T0);
        for bit in 0..CHALLENGE_LEN * 8 {
            let mut c = issued.challenge;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(k.check(&c, T0).err(), Some(Refused::NotOurs), "bit {bit}");
        }
        // A later issue time (a longer life) with the old tag.
        let mut c = issued.challenge;
        c[..TIME_LEN].copy_from_slice(&(T0 + 3600).to_be_bytes());
        assert_eq!(k.check(&c, T0 + 3600).err(), Some(Refused::NotOurs));
    }

    #[test]
    fn challenge_from_before_a_restart_is_not_ours() {
        let before = ChallengeKey::new([1; 32]);
        let after = ChallengeKey::new([2; 32]);
        let issued = before.issue([3; 16], T0);
        assert_eq!(
            after.check(&issued.challenge, T0).err(),
            Some(Refused::NotOurs)
        );
    }

    #[test]
    fn challenge_older_than_the_ttl_or_from_the_future_is_refused() {
        let k = key();
        let issued = k.issue([1; 16], T0);
        assert!(k.check(&issued.challenge, T0 + TTL).is_ok());
        assert_eq!(
            k.check(&issued.challenge, T0 + TTL + 1).err(),
            Some(Refused::Expired)
        );
        assert_eq!(
            k.check(&issued.challenge, T0 - 1).err(),
            Some(Refused::Expired)
        );
        // No overflow at the ends of time.
        let last = k.issue([1; 16], u64::MAX);
        assert!(k.check(&last.challenge, u64::MAX).is_ok());
        assert_eq!(k.check(&last.challenge, 0).err(), Some(Refused::Expired));
    }

    #[test]
    fn challenge_is_used_once_and_forgotten_when_it_expires() {
        let k = key();
        let mut used = UsedChallenges::default();
        let c = k.issue([1; 16], T0).challenge;
        used.claim(&k.check(&c, T0).unwrap(), T0).unwrap();
        assert_eq!(
            used.claim(&k.check(&c, T0 + TTL).unwrap(), T0 + TTL),
            Err(Refused::Used)
        );
        // Another challenge is unaffected.
        let other = k.issue([2; 16], T0).challenge;
        used.claim(&k.check(&other, T0).unwrap(), T0).unwrap();
        assert_eq!(used.len(), 2);
        // Once expired, check refuses them; the set lets them go.
        let later = k.issue([3; 16], T0 + TTL + 1).challenge;
        used.claim(&k.check(&later, T0 + TTL + 1).unwrap(), T0 + TTL + 1)
            .unwrap();
        assert_eq!(used.len(), 1);
    }

    #[test]
    fn released_claim_can_be_made_again() {
        let k = key();
        let mut used = UsedChallenges::default();
        let valid = k.check(&k.issue([1; 16], T0).challenge, T0).unwrap();
        used.claim(&valid, T0).unwrap();
        used.release(&valid);
        assert!(used.is_empty());
        used.claim(&valid, T0).unwrap();
    }

    #[test]
    fn full_set_refuses_until_entries_expire() {
        let k = key();
        let mut used = UsedChallenges::new(3);
        for i in 0..3u8 {
            let c = k.issue([i; 16], T0 + u64::from(i)).challenge;
            used.claim(&k.check(&c, T0 + 2).unwrap(), T0 + 2).unwrap();
        }
        let late = k.issue([9; 16], T0 + 2).challenge;
        let late = k.check(&late, T0 + 2).unwrap();
        assert_eq!(used.claim(&late, T0 + 2), Err(Refused::Full));
        assert_eq!(used.len(), 3, "a refused claim evicts nothing");
        // The oldest expires first and makes room.
        assert_eq!(used.claim(&late, T0 + TTL + 1), Ok(()));
        assert_eq!(used.len(), 3);
    }

    #[test]
    fn issuing_any_number_of_challenges_needs_no_memory() {
        // `issue` takes `&self`: nothing to grow. A registration still works
        // after a flood, unlike with a table of outstanding challenges.
        let k = key();
        let mut used = UsedChallenges::default();
        for i in 0..10_000u32 {
            let mut random = [0u8; 16];
            random[..4].copy_from_slice(&i.to_be_bytes());
            k.issue(random, T0);
        }
        let c = k.issue([0xff; 16], T0).challenge;
        used.claim(&k.check(&c, T0).unwrap(), T0).unwrap();
        assert_eq!(used.len(), 1);
    }
}
