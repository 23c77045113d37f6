//! HTTP routes: enrolment (challenge, then registration with a proof of the
//! node's private key), the WebSocket upgrade (authenticated before it
//! happens), health and metrics.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use tracing::{debug, error, info, warn};

use overlay_proto::coord::{
    error_code, parse_bearer, parse_digest, ApiError, ChallengeResponse, RegisterRequest,
    RegisterResponse, CHALLENGE_PATH, CONNECT_PATH, MAX_FRAME_BYTES, NETMAP_DIGEST_HEADER,
    REGISTER_PATH,
};
use overlay_proto::enrol::{self, CHALLENGE_LEN};

use crate::challenge::{ChallengeKey, Refused, UsedChallenges, Valid, CHALLENGE_TTL};
use crate::hub::Hub;
use crate::metrics::{Metrics, Rejected};
use crate::session::{self, SessionContext};
use crate::store::{now_unix, Enrolment, KeyProblem, RegisterError, Store};
use crate::store_sync::StoreHealth;
use crate::validate;

/// Read buffer of each WebSocket; small, since 10,000 sessions each hold one
/// for their whole life. A larger frame grows it as needed.
const WS_READ_BUFFER: usize = 4 * 1024;
/// tungstenite collects outgoing frames until they pass this, then writes;
/// a flush writes the rest. tungstenite never shrinks that buffer, so each
/// session keeps this plus its largest message; tungstenite's default
/// (128 KiB) would be 1.3 GB for 10,000 sessions. Every send of a session is
/// flushed, so the buffer never holds more than this plus one message:
/// `max_write_buffer_size` (a hard error, not backpressure) stays unlimited.
const WS_WRITE_BUFFER: usize = 4 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Whether the store answered its last sync round.
    pub store_health: Arc<StoreHealth>,
    pub session: SessionContext,
    /// The secret enrolment challenges are made with: the deployment's, from
    /// the store, when this is one replica of several; else `None`, and one
    /// is drawn at start (a restart voids outstanding challenges; a node
    /// simply asks again).
    pub challenge_secret: Option<[u8; 32]>,
}

/// What the enrolment routes share: the app, the per-process challenge key
/// (a restart draws a new one and voids outstanding challenges; a node simply
/// asks again) and the challenges used by registrations.
#[derive(Clone)]
struct EnrolState {
    app: AppState,
    key: Arc<ChallengeKey>,
    used: Arc<Mutex<UsedChallenges>>,
    clock: EnrolClock,
}

impl EnrolState {
    /// Marks the challenge used (see [`UsedChallenges::claim`]).
    fn claim(&self, valid: &Valid) -> Result<(), Refused> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let claimed = used.claim(valid, self.clock.now());
        self.app.metrics.set_challenges_used(used.len());
        claimed
    }

    fn release(&self, valid: &Valid) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.release(valid);
        self.app.metrics.set_challenges_used(used.len());
    }
}

/// Seconds for challenges: the wall clock read once at start, advanced by the
/// monotonic clock, so a stepped system clock can neither shorten nor lengthen
/// a challenge's life, nor bring back one the used set has forgotten.
#[derive(Clone, Copy)]
struct EnrolClock {
    start: std::time::Instant,
    start_unix: u64,
}

impl EnrolClock {
    fn new() -> Self {
        EnrolClock {
            start: std::time::Instant::now(),
            start_unix: now_unix(),
        }
    }

    fn now(&self) -> u64 {
        self.start_unix
            .saturating_add(self.start.elapsed().as_secs())
    }
}

pub fn router(state: AppState) -> Router {
    let body_max = state.session.limits.register_body_max;
    let master = state.challenge_secret.unwrap_or_else(|| {
        let mut master = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut master);
        master
    });
    let enrolment = Router::new()
        .route(CHALLENGE_PATH, post(challenge))
        .route(
            REGISTER_PATH,
            post(register).layer(DefaultBodyLimit::max(body_max)),
        )
        .with_state(EnrolState {
            app: state.clone(),
            key: Arc::new(ChallengeKey::new(master)),
            used: Arc::new(Mutex::new(UsedChallenges::default())),
            clock: EnrolClock::new(),
        });
    Router::new()
        .route(CONNECT_PATH, get(connect))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(enrolment)
}

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: code.into(),
            message: message.into(),
        }),
    )
        .into_response()
}

fn internal_error(context: &str, e: impl std::fmt::Display) -> Response {
    error!("{context}: {e}");
    api_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal server error",
    )
}

/// `POST /v1/register/challenge`: a fresh challenge and its X25519 key, good
/// for one registration within `CHALLENGE_TTL`. Costs no server memory.
async fn challenge(State(st): State<EnrolState>) -> Response {
    let mut random = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let issued = st.key.issue(random, st.clock.now());
    Json(ChallengeResponse {
        challenge: B64.encode(issued.challenge),
        server_key: B64.encode(issued.server_key),
        expires_in: CHALLENGE_TTL.as_secs(),
    })
    .into_response()
}

/// The request's challenge, if this process issued it and it is fresh. The
/// refusal otherwise. Cheap (two HMACs), and changes nothing.
fn check_challenge(
    st: &EnrolState,
    req: &RegisterRequest,
) -> Result<([u8; CHALLENGE_LEN], Valid), String> {
    if req.challenge.is_empty() || req.proof.is_empty() {
        return Err(format!(
            "registration needs a challenge (POST {CHALLENGE_PATH}) and a proof of the node's private key; upgrade overlayd"
        ));
    }
    let challenge = enrol::decode_challenge(&req.challenge).map_err(|e| e.to_string())?;
    let valid = st
        .key
        .check(&challenge, st.clock.now())
        .map_err(|e| e.to_string())?;
    Ok((challenge, valid))
}

async fn register(
    State(state): State<EnrolState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let st = &state.app;
    let bad = |status, message: String| {
        st.metrics.reject(Rejected::BadRegister);
        api_error(status, error_code::BAD_REQUEST, message)
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return bad(e.status(), e.body_text()),
    };
    let req: RegisterRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            )
        }
    };
    let bad_proof = |why: String| {
        st.metrics.reject(Rejected::BadProof);
        debug!("registration refused: {why}");
        api_error(StatusCode::UNAUTHORIZED, error_code::BAD_PROOF, why)
    };
    let (challenge, valid) = match check_challenge(&state, &req) {
        Ok(c) => c,
        Err(why) => return bad_proof(why),
    };
    let (public_key, key_bytes) = match validate::public_key(&req.public_key) {
        Ok(k) => k,
        Err(m) => return bad(StatusCode::BAD_REQUEST, m),
    };
    let hostname = match validate::hostname(&req.hostname) {
        Ok(h) => h,
        Err(m) => return bad(StatusCode::BAD_REQUEST, m),
    };
    // The proof covers the fields as sent, before validation normalised them.
    let transcript = enrol::transcript(&challenge, &key_bytes, &req.auth_key, &req.hostname);
    if let Err(e) = enrol::verify(&valid.server_secret, &key_bytes, &transcript, &req.proof) {
        return bad_proof(e.to_string());
    }
    // Claimed before the store transaction, which checks the auth key, so two
    // copies of one request cannot both get there; released if the store
    // refuses, so only registrations that passed every check keep an entry.
    match state.claim(&valid) {
        Ok(()) => {}
        Err(Refused::Full) => {
            st.metrics.reject(Rejected::ChallengesFull);
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                error_code::RATE_LIMITED,
                Refused::Full.to_string(),
            );
        }
        Err(e) => return bad_proof(e.to_string()),
    }
    let enrolment = Enrolment {
        auth_key: req.auth_key,
        public_key,
        hostname,
        credential: req.credential,
    };
    let network = st.session.network;
    let store = Arc::clone(&st.store);
    let routes = state.clone();
    // The claim is settled in the blocking task, which runs to the end even if
    // this request is dropped meanwhile: a claim outlives the request only
    // when the registration committed.
    let result = tokio::task::spawn_blocking(move || {
        let result = store.register(&enrolment, network, now_unix());
        if result.is_err() {
            // The transaction rolled back: nothing used the challenge.
            routes.release(&valid);
        }
        result
    })
    .await;
    let registered = match result {
        Ok(Ok(r)) => r,
        Ok(Err(RegisterError::AuthKey(problem))) => {
            st.metrics.reject(Rejected::BadAuthKey);
            let (code, message) = match problem {
                KeyProblem::Unknown => (error_code::AUTH_KEY_UNKNOWN, "unknown auth key"),
                KeyProblem::Expired => (error_code::AUTH_KEY_EXPIRED, "auth key has expired"),
                KeyProblem::Revoked => (error_code::AUTH_KEY_REVOKED, "auth key was revoked"),
                KeyProblem::Spent => (
                    error_code::AUTH_KEY_SPENT,
                    "single-use auth key was already used",
                ),
            };
            return api_error(StatusCode::UNAUTHORIZED, code, message);
        }
        Ok(Err(RegisterError::AlreadyEnrolled(id))) => {
            st.metrics.reject(Rejected::AlreadyEnrolled);
            info!(
                node = id,
                "re-registration without the node's credential refused"
            );
            return api_error(
                StatusCode::CONFLICT,
                error_code::ALREADY_ENROLLED,
                "this public key is already enrolled; re-enrol with the node's current credential, or have an administrator remove the node ('overlay-coord nodes remove NAME') first",
            );
        }
        Ok(Err(RegisterError::PoolExhausted(net))) => {
            error!(network = %net, "address pool exhausted; registration refused");
            return api_error(
                StatusCode::CONFLICT,
                error_code::POOL_EXHAUSTED,
                format!("no free address left in {net}"),
            );
        }
        Ok(Err(RegisterError::Store(e))) if e.is_unavailable() => {
            warn!("registration refused: {e}");
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "internal",
                "the coordinator's database is unavailable; try again later",
            );
        }
        Ok(Err(RegisterError::Store(e))) => return internal_error("registering a node", e),
        Err(e) => return internal_error("registering a node", e),
    };
    let node = &registered.node;
    st.metrics
        .registrations
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    info!(
        node = node.id,
        name = %node.name,
        mesh_ip = %node.mesh_ip,
        new = registered.created,
        "node registered"
    );
    st.hub.upsert(node.peer_info());
    Json(RegisterResponse {
        node_id: node.id,
        name: node.name.clone(),
        mesh_ip: node.mesh_ip,
        network,
        network6: st.session.network6,
        credential: registered.credential,
    })
    .into_response()
}

fn unauthorized(metrics: &Metrics) -> Response {
    metrics.reject(Rejected::Unauthorized);
    // Same body whether the node exists or not.
    api_error(
        StatusCode::UNAUTHORIZED,
        error_code::UNAUTHORIZED,
        "invalid node credential",
    )
}

async fn connect(
    State(st): State<AppState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some((node_id, credential)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_bearer)
    else {
        return unauthorized(&st.metrics);
    };
    let credential = credential.to_string();
    let store = Arc::clone(&st.store);
    let node =
        match tokio::task::spawn_blocking(move || store.verify_node(node_id, &credential)).await {
            Ok(Ok(Some(node))) => node,
            Ok(Ok(None)) => return unauthorized(&st.metrics),
            // Said once per request at debug level: while the database is
            // down every reconnecting node lands here.
            Ok(Err(e)) if e.is_unavailable() => {
                debug!("session refused: {e}");
                return api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "internal",
                    "the coordinator's database is unavailable; try again later",
                );
            }
            Ok(Err(e)) => return internal_error("checking a node credential", e),
            Err(e) => return internal_error("checking a node credential", e),
        };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return api_error(e.status(), error_code::BAD_REQUEST, e.body_text()),
    };
    if !st.hub.is_online(node.id) && st.hub.online_count() >= st.session.limits.max_sessions {
        st.metrics.reject(Rejected::TooManySessions);
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            error_code::TOO_MANY_SESSIONS,
            "the server has reached its session limit; retry later",
        );
    }
    let ctx = st.session.clone();
    let holds = headers
        .get(NETMAP_DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_digest);
    // Our own limit check is MAX_FRAME_BYTES; tungstenite's is higher so that
    // an oversized frame gets a close reason instead of a protocol error.
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(2 * MAX_FRAME_BYTES)
        .max_frame_size(2 * MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session::run(socket, node.id, node.name, holds, ctx))
}

/// What `/healthz` says: the first line `ok` (200) when the store answered
/// its last round and the bus, if any, is connected; `degraded` (503)
/// otherwise, a line each for the store and the bus saying why. Read from
/// flags the sync and bus tasks keep, so it costs no query however often it
/// is asked.
pub fn health_report(store_error: Option<&str>, bus: Option<(bool, u64)>) -> (StatusCode, String) {
    let store = match store_error {
        None => "store: ok".to_owned(),
        Some(e) => format!("store: unreachable ({e})"),
    };
    let bus_line = match bus {
        None => "bus: in-process (single coordinator)".to_owned(),
        Some((true, replicas)) => format!("bus: connected, {replicas} other replicas"),
        Some((false, _)) => {
            "bus: disconnected (nodes on other replicas unreachable from here)".to_owned()
        }
    };
    let ok = store_error.is_none() && bus.is_none_or(|(connected, _)| connected);
    let (status, head) = if ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    };
    (status, format!("{head}\n{store}\n{bus_line}\n"))
}

async fn healthz(State(st): State<AppState>) -> Response {
    let store_error = if st.store_health.is_ok() {
        None
    } else {
        Some(st.store_health.error().unwrap_or_default())
    };
    let bus = st.hub.bus().map(|b| {
        (
            b.is_connected(),
            b.counters
                .replicas
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    });
    health_report(store_error.as_deref(), bus).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let text = st.metrics.render(&st.hub.snapshot());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_is_ok_only_with_the_store_answering_and_the_bus_connected() {
        let (status, body) = health_report(None, None);
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("ok\n") && body.contains("bus: in-process"));
        let (status, body) = health_report(None, Some((true, 2)));
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("bus: connected, 2 other replicas"));
        let (status, body) = health_report(None, Some((false, 0)));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.starts_with("degraded\n") && body.contains("bus: disconnected"));
        let (status, body) = health_report(Some("connection refused"), None);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("store: unreachable (connection refused)"));
    }
}
