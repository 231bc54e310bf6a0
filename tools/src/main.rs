//! `flotilla-ctl`: operator commands for Flotilla. `flotilla-ctl wal dump|verify|stat <dir>`
//! inspect a WAL directory read-only (see the crate docs of `flotilla_tools`).

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flotilla_tools::wal::{self, DumpOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Operator commands for Flotilla.
#[derive(Debug, Parser)]
#[command(name = "flotilla-ctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect a write-ahead log directory (e.g. `data_dir/shard-0/wal`). Read-only: files are
    /// opened read-only, no lock is taken, nothing is written; safe on a live node's directory.
    #[command(subcommand)]
    Wal(WalCommand),
}

#[derive(Debug, Subcommand)]
enum WalCommand {
    /// Print every record in log order with its items (entries, hard states, truncations,
    /// compactions, group removals).
    Dump {
        /// The WAL directory.
        dir: PathBuf,
        /// Only items of this group.
        #[arg(long, value_name = "G")]
        group: Option<u64>,
        /// Only entries with index >= I.
        #[arg(long, value_name = "I")]
        from: Option<u64>,
        /// Only entries with index <= J.
        #[arg(long, value_name = "J")]
        to: Option<u64>,
        /// Also print each entry's payload (escaped text, non-printable bytes as \xNN).
        #[arg(long)]
        payloads: bool,
    },
    /// Check every segment header, every record's checksums and structure and the chain of
    /// rounds. Exit code 0: clean (a torn unsynced tail is reported but is not damage);
    /// 1: damage to synced data (each problem printed with its segment file and offset).
    Verify {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// Segments (sizes, live/prepared/spare), groups (entries, index ranges, compaction points),
    /// bytes, and the groups pinning the oldest segment.
    Stat {
        /// The WAL directory.
        dir: PathBuf,
    },
}

fn run(cli: Cli) -> io::Result<ExitCode> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut err = io::stderr().lock();
    let code = match cli.command {
        Command::Wal(WalCommand::Dump { dir, group, from, to, payloads }) => {
            let options = DumpOptions { group, from, to, payloads };
            wal::dump(&dir, &options, &mut out, &mut err)?;
            ExitCode::SUCCESS
        }
        Command::Wal(WalCommand::Verify { dir }) => {
            let scan = wal::verify(&dir, &mut out)?;
            if scan.damaged() { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
        Command::Wal(WalCommand::Stat { dir }) => {
            wal::stat(&dir, &mut out, &mut err)?;
            ExitCode::SUCCESS
        }
    };
    out.flush()?;
    Ok(code)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        // `flotilla-ctl wal dump … | head`: the reader went away; not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla-ctl: {e}");
            ExitCode::from(2)
        }
    }
}
