//! Membership changes (issue 5) on four engines in one process over loopback TCP: a node is
//! replaced while writers keep writing, the leader removes itself, membership and data survive
//! a restart of every node (with the change still in the log, and compacted into a snapshot),
//! and wrong requests get typed errors.
//!
//! Every node lists every other as a peer from the start; node 4 hosts nothing until it joins.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::kv::{Command, Request};
use flotilla::raftgroup::{Membership, MembershipChange, Role};
use flotilla::{Engine, EngineConfig, Error, GroupId, NodeId};

mod common;

use common::{PATIENCE, contents, free_addr};

const NODES: u64 = 4;

fn node_ids(raw: &[u64]) -> Vec<NodeId> {
    raw.iter().copied().map(NodeId).collect()
}

struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    addrs: BTreeMap<NodeId, SocketAddr>,
    snapshot_entries: u64,
    engines: Vec<Option<Engine>>,
}

impl Cluster {
    fn start(snapshot_entries: u64) -> Self {
        let addrs = (1..=NODES).map(|id| (NodeId(id), free_addr())).collect();
        let dirs = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut cluster = Self { dirs, addrs, snapshot_entries, engines: Vec::new() };
        for id in 1..=NODES {
            let engine = cluster.open(NodeId(id));
            cluster.engines.push(Some(engine));
        }
        cluster
    }

    fn open(&self, node: NodeId) -> Engine {
        let dir = self.dirs[(node.0 - 1) as usize].path();
        let mut config = EngineConfig::new(node, self.addrs[&node], dir);
        config.peers = self.addrs.clone();
        config.shards = 1;
        config.request_timeout = Duration::from_secs(3);
        config.snapshot_entries = self.snapshot_entries;
        config.wal.segment_bytes = 8 << 20;
        config.wal.batch_bytes_max = 1 << 20;
        Engine::open_kv(config).unwrap()
    }

    fn engine(&self, node: NodeId) -> &Engine {
        self.engines[(node.0 - 1) as usize].as_ref().expect("node is running")
    }

    fn all() -> Vec<NodeId> {
        (1..=NODES).map(NodeId).collect()
    }

    /// Stops every node and starts it again from its data directory.
    fn restart_all(&mut self) {
        for engine in self.engines.iter_mut().filter_map(Option::take) {
            engine.shutdown().unwrap();
        }
        for id in 1..=NODES {
            self.engines[(id - 1) as usize] = Some(self.open(NodeId(id)));
        }
    }

    /// Puts `key = value` through whichever node leads `group`, following leader hints and
    /// retrying through elections and membership changes; panics after [`PATIENCE`].
    async fn put(&self, group: GroupId, key: &str, value: &str) {
        let started = Instant::now();
        let all = Self::all();
        let mut node = all[0];
        let mut attempt = 0usize;
        loop {
            let command = Command::Put {
                key: Bytes::from(key.to_owned()),
                value: Bytes::from(value.to_owned()),
            };
            match self.engine(node).propose_kv(group, Request::Unsessioned(command)).await {
                Ok(applied) => {
                    assert!(applied.response.is_ok(), "{:?}", applied.response);
                    return;
                }
                Err(Error::NotLeader { leader_hint: Some(hint) }) if hint != node => node = hint,
                Err(
                    Error::NotLeader { .. }
                    | Error::NoQuorum
                    | Error::Timeout
                    | Error::ProposalDropped
                    | Error::Busy
                    | Error::GroupNotFound(_),
                ) => {
                    attempt += 1;
                    node = all[attempt % all.len()];
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(other) => panic!("put {group}/{key}: {other}"),
            }
            assert!(started.elapsed() < PATIENCE, "put {group}/{key} never succeeded");
        }
    }

    /// The node whose replica leads `group` among `among` (waiting for an election if needed).
    async fn leader_of(&self, group: GroupId, among: &[NodeId]) -> NodeId {
        let started = Instant::now();
        loop {
            for node in among {
                if let Ok(status) = self.engine(*node).status(group).await
                    && status.role == Role::Leader
                {
                    return *node;
                }
            }
            assert!(started.elapsed() < PATIENCE, "group {group} has no leader among {among:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs `edit` on `group`'s leader until it succeeds, following leader hints and waiting
    /// out elections, a learner still catching up, or an earlier attempt still under way (a
    /// timed-out attempt may complete later: `done` says when the goal is reached anyway).
    async fn reconfigure(
        &self,
        group: GroupId,
        edit: Edit,
        done: impl Fn(&Membership) -> bool,
    ) -> Membership {
        let started = Instant::now();
        let all = Self::all();
        let mut node = self.leader_of(group, &all).await;
        loop {
            let engine = self.engine(node);
            let result = match edit {
                Edit::AddLearner(target) => engine.add_learner(group, target).await,
                Edit::Promote(target) => engine.promote(group, target).await,
                Edit::Remove(target) => engine.remove_member(group, target).await,
            };
            match result {
                Ok(membership) => {
                    assert!(done(&membership), "{edit:?} gave {membership:?}");
                    return membership;
                }
                Err(Error::NotLeader { leader_hint: Some(hint) }) if hint != node => node = hint,
                Err(Error::InvalidArgument(reason)) => {
                    // Only an earlier attempt that timed out but went through explains it.
                    let membership = engine.membership(group).await.unwrap();
                    assert!(done(&membership), "{edit:?}: {reason} ({membership:?})");
                    return membership;
                }
                Err(
                    Error::NotLeader { .. }
                    | Error::NoQuorum
                    | Error::Timeout
                    | Error::ProposalDropped
                    | Error::Busy
                    | Error::LearnerNotReady { .. }
                    | Error::MembershipChangePending,
                ) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    node = self.leader_of(group, &all).await;
                }
                Err(other) => panic!("{edit:?} on {group}: {other}"),
            }
            assert!(started.elapsed() < PATIENCE, "{edit:?} on {group} never succeeded");
        }
    }

    /// Replaces node 3 by node 4 in `group`: 4 joins as a learner, is promoted, 3 is removed.
    async fn replace_3_by_4(&self, group: GroupId) -> Membership {
        let (old, new) = (NodeId(3), NodeId(4));
        self.engine(new).join_group(group).await.unwrap();
        self.reconfigure(group, Edit::AddLearner(new), |m| m.learners.contains(&new)).await;
        self.reconfigure(group, Edit::Promote(new), |m| m.voters.contains(&new)).await;
        let membership = self.reconfigure(group, Edit::Remove(old), |m| !m.is_member(old)).await;
        assert_eq!(membership.voters, node_ids(&[1, 2, 4]));
        assert!(membership.learners.is_empty() && !membership.is_joint(), "{membership:?}");
        membership
    }

    /// Waits until every node of `members` applied `expected` as its membership.
    async fn wait_membership(&self, group: GroupId, members: &[NodeId], expected: &Membership) {
        let started = Instant::now();
        for node in members {
            loop {
                let membership = self.engine(*node).membership(group).await.unwrap();
                if membership == *expected {
                    break;
                }
                assert!(
                    started.elapsed() < PATIENCE,
                    "{node} never applied {expected:?} (has {membership:?})"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Waits until every node of `members` holds the same state machine, containing every
    /// acknowledged write; returns it.
    async fn converge(
        &self,
        group: GroupId,
        members: &[NodeId],
        acknowledged: &BTreeMap<String, String>,
    ) -> BTreeMap<Bytes, Bytes> {
        let started = Instant::now();
        loop {
            let mut states = Vec::new();
            for node in members {
                states.push(contents(self.engine(*node), group).await);
            }
            let agree = states.windows(2).all(|pair| pair[0] == pair[1]);
            let complete = acknowledged.iter().all(|(key, value)| {
                states[0].get(key.as_bytes()).map(Bytes::as_ref) == Some(value.as_bytes())
            });
            if agree && complete {
                return states.swap_remove(0);
            }
            assert!(started.elapsed() < PATIENCE, "group {group} never converged on {members:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Edit {
    AddLearner(NodeId),
    Promote(NodeId),
    Remove(NodeId),
}

/// Writes `w0`, `w1`, ... to `group` one at a time until `stop` is set (and at least `min`
/// writes), recording each acknowledged write.
async fn writer(
    cluster: &Cluster,
    group: GroupId,
    min: usize,
    stop: &Cell<bool>,
) -> BTreeMap<String, String> {
    let mut acknowledged = BTreeMap::new();
    let mut i = 0;
    while i < min || !stop.get() {
        let (key, value) = (format!("w{i}"), format!("{group}-{i}"));
        cluster.put(group, &key, &value).await;
        acknowledged.insert(key, value);
        i += 1;
    }
    acknowledged
}

async fn create(cluster: &Cluster, group: GroupId, voters: &[NodeId]) {
    for node in voters {
        cluster.engine(*node).create_group(group, voters).await.unwrap();
    }
}

/// Waits until no group of any node is being ticked.
async fn wait_quiet(cluster: &Cluster) {
    common::wait_quiet(|| cluster.engines.iter().flatten().collect()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_is_replaced_while_writers_keep_writing() {
    let cluster = Cluster::start(1_000_000);
    let groups = [GroupId(1), GroupId(2)];
    for group in groups {
        create(&cluster, group, &node_ids(&[1, 2, 3])).await;
    }
    let stop = Cell::new(false);
    let writers = async {
        let mut all = Vec::new();
        for group in groups {
            all.push(writer(&cluster, group, 50, &stop));
        }
        let (first, second) = tokio::join!(all.remove(0), all.remove(0));
        [first, second]
    };
    let changes = async {
        // Let the writers get going first, so the changes happen under load.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for group in groups {
            cluster.replace_3_by_4(group).await;
        }
        // And keep writing a while under the new membership.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.set(true);
    };
    let (acknowledged, ()) = tokio::join!(writers, changes);

    let members = node_ids(&[1, 2, 4]);
    let expected = Membership::new(members.clone(), Vec::new());
    for (group, acknowledged) in groups.iter().zip(&acknowledged) {
        eprintln!("{group}: {} writes acknowledged", acknowledged.len());
        cluster.wait_membership(*group, &members, &expected).await;
        // Every current member holds the same state, with every acknowledged write in it.
        cluster.converge(*group, &members, acknowledged).await;
        // The removed node learned it, and so stopped: it is asleep, not campaigning.
        cluster.wait_membership(*group, &[NodeId(3)], &expected).await;
    }
    // A finished change lets the groups go quiet again, the removed replicas included.
    wait_quiet(&cluster).await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_leader_removes_itself_and_the_others_carry_on() {
    let cluster = Cluster::start(1_000_000);
    let group = GroupId(7);
    let voters = node_ids(&[1, 2, 3]);
    create(&cluster, group, &voters).await;
    let mut acknowledged = BTreeMap::new();
    for i in 0..20 {
        cluster.put(group, &format!("before{i}"), "v").await;
        acknowledged.insert(format!("before{i}"), "v".to_owned());
    }
    let leader = cluster.leader_of(group, &voters).await;
    let membership = cluster.engine(leader).remove_member(group, leader).await.unwrap();
    assert!(!membership.is_member(leader), "{membership:?}");
    let rest: Vec<NodeId> = voters.iter().copied().filter(|n| *n != leader).collect();
    assert_eq!(membership.voters, rest);

    // A new leader among the rest (handed over at once), and writes continue.
    let successor = cluster.leader_of(group, &rest).await;
    assert_ne!(successor, leader);
    for i in 0..20 {
        cluster.put(group, &format!("after{i}"), "v").await;
        acknowledged.insert(format!("after{i}"), "v".to_owned());
    }
    cluster.converge(group, &rest, &acknowledged).await;

    // The removed node stays out of the way: the successor's term does not move for several
    // election timeouts, and the removed replica refuses work.
    let term = cluster.engine(successor).status(group).await.unwrap().term;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = cluster.engine(successor).status(group).await.unwrap();
    assert_eq!((status.role, status.term), (Role::Leader, term));
    let removed = cluster.engine(leader).status(group).await.unwrap();
    assert_ne!(removed.role, Role::Leader);
    let command = Command::Put { key: "k".into(), value: "v".into() };
    let result = cluster.engine(leader).propose_kv(group, Request::Unsessioned(command)).await;
    assert!(matches!(result, Err(Error::NotLeader { .. } | Error::NoQuorum)), "{result:?}");
    assert_eq!(cluster.engine(leader).membership(group).await.unwrap(), membership);
}

/// Restart after a replacement: membership comes from the log (or the snapshot), never from
/// the catalog, which still lists each original node's initial voters 1,2,3.
async fn membership_and_data_survive_restart(snapshot_entries: u64) {
    let mut cluster = Cluster::start(snapshot_entries);
    let group = GroupId(3);
    create(&cluster, group, &node_ids(&[1, 2, 3])).await;
    let mut acknowledged = BTreeMap::new();
    for i in 0..40 {
        cluster.put(group, &format!("k{i}"), "before").await;
        acknowledged.insert(format!("k{i}"), "before".to_owned());
    }
    let membership = cluster.replace_3_by_4(group).await;
    let members = node_ids(&[1, 2, 4]);
    let changed_at = cluster.engine(NodeId(1)).status(group).await.unwrap().commit;
    for i in 40..80 {
        cluster.put(group, &format!("k{i}"), "after").await;
        acknowledged.insert(format!("k{i}"), "after".to_owned());
    }
    cluster.converge(group, &members, &acknowledged).await;
    if snapshot_entries < 100 {
        // Every member compacted its log past the change: only the snapshot records it.
        let started = Instant::now();
        for node in &members {
            while cluster.engine(*node).status(group).await.unwrap().snapshot_index <= changed_at {
                assert!(started.elapsed() < PATIENCE, "{node} never compacted past the change");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    cluster.restart_all();
    cluster.wait_membership(group, &members, &membership).await;
    cluster.converge(group, &members, &acknowledged).await;
    cluster.put(group, "after", "restart").await;
    acknowledged.insert("after".to_owned(), "restart".to_owned());
    cluster.converge(group, &members, &acknowledged).await;
    let leader = cluster.leader_of(group, &Cluster::all()).await;
    assert!(members.contains(&leader), "{leader} leads but is not a member");
}

#[tokio::test(flavor = "current_thread")]
async fn membership_and_data_survive_restart_with_the_change_in_the_log() {
    membership_and_data_survive_restart(1_000_000).await;
}

#[tokio::test(flavor = "current_thread")]
async fn membership_and_data_survive_restart_after_compaction_past_the_change() {
    membership_and_data_survive_restart(8).await;
}

#[tokio::test(flavor = "current_thread")]
async fn wrong_membership_requests_get_typed_errors() {
    let cluster = Cluster::start(1_000_000);
    let group = GroupId(5);
    let voters = node_ids(&[1, 2, 3]);
    create(&cluster, group, &voters).await;
    cluster.put(group, "k", "v").await;
    let leader = cluster.leader_of(group, &voters).await;
    let on_leader = cluster.engine(leader);
    let invalid = |result: Result<Membership, Error>| {
        assert!(matches!(result, Err(Error::InvalidArgument(_))), "{result:?}");
    };
    invalid(on_leader.add_learner(group, NodeId(9)).await);
    invalid(on_leader.add_learner(group, NodeId(2)).await);
    invalid(on_leader.promote(group, NodeId(2)).await);
    invalid(on_leader.promote(group, NodeId(4)).await);
    invalid(on_leader.remove_member(group, NodeId(4)).await);
    invalid(on_leader.change_membership(group, MembershipChange::default()).await);
    let both = MembershipChange { voters: voters.clone(), learners: node_ids(&[1]) };
    invalid(on_leader.change_membership(group, both).await);

    // A follower points at the leader.
    let follower = voters.iter().copied().find(|n| *n != leader).unwrap();
    let started = Instant::now();
    loop {
        match cluster.engine(follower).add_learner(group, NodeId(4)).await {
            Err(Error::NotLeader { leader_hint: Some(hint) }) => {
                assert_eq!(hint, leader);
                break;
            }
            Err(Error::NoQuorum) if started.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("{other:?}"),
        }
    }

    // One change at a time: the second, asked while the first is under way, is refused.
    let (first, second) = tokio::join!(
        on_leader.add_learner(group, NodeId(4)),
        on_leader.remove_member(group, NodeId(3)),
    );
    assert!(first.as_ref().is_ok_and(|m| m.learners == [NodeId(4)]), "{first:?}");
    assert!(matches!(second, Err(Error::MembershipChangePending)), "{second:?}");
    let back = on_leader.remove_member(group, NodeId(4)).await.unwrap();
    assert_eq!(back, Membership::new(voters.clone(), Vec::new()));

    // The last voter cannot go.
    let single = GroupId(6);
    create(&cluster, single, &node_ids(&[1])).await;
    cluster.leader_of(single, &node_ids(&[1])).await;
    invalid(cluster.engine(NodeId(1)).remove_member(single, NodeId(1)).await);

    // Joining twice, or asking about a group not hosted here.
    let joined = cluster.engine(NodeId(1)).join_group(group).await;
    assert!(matches!(joined, Err(Error::GroupExists(_))), "{joined:?}");
    let missing = cluster.engine(NodeId(4)).membership(group).await;
    assert!(matches!(missing, Err(Error::GroupNotFound(_))), "{missing:?}");
    let missing = cluster.engine(NodeId(4)).add_learner(group, NodeId(4)).await;
    assert!(matches!(missing, Err(Error::GroupNotFound(_))), "{missing:?}");
}

/// A learner far behind the leader's log is not promoted (as a voter it would stall commits
/// until it caught up): `LearnerNotReady` while it lags, then, once it has caught up from the
/// log, the promotion goes through.
#[tokio::test(flavor = "current_thread")]
async fn a_learner_far_behind_is_not_promoted_until_it_catches_up() {
    let mut cluster = Cluster::start(1_000_000);
    let group = GroupId(7);
    let voters = node_ids(&[1, 2, 3]);
    create(&cluster, group, &voters).await;
    cluster.put(group, "k", "v").await;
    // Node 4 is down while it becomes a learner and the log grows past the promotion bound.
    let learner = NodeId(4);
    cluster.engines[3].take().expect("node 4 runs").shutdown().unwrap();
    let leader = cluster.leader_of(group, &voters).await;
    cluster.engine(leader).add_learner(group, learner).await.unwrap();
    for i in 0..=flotilla::shard::PROMOTE_LAG_ENTRIES_MAX {
        cluster.put(group, &format!("k{i}"), "v").await;
    }
    let leader = cluster.leader_of(group, &voters).await;
    let refused = cluster.engine(leader).promote(group, learner).await;
    assert!(
        matches!(refused, Err(Error::LearnerNotReady { node }) if node == learner),
        "{refused:?}"
    );
    // Back up, it hosts the group, catches up from the leader's log and is promoted.
    cluster.engines[3] = Some(cluster.open(learner));
    cluster.engine(learner).join_group(group).await.unwrap();
    let started = Instant::now();
    loop {
        let leader = cluster.leader_of(group, &voters).await;
        match cluster.engine(leader).promote(group, learner).await {
            Ok(membership) => {
                assert!(membership.voters.contains(&learner), "{membership:?}");
                break;
            }
            Err(
                Error::LearnerNotReady { .. }
                | Error::NotLeader { .. }
                | Error::MembershipChangePending
                | Error::Timeout,
            ) if started.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    cluster.put(group, "after", "promotion").await;
}
