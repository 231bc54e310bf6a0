//! Disk use stays bounded under a steady write load even when no group reaches its snapshot
//! threshold: the groups pinning the oldest WAL segment are snapshotted (or copied forward) once
//! the log grows past `wal_segments_target`, and segments are recycled.

use std::time::Duration;

use flotilla::kv::{Command, Request};
use flotilla::{Engine, EngineConfig, GroupId, NodeId};

const GROUPS: u64 = 16;

async fn write(engine: &Engine, group: GroupId, count: u64) {
    let value = bytes::Bytes::from(vec![b'x'; 200]);
    let mut written = 0;
    while written < count {
        let key = format!("key-{}", written % 64).into();
        let command = Command::Put { key, value: value.clone() };
        match engine.propose_kv(group, Request::Unsessioned(command)).await {
            Ok(_) => written += 1,
            // The single-voter groups elect themselves during the first election timeout.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_log_is_recycled_when_no_group_reaches_its_snapshot_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut config = EngineConfig::new(NodeId(1), listen, dir.path());
    config.shards = 1;
    config.tick = Duration::from_millis(2);
    // No group ever reaches this: only the segment target can bound the log.
    config.snapshot_entries = 1_000_000;
    config.wal_segments_target = 3;
    config.wal.segment_bytes = 1 << 20;
    config.wal.batch_bytes_max = 256 << 10;
    let engine = Engine::open_kv(config).unwrap();
    for group in 1..=GROUPS {
        engine.create_group(GroupId(group), &[NodeId(1)]).await.unwrap();
    }
    // 16 groups × 2,500 writes × ~230 B ≈ 9 MiB through 1 MiB segments.
    let mut max_live = 0;
    for round in 0..5 {
        let writers = (1..=GROUPS).map(|group| write(&engine, GroupId(group), 500));
        for writer in writers {
            writer.await;
        }
        let stats = engine.shard_stats().await.unwrap();
        max_live = max_live.max(stats[0].wal.segments_live);
        eprintln!("round {round}: {:?}", stats[0].wal);
    }
    // Give the last compactions (every 64 ticks) time to land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let wal = engine.shard_stats().await.unwrap().remove(0).wal;
    assert!(wal.rotations >= 8, "the workload must span many segments: {wal:?}");
    assert!(wal.segments_recycled + wal.segments_deleted > 0, "nothing was recycled: {wal:?}");
    assert!(wal.segments_live <= 6, "the log kept {} segments: {wal:?}", wal.segments_live);
    engine.shutdown().unwrap();
}
