//! The mailroot component: all the mail logic of the relay.
//!
//! The modules are plain Rust, free of bindings, so `cargo test` runs them
//! natively; `component` (built only for wasm) maps them onto the WIT worlds
//! of `wit/relay.wit`.
//!
//! Stages, named after Postfix's: [`message`] and [`envelope`] read a pickup
//! file, [`validate`] judges it, [`cleanup`] prepares it for the queue,
//! [`route`] orders the exchangers, [`smtp`] and [`client`] speak to them
//! ([`reactor`] keeps many sessions going at once in one call), [`relay`]
//! drives the messages through them, [`retry`] decides when to try again,
//! and [`bounce`] writes delivery status notifications.
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod address;
pub mod allocator;
pub mod bounce;
pub mod cleanup;
pub mod client;
pub mod date;
pub mod envelope;
pub mod message;
pub mod reactor;
pub mod relay;
pub mod retry;
pub mod route;
pub mod smtp;
pub mod validate;

#[cfg(target_family = "wasm")]
pub mod component;

/// The component's allocator (see [`allocator`]); native builds keep the
/// system's.
#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: allocator::SizeClasses = allocator::SizeClasses::new();
