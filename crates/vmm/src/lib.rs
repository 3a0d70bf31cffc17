//! Per-VM monitor.
