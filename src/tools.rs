//! The command-line tools: `agentcast publish`, `tail`, `token` and `stream`.
//!
//! Each returns a process exit code. Anything the user got wrong (a flag, a
//! user id, an input line) prints one line `agentcast: …` and exits with
//! [`EXIT_CONFIG`] (64); a failure at run time (NATS unreachable, no stream,
//! a publish not acknowledged, a refused socket) prints one line and exits
//! with [`EXIT_RUNTIME`] (1). anyhow is used here, at the edge, only.

use std::io::{BufRead, Write};
use std::time::Duration;

use clap::Args;
use serde_json::json;

use crate::auth::{MIN_SECRET_LEN, mint_hs256};
use crate::client::{Client, Delivery};
use crate::config::{EXIT_CONFIG, NatsArgs};
use crate::history::History;
use crate::publisher::{Event, PublishError, Publisher, check_msg_id};
use crate::user::UserId;

/// Exit code for failures at run time.
pub const EXIT_RUNTIME: i32 = 1;

/// Time allowed to connect to NATS before the tool gives up.
pub const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest lifetime `agentcast token` mints: dev tokens are for trying
/// things; a long-lived token is a credential nobody remembers to revoke.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// Lifetime of the tokens `agentcast tail` mints from --user and
/// --jwt-secret. A fresh one is minted for every connection, so a tail that
/// runs for days never presents an expired token.
pub const TAIL_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Lines of JSON read ahead from stdin, and the most published as one
/// pipelined batch: bounds the memory `agentcast publish` holds for a long
/// input. A batch is what is already waiting, so input that trickles in is
/// published as it comes. Output (one line per event) follows each batch.
pub const STDIN_BATCH_LINES: usize = 1024;

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The user whose stream receives the events.
    #[arg(long)]
    pub user: String,
    /// Event type of one event; without it, JSON envelopes are read from stdin, one per line.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// The event's `data`, a JSON object.
    #[arg(long, requires = "kind")]
    pub data: Option<String>,
    #[arg(long, requires = "kind")]
    pub run_id: Option<String>,
    #[arg(long, requires = "kind")]
    pub thread_id: Option<String>,
    #[arg(long, requires = "kind")]
    pub agent: Option<String>,
    /// Nats-Msg-Id of the event (default: random); publishing again with it stores it once.
    #[arg(long, requires = "kind")]
    pub msg_id: Option<String>,
    #[arg(long, env = "AGENTCAST_SUBJECT_PREFIX", default_value = crate::publisher::DEFAULT_SUBJECT_PREFIX)]
    pub subject_prefix: String,
    /// Largest event in bytes (the node's --max-event-bytes).
    #[arg(long, env = "AGENTCAST_MAX_EVENT_BYTES", default_value_t = crate::publisher::DEFAULT_MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Node WebSocket URL (ws://host:port/ws); repeat for several nodes, tried in turn.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Token to connect with.
    #[arg(long, env = "AGENTCAST_TOKEN", hide_env_values = true, conflicts_with_all = ["user", "jwt_secret"])]
    pub token: Option<String>,
    /// Mint a token for this user (with --jwt-secret) instead of --token.
    #[arg(long, requires = "jwt_secret")]
    pub user: Option<String>,
    /// HS256 secret to mint the token with.
    #[arg(long, env = "AGENTCAST_JWT_SECRET", hide_env_values = true, requires = "user")]
    pub jwt_secret: Option<String>,
    /// Resume after this seq instead of starting live (at most 2^53-1, as
    /// the node accepts). To show an agent's run from its start: the seq of
    /// its first event (`agent_started`) minus 1; its streamed text comes
    /// merged (docs/protocol.md, "Joining a run in progress").
    #[arg(long, value_parser = clap::value_parser!(u64).range(..=crate::protocol::MAX_SEQ))]
    pub from_seq: Option<u64>,
    /// The stream epoch --from-seq belongs to (from a welcome).
    #[arg(long, requires = "from_seq")]
    pub epoch: Option<String>,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The token's `sub`.
    #[arg(long)]
    pub user: String,
    /// HS256 secret (the node's --jwt-secret).
    #[arg(long, env = "AGENTCAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub lifetime: Duration,
}

#[derive(Debug, Args)]
pub struct StreamArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// JetStream stream name.
    #[arg(long, env = "AGENTCAST_STREAM", default_value = "AGENTCAST")]
    pub stream: String,
    #[arg(long, env = "AGENTCAST_SUBJECT_PREFIX", default_value = crate::publisher::DEFAULT_SUBJECT_PREFIX)]
    pub subject_prefix: String,
    /// Streams the users are spread over (the nodes' --stream-partitions):
    /// with more than one, each partition's stream is shown, and the user's.
    #[arg(long, env = "AGENTCAST_STREAM_PARTITIONS", default_value_t = 1)]
    pub stream_partitions: u32,
    /// Also show this user's position: event count, first and last seq.
    #[arg(long)]
    pub user: Option<String>,
    /// Seal the stream(s) first: they store nothing more, for good (the
    /// first step of changing the number of partitions, docs/operations.md).
    #[arg(long)]
    pub seal: bool,
}

/// A failure with its exit code; printed as one line.
struct Failure(i32, anyhow::Error);

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure(EXIT_CONFIG, e.into())
}

fn runtime(e: impl Into<anyhow::Error>) -> Failure {
    Failure(EXIT_RUNTIME, e.into())
}

fn finish(r: Result<(), Failure>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(Failure(code, e)) => {
            // `{:#}` joins the context chain on one line.
            eprintln!("agentcast: {e:#}");
            code
        }
    }
}

/// Input errors are the caller's to fix; the rest may pass on a retry.
fn publish_exit_code(e: &PublishError) -> i32 {
    match e {
        PublishError::UserId(_)
        | PublishError::TooLarge { .. }
        | PublishError::EventType(_)
        | PublishError::Envelope(_)
        | PublishError::MsgId(_) => EXIT_CONFIG,
        _ => EXIT_RUNTIME,
    }
}

fn publish_failure(e: PublishError) -> Failure {
    Failure(publish_exit_code(&e), e.into())
}

async fn connect(a: &NatsArgs) -> Result<async_nats::Client, Failure> {
    let login = a.login().map_err(usage)?;
    let shown = &login.shown;
    let opts = async_nats::ConnectOptions::new().name("agentcast-cli").connection_timeout(NATS_CONNECT_TIMEOUT);
    let opts = crate::nats::with_login(opts, &login).await.map_err(usage)?;
    match tokio::time::timeout(NATS_CONNECT_TIMEOUT * 2, opts.connect(login.urls)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(runtime(anyhow::anyhow!("cannot connect to NATS at {shown}: {e}"))),
        Err(_) => Err(runtime(anyhow::anyhow!("cannot connect to NATS at {shown}: timed out"))),
    }
}

fn parse_user(flag: &str, user: &str) -> Result<UserId, Failure> {
    UserId::parse(user).map_err(|e| usage(anyhow::anyhow!("{flag} {user:?}: {e}")))
}

/// `agentcast publish`: one event from flags, or JSON lines from stdin. Prints
/// `{"seq":…,"duplicate":…,"msg_id":…}` per stored event.
pub async fn publish(args: PublishArgs) -> i32 {
    finish(publish_inner(args).await)
}

async fn publish_inner(a: PublishArgs) -> Result<(), Failure> {
    let user = parse_user("--user", &a.user)?;
    let single = match &a.kind {
        Some(kind) => Some(one_event(kind, &a)?),
        None => None,
    };
    let client = connect(&a.nats).await?;
    let publisher = Publisher::new(client).subject_prefix(&a.subject_prefix).max_event_bytes(a.max_event_bytes);
    if let Some(event) = single {
        let p = publisher.publish(user.as_str(), &event).await.map_err(publish_failure)?;
        print_published(&p);
        return Ok(());
    }
    // A thread reads stdin (blocking) into a bounded queue; each batch is
    // whatever lines are already waiting, so a slow trickle of input is
    // published line by line and a large input in batches.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(STDIN_BATCH_LINES);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    let mut line_no = 0usize;
    let mut total = 0usize;
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(line) = next.take() {
            line_no += 1;
            let line = line.map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => usage(anyhow::anyhow!("stdin line {line_no}: not UTF-8")),
                _ => runtime(anyhow::anyhow!("reading stdin: {e}")),
            })?;
            if !line.trim().is_empty() {
                let event = Event::from_json(&line)
                    .map_err(|e| usage(anyhow::anyhow!("stdin line {line_no}: {e}{}", published_before(total))))?;
                batch.push(event);
            }
            if batch.len() < STDIN_BATCH_LINES {
                next = rx.try_recv().ok();
            }
        }
        // Every stored event is printed, also those in flight behind a
        // failed one; the first failure ends the command.
        let mut failure = None;
        for result in publisher.publish_batch(user.as_str(), &batch).await {
            match result {
                Ok(p) => {
                    print_published(&p);
                    total += 1;
                }
                Err(PublishError::NotSent) => {}
                Err(e) => {
                    failure.get_or_insert((e, total));
                }
            }
        }
        if let Some((e, before)) = failure {
            return Err(Failure(publish_exit_code(&e), anyhow::anyhow!("{e}{}", published_before(before))));
        }
    }
    Ok(())
}

fn published_before(total: usize) -> String {
    if total == 0 { String::new() } else { format!(" ({total} events before it were published)") }
}

fn one_event(kind: &str, a: &PublishArgs) -> Result<Event, Failure> {
    let data = match &a.data {
        Some(d) => {
            let v: serde_json::Value =
                serde_json::from_str(d).map_err(|e| usage(anyhow::anyhow!("--data is not JSON: {e}")))?;
            if !v.is_object() {
                return Err(usage(anyhow::anyhow!("--data must be a JSON object")));
            }
            v
        }
        None => json!({}),
    };
    let mut event = Event::new(kind, data).map_err(usage)?;
    event.run_id = a.run_id.clone();
    if let Some(t) = &a.thread_id {
        event = event.thread(t);
    }
    if let Some(g) = &a.agent {
        event = event.agent(g);
    }
    if let Some(id) = &a.msg_id {
        check_msg_id(id).map_err(|e| usage(anyhow::anyhow!("--msg-id: {e}")))?;
        event = event.id(id);
    }
    Ok(event)
}

fn print_published(p: &crate::publisher::Published) {
    println!("{}", json!({"seq": p.seq, "duplicate": p.duplicate, "msg_id": p.msg_id}));
}

/// `agentcast token`: prints an HS256 token for a user.
pub fn token(a: TokenArgs) -> i32 {
    finish((|| {
        let user = parse_user("--user", &a.user)?;
        if a.jwt_secret.len() < MIN_SECRET_LEN {
            return Err(usage(anyhow::anyhow!(
                "--jwt-secret is {} bytes; at least {MIN_SECRET_LEN} are required for HS256",
                a.jwt_secret.len()
            )));
        }
        if a.lifetime < Duration::from_secs(1) || a.lifetime > MAX_TOKEN_LIFETIME {
            return Err(usage(anyhow::anyhow!(
                "--lifetime must be between 1s and {}",
                humantime::format_duration(MAX_TOKEN_LIFETIME)
            )));
        }
        let t = mint_hs256(a.jwt_secret.as_bytes(), user.as_str(), a.lifetime).map_err(runtime)?;
        println!("{t}");
        Ok(())
    })())
}

/// `agentcast tail`: prints a user's events as JSON lines, resuming across
/// reconnects; gaps are printed too, the welcome goes to stderr.
pub async fn tail(a: TailArgs) -> i32 {
    finish(tail_inner(a).await)
}

async fn tail_inner(a: TailArgs) -> Result<(), Failure> {
    for u in &a.urls {
        if !(u.starts_with("ws://") || u.starts_with("wss://")) {
            return Err(usage(anyhow::anyhow!("--url {u:?} must start with ws:// or wss://")));
        }
    }
    let token: Box<dyn Fn() -> String + Send + Sync> = match (&a.token, &a.user, &a.jwt_secret) {
        (Some(t), _, _) => {
            let t = t.clone();
            Box::new(move || t.clone())
        }
        (None, Some(user), Some(secret)) => {
            let user = parse_user("--user", user)?;
            if secret.len() < MIN_SECRET_LEN {
                return Err(usage(anyhow::anyhow!("--jwt-secret must be at least {MIN_SECRET_LEN} bytes")));
            }
            let secret = secret.clone();
            Box::new(move || mint_hs256(secret.as_bytes(), user.as_str(), TAIL_TOKEN_LIFETIME).unwrap_or_default())
        }
        _ => return Err(usage(anyhow::anyhow!("give --token, or --user with --jwt-secret"))),
    };
    let mut client = Client::new(a.urls.clone(), token);
    if let Some(seq) = a.from_seq {
        client = client.resume_from(seq, a.epoch.clone());
    }
    let mut events = 0u64;
    let mut out = std::io::stdout();
    while a.count.is_none_or(|c| events < c) {
        let resuming = client.last_seq();
        let d = client.next().await.map_err(runtime)?;
        match d {
            Delivery::Welcome { node, position, epoch } => {
                let from = resuming.map_or_else(|| "live".to_owned(), |s| format!("resuming after seq {s}"));
                eprintln!("agentcast tail: connected to {node} (user position {position}, epoch {epoch}), {from}");
            }
            // A merged frame of streamed text says so, as the node sent it.
            Delivery::Event { seq, first_seq, merged, event } => {
                events += 1;
                if merged > 1 {
                    let _ = writeln!(
                        out,
                        "{{\"seq\":{seq},\"first_seq\":{first_seq},\"merged\":{merged},\"event\":{event}}}"
                    );
                } else {
                    let _ = writeln!(out, "{{\"seq\":{seq},\"event\":{event}}}");
                }
            }
            Delivery::Gap { reason, from, to, earliest } => {
                let gap = json!({"gap": {"reason": reason, "from": from, "to": to, "earliest": earliest}});
                let _ = writeln!(out, "{gap}");
            }
        }
        let _ = out.flush();
    }
    client.close().await;
    Ok(())
}

/// `agentcast stream`: the stream's config and state, and a user's position,
/// as one JSON object.
pub async fn stream(a: StreamArgs) -> i32 {
    finish(stream_inner(a).await)
}

async fn stream_inner(a: StreamArgs) -> Result<(), Failure> {
    let user = a.user.as_deref().map(|u| parse_user("--user", u)).transpose()?;
    let n = a.stream_partitions;
    if !(1..=crate::partition::MAX_PARTITIONS).contains(&n) {
        return Err(usage(anyhow::anyhow!(
            "--stream-partitions must be between 1 and {}, got {n}",
            crate::partition::MAX_PARTITIONS
        )));
    }
    let client = connect(&a.nats).await?;
    let js = async_nats::jetstream::new(client);
    let layout = |k: u32| {
        (crate::partition::stream_name(&a.stream, n, k), crate::partition::stored_prefix(&a.subject_prefix, n, k))
    };
    let mut streams = Vec::new();
    for k in 0..n {
        let name = layout(k).0;
        let mut described = describe(&js, &name, &a.nats.nats_url).await?;
        if a.seal && !described.1.cached_info().config.sealed {
            seal(&js, &described.1).await?;
            // Shown as it is now.
            described = describe(&js, &name, &a.nats.nats_url).await?;
        }
        streams.push(described);
    }
    let Some(user) = user else {
        let out =
            if n == 1 { streams.remove(0).0 } else { json!({ "partitions": n, "streams": streams_json(streams) }) };
        return print_json(&out);
    };
    let k = crate::partition::of(&user, n);
    let (name, prefix) = layout(k);
    let nats = |e: crate::stream::StreamError| runtime(anyhow::anyhow!("{e}"));
    let client = js.client();
    let history = History::new(&client, vec![client.clone()], &name, prefix.clone()).map_err(nats)?;
    let last = history.last(user.as_str()).await.map_err(nats)?;
    let first = history.first(user.as_str()).await.map_err(nats)?;
    let subject = format!("{prefix}.{user}");
    let mut subjects = streams[k as usize]
        .1
        .info_with_subjects(subject.as_str())
        .await
        .map_err(|e| runtime(anyhow::anyhow!("stream info for {subject}: {e}")))?;
    let mut events = 0usize;
    use futures_util::TryStreamExt;
    while let Some((s, count)) =
        subjects.try_next().await.map_err(|e| runtime(anyhow::anyhow!("stream info for {subject}: {e}")))?
    {
        if s == subject {
            events = count;
        }
    }
    let mut about = json!({
        "id": user.as_str(),
        "subject": subject,
        "events": events,
        "first_seq": first,
        "last_seq": last,
    });
    let mut out = if n == 1 {
        streams.remove(0).0
    } else {
        about["partition"] = k.into();
        about["stream"] = name.into();
        json!({ "partitions": n, "streams": streams_json(streams) })
    };
    out["user"] = about;
    print_json(&out)
}

fn streams_json(streams: Vec<(serde_json::Value, async_nats::jetstream::stream::Stream)>) -> serde_json::Value {
    serde_json::Value::Array(streams.into_iter().map(|(v, _)| v).collect())
}

fn print_json(v: &serde_json::Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).map_err(runtime)?;
    println!("{text}");
    Ok(())
}

/// Seals `stream` (its config as last read): it stores nothing more, and
/// nothing in it is removed but by its age and size limits.
async fn seal(
    js: &async_nats::jetstream::Context,
    stream: &async_nats::jetstream::stream::Stream,
) -> Result<(), Failure> {
    let mut config = stream.cached_info().config.clone();
    let name = config.name.clone();
    config.sealed = true;
    js.update_stream(config).await.map_err(|e| runtime(anyhow::anyhow!("sealing stream {name}: {e}")))?;
    eprintln!("agentcast stream: sealed {name}");
    Ok(())
}

/// One stream's config and state as JSON, and its handle.
async fn describe(
    js: &async_nats::jetstream::Context,
    name: &str,
    urls: &str,
) -> Result<(serde_json::Value, async_nats::jetstream::stream::Stream), Failure> {
    let mut stream = js.get_stream(name).await.map_err(|e| {
        use async_nats::jetstream::context::GetStreamErrorKind;
        match e.kind() {
            GetStreamErrorKind::JetStream(je)
                if je.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                runtime(anyhow::anyhow!(
                    "stream {name} does not exist on {}: a node (agentcast serve) creates it",
                    crate::config::redact_urls(urls)
                ))
            }
            _ => runtime(anyhow::anyhow!("stream {name}: {e}")),
        }
    })?;
    let info = stream.info().await.map_err(|e| runtime(anyhow::anyhow!("stream {name} info: {e}")))?.clone();
    let c = &info.config;
    let s = &info.state;
    let out = json!({
        "stream": c.name,
        "epoch": crate::history::epoch(&info),
        "config": {
            "subjects": c.subjects,
            "republish": c.republish.as_ref().map(|r| json!({"src": r.source, "dest": r.destination})),
            "storage": format!("{:?}", c.storage).to_lowercase(),
            "replicas": c.num_replicas,
            "max_age": humantime::format_duration(c.max_age).to_string(),
            "max_bytes": c.max_bytes,
            "max_msgs_per_subject": c.max_messages_per_subject,
            "max_msg_size": c.max_message_size,
            "duplicate_window": humantime::format_duration(c.duplicate_window).to_string(),
            "allow_direct": c.allow_direct,
            "sealed": c.sealed,
        },
        "state": {
            "messages": s.messages,
            "bytes": s.bytes,
            "first_seq": s.first_sequence,
            "last_seq": s.last_sequence,
            "users": s.subjects_count,
        },
    });
    Ok((out, stream))
}
