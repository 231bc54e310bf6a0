//! The fault hook: tests and the simulator drop, delay or partition traffic between chosen
//! nodes. One [`Faults`] may be shared by every engine of an in-process cluster; each engine
//! consults it for the frames it sends and for those it receives, so a rule holds even if only
//! one side of a link is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_raftgroup::NodeId;
use parking_lot::Mutex;

/// What happens to frames on one directed link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkFault {
    /// Drop every frame.
    pub blocked: bool,
    /// Drop each frame with this probability (0 to 1).
    pub drop_probability: f64,
    /// Hold each frame this long before sending it.
    pub delay: Duration,
}

/// Traffic rules between nodes, changed at run time. All rules start empty: traffic flows.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    links: BTreeMap<(NodeId, NodeId), LinkFault>,
    isolated: BTreeSet<NodeId>,
    rng: u64,
}

/// What a sender does with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Deliver,
    /// Send it after this delay.
    Delay(Duration),
    /// Do not send it.
    Drop,
}

impl Faults {
    /// No faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the rule for frames from `from` to `to` (one direction).
    pub fn set_link(&self, from: NodeId, to: NodeId, fault: LinkFault) {
        self.state.lock().links.insert((from, to), fault);
    }

    /// Cuts `a` and `b` apart, both directions.
    pub fn partition(&self, a: NodeId, b: NodeId) {
        let blocked = LinkFault { blocked: true, ..LinkFault::default() };
        self.set_link(a, b, blocked);
        self.set_link(b, a, blocked);
    }

    /// Cuts `node` off from every other node, both directions.
    pub fn isolate(&self, node: NodeId) {
        self.state.lock().isolated.insert(node);
    }

    /// Removes every rule: traffic flows again.
    pub fn heal(&self) {
        let mut state = self.state.lock();
        state.links.clear();
        state.isolated.clear();
    }

    /// What to do with a frame from `from` to `to`.
    pub fn verdict(&self, from: NodeId, to: NodeId) -> Verdict {
        let mut state = self.state.lock();
        if state.isolated.contains(&from) || state.isolated.contains(&to) {
            return Verdict::Drop;
        }
        let Some(link) = state.links.get(&(from, to)).copied() else { return Verdict::Deliver };
        if link.blocked {
            return Verdict::Drop;
        }
        if link.drop_probability > 0.0 {
            // splitmix64: a private, seedless generator is enough to thin out traffic.
            state.rng = state.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            if (z >> 11) as f64 / (1u64 << 53) as f64 <= link.drop_probability {
                return Verdict::Drop;
            }
        }
        if link.delay.is_zero() { Verdict::Deliver } else { Verdict::Delay(link.delay) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_apply_per_direction_and_heal_clears_them() {
        let faults = Faults::new();
        let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
        assert_eq!(faults.verdict(a, b), Verdict::Deliver);
        faults.partition(a, b);
        assert_eq!(faults.verdict(a, b), Verdict::Drop);
        assert_eq!(faults.verdict(b, a), Verdict::Drop);
        assert_eq!(faults.verdict(a, c), Verdict::Deliver);
        faults.isolate(c);
        assert_eq!(faults.verdict(b, c), Verdict::Drop);
        assert_eq!(faults.verdict(c, a), Verdict::Drop);
        let delay = Duration::from_millis(3);
        faults.set_link(b, c, LinkFault { delay, ..LinkFault::default() });
        faults.heal();
        assert_eq!(faults.verdict(a, b), Verdict::Deliver);
        assert_eq!(faults.verdict(b, c), Verdict::Deliver);
        faults.set_link(b, c, LinkFault { delay, ..LinkFault::default() });
        assert_eq!(faults.verdict(b, c), Verdict::Delay(delay));
    }

    #[test]
    fn a_drop_probability_drops_about_that_share() {
        let faults = Faults::new();
        let rule = LinkFault { drop_probability: 0.25, ..LinkFault::default() };
        faults.set_link(NodeId(1), NodeId(2), rule);
        let dropped =
            (0..10_000).filter(|_| faults.verdict(NodeId(1), NodeId(2)) == Verdict::Drop).count();
        assert!((2_000..3_000).contains(&dropped), "{dropped} of 10000 dropped");
    }
}
