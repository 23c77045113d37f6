//! The replicas' bus on NATS (`serve --bus nats://…`): the IO around
//! [`crate::bus`] (what is said) and [`crate::replica`] (who is alive).
//!
//! ```text
//!   hub ─▶ BusLink queue ─▶ publisher task ─▶ NATS ─▶ receiver task ─▶ hub
//!                                             (events, our inbox; heartbeat,
//!                                              presence refresh, expiry)
//! ```
//!
//! The connection is made in the background and remade forever: a replica
//! starts and serves without NATS, and alone it works as a single
//! coordinator. While the bus is down the replica takes every other replica
//! for gone (their nodes offline here, ours offline there); when it is back,
//! heartbeats make each side new to the other, so both send their presence,
//! and this side re-reads the nodes from the store for enrolments it missed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Subscriber};
use axum::body::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::bus::{inbox_subject, Envelope, Event, Inbox, ReplicaId, EVENTS_SUBJECT};
use crate::hub::Hub;
use crate::replica::{
    BusLink, Outbound, Outbox, Replicas, HEARTBEAT, MOVE_GRACE, PRESENCE_REFRESH, REPLICA_TIMEOUT,
};
use crate::store::Store;

/// Longest wait between two connection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// How long a stopping replica waits for its last messages to leave.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BusStartError {
    #[error("bus {url}: {message}")]
    Connect { url: String, message: String },
}

/// The running bus; [`NatsBus::stop`] after the sessions closed, so their
/// goodbyes reach the other replicas.
pub struct NatsBus {
    link: Arc<BusLink>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl NatsBus {
    /// Connects `hub` to the bus at `url` (in the background) as a new
    /// replica with a random id. `url` may list several servers of a NATS
    /// cluster, separated by commas; the client also learns the cluster's
    /// other servers from the one it reaches.
    pub async fn start(
        url: &str,
        hub: Arc<Hub>,
        store: Arc<Store>,
    ) -> Result<NatsBus, BusStartError> {
        let replica: ReplicaId = rand::random::<u64>() | 1;
        let (link, out) = BusLink::new(replica);
        let link = Arc::new(link);
        let (conn_tx, conn_rx) = mpsc::channel(64);
        let client = ConnectOptions::new()
            .name(format!("overlay-coord {replica:016x}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                (Duration::from_millis(100) * attempts.min(20) as u32).min(MAX_RECONNECT_DELAY)
            })
            .event_callback(move |event| {
                let tx = conn_tx.clone();
                async move {
                    let _ = tx.send(event).await;
                }
            })
            .connect(bus_servers(url))
            .await
            .map_err(|e| BusStartError::Connect {
                url: url.to_owned(),
                message: e.to_string(),
            })?;
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                client
                    .subscribe(subject)
                    .await
                    .map_err(|e| BusStartError::Connect {
                        url: String::new(),
                        message: e.to_string(),
                    })
            }
        };
        let events = subscribe(EVENTS_SUBJECT.to_owned()).await?;
        let inbox = subscribe(inbox_subject(replica)).await?;
        hub.set_bus(Arc::clone(&link));
        info!(replica = %format!("{replica:016x}"), bus = %url, "joining the replicas' bus");

        let (stop, stop_rx) = watch::channel(false);
        let receiver = Receiver {
            replica,
            hub,
            store,
            link: Arc::clone(&link),
            replicas: Replicas::default(),
            was_connected: false,
        };
        let publisher = tokio::spawn(publish(
            client.clone(),
            Arc::clone(&link),
            out,
            stop_rx.clone(),
        ));
        let task = tokio::spawn(async move {
            receiver.run(events, inbox, conn_rx, stop_rx).await;
            let _ = publisher.await;
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await;
        });
        Ok(NatsBus { link, stop, task })
    }

    pub fn link(&self) -> &Arc<BusLink> {
        &self.link
    }

    /// Sends what is queued and leaves the bus.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The servers of a `--bus` value: one URL or several separated by commas.
fn bus_servers(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Takes messages off the link's queue and publishes them. Relay and
/// signals are dropped (and counted) while the bus is down: they would be
/// stale when it is back. On stop, what is queued still goes out.
async fn publish(
    client: Client,
    link: Arc<BusLink>,
    mut out: Outbox,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            next = out.recv() => next,
            _ = stop.changed() => {
                out.close();
                out.recv().await
            }
        };
        let Some(msg) = next else { return };
        let (subject, payload) = match msg {
            Outbound::Event(event) => {
                let env = Envelope {
                    from: link.replica,
                    event,
                };
                (EVENTS_SUBJECT.to_owned(), env.encode())
            }
            Outbound::Inbox { to, msg } => {
                link.taken(msg.len());
                if !link.is_connected() {
                    link.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                (inbox_subject(to), msg)
            }
        };
        match client.publish(subject, Bytes::from(payload)).await {
            Ok(()) => link.counters.published.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                debug!("bus publish: {e}");
                link.counters.publish_failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

struct Receiver {
    replica: ReplicaId,
    hub: Arc<Hub>,
    store: Arc<Store>,
    link: Arc<BusLink>,
    replicas: Replicas,
    /// Whether the bus was up before: a `Connected` then is a reconnection.
    was_connected: bool,
}

impl Receiver {
    async fn run(
        mut self,
        mut events: Subscriber,
        mut inbox: Subscriber,
        mut conn: mpsc::Receiver<async_nats::Event>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(PRESENCE_REFRESH);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                Some(msg) = events.next() => self.event(&msg.payload),
                Some(msg) = inbox.next() => self.inbox(&msg.payload),
                Some(event) = conn.recv() => self.connection(event),
                _ = heartbeat.tick() => {
                    self.link.event(Event::Heartbeat {
                        ice: self.link.ice.own(),
                    });
                    let now = Instant::now().into_std();
                    for gone in self.replicas.expire(now) {
                        // Its STUN/TURN is no use to nodes any more.
                        self.link.ice.forget(gone);
                        warn!(replica = %format!("{gone:016x}"), "replica unheard for {REPLICA_TIMEOUT:?}: its nodes stay online here for {MOVE_GRACE:?} while they move");
                    }
                    for gone in self.replicas.moved(now) {
                        info!(replica = %format!("{gone:016x}"), "the gone replica's nodes that did not move are offline");
                        self.hub.replica_gone(gone);
                    }
                    self.count_replicas();
                }
                _ = refresh.tick() => self.announce(),
            }
        }
    }

    fn count_replicas(&self) {
        self.link
            .counters
            .replicas
            .store(self.replicas.len() as u64, Ordering::Relaxed);
    }

    /// Tells the others every session here.
    fn announce(&self) {
        self.link.event(Event::Presence {
            nodes: self.hub.local_presence(),
        });
    }

    fn event(&mut self, payload: &[u8]) {
        self.link.counters.received.fetch_add(1, Ordering::Relaxed);
        let env = match Envelope::decode(payload) {
            Ok(env) => env,
            Err(e) => {
                self.link
                    .counters
                    .malformed_in
                    .fetch_add(1, Ordering::Relaxed);
                debug!("{e}");
                return;
            }
        };
        let from = env.from;
        if from == self.replica {
            return;
        }
        if self.replicas.heard(from, Instant::now().into_std()) {
            info!(replica = %format!("{from:016x}"), "replica heard on the bus");
            self.count_replicas();
            self.announce();
        }
        match env.event {
            Event::Heartbeat { ice } => self.link.ice.heard(from, ice),
            Event::Online { node, epoch } => self.hub.remote_online(from, node, epoch),
            Event::Offline { node, epoch } => self.hub.remote_offline(from, node, epoch),
            Event::Presence { nodes } => self.hub.remote_presence(from, &nodes),
            Event::Upsert { peer } => self.hub.apply_upsert(peer),
        }
    }

    fn inbox(&mut self, payload: &[u8]) {
        self.link.counters.received.fetch_add(1, Ordering::Relaxed);
        match Inbox::parse(payload) {
            Ok(Inbox::Relay(records)) => self.hub.relay_from_bus(records),
            Ok(Inbox::Signal { to, text }) => {
                self.link
                    .counters
                    .signals_in
                    .fetch_add(1, Ordering::Relaxed);
                self.hub.deliver_signal(to, text);
            }
            Err(e) => {
                self.link
                    .counters
                    .malformed_in
                    .fetch_add(1, Ordering::Relaxed);
                debug!("{e}");
            }
        }
    }

    fn connection(&mut self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                let again = std::mem::replace(&mut self.was_connected, true);
                self.link.counters.connected.store(true, Ordering::Relaxed);
                info!("connected to the replicas' bus");
                self.announce();
                if again {
                    self.link
                        .counters
                        .reconnects
                        .fetch_add(1, Ordering::Relaxed);
                    // Enrolments other replicas made meanwhile were missed.
                    let store = Arc::clone(&self.store);
                    let hub = Arc::clone(&self.hub);
                    tokio::spawn(async move {
                        match tokio::task::spawn_blocking(move || store.list_nodes()).await {
                            Ok(Ok(nodes)) => {
                                hub.sync_nodes(nodes.iter().map(|n| n.peer_info()).collect())
                            }
                            Ok(Err(e)) => warn!("re-reading nodes after the bus came back: {e}"),
                            Err(e) => warn!("re-reading nodes after the bus came back: {e}"),
                        }
                    });
                }
            }
            async_nats::Event::Disconnected => {
                self.link.counters.connected.store(false, Ordering::Relaxed);
                warn!("lost the replicas' bus: nodes on other replicas are offline here until it is back");
                for gone in self.replicas.forget_all() {
                    self.link.ice.forget(gone);
                    self.hub.replica_gone(gone);
                }
                self.count_replicas();
            }
            other => debug!("bus: {other}"),
        }
    }
}
