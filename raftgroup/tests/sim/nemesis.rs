//! The nemesis: at random moments it degrades the network, partitions it (both ways or one way),
//! crashes replicas (sometimes the leader, rarely all of them), pauses them for longer than an
//! election timeout, stalls disks, compacts logs and moves leadership; and it schedules the
//! recoveries.

use flotilla_raftgroup::testkit::{NetConfig, SimRng};

use super::cluster::Cluster;

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
    /// The election timeout in time units, to size pauses and downtimes.
    election_units: u64,
    next_at: u64,
    heal_at: Option<u64>,
    /// `(time, node)` restarts due.
    restarts: Vec<(u64, u64)>,
    /// `(time, node)` resumes due.
    resumes: Vec<(u64, u64)>,
    stats: NemesisStats,
}

impl Nemesis {
    /// A nemesis for a cluster whose election timeout is `election_units` long.
    pub fn new(mut rng: SimRng, election_units: u64) -> Self {
        let next_at = rng.between(GAP_MIN, GAP_MAX);
        Nemesis {
            rng,
            election_units,
            next_at,
            heal_at: None,
            restarts: Vec::new(),
            resumes: Vec::new(),
            stats: NemesisStats::default(),
        }
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
        for (_, node) in take_due(&mut self.restarts, now) {
            cluster.restart(node);
        }
        for (_, node) in take_due(&mut self.resumes, now) {
            cluster.resume(node);
        }
        if now < self.next_at {
            return;
        }
        self.next_at = now + self.rng.between(GAP_MIN, GAP_MAX);
        let ids = cluster.ids().to_vec();
        match self.rng.below(100) {
            0..=14 => self.change_network(cluster),
            15..=26 => {
                // Cut off a minority: often the leader alone, otherwise anyone.
                let size = 1 + self.rng.below((ids.len() as u64 - 1) / 2) as usize;
                let mut side = match cluster.leader() {
                    Some(leader) if self.rng.percent(50) => vec![leader],
                    _ => Vec::new(),
                };
                let mut others: Vec<u64> =
                    ids.iter().copied().filter(|id| !side.contains(id)).collect();
                self.rng.shuffle(&mut others);
                side.extend(others.into_iter().take(size - side.len()));
                cluster.network().partition(&side, &ids);
                self.stats.partitions += 1;
                self.schedule_heal(now);
            }
            27..=34 => {
                for _ in 0..self.rng.between(1, 3) {
                    let from = ids[self.rng.index(ids.len())];
                    let to = ids[self.rng.index(ids.len())];
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
            43..=56 => {
                if let Some(node) = self.pick_victim(cluster, &ids) {
                    cluster.crash(node);
                    let downtime = self.rng.between(1, 4 * self.election_units);
                    self.restarts.push((now + downtime, node));
                }
            }
            57..=58 => {
                // Power loss everywhere: only what each disk synced survives.
                for &node in &ids {
                    cluster.crash(node);
                    let downtime = self.rng.between(1, self.election_units);
                    self.restarts.push((now + downtime, node));
                }
                self.stats.total_crashes += 1;
            }
            59..=68 => {
                if let Some(node) = self.pick_victim(cluster, &ids) {
                    cluster.pause(node);
                    let pause = self.rng.between(self.election_units / 2, 4 * self.election_units);
                    self.resumes.push((now + pause, node));
                }
            }
            69..=80 => {
                let node = ids[self.rng.index(ids.len())];
                cluster.compact(node);
            }
            81..=85 => {
                if let Some(leader) = cluster.leader() {
                    let to = ids[self.rng.index(ids.len())];
                    cluster.transfer(leader, to);
                }
            }
            86..=89 => {
                // A stalled disk, often the leader's.
                let node = match cluster.leader() {
                    Some(leader) if self.rng.percent(50) => leader,
                    _ => ids[self.rng.index(ids.len())],
                };
                let until = now + self.rng.between(self.election_units, 6 * self.election_units);
                cluster.stall_disk(node, until);
            }
            _ => {}
        }
    }

    /// A running node to crash or pause, if a majority would still be running without it;
    /// the leader half of the time.
    fn pick_victim(&mut self, cluster: &Cluster, ids: &[u64]) -> Option<u64> {
        let up: Vec<u64> = ids.iter().copied().filter(|&id| cluster.is_up(id)).collect();
        if up.len() <= ids.len() / 2 + 1 {
            return None;
        }
        match cluster.leader() {
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
        self.heal_at = None;
        cluster.network().heal();
        cluster.network().set_config(network);
    }
}

fn take_due(schedule: &mut Vec<(u64, u64)>, now: u64) -> Vec<(u64, u64)> {
    let (due, later): (Vec<_>, Vec<_>) = schedule.drain(..).partition(|&(at, _)| at <= now);
    *schedule = later;
    due
}
