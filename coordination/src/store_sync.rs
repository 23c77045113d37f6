//! The bridge between the hub and the store, once a second: writes presence
//! and relay counters (for `nodes list`), and picks up nodes that
//! `overlay-coord nodes remove` deleted from another process. Every
//! [`POLICY_POLL`] it also reads the store's policy change counter (one
//! indexed row) and, when `policy set`/`clear` or `nodes tag` moved it,
//! reloads the policy and the tags and hands them to the hub. Each round's
//! outcome is the store's health in `/healthz` ([`StoreHealth`]).
//!
//! With replicas, every replica runs this against the shared database: the
//! admin CLI writes only there, and each replica applies every removal and
//! policy change itself, so a removed node's session is closed on whichever
//! replica holds it. What replicas change themselves (enrolments, sessions)
//! reaches the others over the bus instead (`replica_nats.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use overlay_proto::NodeId;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::hub::Hub;
use crate::policy::{self, Policy};
use crate::store::{now_unix, Store, StoreError};

/// How often the policy change counter is read: a change reaches the
/// sessions within this plus the recompute (the issue allows 1 s).
pub const POLICY_POLL: Duration = Duration::from_millis(200);

/// Whether the store answered the last round, and if not, why.
#[derive(Debug)]
pub struct StoreHealth {
    ok: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth {
            ok: AtomicBool::new(true),
            error: Mutex::new(None),
        }
    }
}

impl StoreHealth {
    fn set(&self, result: &Result<(), StoreError>) {
        self.ok.store(result.is_ok(), Ordering::Relaxed);
        let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        *error = result.as_ref().err().map(ToString::to_string);
    }

    pub fn is_ok(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }

    /// The last round's error, if it failed.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub struct StoreSync {
    store: Arc<Store>,
    hub: Arc<Hub>,
    health: Arc<StoreHealth>,
    /// Last removal already applied.
    removal_seq: u64,
    /// Policy change counter already applied.
    policy_seq: u64,
}

/// The stored policy, parsed; `Ok(None)` when none is set. A stored file
/// that no longer parses (written by a newer version) is an error, and the
/// caller keeps what is in force.
pub fn load_policy(store: &Store) -> Result<Option<Policy>, String> {
    match store.policy() {
        Ok(None) => Ok(None),
        Ok(Some(p)) => policy::parse("stored policy", &p.text)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

impl StoreSync {
    pub fn new(store: Arc<Store>, hub: Arc<Hub>, removal_seq: u64, policy_seq: u64) -> Self {
        StoreSync {
            store,
            hub,
            health: Arc::default(),
            removal_seq,
            policy_seq,
        }
    }

    /// Where each round's outcome is kept.
    pub fn health(&self) -> Arc<StoreHealth> {
        Arc::clone(&self.health)
    }

    /// Applies a policy or tag change made since the last call, if any.
    pub async fn sync_policy(&mut self) -> Result<(), StoreError> {
        let store = Arc::clone(&self.store);
        let known = self.policy_seq;
        type Loaded = (
            u64,
            Result<Option<Policy>, String>,
            std::collections::HashMap<NodeId, Vec<String>>,
        );
        let loaded: Option<Loaded> = tokio::task::spawn_blocking(move || {
            let seq = store.policy_seq()?;
            if seq == known {
                return Ok(None);
            }
            Ok::<_, StoreError>(Some((seq, load_policy(&store), store.node_tags()?)))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        let Some((seq, policy, tags)) = loaded else {
            return Ok(());
        };
        self.policy_seq = seq;
        match policy {
            Ok(policy) => {
                let hub = Arc::clone(&self.hub);
                let started = std::time::Instant::now();
                let stats = tokio::task::spawn_blocking(move || {
                    hub.apply_policy(policy.map(Arc::new), Some(&tags))
                })
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?;
                info!(
                    nodes = stats.nodes,
                    classes = stats.classes,
                    nodes_told = stats.nodes_told,
                    messages = stats.messages,
                    took_ms = started.elapsed().as_millis() as u64,
                    "access policy or tags changed"
                );
            }
            Err(e) => warn!("the stored policy is not applied, the previous one stays: {e}"),
        }
        Ok(())
    }

    /// One round: flush activity, apply new removals.
    pub async fn sync_once(&mut self) -> Result<(), StoreError> {
        let (presence, relay) = self.hub.drain_activity();
        let store = Arc::clone(&self.store);
        let seq = self.removal_seq;
        let removals = tokio::task::spawn_blocking(move || {
            store.record_activity(&presence, &relay, now_unix())?;
            store.removals_after(seq)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        for (seq, id) in removals {
            self.removal_seq = seq;
            if let Some(node) = self.hub.remove(id) {
                info!(node = id, name = %node.name, "node removed");
            }
        }
        Ok(())
    }

    /// Runs until `shutdown` fires.
    pub async fn run(mut self, every: Duration, mut shutdown: watch::Receiver<bool>) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut policy_tick = tokio::time::interval(POLICY_POLL.min(every));
        policy_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let result = tokio::select! {
                _ = tick.tick() => self.sync_once().await,
                _ = policy_tick.tick() => self.sync_policy().await,
                _ = shutdown.changed() => return self,
            };
            let was_ok = self.health.is_ok();
            self.health.set(&result);
            match result {
                // Once per outage, not every 200 ms.
                Err(e) if was_ok => warn!("syncing with the store: {e}"),
                Ok(()) if !was_ok => info!("the store answers again"),
                _ => {}
            }
        }
    }
}
