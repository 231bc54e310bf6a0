//! `flotilla-node`: one Flotilla node as a process. Embeds the engine with the built-in KV state
//! machine, hosts groups `1..=--groups` (every node of `--peers` a voter), and serves the client
//! protocol (`flotilla_tools::client::codec`) on `--client`. Prints one line on stdout once it
//! serves — `ready node=ID raft=ADDR client=ADDR` — and shuts down cleanly (in-flight writes
//! finished, WALs synced and closed) on SIGTERM or SIGINT.
//!
//! ```sh
//! flotilla-node --id 1 --listen 127.0.0.1:7001 --client 127.0.0.1:7101 \
//!     --peers 2=127.0.0.1:7002,3=127.0.0.1:7003 --data-dir /tmp/n1 --groups 64
//! ```
//!
//! Restarting with the same data directory brings back every group it hosted; `--groups` is
//! idempotent (a group already in the catalog is left as it is). Logs go to stderr, at the level
//! `RUST_LOG` names (`tracing-subscriber` syntax, e.g. `RUST_LOG=flotilla=info`; default `warn`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use flotilla::{Engine, EngineConfig, Error, GroupId, NodeId};
use tokio::signal::unix::{SignalKind, signal};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs one Flotilla node: the engine, its groups and the client protocol.
#[derive(Debug, Parser)]
#[command(name = "flotilla-node", version, about, long_about)]
struct Cli {
    /// This node's id (1 or more), unique in the cluster.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,
    /// Address to listen on for the other nodes (Raft traffic). Port 0 picks one.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Address to listen on for clients. Port 0 picks one.
    #[arg(long, value_name = "ADDR")]
    client: SocketAddr,
    /// The other nodes' Raft addresses, as `ID=ADDR,ID=ADDR` (this node may be listed; it is
    /// ignored).
    #[arg(long, value_name = "ID=ADDR,...", value_parser = parse_peer, value_delimiter = ',')]
    peers: Vec<(u64, SocketAddr)>,
    /// Where the node keeps its data (created if absent).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Host groups 1..=N, each with this node and every peer as voters. Idempotent across
    /// restarts.
    #[arg(long, default_value_t = 0, value_name = "N")]
    groups: u64,
    /// Shard threads (0: one per core). Fixed for the life of the data directory.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// The Raft tick, in milliseconds.
    #[arg(long, default_value_t = 10, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    tick_ms: u64,
    /// Ticks without a leader before a follower campaigns (randomized up to twice that).
    #[arg(long, default_value_t = 10)]
    election_ticks: u32,
    /// How long a request may take on the node before it fails, in milliseconds.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    request_timeout_ms: u64,
    /// Let leaders answer lease reads from their lease.
    #[arg(long)]
    lease_reads: bool,
}

fn parse_peer(text: &str) -> Result<(u64, SocketAddr), String> {
    let (id, addr) = text.split_once('=').ok_or_else(|| format!("`{text}` is not ID=ADDR"))?;
    let id: u64 = id.trim().parse().map_err(|_| format!("`{id}` is not a node id"))?;
    if id == 0 {
        return Err("node id 0 is reserved".into());
    }
    let addr = addr.trim().parse().map_err(|_| format!("`{addr}` is not an address"))?;
    Ok((id, addr))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The engine logs through `tracing`; without a subscriber a failing node would say nothing.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: node {}: {error}", cli.id);
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let node = NodeId(cli.id);
    let mut config = EngineConfig::new(node, cli.listen, &cli.data_dir);
    config.peers = cli.peers.iter().map(|(id, addr)| (NodeId(*id), *addr)).collect();
    config.shards = cli.shards;
    config.tick = Duration::from_millis(cli.tick_ms);
    config.election_ticks = cli.election_ticks;
    config.request_timeout = Duration::from_millis(cli.request_timeout_ms);
    config.lease_reads = cli.lease_reads;
    let mut voters: Vec<NodeId> = config.peers.keys().copied().chain([node]).collect();
    voters.sort_unstable();
    voters.dedup();
    config.peers.remove(&node);
    let engine = Engine::open_kv(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let served = runtime.block_on(async {
        // Registered before "ready" is printed: a SIGTERM right after it is not lost.
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        create_groups(&engine, cli.groups, &voters).await?;
        let listener = tokio::net::TcpListener::bind(cli.client).await?;
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "ready node={} raft={} client={}",
            cli.id,
            engine.local_addr(),
            listener.local_addr()?
        )?;
        stdout.flush()?;
        drop(stdout);
        tokio::select! {
            error = flotilla_tools::node::serve(engine.clone(), listener) => {
                Err::<(), Box<dyn std::error::Error>>(format!("accepting clients: {error}").into())
            }
            _ = terminate.recv() => Ok(()),
            _ = interrupt.recv() => Ok(()),
        }
    });
    // Connection tasks hold engine handles: drop them before stopping the shards.
    drop(runtime);
    let stopped = engine.shutdown();
    served?;
    stopped?;
    eprintln!("node {} stopped", cli.id);
    Ok(())
}

/// Creates groups `1..=count` unless the catalog already has them (a restart): `GroupExists` is
/// success here. `Busy` (the shard's inbox is full) is retried.
async fn create_groups(engine: &Engine, count: u64, voters: &[NodeId]) -> Result<(), Error> {
    let mut busy_retries = 0u32;
    for group in (1..=count).map(GroupId) {
        loop {
            match engine.create_group(group, voters).await {
                Ok(()) | Err(Error::GroupExists(_)) => break,
                Err(Error::Busy) if busy_retries < 1000 => {
                    busy_retries += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}
