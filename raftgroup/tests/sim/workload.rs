//! Simulated clients: each sends one operation at a time to whoever it believes leads, retries
//! refusals elsewhere, gives up after a timeout, and records everything in a [`History`] for the
//! linearizability checker.

use std::collections::{BTreeMap, HashMap};

use flotilla_raftgroup::testkit::{History, KvInput, KvOutput, OpId, Operation, SimRng};

use super::kv::Command;

/// An operation of the simulation's history.
pub type KvOperation = Operation<KvInput<u64, u64>, KvOutput<u64>>;

/// The shape of the client load.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadConfig {
    /// Concurrent clients.
    pub clients: u64,
    /// Operations to issue in all.
    pub operations: usize,
    /// Keys operated on; few keys mean more contention per key.
    pub keys: u64,
    /// Time after which an operation is abandoned: it then may or may not have taken effect.
    pub timeout: u64,
    /// Time after which an unanswered read is sent again, to the next guess.
    pub read_retry: u64,
    /// Longest pause before retrying a refused request.
    pub backoff_max: u64,
    /// Longest pause between one operation's end and the next one's start.
    pub think_max: u64,
}

/// A refusal from a replica: it is not the leader (or is down) and may know who is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The node the replica believes leads.
    pub leader_hint: Option<u64>,
}

/// How the workload reaches the cluster.
pub trait Frontend {
    /// A history timestamp for an event happening now: increasing with every call, and shared
    /// with the cluster's own events (applies, reads served), so all are ordered as they happened.
    fn stamp(&mut self) -> u64;

    /// Asks `node` to propose `command`. `Ok` means it was appended to the leader's log (it may
    /// still be lost); the answer comes back through [`Workload::on_applied`].
    fn propose(&mut self, node: u64, command: &Command) -> Result<(), Rejected>;

    /// Asks `node` for a linearizable read of `key` on behalf of `(client, seq)`; the answer
    /// comes back through [`Workload::on_read`].
    fn read(&mut self, node: u64, client: u64, seq: u64, key: u64) -> Result<(), Rejected>;
}

/// What the clients did, for the run's report and for asserting that a run exercised something.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadStats {
    /// Operations invoked.
    pub issued: u64,
    /// Operations answered.
    pub answered: u64,
    /// Operations abandoned at their timeout.
    pub timed_out: u64,
    /// Requests refused and retried.
    pub refused: u64,
    /// Reads sent again after no answer.
    pub read_resends: u64,
}

/// An operation waiting for its answer.
#[derive(Debug)]
struct Pending {
    op: OpId,
    seq: u64,
    input: KvInput<u64, u64>,
    /// The node holding the request, or `None` while waiting to (re)send it.
    node: Option<u64>,
    /// When to send (again) while `node` is `None`, or to resend a read.
    retry_at: u64,
    /// When to give up.
    deadline: u64,
}

#[derive(Debug)]
struct Client {
    id: u64,
    /// Where requests go next.
    guess: u64,
    pending: Option<Pending>,
    /// When the next operation may start.
    next_at: u64,
    seq: u64,
    /// The last value this client knows each key to have held.
    seen: BTreeMap<u64, u64>,
}

/// All clients, their history and their statistics.
#[derive(Debug)]
pub struct Workload {
    config: WorkloadConfig,
    nodes: Vec<u64>,
    rng: SimRng,
    clients: Vec<Client>,
    history: History<KvInput<u64, u64>, KvOutput<u64>>,
    /// The client's operation number of each operation of `history`.
    seqs: Vec<u64>,
    /// The last value written (or attempted) per key, for compare-and-set expectations.
    latest: BTreeMap<u64, u64>,
    next_value: u64,
    stats: WorkloadStats,
}

impl Workload {
    /// Clients for a cluster of `nodes`, with their own random stream.
    pub fn new(config: WorkloadConfig, nodes: Vec<u64>, mut rng: SimRng) -> Self {
        let clients = (1..=config.clients)
            .map(|id| Client {
                id,
                guess: nodes[rng.index(nodes.len())],
                pending: None,
                next_at: rng.below(config.think_max + 1),
                seq: 0,
                seen: BTreeMap::new(),
            })
            .collect();
        Workload {
            config,
            nodes,
            rng,
            clients,
            history: History::new(),
            seqs: Vec::new(),
            latest: BTreeMap::new(),
            next_value: 1,
            stats: WorkloadStats::default(),
        }
    }

    /// The history to check, completed with what the cluster knows about unanswered writes:
    /// `applied` maps the `(client, seq)` of every command some state machine applied to the
    /// timestamp at which it was first applied (timestamps of [`Frontend::stamp`]). An unanswered write never applied did not take effect: it is left
    /// out. One that was applied took effect (was committed) before that time: it must be placed
    /// before it, with an unknown output. Both only remove possibilities, so the check gets
    /// stricter, and far cheaper than with many maybe-applied writes. Returns the operations and
    /// how many writes were left out.
    pub fn resolved_history(
        &self,
        applied: &HashMap<(u64, u64), u64>,
    ) -> (Vec<KvOperation>, usize) {
        let mut history = self.history.clone();
        let mut never_applied = Vec::new();
        for (index, (operation, seq)) in
            self.history.operations().iter().zip(&self.seqs).enumerate()
        {
            if operation.return_time().is_some() || matches!(operation.input, KvInput::Get { .. }) {
                continue;
            }
            match applied.get(&(operation.client, *seq)) {
                Some(&by) => history.took_effect(OpId(index), by),
                None => never_applied.push(index),
            }
        }
        let left_out = never_applied.len();
        let operations = history
            .operations()
            .iter()
            .enumerate()
            .filter(|(index, _)| never_applied.binary_search(index).is_err())
            .map(|(_, operation)| operation.clone())
            .collect();
        (operations, left_out)
    }

    /// What the clients did.
    pub fn stats(&self) -> WorkloadStats {
        self.stats
    }

    /// True once every operation was issued and has ended (answered or abandoned).
    pub fn is_done(&self) -> bool {
        self.history.len() >= self.config.operations
            && self.clients.iter().all(|client| client.pending.is_none())
    }

    /// Lets every client act at time `now`: start, send, resend or abandon operations.
    pub fn step(&mut self, now: u64, frontend: &mut impl Frontend) {
        for index in 0..self.clients.len() {
            let client = &self.clients[index];
            match &client.pending {
                Some(pending) if now >= pending.deadline => self.abandon(index, now),
                Some(pending) => {
                    let resend = match pending.node {
                        None => now >= pending.retry_at,
                        Some(_) => {
                            matches!(pending.input, KvInput::Get { .. }) && now >= pending.retry_at
                        }
                    };
                    if resend {
                        if pending.node.is_some() {
                            self.stats.read_resends += 1;
                            self.redirect(index, None);
                        }
                        self.send(index, now, frontend);
                    }
                }
                None if self.history.len() < self.config.operations && now >= client.next_at => {
                    self.start(index, now, frontend.stamp());
                    self.send(index, now, frontend);
                }
                None => {}
            }
        }
    }

    /// Picks and records a new operation for client `index`.
    fn start(&mut self, index: usize, now: u64, at: u64) {
        let key = self.rng.below(self.config.keys);
        let input = match self.rng.below(10) {
            0..=3 => KvInput::Get { key },
            4..=7 => KvInput::Put { key, value: self.fresh_value(key) },
            _ => {
                let expected = match self.rng.below(4) {
                    0 => None,
                    1 => self.latest.get(&key).copied(),
                    _ => self.clients[index].seen.get(&key).copied(),
                };
                KvInput::CompareAndSet { key, expected, new: self.fresh_value(key) }
            }
        };
        let client = &mut self.clients[index];
        client.seq += 1;
        let op = self.history.invoke(client.id, input.clone(), at);
        self.seqs.push(client.seq);
        client.pending = Some(Pending {
            op,
            seq: client.seq,
            input,
            node: None,
            retry_at: now,
            deadline: now + self.config.timeout,
        });
        self.stats.issued += 1;
    }

    fn fresh_value(&mut self, key: u64) -> u64 {
        let value = self.next_value;
        self.next_value += 1;
        self.latest.insert(key, value);
        value
    }

    /// Sends client `index`'s pending operation to its guess.
    fn send(&mut self, index: usize, now: u64, frontend: &mut impl Frontend) {
        let client = &mut self.clients[index];
        let node = client.guess;
        let pending = client.pending.as_mut().expect("sending needs an operation");
        let result = match &pending.input {
            KvInput::Get { key } => frontend.read(node, client.id, pending.seq, *key),
            input => frontend.propose(
                node,
                &Command { client: client.id, seq: pending.seq, input: input.clone() },
            ),
        };
        match result {
            Ok(()) => {
                pending.node = Some(node);
                pending.retry_at = now + self.config.read_retry;
            }
            Err(rejected) => {
                self.stats.refused += 1;
                pending.node = None;
                pending.retry_at = now + 1 + self.rng.below(self.config.backoff_max);
                self.redirect(index, rejected.leader_hint);
            }
        }
    }

    /// Points client `index` at `hint`, or at another node chosen at random.
    fn redirect(&mut self, index: usize, hint: Option<u64>) {
        let current = self.clients[index].guess;
        let next = match hint {
            Some(hint) if hint != current && self.nodes.contains(&hint) => hint,
            _ => {
                let others: Vec<u64> =
                    self.nodes.iter().copied().filter(|&node| node != current).collect();
                others[self.rng.index(others.len())]
            }
        };
        let client = &mut self.clients[index];
        client.guess = next;
        if let Some(pending) = &mut client.pending {
            pending.node = None;
        }
    }

    /// Gives up on client `index`'s operation: it stays maybe-applied in the history.
    fn abandon(&mut self, index: usize, now: u64) {
        self.stats.timed_out += 1;
        self.clients[index].pending = None;
        self.clients[index].next_at = now + self.rng.below(self.config.think_max + 1);
        self.redirect(index, None);
    }

    fn complete(&mut self, index: usize, now: u64, at: u64, output: KvOutput<u64>) {
        let client = &mut self.clients[index];
        let pending = client.pending.take().expect("completing needs an operation");
        let known = match (&pending.input, &output) {
            (KvInput::Get { key }, KvOutput::Get(value)) => value.map(|value| (*key, value)),
            (KvInput::Put { key, value }, _)
            | (KvInput::CompareAndSet { key, new: value, .. }, KvOutput::CompareAndSet(true)) => {
                Some((*key, *value))
            }
            _ => None,
        };
        if let Some((key, value)) = known {
            client.seen.insert(key, value);
        }
        client.next_at = now + self.rng.below(self.config.think_max + 1);
        self.history.complete(pending.op, output, at);
        self.stats.answered += 1;
    }

    fn waiting(&self, client: u64, seq: u64) -> Option<usize> {
        let index = usize::try_from(client.checked_sub(1)?).ok()?;
        let pending = self.clients.get(index)?.pending.as_ref()?;
        (pending.seq == seq).then_some(index)
    }

    /// `node` applied `command` with `output` at timestamp `at`: answers the client if it waits
    /// on that node.
    pub fn on_applied(
        &mut self,
        now: u64,
        at: u64,
        node: u64,
        command: &Command,
        output: KvOutput<u64>,
    ) {
        let Some(index) = self.waiting(command.client, command.seq) else { return };
        let pending = self.clients[index].pending.as_ref().expect("waiting");
        if pending.node == Some(node) {
            assert_eq!(pending.input, command.input, "a command was applied with another's id");
            self.complete(index, now, at, output);
        }
    }

    /// A read of `(client, seq)` was served with `value` at timestamp `at`.
    pub fn on_read(&mut self, now: u64, at: u64, client: u64, seq: u64, value: Option<u64>) {
        if let Some(index) = self.waiting(client, seq) {
            self.complete(index, now, at, KvOutput::Get(value));
        }
    }
}
