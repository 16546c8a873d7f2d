//! A three-server nats-server cluster on loopback for tests, where the route
//! between servers 2 and 3 runs through a TCP proxy in the test process that
//! can stall it (a partition of that one route, while every client
//! connection and the other routes stay up).
//!
//! - `n1` routes to `n2` and `n3` directly.
//! - `n2` and `n3` route to each other only through the proxy: each one's
//!   explicit route to the other names the proxy, and each advertises the
//!   proxy as its cluster address, so routes learned by gossip (and the
//!   pooled routes of 2.10+) go through it too.
//! - `n3` carries the server tag `leader`: an R1 stream placed with that tag
//!   lives there, so a node connected to `n2` reaches the stream's leader
//!   only over the interruptible route.
//! - A short `ping_interval` / `ping_max` (1 s, 2), so that a stalled route
//!   is given up by the servers themselves (measured here: about 3 s on
//!   2.15.1; about 13 s on 2.9.10); `restore` does not wait for that: it
//!   drops the stalled connections at once, and the held bytes with them.
//!
//! Random ports, temporary JetStream directories; every server is killed on
//! drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy's state: a generation (connections of an older one are
/// dropped) and whether forwarding is stalled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct ProxyState {
    generation: u64,
    stalled: bool,
}

/// A TCP forwarder that can stall every connection through it.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<watch::Sender<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
    /// Bytes held while stalled, and those dropped by `restore`.
    holding: Arc<AtomicU64>,
    pub discarded: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on an ephemeral port and forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy listen");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(watch::channel(ProxyState { generation: 0, stalled: false }).0);
        let st = state.clone();
        let holding = Arc::new(AtomicU64::new(0));
        let lost = holding.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else { continue };
                let (st, lost) = (st.clone(), lost.clone());
                tokio::spawn(async move {
                    let generation = st.borrow().generation;
                    let Ok(up) = TcpStream::connect(target).await else { return };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    // When either direction ends, both sockets go.
                    tokio::select! {
                        _ = pipe(dr, uw, st.subscribe(), generation, &lost) => {}
                        _ = pipe(ur, dw, st.subscribe(), generation, &lost) => {}
                    }
                });
            }
        });
        Self { addr, state, task, holding, discarded: Arc::new(AtomicU64::new(0)) }
    }

    /// Stops forwarding: bytes sent into the proxy are held, not delivered,
    /// on existing connections and on new ones, as on a dead network path.
    pub fn stall(&self) {
        self.state.send_modify(|s| s.stalled = true);
    }

    /// Drops every connection (held bytes are lost: both servers see the
    /// route close at once) and forwards again.
    pub fn restore(&self) {
        self.discarded.fetch_add(self.holding.swap(0, Ordering::SeqCst), Ordering::SeqCst);
        self.state.send_modify(|s| {
            s.generation += 1;
            s.stalled = false;
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.restore();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<ProxyState>,
    generation: u64,
    holding: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = state.changed() => {
                if state.borrow().generation != generation { return; }
                continue;
            }
        };
        // Held while stalled; lost if the generation moves on.
        let mut held = false;
        loop {
            let s = *state.borrow_and_update();
            if s.generation != generation {
                return;
            }
            if !s.stalled {
                break;
            }
            if !held {
                holding.fetch_add(n as u64, Ordering::SeqCst);
                held = true;
            }
            if state.changed().await.is_err() {
                return;
            }
        }
        if held {
            holding.fetch_sub(n as u64, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One server of the cluster.
pub struct Server {
    pub name: String,
    child: Option<Child>,
    pub url: String,
    pub monitor: String,
    pub log: PathBuf,
}

impl Server {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// The servers this one has a route to (by name), from /routez.
    pub async fn routes(&self) -> Vec<String> {
        let (_, body) = super::http_get(&format!("{}/routez", self.monitor)).await;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let mut names: Vec<String> = v["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["remote_name"].as_str().or(r["remote_id"].as_str()).map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct NatsCluster {
    pub servers: Vec<Server>,
    /// The proxy n2 reaches n3 through, and the one n3 reaches n2 through.
    pub to_n3: Proxy,
    pub to_n2: Proxy,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl NatsCluster {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let cport: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let local = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
        let to_n3 = Proxy::start(local(cport[2])).await;
        let to_n2 = Proxy::start(local(cport[1])).await;
        let route = |a: SocketAddr| format!("nats://{a}");
        // (name, routes, advertise, tags)
        let plans = [
            ("n1", vec![route(local(cport[1])), route(local(cport[2]))], None, "[]"),
            ("n2", vec![route(local(cport[0])), route(to_n3.addr)], Some(to_n2.addr), "[]"),
            ("n3", vec![route(local(cport[0])), route(to_n2.addr)], Some(to_n3.addr), r#"["leader"]"#),
        ];
        let mut servers = Vec::new();
        for (i, (name, routes, advertise, tags)) in plans.into_iter().enumerate() {
            let sdir = dir.path().join(name);
            let ports = sdir.join("ports");
            std::fs::create_dir_all(&ports).unwrap();
            let advertise = advertise.map(|a| format!("  advertise: \"{a}\"\n")).unwrap_or_default();
            let conf = format!(
                r#"server_name: {name}
listen: "127.0.0.1:-1"
http: "127.0.0.1:-1"
ping_interval: "1s"
ping_max: 2
server_tags: {tags}
jetstream {{
  store_dir: "{store}"
}}
cluster {{
  name: agentcast-test
  listen: "127.0.0.1:{cport}"
{advertise}  routes: [{routes}]
}}
"#,
                store = sdir.join("js").display(),
                cport = cport[i],
                routes = routes.join(", "),
            );
            let conf_path = sdir.join("nats.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let log = sdir.join("nats.log");
            let child = Command::new(super::nats_server_bin())
                .arg("-c")
                .arg(&conf_path)
                .arg("--ports_file_dir")
                .arg(&ports)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start nats-server");
            servers.push(Server {
                name: name.to_owned(),
                child: Some(child),
                url: String::new(),
                monitor: String::new(),
                log,
            });
            let _ = ports;
        }
        let mut c = Self { servers, to_n3, to_n2, dir };
        // Ports, from each server's ports file.
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in 0..3 {
            let ports = c.dir.path().join(&c.servers[i].name).join("ports");
            loop {
                let f = std::fs::read_dir(&ports).unwrap().flatten().next();
                if let Some(v) =
                    f.and_then(|e| serde_json::from_str::<Value>(&std::fs::read_to_string(e.path()).ok()?).ok())
                {
                    c.servers[i].url = v["nats"][0].as_str().unwrap().to_owned();
                    c.servers[i].monitor = v["monitoring"][0].as_str().unwrap().to_owned();
                    break;
                }
                assert!(Instant::now() < deadline, "{} did not start:\n{}", c.servers[i].name, c.servers[i].log_text());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        c.wait_meshed().await;
        // JetStream answers once the meta group has a leader.
        let client = c.client(0).await;
        loop {
            let r = client.request("$JS.API.INFO", "".into()).await;
            let answer = r.map(|m| String::from_utf8_lossy(&m.payload).into_owned()).unwrap_or_else(|e| e.to_string());
            if answer.contains("\"memory\"") && !answer.contains("\"error\"") {
                break;
            }
            assert!(Instant::now() < deadline, "JetStream not ready ({answer}):\n{}", c.servers[0].log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c
    }

    /// Waits until every server has a route to both others.
    pub async fn wait_meshed(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut all = true;
            for s in &self.servers {
                all &= s.routes().await.len() >= 2;
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "routes did not form:\n{}",
                self.servers.iter().map(|s| format!("--- {}\n{}", s.name, s.log_text())).collect::<String>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn client(&self, i: usize) -> async_nats::Client {
        async_nats::connect(&self.servers[i].url).await.expect("connect to the cluster")
    }

    /// Stalls the n2–n3 route in both directions.
    pub fn stall_n2_n3(&self) {
        self.to_n3.stall();
        self.to_n2.stall();
    }

    pub fn restore_n2_n3(&self) {
        self.to_n3.restore();
        self.to_n2.restore();
    }

    /// Bytes the n2–n3 proxies dropped on `restore` (held while stalled).
    pub fn discarded(&self) -> u64 {
        self.to_n3.discarded.load(Ordering::SeqCst) + self.to_n2.discarded.load(Ordering::SeqCst)
    }

    /// The stream's leader's server name, as the cluster reports it.
    pub async fn stream_leader(&self, js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
        let mut s = js.get_stream(stream).await.ok()?;
        s.info().await.ok()?.cluster.as_ref()?.leader.clone()
    }
}
