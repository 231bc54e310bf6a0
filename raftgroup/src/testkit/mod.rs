//! Test support shared by this crate's simulator and the engine's: a linearizability checker.
