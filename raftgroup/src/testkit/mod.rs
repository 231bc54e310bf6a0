//! Test support shared by this crate's simulator and the engine's: a linearizability checker, a
//! seeded random generator and a simulated network.
//!
//! Record what clients asked and saw in a [`History`], then check it against a sequential
//! [`Model`] ([`check`], or [`check_kv`] / [`check_partitioned`] key by key). A request that failed
//! or timed out is simply never completed: it counts as maybe applied. [`SimRng`] and [`Network`]
//! are the seeded randomness and the faulty network of `tests/sim.rs`, the cluster simulator.
//!
//! ```
//! use flotilla_raftgroup::testkit::{check_kv, CheckOptions, History, KvInput, KvOutput};
//!
//! let mut history = History::new();
//! // Client 1 writes x = 1 between ticks 0 and 10.
//! let put = history.invoke(1, KvInput::Put { key: "x", value: 1 }, 0);
//! history.complete(put, KvOutput::Put, 10);
//! // Client 2 then reads x and sees nothing: a stale read.
//! let get = history.invoke(2, KvInput::Get { key: "x" }, 20);
//! history.complete(get, KvOutput::Get(None), 30);
//!
//! let verdict = check_kv(history.operations(), &CheckOptions::default());
//! let violation = verdict.violation().expect("a stale read is not linearizable");
//! assert_eq!(violation.stuck, get);
//! println!("{violation}");
//! ```

mod lincheck;
mod model;
mod net;
mod rng;

pub use lincheck::{
    CheckOptions, Exhausted, History, OpId, Operation, Outcome, Verdict, Violation, check,
    check_kv, check_partitioned,
};
pub use model::{KvInput, KvModel, KvOutput, Model};
pub use net::{Envelope, NetConfig, NetStats, Network};
pub use rng::SimRng;

#[cfg(test)]
mod lincheck_tests;
