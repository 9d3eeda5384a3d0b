//! mailroot's reference host: a pickup-folder mail relay whose mail logic is a
//! WebAssembly component (`guest/`, contract in `wit/relay.wit`).
//!
//! The host only supplies capabilities to the component (the mailroot
//! folders, DNS, SMTP sockets, a clock, a log), each implemented in its own
//! module, and owns scheduling, the durable queue and the command line:
//!
//! - [`pickup`]: claim files from Pickup and have the component accept them;
//! - [`qmgr`]: the active queue, and the batches it hands to delivery;
//! - [`delivery`]: one delivery attempt per due message, and its bookkeeping;
//! - [`queue`] and [`badmail`]: the on-disk state;
//! - [`relay`]: the pipeline of workers around those stages;
//! - [`runtime`]: wasmtime, limits, and the call into the component;
//! - [`plugin`]: load the `plugin` world with nothing but WASI, as other mail
//!   servers would.
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod badmail;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod logging;
pub mod mailroot;
pub mod pickup;
pub mod plugin;
pub mod qmgr;
pub mod queue;
pub mod relay;
pub mod runtime;
pub mod settings;
pub mod sockets;

pub use relay::{PLUGIN_COMPONENT, PassReport, RELAY_COMPONENT, Relay, StartError};
pub use settings::Settings;
