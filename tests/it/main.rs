//! Integration tests: the real `hotsync` binary on real trees.

mod bigfiles;
mod config;
mod consistency;
mod drill;
mod failover;
mod fanout;
mod faults;
mod fidelity;
mod helpers;
mod local;
mod monitoring;
mod remote;
mod safety;
mod scale;
mod verify;
mod watch;
