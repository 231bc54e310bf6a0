//! The nemesis: at random moments it degrades the network (loss, duplication, delay,
//! reordering), partitions it (both ways or one way), crashes nodes (quietly or in the middle of
//! a WAL write, tearing it; rarely all of them), pauses them for longer than an election
//! timeout, stalls disks, moves leadership and — unless the run is one of the regression runs
//! from before membership changes were simulated — changes a group's membership (see
//! `membership.rs`: removing voters, the leader included, adding learners on nodes that host
//! the group or an empty replica of it, promoting them, replacing a voter by a node that does
//! not host the group; interleaved with every other fault, so also while nodes are down,
//! paused or cut off); and it schedules the recoveries.

use flotilla::raftgroup::NodeId;
use flotilla::raftgroup::testkit::{NetConfig, SimRng};

use super::cluster::Cluster;
use super::membership::{MembershipStats, Reconfigurer};

/// Quiet time between two nemesis actions, in time units.
const GAP_MIN: u64 = 40;
const GAP_MAX: u64 = 600;

/// What the nemesis did.
#[derive(Clone, Copy, Debug, Default)]
pub struct NemesisStats {
    /// Network behaviour changes.
    pub network_changes: u64,
    /// Symmetric partitions.
    pub partitions: u64,
    /// One-way link cuts.
    pub one_way_cuts: u64,
    /// Whole-cluster power losses.
    pub total_crashes: u64,
}

/// Fault injection with its own random stream.
#[derive(Debug)]
pub struct Nemesis {
    rng: SimRng,
    election_units: u64,
    next_at: u64,
    heal_at: Option<u64>,
    restarts: Vec<(u64, NodeId)>,
    resumes: Vec<(u64, NodeId)>,
    stats: NemesisStats,
    /// Membership changes, if the run has them.
    membership: Option<Reconfigurer>,
}

impl Nemesis {
    /// A nemesis for a cluster whose election timeout is `election_units` long, changing
    /// memberships through `membership` if given.
    pub fn new(mut rng: SimRng, election_units: u64, membership: Option<Reconfigurer>) -> Self {
        let next_at = rng.between(GAP_MIN, GAP_MAX);
        Nemesis {
            rng,
            election_units,
            next_at,
            heal_at: None,
            restarts: Vec::new(),
            resumes: Vec::new(),
            stats: NemesisStats::default(),
            membership,
        }
    }

    /// What the membership operator did, if the run changes memberships.
    pub fn membership_stats(&self) -> Option<MembershipStats> {
        self.membership.as_ref().map(Reconfigurer::stats)
    }

    /// What it did.
    pub fn stats(&self) -> NemesisStats {
        self.stats
    }

    /// Performs due recoveries, and maybe a new fault.
    pub fn step(&mut self, cluster: &mut Cluster) {
        let now = cluster.now();
        if self.heal_at.is_some_and(|at| at <= now) {
            self.heal_at = None;
            cluster.network().heal();
        }
        for node in take_due(&mut self.restarts, now) {
            cluster.restart(node);
        }
        for node in take_due(&mut self.resumes, now) {
            cluster.resume(node);
        }
        if let Some(membership) = self.membership.as_mut() {
            membership.step(cluster);
        }
        if now < self.next_at {
            return;
        }
        self.next_at = now + self.rng.between(GAP_MIN, GAP_MAX);
        let ids = cluster.ids().to_vec();
        let raw: Vec<u64> = ids.iter().map(|id| id.0).collect();
        let group = cluster.groups()[self.rng.index(cluster.groups().len())];
        match self.rng.below(100) {
            0..=14 => self.change_network(cluster),
            15..=26 => {
                // Cut off a minority: often a group's leader, otherwise anyone.
                let size = 1 + self.rng.below((ids.len() as u64 - 1) / 2) as usize;
                let mut side = match cluster.leader_of(group) {
                    Some(leader) if self.rng.percent(50) => vec![leader.0],
                    _ => Vec::new(),
                };
                let mut others: Vec<u64> =
                    raw.iter().copied().filter(|id| !side.contains(id)).collect();
                self.rng.shuffle(&mut others);
                side.extend(others.into_iter().take(size - side.len()));
                cluster.network().partition(&side, &raw);
                self.stats.partitions += 1;
                self.schedule_heal(now);
            }
            27..=34 => {
                for _ in 0..self.rng.between(1, 3) {
                    let from = raw[self.rng.index(raw.len())];
                    let to = raw[self.rng.index(raw.len())];
                    if from != to {
                        cluster.network().cut(from, to);
                        self.stats.one_way_cuts += 1;
                    }
                }
                self.schedule_heal(now);
            }
            35..=42 => {
                self.heal_at = None;
                cluster.network().heal();
            }
            43..=60 => {
                if let Some(node) = self.pick_victim(cluster, &ids, group) {
                    if self.rng.percent(60) {
                        cluster.crash_mid_write(node);
                    } else {
                        cluster.crash(node);
                    }
                    let downtime = self.rng.between(1, 4 * self.election_units);
                    self.restarts.push((now + downtime, node));
                }
            }
            61..=62 => {
                // Power loss everywhere: only what each disk synced survives.
                for &node in &ids {
                    if self.rng.percent(50) {
                        cluster.crash_mid_write(node);
                    } else {
                        cluster.crash(node);
                    }
                    let downtime = self.rng.between(1, self.election_units);
                    self.restarts.push((now + downtime, node));
                }
                self.stats.total_crashes += 1;
            }
            63..=74 => {
                if let Some(node) = self.pick_victim(cluster, &ids, group) {
                    cluster.pause(node);
                    let pause = self.rng.between(self.election_units, 4 * self.election_units);
                    self.resumes.push((now + pause, node));
                }
            }
            75..=82 => {
                let to = ids[self.rng.index(ids.len())];
                cluster.transfer(group, to);
            }
            83..=88 => {
                let node = match cluster.leader_of(group) {
                    Some(leader) if self.rng.percent(50) => leader,
                    _ => ids[self.rng.index(ids.len())],
                };
                let until = now + self.rng.between(self.election_units, 6 * self.election_units);
                cluster.stall_disk(node, until);
            }
            _ => {
                if let Some(membership) = self.membership.as_mut() {
                    membership.act(cluster, group);
                }
            }
        }
    }

    /// A running node to crash or pause, if a majority would still be running without it; the
    /// leader of `group` half of the time.
    fn pick_victim(
        &mut self,
        cluster: &Cluster,
        ids: &[NodeId],
        group: flotilla::wal::GroupId,
    ) -> Option<NodeId> {
        let up: Vec<NodeId> = ids.iter().copied().filter(|id| cluster.is_up(*id)).collect();
        if up.len() <= ids.len() / 2 + 1 {
            return None;
        }
        match cluster.leader_of(group) {
            Some(leader) if self.rng.percent(50) => Some(leader),
            _ => Some(up[self.rng.index(up.len())]),
        }
    }

    fn schedule_heal(&mut self, now: u64) {
        let heal_at = now + self.rng.between(self.election_units, 8 * self.election_units);
        self.heal_at = Some(self.heal_at.map_or(heal_at, |at| at.max(heal_at)));
    }

    fn change_network(&mut self, cluster: &mut Cluster) {
        let delay_max = self.rng.between(1, 60);
        let config = NetConfig {
            drop_percent: self.rng.between(0, 30),
            duplicate_percent: self.rng.between(0, 10),
            delay_min: self.rng.between(0, delay_max.min(5)),
            delay_max,
            slow_percent: self.rng.between(0, 10),
            slow_delay_max: self.rng.between(delay_max, 20 * delay_max),
        };
        cluster.network().set_config(config);
        self.stats.network_changes += 1;
    }

    /// Ends every fault: restarts, resumes, heals, and makes the network reliable.
    pub fn heal_all(&mut self, cluster: &mut Cluster, network: NetConfig) {
        for (_, node) in self.restarts.drain(..) {
            cluster.restart(node);
        }
        for (_, node) in self.resumes.drain(..) {
            cluster.resume(node);
        }
        for &node in &cluster.ids().to_vec() {
            cluster.restart(node);
            cluster.resume(node);
            cluster.stall_disk(node, 0);
        }
        self.heal_at = None;
        cluster.network().heal();
        cluster.network().set_config(network);
    }
}

fn take_due(schedule: &mut Vec<(u64, NodeId)>, now: u64) -> Vec<NodeId> {
    let (due, later): (Vec<_>, Vec<_>) = schedule.drain(..).partition(|&(at, _)| at <= now);
    *schedule = later;
    due.into_iter().map(|(_, node)| node).collect()
}
