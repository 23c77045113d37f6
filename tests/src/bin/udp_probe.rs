//! A tiny probe to see what NAT routers in the lab do to a flow.
//!
//! ```text
//! udp_probe serve IP:PORT               UDP and TCP on IP:PORT; answers every datagram
//!                                       or connection with the source address it saw
//! udp_probe send LOCAL_PORT TARGET...   from one UDP socket bound to LOCAL_PORT, asks
//!                                       each TARGET; prints "TARGET SEEN_AS" per answer
//! udp_probe tcp TARGET [WAIT_MS]        one TCP connection; prints "TARGET SEEN_AS";
//!                                       gives up after WAIT_MS (default 3000)
//! udp_probe flood IP FIRST_PORT COUNT   one UDP datagram to each of COUNT ports from
//!                                       FIRST_PORT up (wrapping): a flood of new flows
//! udp_probe garbage TARGET COUNT        COUNT malformed DNS queries over UDP (truncated
//!                                       headers, a compression loop, random bytes), then
//!                                       a TCP connection announcing a 64 KiB query it
//!                                       never finishes
//! ```
//!
//! `send` and `tcp` exit 2 when a target does not answer, 1 on usage errors. It is
//! only ever run inside lab namespaces, against lab addresses.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

/// How long one UDP attempt waits for its answer.
const UDP_WAIT: Duration = Duration::from_millis(700);
/// UDP attempts per target before calling it unreachable.
const UDP_ATTEMPTS: usize = 3;
/// How long a TCP connection may take.
const TCP_WAIT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") if args.len() == 2 => serve(&args[1]),
        Some("send") if args.len() >= 3 => send(&args[1], &args[2..]),
        Some("tcp") if args.len() == 2 => tcp(&args[1], TCP_WAIT),
        Some("tcp") if args.len() == 3 => match args[2].parse() {
            Ok(ms) => tcp(&args[1], Duration::from_millis(ms)),
            Err(_) => Err(Failure::Usage),
        },
        Some("flood") if args.len() == 4 => flood(&args[1], &args[2], &args[3]),
        Some("garbage") if args.len() == 3 => garbage(&args[1], &args[2]),
        _ => Err(Failure::Usage),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage) => {
            eprintln!("usage: udp_probe serve IP:PORT | send LOCAL_PORT TARGET... | tcp TARGET [WAIT_MS] | flood IP FIRST_PORT COUNT | garbage TARGET COUNT");
            ExitCode::from(1)
        }
        Err(Failure::Error(message)) => {
            eprintln!("udp_probe: {message}");
            ExitCode::from(1)
        }
        Err(Failure::NoAnswer) => ExitCode::from(2),
    }
}

enum Failure {
    Usage,
    Error(String),
    /// At least one target did not answer (already reported on stdout).
    NoAnswer,
}

fn err(context: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Error(format!("{context}: {e}"))
}

fn addr(text: &str) -> Result<SocketAddr, Failure> {
    text.parse()
        .map_err(|e| err(&format!("address {text:?}"), e))
}

fn serve(listen: &str) -> Result<(), Failure> {
    let listen = addr(listen)?;
    let udp = UdpSocket::bind(listen).map_err(|e| err("bind udp", e))?;
    let tcp = TcpListener::bind(listen).map_err(|e| err("bind tcp", e))?;
    std::thread::spawn(move || {
        for mut stream in tcp.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = stream.write_all(peer.to_string().as_bytes());
            }
        }
    });
    println!("ready on {listen}");
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 1500];
    loop {
        let (_, from) = udp.recv_from(&mut buf).map_err(|e| err("recv", e))?;
        println!("udp from {from}");
        let _ = std::io::stdout().flush();
        let _ = udp.send_to(from.to_string().as_bytes(), from);
    }
}

fn send(local_port: &str, targets: &[String]) -> Result<(), Failure> {
    let port: u16 = local_port.parse().map_err(|e| err("local port", e))?;
    let socket = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| err("bind", e))?;
    socket
        .set_read_timeout(Some(UDP_WAIT))
        .map_err(|e| err("timeout", e))?;
    let mut all_answered = true;
    for target in targets {
        let target = addr(target)?;
        match ask(&socket, target)? {
            Some(seen) => println!("{target} {seen}"),
            None => {
                println!("{target} no-answer");
                all_answered = false;
            }
        }
    }
    if all_answered {
        Ok(())
    } else {
        Err(Failure::NoAnswer)
    }
}

/// Sends to `target` until it answers (up to [`UDP_ATTEMPTS`]); the answer is how
/// it saw us.
fn ask(socket: &UdpSocket, target: SocketAddr) -> Result<Option<String>, Failure> {
    let mut buf = [0u8; 1500];
    for _ in 0..UDP_ATTEMPTS {
        // An unreachable network is "no answer", like a dropped datagram.
        if socket.send_to(b"probe", target).is_err() {
            std::thread::sleep(UDP_WAIT);
            continue;
        }
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) if from == target => {
                    return Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
                // Late answers to an earlier target: skip.
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    Ok(None)
}

fn tcp(target: &str, wait: Duration) -> Result<(), Failure> {
    let target = addr(target)?;
    let Ok(mut stream) = TcpStream::connect_timeout(&target, wait) else {
        println!("{target} no-answer");
        return Err(Failure::NoAnswer);
    };
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| err("timeout", e))?;
    let mut seen = String::new();
    match stream.read_to_string(&mut seen) {
        Ok(_) if !seen.is_empty() => {
            println!("{target} {seen}");
            Ok(())
        }
        _ => {
            println!("{target} no-answer");
            Err(Failure::NoAnswer)
        }
    }
}

fn flood(ip: &str, first: &str, count: &str) -> Result<(), Failure> {
    let ip: std::net::IpAddr = ip.parse().map_err(|_| Failure::Usage)?;
    let first: u16 = first.parse().map_err(|_| Failure::Usage)?;
    let count: u32 = count.parse().map_err(|_| Failure::Usage)?;
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| err("bind", e))?;
    let mut sent = 0u32;
    for i in 0..count {
        let port = first.wrapping_add(i as u16).max(1);
        // A full send queue is not the flood's problem: go on with the next port.
        if socket.send_to(b"flood", SocketAddr::new(ip, port)).is_ok() {
            sent += 1;
        }
    }
    println!("sent {sent} of {count}");
    Ok(())
}

fn garbage(target: &str, count: &str) -> Result<(), Failure> {
    let target = addr(target)?;
    let count: u32 = count.parse().map_err(|_| Failure::Usage)?;
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| err("bind", e))?;
    let header = |qd: u16| {
        let mut h = vec![0x12, 0x34, 0x01, 0x00];
        h.extend_from_slice(&qd.to_be_bytes());
        h.extend_from_slice(&[0; 6]);
        h
    };
    let mut looped = header(1);
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let mut many = header(u16::MAX);
    many.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
    let fixed: Vec<Vec<u8>> = vec![vec![0x12], header(1)[..7].to_vec(), looped, many];
    let mut seed = 0x9e37_79b9_u64;
    for i in 0..count {
        let datagram = match fixed.get(i as usize) {
            Some(d) => d.clone(),
            None => {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let len = 1 + (seed >> 40) as usize % 600;
                (0..len)
                    .map(|j| (seed.rotate_left(j as u32 % 64) >> 7) as u8)
                    .collect()
            }
        };
        let _ = socket.send_to(&datagram, target);
    }
    // A TCP query that announces 65,535 bytes and stops after a few.
    if let Ok(mut stream) = TcpStream::connect_timeout(&target, TCP_WAIT) {
        let _ = stream.write_all(&[0xff, 0xff, 1, 2, 3]);
    }
    println!("sent {count} datagrams and one unfinished TCP query");
    Ok(())
}
