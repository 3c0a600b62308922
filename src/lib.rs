//! entitlement-worker keeps an event platform's entitlements right.
//!
//! # Layout
//!
//! - [`domain`]: the contract's rules as a pure core, no I/O.
//! - [`codec`]: bytes from Kafka to typed commands, and output messages to JSON.
//! - [`store`]: PostgreSQL, the one source of truth: state, ledger, outbox, offsets.
//! - [`pipeline`]: consumer -> decode -> batch -> apply, and the clock.
//! - [`kafka`]: the consumer with offsets from PostgreSQL, the outbox relay, topics.
//! - [`telemetry`]: metrics, health and logs.
//! - [`settings`]: typed configuration.
//! - [`demo`]: an embedded broker and a story to watch.
//! - [`ops`]: the operators' commands (report, history, export, verify, grant, revoke,
//!   transfer, define-product).

pub mod codec;
pub mod demo;
pub mod domain;
pub mod kafka;
pub mod ops;
pub mod pipeline;
pub mod settings;
pub mod store;
pub mod telemetry;
