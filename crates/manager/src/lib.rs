//! The host manager: `rustvisor daemon` and its thin clients `rustvisor vm` and
//! `rustvisor events` (the layer libvirt or Proxmox's `qm` are on other hypervisors).
//!
//! The daemon keeps VM definitions, their runtime and an event and audit log in SQLite
//! ([`store`]), runs one VMM process per VM (`rustvisor vmm --api-socket PATH`, driven over
//! the VMM's REST API) and watches them ([`supervisor`], [`service`]), and serves its own
//! REST API on a Unix socket ([`server`], wire types in [`types`], described by
//! `openapi.yaml` beside this crate). [`cli`] holds the command lines; [`metrics`] reads what
//! `GET /metrics` reports from `/proc`.
//!
//! Data flows one way: CLI → daemon API → [`service::Service`] operation (one at a time per
//! VM) → side effect on a VMM → store transaction with its event → answer.

pub mod cli;
pub mod daemon;
pub mod metrics;
pub mod resources;
pub mod server;
pub mod service;
pub mod store;
pub mod supervisor;
pub mod types;
