//! A simulated network for deterministic simulations: lossy, duplicating, delaying, reordering,
//! and partitionable one link direction at a time.
//!
//! Time is the simulation's own counter, passed in. Every random choice comes from the network's
//! [`SimRng`], so a run replays exactly from its seed.

use std::collections::{BTreeMap, BTreeSet};

use super::rng::SimRng;

/// How badly the network behaves. Changeable at any time with [`Network::set_config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Chance, in percent, that a message is lost.
    pub drop_percent: u64,
    /// Chance, in percent, that a message is delivered twice (each copy with its own delay).
    pub duplicate_percent: u64,
    /// Shortest delay, in time units.
    pub delay_min: u64,
    /// Longest ordinary delay, in time units.
    pub delay_max: u64,
    /// Chance, in percent, that a message is held much longer than usual: strong reordering.
    pub slow_percent: u64,
    /// Longest delay of a slow message.
    pub slow_delay_max: u64,
}

impl NetConfig {
    /// A network that loses, duplicates and reorders nothing (messages still take `delay_min` to
    /// `delay_max`).
    pub fn reliable(delay_min: u64, delay_max: u64) -> Self {
        NetConfig {
            drop_percent: 0,
            duplicate_percent: 0,
            delay_min,
            delay_max,
            slow_percent: 0,
            slow_delay_max: delay_max,
        }
    }
}

/// A message with its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<M> {
    /// Sender.
    pub from: u64,
    /// Receiver.
    pub to: u64,
    /// The message.
    pub message: M,
}

/// Counts of what the network did, for reports and for asserting a run exercised its faults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Messages given to [`Network::send`].
    pub sent: u64,
    /// Lost at random.
    pub dropped: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Lost because their link was cut when sent or when due.
    pub cut: u64,
    /// Handed out by [`Network::pop_due`].
    pub delivered: u64,
}

/// The network: messages in flight, ordered by delivery time, and the set of cut links.
#[derive(Debug)]
pub struct Network<M> {
    config: NetConfig,
    rng: SimRng,
    /// Keyed by (delivery time, send order): ties deliver in send order.
    in_flight: BTreeMap<(u64, u64), Envelope<M>>,
    sends: u64,
    /// Directed links (from, to) that lose everything.
    cut: BTreeSet<(u64, u64)>,
    stats: NetStats,
}

impl<M: Clone> Network<M> {
    /// An empty network behaving as `config`, drawing its randomness from `rng`.
    pub fn new(rng: SimRng, config: NetConfig) -> Self {
        assert!(config.delay_min <= config.delay_max, "delay range is empty");
        Network {
            config,
            rng,
            in_flight: BTreeMap::new(),
            sends: 0,
            cut: BTreeSet::new(),
            stats: NetStats::default(),
        }
    }

    /// The current behaviour.
    pub fn config(&self) -> NetConfig {
        self.config
    }

    /// Changes the behaviour of messages sent from now on.
    pub fn set_config(&mut self, config: NetConfig) {
        assert!(config.delay_min <= config.delay_max, "delay range is empty");
        self.config = config;
    }

    /// Sends `message` at time `now`: it is lost, delivered once or delivered twice, later.
    pub fn send(&mut self, now: u64, from: u64, to: u64, message: M) {
        self.stats.sent += 1;
        if self.is_cut(from, to) {
            self.stats.cut += 1;
            return;
        }
        if self.rng.percent(self.config.drop_percent) {
            self.stats.dropped += 1;
            return;
        }
        if self.rng.percent(self.config.duplicate_percent) {
            self.stats.duplicated += 1;
            self.enqueue(now, Envelope { from, to, message: message.clone() });
        }
        self.enqueue(now, Envelope { from, to, message });
    }

    fn enqueue(&mut self, now: u64, envelope: Envelope<M>) {
        let delay = if self.rng.percent(self.config.slow_percent) {
            self.rng.between(
                self.config.delay_min,
                self.config.slow_delay_max.max(self.config.delay_min),
            )
        } else {
            self.rng.between(self.config.delay_min, self.config.delay_max)
        };
        self.sends += 1;
        self.in_flight.insert((now + delay, self.sends), envelope);
    }

    /// When the next message is due, if any is in flight.
    pub fn next_due(&self) -> Option<u64> {
        self.in_flight.first_key_value().map(|(&(at, _), _)| at)
    }

    /// The next message due at or before `now`, if any. A message whose link was cut while it was
    /// in flight is lost.
    pub fn pop_due(&mut self, now: u64) -> Option<Envelope<M>> {
        while self.next_due().is_some_and(|at| at <= now) {
            let (_, envelope) = self.in_flight.pop_first().expect("a message is due");
            if self.is_cut(envelope.from, envelope.to) {
                self.stats.cut += 1;
                continue;
            }
            self.stats.delivered += 1;
            return Some(envelope);
        }
        None
    }

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// True if messages from `from` to `to` are lost.
    pub fn is_cut(&self, from: u64, to: u64) -> bool {
        self.cut.contains(&(from, to))
    }

    /// Loses every message from `from` to `to` (one way) until healed.
    pub fn cut(&mut self, from: u64, to: u64) {
        self.cut.insert((from, to));
    }

    /// Separates `side` from every other node of `nodes`, both ways.
    pub fn partition(&mut self, side: &[u64], nodes: &[u64]) {
        for &inside in side {
            for &outside in nodes.iter().filter(|node| !side.contains(node)) {
                self.cut(inside, outside);
                self.cut(outside, inside);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// True if some link is cut.
    pub fn is_partitioned(&self) -> bool {
        !self.cut.is_empty()
    }

    /// What the network has done so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::{NetConfig, Network};
    use crate::testkit::SimRng;

    fn drain(network: &mut Network<u32>, until: u64) -> Vec<(u64, u32)> {
        let mut delivered = Vec::new();
        for now in 0..=until {
            while let Some(envelope) = network.pop_due(now) {
                delivered.push((now, envelope.message));
            }
        }
        delivered
    }

    #[test]
    fn a_reliable_network_delivers_everything_within_its_delays() {
        let mut network = Network::new(SimRng::new(1), NetConfig::reliable(2, 5));
        for message in 0..100 {
            network.send(0, 1, 2, message);
        }
        let delivered = drain(&mut network, 10);
        assert_eq!(delivered.len(), 100);
        assert!(delivered.iter().all(|&(at, _)| (2..=5).contains(&at)));
        let mut messages: Vec<u32> = delivered.iter().map(|&(_, message)| message).collect();
        assert_ne!(messages, (0..100).collect::<Vec<_>>(), "random delays reorder");
        messages.sort_unstable();
        assert_eq!(messages, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_lossy_network_drops_and_duplicates_about_as_configured() {
        let config = NetConfig {
            drop_percent: 30,
            duplicate_percent: 10,
            delay_min: 0,
            delay_max: 3,
            slow_percent: 5,
            slow_delay_max: 50,
        };
        let mut network = Network::new(SimRng::new(2), config);
        for message in 0..10_000 {
            network.send(0, 1, 2, message);
        }
        let delivered = drain(&mut network, 50);
        let stats = network.stats();
        assert!((2_700..3_300).contains(&stats.dropped), "{stats:?}");
        assert!((500..900).contains(&stats.duplicated), "{stats:?}");
        assert_eq!(delivered.len() as u64, stats.sent - stats.dropped + stats.duplicated);
        assert!(delivered.iter().any(|&(at, _)| at > 3), "slow messages arrive late");
        assert_eq!(network.in_flight(), 0);
    }

    #[test]
    fn cut_links_lose_messages_one_way_until_healed() {
        let mut network = Network::new(SimRng::new(3), NetConfig::reliable(1, 1));
        network.send(0, 1, 2, 10);
        network.cut(1, 2);
        network.send(0, 1, 2, 11);
        network.send(0, 2, 1, 12);
        // The message sent before the cut is lost too: it is due while the link is cut.
        assert_eq!(drain(&mut network, 1), vec![(1, 12)]);
        network.heal();
        network.send(1, 1, 2, 13);
        assert_eq!(drain(&mut network, 2), vec![(2, 13)]);
        network.partition(&[1], &[1, 2, 3]);
        assert!(network.is_cut(1, 3) && network.is_cut(3, 1) && network.is_cut(2, 1));
        assert!(!network.is_cut(2, 3));
        assert_eq!(network.stats().cut, 2);
    }
}
