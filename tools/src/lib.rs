//! Operator tools for Flotilla, behind three binaries:
//!
//! - `flotilla-ctl wal dump|verify|stat <dir>` read a WAL directory (a shard's
//!   `data_dir/shard-N/wal`) without opening the log: read-only files, no lock, nothing written —
//!   safe on a copy of a live node's directory or on the live directory itself. They are built on
//!   the WAL's public codec (`flotilla_wal::segment`, `flotilla_wal::record`) and apply the
//!   recovery rule of `wal/FORMAT.md` to tell a torn unsynced tail from damage to synced data
//!   ([`wal`]).
//! - `flotilla-node`: one node process embedding the engine, serving the client protocol
//!   ([`node`] is its server side, [`client`] the client and the codec both share).
//! - `flotilla-load`: the main job, a mixed workload against a three-node cluster — in this
//!   process on loopback, or against running `flotilla-node`s with `--nodes` (see its `--help`).

pub mod client;
pub mod node;
pub mod wal;
