//! Per-replica configuration.

use crate::error::ConfigError;
use crate::types::NodeId;

/// How one replica behaves. Build one with [`Config::new`] and adjust fields; [`Config::validate`]
/// runs when the [`crate::Replica`] is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This replica's id; never zero.
    pub id: NodeId,
    /// Voters of the initial membership, used only when the recovered state has no membership
    /// (a brand-new group). Must include `id` unless `id` is a learner.
    pub voters: Vec<NodeId>,
    /// Learners of the initial membership (same rule as `voters`).
    pub learners: Vec<NodeId>,
    /// A follower campaigns after a random timeout in `[election_ticks, 2 * election_ticks)`
    /// without hearing from a leader.
    pub election_ticks: u32,
    /// A leader sends heartbeats every `heartbeat_ticks`; must be less than `election_ticks`.
    pub heartbeat_ticks: u32,
    /// Run a pre-vote round before a real campaign, so a rejoining partitioned node does not
    /// disrupt the leader by bumping the term.
    pub pre_vote: bool,
    /// A leader steps down once it has not heard from a quorum for `election_ticks`; followers
    /// that heard from a leader within `election_ticks` ignore other campaigns.
    pub check_quorum: bool,
    /// Append messages in flight per follower before the leader waits for acknowledgements;
    /// proposals fail with [`crate::ProposeError::Busy`] while the windows to a quorum are full.
    pub max_inflight_messages: u32,
    /// Upper bound of entry bytes (see [`crate::Entry::size_bytes`]) per Append message, per
    /// batch of committed entries in a Ready and per fetch; one larger entry still goes alone.
    pub max_batch_bytes: u64,
    /// Proposals fail with [`crate::ProposeError::Busy`] while the leader holds this many bytes of
    /// uncommitted entries.
    pub max_uncommitted_bytes: u64,
    /// Bytes of already-persisted entries kept in memory to feed followers and the apply loop
    /// without fetching them from storage.
    pub log_cache_bytes: u64,
    /// Serve reads from a leader lease when it is valid; requires `check_quorum`.
    ///
    /// A lease is time measured in this replica's ticks, so it is only as good as the ticks:
    /// after a pause (GC, SIGSTOP, a stalled shard) the driver must, *before* any other input,
    /// either deliver the ticks for all the time that passed (e.g. derived from a monotonic
    /// clock) or call [`crate::Replica::wake`], which drops the lease until a fresh heartbeat
    /// round. The engine does the latter: replaying a burst of ticks ahead of the messages that
    /// arrived meanwhile makes leaders step down and followers time out needlessly.
    pub lease_reads: bool,
    /// Safety margin subtracted from the lease for clock drift between nodes, in ticks: a lease
    /// lasts `election_ticks - clock_drift_ticks` after the heartbeat a quorum acknowledged.
    /// Leases fail closed: the leader compares each follower's tick rate with its own over
    /// windows of two election timeouts, and a follower whose clock runs faster than this margin
    /// allows (or has not been measured yet, as in a new leader's first two timeouts) does not
    /// count toward a lease; reads then go through ReadIndex.
    pub clock_drift_ticks: u32,
    /// Seed of the replica's private random generator (election timeouts).
    pub seed: u64,
}

impl Config {
    /// A configuration with conventional values: elections after 10–20 ticks, heartbeats every
    /// tick, pre-vote and check-quorum on, lease reads off.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Self {
        Self {
            id,
            voters,
            learners: Vec::new(),
            election_ticks: 10,
            heartbeat_ticks: 1,
            pre_vote: true,
            check_quorum: true,
            max_inflight_messages: 64,
            max_batch_bytes: 1 << 20,
            max_uncommitted_bytes: 64 << 20,
            log_cache_bytes: 4 << 20,
            lease_reads: false,
            clock_drift_ticks: 2,
            seed: id.0,
        }
    }

    /// Checks the fields against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == NodeId::ZERO {
            return Err(ConfigError::ZeroId);
        }
        if self.voters.contains(&NodeId::ZERO) || self.learners.contains(&NodeId::ZERO) {
            return Err(ConfigError::ZeroId);
        }
        if self.learners.iter().any(|learner| self.voters.contains(learner)) {
            return Err(ConfigError::LearnerIsVoter);
        }
        if self.heartbeat_ticks == 0 {
            return Err(ConfigError::ZeroHeartbeat);
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return Err(ConfigError::ElectionNotAboveHeartbeat {
                election_ticks: self.election_ticks,
                heartbeat_ticks: self.heartbeat_ticks,
            });
        }
        if self.max_inflight_messages == 0 {
            return Err(ConfigError::ZeroInflight);
        }
        if self.max_batch_bytes == 0 || self.max_uncommitted_bytes == 0 {
            return Err(ConfigError::ZeroByteLimit);
        }
        if self.lease_reads && !self.check_quorum {
            return Err(ConfigError::LeaseWithoutCheckQuorum);
        }
        if self.lease_reads && self.clock_drift_ticks >= self.election_ticks {
            return Err(ConfigError::DriftTooLarge {
                clock_drift_ticks: self.clock_drift_ticks,
                election_ticks: self.election_ticks,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config::new(NodeId(1), vec![NodeId(1), NodeId(2), NodeId(3)])
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn contradictory_settings_are_typed_errors() {
        let with = |change: fn(&mut Config)| {
            let mut config = valid();
            change(&mut config);
            config.validate()
        };
        assert_eq!(with(|c| c.id = NodeId(0)), Err(ConfigError::ZeroId));
        assert_eq!(with(|c| c.learners = vec![NodeId(2)]), Err(ConfigError::LearnerIsVoter));
        assert_eq!(with(|c| c.heartbeat_ticks = 0), Err(ConfigError::ZeroHeartbeat));
        assert_eq!(
            with(|c| c.election_ticks = 1),
            Err(ConfigError::ElectionNotAboveHeartbeat { election_ticks: 1, heartbeat_ticks: 1 })
        );
        assert_eq!(with(|c| c.max_inflight_messages = 0), Err(ConfigError::ZeroInflight));
        assert_eq!(with(|c| c.max_batch_bytes = 0), Err(ConfigError::ZeroByteLimit));
        assert_eq!(
            with(|c| {
                c.lease_reads = true;
                c.check_quorum = false;
            }),
            Err(ConfigError::LeaseWithoutCheckQuorum)
        );
        assert_eq!(
            with(|c| {
                c.lease_reads = true;
                c.clock_drift_ticks = 10;
            }),
            Err(ConfigError::DriftTooLarge { clock_drift_ticks: 10, election_ticks: 10 })
        );
    }
}
