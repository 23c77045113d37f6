//! One simulated node's control session: the WebSocket handshake, the netmap
//! (a Welcome, and for a large mesh the PeerBatch parts after it), then a
//! reader task that counts every frame and, once the measurement is
//! armed, timestamps each `peer_upsert` the moment it is read.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use overlay_proto::coord::{
    bearer, format_digest, peer_digest, ServerMsg, CONNECT_PATH, NETMAP_DIGEST_HEADER,
};
use overlay_proto::NodeId;

/// How long the server gets to send each part of the netmap.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// tungstenite reads into a 128 KiB buffer per connection by default: 1.3 GB
/// for 10 000 sessions. Netmap deltas are a few hundred bytes.
const READ_BUFFER_BYTES: usize = 8 * 1024;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A `peer_upsert` seen by session `session` after the measurement was armed.
#[derive(Debug, Clone, Copy)]
pub struct Upsert {
    pub session: usize,
    pub at: Instant,
    pub about: NodeId,
    pub online: bool,
}

/// What every reader task shares with the driver.
#[derive(Default)]
pub struct Shared {
    /// Text frames read by all sessions, Welcomes excluded.
    pub frames: AtomicU64,
    /// Sessions that got their Welcome.
    pub connected: AtomicUsize,
    /// Set just before the newcomer registers: from then on readers parse
    /// `peer_upsert` frames. Before, they only count, so setup stays cheap.
    pub armed: AtomicBool,
    /// `signal` frames read (ICE offers, answers, candidates, restart
    /// requests and NAT reports that real nodes send the simulated ones).
    pub signals: AtomicU64,
    /// Sessions that read at least one `signal` frame.
    pub signaled: AtomicUsize,
    /// Sessions the server closed (or that failed), and the first few reasons.
    pub closed: AtomicUsize,
    pub close_reasons: Mutex<Vec<String>>,
}

/// Opens a TCP connection to `server`, from `source` when one is given (to
/// spread many connections over several loopback addresses).
pub async fn dial(server: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(server)
            .await
            .with_context(|| format!("connecting to {server}"));
    };
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding {source}"))?;
    socket
        .connect(server)
        .await
        .with_context(|| format!("connecting to {server} from {source}"))
}

/// The netmap a session was welcomed with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Netmap {
    /// The Welcome and the PeerBatch messages after it.
    pub parts: usize,
    /// Peers listed, over all parts.
    pub peers: usize,
    /// Bytes over all parts.
    pub bytes: usize,
    /// The largest part: what a node must accept in one frame.
    pub largest: usize,
    /// The server said the netmap the node had is current (no peers sent).
    pub resumed: bool,
}

/// A netmap part as far as the load generator reads it.
#[derive(serde::Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    peers: Count,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    last: bool,
    #[serde(default)]
    resumed: bool,
}

/// The length of a JSON array, its elements skipped unparsed.
#[derive(Default)]
struct Count(usize);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(Visitor)
    }
}

/// Connects node `id` and reads its whole netmap. `holds`: the digest of the
/// netmap the node says it has (`NETMAP_DIGEST_HEADER`), for a resume.
pub async fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    id: NodeId,
    credential: &str,
    holds: Option<u64>,
) -> anyhow::Result<(Ws, Netmap)> {
    let mut ws = handshake(server, source, id, credential, holds).await?;
    let mut netmap = Netmap::default();
    loop {
        let text = next_part(&mut ws, id, netmap.parts).await?;
        netmap.parts += 1;
        netmap.bytes += text.len();
        netmap.largest = netmap.largest.max(text.len());
        // Counted, not deserialized: at 20,000 nodes the load generator
        // would otherwise spend more time parsing netmaps than the server
        // spends sending them (the server's texts are checked in its tests).
        let part: Part = serde_json::from_str(text.as_str())
            .with_context(|| format!("node {id}: unparsable netmap part {}", netmap.parts))?;
        netmap.peers += part.peers.0;
        let done = match part.kind.as_str() {
            "welcome" if netmap.parts == 1 => {
                netmap.resumed = part.resumed;
                !part.more
            }
            "peer_batch" if netmap.parts > 1 => part.last,
            other => bail!(
                "node {id}: part {} of the netmap is a {other}",
                netmap.parts
            ),
        };
        if done {
            return Ok((ws, netmap));
        }
    }
}

/// The mesh as node `id` sees it, for the digests of the other sessions'
/// netmaps: connects it, reads its whole netmap, and returns the session,
/// its own record's digest and every peer's.
pub async fn connect_digests(
    server: SocketAddr,
    source: Option<IpAddr>,
    id: NodeId,
    credential: &str,
) -> anyhow::Result<(Ws, u64, HashMap<NodeId, u64>)> {
    let mut ws = handshake(server, source, id, credential, None).await?;
    let mut peers = HashMap::new();
    let mut own = None;
    loop {
        let text = next_part(&mut ws, id, peers.len()).await?;
        let (list, done) = match serde_json::from_str::<ServerMsg>(text.as_str()) {
            Ok(ServerMsg::Welcome {
                node, peers, more, ..
            }) if own.is_none() => {
                own = Some(peer_digest(&node));
                (peers, !more)
            }
            Ok(ServerMsg::PeerBatch { peers, last }) if own.is_some() => (peers, last),
            other => bail!("node {id}: unexpected netmap part {other:?}"),
        };
        peers.extend(list.iter().map(|p| (p.id, peer_digest(p))));
        if done {
            return Ok((ws, own.unwrap_or_default(), peers));
        }
    }
}

/// The WebSocket handshake of node `id`'s session.
async fn handshake(
    server: SocketAddr,
    source: Option<IpAddr>,
    id: NodeId,
    credential: &str,
    holds: Option<u64>,
) -> anyhow::Result<Ws> {
    let tcp = dial(server, source).await?;
    tcp.set_nodelay(true)?;
    let mut request = format!("ws://{server}{CONNECT_PATH}").into_client_request()?;
    request.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::from_str(&bearer(id, credential))
            .context("credential is not a header value")?,
    );
    if let Some(digest) = holds {
        request.headers_mut().insert(
            NETMAP_DIGEST_HEADER,
            HeaderValue::from_str(&format_digest(digest))?,
        );
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        MaybeTlsStream::Plain(tcp),
        Some(config),
    )
    .await
    .with_context(|| format!("WebSocket handshake for node {id}"))?;
    Ok(ws)
}

/// The next text frame of node `id`'s netmap, `parts` of which were read.
async fn next_part(ws: &mut Ws, id: NodeId, parts: usize) -> anyhow::Result<Utf8Bytes> {
    loop {
        let next = tokio::time::timeout(WELCOME_TIMEOUT, ws.next())
            .await
            .with_context(|| {
                format!(
                    "node {id}: netmap part {} not within {WELCOME_TIMEOUT:?}",
                    parts + 1
                )
            })?;
        match next {
            Some(Ok(Message::Text(text))) => return Ok(text),
            // tungstenite answers pings by itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => {
                bail!("node {id}: closed during the netmap: {frame:?}")
            }
            Some(Ok(other)) => bail!("node {id}: unexpected frame in the netmap: {other:?}"),
            Some(Err(e)) => bail!("node {id}: {e}"),
            None => bail!("node {id}: connection ended during the netmap"),
        }
    }
}

/// Reads `ws` until it ends. Reading also answers the server's keepalive
/// pings (tungstenite queues the pong and flushes it on the next read).
/// Signals from real nodes are counted, never answered: a simulated node
/// looks like a peer that is online but never sends.
pub async fn read_loop(
    session: usize,
    mut ws: Ws,
    shared: Arc<Shared>,
    upserts: mpsc::UnboundedSender<Upsert>,
) {
    let mut signaled = false;
    let reason = loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let at = Instant::now();
                shared.frames.fetch_add(1, Ordering::Relaxed);
                if text.contains("\"signal\"")
                    && matches!(serde_json::from_str(&text), Ok(ServerMsg::Signal { .. }))
                {
                    shared.signals.fetch_add(1, Ordering::Relaxed);
                    if !std::mem::replace(&mut signaled, true) {
                        shared.signaled.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if shared.armed.load(Ordering::Relaxed) && text.contains("\"peer_upsert\"") {
                    if let Ok(ServerMsg::PeerUpsert { peer }) = serde_json::from_str(&text) {
                        let _ = upserts.send(Upsert {
                            session,
                            at,
                            about: peer.id,
                            online: peer.online,
                        });
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => break format!("closed by server: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => break format!("error: {e}"),
            None => break "connection ended".to_string(),
        }
    };
    shared.closed.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut reasons) = shared.close_reasons.lock() {
        if reasons.len() < 5 {
            reasons.push(format!("session {session}: {reason}"));
        }
    }
}
