//! agentcast: a NATS-fronted WebSocket emitter for AI-agent event streams.
//!
//! Agent services publish JSON events to `agentcast.events.<user_id>`; a
//! JetStream stream stores them and republishes each, with its sequence, to
//! `agentcast.live.<user_id>`. Every node subscribes only to the users whose
//! sockets it holds and fans their events out to those sockets.
//!
//! Modules, one per concern:
//! - [`config`]: flags and environment, validated; bad values exit with 64.
//! - [`auth`]: JWT checks before the upgrade, one pinned algorithm.
//! - [`user`]: user ids and the single subject token each maps to.
//! - [`nats`]: the node's NATS connections (async-nats) and their events.
//! - [`live`]: the users' live subscriptions, on a connection of the node's own.
//! - [`stream`]: the JetStream stream: create and check it.
//! - [`history`]: reads of a user's stored events and of the stream's state.
//! - [`partition`]: which partition a user belongs to, as NATS's subject
//!   mapping computes it (groundwork for partitioned streams).
//! - [`resume`]: the continuity rule, positions, and the replay a resuming
//!   socket is sent.
//! - [`scan`]: one sequential read of the stream serving a storm of resumes.
//! - [`hub`]: per-user subscriptions, live gap repair, the audit of lost
//!   republishes, fan-out to socket queues.
//! - [`socket`]: one WebSocket: welcome, batched writes, pings, close codes.
//! - [`sse`]: the same loop over Server-Sent Events (`GET /sse`), with ids to
//!   resume from.
//! - [`protocol`]: frames and close codes (docs/protocol.md).
//! - [`control`]: control requests from a socket to the agents, and the
//!   agents' listener for them.
//! - [`server`]: HTTP routes, readiness, the drain.
//! - [`metrics`]: metric names and the Prometheus recorder.
//! - [`dev`]: `agentcast dev`, the zero-setup trial.
//! - [`client`]: a resuming Rust client of the socket protocol.
//! - [`publisher`]: the event envelope and JetStream publishing (docs/publishing.md).
//! - [`tools`]: `agentcast publish`, `tail`, `token` and `stream`.

pub mod auth;
pub mod client;
pub mod config;
pub mod console;
pub mod control;
pub mod dev;
pub mod history;
pub mod hub;
pub mod live;
pub mod merge;
pub mod metrics;
pub mod nats;
pub mod partition;
pub mod protocol;
pub mod publisher;
pub mod resume;
pub mod scan;
pub mod server;
pub mod socket;
pub mod sse;
pub mod stream;
pub mod tools;
pub mod user;
