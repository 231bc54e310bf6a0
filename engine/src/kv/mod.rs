//! The built-in ordered key-value state machine (work in progress).
