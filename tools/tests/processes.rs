//! S10 (`shared/TESTING.md`): real processes. Three `flotilla-node` processes on loopback, each
//! with its own data directory; every Raft link between two nodes goes through a userspace TCP
//! proxy in this test (one per direction: node i's `--peers` name the proxies in front of the
//! others), so a node can be cut off and healed. Concurrent clients write, compare-and-set and
//! read keys of four groups through the client protocol while a nemesis, in turn, `kill -9`s a
//! node and restarts it from its data directory, SIGSTOPs one for longer than an election
//! timeout and SIGCONTs it, and partitions one away and heals. After each fault every group must
//! acknowledge a new write (liveness). At the end:
//! - the recorded history (invoke and return times; a failed or unanswered write counts as
//!   maybe applied) is linearizable per key (the WGL checker of `flotilla-raftgroup`'s testkit),
//!   final linearizable reads included;
//! - every acknowledged write is still there or superseded by a later write (checked on its own,
//!   for a direct message);
//! - every replica of every group holds the same map at the same applied index;
//! - SIGTERM stops every node cleanly (exit status 0).
//!
//! `S10_SECS` (default 15) is how long the nemesis runs: set it high for a soak. `S10_SEED`
//! picks the nemesis's choices (printed at the start). Children are killed by a drop guard even
//! when the test fails.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_raftgroup::testkit::{
    CheckOptions, History, KvInput, KvOutput, Operation, Outcome, SimRng, check_kv,
};
use flotilla_tools::client::{CasOutcome, Client, ClientError, ReadConsistency, RemoteError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const NODES: usize = 3;
const GROUPS: u64 = 4;
const KEYS_PER_GROUP: u64 = 3;
const WORKERS: u64 = 6;
/// How long a node may take to print `ready` (recovery included) on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the cluster may take to serve every group again after a fault heals.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Tests of this file start processes and load the machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

type KvHistory = History<KvInput<String, u64>, KvOutput<u64>>;

fn elapsed_us(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Sends `signal` to a child.
fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child, not yet
    // reaped (we hold its `Child` and have not waited on it), so it names no other process.
    let result = unsafe { libc::kill(pid, signal) };
    assert_eq!(result, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
}

/// A port below Linux's ephemeral range (32768–60999), so no outgoing connection of this
/// machine takes it while its node is down between a kill and a restart.
fn fixed_port(taken: &mut HashSet<u16>, rng: &mut SimRng) -> u16 {
    for _ in 0..1000 {
        let port = u16::try_from(rng.between(20_000, 32_000)).expect("in range");
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// One node process: its addresses and data stay fixed across restarts.
struct Node {
    id: u64,
    raft: SocketAddr,
    client: SocketAddr,
    peers: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
    starts: u32,
}

impl Node {
    fn start(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = File::options().create(true).append(true).open(&self.log).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-node"))
            .args(["--id", &self.id.to_string()])
            .args(["--listen", &self.raft.to_string()])
            .args(["--client", &self.client.to_string()])
            .args(["--peers", &self.peers])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--groups", &GROUPS.to_string()])
            .args(["--shards", "2"])
            .args(["--request-timeout-ms", "3000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn flotilla-node");
        let stdout = child.stdout.take().expect("piped");
        self.child = Some(child);
        self.stopped = false;
        self.starts += 1;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = ready_tx.send(line);
            }
            // Drain until the process exits, so it never blocks on a full pipe.
            for _ in lines {}
        });
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => assert!(
                line.starts_with(&format!("ready node={} ", self.id)),
                "node {}: unexpected first line {line:?}\n{}",
                self.id,
                self.log_tail()
            ),
            Err(error) => {
                panic!("node {} did not get ready: {error}\n{}", self.id, self.log_tail())
            }
        }
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL"); // No shutdown, no flush, no destructor runs.
        child.wait().expect("reaped");
        self.stopped = false;
    }

    fn pause(&mut self) {
        signal(self.child.as_ref().expect("running"), libc::SIGSTOP);
        self.stopped = true;
    }

    fn resume(&mut self) {
        signal(self.child.as_ref().expect("running"), libc::SIGCONT);
        self.stopped = false;
    }

    /// SIGTERM, then the exit status, which must be success within `timeout`.
    fn terminate(&mut self, timeout: Duration) {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "node {} exited with {status}\n{}",
                    self.id,
                    self.log_tail()
                );
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "node {} did not stop within {timeout:?} of SIGTERM\n{}",
                self.id,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        format!("--- node {} log (tail) ---\n{}", self.id, &text[start..])
    }
}

/// The node processes; dropping it (test end or panic) SIGCONTs and SIGKILLs whatever still runs.
struct Nodes(Vec<Node>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for node in &mut self.0 {
            if let Some(mut child) = node.child.take() {
                if node.stopped {
                    let _ = child_signal(&child, libc::SIGCONT);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// [`signal`] without the assertion, for the drop guard (which must not panic).
fn child_signal(child: &Child, signal: libc::c_int) -> i32 {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else { return -1 };
    // SAFETY: as in `signal`: our own, not yet reaped child.
    unsafe { libc::kill(pid, signal) }
}

/// A one-way link from node `from` to node `to`, through a proxy that can cut it.
struct Link {
    from: usize,
    to: usize,
    addr: SocketAddr,
    blocked: watch::Sender<bool>,
}

/// Forwards every connection accepted on `listener` to `target`, byte for byte, until the link
/// is blocked: then open connections are dropped and new ones closed at once (a partition, as
/// the nodes see it: connections fail, reconnects are refused).
async fn proxy(listener: TcpListener, target: SocketAddr, blocked: watch::Receiver<bool>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        if *blocked.borrow() {
            continue; // Dropped: closed at once.
        }
        let mut blocked = blocked.clone();
        tokio::spawn(async move {
            let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target));
            let Ok(Ok(mut outbound)) = connect.await else { return };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = blocked.wait_for(|blocked| *blocked) => {}
            }
        });
    }
}

/// Everything the test holds: processes, proxies, the runtime they and the clients run on.
struct Cluster {
    nodes: Nodes,
    links: Vec<Link>,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(rng: &mut SimRng) -> Cluster {
        let dir = tempfile::Builder::new().prefix("flotilla-s10-").tempdir().expect("temp dir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut taken = HashSet::new();
        let raft: Vec<SocketAddr> = (0..NODES)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], fixed_port(&mut taken, rng))))
            .collect();
        let client: Vec<SocketAddr> = (0..NODES)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], fixed_port(&mut taken, rng))))
            .collect();
        let mut links = Vec::new();
        for from in 0..NODES {
            for to in (0..NODES).filter(|to| *to != from) {
                let listener =
                    runtime.block_on(TcpListener::bind("127.0.0.1:0")).expect("proxy listener");
                let addr = listener.local_addr().expect("proxy addr");
                let (blocked, watch) = watch::channel(false);
                runtime.spawn(proxy(listener, raft[to], watch));
                links.push(Link { from, to, addr, blocked });
            }
        }
        let mut nodes = Nodes(Vec::new());
        for index in 0..NODES {
            let peers: Vec<String> = links
                .iter()
                .filter(|link| link.from == index)
                .map(|link| format!("{}={}", link.to + 1, link.addr))
                .collect();
            nodes.0.push(Node {
                id: index as u64 + 1,
                raft: raft[index],
                client: client[index],
                peers: peers.join(","),
                data_dir: dir.path().join(format!("node-{}", index + 1)),
                log: dir.path().join(format!("node-{}.log", index + 1)),
                child: None,
                stopped: false,
                starts: 0,
            });
        }
        for node in &mut nodes.0 {
            node.start();
        }
        Cluster { nodes, links, runtime, _dir: dir }
    }

    /// Cuts (or restores) every link to and from node `index`.
    fn isolate(&self, index: usize, cut: bool) {
        for link in self.links.iter().filter(|link| link.from == index || link.to == index) {
            link.blocked.send_replace(cut);
        }
    }

    fn client_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.0.iter().map(|node| node.client).collect()
    }

    fn logs(&self) -> String {
        self.nodes.0.iter().map(Node::log_tail).collect::<Vec<_>>().join("\n")
    }
}

/// State the clients share with the nemesis and the checks.
struct Shared {
    origin: Instant,
    history: Mutex<KvHistory>,
    stop: AtomicBool,
    next_value: AtomicU64,
    /// Per group: the invocation time (µs) of its latest acknowledged write.
    last_ack_invoked_us: Vec<AtomicU64>,
    acked_writes: AtomicU64,
    reads_ok: AtomicU64,
    failures: AtomicU64,
}

impl Shared {
    fn history(&self) -> MutexGuard<'_, KvHistory> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        elapsed_us(self.origin)
    }
}

fn key_name(group: u64, key: u64) -> String {
    format!("g{group}-k{key}")
}

fn parse_value(bytes: &Bytes) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("a value this test never wrote: {bytes:?}"))
}

/// Connections to every node, made lazily and replaced when they break.
struct Connections {
    addrs: Vec<SocketAddr>,
    clients: Vec<Option<Client>>,
}

impl Connections {
    fn new(addrs: Vec<SocketAddr>) -> Self {
        let clients = vec![None; addrs.len()];
        Connections { addrs, clients }
    }

    async fn get(&mut self, node: usize) -> Result<Client, ClientError> {
        if let Some(client) = &self.clients[node]
            && client.is_open()
        {
            return Ok(client.clone());
        }
        self.clients[node] = None;
        let client = Client::connect(self.addrs[node], Duration::from_secs(2)).await?;
        // Longer than the node's own 3 s deadline: the node normally answers first.
        client.set_timeout(Duration::from_secs(6));
        self.clients[node] = Some(client.clone());
        Ok(client)
    }
}

/// Where to send the next request after `error`: the hinted leader, or the next node.
fn next_node(error: &ClientError, current: usize) -> usize {
    match error {
        ClientError::Remote(RemoteError::NotLeader { hint: Some(hint) })
            if (1..=NODES as u64).contains(hint) =>
        {
            usize::try_from(hint - 1).expect("small")
        }
        _ => (current + 1) % NODES,
    }
}

/// One client: random operations on random keys, one at a time, until told to stop.
async fn worker(id: u64, shared: Arc<Shared>, addrs: Vec<SocketAddr>, seed: u64) {
    let mut rng = SimRng::new(seed);
    let mut connections = Connections::new(addrs);
    let mut leader = vec![0usize; GROUPS as usize + 1];
    // The last value this client saw per key: what its compare-and-sets expect.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let group = rng.between(1, GROUPS);
        let key = key_name(group, rng.below(KEYS_PER_GROUP));
        let node = leader[group as usize];
        let roll = rng.below(100);
        let result = if roll < 45 {
            let value = shared.next_value.fetch_add(1, Ordering::Relaxed);
            let input = KvInput::Put { key: key.clone(), value };
            let invoked = shared.now();
            let op = shared.history().invoke(id, input, invoked);
            let result = match connections.get(node).await {
                Ok(client) => {
                    client.put(group, key.clone().into(), value.to_string().into()).await.map(drop)
                }
                Err(error) => Err(error),
            };
            if result.is_ok() {
                shared.history().complete(op, KvOutput::Put, shared.now());
                seen.insert(key, value);
                acknowledge(&shared, group, invoked);
            }
            result
        } else if roll < 55 {
            let value = shared.next_value.fetch_add(1, Ordering::Relaxed);
            let expected = seen.get(&key).copied();
            let input = KvInput::CompareAndSet { key: key.clone(), expected, new: value };
            let invoked = shared.now();
            let op = shared.history().invoke(id, input, invoked);
            let result = match connections.get(node).await {
                Ok(client) => {
                    let expected = expected.map(|value| Bytes::from(value.to_string()));
                    let new = Some(Bytes::from(value.to_string()));
                    client.compare_and_set(group, key.clone().into(), expected, new).await
                }
                Err(error) => Err(error),
            };
            match result {
                Ok(CasOutcome::Swapped) => {
                    shared.history().complete(op, KvOutput::CompareAndSet(true), shared.now());
                    seen.insert(key, value);
                    acknowledge(&shared, group, invoked);
                    Ok(())
                }
                Ok(CasOutcome::Mismatch { actual }) => {
                    shared.history().complete(op, KvOutput::CompareAndSet(false), shared.now());
                    match actual {
                        Some(actual) => seen.insert(key, parse_value(&actual)),
                        None => seen.remove(&key),
                    };
                    Ok(())
                }
                Err(error) => Err(error),
            }
        } else {
            let input = KvInput::Get { key: key.clone() };
            let op = shared.history().invoke(id, input, shared.now());
            let result = match connections.get(node).await {
                Ok(client) => {
                    client.get(group, key.clone().into(), ReadConsistency::Linearizable).await
                }
                Err(error) => Err(error),
            };
            match result {
                Ok(value) => {
                    let value = value.as_ref().map(parse_value);
                    shared.history().complete(op, KvOutput::Get(value), shared.now());
                    match value {
                        Some(value) => seen.insert(key, value),
                        None => seen.remove(&key),
                    };
                    shared.reads_ok.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(error) => Err(error),
            }
        };
        // A failed operation stays unanswered in the history: maybe applied.
        if let Err(error) = result {
            shared.failures.fetch_add(1, Ordering::Relaxed);
            let next = next_node(&error, node);
            leader[group as usize] = next;
            if next == node || !matches!(error, ClientError::Remote(RemoteError::NotLeader { .. }))
            {
                // No leader to go to yet (an election, a cut node): back off a little.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn acknowledge(shared: &Shared, group: u64, invoked_us: u64) {
    shared.acked_writes.fetch_add(1, Ordering::Relaxed);
    shared.last_ack_invoked_us[group as usize - 1].fetch_max(invoked_us, Ordering::Relaxed);
}

/// Waits until every group acknowledged a write invoked after `since_us`: the cluster serves
/// again after a fault.
fn await_recovery(shared: &Shared, since_us: u64, what: &str, cluster: &Cluster) -> Duration {
    let started = Instant::now();
    loop {
        let recovered = shared
            .last_ack_invoked_us
            .iter()
            .all(|invoked| invoked.load(Ordering::Relaxed) > since_us);
        if recovered {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < RECOVERY_TIMEOUT,
            "after {what}: not every group acknowledged a write within {RECOVERY_TIMEOUT:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    Partition,
}

/// Runs faults one after another for `duration` (at least one of each kind); returns what it
/// did, for the report.
fn nemesis(
    cluster: &mut Cluster,
    shared: &Shared,
    rng: &mut SimRng,
    duration: Duration,
) -> Vec<String> {
    let started = Instant::now();
    let mut events = Vec::new();
    let faults = [Fault::Kill, Fault::Pause, Fault::Partition];
    let mut round = 0;
    while round < faults.len() || started.elapsed() < duration {
        let fault = faults[round % faults.len()];
        let index = rng.index(NODES);
        let id = index + 1;
        // Longer than the election timeout (10–20 ticks of 10 ms) many times over.
        let hold = Duration::from_millis(rng.between(800, 2000));
        let at = shared.origin.elapsed();
        match fault {
            Fault::Kill => {
                cluster.nodes.0[index].kill();
                std::thread::sleep(hold);
                cluster.nodes.0[index].start();
            }
            Fault::Pause => {
                cluster.nodes.0[index].pause();
                std::thread::sleep(hold);
                cluster.nodes.0[index].resume();
            }
            Fault::Partition => {
                cluster.isolate(index, true);
                std::thread::sleep(hold);
                cluster.isolate(index, false);
            }
        }
        let healed = shared.now();
        let what = format!("{fault:?} node {id} for {hold:?} at {at:.1?}");
        let recovery = await_recovery(shared, healed, &what, cluster);
        events.push(format!("{what}: every group wrote again {recovery:.1?} after"));
        round += 1;
    }
    events
}

/// Reads every key through its group's leader, retrying until it answers; the reads join the
/// history. Returns the values read.
async fn final_reads(shared: &Shared, addrs: Vec<SocketAddr>) -> BTreeMap<String, Option<u64>> {
    let mut connections = Connections::new(addrs);
    let mut values = BTreeMap::new();
    let started = Instant::now();
    for group in 1..=GROUPS {
        let mut node = 0;
        for key in 0..KEYS_PER_GROUP {
            let key = key_name(group, key);
            loop {
                assert!(started.elapsed() < RECOVERY_TIMEOUT, "final reads did not finish");
                let input = KvInput::Get { key: key.clone() };
                let op = shared.history().invoke(u64::MAX, input, shared.now());
                let result = match connections.get(node).await {
                    Ok(client) => {
                        client.get(group, key.clone().into(), ReadConsistency::Linearizable).await
                    }
                    Err(error) => Err(error),
                };
                match result {
                    Ok(value) => {
                        let value = value.as_ref().map(parse_value);
                        shared.history().complete(op, KvOutput::Get(value), shared.now());
                        values.insert(key, value);
                        break;
                    }
                    Err(error) => {
                        node = next_node(&error, node);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }
    values
}

/// Durability, stated directly: the final value of each key is not older than any acknowledged
/// write to it. A write `w` is lost if the final value was written by an operation that returned
/// before `w` was invoked (values are unique, so the final value names its write).
fn check_durability(
    operations: &[Operation<KvInput<String, u64>, KvOutput<u64>>],
    finals: &BTreeMap<String, Option<u64>>,
) {
    for (key, value) in finals {
        let writes = operations.iter().filter(|op| op.input.key() == key);
        let acknowledged = writes.clone().filter(|op| {
            matches!(
                (&op.input, &op.outcome),
                (KvInput::Put { .. }, Outcome::Returned { .. })
                    | (
                        KvInput::CompareAndSet { .. },
                        Outcome::Returned { output: KvOutput::CompareAndSet(true), .. }
                    )
            )
        });
        let Some(value) = value else {
            let lost: Vec<_> = acknowledged.collect();
            assert!(lost.is_empty(), "{key} reads as absent after acknowledged writes: {lost:?}");
            continue;
        };
        let writer = writes
            .clone()
            .find(|op| match &op.input {
                KvInput::Put { value: written, .. } => written == value,
                KvInput::CompareAndSet { new, .. } => new == value,
                KvInput::Get { .. } => false,
            })
            .unwrap_or_else(|| panic!("{key} holds {value}, which no operation wrote"));
        if let Some(returned) = writer.return_time() {
            let lost: Vec<_> = acknowledged.filter(|op| op.invoke > returned).collect();
            assert!(
                lost.is_empty(),
                "{key} holds {value} (written by {writer:?}), but these acknowledged later writes \
                 are gone: {lost:?}"
            );
        }
    }
}

/// Every replica of every group: the same map at the same applied index (waiting for followers
/// to catch up), and that map agrees with the final reads.
async fn check_replicas(addrs: Vec<SocketAddr>, finals: &BTreeMap<String, Option<u64>>) {
    let mut connections = Connections::new(addrs);
    let started = Instant::now();
    for group in 1..=GROUPS {
        let dumps = loop {
            let mut dumps = Vec::new();
            for node in 0..NODES {
                match connections.get(node).await {
                    Ok(client) => match client.dump(group).await {
                        Ok(dump) => dumps.push(dump),
                        Err(error) => panic!("dump of group {group} on node {}: {error}", node + 1),
                    },
                    Err(error) => panic!("node {}: {error}", node + 1),
                }
            }
            if dumps.iter().all(|dump| *dump == dumps[0]) {
                break dumps;
            }
            let applied: Vec<u64> = dumps.iter().map(|dump| dump.0).collect();
            assert!(
                started.elapsed() < RECOVERY_TIMEOUT,
                "group {group}: replicas still differ (applied {applied:?}): {dumps:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (_, entries) = &dumps[0];
        for key in (0..KEYS_PER_GROUP).map(|key| key_name(group, key)) {
            let stored = entries
                .iter()
                .find(|(name, _)| name[..] == *key.as_bytes())
                .map(|(_, value)| parse_value(value));
            assert_eq!(stored, finals[&key], "group {group} key {key}: replicas vs final read");
        }
    }
}

#[test]
fn three_node_processes_stay_linearizable_under_kill_pause_and_partition() {
    let _serial = serial();
    let secs: u64 = std::env::var("S10_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let seed: u64 =
        std::env::var("S10_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.map_or(0, |since| since.as_nanos() as u64) ^ u64::from(std::process::id())
        });
    eprintln!("S10: seed {seed} (S10_SEED), nemesis for {secs} s (S10_SECS)");
    let mut rng = SimRng::new(seed);
    let mut cluster = Cluster::start(&mut rng);
    let shared = Arc::new(Shared {
        origin: Instant::now(),
        history: Mutex::new(History::new()),
        stop: AtomicBool::new(false),
        next_value: AtomicU64::new(1),
        last_ack_invoked_us: (0..GROUPS).map(|_| AtomicU64::new(0)).collect(),
        acked_writes: AtomicU64::new(0),
        reads_ok: AtomicU64::new(0),
        failures: AtomicU64::new(0),
    });
    let addrs = cluster.client_addrs();
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| {
            let seed = rng.next_u64();
            cluster.runtime.spawn(worker(id, Arc::clone(&shared), addrs.clone(), seed))
        })
        .collect();
    // The cluster serves before any fault: every group elected a leader and wrote.
    await_recovery(&shared, 0, "start", &cluster);
    let events = nemesis(&mut cluster, &shared, &mut rng, Duration::from_secs(secs));
    shared.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        cluster.runtime.block_on(worker).expect("worker");
    }
    let finals = cluster.runtime.block_on(final_reads(&shared, addrs.clone()));
    cluster.runtime.block_on(check_replicas(addrs, &finals));

    let history = shared.history().clone();
    let operations = history.operations();
    let unknown = operations.iter().filter(|op| op.return_time().is_none()).count();
    eprintln!(
        "S10: {} operations ({} acknowledged writes, {} reads, {} failed: maybe applied), {} \
         nemesis events:\n  {}",
        operations.len(),
        shared.acked_writes.load(Ordering::Relaxed),
        shared.reads_ok.load(Ordering::Relaxed),
        unknown,
        events.len(),
        events.join("\n  ")
    );
    check_durability(operations, &finals);
    let checked = Instant::now();
    let verdict = check_kv(operations, &CheckOptions { max_steps: 50_000_000 });
    eprintln!("S10: linearizability check: {verdict} in {:.1?}", checked.elapsed());
    assert!(verdict.is_linearizable(), "seed {seed}: {verdict}\n{}", cluster.logs());
    assert!(
        shared.acked_writes.load(Ordering::Relaxed) > 100,
        "too little was written to mean anything"
    );

    for node in &mut cluster.nodes.0 {
        node.terminate(Duration::from_secs(30));
    }
    let restarts: u32 = cluster.nodes.0.iter().map(|node| node.starts - 1).sum();
    assert!(restarts >= 1, "the nemesis never restarted a node");
}

/// The client port refuses bad bytes with a typed answer and closes that connection, keeps
/// serving others, and `flotilla-load --nodes` runs its workload through the protocol.
#[test]
fn client_protocol_refuses_garbage_and_serves_flotilla_load() {
    let _serial = serial();
    let mut rng = SimRng::new(u64::from(std::process::id()));
    let mut cluster = Cluster::start(&mut rng);
    let addrs = cluster.client_addrs();

    // Garbage: one BadRequest frame back, then the node closes the connection.
    let mut raw = std::net::TcpStream::connect(addrs[0]).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: flotilla\r\n\r\n").expect("write");
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).expect("the node closes the connection");
    let mut buffer = bytes::BytesMut::from(&answer[..]);
    let frame = flotilla_tools::client::codec::decode_frame(&mut buffer)
        .expect("a valid frame")
        .expect("a whole frame");
    assert!(buffer.is_empty(), "nothing after the refusal");
    let response = flotilla_tools::client::Response::decode(&frame.body).expect("a response");
    assert!(
        matches!(response, flotilla_tools::client::Response::Error(RemoteError::BadRequest(_))),
        "{response:?}"
    );

    // A frame claiming a 4 GiB body is refused from its header, before any body is read.
    let mut header = Vec::new();
    flotilla_tools::client::codec::encode_frame(
        flotilla_tools::client::codec::FrameKind::Request,
        7,
        b"",
        &mut header,
    );
    header[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32fast::hash(&header[..24]);
    header[24..28].copy_from_slice(&crc.to_le_bytes());
    let mut raw = std::net::TcpStream::connect(addrs[1]).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    raw.write_all(&header).expect("write");
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).expect("the node closes the connection");
    assert!(!answer.is_empty(), "a typed refusal before the close");

    // The nodes still serve, and the load tool runs through them.
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("load.json");
    let nodes: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla-load"))
        .args(["--nodes", &nodes.join(",")])
        .args(["--groups", &GROUPS.to_string(), "--duration", "2", "--proposers", "32"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("flotilla-load runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}\n{}", cluster.logs());
    assert!(stdout.contains("writes/s"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("valid json");
    assert_eq!(report["nodes"], 3, "{report}");
    assert!(report["writes_per_sec"].as_f64().is_some_and(|rate| rate > 0.0), "{report}");
    assert!(report["fdatasyncs_per_sec"].as_f64().is_some_and(|rate| rate > 0.0), "{report}");
    assert!(report["messages_per_frame"].as_f64().is_some_and(|ratio| ratio >= 1.0), "{report}");

    // Groups beyond what the nodes host: a clear error, not a hang.
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla-load"))
        .args(["--nodes", &nodes.join(","), "--groups", "99", "--duration", "1"])
        .output()
        .expect("flotilla-load runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("--groups"), "{stderr}");

    for node in &mut cluster.nodes.0 {
        node.terminate(Duration::from_secs(30));
    }
}
