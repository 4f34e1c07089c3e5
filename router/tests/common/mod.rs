//! Test harness: a real router on loopback ports, real WebSocket and HTTP clients.
#![allow(dead_code)]

pub mod amqp;
pub mod raw;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use router::config::ServeConfig;
use router::RouterHandle;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A fresh (device, account) pair.
pub fn ids() -> (Uuid, Uuid) {
    (Uuid::new_v4(), Uuid::new_v4())
}

pub struct TestRouter {
    pub handle: Option<RouterHandle>,
    pub ws: String,
    pub api: String,
    pub http: reqwest::Client,
}

impl TestRouter {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(f: impl FnOnce(&mut ServeConfig)) -> Self {
        let mut cfg = ServeConfig::for_tests(SECRET);
        f(&mut cfg);
        let handle = router::start(cfg).expect("router starts");
        TestRouter {
            ws: format!("ws://{}", handle.ws_addr),
            api: format!("http://{}", handle.api_addr),
            handle: Some(handle),
            http: reqwest::Client::new(),
        }
    }

    pub fn token(&self, device: Uuid, account: Uuid) -> String {
        router::auth::mint(SECRET, device, account, 3600)
    }

    /// Connect with the token in the Authorization header and wait for `authenticated`.
    pub async fn device(&self, device: Uuid, account: Uuid) -> Ws {
        let mut req = format!("{}/ws", self.ws).into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token(device, account))
                .parse()
                .unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade");
        let hello = next_json(&mut ws).await;
        assert_eq!(hello["type"], "authenticated", "{hello}");
        ws
    }

    /// Connect with `token` in the Authorization header: the socket once authenticated,
    /// else the close code the router refused it with.
    pub async fn try_token(&self, token: &str) -> Result<Ws, u16> {
        let mut req = format!("{}/ws", self.ws).into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade");
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "authenticated", "{v}");
                Ok(ws)
            }
            Ok(Some(Ok(Message::Close(Some(f))))) => Err(f.code.into()),
            other => panic!("neither authenticated nor closed: {other:?}"),
        }
    }

    /// GET `path` on the API: its JSON body (Null when there is none).
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap();
        r.json().await.unwrap_or(Value::Null)
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.api))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one metric line (exact name with labels), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics().await, name)
    }

    pub async fn request(&self, device: Uuid, body: Value, query: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/devices/{device}/requests{query}", self.api))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Next text message as JSON, answering nothing (tungstenite answers pings itself).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("router sends JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Read until the router closes; return its close code.
pub async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("close within 5 s");
        match next {
            Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => panic!("stream ended without close frame"),
        }
    }
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

pub fn is_code(code: u16, want: CloseCode) -> bool {
    code == u16::from(want)
}

/// A `/v1/events` subscriber collecting SSE `data:` lines.
pub struct Events {
    rx: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl Events {
    pub async fn subscribe(r: &TestRouter) -> Events {
        let resp = r
            .http
            .get(format!("{}/v1/events", r.api))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stream = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    for line in block.lines() {
                        if let Some(data) = line
                            .strip_prefix("data: ")
                            .or_else(|| line.strip_prefix("data:"))
                        {
                            if let Ok(v) = serde_json::from_str(data) {
                                let _ = tx.send(v);
                            }
                        }
                    }
                }
            }
        });
        // Let the subscription register before events are produced.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Events { rx }
    }

    /// The next event matching `pred`, within 5 s.
    pub async fn find(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let v = self.rx.recv().await.expect("event stream open");
                if pred(&v) {
                    return v;
                }
            }
        })
        .await
        .expect("matching event within 5 s")
    }
}

/// The `router` binary started as `router serve ARGS` (stdout piped, stderr dropped),
/// once it has printed its ready line; returns the process and that line.
pub fn spawn_router(args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_router"))
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("router ready"), "{line}");
    (child, line)
}
