//! One Flotilla node hosting one KV group: open, write, read, shut down.
//!
//! `cargo run --release -p flotilla --example single_node`
//!
//! Options (the `kill -9` test in `engine/tests/kill9.rs` uses them):
//! - `--data-dir DIR`: keep the data there (default: a fresh temporary directory);
//! - `--listen ADDR`: the peer address to listen on (default `127.0.0.1:0`);
//! - `--writes N`: write keys `key-0` … `key-{N-1}` one after another and print `ack <i>` as each
//!   is acknowledged (`0`: forever), then read them all back.

use std::io::Write;
use std::time::Instant;

use flotilla::kv::{Command, Query, QueryResult, Request};
use flotilla::{Consistency, Engine, EngineConfig, Error, GroupId, NodeId};

const GROUP: GroupId = GroupId(1);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut data_dir = None;
    let mut listen = "127.0.0.1:0".to_owned();
    let mut writes: u64 = 10;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--data-dir" => data_dir = Some(std::path::PathBuf::from(value()?)),
            "--listen" => listen = value()?,
            "--writes" => writes = value()?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let temporary = tempfile::tempdir()?;
    let data_dir = data_dir.unwrap_or_else(|| temporary.path().to_path_buf());
    let mut config = EngineConfig::new(NodeId(1), listen.parse()?, data_dir);
    config.shards = 2;
    let engine = Engine::open_kv(config)?;
    eprintln!("node 1 serving on {} (WAL backends {:?})", engine.local_addr(), engine.backends());

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        match engine.create_group(GROUP, &[NodeId(1)]).await {
            // A restart finds the group in its catalog.
            Ok(()) | Err(Error::GroupExists(_)) => {}
            Err(error) => return Err(error.into()),
        }
        let started = Instant::now();
        let mut stdout = std::io::stdout().lock();
        let mut i = 0;
        while writes == 0 || i < writes {
            let command =
                Command::Put { key: format!("key-{i}").into(), value: format!("value-{i}").into() };
            match engine.propose_kv(GROUP, Request::Unsessioned(command)).await {
                Ok(_) => {
                    writeln!(stdout, "ack {i}")?;
                    stdout.flush()?;
                    i += 1;
                }
                // The group elects its (single) leader during the first election timeout.
                Err(Error::NoQuorum | Error::NotLeader { .. }) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
        eprintln!("{writes} writes acknowledged in {:?}", started.elapsed());
        for i in 0..writes {
            let query = Query::Get { key: format!("key-{i}").into() };
            let value = engine.read(GROUP, query, Consistency::Linearizable).await?;
            let expected = format!("value-{i}");
            if value != QueryResult::Value(Some(expected.clone().into())) {
                return Err(format!("key-{i}: {value:?}, expected {expected}").into());
            }
        }
        eprintln!("read back {writes} keys");
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    engine.shutdown()?;
    Ok(())
}
