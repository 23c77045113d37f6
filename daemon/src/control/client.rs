//! The node's side of the conversation with the coordination server (like
//! Tailscale's `controlclient`): enrolment, then one WebSocket kept open with
//! capped exponential backoff. Relay frames go straight to the data plane; every
//! other message goes to the engine.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use overlay_proto::coord::{
    bearer, encode_relay_frame, error_code, ApiError, ChallengeResponse, ClientMsg,
    RegisterResponse, RelayBatch, RelayMessage, ServerMsg, CHALLENGE_PATH, CONNECT_PATH,
    MAX_FRAME_BYTES, REGISTER_PATH, RELAY_HELLO, RELAY_HELLO_ID,
};
use overlay_proto::NodeId;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::control::failover::{self, Failover};
use crate::control::resume::HeldNetmap;
use crate::control::transport::{Connector, Endpoint, TransportError};
use crate::dataplane::{DataPlane, Origin, Outbound, RxScratch, MAX_BATCH};
use crate::node::backoff::Backoff;

const RECONNECT_BASE: Duration = Duration::from_millis(500);
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// We ping the server this often; its answers show the connection is alive.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// A server silent for this long is gone, even if TCP has not noticed.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// Most queued items (relayed datagrams, messages) written with one flush:
/// a relayed TCP stream costs a system call per round, not per packet, and
/// the loop still reads between rounds.
const WRITE_ROUND: usize = 256;
/// Room a round's first relay batch starts with: a few full-size datagrams,
/// so a lone packet (a ping) does not cost a 64 KiB buffer; the next batch of
/// a round starts as large as the last grew.
const RELAY_BATCH_START: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("coordinator refused enrolment: {message} ({code})")]
    Refused { code: String, message: String },
    #[error("coordinator answered HTTP {status} to enrolment")]
    Unexpected { status: u16 },
    #[error("coordinator sent an unusable challenge: {0}")]
    BadChallenge(#[from] overlay_proto::enrol::ProofError),
}

/// What a node enrols with, besides the server's challenge.
pub struct Enrol<'a> {
    pub auth_key: &'a str,
    pub hostname: &'a str,
    /// The node's X25519 private key: the proof that it owns its public key.
    pub secret: [u8; 32],
    /// The credential from an earlier enrolment, which a server that already
    /// knows this key requires.
    pub credential: Option<String>,
}

/// Enrolment attempts when the coordinator is busy (its set of used challenges
/// is full) or voided our challenge (it restarted between our two calls, or our
/// second call came after the challenge expired).
const ENROL_ATTEMPTS: u32 = 4;
/// Wait before the second attempt; doubles after each.
const ENROL_RETRY: Duration = Duration::from_secs(1);

/// `POST /v1/register/challenge`, then `POST /v1/register` with the proof;
/// again with a fresh challenge, a few times, when that is worth it.
pub async fn register(
    connector: &Connector,
    endpoint: &Endpoint,
    enrol: Enrol<'_>,
) -> Result<RegisterResponse, EnrolError> {
    let mut wait = ENROL_RETRY;
    let mut attempt = 1;
    loop {
        match register_once(connector, endpoint, &enrol).await {
            Err(EnrolError::Refused { code, message })
                if attempt < ENROL_ATTEMPTS
                    && (code == error_code::RATE_LIMITED || code == error_code::BAD_PROOF) =>
            {
                tracing::warn!(
                    "enrolment attempt {attempt} refused: {message} ({code}); retrying in {wait:?}"
                );
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

async fn register_once(
    connector: &Connector,
    endpoint: &Endpoint,
    enrol: &Enrol<'_>,
) -> Result<RegisterResponse, EnrolError> {
    let (status, body) = connector
        .post_json(endpoint, CHALLENGE_PATH, Vec::new())
        .await?;
    if status != 200 {
        return Err(refusal(status, &body));
    }
    let challenge: ChallengeResponse =
        serde_json::from_slice(&body).map_err(|_| EnrolError::Unexpected { status })?;
    let request = overlay_proto::enrol::register_request(
        &challenge,
        &enrol.secret,
        enrol.auth_key,
        enrol.hostname,
        enrol.credential.clone(),
    )?;
    let body = serde_json::to_vec(&request).unwrap_or_default();
    let (status, body) = connector.post_json(endpoint, REGISTER_PATH, body).await?;
    if status == 200 || status == 201 {
        return serde_json::from_slice(&body).map_err(|_| EnrolError::Unexpected { status });
    }
    Err(refusal(status, &body))
}

fn refusal(status: u16, body: &[u8]) -> EnrolError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => EnrolError::Refused {
            code: e.error,
            message: e.message,
        },
        Err(_) => EnrolError::Unexpected { status },
    }
}

/// What the connection tells the engine.
pub enum ControlEvent {
    Connected,
    Message(Box<ServerMsg>),
    Disconnected,
}

/// How long one write to the control stream may take: a server that stops
/// reading must not hold the node (its queue towards the server fills meanwhile).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where relay frames from the coordinator go: the data plane (a stub in tests).
#[async_trait::async_trait]
pub trait RelayReceiver: Send + Sync {
    /// WireGuard datagrams `from` one peer (at most [`MAX_BATCH`]) arrived
    /// together over the coordination relay.
    async fn relay_datagrams(&self, from: NodeId, datagrams: &[&[u8]], rx: &mut RxScratch);
    /// A binary message from the coordinator that is no relay message.
    fn bad_frame(&self);
}

#[async_trait::async_trait]
impl RelayReceiver for DataPlane {
    async fn relay_datagrams(&self, from: NodeId, datagrams: &[&[u8]], rx: &mut RxScratch) {
        self.arrive(Origin::Relay(from), datagrams, rx).await;
    }

    fn bad_frame(&self) {
        self.drops.bad_datagram.fetch_add(1, Ordering::Relaxed);
    }
}

/// Hands the datagrams of one relay message to `relay`, consecutive
/// datagrams of one peer together (so the data plane decrypts them side by
/// side and coalesces them for the TUN). Hello records carry none.
async fn deliver(relay: &dyn RelayReceiver, msg: RelayMessage<'_>, rx: &mut RxScratch) {
    let mut run: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
    let mut len = 0;
    let mut from = RELAY_HELLO_ID;
    for (id, datagram) in msg.records() {
        if id == RELAY_HELLO_ID {
            continue;
        }
        if len > 0 && (id != from || len == MAX_BATCH) {
            relay.relay_datagrams(from, &run[..len], rx).await;
            len = 0;
        }
        from = id;
        run[len] = datagram;
        len += 1;
    }
    if len > 0 {
        relay.relay_datagrams(from, &run[..len], rx).await;
    }
}

/// One coordinator replica: where it is and how to reach it.
pub struct Coordinator {
    pub endpoint: Endpoint,
    pub connector: Connector,
}

impl Coordinator {
    /// One per URL of the configured list (see [`failover::parse_urls`]).
    pub fn from_list(
        list: &str,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Vec<Coordinator>, TransportError> {
        failover::parse_urls(list)?
            .into_iter()
            .map(|endpoint| {
                Ok(Coordinator {
                    connector: Connector::new(&endpoint, ca_cert)?,
                    endpoint,
                })
            })
            .collect()
    }
}

pub struct ControlClient {
    /// The deployment's replicas, in the order given; the node stays with the
    /// one it reached until that connection is lost.
    pub coordinators: Vec<Coordinator>,
    /// The URL of the replica the node is (or was last) connected to.
    pub current_url: Arc<std::sync::Mutex<String>>,
    pub node_id: NodeId,
    pub credential: String,
    pub connected: Arc<AtomicBool>,
    /// Latest control-stream round trip in microseconds, for netcheck.
    pub rtt_us: Arc<AtomicU64>,
    pub events: mpsc::Sender<ControlEvent>,
    pub relay: Arc<dyn RelayReceiver>,
    /// Delays between rounds of attempts: [`RECONNECT_BASE`] doubling to
    /// [`RECONNECT_CAP`] (see [`Failover`]).
    pub backoff: Backoff,
    /// See [`WRITE_TIMEOUT`].
    pub write_timeout: Duration,
}

/// The usual reconnect schedule.
pub fn reconnect_backoff() -> Backoff {
    Backoff::new(RECONNECT_BASE, RECONNECT_CAP)
}

impl ControlClient {
    /// Runs until shutdown. Every failed attempt (and every lost session) is
    /// logged once with the delay until the next attempt.
    pub async fn run(
        self,
        mut outbound: mpsc::Receiver<Outbound>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut failover = Failover::new(self.coordinators.len(), self.backoff.clone());
        let authorization = bearer(self.node_id, &self.credential);
        let mut refused = false;
        let mut held = HeldNetmap::new(self.node_id);
        loop {
            let coordinator = &self.coordinators[failover.current()];
            let url = coordinator.endpoint.ws_url(CONNECT_PATH);
            let attempt = coordinator.connector.websocket_holding(
                &coordinator.endpoint,
                CONNECT_PATH,
                &authorization,
                held.digest(),
            );
            let result = tokio::select! {
                r = attempt => r,
                _ = shutdown.changed() => return,
            };
            let (failure, delay) = match result {
                Ok(ws) => {
                    failover.connected();
                    refused = false;
                    tracing::info!("connected to coordinator {url}");
                    if let Ok(mut current) = self.current_url.lock() {
                        current.clone_from(&coordinator.endpoint.url());
                    }
                    self.connected.store(true, Ordering::SeqCst);
                    let _ = self.events.send(ControlEvent::Connected).await;
                    let why = self
                        .session(ws, &mut outbound, &mut shutdown, &mut held)
                        .await;
                    held.session_ended();
                    self.connected.store(false, Ordering::SeqCst);
                    let _ = self.events.send(ControlEvent::Disconnected).await;
                    if *shutdown.borrow() {
                        return;
                    }
                    (
                        format!(
                            "lost coordinator connection: {why} (established peers keep working)"
                        ),
                        failover.lost(rand::random()),
                    )
                }
                // Not fatal: a proxy may say 401 for a while, and the data plane
                // keeps serving peers that still know us. Say so loudly, once.
                Err(TransportError::Refused(401)) => {
                    if !refused {
                        tracing::error!(
                            "the coordinator refuses this node's credential (HTTP 401): the node was \
                             removed, or the coordinator lost its record; to enrol again, stop overlayd, \
                             delete node.json in its state directory and run 'overlayd up --auth-key KEY'; \
                             retrying meanwhile"
                        );
                    }
                    refused = true;
                    (
                        "the coordinator refuses this node's credential (HTTP 401)".to_owned(),
                        failover.failed(rand::random()),
                    )
                }
                Err(e) => (
                    format!("cannot connect to coordinator {url}: {e}"),
                    failover.failed(rand::random()),
                ),
            };
            let next = self.coordinators[failover.current()].endpoint.url();
            tracing::warn!(
                "{failure}; retrying {next} in {:.1}s (round {})",
                delay.as_secs_f64(),
                failover.rounds() + 1
            );
            // Drop what queued up meanwhile: relayed packets and signals are stale.
            while outbound.try_recv().is_ok() {}
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn session<S>(
        &self,
        mut ws: tokio_tungstenite::WebSocketStream<S>,
        outbound: &mut mpsc::Receiver<Outbound>,
        shutdown: &mut watch::Receiver<bool>,
        held: &mut HeldNetmap,
    ) -> String
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut ping = tokio::time::interval(PING_INTERVAL);
        let mut last_heard = Instant::now();
        let mut ping_sent: Option<(u64, Instant)> = None;
        let mut rx = RxScratch::default();
        // Relayed datagrams go in batches once the coordinator answered our
        // hello (one that predates batches drops it as a frame to nobody).
        let mut batches = false;
        if let Err(e) = self
            .send(&mut ws, Message::binary(RELAY_HELLO.to_vec()))
            .await
        {
            return e;
        }
        loop {
            tokio::select! {
                msg = ws.next() => {
                    last_heard = Instant::now();
                    match msg {
                        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMsg>(&text) {
                            Ok(ServerMsg::Pong { nonce }) => {
                                if let Some((sent_nonce, at)) = ping_sent.take() {
                                    if sent_nonce == nonce {
                                        let us = at.elapsed().as_micros().max(1);
                                        self.rtt_us.store(u64::try_from(us).unwrap_or(u64::MAX), Ordering::Relaxed);
                                    }
                                }
                            }
                            Ok(msg) => {
                                held.observe(&msg);
                                let _ = self.events.send(ControlEvent::Message(Box::new(msg))).await;
                            }
                            Err(e) => tracing::debug!("ignoring unknown message from coordinator: {e}"),
                        },
                        Some(Ok(Message::Binary(frame))) => match RelayMessage::parse(&frame) {
                            Ok(msg) => {
                                batches |= msg.is_batch();
                                deliver(self.relay.as_ref(), msg, &mut rx).await;
                            }
                            Err(e) => {
                                self.relay.bad_frame();
                                tracing::debug!("bad relay message from the coordinator: {e}");
                            }
                        },
                        Some(Ok(Message::Close(frame))) => {
                            return match frame {
                                Some(f) => format!("coordinator closed the session: {}", f.reason),
                                None => "coordinator closed the session".into(),
                            };
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return e.to_string(),
                        None => return "connection closed".into(),
                    }
                }
                item = outbound.recv() => {
                    let Some(first) = item else {
                        return "shutting down".into();
                    };
                    if let Err(e) = self.write_round(&mut ws, first, outbound, batches).await {
                        return e;
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > SILENCE_LIMIT {
                        return format!("no word from the coordinator for {}s", SILENCE_LIMIT.as_secs());
                    }
                    let nonce = rand::random();
                    ping_sent = Some((nonce, Instant::now()));
                    let msg = ClientMsg::Ping { nonce };
                    let text = Message::text(serde_json::to_string(&msg).unwrap_or_default());
                    if let Err(e) = self.send(&mut ws, text).await {
                        return e;
                    }
                }
                _ = shutdown.changed() => {
                    let _ = tokio::time::timeout(self.write_timeout, ws.close(None)).await;
                    return "shutting down".into();
                }
            }
        }
    }

    /// Writes `first` and what is queued behind it (up to [`WRITE_ROUND`]
    /// items) with one flush, within [`ControlClient::write_timeout`]. With
    /// `batches`, relayed datagrams go as batch messages, in order with the
    /// control messages between them; else each as a single frame.
    async fn write_round<S>(
        &self,
        ws: &mut tokio_tungstenite::WebSocketStream<S>,
        first: Outbound,
        outbound: &mut mpsc::Receiver<Outbound>,
        batches: bool,
    ) -> Result<(), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let round = async {
            let mut batch = RelayBatch::new(MAX_FRAME_BYTES, RELAY_BATCH_START);
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(item) = next.take() {
                match item {
                    Outbound::Relay { to, datagram } if batches => {
                        if !batch.push(to, &datagram) {
                            ws.feed(Message::binary(batch.take())).await?;
                            if !batch.push(to, &datagram) {
                                // Larger than any message the coordinator takes.
                                self.relay.bad_frame();
                            }
                        }
                    }
                    other => {
                        if !batch.is_empty() {
                            ws.feed(Message::binary(batch.take())).await?;
                        }
                        let msg = match other {
                            Outbound::Msg(m) => {
                                Message::text(serde_json::to_string(&m).unwrap_or_default())
                            }
                            Outbound::Relay { to, datagram } => {
                                Message::binary(encode_relay_frame(to, &datagram))
                            }
                        };
                        ws.feed(msg).await?;
                    }
                }
                taken += 1;
                if taken < WRITE_ROUND {
                    next = outbound.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                ws.feed(Message::binary(batch.into_message())).await?;
            }
            ws.flush().await
        };
        match tokio::time::timeout(self.write_timeout, round).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "a write to the coordinator took over {:.1}s",
                self.write_timeout.as_secs_f64()
            )),
        }
    }

    /// Writes one message within [`ControlClient::write_timeout`].
    async fn send<S>(
        &self,
        ws: &mut tokio_tungstenite::WebSocketStream<S>,
        msg: Message,
    ) -> Result<(), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.write_timeout, ws.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "a write to the coordinator took over {:.1}s",
                self.write_timeout.as_secs_f64()
            )),
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
