//! A state machine's snapshot is taken on the shard thread as a cheap view and written to its
//! file off it: while an image is being written (here: held up for as long as the test likes)
//! the shard goes on serving every group, and the log is compacted only once the file is
//! durable — never before, or a crash would leave neither the entries nor the snapshot.
//! Likewise a leader's snapshot is restored into a fresh state machine off the follower's
//! shard thread, which meanwhile serves the other groups.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::kv::{
    Command, KvConfig, KvSnapshot, KvStateMachine, Proposal, Query, QueryResult, Request,
    SnapshotImage, StateMachine,
};
use flotilla::raftgroup::{Entry, LogIndex};
use flotilla::{Consistency, Engine, EngineConfig, GroupId, MachineFactory, NodeId};

/// Holds image writes until opened; records the index of every image it was asked to write.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    started: Vec<LogIndex>,
}

impl Gate {
    fn open(&self) {
        self.state.lock().unwrap().open = true;
        self.changed.notify_all();
    }

    fn started(&self) -> Vec<LogIndex> {
        self.state.lock().unwrap().started.clone()
    }
}

/// The KV store, with image writes that wait for one gate and restores that wait for another
/// (if any).
struct GatedKv {
    inner: KvStateMachine,
    writes: Arc<Gate>,
    restores: Option<Arc<Gate>>,
}

struct GatedImage {
    inner: KvSnapshot,
    gate: Arc<Gate>,
}

impl Gate {
    /// Records `index` as started and waits until the gate opens (at most a minute, so a broken
    /// engine fails the test instead of hanging it).
    fn pass(&self, index: LogIndex) {
        let mut state = self.state.lock().unwrap();
        state.started.push(index);
        self.changed.notify_all();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(60), |state| !state.open)
            .unwrap();
        drop(state);
    }
}

impl SnapshotImage for GatedImage {
    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        self.gate.pass(self.inner.applied_index());
        self.inner.write_to(out)
    }
}

impl StateMachine for GatedKv {
    type Response = <KvStateMachine as StateMachine>::Response;
    type Query = Query;
    type QueryResult = QueryResult;
    type RestoreError = <KvStateMachine as StateMachine>::RestoreError;
    type Snapshot = GatedImage;

    fn apply(&mut self, entries: &[Entry], responses: &mut Vec<Self::Response>) {
        self.inner.apply(entries, responses);
    }

    fn query(&self, query: &Query) -> QueryResult {
        self.inner.query(query)
    }

    fn applied_index(&self) -> LogIndex {
        self.inner.applied_index()
    }

    fn snapshot(&self) -> GatedImage {
        GatedImage { inner: self.inner.snapshot(), gate: Arc::clone(&self.writes) }
    }

    fn restore(&mut self, snapshot: &Bytes) -> Result<(), Self::RestoreError> {
        self.inner.restore(snapshot)?;
        if let Some(gate) = &self.restores {
            gate.pass(self.inner.applied_index());
        }
        Ok(())
    }
}

fn open(dir: &std::path::Path, gate: &Arc<Gate>) -> Engine<GatedKv> {
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut config = EngineConfig::new(NodeId(1), listen, dir);
    config.shards = 1;
    config.tick = Duration::from_millis(2);
    config.snapshot_entries = 50;
    Engine::open(config, &factory(gate, None)).unwrap()
}

fn factory(writes: &Arc<Gate>, restores: Option<&Arc<Gate>>) -> MachineFactory<GatedKv> {
    let writes = Arc::clone(writes);
    let restores = restores.cloned();
    Arc::new(move |_| GatedKv {
        inner: KvStateMachine::new(KvConfig::default()),
        writes: Arc::clone(&writes),
        restores: restores.clone(),
    })
}

async fn put(engine: &Engine<GatedKv>, group: GroupId, key: String) {
    put_on(std::slice::from_ref(engine), group, key).await;
}

/// Puts `key = key` in `group` through whichever of `engines` takes it (the leader).
async fn put_on(engines: &[Engine<GatedKv>], group: GroupId, key: String) {
    let command = Command::Put { key: key.clone().into(), value: key.into() };
    let proposal = Proposal { leader_time_ms: 0, request: Request::Unsessioned(command) };
    let deadline = Instant::now() + Duration::from_secs(10);
    for attempt in 0.. {
        let engine = &engines[attempt % engines.len()];
        match engine.propose(group, proposal.to_bytes()).await {
            Ok(applied) => {
                applied.response.expect("a put applies");
                return;
            }
            // Not the leader, or none elected yet: the next engine, after a pause.
            Err(error) if Instant::now() < deadline => {
                eprintln!("retrying a put: {error}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => panic!("put failed: {error}"),
        }
    }
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_shard_serves_while_an_image_is_written_and_compacts_only_once_it_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let engine = open(dir.path(), &gate);
    let (one, two) = (GroupId(1), GroupId(2));
    for group in [one, two] {
        engine.create_group(group, &[NodeId(1)]).await.unwrap();
    }
    for n in 0..60 {
        put(&engine, one, format!("a{n:03}")).await;
    }
    wait_for("an image write to start", async || !gate.started().is_empty()).await;
    let taken = gate.started()[0];
    assert!(taken >= LogIndex(50), "taken at {taken:?}");

    // The image is stuck in its writer: the shard goes on with both groups.
    for n in 0..200 {
        put(&engine, one, format!("b{n:03}")).await;
        put(&engine, two, format!("c{n:03}")).await;
    }
    let read = engine
        .read(one, Query::Get { key: Bytes::from("b199") }, Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(read, QueryResult::Value(Some(Bytes::from("b199"))));
    // Nothing is compacted before the file is durable.
    for group in [one, two] {
        assert_eq!(engine.status(group).await.unwrap().snapshot_index, LogIndex::ZERO);
    }

    gate.open();
    wait_for("group 1 to compact", async || {
        engine.status(one).await.unwrap().snapshot_index > LogIndex::ZERO
    })
    .await;
    // The first compaction is at the index the image was taken at, not where the group is now.
    let started = gate.started();
    assert_eq!(started[0], taken);
    let compacted = engine.status(one).await.unwrap().snapshot_index;
    assert!(started.contains(&compacted), "compacted to {compacted:?}, images {started:?}");
    wait_for("group 2 to compact", async || {
        engine.status(two).await.unwrap().snapshot_index > LogIndex::ZERO
    })
    .await;
    engine.shutdown().unwrap();

    // What restarts is the snapshot plus the log after it: every write is there.
    let engine = open(dir.path(), &gate);
    for (group, prefix, count) in [(one, "a", 60), (one, "b", 200), (two, "c", 200)] {
        for n in [0, count / 2, count - 1] {
            let key = Bytes::from(format!("{prefix}{n:03}"));
            wait_for("the restarted group to answer", async || {
                let query = Query::Get { key: key.clone() };
                let answer = engine.read(group, query, Consistency::Linearizable).await;
                matches!(answer, Ok(QueryResult::Value(Some(value))) if value == key)
            })
            .await;
        }
    }
    engine.shutdown().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_follower_restores_a_leader_s_snapshot_off_its_shard_thread() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let addrs: std::collections::BTreeMap<NodeId, std::net::SocketAddr> = (1..=3)
        .map(|id| {
            let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            (NodeId(id), addr)
        })
        .collect();
    let faults = Arc::new(flotilla::Faults::new());
    let writes = Arc::new(Gate::default());
    writes.open();
    let gate = Arc::new(Gate::default());
    let engines: Vec<Engine<GatedKv>> = (1..=3)
        .map(|id| {
            let node = NodeId(id);
            let mut config = EngineConfig::new(node, addrs[&node], dirs[(id - 1) as usize].path());
            config.peers = addrs.clone();
            // One shard: the groups share the shard thread the restore must not hold up.
            config.shards = 1;
            config.snapshot_entries = 50;
            config.faults = Some(Arc::clone(&faults));
            // Only node 3's restores wait for the gate; nobody's image writes do.
            let factory = factory(&writes, (id == 3).then_some(&gate));
            Engine::open(config, &factory).unwrap()
        })
        .collect();
    let members = [NodeId(1), NodeId(2), NodeId(3)];
    let (one, two) = (GroupId(1), GroupId(2));
    for engine in &engines {
        for group in [one, two] {
            engine.create_group(group, &members).await.unwrap();
        }
    }
    put_on(&engines, two, "before".into()).await;

    // Node 3 misses enough of group 1 that the others compact past it.
    faults.isolate(NodeId(3));
    let majority = &engines[..2];
    // Past the compaction deferral for a lagging follower (4 × snapshot_entries).
    for n in 0..260 {
        put_on(majority, one, format!("k{n:03}")).await;
    }
    for engine in majority {
        wait_for("the majority to compact group 1", async || {
            engine.status(one).await.unwrap().snapshot_index > LogIndex::ZERO
        })
        .await;
    }
    faults.heal();
    wait_for("node 3 to restore the leader's snapshot", async || !gate.started().is_empty()).await;

    // Node 3's restore is held up: its shard goes on serving group 2 (status, a linearizable
    // read through it, writes it replicates) and reports group 1 as not yet caught up.
    let node3 = &engines[2];
    assert!(node3.status(one).await.unwrap().applied < LogIndex(50));
    for n in 0..20 {
        put_on(&engines, two, format!("during{n:02}")).await;
    }
    let read = node3
        .read(two, Query::Get { key: Bytes::from("during19") }, Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(read, QueryResult::Value(Some(Bytes::from("during19"))));
    assert!(node3.status(one).await.unwrap().applied < LogIndex(50), "installed while held");

    gate.open();
    wait_for("node 3 to serve group 1's last write", async || {
        let query = Query::Get { key: Bytes::from("k259") };
        let answer = node3.read(one, query, Consistency::Linearizable).await;
        matches!(answer, Ok(QueryResult::Value(Some(value))) if value == "k259")
    })
    .await;
    for engine in engines {
        engine.shutdown().unwrap();
    }
}
