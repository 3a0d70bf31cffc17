//! The VMM's REST API (in the style of Cloud Hypervisor's and Firecracker's): HTTP/1.1 with
//! JSON bodies on a Unix socket, under `/api/v1/`. The document `openapi.yaml` of the
//! `api-types` crate describes every route.
//!
//! - [`types`]: request and response bodies (serde), re-exported from `api-types`.
//! - [`Controller`]: what the server asks of the VMM; the VMM implements it.
//! - [`server`]: serves a [`Controller`] on a socket.
//! - [`client`]: calls the API (used by `rustvisor api`).
//! - [`fileurl`]: the `file://` URLs of `vm.snapshot`, `vm.restore` and `vm.backup`.

pub mod client;
pub mod fileurl;
pub mod server;
/// The wire types, from the `api-types` crate.
pub use api_types as types;

use types::{BackupStatus, BalloonInfo, Counters, PingInfo, VmConfig, VmInfo};

/// Why a request failed; the server maps each kind to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: a value is malformed or out of range. `field` names it (e.g. "memory",
    /// "disks\[1\].format"); `msg` says what is accepted.
    #[error("{field}: {msg}")]
    BadRequest {
        /// The offending field.
        field: String,
        /// What is wrong with it, and what is accepted.
        msg: String,
    },
    /// 409: the VM's current state forbids the action (e.g. resume a running VM).
    #[error("{action} is not allowed while the VM is {state}")]
    Conflict {
        /// The action refused ("resume", "snapshot", ...).
        action: String,
        /// The VM's current state ("Running", ...).
        state: String,
    },
    /// 409: the action needs a device the VM was not created with (e.g. `vm.balloon`
    /// without a balloon).
    #[error("{action}: the VM has no {device} device (add one with \"{field}\" at vm.create)")]
    NoDevice {
        /// The action refused ("vm.balloon").
        action: String,
        /// The device ("balloon").
        device: String,
        /// The `VmConfig` field that adds it ("balloon").
        field: String,
        /// The VM's current state ("Running", ...).
        state: String,
    },
    /// 404: no such object (e.g. `vm.info` before `vm.create`).
    #[error("{0}")]
    NotFound(String),
    /// 500: the VMM failed doing something valid (I/O error writing a snapshot, ...).
    #[error("{0}")]
    Internal(String),
}

/// The VMM behind the API. Every method returns quickly (long work such as booting runs on the
/// VMM's own threads) and never panics; the server calls them from its own threads.
pub trait Controller: Send + Sync + 'static {
    /// `GET /api/v1/vmm.ping`.
    fn ping(&self) -> PingInfo;
    /// `PUT /api/v1/vm.create`: validates and stores the configuration (state `Created`).
    fn create(&self, cfg: VmConfig) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.boot`: builds the VM and starts its vCPUs (`Created` → `Running`).
    fn boot(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.pause` (`Running` → `Paused`).
    fn pause(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.resume` (`Paused` → `Running`).
    fn resume(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.shutdown`: presses the guest's power button, waits a bounded time for
    /// it to power off, then stops the VM (→ `Shutdown`).
    fn shutdown(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.reboot`: resets the guest (→ `Running` again).
    fn reboot(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.delete`: stops the VM if needed and forgets it (→ no VM).
    fn delete(&self) -> Result<(), ApiError>;
    /// `GET /api/v1/vm.info`.
    fn info(&self) -> Result<VmInfo, ApiError>;
    /// `GET /api/v1/vm.counters`.
    fn counters(&self) -> Result<Counters, ApiError>;
    /// `PUT /api/v1/vm.balloon` `{"target_mib": N}`: asks the guest for a balloon of `N`
    /// MiB (0 to `memory_mib`); the VM must be `Running` or `Paused` and have a balloon.
    fn balloon_set(&self, target_mib: u64) -> Result<(), ApiError>;
    /// `GET /api/v1/vm.balloon`: the balloon's sizes and the guest's memory statistics.
    fn balloon_info(&self) -> Result<BalloonInfo, ApiError>;
    /// `PUT /api/v1/vm.snapshot` `{"destination_url": "file:///dir"}`: the VM must be
    /// `Paused`; `dir` is the path (created if absent; must be empty or absent).
    fn snapshot(&self, destination_dir: &str) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.restore` `{"source_url": "file:///dir"}`: into a VMM with no VM; the
    /// VM comes back `Paused`.
    fn restore(&self, source_dir: &str) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.backup` `{"destination_url": "file:///dir"}`: starts a point-in-time
    /// export of the `Running` or `Paused` VM's writable disks into `dir` (created if absent;
    /// must be empty), the background copy reading at most `rate_limit_mib_s` MiB/s (`None`
    /// or 0: unlimited); returns once the jobs started, with the guest's pause.
    fn backup(&self, destination_dir: &str, rate_limit_mib_s: Option<u64>) -> Result<BackupStatus, ApiError>;
    /// `GET /api/v1/vm.backup`: the latest backup's progress (404 when none was started).
    fn backup_status(&self) -> Result<BackupStatus, ApiError>;
    /// `DELETE /api/v1/vm.backup`: cancels the running backup's jobs (404 when none was
    /// started; a finished backup is left as it is).
    fn backup_cancel(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vmm.shutdown`: stops the VM (if any) and then the VMM process.
    fn vmm_shutdown(&self);
}
