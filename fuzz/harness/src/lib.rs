//! Every parser of untrusted input in overlay, as one `fn(&[u8])` each.
//!
//! The cargo-fuzz crate (`fuzz/`, nightly, not a workspace member) calls these
//! from one-line targets; `tests/corpus.rs` replays the committed corpus
//! (`fuzz/corpus/<target>/`) through them on stable, so the normal suite guards
//! every input the fuzzer ever found interesting. A function returns quietly on
//! input the parser refuses and panics only when a parser panics or an invariant
//! (a round trip, a length, a checksum) breaks.
//!
//! | target | parser | who sends the bytes |
//! |---|---|---|
//! | `relay_frame` | `coord::decode_relay_frame` | any node, via the coordinator |
//! | `control_msg` | `ClientMsg`/`ServerMsg` JSON, `parse_bearer` | nodes / the coordinator |
//! | `register_body` | `RegisterRequest` + `validate`, `RegisterResponse` | anyone on the network |
//! | `sealed_signal` | `Sealer::open` | a malicious coordinator |
//! | `sealed_plaintext` | `PeerSignal` inside a box, ICE candidates | a malicious enrolled peer |
//! | `stun_filter` | `stun_filter::inspect` | anyone reaching the TURN port |
//! | `stun_message` | `stun_alt::answer`, the mux's STUN routing, TURN usernames | anyone |
//! | `tun_segment` | `offload::segment` | the kernel (any local process's traffic) |
//! | `gro_coalesce` | `gro::coalesce` | peers (decrypted packets) |
//! | `ipv4_icmp` | `packet::{ipv4_addrs, echo_reply, host_unreachable}` | peers and local traffic |
//! | `local_api_request` | `local_api::parse_request` | local users in the socket's group |
//! | `daemon_config` | `overlayd` TOML + `Config::resolve` | the administrator |
//! | `coord_config` | `overlay-coord` TOML + `Config::resolve` | the administrator |
//! | `dns_query` | `dns::respond` (UDP and TCP), `dns::tcp::TcpDns` | any local program (the mesh resolver) |
//! | `flow_filter` | `dataplane::filter::PeerFilter::check` | peers (decrypted packets), local traffic |

mod config;
mod control;
mod dns;
mod packets;
mod seal;
mod stun;

pub use config::{coord_config, daemon_config};
pub use control::{control_msg, local_api_request, register_body, relay_frame};
pub use dns::{dns_query, flow_filter};
pub use packets::{gro_coalesce, ipv4_icmp, tun_segment};
pub use seal::{sealed_plaintext, sealed_signal};
pub use stun::{stun_filter, stun_message};

/// A fuzz target: takes any bytes, panics only on a bug.
pub type Target = fn(&[u8]);

/// Every target by the name of its `fuzz/fuzz_targets/<name>.rs` and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("relay_frame", relay_frame),
    ("control_msg", control_msg),
    ("register_body", register_body),
    ("sealed_signal", sealed_signal),
    ("sealed_plaintext", sealed_plaintext),
    ("stun_filter", stun_filter),
    ("stun_message", stun_message),
    ("tun_segment", tun_segment),
    ("gro_coalesce", gro_coalesce),
    ("ipv4_icmp", ipv4_icmp),
    ("local_api_request", local_api_request),
    ("daemon_config", daemon_config),
    ("coord_config", coord_config),
    ("dns_query", dns_query),
    ("flow_filter", flow_filter),
];

/// The Internet checksum of `data` folded to 16 bits, *not* complemented:
/// `0xffff` over a region that includes a correct checksum field.
pub(crate) fn ones_sum(data: &[u8], mut acc: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(u16::from_be_bytes([*last, 0]));
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}
