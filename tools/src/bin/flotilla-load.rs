//! `flotilla-load`: Flotilla's main job. Starts a three-node cluster on loopback TCP in this
//! process (each node with its own data directory under a temporary directory), creates groups,
//! spreads their leaders over the nodes, runs a mixed read/write workload with a live progress
//! line, then prints writes/s, reads/s, latency percentiles, fdatasyncs/s, entries per
//! fdatasync, messages per frame and the IO backend in use (`--json PATH` writes the same
//! figures as JSON).
//!
//! With `--nodes ADDR,ADDR,...` it starts nothing: it runs the same workload through the client
//! protocol against running `flotilla-node` processes (their `--client` addresses, started with
//! `--groups` at least this run's `--groups`), following `NotLeader` hints, and reads the
//! shards' counters with the protocol's stats request.
//!
//! `cargo run --release -p flotilla-tools --bin flotilla-load -- --help`
//!
//! Every write is durable (fdatasync) on a majority before it is acknowledged. The code to read
//! for embedding is `engine/examples/cluster.rs`; this binary is the same loop with options.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use flotilla::kv::{Command, Query, Request};
use flotilla::wal::Backend;
use flotilla::{Consistency, Engine, EngineConfig, Error, GroupId, NodeId};
use flotilla_tools::client::{Client, ClientError, ReadConsistency, RemoteError, Role};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::task::JoinSet;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error>;

/// Runs a three-node Flotilla cluster on loopback in this process under a mixed read/write
/// workload and reports throughput, latency and what the shards did.
///
/// Every write is durable (fdatasync) on a majority before it is acknowledged. With `--nodes`,
/// runs the workload against running `flotilla-node` processes instead (exit code 2 if one
/// cannot be reached).
#[derive(Debug, Parser)]
#[command(name = "flotilla-load", version, about, long_about)]
struct Cli {
    /// How long the workload runs, in seconds.
    #[arg(long, default_value_t = 20, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration: u64,
    /// Raft groups (each replicated on all three nodes).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    groups: u64,
    /// Value size of every write, in bytes.
    #[arg(long, default_value_t = 128, value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(0..=(1 << 20)))]
    payload: u64,
    /// Fraction of operations that are reads, from 0 (only writes) to 1 (only reads).
    #[arg(long, default_value_t = 0.2, value_name = "RATIO", value_parser = parse_ratio)]
    read_ratio: f64,
    /// Concurrent clients, spread round-robin over the groups; each waits for its operation
    /// before starting the next.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    proposers: u64,
    /// Read consistency: `linearizable` (ReadIndex on the leader), `lease` (leader lease;
    /// turns lease reads on) or `stale` (any replica within --max-lag-ms, spread over nodes).
    #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
    consistency: ConsistencyArg,
    /// For `--consistency stale`: how long ago a replica may last have heard from its leader.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    max_lag_ms: u64,
    /// fdatasync every WAL round (`on`), or not (`off`: `EngineConfig::sync = false`, unsafe,
    /// for comparison only: acknowledged writes survive a process crash but not a power
    /// failure). With `--nodes` the nodes decide, so only `on` is accepted there.
    #[arg(long, value_enum, default_value_t = SyncArg::On)]
    sync: SyncArg,
    /// WAL IO backend (the FLOTILLA_WAL_BACKEND environment variable overrides it). `io_uring`
    /// fails if io_uring is unavailable; `auto` falls back to `portable`.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Shard threads per node (0: one per core).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=1024))]
    shards: u64,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Client addresses of running `flotilla-node` processes (`--client`), comma-separated: run
    /// against them instead of starting nodes here. They must host groups 1..=--groups; with
    /// `--consistency lease`, lease reads are whatever the nodes were started with
    /// (`--lease-reads`); `--backend` and `--shards` are theirs too and are ignored.
    #[arg(long, value_name = "ADDR,...", value_delimiter = ',', num_args = 1..)]
    nodes: Vec<SocketAddr>,
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum ConsistencyArg {
    Linearizable,
    Lease,
    Stale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SyncArg {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    Auto,
    #[value(name = "io_uring", alias = "uring")]
    IoUring,
    Portable,
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not between 0 and 1"))
    }
}

/// Everything the run measured; printed as a table and written as JSON.
#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    groups: u64,
    shards_per_node: usize,
    proposers: u64,
    payload_bytes: u64,
    read_ratio: f64,
    consistency: ConsistencyArg,
    sync: bool,
    backend: String,
    leaders_per_node: Vec<usize>,
    duration_secs: f64,
    drain_secs: f64,
    writes: u64,
    reads: u64,
    writes_per_sec: f64,
    reads_per_sec: f64,
    write_latency_us: Latency,
    read_latency_us: Latency,
    write_errors: u64,
    read_errors: u64,
    fdatasyncs: u64,
    fdatasyncs_per_sec: f64,
    entries_per_fdatasync: f64,
    frames_per_sec: f64,
    messages_per_frame: f64,
}

/// Latency percentiles in microseconds (all 0 when nothing was measured).
#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        if histogram.is_empty() {
            return Latency { p50: 0, p99: 0, p999: 0, max: 0 };
        }
        Latency {
            p50: histogram.value_at_quantile(0.5),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.sync == SyncArg::Off && !cli.nodes.is_empty() {
        eprintln!(
            "error: --sync off is not supported with --nodes: whether a node fdatasyncs is its \
             own configuration, not the load tool's"
        );
        return ExitCode::from(2);
    }
    let result = if cli.nodes.is_empty() { run(&cli) } else { run_remote(&cli) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            // An address that reaches no node is a bad argument, like a malformed one.
            if error.is::<Unreachable>() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// A `--nodes` address where no node answered.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// The JSON file, opened before the run: a bad path fails before the run, not after it.
fn open_json(cli: &Cli) -> Result<Option<std::fs::File>, BoxError> {
    Ok(match &cli.json {
        Some(path) => Some(
            std::fs::File::create(path)
                .map_err(|error| format!("cannot write {}: {error}", path.display()))?,
        ),
        None => None,
    })
}

fn finish(report: &Report, json: Option<std::fs::File>) -> Result<(), BoxError> {
    print_table(report);
    if let Some(mut file) = json {
        serde_json::to_writer_pretty(&mut file, report)?;
        writeln!(file)?;
    }
    Ok(())
}

/// `--nodes`: the workload against running node processes.
fn run_remote(cli: &Cli) -> Result<(), BoxError> {
    let json = open_json(cli)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(async {
        let mut clients = Vec::new();
        let mut ids = Vec::new();
        for addr in &cli.nodes {
            let unreachable = |error: ClientError| Unreachable(format!("node at {addr}: {error}"));
            let client =
                Client::connect(*addr, Duration::from_secs(3)).await.map_err(unreachable)?;
            client.set_timeout(Duration::from_secs(10));
            let stats = client.stats().await.map_err(unreachable)?;
            ids.push(NodeId(stats.node));
            clients.push(RwLock::new(client));
        }
        let cluster = Cluster::Remote(Arc::new(Remote { clients, ids }));
        for group in 1..=cli.groups {
            match cluster.remote().client(0).status(group).await {
                Ok(_) => {}
                Err(ClientError::Remote(RemoteError::GroupNotFound { .. })) => {
                    return Err(format!(
                        "node at {} does not host group {group}: start the nodes with \
                         --groups {} or more",
                        cli.nodes[0], cli.groups
                    )
                    .into());
                }
                Err(error) => return Err(error.into()),
            }
        }
        drive(cli, &cluster, None).await
    })?;
    finish(&report, json)
}

fn run(cli: &Cli) -> Result<(), BoxError> {
    let json = open_json(cli)?;
    let root = tempfile::Builder::new().prefix("flotilla-load-").tempdir()?;
    let mut addrs = BTreeMap::new();
    for id in 1..=3 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        addrs.insert(NodeId(id), listener.local_addr()?);
    }
    let mut engines = Vec::new();
    for (node, addr) in &addrs {
        let mut config =
            EngineConfig::new(*node, *addr, root.path().join(format!("node-{}", node.0)));
        config.peers = addrs.clone();
        config.shards = usize::try_from(cli.shards)?;
        config.lease_reads = matches!(cli.consistency, ConsistencyArg::Lease);
        config.sync = cli.sync == SyncArg::On;
        config.wal.backend = match cli.backend {
            BackendArg::Auto => Backend::Auto,
            BackendArg::IoUring => Backend::IoUring,
            BackendArg::Portable => Backend::Portable,
        };
        match Engine::open_kv(config) {
            Ok(engine) => engines.push(engine),
            Err(error) => {
                for engine in engines {
                    let _ = engine.shutdown();
                }
                return Err(format!("node {} did not start: {error}", node.0).into());
            }
        }
    }
    // Time only, no IO driver: with one, every answer a shard sends this thread costs an
    // eventfd write to wake it (about one syscall per request, a quarter of the CPU per write
    // in `bench/RESULTS.md`); without, a wake only signals the thread if it is parked.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let result = runtime.block_on(async {
        let nodes: Vec<NodeId> = addrs.keys().copied().collect();
        for engine in &engines {
            for group in 1..=cli.groups {
                engine.create_group(GroupId(group), &nodes).await?;
            }
        }
        let cluster = Cluster::Local(engines.clone());
        let leaders = balance(&engines, elect(&cluster, cli.groups).await?).await;
        drive(cli, &cluster, Some(leaders)).await
    });
    let mut shutdown = Ok(());
    for engine in engines {
        if let Err(error) = engine.shutdown() {
            shutdown = Err(error);
        }
    }
    let report = result?;
    shutdown?;
    finish(&report, json)
}

/// Where the workload runs: engines in this process, or node processes through the client
/// protocol. An enum rather than a trait object: two cases, no boxing per operation.
#[derive(Clone)]
enum Cluster {
    Local(Vec<Engine>),
    Remote(Arc<Remote>),
}

/// Running node processes, one connection each (replaced when it breaks).
struct Remote {
    clients: Vec<RwLock<Client>>,
    ids: Vec<NodeId>,
}

impl Remote {
    fn client(&self, node: usize) -> Client {
        self.clients[node].read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces node `node`'s connection if it broke (a node restart); failures are left for
    /// the next operation to report.
    async fn reconnect(&self, node: usize) {
        let old = self.client(node);
        if old.is_open() {
            return;
        }
        if let Ok(client) = Client::connect(old.peer(), Duration::from_secs(1)).await {
            client.set_timeout(Duration::from_secs(10));
            *self.clients[node].write().unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        }
    }
}

/// Why an operation failed, as much as the worker needs: where to go next.
struct Failure {
    /// The node the answer named as leader.
    leader: Option<usize>,
}

impl Cluster {
    fn len(&self) -> usize {
        match self {
            Cluster::Local(engines) => engines.len(),
            Cluster::Remote(remote) => remote.ids.len(),
        }
    }

    fn remote(&self) -> &Remote {
        match self {
            Cluster::Remote(remote) => remote,
            Cluster::Local(_) => unreachable!("only called on --nodes runs"),
        }
    }

    fn node_id(&self, index: usize) -> NodeId {
        match self {
            Cluster::Local(engines) => engines[index].node(),
            Cluster::Remote(remote) => remote.ids[index],
        }
    }

    fn index_of(&self, node: NodeId) -> Option<usize> {
        (0..self.len()).find(|index| self.node_id(*index) == node)
    }

    /// The IO backend of the first node and its shard count.
    async fn describe(&self) -> Result<(String, usize), BoxError> {
        Ok(match self {
            Cluster::Local(engines) => (
                engines[0].backends().first().map_or("none", |backend| backend.name()).into(),
                engines[0].backends().len(),
            ),
            Cluster::Remote(remote) => {
                let stats = remote.client(0).stats().await?;
                (stats.backend, stats.shards as usize)
            }
        })
    }

    async fn write(
        &self,
        node: usize,
        group: GroupId,
        key: Bytes,
        value: Bytes,
    ) -> Result<(), Failure> {
        match self {
            Cluster::Local(engines) => {
                let command = Command::Put { key, value };
                let result = engines[node].propose_kv(group, Request::Unsessioned(command)).await;
                result.map(drop).map_err(|error| self.local_failure(&error))
            }
            Cluster::Remote(remote) => {
                let result = remote.client(node).put(group.0, key, value).await;
                self.remote_result(node, result.map(drop)).await
            }
        }
    }

    async fn read(
        &self,
        node: usize,
        group: GroupId,
        key: Bytes,
        consistency: Consistency,
    ) -> Result<(), Failure> {
        match self {
            Cluster::Local(engines) => {
                let result = engines[node].read(group, Query::Get { key }, consistency).await;
                result.map(drop).map_err(|error| self.local_failure(&error))
            }
            Cluster::Remote(remote) => {
                let consistency = match consistency {
                    Consistency::Linearizable => ReadConsistency::Linearizable,
                    Consistency::Lease => ReadConsistency::Lease,
                    Consistency::Stale { max_lag } => ReadConsistency::Stale {
                        max_lag_ms: u64::try_from(max_lag.as_millis()).unwrap_or(u64::MAX),
                    },
                };
                let result = remote.client(node).get(group.0, key, consistency).await;
                self.remote_result(node, result.map(drop)).await
            }
        }
    }

    fn local_failure(&self, error: &Error) -> Failure {
        match error {
            Error::NotLeader { leader_hint: Some(hint) } => {
                Failure { leader: self.index_of(*hint) }
            }
            _ => Failure { leader: None },
        }
    }

    async fn remote_result(
        &self,
        node: usize,
        result: Result<(), ClientError>,
    ) -> Result<(), Failure> {
        match result {
            Ok(()) => Ok(()),
            Err(ClientError::Remote(RemoteError::NotLeader { hint: Some(hint) })) => {
                Err(Failure { leader: self.index_of(NodeId(hint)) })
            }
            Err(ClientError::Disconnected(_)) => {
                self.remote().reconnect(node).await;
                Err(Failure { leader: None })
            }
            Err(_) => Err(Failure { leader: None }),
        }
    }

    /// The index of the node whose replica of `group` leads, if one says so.
    async fn leader_of(&self, group: GroupId) -> Option<usize> {
        for index in 0..self.len() {
            let leads = match self {
                Cluster::Local(engines) => engines[index]
                    .status(group)
                    .await
                    .is_ok_and(|status| status.leader == Some(engines[index].node())),
                Cluster::Remote(remote) => remote
                    .client(index)
                    .status(group.0)
                    .await
                    .is_ok_and(|status| status.role == Role::Leader),
            };
            if leads {
                return Some(index);
            }
        }
        None
    }

    async fn totals(&self) -> Result<Totals, BoxError> {
        let mut totals = Totals::default();
        match self {
            Cluster::Local(engines) => {
                for engine in engines {
                    for shard in engine.shard_stats().await? {
                        totals.fdatasyncs += shard.wal.fdatasyncs;
                        totals.entries += shard.wal.entries;
                        totals.frames += shard.frames_sent;
                        totals.messages += shard.messages_sent;
                    }
                }
            }
            Cluster::Remote(remote) => {
                for index in 0..remote.ids.len() {
                    let stats = remote.client(index).stats().await?;
                    totals.fdatasyncs += stats.fdatasyncs;
                    totals.entries += stats.entries;
                    totals.frames += stats.frames;
                    totals.messages += stats.messages;
                }
            }
        }
        Ok(totals)
    }
}

/// Counters the progress line reads while the workload runs.
#[derive(Default)]
struct Live {
    writes: AtomicU64,
    reads: AtomicU64,
    errors: AtomicU64,
}

/// One proposer's results.
struct Part {
    writes: Histogram<u64>,
    reads: Histogram<u64>,
    write_errors: u64,
    read_errors: u64,
    /// Operations that completed before the deadline.
    writes_in_window: u64,
    reads_in_window: u64,
}

/// Runs the workload on `cluster`, whose groups' leaders are `leaders` (found here if `None`).
async fn drive(
    cli: &Cli,
    cluster: &Cluster,
    leaders: Option<BTreeMap<GroupId, usize>>,
) -> Result<Report, BoxError> {
    let (backend, shards_per_node) = cluster.describe().await?;
    let leaders = match leaders {
        Some(leaders) => leaders,
        None => elect(cluster, cli.groups).await?,
    };
    let mut leaders_per_node = vec![0; cluster.len()];
    for index in leaders.values() {
        leaders_per_node[*index] += 1;
    }
    print_banner(cli, cluster, &backend, shards_per_node, &leaders_per_node);

    let before = cluster.totals().await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(cli.duration);
    let live = Arc::new(Live::default());
    let leaders = Arc::new(leaders);
    let value = Bytes::from(vec![b'v'; usize::try_from(cli.payload)?]);
    let consistency = match cli.consistency {
        ConsistencyArg::Linearizable => Consistency::Linearizable,
        ConsistencyArg::Lease => Consistency::Lease,
        ConsistencyArg::Stale => {
            Consistency::Stale { max_lag: Duration::from_millis(cli.max_lag_ms) }
        }
    };
    let mut tasks = JoinSet::new();
    for proposer in 0..cli.proposers {
        let worker = Worker {
            proposer,
            group: GroupId(proposer % cli.groups + 1),
            cluster: cluster.clone(),
            leaders: Arc::clone(&leaders),
            live: Arc::clone(&live),
            value: value.clone(),
            read_ratio: cli.read_ratio,
            consistency,
            deadline,
        };
        tasks.spawn(worker.run());
    }
    let (parts, after) = collect(cluster, tasks, &live, started, deadline).await?;
    // Rates are over the load window; operations still in flight at its end are waited for
    // (their latencies count) but not counted as done within it.
    let window = (deadline - started).as_secs_f64();
    let drain = started.elapsed().as_secs_f64() - window;

    let mut writes = histogram();
    let mut reads = histogram();
    let (mut write_errors, mut read_errors) = (0, 0);
    let (mut writes_done, mut reads_done) = (0, 0);
    for part in parts {
        writes_done += part.writes_in_window;
        reads_done += part.reads_in_window;
        writes.add(part.writes)?;
        reads.add(part.reads)?;
        write_errors += part.write_errors;
        read_errors += part.read_errors;
    }
    let fdatasyncs = after.fdatasyncs - before.fdatasyncs;
    let entries = after.entries - before.entries;
    let frames = after.frames - before.frames;
    let messages = after.messages - before.messages;
    Ok(Report {
        nodes: cluster.len(),
        groups: cli.groups,
        shards_per_node,
        proposers: cli.proposers,
        payload_bytes: cli.payload,
        read_ratio: cli.read_ratio,
        consistency: cli.consistency,
        sync: cli.sync == SyncArg::On,
        backend,
        leaders_per_node,
        duration_secs: window,
        drain_secs: drain,
        writes: writes_done,
        reads: reads_done,
        writes_per_sec: writes_done as f64 / window,
        reads_per_sec: reads_done as f64 / window,
        write_latency_us: Latency::of(&writes),
        read_latency_us: Latency::of(&reads),
        write_errors,
        read_errors,
        fdatasyncs,
        fdatasyncs_per_sec: fdatasyncs as f64 / window,
        entries_per_fdatasync: entries as f64 / fdatasyncs.max(1) as f64,
        frames_per_sec: frames as f64 / window,
        messages_per_frame: messages as f64 / frames.max(1) as f64,
    })
}

/// Says on stderr what is about to run.
fn print_banner(
    cli: &Cli,
    cluster: &Cluster,
    backend: &str,
    shards_per_node: usize,
    leaders_per_node: &[usize],
) {
    let place = match cluster {
        Cluster::Local(_) => "on loopback in this process".to_string(),
        Cluster::Remote(_) => format!("at {:?}", cli.nodes),
    };
    eprintln!(
        "{} nodes {place}, {shards_per_node} shard(s) each, WAL backend {backend}; {} groups, \
         {} B values, {} proposers, read ratio {}, {:?} reads, {} s",
        cluster.len(),
        cli.groups,
        cli.payload,
        cli.proposers,
        cli.read_ratio,
        cli.consistency,
        cli.duration
    );
    eprintln!("leaders per node: {leaders_per_node:?}");
}

/// Waits for every worker, drawing the progress line meanwhile; returns their results and the
/// shards' counters at the deadline.
async fn collect(
    cluster: &Cluster,
    mut tasks: JoinSet<Part>,
    live: &Live,
    started: Instant,
    deadline: Instant,
) -> Result<(Vec<Part>, Totals), BoxError> {
    let progress = progress_bar((deadline - started).as_secs());
    let mut at_deadline = None;
    let tick = Duration::from_millis(250);
    let mut ticker = tokio::time::interval_at((started + tick).into(), tick);
    let mut parts = Vec::new();
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(part) => parts.push(part?),
                None => break,
            },
            () = tokio::time::sleep_until(deadline.into()), if at_deadline.is_none() => {
                at_deadline = Some(cluster.totals().await?);
            }
            _ = ticker.tick() => {
                let elapsed = started.elapsed();
                let secs = elapsed.as_secs_f64().max(1e-3);
                progress.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                progress.set_message(format!(
                    "{:.0} writes/s  {:.0} reads/s  {} errors",
                    live.writes.load(Ordering::Relaxed) as f64 / secs,
                    live.reads.load(Ordering::Relaxed) as f64 / secs,
                    live.errors.load(Ordering::Relaxed)
                ));
            }
        }
    }
    progress.finish_and_clear();
    let at_deadline = match at_deadline {
        Some(totals) => totals,
        None => cluster.totals().await?,
    };
    Ok((parts, at_deadline))
}

/// Latencies from 1 µs to 10 min at 3 significant digits (slower ones count as 10 min).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

fn progress_bar(seconds: u64) -> ProgressBar {
    // Drawn on stderr, and only when it is a terminal.
    let progress = ProgressBar::new(seconds * 1000);
    let style = ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {msg}")
        .map_or_else(|_| ProgressStyle::default_bar(), |style| style.progress_chars("=> "));
    progress.set_style(style);
    progress
}

/// One client: reads or writes its group's keys, one operation at a time, until the deadline.
struct Worker {
    proposer: u64,
    group: GroupId,
    cluster: Cluster,
    leaders: Arc<BTreeMap<GroupId, usize>>,
    live: Arc<Live>,
    value: Bytes,
    read_ratio: f64,
    consistency: Consistency,
    deadline: Instant,
}

impl Worker {
    async fn run(self) -> Part {
        let mut part = Part {
            writes: histogram(),
            reads: histogram(),
            write_errors: 0,
            read_errors: 0,
            writes_in_window: 0,
            reads_in_window: 0,
        };
        let mut leader = self.leaders[&self.group];
        // xorshift64, seeded per proposer: the read/write mix without a dependency.
        let mut random = self.proposer.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut sequence = 0u64;
        let stale = matches!(self.consistency, Consistency::Stale { .. });
        while Instant::now() < self.deadline {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            let is_read = ((random >> 11) as f64 / (1u64 << 53) as f64) < self.read_ratio;
            let key = Bytes::from(format!("p{}-{}", self.proposer, sequence % 1024));
            let asked = Instant::now();
            let result = if is_read {
                // Stale reads are served by any replica: spread them over the nodes.
                let node = if stale { (random as usize) % self.cluster.len() } else { leader };
                self.cluster.read(node, self.group, key, self.consistency).await
            } else {
                self.cluster.write(leader, self.group, key, self.value.clone()).await
            };
            let done = Instant::now();
            let micros = u64::try_from((done - asked).as_micros()).unwrap_or(u64::MAX).max(1);
            let in_window = u64::from(done <= self.deadline);
            match result {
                Ok(()) if is_read => {
                    part.reads.saturating_record(micros);
                    part.reads_in_window += in_window;
                    self.live.reads.fetch_add(1, Ordering::Relaxed);
                }
                Ok(()) => {
                    part.writes.saturating_record(micros);
                    part.writes_in_window += in_window;
                    self.live.writes.fetch_add(1, Ordering::Relaxed);
                    sequence += 1;
                }
                Err(failure) => {
                    if is_read {
                        part.read_errors += 1;
                    } else {
                        part.write_errors += 1;
                    }
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    match failure.leader {
                        Some(hinted) => leader = hinted,
                        None => {
                            leader = (leader + 1) % self.cluster.len();
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            }
        }
        part
    }
}

/// Waits until every group has a leader; returns the index of each group's leader's engine.
async fn elect(cluster: &Cluster, groups: u64) -> Result<BTreeMap<GroupId, usize>, BoxError> {
    let mut leaders = BTreeMap::new();
    let started = Instant::now();
    while (leaders.len() as u64) < groups {
        for group in (1..=groups).map(GroupId) {
            if let Some(index) = cluster.leader_of(group).await {
                leaders.insert(group, index);
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "only {} of {groups} groups elected a leader within 30 s",
                leaders.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{} leaders elected in {:.2?}", leaders.len(), started.elapsed());
    Ok(leaders)
}

/// Moves group `g`'s leadership to node `g mod 3` (the node that starts first tends to win every
/// election); returns where the leaders are afterwards.
async fn balance(
    engines: &[Engine],
    mut leaders: BTreeMap<GroupId, usize>,
) -> BTreeMap<GroupId, usize> {
    let target = |group: GroupId| (group.0 % engines.len() as u64) as usize;
    for (group, leader) in &leaders {
        if *leader != target(*group) {
            // A transfer that does not happen only leaves the group where it was.
            let _ =
                engines[*leader].transfer_leadership(*group, engines[target(*group)].node()).await;
        }
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut settled = true;
        for (group, leader) in &mut leaders {
            for (index, engine) in engines.iter().enumerate() {
                if let Ok(status) = engine.status(*group).await
                    && status.role == flotilla::raftgroup::Role::Leader
                {
                    *leader = index;
                }
            }
            settled &= *leader == target(*group);
        }
        if settled {
            break;
        }
    }
    leaders
}

#[derive(Default)]
struct Totals {
    fdatasyncs: u64,
    entries: u64,
    frames: u64,
    messages: u64,
}

fn print_table(report: &Report) {
    let latency =
        |latency: &Latency| format!("{} / {} / {}", latency.p50, latency.p99, latency.p999);
    let rows = [
        ("writes/s", format!("{:.0}", report.writes_per_sec)),
        ("reads/s", format!("{:.0}", report.reads_per_sec)),
        ("write latency p50/p99/p99.9 µs", latency(&report.write_latency_us)),
        ("read latency p50/p99/p99.9 µs", latency(&report.read_latency_us)),
        ("fdatasyncs/s", format!("{:.0}", report.fdatasyncs_per_sec)),
        ("entries per fdatasync", format!("{:.1}", report.entries_per_fdatasync)),
        ("messages per frame", format!("{:.1}", report.messages_per_frame)),
        ("io backend", report.backend.clone()),
        (
            "errors (write/read, retried)",
            format!("{} / {}", report.write_errors, report.read_errors),
        ),
    ];
    println!(
        "\n{} nodes, {} groups, {} shard(s)/node, {} proposers, {} B writes, read ratio {}, \
         {:?} reads, sync on, {:.1} s (+{:.1} s waiting for the last operations)",
        report.nodes,
        report.groups,
        report.shards_per_node,
        report.proposers,
        report.payload_bytes,
        report.read_ratio,
        report.consistency,
        report.duration_secs,
        report.drain_secs
    );
    let width = rows.iter().map(|(name, _)| name.chars().count()).max().unwrap_or(0);
    for (name, value) in rows {
        println!("{name:<width$}  {value}");
    }
}
