//! The replica case: after the join measurement, one replica is killed
//! (SIGKILL) and its sessions move to the others, as `overlayd` does it: the
//! first retry spread uniformly over [`LOST_SPREAD`], the next replica in
//! the list, another try after a short pause when that fails. What is
//! measured is, per moved session, the time from the kill until its netmap
//! has arrived from the new replica.
//!
//! Each moving session says which netmap it holds (`NETMAP_DIGEST_HEADER`),
//! as `overlayd` does; the server sends it again only when it differs. A
//! simulated node keeps no netmap (20,000 of 20,000 peers would not fit in
//! memory), so the digest each sends is that of the mesh as one full netmap
//! read just before the kill shows it, less the node itself: what every
//! session holds once the mesh is quiet and no session was closed (both are
//! checked). The server compares it with its own state; a wrong digest costs
//! a full netmap, which the figures would show.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use overlay_proto::coord::RegisterResponse;

use crate::session::{self, Shared, Upsert};

/// overlayd's `control::failover::LOST_SPREAD`: a lost session's first retry
/// falls uniformly in `[0, LOST_SPREAD)`.
const LOST_SPREAD: Duration = Duration::from_secs(2);
/// overlayd's pause before the next replica when an attempt fails.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// What the move of one replica's sessions took.
pub struct Moved {
    /// Sessions of the killed replica.
    pub expected: usize,
    /// Time from the kill to each moved session's netmap.
    pub delays: Vec<Duration>,
    /// Moved sessions the server told their netmap was current.
    pub resumed: usize,
    /// VmRSS and VmHWM (kB) of the replica they moved to, once they all had.
    pub survivor_rss: Option<(u64, u64)>,
    pub failures: Vec<String>,
}

pub struct Replicas<'a> {
    pub servers: &'a [SocketAddr],
    pub nodes: &'a [RegisterResponse],
    pub source_of: &'a (dyn Fn(usize) -> Option<IpAddr> + Sync),
    /// The digest of the netmap session `i` holds, when known.
    pub holds: &'a (dyn Fn(usize) -> Option<u64> + Sync),
    pub concurrency: usize,
}

impl Replicas<'_> {
    /// Kills `pid` (the replica at `index`), then reconnects every session `i`
    /// with `i % servers == index` to the replicas after it, within `timeout`.
    pub async fn kill_and_move(
        &self,
        index: usize,
        pid: u32,
        timeout: Duration,
        shared: &Arc<Shared>,
        upserts: &mpsc::UnboundedSender<Upsert>,
    ) -> anyhow::Result<Moved> {
        let k = self.servers.len();
        if k < 2 || index >= k {
            bail!("--kill-replica {index} needs at least two --server and an index below {k}");
        }
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .context("running kill")?;
        if !killed.success() {
            bail!("kill -KILL {pid} failed");
        }
        let t_kill = Instant::now();
        let deadline = t_kill + timeout;
        let limit = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut set = JoinSet::new();
        let mut expected = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            if i % k != index {
                continue;
            }
            expected += 1;
            // The replicas after the dead one, in list order, as overlayd tries them.
            let order: Vec<SocketAddr> = (1..k).map(|d| self.servers[(index + d) % k]).collect();
            let source = (self.source_of)(i);
            let holds = (self.holds)(i);
            let (node_id, credential) = (node.node_id, node.credential.clone());
            let (limit, shared, upserts) = (limit.clone(), shared.clone(), upserts.clone());
            let spread = LOST_SPREAD.mul_f64(rand::thread_rng().gen::<f64>());
            set.spawn(async move {
                tokio::time::sleep(spread).await;
                let mut attempt = 0;
                loop {
                    let server = order[attempt % order.len()];
                    attempt += 1;
                    let connected = {
                        let _permit = limit.acquire().await;
                        session::connect(server, source, node_id, &credential, holds).await
                    };
                    match connected {
                        Ok((ws, netmap)) => {
                            let at = t_kill.elapsed();
                            tokio::spawn(session::read_loop(i, ws, shared, upserts));
                            return Ok((at, netmap.resumed));
                        }
                        Err(e) if Instant::now() + RETRY_PAUSE >= deadline => {
                            return Err(format!("node {node_id}: {e:#} (after {attempt} attempts)"))
                        }
                        Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
                    }
                }
            });
        }
        let mut moved = Moved {
            expected,
            delays: Vec::with_capacity(expected),
            resumed: 0,
            survivor_rss: None,
            failures: Vec::new(),
        };
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok((delay, resumed))) => {
                    moved.delays.push(delay);
                    moved.resumed += usize::from(resumed);
                }
                Ok(Err(e)) => moved.failures.push(e),
                Err(e) => moved.failures.push(format!("reconnect task: {e}")),
            }
        }
        Ok(moved)
    }
}
