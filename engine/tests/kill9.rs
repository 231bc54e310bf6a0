//! Acknowledged writes survive `kill -9` (issue 4): the `single_node` example writes keys and
//! prints `ack <i>` after each acknowledgement; it is killed with SIGKILL mid-stream, and the
//! node reopened from its data directory must hold every acknowledged key — twice over, so the
//! second kill lands on a log that was itself recovered.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::free_addr;
use flotilla::kv::{Query, QueryResult};
use flotilla::{Consistency, Engine, EngineConfig, GroupId, NodeId};

/// The example binary. A plain `cargo test` builds examples next to the test binaries; a
/// filtered run (`--test kill9`) does not, so then it is built here with the same profile.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    if !path.exists() {
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "flotilla", "--example", name, "--target-dir"]);
        build.arg(profile_dir.parent().unwrap());
        if release {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "building the {name} example");
    }
    assert!(path.exists(), "{} not built", path.display());
    path
}

/// Runs the writer until it acknowledged at least `at_least` new keys, then SIGKILLs it.
/// Returns the highest acknowledged key.
fn write_then_kill(dir: &Path, at_least: u64) -> Option<u64> {
    let mut child = Command::new(example("single_node"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &free_addr().to_string(),
            "--writes",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let started = Instant::now();
    let mut acked = None;
    let mut seen = 0;
    for line in stdout.lines() {
        let line = line.unwrap();
        let i: u64 = line.strip_prefix("ack ").unwrap().parse().unwrap();
        acked = Some(i);
        seen += 1;
        if seen >= at_least {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the writer is too slow");
    }
    child.kill().unwrap(); // SIGKILL: no shutdown, no flush, no destructor runs.
    child.wait().unwrap();
    acked
}

fn check(dir: &Path, acked: u64) {
    let mut config = EngineConfig::new(NodeId(1), free_addr(), dir);
    config.shards = 2;
    let engine = Engine::open_kv(config).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let started = Instant::now();
        for i in 0..=acked {
            loop {
                let query = Query::Get { key: format!("key-{i}").into() };
                match engine.read(GroupId(1), query, Consistency::Linearizable).await {
                    Ok(value) => {
                        let expected = format!("value-{i}");
                        assert_eq!(value, QueryResult::Value(Some(expected.into())), "key-{i}");
                        break;
                    }
                    // The recovered single-voter group elects itself first.
                    Err(_) if started.elapsed() < Duration::from_secs(30) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(error) => panic!("reading key-{i} after the restart: {error}"),
                }
            }
        }
    });
    engine.shutdown().unwrap();
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_then_kill(dir.path(), 300).expect("some writes acknowledged");
    check(dir.path(), first);
    // The writer restarts from key 0 on the recovered log: the keys it rewrites must survive too.
    let second = write_then_kill(dir.path(), 200).expect("some writes acknowledged");
    check(dir.path(), first.max(second));
}
