//! Helpers the engine's multi-node tests share (`mod common;` in each): a free loopback port,
//! a group's state machine contents, waiting until every group is quiet, and joining futures
//! without an extra crate.

#![allow(dead_code, reason = "each test binary uses the subset it needs")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::kv::KvStateMachine;
use flotilla::{Engine, GroupId};

/// Longest any step of a multi-node test may take; far above what it needs, so a slow CI
/// machine passes.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A loopback address nothing listens on right now, on a port below the kernel's ephemeral
/// range. A port from `bind(0)` is itself ephemeral: once the probing listener closed, another
/// test's outgoing connection could take it before the engine bound it, or between a node's
/// shutdown and its restart on the same address (CI once failed so, "Address already in use").
/// Outgoing connections never take a port below the range; each call (and each process, as
/// nextest runs every test in its own) starts elsewhere in it.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOWEST);
    if span >= 1_000 {
        let start = std::process::id().wrapping_mul(7_919);
        for _ in 0..span {
            let next = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = LOWEST + start.wrapping_add(next) % span;
            let port = u16::try_from(port).expect("below the ephemeral range");
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return listener.local_addr().unwrap();
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Every key and value of `group`'s state machine on `engine`.
pub async fn contents(engine: &Engine, group: GroupId) -> BTreeMap<Bytes, Bytes> {
    engine
        .inspect(group, |machine: &KvStateMachine| {
            machine
                .iter()
                .map(|(k, v)| (Bytes::copy_from_slice(k), v.clone()))
                .collect::<BTreeMap<_, _>>()
        })
        .await
        .unwrap()
        .expect("group hosted")
}

/// Groups of `engines` not quiet (being ticked, or queued to wake).
pub async fn awake(engines: impl IntoIterator<Item = &Engine>) -> usize {
    let mut awake = 0;
    for engine in engines {
        awake += engine.shard_stats().await.unwrap().iter().map(|s| s.groups_awake).sum::<usize>();
    }
    awake
}

/// Waits until no group of `engines` is being ticked (panics after [`PATIENCE`]).
pub async fn wait_quiet<'a>(engines: impl Fn() -> Vec<&'a Engine>) {
    let started = Instant::now();
    loop {
        let awake = awake(engines()).await;
        if awake == 0 {
            eprintln!("every group quiet after {:?}", started.elapsed());
            return;
        }
        assert!(started.elapsed() < PATIENCE, "{awake} groups never went quiet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs futures concurrently on the current task.
pub async fn join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|output| output.expect("all ready")).collect()
}
