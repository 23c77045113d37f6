//! A hostile node for the lab: it takes an enrolled node's identity (its state
//! directory; that node's own daemon must be stopped) and attacks one peer through
//! the coordinator, the way a malicious member of the mesh could.
//!
//! ```text
//! hostile_node STATE_DIR offer-flood PEER RATE SECS
//!     seals RATE fresh ICE offers a second to PEER for SECS seconds; prints
//!     "sent=N answers=A signals=S" (what PEER sent back while it lasted)
//! hostile_node STATE_DIR ping PEER DST
//!     a WireGuard session with PEER over the coordination relay; sends three ICMP
//!     echo requests to DST from our mesh address; prints "replies=N"
//! hostile_node STATE_DIR turn-flood COUNT
//!     asks the first TURN server of our ICE configuration for COUNT allocations
//!     with our one credential; prints "allocated=A refused=R"
//! ```
//!
//! Only ever run inside lab namespaces, against the lab's coordinator.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use futures_util::{SinkExt, StreamExt};
use overlay_proto::coord::{
    bearer, decode_relay_frame, encode_relay_frame, ClientMsg, IceConfig, PeerInfo, ServerMsg,
    CONNECT_PATH,
};
use overlay_proto::signal::{PeerSignal, SealedSignal};
use overlayd::control::transport::{Connector, Endpoint, Io};
use overlayd::identity::{decode_public_key, StateDir};
use overlayd::seal::Sealer;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<Box<dyn Io>>;

/// How long the ping mode waits for replies after its last request.
const REPLY_WAIT: Duration = Duration::from_secs(3);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: hostile_node STATE_DIR (offer-flood PEER RATE SECS | ping PEER DST | turn-flood COUNT)";
    let (Some(dir), Some(mode), Some(peer)) = (args.first(), args.get(1), args.get(2)) else {
        bail!(usage);
    };
    let me = Identity::load(Path::new(dir))?;
    let (ws, peers, ice) = me.connect().await?;
    if mode == "turn-flood" {
        let count: usize = peer.parse().context("COUNT")?;
        let result = turn_flood(&ice, count).await;
        drop(ws);
        return result;
    }
    let peer = peers
        .into_iter()
        .find(|p| &p.name == peer)
        .with_context(|| format!("no peer named {peer} in the netmap"))?;
    let peer_key = decode_public_key(&peer.public_key).context("peer's public key")?;
    match (mode.as_str(), args.get(3), args.get(4)) {
        ("offer-flood", Some(rate), Some(secs)) => {
            let rate: f64 = rate.parse().context("RATE")?;
            let secs: u64 = secs.parse().context("SECS")?;
            offer_flood(&me, ws, &peer, peer_key, rate, Duration::from_secs(secs)).await
        }
        ("ping", Some(dst), None) => {
            let dst: Ipv4Addr = dst.parse().context("DST")?;
            ping(&me, ws, &peer, peer_key, dst).await
        }
        _ => bail!(usage),
    }
}

struct Identity {
    id: u64,
    mesh_ip: Ipv4Addr,
    secret: [u8; 32],
    credential: String,
    coordinator: String,
}

impl Identity {
    fn load(dir: &Path) -> anyhow::Result<Identity> {
        let state = StateDir::open(dir)?;
        let keys = state.keypair()?;
        let enrolment = state.enrolment()?.context("the node is not enrolled")?;
        Ok(Identity {
            id: enrolment.node_id,
            mesh_ip: enrolment.mesh_ip,
            secret: keys.secret.to_bytes(),
            credential: enrolment.credential,
            coordinator: enrolment.coordinator,
        })
    }

    /// The control WebSocket, and the netmap and ICE configuration of its `Welcome`.
    async fn connect(&self) -> anyhow::Result<(Ws, Vec<PeerInfo>, IceConfig)> {
        let endpoint = Endpoint::parse(&self.coordinator)?;
        let connector = Connector::new(&endpoint, None)?;
        let mut ws = connector
            .websocket(&endpoint, CONNECT_PATH, &bearer(self.id, &self.credential))
            .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    if let Ok(ServerMsg::Welcome { peers, ice, .. }) = serde_json::from_str(&text) {
                        return Ok((ws, peers, ice));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("control stream: {e}"),
                None => bail!("the coordinator closed the control stream"),
            }
        }
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

async fn offer_flood(
    me: &Identity,
    ws: Ws,
    peer: &PeerInfo,
    peer_key: [u8; 32],
    rate: f64,
    duration: Duration,
) -> anyhow::Result<()> {
    let sealer = Sealer::new(me.secret, peer_key);
    let (mut tx, mut rx) = ws.split();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let end = Instant::now() + duration;
    let mut counter = unix_micros();
    let (mut sent, mut answers, mut signals) = (0u64, 0u64, 0u64);
    while Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => {
                counter += 1;
                let offer = SealedSignal {
                    from: me.id,
                    to: peer.id,
                    counter,
                    signal: PeerSignal::Offer {
                        session: rand::random(),
                        ufrag: token(8),
                        pwd: token(24),
                        direct_only: false,
                    },
                };
                let msg = ClientMsg::Signal { to: peer.id, from: None, payload: sealer.seal(&offer) };
                tx.send(Message::text(serde_json::to_string(&msg)?)).await?;
                sent += 1;
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Ok(ServerMsg::Signal { from, payload }) = serde_json::from_str(&text) {
                        if from == peer.id {
                            signals += 1;
                            if let Ok(SealedSignal { signal: PeerSignal::Answer { .. }, .. }) = sealer.open(&payload) {
                                answers += 1;
                            }
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("control stream: {e}"),
                None => bail!("the coordinator closed our control stream"),
            }
        }
    }
    println!("sent={sent} answers={answers} signals={signals}");
    Ok(())
}

async fn ping(
    me: &Identity,
    ws: Ws,
    peer: &PeerInfo,
    peer_key: [u8; 32],
    dst: Ipv4Addr,
) -> anyhow::Result<()> {
    let mut tunn = Tunn::new(
        StaticSecret::from(me.secret),
        PublicKey::from(peer_key),
        None,
        None,
        rand::random::<u32>() >> 8,
        None,
    );
    let (mut tx, mut rx) = ws.split();
    let mut out = vec![0u8; 65_536];
    let ident: u16 = rand::random();
    let mut replies = 0u32;
    let mut to_send: Vec<Vec<u8>> = Vec::new();
    for seq in 0..3u16 {
        let request =
            overlayd::dataplane::icmp::echo_request(me.mesh_ip, dst, ident, seq, b"hostile");
        if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&request, &mut out) {
            to_send.push(d.to_vec());
        }
    }
    let end = Instant::now() + REPLY_WAIT;
    loop {
        for d in to_send.drain(..) {
            let frame = encode_relay_frame(peer.id, &d);
            tx.send(Message::binary(frame)).await?;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let msg = match tokio::time::timeout(left, rx.next()).await {
            Err(_) => break,
            Ok(Some(Ok(msg))) => msg,
            Ok(Some(Err(e))) => bail!("control stream: {e}"),
            Ok(None) => bail!("the coordinator closed our control stream"),
        };
        let Message::Binary(frame) = msg else {
            continue;
        };
        let Some((from, datagram)) = decode_relay_frame(&frame) else {
            continue;
        };
        if from != peer.id {
            continue;
        }
        match tunn.decapsulate(None, datagram, &mut out) {
            TunnResult::WriteToNetwork(d) => {
                // The handshake answer, then the requests queued meanwhile.
                to_send.push(d.to_vec());
                while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], &mut out) {
                    to_send.push(d.to_vec());
                }
            }
            TunnResult::WriteToTunnelV4(packet, _)
                if overlayd::dataplane::icmp::echo_reply(packet)
                    .is_some_and(|(_, i, _)| i == ident) =>
            {
                replies += 1;
            }
            _ => {}
        }
    }
    println!("replies={replies}");
    Ok(())
}

/// One TURN client per allocation (an allocation is per 5-tuple), all with the
/// same credential, kept until every attempt is done.
async fn turn_flood(ice: &IceConfig, count: usize) -> anyhow::Result<()> {
    let server = ice
        .turn
        .first()
        .context("the coordinator hands out no TURN server")?;
    let url = server.urls.first().context("TURN server without a URL")?;
    let addr = overlayd::ice::netcheck::server_addr(url).context("TURN URL")?;
    let mut held = Vec::new();
    let (mut allocated, mut refused) = (0usize, 0usize);
    for _ in 0..count {
        let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
        let conn: std::sync::Arc<dyn webrtc_util::Conn + Send + Sync> = std::sync::Arc::new(socket);
        let client = turn::client::Client::new(turn::client::ClientConfig {
            stun_serv_addr: addr.clone(),
            turn_serv_addr: addr.clone(),
            username: server.username.clone(),
            password: server.credential.clone(),
            realm: String::new(),
            software: String::new(),
            rto_in_ms: 0,
            conn,
            vnet: None,
        })
        .await?;
        client.listen().await?;
        match tokio::time::timeout(Duration::from_secs(3), client.allocate()).await {
            Ok(Ok(relay)) => {
                allocated += 1;
                held.push((client, relay));
            }
            _ => {
                refused += 1;
                let _ = client.close().await;
            }
        }
    }
    println!("allocated={allocated} refused={refused}");
    for (client, _relay) in held {
        let _ = client.close().await;
    }
    Ok(())
}
