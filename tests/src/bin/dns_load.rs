//! A small DNS load generator for the mesh resolver's benchmark.
//!
//! ```text
//! dns_load SERVER:PORT NAME COUNT [IN_FLIGHT]
//! ```
//!
//! Sends COUNT `A` queries for NAME over UDP, at most IN_FLIGHT (default 32)
//! unanswered at once, each given 1 s; prints the answered count, the rate,
//! and the latency percentiles (`key value` lines). Only ever run inside lab
//! namespaces, against lab addresses.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long one query may wait for its answer.
const WAIT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [server, name, count] => Some((server, name, count, "32")),
        [server, name, count, window] => Some((server, name, count, window.as_str())),
        _ => None,
    };
    let Some((server, name, count, window)) = parsed else {
        eprintln!("usage: dns_load SERVER:PORT NAME COUNT [IN_FLIGHT]");
        return ExitCode::from(1);
    };
    let (Ok(server), Ok(count), Ok(window)) = (
        server.parse::<SocketAddr>(),
        count.parse::<u32>(),
        window.parse::<usize>(),
    ) else {
        eprintln!("dns_load: bad SERVER:PORT, COUNT or IN_FLIGHT");
        return ExitCode::from(1);
    };
    match run(server, name, count, window.max(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dns_load: {e}");
            ExitCode::from(1)
        }
    }
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn run(server: SocketAddr, name: &str, count: u32, window: usize) -> std::io::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut pending: HashMap<u16, Instant> = HashMap::new();
    let mut latencies: Vec<Duration> = Vec::with_capacity(count as usize);
    let mut sent = 0u32;
    let mut errors = 0u32;
    let mut buf = [0u8; 2048];
    let started = Instant::now();
    while sent < count || !pending.is_empty() {
        while sent < count && pending.len() < window {
            let id = sent as u16;
            socket.send(&query(id, name))?;
            pending.insert(id, Instant::now());
            sent += 1;
        }
        match socket.recv(&mut buf) {
            Ok(n) if n >= 12 => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                if let Some(at) = pending.remove(&id) {
                    latencies.push(at.elapsed());
                    if buf[3] & 0x0f != 0 {
                        errors += 1;
                    }
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
        pending.retain(|_, at| at.elapsed() < WAIT);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!("sent {sent}");
    println!("answered {}", latencies.len());
    println!("errors {errors}");
    println!("seconds {:.3}", elapsed.as_secs_f64());
    println!("qps {:.0}", latencies.len() as f64 / elapsed.as_secs_f64());
    println!("p50_ms {:.3}", pct(0.50));
    println!("p99_ms {:.3}", pct(0.99));
    println!("max_ms {:.3}", pct(1.0));
    Ok(())
}
