//! Operator tools for Flotilla, behind the `flotilla-ctl` binary; the crate also builds
//! `flotilla-load`, the main job (a three-node cluster on loopback under load, see its `--help`).
//!
//! `flotilla-ctl wal dump|verify|stat <dir>` read a WAL directory (a shard's
//! `data_dir/shard-N/wal`) without opening the log: read-only files, no lock, nothing written —
//! safe on a copy of a live node's directory or on the live directory itself. They are built on
//! the WAL's public codec (`flotilla_wal::segment`, `flotilla_wal::record`) and apply the recovery
//! rule of `wal/FORMAT.md` to tell a torn unsynced tail from damage to synced data.

pub mod wal;
