//! How a batch of encrypted datagrams is cut into runs, each sent in one go:
//! a UDP GSO send on our socket, or TURN ChannelData in one GSO send from
//! the shim's socket (see [`super::peer::RunSender`]).

use std::net::SocketAddr;

use overlay_proto::NodeId;

use super::udp_batch;

/// Where an encrypted datagram of a batch goes: our socket to a direct
/// endpoint, or the peer's other ways (its ICE connection over TURN, the
/// coordination relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Way {
    Udp(SocketAddr),
    Indirect(NodeId),
}

impl Way {
    /// Bytes a datagram takes in a GSO run beyond its own: a TURN
    /// ChannelData header on the indirect way.
    fn overhead(self) -> usize {
        match self {
            Way::Udp(_) => 0,
            Way::Indirect(_) => 4,
        }
    }
}

/// How many datagrams at the head of `batch` make one run: one way, all the
/// length of the first but the last (no longer), within GSO's limits.
pub(super) fn run_length(batch: &[(Way, usize, usize)]) -> usize {
    let Some(&(way, _, size)) = batch.first() else {
        return 0;
    };
    let mut end = 1;
    let mut bytes = size + way.overhead();
    while end < batch.len()
        && end < udp_batch::MAX_SEGMENTS
        && bytes + batch[end].2 + way.overhead() <= udp_batch::MAX_GSO_BYTES
        && batch[end].0 == way
        && batch[end].2 <= size
        && batch[end - 1].2 == size
    {
        bytes += batch[end].2 + way.overhead();
        end += 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(port: u16) -> Way {
        Way::Udp(SocketAddr::from(([192, 0, 2, 1], port)))
    }

    #[test]
    fn runs_end_at_a_new_way_a_longer_datagram_or_after_a_shorter_one() {
        let b = |way, len| (way, 0, len);
        let batch = [
            b(udp(1), 100),
            b(udp(1), 100),
            b(udp(1), 60),
            b(udp(1), 60),
            b(Way::Indirect(7), 60),
            b(Way::Indirect(7), 80),
            b(Way::Indirect(8), 80),
        ];
        let mut lengths = Vec::new();
        let mut at = 0;
        while at < batch.len() {
            let n = run_length(&batch[at..]);
            lengths.push(n);
            at += n;
        }
        assert_eq!(lengths, vec![3, 1, 1, 1, 1]);
        assert_eq!(run_length(&[]), 0);
    }

    #[test]
    fn channel_data_headers_count_against_the_gso_limit() {
        let size = 1300;
        let direct = vec![(udp(1), 0, size); 64];
        assert_eq!(run_length(&direct), udp_batch::MAX_GSO_BYTES / size);
        let relayed = vec![(Way::Indirect(3), 0, size); 64];
        assert_eq!(run_length(&relayed), udp_batch::MAX_GSO_BYTES / (size + 4));
        let small = vec![(Way::Indirect(3), 0, 100); 100];
        assert_eq!(run_length(&small), udp_batch::MAX_SEGMENTS);
    }
}
