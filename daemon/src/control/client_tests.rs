use super::*;
use std::sync::Mutex;

struct NoRelay;

#[async_trait::async_trait]
impl RelayReceiver for NoRelay {
    async fn relay_datagrams(&self, _: NodeId, _: &[&[u8]], _: &mut RxScratch) {}
    fn bad_frame(&self) {}
}

/// Records the runs it is handed.
#[derive(Default)]
struct Runs(Mutex<Vec<(NodeId, Vec<Vec<u8>>)>>);

#[async_trait::async_trait]
impl RelayReceiver for Runs {
    async fn relay_datagrams(&self, from: NodeId, datagrams: &[&[u8]], _: &mut RxScratch) {
        let run = datagrams.iter().map(|d| d.to_vec()).collect();
        self.0.lock().unwrap().push((from, run));
    }
    fn bad_frame(&self) {}
}

#[tokio::test]
async fn a_batch_reaches_the_data_plane_as_runs_per_peer() {
    let mut batch = RelayBatch::new(MAX_FRAME_BYTES, 0);
    batch.push(RELAY_HELLO_ID, b"");
    for i in 0..(MAX_BATCH + 2) {
        batch.push(2, &[i as u8]);
    }
    batch.push(3, b"c");
    batch.push(2, b"again");
    let msg = batch.into_message();
    let runs = Runs::default();
    let mut rx = RxScratch::default();
    deliver(&runs, RelayMessage::parse(&msg).unwrap(), &mut rx).await;
    let runs = runs.0.into_inner().unwrap();
    let shape: Vec<(NodeId, usize)> = runs.iter().map(|(id, r)| (*id, r.len())).collect();
    assert_eq!(shape, vec![(2, MAX_BATCH), (2, 2), (3, 1), (2, 1)]);
    assert_eq!(
        runs[1].1,
        vec![vec![MAX_BATCH as u8], vec![MAX_BATCH as u8 + 1]]
    );
    assert_eq!(runs[3].1, vec![b"again".to_vec()]);
}

/// Log lines the client writes, captured for the test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn client(port: u16, timeout: Duration) -> (ControlClient, mpsc::Receiver<ControlEvent>) {
    replicas(&[port], timeout)
}

/// A client of one coordinator per port, in that order.
fn replicas(ports: &[u16], timeout: Duration) -> (ControlClient, mpsc::Receiver<ControlEvent>) {
    let (events, events_rx) = mpsc::channel(16);
    let coordinators = ports
        .iter()
        .map(|port| {
            let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap();
            Coordinator {
                connector: Connector::new(&endpoint, None)
                    .unwrap()
                    .with_timeout(timeout),
                endpoint,
            }
        })
        .collect();
    let client = ControlClient {
        coordinators,
        current_url: Arc::default(),
        node_id: 1,
        credential: "secret".into(),
        connected: Arc::default(),
        rtt_us: Arc::default(),
        events,
        relay: Arc::new(NoRelay),
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_millis(200)),
        write_timeout: timeout,
    };
    (client, events_rx)
}

async fn next_connected(events: &mut mpsc::Receiver<ControlEvent>) {
    loop {
        match events.recv().await {
            Some(ControlEvent::Connected) => return,
            Some(_) => {}
            None => panic!("the client stopped"),
        }
    }
}

#[tokio::test]
async fn a_lost_replica_is_left_for_the_next_and_a_dead_one_skipped() {
    // Also keeps tracing's callsite cache from muting the other tests' logs.
    let (logs, _guard) = capture_logs();
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The second port is bound but not listening: connecting is refused, and
    // no other test can take the port meanwhile.
    let dead = tokio::net::TcpSocket::new_v4().unwrap();
    dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = |l: &tokio::net::TcpListener| l.local_addr().unwrap().port();
    let ports = [port(&a), dead.local_addr().unwrap().port(), port(&b)];
    let (client, mut events) = replicas(&[ports[0], ports[1], ports[2]], Duration::from_secs(2));
    let current = client.current_url.clone();
    let (_outbound_tx, outbound_rx) = mpsc::channel(16);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(client.run(outbound_rx, shutdown_rx));
    let scenario = async {
        // The first replica takes the node, then dies.
        let (tcp, _) = a.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        next_connected(&mut events).await;
        assert_eq!(
            *current.lock().unwrap(),
            format!("http://127.0.0.1:{}", ports[0])
        );
        drop((ws, a));
        // The second refuses; the third takes the node.
        let _ = &dead;
        let (tcp, _) = b.accept().await.unwrap();
        let _ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        next_connected(&mut events).await;
        assert_eq!(
            *current.lock().unwrap(),
            format!("http://127.0.0.1:{}", ports[2])
        );
    };
    // The lost session's spread, a refused attempt's pause and two upgrades.
    tokio::time::timeout(failover::LOST_SPREAD + Duration::from_secs(3), scenario)
        .await
        .expect("the node moved to the live replica in time");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    let text = logs.text();
    let refused = format!("cannot connect to coordinator ws://127.0.0.1:{}", ports[1]);
    let next = format!("retrying http://127.0.0.1:{} in", ports[2]);
    assert!(
        text.lines()
            .any(|l| l.contains(&refused) && l.contains(&next)),
        "the refused replica and the next one are named:\n{text}"
    );
}

fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn silent_coordinator_is_retried_with_a_warning_per_attempt() {
    let (logs, _guard) = capture_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (client, _events) = client(port, Duration::from_millis(300));
    let (_outbound_tx, outbound_rx) = mpsc::channel(16);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = client.run(outbound_rx, shutdown_rx);
    tokio::pin!(run);
    // Accept and say nothing, three times: each is a new attempt.
    let accepts = async {
        let mut held = Vec::new();
        while held.len() < 3 {
            held.push(listener.accept().await.unwrap().0);
        }
        held
    };
    tokio::select! {
        held = tokio::time::timeout(Duration::from_secs(10), accepts) => {
            assert!(held.is_ok(), "the client stopped retrying: {}", logs.text());
        }
        _ = &mut run => panic!("the client gave up"),
    }
    let _ = shutdown_tx.send(true);
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the client stops on shutdown");
    let text = logs.text();
    let warnings = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("did not answer within 0.3s"))
        .filter(|l| l.contains("retrying http://127.0.0.1:"))
        .count();
    assert!(
        warnings >= 2,
        "one warning per failed attempt expected:\n{text}"
    );
}

#[tokio::test]
async fn coordinator_that_stops_reading_ends_the_session_and_is_retried() {
    let (logs, _guard) = capture_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (client, _events) = client(port, Duration::from_millis(500));
    let (outbound_tx, outbound_rx) = mpsc::channel(1024);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = client.run(outbound_rx, shutdown_rx);
    tokio::pin!(run);
    // Complete the upgrade, then never read; the client's writes pile up
    // until the socket buffers are full.
    let server = async {
        let (tcp, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        for _ in 0..1000 {
            if outbound_tx
                .try_send(Outbound::Relay {
                    to: 2,
                    datagram: vec![0u8; 60_000],
                })
                .is_err()
            {
                break;
            }
        }
        let again = listener.accept().await.unwrap().0;
        (ws, again)
    };
    tokio::select! {
        done = tokio::time::timeout(Duration::from_secs(20), server) => {
            assert!(done.is_ok(), "no reconnect after a stuck write: {}", logs.text());
        }
        _ = &mut run => panic!("the client gave up"),
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    let text = logs.text();
    assert!(
        text.contains("a write to the coordinator took over"),
        "the stuck write is named:\n{text}"
    );
}
