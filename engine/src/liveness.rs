//! Node-level liveness: when this node last heard anything from each peer node.
//!
//! Quiet groups ([`crate::shard::core::Quiescence`]) send no heartbeats, so nothing of theirs
//! says their leader's node died. Instead every connection reader stamps its peer here on each
//! frame, shard 0 sends every peer an empty frame each heartbeat interval (one heartbeat
//! exchange per node pair, whatever the number of groups they share), and each shard turns the
//! ages into [`crate::shard::core::ShardCore::node_contact`] on every tick.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_raftgroup::NodeId;

/// When each peer node was last heard from, shared by a node's shards and connection readers.
#[derive(Debug)]
pub(crate) struct Liveness {
    start: Instant,
    /// Microseconds after `start` of the last frame from each peer. Starts at 0: a peer counts
    /// as just heard when the node starts, so it is declared down only after a full timeout of
    /// silence.
    heard: BTreeMap<NodeId, AtomicU64>,
}

impl Liveness {
    /// Tracks `peers` (this node among them is ignored by callers), all heard now.
    pub(crate) fn new(peers: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            start: Instant::now(),
            heard: peers.into_iter().map(|peer| (peer, AtomicU64::new(0))).collect(),
        }
    }

    /// A frame from `peer` arrived.
    pub(crate) fn heard(&self, peer: NodeId) {
        if let Some(slot) = self.heard.get(&peer) {
            let now = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
            slot.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// How long ago each peer was last heard from, as of `now`.
    pub(crate) fn ages(&self, now: Instant) -> impl Iterator<Item = (NodeId, Duration)> + '_ {
        let elapsed = now.saturating_duration_since(self.start);
        self.heard.iter().map(move |(peer, slot)| {
            let heard = Duration::from_micros(slot.load(Ordering::Relaxed));
            (*peer, elapsed.saturating_sub(heard))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_heard_at_start_and_ages_until_heard_again() {
        let liveness = Liveness::new([NodeId(2), NodeId(3)]);
        let later = Instant::now() + Duration::from_secs(5);
        let ages: BTreeMap<NodeId, Duration> = liveness.ages(later).collect();
        assert!(ages[&NodeId(2)] >= Duration::from_secs(5));
        liveness.heard(NodeId(2));
        let ages: BTreeMap<NodeId, Duration> = liveness.ages(later).collect();
        assert!(ages[&NodeId(2)] < Duration::from_secs(5), "just heard: younger");
        assert!(ages[&NodeId(3)] >= Duration::from_secs(5), "not heard: as old as the node");
        // Unknown nodes are ignored, not added.
        liveness.heard(NodeId(9));
        assert_eq!(liveness.ages(later).count(), 2);
    }
}
