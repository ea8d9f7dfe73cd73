//! Background jobs: each one a step function (callable one step at a time, as tests do) and
//! a loop that runs it on its cadence until the shutdown token fires. [`crate::app`] spawns
//! the loops from here; the use-case logic of a step stays with its service, the job owns
//! its loop, its cadence, and its metrics and logs.
//!
//! # Layout
//! - [`sweeper`]: settles stale claims and finishes releases; its loop also runs the next
//!   two steps, in this order, on the same interval (one task for the three, as always).
//! - [`closer`]: closes unpaid orders past their payment deadline.
//! - [`completer`]: completes orders shipped longer ago than `orders.auto_complete_days`.
//! - [`cart_flusher`]: writes dirty carts from Redis back to the database.
//! - [`gate_rebuild`]: rebuilds the flash-sale gates in Redis from the database.
//! - [`archiver`]: moves old final orders from the shards into the archive.
//! - [`lease_keeper`]: renews this process's worker-id lease, releases it at shutdown.
//!
//! Invariant: every loop stops at its token between steps, never inside a write (writes run
//! on the write tracker `serve` waits for, see [`crate::service::orders::OrderService`]).

pub mod archiver;
pub mod cart_flusher;
pub mod closer;
pub mod completer;
pub mod gate_rebuild;
pub mod lease_keeper;
pub mod sweeper;
