//! Three Flotilla nodes in one process on loopback TCP, under load: every node hosts the same
//! groups, proposers write through each group's leader, and the run prints committed writes per
//! second, latency percentiles, and what the shards did (entries per fdatasync, messages per
//! frame).
//!
//! `cargo run --release -p flotilla --example cluster -- [--groups 64] [--payload 128]
//!  [--seconds 10] [--proposers 512] [--shards 1] [--balance true]`
//!
//! Every write is durable on a majority before it is acknowledged (fdatasync on).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::kv::{Command, Request};
use flotilla::{Engine, EngineConfig, Error, GroupId, NodeId};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

struct Options {
    groups: u64,
    payload: usize,
    seconds: u64,
    proposers: usize,
    shards: usize,
    balance: bool,
}

fn parse() -> Result<Options, Box<dyn std::error::Error>> {
    let mut options =
        Options { groups: 64, payload: 128, seconds: 10, proposers: 512, shards: 1, balance: true };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--groups" => options.groups = value.parse()?,
            "--payload" => options.payload = value.parse()?,
            "--seconds" => options.seconds = value.parse()?,
            "--proposers" => options.proposers = value.parse()?,
            "--shards" => options.shards = value.parse()?,
            "--balance" => options.balance = value.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if options.groups == 0 || options.proposers == 0 {
        return Err("--groups and --proposers must be positive".into());
    }
    Ok(options)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = parse()?;
    let dirs: Vec<tempfile::TempDir> =
        (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let mut addrs = BTreeMap::new();
    for id in 1..=3 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        addrs.insert(NodeId(id), listener.local_addr()?);
    }
    let nodes: Vec<NodeId> = addrs.keys().copied().collect();
    let mut engines = Vec::new();
    for (node, dir) in nodes.iter().zip(&dirs) {
        let mut config = EngineConfig::new(*node, addrs[node], dir.path());
        config.peers = addrs.clone();
        config.shards = options.shards;
        engines.push(Engine::open_kv(config)?);
    }
    println!(
        "3 nodes on loopback, {} shard(s) each, WAL backend {:?}; {} groups, {} B values, {} proposers, {} s",
        options.shards,
        engines[0].backends()[0],
        options.groups,
        options.payload,
        options.proposers,
        options.seconds
    );
    // Time only: a runtime with an IO driver is woken by an eventfd write for every answer
    // a shard sends it, where this one only signals its thread when it is parked.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    runtime.block_on(run(&options, &engines, &addrs))?;
    for engine in engines {
        engine.shutdown()?;
    }
    Ok(())
}

async fn run(
    options: &Options,
    engines: &[Engine],
    addrs: &BTreeMap<NodeId, SocketAddr>,
) -> Result<(), Box<dyn std::error::Error>> {
    let nodes: Vec<NodeId> = addrs.keys().copied().collect();
    for engine in engines {
        for group in 1..=options.groups {
            engine.create_group(GroupId(group), &nodes).await?;
        }
    }
    // Wait for every group to elect a leader.
    let mut leaders = BTreeMap::new();
    let started = Instant::now();
    while (leaders.len() as u64) < options.groups {
        for group in (1..=options.groups).map(GroupId) {
            for (index, engine) in engines.iter().enumerate() {
                if let Ok(status) = engine.status(group).await
                    && status.leader == Some(engine.node())
                {
                    leaders.insert(group, index);
                }
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err("groups did not elect leaders within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{} leaders elected in {:?}", leaders.len(), started.elapsed());
    // The node that started first tends to win every election: spread the leaders, so every
    // node's shard does its share of the leading.
    let leaders = if options.balance { balance(engines, leaders).await? } else { leaders };
    let mut per_node = vec![0; engines.len()];
    for index in leaders.values() {
        per_node[*index] += 1;
    }
    println!("leaders per node after balancing: {per_node:?}");

    let before = totals(engines).await?;
    let value = Bytes::from(vec![b'v'; options.payload]);
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let leaders = Arc::new(leaders);
    let mut tasks = JoinSet::new();
    for proposer in 0..options.proposers {
        let group = GroupId(proposer as u64 % options.groups + 1);
        let engines: Vec<Engine> = engines.to_vec();
        let leaders = Arc::clone(&leaders);
        let value = value.clone();
        tasks.spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("3 significant digits");
            let mut leader = leaders[&group];
            let mut sequence = 0u64;
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let key = Bytes::from(format!("p{proposer}-{}", sequence % 1024));
                let command = Command::Put { key, value: value.clone() };
                let asked = Instant::now();
                match engines[leader].propose_kv(group, Request::Unsessioned(command)).await {
                    Ok(_) => {
                        let micros = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX);
                        histogram.record(micros.max(1)).expect("in range");
                        sequence += 1;
                    }
                    Err(Error::NotLeader { leader_hint: Some(hint) }) => {
                        errors += 1;
                        leader = usize::try_from(hint.0 - 1).unwrap_or(0);
                    }
                    Err(_) => {
                        errors += 1;
                        leader = (leader + 1) % engines.len();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (histogram, errors)
        });
    }
    report(options, engines, tasks, before).await
}

/// Moves group `g`'s leadership to node `g mod 3`; returns where the leaders are afterwards.
async fn balance(
    engines: &[Engine],
    mut leaders: BTreeMap<GroupId, usize>,
) -> Result<BTreeMap<GroupId, usize>, Box<dyn std::error::Error>> {
    for (group, leader) in &leaders {
        let target = (group.0 % engines.len() as u64) as usize;
        if *leader != target {
            // A transfer that does not happen only leaves the group where it was.
            let _ = engines[*leader].transfer_leadership(*group, engines[target].node()).await;
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
            settled &= *leader == (group.0 % engines.len() as u64) as usize;
        }
        if settled {
            break;
        }
    }
    Ok(leaders)
}

async fn report(
    options: &Options,
    engines: &[Engine],
    mut tasks: JoinSet<(Histogram<u64>, u64)>,
    before: Totals,
) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    while let Some(result) = tasks.join_next().await {
        let (part, part_errors) = result?;
        histogram.add(part)?;
        errors += part_errors;
    }
    let elapsed = started.elapsed().as_secs_f64().max(options.seconds as f64);
    let after = totals(engines).await?;
    let writes = histogram.len();
    println!(
        "committed writes/s: {:.0}  ({writes} writes, {errors} retried errors)",
        writes as f64 / elapsed
    );
    println!(
        "latency µs: p50 {}  p99 {}  p99.9 {}  max {}",
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.value_at_quantile(0.999),
        histogram.max()
    );
    let fsyncs = after.fdatasyncs - before.fdatasyncs;
    let entries = after.entries - before.entries;
    let frames = after.frames - before.frames;
    let messages = after.messages - before.messages;
    println!(
        "all nodes: {:.0} fdatasyncs/s, {:.1} entries per fdatasync, {:.0} frames/s, {:.1} messages per frame",
        fsyncs as f64 / elapsed,
        entries as f64 / fsyncs.max(1) as f64,
        frames as f64 / elapsed,
        messages as f64 / frames.max(1) as f64
    );
    Ok(())
}

#[derive(Default)]
struct Totals {
    fdatasyncs: u64,
    entries: u64,
    frames: u64,
    messages: u64,
}

async fn totals(engines: &[Engine]) -> Result<Totals, Error> {
    let mut totals = Totals::default();
    for engine in engines {
        for shard in engine.shard_stats().await? {
            totals.fdatasyncs += shard.wal.fdatasyncs;
            totals.entries += shard.wal.entries;
            totals.frames += shard.frames_sent;
            totals.messages += shard.messages_sent;
        }
    }
    Ok(totals)
}
