//! Deterministic simulation of whole Flotilla clusters (TESTING.md S1, and S5's reads).
//!
//! Each seed builds a cluster of 3, 4 or 5 nodes, each one shard: the real `ShardCore` (every
//! group's `Replica` and `KvStateMachine`) and the real `ShardStore` (its WAL on a simulated
//! disk that loses and tears unsynced writes, its snapshot files and catalog in a directory),
//! run by a copy of the shard driver's loop (`cluster_sim/node.rs`) in one thread, with a
//! simulated network and simulated time; every random choice comes from the seed. Clients run
//! at least 2,000 get / put / compare-and-set operations on keys of at least 8 groups
//! (linearizable reads through `ShardCore::read`, writes through `ShardCore::propose`) while
//! the nemesis partitions (both ways and one way), drops, duplicates, delays and reorders
//! frames, crashes nodes (quietly, or in the middle of a WAL write, tearing it) and restarts
//! them through `ShardStore::recover_group`, pauses them past the election timeout, stalls
//! disks and moves leadership; nodes tick at different rates; groups are snapshotted and their
//! logs compacted on the driver's cadence, so lagging replicas get snapshots. Mixed in with
//! those faults, an operator changes memberships through `ShardCore::change_membership` (joint
//! consensus, one change at a time per group): it removes voters (down to three, or two in a
//! cluster of three nodes; the leader itself about a third of the time), adds nodes back as
//! learners — hosting an empty replica on them first, as `Engine::join_group` does, if they do
//! not host the group — and promotes them, and replaces a voter by a node that does not host the
//! group; refusals (a change pending, a learner not caught up, not the leader, no quorum) are
//! expected, a finished change must report the membership asked for, and the replicas of
//! removed nodes are deleted as `Engine::remove_group` does. About half the
//! seeds (chosen from the seed) run with quiescence, as the engine does by default: idle groups
//! go quiet, and node-level liveness (every frame stamps its sender; every heartbeat interval
//! each node sends every peer an empty frame through the same faulty network) stands in for
//! their heartbeats. Then everything heals, and every group must commit a write and every
//! current member's replica (voters and learners in effect on the leader) converge within a
//! bound, all of them with the leader's membership; the replicas of nodes that are not members
//! are then deleted.
//!
//! Checked: after every unit of time, each replica's `check_invariants`, one leader per term
//! per group, one entry per index of a group whoever applies it, the same state at the same
//! applied index on every replica (also after a snapshot restore), each write at one log index;
//! at the end, the linearizability of every key's history (WGL; an unanswered write counts as
//! applied by its first application if some replica applied it, and is left out otherwise),
//! the durability of every acknowledged write (its value, or a later one, read from the
//! group's current leader, whose state every current member shares), that no write reported
//! dropped was applied, and identical state machines on every current member. With quiescence,
//! once the clients are gone, every group on every node must go quiet within a bound and then
//! stay quiet, sending no Raft message.
//!
//! - `cargo test --release -p flotilla --test cluster_sim` runs [`DEFAULT_SEEDS`] seeds (and the
//!   regression seeds); `CLUSTER_SIM_SEEDS=n` runs `n`, `CLUSTER_SIM_SEED_BASE=b` starts at `b`;
//! - `CLUSTER_SIM_SEED=s` replays seed `s` alone, bit for bit (a failing seed prints this);
//! - `CLUSTER_SIM_MEMBERSHIP=0` runs without membership changes, as the simulator did before
//!   it had them (the older regression seeds run that way, so they replay what they found);
//! - `CLUSTER_SIM_VERBOSE=1` prints every seed's figures; `CLUSTER_SIM_DEBUG=1` logs every
//!   node's steps.

#[path = "cluster_sim/cluster.rs"]
mod cluster;
#[path = "cluster_sim/machine.rs"]
mod machine;
#[path = "cluster_sim/membership.rs"]
mod membership;
#[path = "cluster_sim/nemesis.rs"]
mod nemesis;
#[path = "cluster_sim/node.rs"]
mod node;
#[path = "cluster_sim/workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::kv::{Command, Proposal, QueryResult, Request};
use flotilla::raftgroup::testkit::{CheckOptions, NetConfig, SimRng, Verdict, check_kv};
use flotilla::shard::{Completion, Quiescence};
use flotilla::wal::{Config as WalConfig, GroupId, WriterMode};

use cluster::Cluster;
use machine::{mix, op_of};
use membership::{MembershipStats, Reconfigurer};
use nemesis::Nemesis;
use node::{DriverBug, NodeConfig};
use workload::{KEY_SPACE, Workload, WorkloadConfig, group_of, key_bytes};

/// Runs with membership changes (every seed's default).
const WITH_MEMBERSHIP: bool = true;

/// Runs as the simulator did before it changed memberships (`CLUSTER_SIM_MEMBERSHIP=0`).
const WITHOUT_MEMBERSHIP: bool = false;

/// Seeds that failed once, kept forever: `(seed, whether the run changes memberships, what it
/// found)`. Seeds found before membership changes were simulated run without them, so they
/// replay exactly what they found.
const REGRESSION_SEEDS: &[(u64, bool, &str)] = &[
    (
        1,
        WITHOUT_MEMBERSHIP,
        "store bug, fixed: a local snapshot's file finishing after the leader's newer snapshot \
         was installed replaced the newer file, and its WAL compaction truncated the log after it",
    ),
    (
        0,
        WITHOUT_MEMBERSHIP,
        "core bug, fixed: node-level liveness queued the quiet groups to wake in hash-map order, \
         so a run with quiescence could not be replayed; they are queued in group order",
    ),
    (
        153,
        WITHOUT_MEMBERSHIP,
        "simulator: a Raft message sent before the heal on a slow path lands after the cluster \
         went quiet and wakes a group; quiet now also means no Raft message in flight",
    ),
    (
        275,
        WITHOUT_MEMBERSHIP,
        "simulator: a final read sent to a leader deposed before answering it is never answered \
         there (the replica drops its read state on stepping down; the engine fails it at its \
         deadline), and in a quiet group the deposed node pre-votes every election timeout \
         meanwhile; the final read now retries at the current leader as a client would",
    ),
    (
        318,
        WITHOUT_MEMBERSHIP,
        "core bug, fixed: proposals covered by a leader's snapshot installed on a deposed \
         leader were reported ProposalDropped (not applied) although they may be inside it; \
         they now fail with OutcomeUnknown",
    ),
    (
        3433,
        WITHOUT_MEMBERSHIP,
        "core bug, fixed: a leader re-elected after its log was cut back proposed below proposals \
         of its old term still pending; the queue was out of index order and the new proposal \
         was reported ProposalDropped although applied. The queue is now kept in index order",
    ),
    (2262, WITHOUT_MEMBERSHIP, LOWER_TERM_QUIESCE),
    (3504, WITHOUT_MEMBERSHIP, LOWER_TERM_QUIESCE),
    (
        357,
        WITH_MEMBERSHIP,
        "engine bug, fixed: the operator deleted a removed node's replica as soon as the \
         change finished; the leader had replaced itself, and the other members, not yet \
         knowing the leave-joint entry committed, were still in the joint configuration that \
         needed the deleted replica's vote: the group could never elect again. A removed leader \
         now keeps leading until the live members acknowledged that commit, and a change is \
         reported only then (Replica::settled_index); the operator deletes at once again",
    ),
    (
        4,
        WITH_MEMBERSHIP,
        "simulator: final values were read from a group's leader key by key, and a converged \
         quiet group held an election meanwhile (a straggling pre-vote woke a follower); the \
         values are now taken at convergence and each final read waits for a leader (found by \
         the first version of the membership operator; the run has changed since)",
    ),
    (126, WITH_MEMBERSHIP, AWAKE_LEARNER),
    (711, WITH_MEMBERSHIP, AWAKE_LEARNER),
    (765, WITH_MEMBERSHIP, AWAKE_LEARNER),
    (829, WITH_MEMBERSHIP, AWAKE_LEARNER),
    (167, WITH_MEMBERSHIP, AWAKE_LEARNER),
    (208, WITH_MEMBERSHIP, AWAKE_LEARNER),
    (
        94,
        WITH_MEMBERSHIP,
        "simulator: a leader handing over leadership refuses a membership change at once with \
         ProposalDropped (nothing appended): an expected refusal, not a violation (found by \
         the first version of the membership operator; the run has changed since)",
    ),
    (1548, WITH_MEMBERSHIP, FROZEN_JOINER),
    (
        2874,
        WITH_MEMBERSHIP,
        "core bug, fixed: a finished membership change reported the membership in effect after \
         the batch that applied its leave-joint entry, which already held a later change (node \
         1 removed itself from group 2, node 2 then added it back as a learner in the same \
         batch, and the removal reported learner 1); it now reports what the leave-joint entry \
         leaves to (found by a 2,000-seed soak, CLUSTER_SIM_SEED_BASE=1000)",
    ),
    (
        7086,
        WITH_MEMBERSHIP,
        "simulator: convergence compared the members of the leader's membership with each \
         other only; a leader removed by the change it just committed still led (it leads until \
         the members acknowledge the commit) while both members were one commit behind it, so \
         the run was judged converged and the members' joint membership failed the check. The \
         leader's own state is now compared too (found by a soak of seeds 6000..8000)",
    ),
    (
        4718,
        WITH_MEMBERSHIP,
        "core bug, fixed: read contexts restarted from 1 with every incarnation of a node; after \
         a whole-cluster power loss a ReadIndexResponse to a read of the previous life, delayed \
         in the network, confirmed a new read with the same context at index 1, and a \
         linearizable read returned a value overwritten before it began. Each start now numbers \
         its reads from a fresh random base (ShardCore::set_read_context_base; found by a soak \
         of seeds 4000..6000)",
    ),
    (
        1939,
        WITH_MEMBERSHIP,
        "core bug, fixed: a node restarted from a snapshot taken before it was added to a group \
         (joined, then made a voter by later entries) was put to sleep as a non-member at its \
         first tick, before applying the entries that made it a voter; it had led the group, \
         whose quiet followers still followed it (it came back before liveness declared it \
         down), so nothing woke anyone and the group never elected again. A replica now sleeps \
         as a non-member only once it applied everything committed (found by a soak of seeds \
         1000..2000 after quiet followers learned to forget a dead leader)",
    ),
];

/// Seeds that fail because of a known engine bug not fixed yet: `(seed, the bug)`. They run
/// only when named with `CLUSTER_SIM_SEED`.
const KNOWN_FAILURES: &[(u64, &str)] = &[];

/// What seed 1548 finds (membership changes; seed 252 found it before compaction deferral
/// changed its timing).
const FROZEN_JOINER: &str = "raftgroup bug (membership), fixed: a replica that is not a member \
     in its own view (an empty one hosted to join, or a removed one, or one not yet told of the \
     change that adds it) is never ticked (`ShardCore::tick` puts idle non-members to sleep), \
     so once it has heard from a leader its clock says so forever, and leader stickiness \
     (`in_lease`, `heard_from_leader_recently`) makes it ignore every pre-vote. Seed 1548: \
     group 4 replaced voter 2 by node 1, whose replica (not a member in its view, applied to \
     167) missed the joint entry; the leader lost leadership; nodes 2 and 3, in the joint \
     configuration (voters 1,3 / outgoing 2,3), pre-vote forever, node 1 never answers, and the \
     group has no leader after the heal. Seed 252 (before compaction deferral) was the same \
     with an empty joining replica. Fixed: a replica that is not a voter in its own view \
     ignores leader stickiness (`heard_from_leader_recently` is false unless promotable; test \
     a_replica_that_is_no_voter_does_not_refuse_pre_votes_for_a_leader_it_heard)";

/// What seeds 126, 711, 765 and 829 found (membership changes with quiescence); 167 and 208
/// found it too once compaction deferral shifted their timing.
const AWAKE_LEARNER: &str = "core bug (quiescence with learners), fixed: a learner woken by a \
     message after its leader went quiet (seed 711: a heartbeat of the current term on a slow \
     path) ticked forever: it never campaigns, so nothing made the leader send it `Quiesce` \
     again, and `ShardCore::tick` puts to sleep only idle replicas that are not members at all; \
     the group never went quiet on that node. A quiet leader now answers a straggling \
     heartbeat response with `Quiesce` (`Replica::requiesce`)";

/// What seeds 2262 and 3504 found.
const LOWER_TERM_QUIESCE: &str = "raftgroup bug (quiescence), fixed: a replica whose term was \
     ahead of its quiet group's leader (seed 2262: term 32 against 31) never learned of the \
     leader, because a quiet leader sends only Quiesce and a lower-term Quiesce was dropped \
     silently (a lower-term Append or Heartbeat is answered with the higher term); the replica \
     pre-voted every election timeout forever and the group never went quiet. A lower-term \
     Quiesce is now answered like a Heartbeat (raftgroup/testdata/quiesce.txt)";

/// Seeds run by default, split between two tests (one per core): 1,000 in release builds
/// (about 1 min of two cores), 64 in debug builds, whose runs are ten times slower.
const DEFAULT_SEEDS: u64 = if cfg!(debug_assertions) { 64 } else { 1_000 };

/// Client operations per seed.
const OPERATIONS: usize = 2_000;

/// One seed in this many runs twice and must leave the same trace.
const REPLAY_EVERY: u64 = 50;

/// Time units per tick of a node whose clock has no skew.
const TICK_UNITS: u64 = 20;

/// The election timeout, in ticks.
const ELECTION_TICKS: u32 = 10;

/// After the heal, the time within which every group must commit a write and every replica
/// converge (60 election timeouts), and within which a final read must be answered.
const HEAL_BOUND: u64 = 60 * ELECTION_TICKS as u64 * TICK_UNITS;

/// With quiescence, once the clients are gone, the time within which every group of every node
/// must be quiet (10 election timeouts: leaders quiesce as soon as their followers hold
/// everything, and the wake queue drains at least one group per tick).
const QUIET_BOUND: u64 = 10 * ELECTION_TICKS as u64 * TICK_UNITS;

/// How long a quiet cluster is watched for Raft messages and waking groups (3 election
/// timeouts: longer than a node is given to be declared down).
const QUIET_WATCH: u64 = 3 * ELECTION_TICKS as u64 * TICK_UNITS;

/// What one seed's run produced.
#[derive(Debug)]
struct RunReport {
    trace: u64,
    operations: u64,
    answered: u64,
    quiescence: bool,
    membership: Option<MembershipStats>,
    end_time: u64,
    summary: String,
}

/// The configuration of seed `seed`.
fn scenario(seed: u64, rng: &mut SimRng) -> (NodeConfig, Vec<u64>, u64, NetConfig, WorkloadConfig) {
    let nodes = 3 + seed % 3;
    let groups = rng.between(8, 12);
    // Clock skew: usually within ±5 %, in one seed in five up to ±30 %.
    let skew = if rng.percent(20) { TICK_UNITS * 3 / 10 } else { TICK_UNITS / 20 };
    let tick_units: Vec<u64> =
        (0..nodes).map(|_| rng.between(TICK_UNITS - skew, TICK_UNITS + skew)).collect();
    let segment_bytes = [32 << 10, 64 << 10, 128 << 10][rng.index(3)];
    let config = NodeConfig {
        wal: WalConfig {
            segment_bytes,
            batch_bytes_max: (segment_bytes / 2) as usize,
            writer: WriterMode::Inline,
            ..WalConfig::default()
        },
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: rng.between(1, 3) as u32,
        snapshot_entries: rng.between(4, 64),
        segments_target: rng.between(2, 6),
        disk_delay_max: rng.between(1, 40),
        snapshot_delay_max: rng.between(1, 200),
        quiescence: quiescence_of(seed),
        bug: None,
    };
    let delay_max = rng.between(1, 30);
    let network = NetConfig {
        drop_percent: rng.between(0, 30),
        duplicate_percent: rng.between(0, 5),
        delay_min: 1,
        delay_max,
        slow_percent: rng.between(0, 5),
        slow_delay_max: 10 * delay_max,
    };
    let election_units = u64::from(ELECTION_TICKS) * TICK_UNITS;
    let timeout = rng.between(2 * election_units, 4 * election_units);
    let workload = WorkloadConfig {
        clients: rng.between(3, 10),
        operations: OPERATIONS,
        groups,
        keys_per_group: rng.between(1, 4),
        timeout,
        read_retry: timeout / 3,
        backoff_max: 2 * TICK_UNITS,
        think_max: TICK_UNITS,
    };
    (config, tick_units, groups, network, workload)
}

/// Quiescence on about half the seeds, decided from the seed alone (a stream of its own, so the
/// rest of the scenario is what it was before quiescence was simulated).
fn quiescence_of(seed: u64) -> Option<Quiescence> {
    let mut rng = SimRng::new(mix(seed, 0x9_1E5C));
    rng.percent(50).then(|| Quiescence {
        // The driver's: two election timeouts.
        dead_after_ticks: 2 * ELECTION_TICKS,
        wakes_per_tick: rng.between(2, 8) as usize,
    })
}

fn deliver(cluster: &mut Cluster, workload: &mut Workload) {
    let (completions, refusals) = cluster.take_completions();
    if !completions.is_empty() || !refusals.is_empty() {
        workload.on_completions(cluster, completions, refusals);
    }
}

/// Whether runs change memberships: yes, unless `CLUSTER_SIM_MEMBERSHIP=0`.
fn membership_default() -> bool {
    env_u64("CLUSTER_SIM_MEMBERSHIP").is_none_or(|on| on > 0)
}

/// Runs one seed, with or without membership changes, and with a deliberate driver bug if
/// `bug` says so; panics on any violation.
fn run_with(seed: u64, bug: Option<DriverBug>, membership: bool) -> RunReport {
    let mut rng = SimRng::new(seed);
    let (mut config, tick_units, groups, network, workload_config) = scenario(seed, &mut rng);
    config.bug = bug;
    let election_units = u64::from(ELECTION_TICKS) * TICK_UNITS;
    let mut cluster = Cluster::new(seed, config.clone(), &tick_units, groups, network, rng.fork());
    let mut workload = Workload::new(workload_config, cluster.ids().to_vec(), rng.fork());
    // A stream of its own: the other faults come when they came before membership changes.
    let reconfigurer = membership.then(|| {
        Reconfigurer::new(SimRng::new(mix(seed, 0x03E3_BE25)), tick_units.len(), election_units)
    });
    let mut nemesis = Nemesis::new(rng.fork(), election_units, reconfigurer);

    let deadline = OPERATIONS as u64 * workload_config.timeout;
    while !workload.is_done() {
        cluster.advance();
        deliver(&mut cluster, &mut workload);
        nemesis.step(&mut cluster);
        deliver(&mut cluster, &mut workload);
        workload.step(&mut cluster);
        deliver(&mut cluster, &mut workload);
        assert!(cluster.now() < deadline, "seed {seed}: the workload did not finish");
    }

    let mut next_token = u64::MAX / 2;
    heal(seed, &mut cluster, &mut nemesis, &mut next_token);
    let finals = final_reads(seed, &mut cluster, &mut workload, &mut next_token);
    let quiet_at = config.quiescence.map(|_| goes_quiet(seed, &mut cluster));

    let oracle = cluster.oracle();
    let (history, never_applied) = workload.resolved_history(&oracle);
    if let Err(error) = workload.check_durability(&oracle, &finals) {
        panic!("seed {seed}: durability: {error}");
    }
    match check_kv(&history, &CheckOptions::default()) {
        Verdict::Linearizable => {}
        verdict => panic!("seed {seed}: client history: {verdict}"),
    }
    let stats = workload.stats();
    let (applies, restores) = (oracle.applies, oracle.restores);
    drop(oracle);
    let membership = nemesis.membership_stats();
    let mut summary = format!(
        "{} nodes, {} groups, {} keys, quiescence {:?} (quiet {quiet_at:?} after the clients \
         left), end at {}, {never_applied} unanswered writes never applied, {applies} entries \
         applied, {restores} snapshots restored, {:?}, {:?}, {:?}, {:?}",
        cluster.ids().len(),
        groups,
        finals.len(),
        config.quiescence,
        cluster.now(),
        stats,
        cluster.stats(),
        nemesis.stats(),
        cluster.network_stats()
    );
    if let Some(membership) = membership {
        let _ = write!(summary, ", {membership:?}");
    }
    RunReport {
        trace: mix(cluster.trace(), history.len() as u64),
        operations: stats.issued,
        answered: stats.answered,
        quiescence: config.quiescence.is_some(),
        membership,
        end_time: cluster.now(),
        summary,
    }
}

/// Heals everything; then every group must commit a write (a probe through its leader), and
/// every current member's replica converge, within [`HEAL_BOUND`]. Once they have, the
/// replicas of nodes that are not members are deleted (as an operator would).
fn heal(seed: u64, cluster: &mut Cluster, nemesis: &mut Nemesis, next_token: &mut u64) {
    nemesis.heal_all(cluster, NetConfig::reliable(1, 10));
    let healed_at = cluster.now();
    let bound = HEAL_BOUND;
    let election_units = u64::from(ELECTION_TICKS) * TICK_UNITS;
    let mut probes: BTreeMap<GroupId, (u64, Option<u64>)> = BTreeMap::new();
    let mut committed: BTreeMap<GroupId, bool> = BTreeMap::new();
    loop {
        cluster.advance();
        let (completions, _) = cluster.take_completions();
        for completion in completions {
            if let Completion::Applied { token, .. } = completion {
                for (group, (probe, _)) in &probes {
                    if *probe == token {
                        committed.insert(*group, true);
                    }
                }
            }
        }
        if committed.len() == cluster.groups().len() && cluster.converged() {
            cluster.check_memberships();
            // Their deletion is IO: converge again after it.
            if cluster.remove_non_members() == 0 {
                break;
            }
            continue;
        }
        for group in cluster.groups().to_vec() {
            if committed.contains_key(&group) {
                continue;
            }
            let resend = probes
                .get(&group)
                .is_none_or(|(_, at)| at.is_none_or(|at| cluster.now() >= at + election_units));
            if resend && let Some(leader) = cluster.leader_of(group) {
                *next_token += 1;
                let command = Command::Put {
                    key: Bytes::from_static(b"probe"),
                    // Not 8 bytes: no client operation's id.
                    value: Bytes::from_static(b"probe"),
                };
                let payload =
                    Proposal { leader_time_ms: 0, request: Request::Unsessioned(command) }
                        .to_bytes();
                let sent =
                    workload::Frontend::propose(cluster, leader, group, payload, *next_token);
                if node::debug() {
                    eprintln!("t{} probe g{group} at {leader}: {sent:?}", cluster.now());
                }
                probes.insert(group, (*next_token, sent.is_ok().then_some(cluster.now())));
            }
        }
        assert!(
            cluster.now() < healed_at + bound,
            "seed {seed}: no convergence {bound} units after healing ({} of {} groups committed \
             a write):\n{}",
            committed.len(),
            cluster.groups().len(),
            cluster.describe()
        );
    }
}

/// With quiescence, once the clients are gone (their requests failed, as deadlines would): every
/// group of every node must go quiet within [`QUIET_BOUND`] — nothing keeps waking groups — and
/// stay quiet, sending no Raft message, for [`QUIET_WATCH`]. Returns how long going quiet took.
fn goes_quiet(seed: u64, cluster: &mut Cluster) -> u64 {
    cluster.expire_all();
    let _ = cluster.take_completions();
    let started = cluster.now();
    // Quiet: no group awake and no Raft message left in flight that could wake one.
    while cluster.awake_count() > 0 || cluster.now() <= cluster.raft_delivered_by() {
        assert!(
            cluster.now() < started + QUIET_BOUND,
            "seed {seed}: not quiet {QUIET_BOUND} units after the clients left:{}\n{}",
            cluster.describe_awake(),
            cluster.describe()
        );
        cluster.advance();
    }
    let took = cluster.now() - started;
    let (messages, quiet_at) = (cluster.raft_messages(), cluster.now());
    while cluster.now() < quiet_at + QUIET_WATCH {
        cluster.advance();
        assert!(
            cluster.awake_count() == 0 && cluster.raft_messages() == messages,
            "seed {seed}: a quiet cluster woke at {} ({} Raft messages since {quiet_at}):{}\n{}",
            cluster.now(),
            cluster.raft_messages() - messages,
            cluster.describe_awake(),
            cluster.describe()
        );
    }
    let _ = cluster.take_completions();
    took
}

/// How long a final read waits for its answer before asking again (the workload's longest
/// client timeout).
const FINAL_READ_RETRY: u64 = 4 * ELECTION_TICKS as u64 * TICK_UNITS;

/// Reads every key linearizably through its group's leader, records the reads in the history,
/// and returns each key's converged value.
fn final_reads(
    seed: u64,
    cluster: &mut Cluster,
    workload: &mut Workload,
    next_token: &mut u64,
) -> BTreeMap<u64, Option<u64>> {
    // The converged values, taken at once: a group may change leaders during the reads.
    let values: BTreeMap<u64, Option<u64>> = workload
        .keys()
        .into_iter()
        .map(|key| {
            let value = cluster.final_value(group_of(key), &key_bytes(key));
            (key, value.map(|v| op_of(&v).expect("an id")))
        })
        .collect();
    let mut finals = BTreeMap::new();
    for key in workload.keys() {
        let group = group_of(key);
        let value = values[&key];
        finals.insert(key, value);
        // A converged group may hold an election meanwhile (a straggling message woke a quiet
        // follower): wait for its leader.
        let waited_from = cluster.now();
        let mut leader = loop {
            if let Some(leader) = cluster.leader_of(group) {
                break leader;
            }
            assert!(
                cluster.now() < waited_from + HEAL_BOUND,
                "seed {seed}: group {group} has had no leader for {HEAL_BOUND} units after \
                 converging:{}\n{}",
                cluster.describe_awake(),
                cluster.describe()
            );
            cluster.advance();
            let _ = cluster.take_completions();
        };
        *next_token += 1;
        let mut token = *next_token;
        let invoke = cluster.stamp();
        if node::debug() {
            eprintln!("t{} final read g{group} at {leader}", cluster.now());
        }
        workload::Frontend::read(cluster, leader, group, key_bytes(key), token)
            .unwrap_or_else(|error| panic!("seed {seed}: final read refused: {error}"));
        let started = cluster.now();
        let mut attempt_at = started;
        let read = loop {
            // Like a client at its deadline: a read left on a leader deposed before answering
            // it is never answered there (the replica drops its read state on stepping down), so
            // give up on it and ask the current leader. A read has no effect: its operation in
            // the history spans every attempt, from the first invocation.
            if cluster.now() >= attempt_at + FINAL_READ_RETRY {
                workload::Frontend::expire(cluster, leader, &[token]);
                if let Some(now_leading) = cluster.leader_of(group) {
                    leader = now_leading;
                    *next_token += 1;
                    token = *next_token;
                    let _ = workload::Frontend::read(cluster, leader, group, key_bytes(key), token);
                }
                attempt_at = cluster.now();
            }
            cluster.advance();
            let (completions, _) = cluster.take_completions();
            let answer = completions.into_iter().find_map(|completion| match completion {
                Completion::Read { token: t, result: QueryResult::Value(value), .. }
                    if t == token =>
                {
                    Some(value.map(|v| op_of(&v).expect("an id")))
                }
                _ => None,
            });
            if let Some(answer) = answer {
                break answer;
            }
            assert!(
                cluster.now() < started + HEAL_BOUND,
                "seed {seed}: the final read of key {key} (group {group}, at {leader}) was not \
                 answered:{}\n{}",
                cluster.describe_awake(),
                cluster.describe()
            );
        };
        let at = cluster.stamp();
        assert_eq!(
            read, value,
            "seed {seed}: the final read of key {key} disagrees with the state"
        );
        workload.record_final_read(key, read, invoke, at);
    }

    finals
}

/// Runs `seed` (with or without membership changes), printing how to replay it if it fails;
/// one in [`REPLAY_EVERY`] runs twice and must leave the same trace.
fn run_reported(seed: u64, membership: bool) -> RunReport {
    let report = match catch_unwind(AssertUnwindSafe(|| run_with(seed, None, membership))) {
        Ok(report) => report,
        Err(panic) => {
            let mode = if membership { "" } else { "CLUSTER_SIM_MEMBERSHIP=0 " };
            eprintln!(
                "cluster simulation failed for seed {seed}; replay it with\n  \
                 {mode}CLUSTER_SIM_SEED={seed} cargo test --release -p flotilla --test \
                 cluster_sim\n\
                 and add it to REGRESSION_SEEDS (or KNOWN_FAILURES, with the bug) in \
                 engine/tests/cluster_sim.rs"
            );
            resume_unwind(panic);
        }
    };
    if seed.is_multiple_of(REPLAY_EVERY) {
        let again = run_with(seed, None, membership);
        assert_eq!(report.trace, again.trace, "seed {seed} did not replay bit for bit");
        assert_eq!(report.end_time, again.end_time, "seed {seed} did not replay bit for bit");
    }
    report
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.parse().unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")))
}

/// Runs the seeds with `seed % 2 == half` and reports the figures.
fn run_seeds(half: u64) {
    let seeds: Vec<u64> = match env_u64("CLUSTER_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let base = env_u64("CLUSTER_SIM_SEED_BASE").unwrap_or(0);
            let count = env_u64("CLUSTER_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
            (base..base + count)
                .filter(|seed| !KNOWN_FAILURES.iter().any(|(known, _)| known == seed))
                .collect()
        }
    };
    let seeds: Vec<u64> = seeds.into_iter().filter(|seed| seed % 2 == half).collect();
    let verbose = env_u64("CLUSTER_SIM_VERBOSE").is_some_and(|verbose| verbose > 0);
    let (mut operations, mut answered, mut quiet) = (0, 0, 0);
    let mut changes = MembershipStats::default();
    let started = Instant::now();
    for &seed in &seeds {
        let report = run_reported(seed, membership_default());
        assert!(report.operations >= OPERATIONS as u64, "seed {seed}: {}", report.summary);
        // A run where almost nothing succeeded tested almost nothing.
        assert!(
            report.answered * 4 >= report.operations,
            "seed {seed}: only {} of {} operations answered: {}",
            report.answered,
            report.operations,
            report.summary
        );
        if verbose || seeds.len() == 1 {
            eprintln!("seed {seed}: {}", report.summary);
        }
        operations += report.operations;
        answered += report.answered;
        quiet += u64::from(report.quiescence);
        if let Some(membership) = report.membership {
            changes.asked += membership.asked;
            changes.accepted += membership.accepted;
            changes.done += membership.done;
            changes.replicas_removed += membership.replicas_removed;
        }
    }
    let elapsed: Duration = started.elapsed();
    eprintln!(
        "{} cluster seeds ({quiet} with quiescence): {operations} operations ({answered} \
         answered), {} membership changes asked ({} accepted, {} finished; {} replicas of \
         removed nodes deleted) in {elapsed:.1?}",
        seeds.len(),
        changes.asked,
        changes.accepted,
        changes.done,
        changes.replicas_removed
    );
}

#[test]
fn clusters_of_even_seeds_stay_linearizable_and_durable_under_faults() {
    run_seeds(0);
}

#[test]
fn clusters_of_odd_seeds_stay_linearizable_and_durable_under_faults() {
    run_seeds(1);
}

#[test]
fn regression_seeds_pass() {
    if env_u64("CLUSTER_SIM_SEED").is_some() {
        return;
    }
    for &(seed, membership, _found) in REGRESSION_SEEDS {
        run_reported(seed, membership);
    }
}

/// Keys are numbered per group: a key's group is recoverable from it.
#[test]
fn keys_know_their_group() {
    assert_eq!(group_of(7 * KEY_SPACE + 3), GroupId(7));
}

/// The first of `seeds` whose run with `bug` fails with a message containing one of
/// `expected`, and that message.
fn first_failure(
    bug: DriverBug,
    seeds: std::ops::Range<u64>,
    expected: &[&str],
) -> Option<(u64, String)> {
    seeds.into_iter().find_map(|seed| {
        let panic =
            catch_unwind(AssertUnwindSafe(|| run_with(seed, Some(bug), WITH_MEMBERSHIP))).err()?;
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(ToString::to_string))
            .unwrap_or_default();
        expected.iter().any(|what| message.contains(what)).then_some((seed, message))
    })
}

#[test]
fn the_simulation_catches_acks_sent_before_persistence() {
    // Acknowledging entries and votes before they are durable loses them in crashes: some seed
    // must show it as a broken safety property (liveness failures do not count here).
    let safety = [
        "election safety",
        "state machine safety",
        "differs from",
        "applied twice",
        "durability",
        "not linearizable",
        "disagrees",
    ];
    let (seed, message) = first_failure(DriverBug::AckBeforePersist, 0..40, &safety)
        .expect("acknowledging before persisting broke no safety property in 40 seeds");
    eprintln!("acks before persistence caught by seed {seed}: {message}");
}

#[test]
fn the_simulation_catches_stale_local_reads() {
    let (seed, message) = first_failure(DriverBug::LocalReads, 0..10, &["not linearizable"])
        .expect("reads served without ReadIndex went unnoticed in 10 seeds");
    eprintln!("local reads caught by seed {seed}: {message}");
}
