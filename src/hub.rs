//! Per-user interest and fan-out.
//!
//! The hub holds one entry per user with at least one socket on this node.
//! The first socket of a user subscribes to the user's live subject; the last
//! one to leave unsubscribes, so a node's NATS interest is exactly the users
//! it serves. One task per user drains that subscription, builds each event
//! frame once, and hands a reference-counted copy to every socket's bounded
//! queue with `try_send`: a socket whose queue is full is closed as slow
//! ([`crate::protocol::close::SLOW`]) and nobody else waits for it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::{Client, HeaderMap, Message, Subscriber};
use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use tokio::sync::{OnceCell, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::StreamSettings;
use crate::metrics as m;
use crate::protocol::event_frame;
use crate::stream::{self, StreamError};
use crate::user::UserId;

/// Distinct publisher subjects remembered for "log once per subject" of bad
/// payloads. Past this, further subjects are still counted in the metric but
/// logged only once more, as a group, so a flood cannot grow memory.
pub const MAX_LOGGED_BAD_SUBJECTS: usize = 10_000;

/// One event, ready to write: the stream sequence and the frame text shared
/// by every socket of the user.
#[derive(Debug, Clone)]
pub struct EventFrame {
    pub seq: u64,
    pub text: Utf8Bytes,
}

/// Why the hub or the server asks a socket to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kick {
    /// Its queue overflowed.
    Slow = 1,
    /// The node is draining.
    Drain = 2,
    /// The user's subscription ended unexpectedly.
    Error = 3,
}

/// A socket's close request: the first reason set wins.
#[derive(Debug, Default)]
pub struct Kicker {
    token: CancellationToken,
    reason: AtomicU8,
}

impl Kicker {
    pub fn kick(&self, why: Kick) {
        if self
            .reason
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.token.cancel();
        }
    }

    pub async fn kicked(&self) -> Kick {
        self.token.cancelled().await;
        match self.reason.load(Ordering::Acquire) {
            1 => Kick::Slow,
            2 => Kick::Drain,
            _ => Kick::Error,
        }
    }
}

struct SocketTx {
    id: u64,
    tx: mpsc::Sender<EventFrame>,
    kicker: Arc<Kicker>,
}

struct UserEntry {
    user: UserId,
    sockets: Mutex<Vec<SocketTx>>,
    /// Set once the live subscription exists; later sockets wait on it so
    /// none reads its position before the node's interest is registered.
    subscribed: OnceCell<()>,
    stop: CancellationToken,
}

pub struct Hub {
    client: Client,
    settings: StreamSettings,
    stream: async_nats::jetstream::stream::Stream<()>,
    users: Mutex<HashMap<UserId, Arc<UserEntry>>>,
    bad_subjects: Mutex<HashSet<String>>,
}

/// A socket's place in the hub; leaving happens on drop.
pub struct Membership {
    hub: Arc<Hub>,
    user: UserId,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves consistent data
    // (every critical section is a single push, retain or lookup).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    pub fn new(client: Client, settings: StreamSettings) -> Arc<Self> {
        let js = async_nats::jetstream::new(client.clone());
        // A handle without a round trip; the name was validated with the config.
        let stream = futures_util::FutureExt::now_or_never(js.get_stream_no_info(&settings.name))
            .expect("get_stream_no_info does not wait")
            .expect("stream name validated by config");
        Arc::new(Self {
            client,
            settings,
            stream,
            users: Mutex::default(),
            bad_subjects: Mutex::default(),
        })
    }

    /// Adds a socket for `user`, subscribing to the user's live subject if it
    /// is the first. Returns once the subscription is registered with NATS
    /// (commands on one connection are processed in order, so a later
    /// request on this client is answered after the SUB took effect).
    pub async fn join(
        self: &Arc<Self>,
        user: &UserId,
        id: u64,
        tx: mpsc::Sender<EventFrame>,
        kicker: Arc<Kicker>,
    ) -> Result<Membership, async_nats::SubscribeError> {
        let entry = {
            let mut users = lock(&self.users);
            let entry = users
                .entry(user.clone())
                .or_insert_with(|| {
                    Arc::new(UserEntry {
                        user: user.clone(),
                        sockets: Mutex::default(),
                        subscribed: OnceCell::new(),
                        stop: CancellationToken::new(),
                    })
                })
                .clone();
            lock(&entry.sockets).push(SocketTx { id, tx, kicker });
            entry
        };
        let membership = Membership {
            hub: self.clone(),
            user: user.clone(),
            id,
        };
        entry
            .subscribed
            .get_or_try_init(|| async {
                let sub = self.client.subscribe(self.settings.live_subject(user.as_str())).await?;
                metrics::gauge!(m::USERS_SUBSCRIBED).increment(1.0);
                tokio::spawn(self.clone().run_user(entry.clone(), sub));
                Ok::<_, async_nats::SubscribeError>(())
            })
            .await?;
        Ok(membership)
    }

    fn leave(&self, user: &UserId, id: u64) {
        let mut users = lock(&self.users);
        let Some(entry) = users.get(user) else { return };
        let mut sockets = lock(&entry.sockets);
        sockets.retain(|s| s.id != id);
        if sockets.is_empty() {
            drop(sockets);
            entry.stop.cancel();
            users.remove(user);
        }
    }

    /// The sequence of the user's newest stored event, 0 when there is none.
    pub async fn position(&self, user: &UserId) -> Result<u64, StreamError> {
        stream::position(&self.stream, &self.settings.event_subject(user.as_str())).await
    }

    /// Every socket's kicker, for the drain.
    pub fn kickers(&self) -> Vec<Arc<Kicker>> {
        let users = lock(&self.users);
        users
            .values()
            .flat_map(|e| lock(&e.sockets).iter().map(|s| s.kicker.clone()).collect::<Vec<_>>())
            .collect()
    }

    /// Number of users with a live subscription on this node.
    pub fn users(&self) -> usize {
        lock(&self.users).len()
    }

    async fn run_user(self: Arc<Self>, entry: Arc<UserEntry>, mut sub: Subscriber) {
        loop {
            tokio::select! {
                biased;
                _ = entry.stop.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => self.deliver(&entry, msg),
                    None => {
                        // The client closed: these sockets would get nothing more.
                        tracing::error!(user = %entry.user, "live subscription ended; closing the user's sockets");
                        for s in lock(&entry.sockets).iter() {
                            s.kicker.kick(Kick::Error);
                        }
                        break;
                    }
                },
            }
        }
        if let Err(e) = sub.unsubscribe().await {
            tracing::debug!(error = %e, "unsubscribe after the last socket left");
        }
        metrics::gauge!(m::USERS_SUBSCRIBED).decrement(1.0);
    }

    fn deliver(&self, entry: &UserEntry, msg: Message) {
        metrics::counter!(m::EVENTS_RECEIVED).increment(1);
        let headers = msg.headers.as_ref();
        let Some(seq) = header_u64(headers, "Nats-Sequence") else {
            // Not a republished stream message: someone published to the
            // live subject directly. It has no place in the user's history.
            metrics::counter!(m::EVENTS_REJECTED, "reason" => "no_sequence").increment(1);
            self.log_bad_once(
                msg.subject.as_str(),
                "message on a live subject without Nats-Sequence (publish to the event subject instead)",
            );
            return;
        };
        let frame = match event_frame(seq, &msg.payload) {
            Ok(text) => EventFrame { seq, text },
            Err(e) => {
                metrics::counter!(m::EVENTS_REJECTED, "reason" => e.reason()).increment(1);
                let subject = headers
                    .and_then(|h| h.get("Nats-Subject"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_else(|| msg.subject.to_string());
                self.log_bad_once(
                    &subject,
                    &format!(
                        "event payload is not a JSON object ({}), not forwarded; seq {seq}",
                        e.reason()
                    ),
                );
                return;
            }
        };
        for s in lock(&entry.sockets).iter() {
            match s.tx.try_send(frame.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => s.kicker.kick(Kick::Slow),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    fn log_bad_once(&self, subject: &str, what: &str) {
        let mut seen = lock(&self.bad_subjects);
        if seen.contains(subject) {
            return;
        }
        if seen.len() < MAX_LOGGED_BAD_SUBJECTS {
            seen.insert(subject.to_owned());
            tracing::warn!(subject, "{what} (logged once per subject)");
        } else if seen.len() == MAX_LOGGED_BAD_SUBJECTS {
            seen.insert(String::new());
            tracing::warn!(
                "bad payloads from more than {MAX_LOGGED_BAD_SUBJECTS} subjects; further subjects are only counted"
            );
        }
    }
}

fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}
