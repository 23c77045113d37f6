//! `overlayd`'s enrolment against a scripted coordinator: the proof it sends
//! opens with its own key, it passes a stored credential along, and it asks
//! again with a fresh challenge when the coordinator is busy.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use overlay_proto::coord::{
    error_code, ApiError, ChallengeResponse, RegisterRequest, RegisterResponse, CHALLENGE_PATH,
    REGISTER_PATH,
};
use overlay_proto::enrol::{self, CHALLENGE_LEN};
use overlayd::control::transport::{Connector, Endpoint};
use overlayd::control::{self, Enrol, EnrolError};
use overlayd::identity::Keypair;

/// What the scripted coordinator saw and how it answers.
#[derive(Default)]
struct Script {
    /// Challenge requests to refuse with 503 before handing one out.
    busy: usize,
    challenges: usize,
    /// The ephemeral secret of the last challenge.
    secret: Option<[u8; 32]>,
    nonce: Option<[u8; CHALLENGE_LEN]>,
    registrations: Vec<RegisterRequest>,
}

async fn read_request(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "client closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < end + 4 + length {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed mid-body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        return (path, buf[end + 4..end + 4 + length].to_vec());
    }
}

async fn respond(stream: &mut TcpStream, status: u16, body: String) {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let _ = stream.shutdown().await;
}

fn refusal(code: &str) -> String {
    serde_json::to_string(&ApiError {
        error: code.into(),
        message: code.into(),
    })
    .unwrap()
}

/// Serves challenges and registrations as overlay-coord does, checking proofs.
async fn coordinator(script: Arc<Mutex<Script>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (path, body) = read_request(&mut stream).await;
            let (status, reply) = answer(&script, &path, &body);
            respond(&mut stream, status, reply).await;
        }
    });
    addr
}

fn answer(script: &Mutex<Script>, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = script.lock().unwrap();
    if path == CHALLENGE_PATH {
        if s.busy > 0 {
            s.busy -= 1;
            return (503, refusal(error_code::RATE_LIMITED));
        }
        s.challenges += 1;
        let secret: [u8; 32] = rand::random();
        let mut nonce = [0u8; CHALLENGE_LEN];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        s.secret = Some(secret);
        s.nonce = Some(nonce);
        let c = ChallengeResponse {
            challenge: B64.encode(nonce),
            server_key: B64.encode(enrol::public_key(&secret)),
            expires_in: 60,
        };
        return (200, serde_json::to_string(&c).unwrap());
    }
    assert_eq!(path, REGISTER_PATH);
    let req: RegisterRequest = serde_json::from_slice(body).unwrap();
    let (Some(secret), Some(nonce)) = (s.secret.take(), s.nonce.take()) else {
        return (401, refusal(error_code::BAD_PROOF));
    };
    let node = enrol::decode_32("public_key", &req.public_key).unwrap();
    let transcript = enrol::transcript(&nonce, &node, &req.auth_key, &req.hostname);
    let verified = req.challenge == B64.encode(nonce)
        && enrol::verify(&secret, &node, &transcript, &req.proof).is_ok();
    s.registrations.push(req.clone());
    if !verified {
        return (401, refusal(error_code::BAD_PROOF));
    }
    let r = RegisterResponse {
        node_id: 7,
        name: req.hostname,
        mesh_ip: "100.64.0.7".parse().unwrap(),
        network: "100.64.0.0/10".parse().unwrap(),
        network6: Some("fd7a:115c:a1e0::/48".parse().unwrap()),
        credential: "fresh".into(),
    };
    (200, serde_json::to_string(&r).unwrap())
}

async fn enrol_with(
    addr: SocketAddr,
    keys: &Keypair,
    credential: Option<&str>,
) -> Result<RegisterResponse, EnrolError> {
    let endpoint = Endpoint::parse(&format!("http://{addr}")).unwrap();
    let connector = Connector::new(&endpoint, None).unwrap();
    control::register(
        &connector,
        &endpoint,
        Enrol {
            auth_key: "ovk_test",
            hostname: "web",
            secret: keys.secret.to_bytes(),
            credential: credential.map(str::to_owned),
        },
    )
    .await
}

#[tokio::test]
async fn enrolment_proves_the_daemons_own_key() {
    let script = Arc::new(Mutex::new(Script::default()));
    let addr = coordinator(script.clone()).await;
    let keys = Keypair::generate();
    let r = enrol_with(addr, &keys, None).await.expect("enrolled");
    assert_eq!(r.node_id, 7);
    let s = script.lock().unwrap();
    assert_eq!(s.registrations.len(), 1);
    let sent = &s.registrations[0];
    assert_eq!(sent.public_key, keys.public_base64());
    assert_eq!(sent.credential, None);
}

#[tokio::test]
async fn reenrolment_sends_the_stored_credential() {
    let script = Arc::new(Mutex::new(Script::default()));
    let addr = coordinator(script.clone()).await;
    enrol_with(addr, &Keypair::generate(), Some("old-credential"))
        .await
        .expect("enrolled");
    let s = script.lock().unwrap();
    assert_eq!(
        s.registrations[0].credential.as_deref(),
        Some("old-credential")
    );
}

#[tokio::test]
async fn busy_coordinator_is_asked_again_with_a_fresh_challenge() {
    let script = Arc::new(Mutex::new(Script {
        busy: 1,
        ..Script::default()
    }));
    let addr = coordinator(script.clone()).await;
    enrol_with(addr, &Keypair::generate(), None)
        .await
        .expect("enrolled after one retry");
    assert_eq!(script.lock().unwrap().challenges, 1);
    assert_eq!(script.lock().unwrap().busy, 0);
}

#[tokio::test]
async fn the_mesh_ipv6_prefix_from_registration_is_kept_with_the_enrolment() {
    let script = Arc::new(Mutex::new(Script::default()));
    let addr = coordinator(script.clone()).await;
    let r = enrol_with(addr, &Keypair::generate(), None)
        .await
        .expect("enrolled");
    let enrolment = overlayd::identity::Enrolment::from_response(&format!("http://{addr}"), r);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = overlayd::identity::StateDir::open(dir.path()).expect("state dir");
    state.save_enrolment(&enrolment).expect("saved");
    let stored = state.enrolment().expect("read").expect("enrolled");
    assert_eq!(
        stored.network6,
        Some("fd7a:115c:a1e0::/48".parse().unwrap())
    );
    // What the TUN gets at the next start: the prefix with our IPv4 address.
    let mesh6 = overlayd::dataplane::Mesh6::of(stored.network6.unwrap(), stored.mesh_ip);
    assert_eq!(
        mesh6.addr,
        "fd7a:115c:a1e0::6440:7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
    );
}
