//! Moves a deterministic pseudo-random byte stream over one TCP connection and
//! prints its length and FNV-1a hash on both ends, so a test can prove a bulk
//! transfer through the mesh arrived byte for byte.
//!
//!   tcp_blast serve ADDR          accept one connection, read to EOF, print "LEN HASH"
//!   tcp_blast send ADDR BYTES     send BYTES bytes, print "LEN HASH"

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(hash: &mut u64, data: &[u8]) {
    for b in data {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(FNV_PRIME);
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut buf = vec![0u8; 64 * 1024];
    let mut hash = FNV_OFFSET;
    let mut total: u64 = 0;
    match args.get(1).map(String::as_str) {
        Some("serve") if args.len() == 3 => {
            let listener = TcpListener::bind(&args[2])?;
            println!("ready on {}", listener.local_addr()?);
            let (mut conn, _) = listener.accept()?;
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                fnv(&mut hash, &buf[..n]);
                total += n as u64;
            }
        }
        Some("send") if args.len() == 4 => {
            let bytes: u64 = args[3]
                .parse()
                .map_err(|_| std::io::Error::other("BYTES must be a number"))?;
            let mut conn = TcpStream::connect(&args[2])?;
            let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
            while total < bytes {
                let n = buf.len().min((bytes - total) as usize);
                for chunk in buf[..n].chunks_mut(8) {
                    // xorshift64: cheap, deterministic, not compressible.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let word = state.to_le_bytes();
                    chunk.copy_from_slice(&word[..chunk.len()]);
                }
                conn.write_all(&buf[..n])?;
                fnv(&mut hash, &buf[..n]);
                total += n as u64;
            }
            conn.shutdown(std::net::Shutdown::Write)?;
            // Wait for the receiver to close, so its count is final.
            while conn.read(&mut buf)? > 0 {}
        }
        _ => {
            eprintln!("usage: tcp_blast serve ADDR | tcp_blast send ADDR BYTES");
            std::process::exit(2);
        }
    }
    println!("{total} {hash:016x}");
    Ok(())
}
