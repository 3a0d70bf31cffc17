//! virtio 1.2 devices for rustvisor and their transport.
//!
//! - [`device`]: the [`VirtioDevice`] contract between a device model and its transport.
//! - [`pci`]: the modern virtio-pci transport (virtio 1.2 §4.1) with MSI-X.
//! - [`queue`]: serving a split virtqueue with `virtio-queue`, and the one descriptor-chain
//!   abstraction ([`queue::Chain`], [`queue::ChainError`]) every device shares.
//! - [`worker`]: the per-device epoll thread.
//! - Devices: [`block`] (with `crates/block` for raw and qcow2 images), [`net`] (on a
//!   [`tap`]), [`vsock`] (host side on Unix sockets), [`rng`], [`console`] and [`balloon`].
//!
//! Every device treats the guest as hostile: malformed descriptor chains, addresses outside
//! guest memory and out-of-range lengths fail that request (or set `DEVICE_NEEDS_RESET`);
//! they never panic or hang the VMM.

#![deny(missing_docs, clippy::undocumented_unsafe_blocks)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::cast_possible_truncation)]
// Unit tests may index and unwrap their own fixtures.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing))]

pub mod balloon;
pub mod block;
pub mod console;
pub mod device;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod stats;
pub mod tap;
#[cfg(test)]
mod testing;
pub mod vsock;
pub mod worker;

pub use device::{ActivateContext, ActivateError, Counters, DmaLog, GuestMem, Interrupt, VirtioDevice};
pub use stats::DeviceStats;

/// Device IDs (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
/// Block device.
pub const TYPE_BLOCK: u32 = 2;
/// Console.
pub const TYPE_CONSOLE: u32 = 3;
/// Entropy source.
pub const TYPE_RNG: u32 = 4;
/// Memory balloon.
pub const TYPE_BALLOON: u32 = 5;
/// Socket device.
pub const TYPE_VSOCK: u32 = 19;

/// `VIRTIO_F_VERSION_1` (virtio 1.2 §6): a modern (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC` (§2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX` (§2.7.7).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Ring features every rustvisor device offers (virtio-queue implements both).
pub const RING_FEATURES: u64 = VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;
