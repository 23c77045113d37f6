//! HTTP routes: enrolment, the WebSocket upgrade (authenticated before it
//! happens), health and metrics.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::{error, info};

use overlay_proto::coord::{
    error_code, parse_bearer, ApiError, RegisterRequest, RegisterResponse, CONNECT_PATH,
    MAX_FRAME_BYTES, REGISTER_PATH,
};

use crate::hub::Hub;
use crate::metrics::{Metrics, Rejected};
use crate::session::{self, SessionContext};
use crate::store::{now_unix, Enrolment, KeyProblem, RegisterError, Store};
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
    pub session: SessionContext,
}

pub fn router(state: AppState) -> Router {
    let body_max = state.session.limits.register_body_max;
    Router::new()
        .route(
            REGISTER_PATH,
            post(register).layer(DefaultBodyLimit::max(body_max)),
        )
        .route(CONNECT_PATH, get(connect))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
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

async fn register(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
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
    let public_key = match validate::public_key(&req.public_key) {
        Ok(k) => k,
        Err(m) => return bad(StatusCode::BAD_REQUEST, m),
    };
    let hostname = match validate::hostname(&req.hostname) {
        Ok(h) => h,
        Err(m) => return bad(StatusCode::BAD_REQUEST, m),
    };
    let enrolment = Enrolment {
        auth_key: req.auth_key,
        public_key,
        hostname,
    };
    let network = st.session.network;
    let store = Arc::clone(&st.store);
    let result =
        tokio::task::spawn_blocking(move || store.register(&enrolment, network, now_unix())).await;
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
        Ok(Err(RegisterError::PoolExhausted(net))) => {
            error!(network = %net, "address pool exhausted; registration refused");
            return api_error(
                StatusCode::CONFLICT,
                error_code::POOL_EXHAUSTED,
                format!("no free address left in {net}"),
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
    // Our own limit check is MAX_FRAME_BYTES; tungstenite's is higher so that
    // an oversized frame gets a close reason instead of a protocol error.
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(2 * MAX_FRAME_BYTES)
        .max_frame_size(2 * MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session::run(socket, node.id, node.name, ctx))
}

async fn metrics(State(st): State<AppState>) -> Response {
    let text = st.metrics.render(&st.hub.snapshot());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
