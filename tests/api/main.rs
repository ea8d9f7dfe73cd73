//! Integration tests: HTTP against a real server, real MariaDB and Redis processes.

mod helpers;

mod admin;
#[cfg(feature = "failpoints")]
mod after_commit;
mod archive;
mod authorization;
mod auto_complete;
mod bad_input;
mod bench;
mod cache;
mod cancellation;
mod cart;
mod catalog;
mod chaos;
mod cli;
mod cluster;
mod events;
mod exactly_once;
mod flash;
mod fuzz;
mod identity;
mod keep_alive;
mod lifecycle;
mod limits;
mod merchant;
mod metrics;
mod migrations;
mod no_lost_update;
mod no_oversell;
mod openapi;
mod payments;
mod problems;
mod read_your_writes;
mod round_trips;
mod routing;
mod search;
mod shutdown;
mod stalled_commit;
mod tls;
mod unavailable;
mod worker_ids;
