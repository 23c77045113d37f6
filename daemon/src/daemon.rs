//! `overlayd up`: identity, enrolment, interface, then every long-lived task,
//! each with one shutdown path, and cleanup when any of them says stop.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::control::{self, failover, ControlClient, Coordinator};
use crate::dataplane::{DataPlane, Mesh6, SENDER_FILTER_ENV};
use crate::host_dns::HostDns;
use crate::ice::mux::Mux;
use crate::identity::{Enrolment, Keypair, StateDir};
use crate::local_api::{self, LocalApi, NodeInfo, SocketGuard};
use crate::metrics;
use crate::shell::{Links, Shell};
use crate::supervise::Tasks;

/// Capacity of the queue towards the coordinator (signals and relayed packets).
/// Relayed packets beyond it are dropped, as a congested link would.
const OUTBOUND_QUEUE: usize = 1024;
/// How long the engine, control and API tasks get to finish after a stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

pub async fn up(config: Config) -> anyhow::Result<()> {
    let state = StateDir::open(&config.state_dir)?;
    let keys = state.keypair()?;
    let enrolment = enrol(&config, &state, &keys).await?;
    tracing::info!(
        "enrolled as {} (node {}) with mesh IP {}/{}",
        enrolment.name,
        enrolment.node_id,
        enrolment.mesh_ip,
        enrolment.network.prefix_len()
    );

    // A resolv.conf a crashed run left rewritten is put back before anything else.
    let host_dns = Arc::new(HostDns::new(
        config.dns,
        &config.interface,
        &config.state_dir,
    ));
    if let Err(e) = host_dns.recover() {
        tracing::warn!("could not restore the resolv.conf an earlier run changed: {e}");
    }

    let listener = local_api::bind(&config.socket)
        .await
        .with_context(|| format!("cannot open local API socket {}", config.socket.display()))?;
    let _socket_guard = SocketGuard(config.socket.clone());

    let tun = crate::dataplane::tun_device::create(
        &config.interface,
        enrolment.mesh_ip,
        enrolment.network,
        config.mtu,
    )?;
    tracing::info!(
        "interface {} up with {}/{} (mtu {}, offloads {})",
        config.interface,
        enrolment.mesh_ip,
        enrolment.network.prefix_len(),
        config.mtu,
        if tun.offload { "on" } else { "off" }
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let (control_tx, control_rx) = mpsc::channel(256);
    let (ice_tx, ice_rx) = mpsc::unbounded_channel();
    let (query_tx, query_rx) = mpsc::channel(16);
    let coord_connected = Arc::new(AtomicBool::new(false));
    let coord_rtt_us = Arc::new(AtomicU64::new(0));
    let mux = Mux::bind()
        .await
        .context("cannot open the UDP socket for peers")?;
    let sender_filter = std::env::var(SENDER_FILTER_ENV).map_or(true, |v| v != "off");
    if !sender_filter {
        tracing::warn!(
            "{SENDER_FILTER_ENV}=off: packets the access policy refuses are sent anyway \
             (a test hook; peers still refuse them)"
        );
    }
    let dataplane = Arc::new(DataPlane::new(
        tun,
        mux.socket(),
        enrolment.mesh_ip,
        outbound_tx.clone(),
        sender_filter,
    ));
    // The mesh IPv6 address right away when enrolment gave the prefix; a node
    // enrolled before the mesh had one gets it from the coordinator's Welcome.
    if let Some(network6) = enrolment.network6 {
        dataplane.set_mesh6(Some(Mesh6::of(network6, enrolment.mesh_ip)));
    }

    let coordinators = Coordinator::from_list(&enrolment.coordinator, config.ca_cert.as_deref())?;
    let coord_url = Arc::new(std::sync::Mutex::new(coordinators[0].endpoint.url()));
    let client = ControlClient {
        coordinators,
        current_url: coord_url.clone(),
        node_id: enrolment.node_id,
        credential: enrolment.credential.clone(),
        connected: coord_connected.clone(),
        rtt_us: coord_rtt_us.clone(),
        events: control_tx,
        relay: dataplane.clone(),
        backoff: control::reconnect_backoff(),
        write_timeout: control::WRITE_TIMEOUT,
    };
    let mut tasks = Tasks::default();
    let control_shutdown = shutdown_rx.clone();
    tasks.spawn("control", async move {
        client.run(outbound_rx, control_shutdown).await;
        Ok(())
    });

    let api = Arc::new(LocalApi {
        node: NodeInfo {
            fixed: overlay_proto::api::Status {
                name: enrolment.name.clone(),
                node_id: enrolment.node_id,
                mesh_ip: enrolment.mesh_ip,
                network: enrolment.network,
                mesh_ip6: None,
                network6: None,
                interface: config.interface.clone(),
                public_key: keys.public_base64(),
                coordinator: enrolment.coordinator.clone(),
                coordinator_connected: false,
                uptime_secs: 0,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                dropped: Default::default(),
                dns: None,
            },
            started: Instant::now(),
            coord_connected: coord_connected.clone(),
            coord_url,
        },
        dataplane: dataplane.clone(),
        host_dns: host_dns.clone(),
        queries: query_tx,
        shutdown: shutdown_tx.clone(),
    });
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!("serving metrics on http://{addr}/metrics");
        let scrape_api = api.clone();
        let scrape: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || scrape_api.metrics());
        let shutdown = shutdown_rx.clone();
        tasks.spawn("metrics", async move {
            metrics::serve(listener, scrape, shutdown).await;
            Ok(())
        });
    }
    tasks.spawn("local API", async move {
        api.serve(listener).await;
        Ok(())
    });

    let shell = Shell::new(
        enrolment.node_id,
        keys.secret.clone(),
        config.interface.clone(),
        dataplane.clone(),
        Links {
            outbound: outbound_tx,
            coord_connected,
            coord_rtt_us,
            ice_tx,
            mux: mux.clone(),
            network: enrolment.network,
            host_dns: host_dns.clone(),
            idle_timeout: config.idle_timeout,
        },
    );
    let shell_shutdown = shutdown_rx.clone();
    tasks.spawn("node", async move {
        shell
            .run(control_rx, ice_rx, query_rx, shell_shutdown)
            .await;
        Ok(())
    });
    let timers_task = tasks.spawn("WireGuard timers", {
        let dataplane = dataplane.clone();
        async move {
            dataplane.run_timers().await;
            Ok(())
        }
    });
    let interface = config.interface.clone();
    let tun_task = tasks.spawn("TUN", {
        let dataplane = dataplane.clone();
        async move {
            (dataplane.run_tun_reader().await).with_context(|| format!("interface {interface}"))
        }
    });
    let udp_task = tasks.spawn("UDP", {
        let dataplane = dataplane.clone();
        async move { mux.run(dataplane).await.context("peer UDP socket") }
    });

    // The node task ends on `overlayctl down`; any task that fails or panics ends
    // the daemon with an error (a non-zero exit status).
    let outcome: anyhow::Result<()> = tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!("stopping");
            Ok(())
        }
        (name, result) = tasks.first_exit() => {
            if result.is_ok() {
                tracing::info!("stopping ({name} task ended)");
            }
            result
        }
    };
    let _ = shutdown_tx.send(true);
    tun_task.abort();
    udp_task.abort();
    timers_task.abort();
    tasks.shutdown(SHUTDOWN_GRACE).await;
    // The TUN goes when its last handle drops: the reader task above, the data
    // plane's peers' tasks; dropping `dataplane` here releases ours.
    drop(dataplane);
    host_dns.restore();
    outcome
}

/// SIGINT, SIGTERM, or `overlayctl down` (which flips the shutdown channel).
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Uses the stored enrolment, or registers with the auth key on first start
/// (or when moving to another coordinator), proving it holds its private key.
async fn enrol(config: &Config, state: &StateDir, keys: &Keypair) -> anyhow::Result<Enrolment> {
    let stored = state.enrolment()?;
    if let Some(enrolment) = &stored {
        match &config.coordinator {
            // The same deployment (the lists share a replica): the configured
            // list is the current one, kept for starts without a config.
            Some(list) if failover::same_deployment(list, &enrolment.coordinator) => {
                if list != &enrolment.coordinator {
                    let mut updated = enrolment.clone();
                    updated.coordinator.clone_from(list);
                    state.save_enrolment(&updated)?;
                    return Ok(updated);
                }
                return Ok(enrolment.clone());
            }
            Some(list) => {
                if config.auth_key.is_none() {
                    bail!(
                        "this node is enrolled with {} but the config names {list}; pass --auth-key to enrol with the new coordinator",
                        enrolment.coordinator
                    );
                }
            }
            None => return Ok(enrolment.clone()),
        }
    }
    let Some(coordinator) = config.coordinator.as_deref() else {
        bail!("this node is not enrolled yet: pass --coordinator URL and --auth-key KEY (or set them in the config)");
    };
    let Some(auth_key) = config.auth_key.clone() else {
        bail!("this node is not enrolled yet: pass --auth-key KEY (from 'overlay-coord keys create') or set auth_key_file in the config");
    };
    // A coordinator that already knows this key (the same one under another
    // URL) re-enrols it only with the credential it issued, so the stored one
    // goes along; the enrolment it belongs to is replaced either way. Each
    // replica of the list is asked in turn until one answers.
    let credential = stored.map(|e| e.credential);
    let mut response = None;
    let replicas = Coordinator::from_list(coordinator, config.ca_cert.as_deref())?;
    let count = replicas.len();
    for (i, replica) in replicas.into_iter().enumerate() {
        let enrol = control::Enrol {
            auth_key: &auth_key,
            hostname: &config.hostname,
            secret: keys.secret.to_bytes(),
            credential: credential.clone(),
        };
        match control::register(&replica.connector, &replica.endpoint, enrol).await {
            Ok(r) => {
                response = Some(r);
                break;
            }
            // Only an unreachable replica is worth passing over; a refusal is
            // the deployment's answer. The last one's error is the one the
            // user sees, once.
            Err(control::EnrolError::Transport(e)) if i + 1 < count => tracing::warn!(
                "enrolment at {} failed: {e}; trying the next coordinator",
                replica.endpoint.url()
            ),
            Err(e) => return Err(e.into()),
        }
    }
    let Some(response) = response else {
        bail!("no coordinator to enrol with");
    };
    let enrolment = Enrolment::from_response(coordinator, response);
    state.save_enrolment(&enrolment)?;
    Ok(enrolment)
}
