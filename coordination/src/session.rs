//! One node's control session over an authenticated WebSocket: the Welcome,
//! then a loop that forwards deltas, signals and relay frames to the node
//! and handles what the node sends, within the session's limits.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use overlay_proto::coord::{
    encode_relay_frame, error_code, ClientMsg, RelayMessage, ServerMsg, MAX_FRAME_BYTES,
    RELAY_BATCH_V1, RELAY_HELLO, RELAY_HELLO_ID, RELAY_RECORD_HEADER_LEN,
};
use overlay_proto::{NodeId, PROTOCOL_VERSION};

use crate::config::Limits;
use crate::hub::{AttachError, Attached, Delta, Hub, SignalError};
use crate::ice::IceSettings;
use crate::metrics::{Metrics, Rejected, RelayDrop};
use crate::policy::{may_see, View};
use crate::store::now_unix;
use crate::welcome;
use overlay_proto::ratelimit::TokenBucket;

/// How long one write to a node may take before the session is dropped;
/// bounds what a stalled reader can cost the server.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the node's reply to our close frame.
const CLOSE_LINGER: Duration = Duration::from_millis(500);
/// Most deltas written to a node with one flush. When many nodes join at
/// once every session has a queue of deltas, and a write per delta would make
/// system calls the server's main cost.
const DELTA_BATCH: usize = 64;
/// Most relay messages written to a node with one flush: what is queued
/// goes out in one system call, and a busy relay still lets the loop serve
/// control messages between rounds.
const RELAY_ROUND: usize = 64;

/// A session sending text messages faster than `FLOOD_FACTOR` × its rate
/// (`Limits::msg_rate`), beyond `FLOOD_FACTOR` × its burst, is closed. Below
/// that, messages over the rate are only dropped and counted: a node that a
/// peer provokes into a burst of signaling (many ICE restarts at once) must
/// not be knocked offline for it. With the defaults (200/s, burst 400) a
/// session is closed only after sending more than 4,000 messages at once, or
/// above 2,000 messages a second for seconds on end; parsing stays capped at
/// the rate, since dropped messages are never parsed.
pub const FLOOD_FACTOR: f64 = 10.0;

/// WebSocket close codes (RFC 6455 §7.4.1).
mod code {
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN: u16 = 1013;
    /// Private use: the session fell too far behind its deltas.
    pub const TOO_SLOW: u16 = 4008;
    /// Private use: nothing heard from the node for `idle_timeout`.
    pub const IDLE: u16 = 4009;
    pub const GONE: u16 = 4003;
}

/// What every session shares.
#[derive(Clone)]
pub struct SessionContext {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub ice: Arc<IceSettings>,
    pub network: Ipv4Net,
    /// The mesh's IPv6 prefix (`--network6`); nodes' mesh IPv6 addresses are in it.
    pub network6: Option<Ipv6Net>,
    /// `ServerMsg::Dns`, written once at start: every node gets the same,
    /// after its netmap.
    pub dns: Utf8Bytes,
    pub limits: Limits,
    pub shutdown: watch::Receiver<bool>,
    /// Dropped when the session ends; the server waits for all of them.
    pub done: mpsc::Sender<()>,
}

enum Flow {
    Continue,
    /// Send a close frame with this code and reason, then end.
    Close(u16, String),
    /// End without a close frame (the connection is gone or closing).
    End(String),
}

struct Session {
    node: NodeId,
    socket: WebSocket,
    ctx: SessionContext,
    text_bucket: TokenBucket,
    /// `FLOOD_FACTOR` × the text rate: empty means gross abuse.
    flood_bucket: TokenBucket,
    /// Whether this session was already told (and logged) that its messages
    /// are being dropped; once per session bounds both.
    warned_rate: bool,
    relay_bucket: TokenBucket,
    /// Whether the node said it decodes relay batches (`RELAY_HELLO`); until
    /// then it gets single frames.
    batches: bool,
    last_rx: Instant,
    /// The node's class under the policy: which deltas it may see.
    view: View,
}

fn to_text(msg: &ServerMsg) -> Message {
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(msg).unwrap_or_default(),
    ))
}

fn error_msg(error: &str, message: &str, about: Option<NodeId>) -> Message {
    to_text(&ServerMsg::Error {
        error: error.into(),
        message: message.into(),
        about,
    })
}

/// A close reason fits in a control frame (123 bytes).
fn close_frame(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    }))
}

/// Runs the session of `node` until either side ends it. `holds` is the
/// digest of the netmap the node said it holds (`NETMAP_DIGEST_HEADER`).
pub async fn run(
    socket: WebSocket,
    node: NodeId,
    name: String,
    holds: Option<u64>,
    ctx: SessionContext,
) {
    let now = Instant::now();
    let limits = ctx.limits.clone();
    let mut session = Session {
        node,
        socket,
        text_bucket: TokenBucket::new(limits.msg_rate, limits.msg_burst, now.into_std()),
        flood_bucket: TokenBucket::new(
            limits.msg_rate * FLOOD_FACTOR,
            limits.msg_burst * FLOOD_FACTOR,
            now.into_std(),
        ),
        warned_rate: false,
        relay_bucket: TokenBucket::new(limits.relay_rate, limits.relay_burst, now.into_std()),
        batches: false,
        last_rx: now,
        view: None,
        ctx,
    };
    if *session.ctx.shutdown.borrow() {
        session
            .close(code::GOING_AWAY, "server shutting down")
            .await;
        return;
    }
    let attached = match session.ctx.hub.attach(node) {
        Ok(a) => a,
        Err(e) => {
            let (c, reason) = match e {
                AttachError::UnknownNode => (code::GONE, "node removed"),
                AttachError::TooManySessions => {
                    session.ctx.metrics.reject(Rejected::TooManySessions);
                    (code::TRY_AGAIN, "too many sessions")
                }
            };
            session.close(c, reason).await;
            return;
        }
    };
    let session_id = attached.session_id;
    info!(node = node, name = %name, "session online");
    let reason = session.serve(attached, holds).await;
    if session.ctx.hub.detach(node, session_id) {
        info!(node = node, name = %name, reason = %reason, "session offline");
    } else {
        info!(node = node, name = %name, reason = %reason, "session closed");
    }
}

impl Session {
    async fn send(&mut self, msg: Message) -> Result<(), ()> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.socket.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        if self.send(close_frame(code, reason)).await.is_ok() {
            // Give the node a moment to answer the close handshake.
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                while let Some(Ok(m)) = self.socket.recv().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }

    /// The session loop; returns why it ended.
    async fn serve(&mut self, attached: Attached, holds: Option<u64>) -> String {
        let Attached {
            node,
            view,
            mut control,
            mut relay,
            relay_queued,
            mut deltas,
            mut close,
            stats,
            ..
        } = attached;
        let head = welcome::Head {
            protocol: PROTOCOL_VERSION,
            node,
            network: self.ctx.network,
            network6: self.ctx.network6,
            ice: self.ctx.ice.for_node(self.node, now_unix()),
            filter: view.as_ref().map(|c| std::sync::Arc::clone(&c.filter_json)),
        };
        self.view = view;
        // The netmap is read page by page while it is sent; the deltas that
        // arrive meanwhile wait in `deltas` and reach the node after the last
        // part (see the `welcome` module for why that is consistent). A node
        // that holds the netmap already gets a Welcome without it; the digest
        // is read after the subscription to `deltas` too, so the same holds.
        let resumed = holds.is_some_and(|d| self.ctx.hub.netmap_digest(self.node) == Some(d));
        if resumed {
            debug!(node = self.node, "netmap resumed");
            self.ctx
                .metrics
                .netmap_resumed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self
                .send(Message::Text(welcome::resumed_text(&head)))
                .await
                .is_err()
            {
                return "write failed".into();
            }
        } else if let Err(()) = self.send_netmap(&head).await {
            return "write failed".into();
        }
        // After the netmap, so the node has the names the settings are for.
        if self
            .send(Message::Text(self.ctx.dns.clone()))
            .await
            .is_err()
        {
            return "write failed".into();
        }

        let mut ping = tokio::time::interval(self.ctx.limits.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.tick().await;
        let mut shutdown = self.ctx.shutdown.clone();

        let (code, reason) = loop {
            let flow = tokio::select! {
                biased;
                _ = shutdown.changed() => Flow::Close(code::GOING_AWAY, "server shutting down".into()),
                reason = &mut close => match reason {
                    Ok(r) => {
                        let (c, text) = r.frame();
                        Flow::Close(c, text.into())
                    }
                    // The hub dropped us without a reason: removed while attaching.
                    Err(_) => Flow::Close(code::GONE, "session ended".into()),
                },
                delta = deltas.recv() => match delta {
                    Ok(d) => self.forward_deltas(d, &mut deltas).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.too_slow(),
                    Err(broadcast::error::RecvError::Closed) => Flow::Close(code::GOING_AWAY, "server shutting down".into()),
                },
                Some(text) = control.recv() => self.forward(Message::Text(text)).await,
                Some(msg) = relay.recv() => self.forward_relay(msg, &mut relay, &relay_queued).await,
                incoming = self.socket.recv() => match incoming {
                    Some(Ok(msg)) => {
                        self.last_rx = Instant::now();
                        self.handle(msg, &stats).await
                    }
                    Some(Err(e)) => {
                        debug!(node = self.node, error = %e, "websocket error");
                        // axum hides tungstenite's error type; its capacity
                        // error is recognisable by its text only.
                        if e.to_string().starts_with("Space limit exceeded") {
                            self.ctx.metrics.reject(Rejected::Oversized);
                            break (Some(code::TOO_BIG), format!("frame larger than {MAX_FRAME_BYTES} bytes"));
                        }
                        self.ctx.metrics.reject(Rejected::Protocol);
                        break (None, format!("websocket error: {e}"));
                    }
                    None => break (None, "connection closed".into()),
                },
                _ = ping.tick() => {
                    if self.last_rx.elapsed() > self.ctx.limits.idle_timeout {
                        Flow::Close(code::IDLE, "idle timeout".into())
                    } else {
                        self.forward(Message::Ping(Default::default())).await
                    }
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Close(c, r) => break (Some(c), r),
                Flow::End(r) => break (None, r),
            }
        };
        match code {
            Some(code) => self.close(code, &reason).await,
            // Lets tungstenite flush its reply to the node's close frame.
            None => {
                let _ = tokio::time::timeout(CLOSE_LINGER, self.socket.recv()).await;
            }
        }
        reason
    }

    /// The whole netmap: the Welcome and the PeerBatch parts after it.
    async fn send_netmap(&mut self, head: &welcome::Head) -> Result<(), ()> {
        let mut from = 0;
        let mut first = true;
        loop {
            let page = self
                .ctx
                .hub
                .netmap_page(self.node, from, self.ctx.limits.netmap_part_bytes);
            self.send(Message::Text(welcome::part_text(head, &page, first)))
                .await?;
            match page.next {
                Some(next) => from = next,
                None => return Ok(()),
            }
            first = false;
        }
    }

    fn too_slow(&self) -> Flow {
        self.ctx.metrics.reject(Rejected::SlowConsumer);
        Flow::Close(
            code::TOO_SLOW,
            "too slow to receive updates; reconnect".into(),
        )
    }

    /// Writes `first` and the deltas already queued behind it (up to
    /// [`DELTA_BATCH`]), then flushes once.
    async fn forward_deltas(
        &mut self,
        first: Delta,
        deltas: &mut broadcast::Receiver<Delta>,
    ) -> Flow {
        let node = self.node;
        let socket = &mut self.socket;
        let view = &mut self.view;
        let mut lagged = false;
        let written = tokio::time::timeout(WRITE_TIMEOUT, async {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(delta) = next.take() {
                match delta {
                    Delta::Peer {
                        about,
                        view: theirs,
                        text,
                    } => {
                        if about != node && may_see(view, &theirs) {
                            socket.feed(Message::Text(text)).await?;
                        }
                    }
                    Delta::Reclass(change) => {
                        if let Some(update) = change.nodes.get(&node) {
                            *view = update.view.clone();
                            if let Some(filter) = &update.filter {
                                socket.feed(Message::Text(filter.clone())).await?;
                            }
                            for (about, text) in update.msgs.iter() {
                                if *about != node {
                                    socket.feed(Message::Text(text.clone())).await?;
                                }
                            }
                        }
                    }
                }
                taken += 1;
                if taken == DELTA_BATCH {
                    break;
                }
                next = match deltas.try_recv() {
                    Ok(d) => Some(d),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => {
                        lagged = true;
                        None
                    }
                    // Closed is seen by the next `recv`.
                    Err(_) => None,
                };
            }
            socket.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) if lagged => self.too_slow(),
            Ok(Ok(())) => Flow::Continue,
            _ => Flow::End("write failed or timed out".into()),
        }
    }

    async fn forward(&mut self, msg: Message) -> Flow {
        match self.send(msg).await {
            Ok(()) => Flow::Continue,
            Err(()) => Flow::End("write failed or timed out".into()),
        }
    }

    async fn handle(&mut self, msg: Message, stats: &crate::hub::RelayStats) -> Flow {
        match msg {
            Message::Text(text) => {
                if text.len() > MAX_FRAME_BYTES {
                    self.ctx.metrics.reject(Rejected::Oversized);
                    return Flow::Close(
                        code::TOO_BIG,
                        format!("frame larger than {MAX_FRAME_BYTES} bytes"),
                    );
                }
                let now = std::time::Instant::now();
                if !self.flood_bucket.try_take(1.0, now) {
                    self.ctx.metrics.reject(Rejected::Flood);
                    warn!(node = self.node, "closing a session that floods messages");
                    return Flow::Close(code::POLICY, "message flood".into());
                }
                if !self.text_bucket.try_take(1.0, now) {
                    return self.drop_over_rate().await;
                }
                match serde_json::from_str::<ClientMsg>(&text) {
                    Ok(m) => self.handle_client_msg(m).await,
                    Err(e) => {
                        self.ctx.metrics.reject(Rejected::Malformed);
                        Flow::Close(code::INVALID_DATA, format!("malformed message: {e}"))
                    }
                }
            }
            Message::Binary(frame) => {
                if frame.len() > MAX_FRAME_BYTES {
                    self.ctx.metrics.reject(Rejected::Oversized);
                    return Flow::Close(
                        code::TOO_BIG,
                        format!("frame larger than {MAX_FRAME_BYTES} bytes"),
                    );
                }
                match RelayMessage::parse(&frame) {
                    Ok(msg) => self.relay(msg, stats).await,
                    Err(e) => {
                        self.ctx.metrics.reject(Rejected::BadRelayFrame);
                        Flow::Close(code::INVALID_DATA, e.to_string())
                    }
                }
            }
            Message::Close(_) => Flow::End("closed by node".into()),
            Message::Ping(_) | Message::Pong(_) => Flow::Continue,
        }
    }

    /// Routes a relay message from the node, within its byte rate; drops
    /// are counted, the sender is never told (UDP semantics). The node's
    /// first batch says it decodes batches: it gets the hello back, and
    /// batches from then on.
    async fn relay(&mut self, msg: RelayMessage<'_>, stats: &crate::hub::RelayStats) -> Flow {
        let now = std::time::Instant::now();
        match msg {
            RelayMessage::Single(to, payload) => {
                let cost = (payload.len() + 8) as f64;
                if !self.relay_bucket.try_take(cost, now) {
                    self.ctx.metrics.relay_drop(RelayDrop::RateLimited);
                    return Flow::Continue;
                }
                let _ = self.ctx.hub.relay(self.node, stats, to, payload);
                Flow::Continue
            }
            RelayMessage::Batch(records) => {
                let size = 1 + records.len();
                let bucket = &mut self.relay_bucket;
                let metrics = &self.ctx.metrics;
                let admitted = msg.records().filter(|(to, payload)| {
                    if *to == RELAY_HELLO_ID {
                        return false;
                    }
                    let cost = (payload.len() + RELAY_RECORD_HEADER_LEN) as f64;
                    let ok = bucket.try_take(cost, now);
                    if !ok {
                        metrics.relay_drop(RelayDrop::RateLimited);
                    }
                    ok
                });
                self.ctx.hub.relay_batch(self.node, stats, admitted, size);
                if self.batches {
                    return Flow::Continue;
                }
                self.batches = true;
                self.forward(Message::Binary(RELAY_HELLO.to_vec().into()))
                    .await
            }
        }
    }

    /// Writes `first` and the relay messages queued behind it (up to
    /// [`RELAY_ROUND`]), then flushes once. A node that has not said it
    /// decodes batches gets each batch as single frames.
    async fn forward_relay(
        &mut self,
        first: axum::body::Bytes,
        relay: &mut mpsc::Receiver<axum::body::Bytes>,
        queued: &std::sync::atomic::AtomicUsize,
    ) -> Flow {
        let batches = self.batches;
        let socket = &mut self.socket;
        let written = tokio::time::timeout(WRITE_TIMEOUT, async {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(msg) = next.take() {
                queued.fetch_sub(msg.len(), std::sync::atomic::Ordering::Relaxed);
                if !batches && msg.first() == Some(&RELAY_BATCH_V1) {
                    // The hub only queues well-formed batches.
                    let records = RelayMessage::parse(&msg).map(|m| m.records());
                    for (from, datagram) in records.into_iter().flatten() {
                        let frame = encode_relay_frame(from, datagram);
                        socket.feed(Message::Binary(frame.into())).await?;
                    }
                } else {
                    socket.feed(Message::Binary(msg)).await?;
                }
                taken += 1;
                if taken == RELAY_ROUND {
                    break;
                }
                next = relay.try_recv().ok();
            }
            socket.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => Flow::Continue,
            _ => Flow::End("write failed or timed out".into()),
        }
    }

    /// A text message over the rate: dropped unparsed and counted; the first
    /// one of the session is logged and reported to the node.
    async fn drop_over_rate(&mut self) -> Flow {
        self.ctx.metrics.reject(Rejected::RateLimited);
        if self.warned_rate {
            return Flow::Continue;
        }
        self.warned_rate = true;
        warn!(
            node = self.node,
            rate = self.ctx.limits.msg_rate,
            "session sends messages over its rate; dropping the excess (logged once per session)"
        );
        self.forward(error_msg(
            error_code::RATE_LIMITED,
            "too many messages: the excess is dropped",
            None,
        ))
        .await
    }

    async fn handle_client_msg(&mut self, msg: ClientMsg) -> Flow {
        let reply = match msg {
            ClientMsg::Signal { to, payload, .. } => {
                match self.ctx.hub.signal(self.node, to, payload) {
                    Ok(()) => None,
                    Err(e) => {
                        self.ctx
                            .metrics
                            .signaling_refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        match e {
                            SignalError::UnknownPeer => Some(error_msg(
                                error_code::UNKNOWN_PEER,
                                "no such node",
                                Some(to),
                            )),
                            SignalError::PeerOffline => Some(error_msg(
                                error_code::PEER_OFFLINE,
                                "that node is offline",
                                Some(to),
                            )),
                            SignalError::QueueFull => None,
                        }
                    }
                }
            }
            ClientMsg::RefreshIce => Some(to_text(&ServerMsg::IceConfig {
                ice: self.ctx.ice.for_node(self.node, now_unix()),
            })),
            ClientMsg::Ping { nonce } => Some(to_text(&ServerMsg::Pong { nonce })),
        };
        match reply {
            Some(m) => self.forward(m).await,
            None => Flow::Continue,
        }
    }
}
