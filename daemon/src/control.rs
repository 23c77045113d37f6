//! The node's side of the conversation with the coordination server (like
//! Tailscale's `controlclient`): enrolment, then one WebSocket kept open with
//! capped exponential backoff. Relay frames go straight to the data plane; every
//! other message goes to the engine.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use overlay_proto::coord::{
    bearer, decode_relay_frame, error_code, ApiError, ChallengeResponse, ClientMsg,
    RegisterResponse, ServerMsg, CHALLENGE_PATH, CONNECT_PATH, REGISTER_PATH,
};
use overlay_proto::NodeId;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::backoff::Backoff;
use crate::dataplane::{DataPlane, Outbound, BUF_SIZE};
use crate::transport::{Connector, Endpoint, TransportError};

const RECONNECT_BASE: Duration = Duration::from_millis(500);
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// We ping the server this often; its answers show the connection is alive.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// A server silent for this long is gone, even if TCP has not noticed.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);

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

/// Enrolment attempts when the coordinator is busy (its table of challenges
/// is full) or voided our challenge (it restarted between our two calls).
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
    Message(ServerMsg),
    Disconnected,
}

pub struct ControlClient {
    pub connector: Connector,
    pub endpoint: Endpoint,
    pub node_id: NodeId,
    pub credential: String,
    pub connected: Arc<AtomicBool>,
    /// Latest control-stream round trip in microseconds, for netcheck.
    pub rtt_us: Arc<AtomicU64>,
    pub events: mpsc::Sender<ControlEvent>,
    pub dataplane: Arc<DataPlane>,
}

impl ControlClient {
    /// Runs until shutdown or until the server refuses our credential.
    pub async fn run(
        self,
        mut outbound: mpsc::Receiver<Outbound>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_CAP);
        let authorization = bearer(self.node_id, &self.credential);
        let url = self.endpoint.ws_url(CONNECT_PATH);
        let mut refused = false;
        loop {
            let attempt = self
                .connector
                .websocket(&self.endpoint, CONNECT_PATH, &authorization);
            let result = tokio::select! {
                r = attempt => r,
                _ = shutdown.changed() => return,
            };
            match result {
                Ok(ws) => {
                    backoff.reset();
                    refused = false;
                    tracing::info!("connected to coordinator {url}");
                    self.connected.store(true, Ordering::SeqCst);
                    let _ = self.events.send(ControlEvent::Connected).await;
                    let why = self.session(ws, &mut outbound, &mut shutdown).await;
                    self.connected.store(false, Ordering::SeqCst);
                    let _ = self.events.send(ControlEvent::Disconnected).await;
                    if *shutdown.borrow() {
                        return;
                    }
                    tracing::warn!("lost coordinator connection: {why}; reconnecting (established peers keep working)");
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
                }
                Err(e) => tracing::warn!("{e}"),
            }
            let delay = backoff.next_delay(rand::random());
            tracing::debug!("reconnecting in {delay:?} (attempt {})", backoff.attempts());
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
    ) -> String
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut ping = tokio::time::interval(PING_INTERVAL);
        let mut last_heard = Instant::now();
        let mut ping_sent: Option<(u64, Instant)> = None;
        let mut out = vec![0u8; BUF_SIZE];
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
                            Ok(msg) => { let _ = self.events.send(ControlEvent::Message(msg)).await; }
                            Err(e) => tracing::debug!("ignoring unknown message from coordinator: {e}"),
                        },
                        Some(Ok(Message::Binary(frame))) => {
                            if let Some((from, datagram)) = decode_relay_frame(&frame) {
                                if let Some(peer) = self.dataplane.peer(from) {
                                    self.dataplane.receive(&peer, datagram, &mut out).await;
                                }
                            }
                        }
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
                    let msg = match item {
                        Some(Outbound::Msg(m)) => Message::text(serde_json::to_string(&m).unwrap_or_default()),
                        Some(Outbound::Relay(frame)) => Message::binary(frame),
                        None => return "shutting down".into(),
                    };
                    if let Err(e) = ws.send(msg).await {
                        return e.to_string();
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > SILENCE_LIMIT {
                        return format!("no word from the coordinator for {}s", SILENCE_LIMIT.as_secs());
                    }
                    let nonce = rand::random();
                    ping_sent = Some((nonce, Instant::now()));
                    let msg = ClientMsg::Ping { nonce };
                    if let Err(e) = ws.send(Message::text(serde_json::to_string(&msg).unwrap_or_default())).await {
                        return e.to_string();
                    }
                }
                _ = shutdown.changed() => {
                    let _ = ws.close(None).await;
                    return "shutting down".into();
                }
            }
        }
    }
}
