//! Operations: what an operator sees and is told (the status socket, Prometheus metrics,
//! alerts and their hook, health checks) and the configuration file. The engines above
//! report into it; it imports only the layers below.

pub mod alert;
pub mod config;
pub mod control;
pub mod health;
pub mod metrics;
