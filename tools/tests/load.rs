//! `flotilla-load`: a two-second run with `--json` reports non-zero writes and every figure of
//! the table; `--sync off` runs without fdatasync and says so; bad arguments (and `--sync off`
//! with `--nodes`, where the nodes decide) fail with a message, not a panic.

use std::process::{Command, Output};

fn load(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla-load")).args(args).output().expect("runs")
}

#[test]
fn short_run_writes_json_with_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.json");
    let output = load(&[
        "--duration",
        "2",
        "--groups",
        "4",
        "--proposers",
        "64",
        "--read-ratio",
        "0.3",
        "--json",
        path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("writes/s"), "{stdout}");

    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let number = |field: &str| {
        json[field].as_f64().unwrap_or_else(|| panic!("{field} missing or not a number: {text}"))
    };
    assert!(number("writes_per_sec") > 0.0, "{text}");
    assert!(number("reads_per_sec") > 0.0, "{text}");
    assert!(number("fdatasyncs_per_sec") > 0.0, "{text}");
    assert!(number("entries_per_fdatasync") >= 1.0, "{text}");
    assert!(number("messages_per_frame") >= 1.0, "{text}");
    assert!(number("duration_secs") >= 1.9, "{text}");
    for field in ["drain_secs", "frames_per_sec", "writes", "reads", "write_errors", "read_errors"]
    {
        number(field);
    }
    for histogram in ["write_latency_us", "read_latency_us"] {
        for percentile in ["p50", "p99", "p999", "max"] {
            assert!(
                json[histogram][percentile].as_u64().is_some(),
                "{histogram}.{percentile}: {text}"
            );
        }
        let p50 = json[histogram]["p50"].as_u64().unwrap();
        let p999 = json[histogram]["p999"].as_u64().unwrap();
        assert!(0 < p50 && p50 <= p999, "{histogram}: {text}");
    }
    let backend = json["backend"].as_str().unwrap();
    assert!(["io_uring", "portable"].contains(&backend), "{text}");
    assert_eq!(json["nodes"], 3);
    assert_eq!(json["groups"], 4);
    assert_eq!(json["sync"], true);
    assert_eq!(json["consistency"], "linearizable");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    for args in [
        &["--read-ratio", "1.5"][..],
        &["--groups", "0"],
        &["--consistency", "eventual"],
        &["--backend", "spdk"],
        &["--duration", "soon"],
        &["--nodes", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"],
        &["--sync", "off", "--nodes", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"],
    ] {
        let output = load(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let output = load(&["--sync", "off", "--nodes", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("not supported with --nodes"));
}

#[test]
fn sync_off_runs_without_fdatasync_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.json");
    let args = ["--duration", "1", "--groups", "4", "--proposers", "32", "--sync", "off"];
    let output = load(&[&args[..], &["--json", path.to_str().unwrap()]].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["sync"], false, "{text}");
    assert!(json["writes_per_sec"].as_f64().unwrap() > 0.0, "{text}");
    // Group creation and the catalog still sync; the Raft log's rounds do not. Over a second
    // of writes, rounds vastly outnumber fdatasyncs.
    let entries = json["entries_per_fdatasync"].as_f64().unwrap();
    assert!(entries > 1_000.0, "{text}");
}
