//! The bridge between the hub and the store, once a second: writes presence
//! and relay counters (for `nodes list`), and picks up nodes that
//! `overlay-coord nodes remove` deleted from another process.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::hub::Hub;
use crate::store::{now_unix, Store, StoreError};

pub struct StoreSync {
    store: Arc<Store>,
    hub: Arc<Hub>,
    /// Last removal already applied.
    removal_seq: u64,
}

impl StoreSync {
    pub fn new(store: Arc<Store>, hub: Arc<Hub>, removal_seq: u64) -> Self {
        StoreSync {
            store,
            hub,
            removal_seq,
        }
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
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return self,
            }
            if let Err(e) = self.sync_once().await {
                warn!("syncing with the store: {e}");
            }
        }
    }
}
