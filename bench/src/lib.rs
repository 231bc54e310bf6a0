//! Shared helpers for Flotilla's benchmarks (references such as the raw disk limit).
