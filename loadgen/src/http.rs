//! The simulated backend's HTTP/1.1 client for its requests: keep-alive connections per
//! router node, one write per request, the answer's status read with httparse, its body
//! skipped.
//!
//! It replaced reqwest on the request path because the coordinator is part of what the
//! ack latency measures and shares the two cores with the routers: at 2,000 requests/s
//! reqwest (hyper's client, its pool, a timer and a task per request) took ~98 µs of CPU
//! per request in the coordinator, about as much as the router's whole request path.
//! reqwest is still used for everything else (device lists, metrics, event streams).

use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer head read before giving up on it.
const MAX_HEAD: usize = 16 << 10;

#[derive(Debug, PartialEq)]
pub enum HttpError {
    /// Refused, reset, closed before a whole answer, or no answer in time.
    Transport,
    /// Not HTTP/1.x, or a body we cannot frame (no Content-Length).
    Malformed,
}

/// One router node's API: its address and its idle keep-alive connections.
pub struct Node {
    addr: String,
    host: String,
    /// `\r\nAuthorization: Bearer T` with --api-token, else empty.
    auth: String,
    idle: Mutex<Vec<TcpStream>>,
}

impl Node {
    /// `base` as given to --api: `http://host:port` (no TLS, no path).
    pub fn new(base: &str) -> Result<Node, String> {
        let rest = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("{base}: only http:// API URLs are supported"))?;
        let host = rest.trim_end_matches('/').to_string();
        if host.is_empty() || host.contains('/') {
            return Err(format!("{base}: expected http://host:port"));
        }
        let addr = if host.contains(':') {
            host.clone()
        } else {
            format!("{host}:80")
        };
        Ok(Node {
            addr,
            host,
            auth: String::new(),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Every request carries `Authorization: Bearer token` (the router's --api-token).
    pub fn with_token(mut self, token: Option<&str>) -> Node {
        self.auth = token.map_or_else(String::new, |t| format!("\r\nAuthorization: Bearer {t}"));
        self
    }

    /// POST `body` (JSON) to `path`; the answer's status. A pooled connection that the
    /// server closed meanwhile is replaced once by a new one.
    pub async fn post_json(
        &self,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<u16, HttpError> {
        let mut req = String::with_capacity(160 + self.auth.len() + path.len() + body.len());
        req.push_str("POST ");
        req.push_str(path);
        req.push_str(" HTTP/1.1\r\nHost: ");
        req.push_str(&self.host);
        req.push_str(&self.auth);
        req.push_str("\r\nContent-Type: application/json\r\nContent-Length: ");
        req.push_str(&body.len().to_string());
        req.push_str("\r\n\r\n");
        req.push_str(body);
        let work = async {
            let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(conn) = pooled {
                match exchange(conn, req.as_bytes()).await {
                    Ok(r) => return self.finish(r),
                    // Nothing came back on a reused connection: the server may have
                    // closed it while idle. The request was not answered; send it anew.
                    Err(Fail::Unanswered) => {}
                    Err(Fail::Broken(e)) => return Err(e),
                }
            }
            let conn = TcpStream::connect(&self.addr)
                .await
                .map_err(|_| HttpError::Transport)?;
            let _ = conn.set_nodelay(true);
            match exchange(conn, req.as_bytes()).await {
                Ok(r) => self.finish(r),
                Err(Fail::Unanswered) => Err(HttpError::Transport),
                Err(Fail::Broken(e)) => Err(e),
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(HttpError::Transport))
    }

    fn finish(&self, (status, conn): (u16, Option<TcpStream>)) -> Result<u16, HttpError> {
        if let Some(c) = conn {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
        Ok(status)
    }
}

enum Fail {
    /// Not a byte of an answer: the request may be retried on another connection.
    Unanswered,
    Broken(HttpError),
}

/// Write one request, read its whole answer: the status, and the connection if it may be
/// used again.
async fn exchange(mut conn: TcpStream, req: &[u8]) -> Result<(u16, Option<TcpStream>), Fail> {
    if conn.write_all(req).await.is_err() {
        return Err(Fail::Unanswered);
    }
    let mut buf = Vec::with_capacity(512);
    let (status, head_len, body_len, keep) = loop {
        let mut chunk = [0u8; 2048];
        let n = match conn.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return Err(Fail::Unanswered),
            Ok(0) | Err(_) => return Err(Fail::Broken(HttpError::Transport)),
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = parse_head(&buf).map_err(Fail::Broken)? {
            break head;
        }
        if buf.len() > MAX_HEAD {
            return Err(Fail::Broken(HttpError::Malformed));
        }
    };
    // Skip the body (the status is all the backend needs).
    let mut have = buf.len() - head_len;
    while have < body_len {
        let mut chunk = [0u8; 2048];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(Fail::Broken(HttpError::Transport)),
            Ok(n) => have += n,
        }
    }
    // Bytes past the answer would be an answer to nothing: do not reuse such a connection.
    let reusable = keep && have == body_len;
    Ok((status, reusable.then_some(conn)))
}

/// The answer's head, once whole: (status, head length, Content-Length, keep-alive).
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, usize, bool)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HttpError::Malformed),
    };
    let status = resp.code.ok_or(HttpError::Malformed)?;
    let mut body_len = None;
    let mut keep = resp.version == Some(1);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed)?;
            body_len = Some(v.trim().parse().map_err(|_| HttpError::Malformed)?);
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                keep = false;
            } else if v.contains("keep-alive") {
                keep = true;
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The router's answers have a length; a chunked body is not framed here.
            return Err(HttpError::Malformed);
        }
    }
    // 1xx, 204 and 304 have no body; everything else the router sends has a length.
    let body_len = match (status, body_len) {
        (100..=199 | 204 | 304, _) => 0,
        (_, Some(n)) => n,
        (_, None) => return Err(HttpError::Malformed),
    };
    Ok(Some((status, head_len, body_len, keep)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers `answers` in order, one per request it reads (a request is
    /// taken as whole once its head and Content-Length body have arrived), each on the
    /// connection that carried the request, and closes a connection after
    /// `per_conn` answers.
    async fn server(
        answers: Vec<&'static str>,
        per_conn: usize,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let h = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut answers = answers.into_iter();
            'conns: loop {
                let Ok((mut s, _)) = l.accept().await else {
                    break;
                };
                for _ in 0..per_conn {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let n = s.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            continue 'conns;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len: usize = text
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .map_or(0, |v| v.parse().unwrap());
                            if buf.len() >= end + 4 + len {
                                seen.push(text);
                                break;
                            }
                        }
                    }
                    let Some(a) = answers.next() else {
                        break 'conns;
                    };
                    s.write_all(a.as_bytes()).await.unwrap();
                    if answers.len() == 0 {
                        break 'conns;
                    }
                }
            }
            seen
        });
        (base, h)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{\"status\":\"ok\"}\n";

    #[tokio::test]
    async fn keeps_the_connection_and_reconnects_when_the_server_closed_it() {
        let timeout_answer = "HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 2\r\n\r\n{}";
        // Two answers on the first connection, then the server closes it; the third
        // request finds the pooled connection closed and goes out again on a new one.
        let (base, srv) = server(vec![OK, timeout_answer, OK], 2).await;
        let node = Node::new(&base).unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(node.post_json("/v1/a", "{\"x\":1}", t).await, Ok(200));
        assert_eq!(node.post_json("/v1/b", "{}", t).await, Ok(504));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(node.post_json("/v1/c", "{}", t).await, Ok(200));
        drop(node);
        let seen = srv.await.unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[0].starts_with("POST /v1/a HTTP/1.1\r\nHost: 127.0.0.1:"),
            "{}",
            seen[0]
        );
        assert!(seen[0].ends_with("\r\n\r\n{\"x\":1}"), "{}", seen[0]);
        assert!(seen[2].starts_with("POST /v1/c "), "{}", seen[2]);
        assert!(!seen[0].contains("Authorization"), "{}", seen[0]);
    }

    #[tokio::test]
    async fn sends_the_api_token() {
        let (base, srv) = server(vec![OK], 1).await;
        let node = Node::new(&base).unwrap().with_token(Some("t0ken"));
        let t = Duration::from_secs(5);
        assert_eq!(node.post_json("/v1/a", "{}", t).await, Ok(200));
        drop(node);
        let seen = srv.await.unwrap();
        assert!(
            seen[0].contains("\r\nAuthorization: Bearer t0ken\r\n"),
            "{}",
            seen[0]
        );
    }

    #[tokio::test]
    async fn answers_it_cannot_frame_or_never_gets_are_errors() {
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        let (base, _srv) = server(vec![chunked], 1).await;
        let node = Node::new(&base).unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(
            node.post_json("/", "{}", t).await,
            Err(HttpError::Malformed)
        );
        // The server has no more answers: it is gone.
        assert_eq!(
            node.post_json("/", "{}", t).await,
            Err(HttpError::Transport)
        );
        // Nobody listening at all.
        let closed = Node::new("http://127.0.0.1:1").unwrap();
        assert_eq!(
            closed.post_json("/", "{}", t).await,
            Err(HttpError::Transport)
        );
        assert!(Node::new("https://example.com").is_err());
        assert!(Node::new("http://h:1/path").is_err());
    }

    #[test]
    fn heads_are_parsed_only_when_whole() {
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le"), Ok(None));
        assert_eq!(
            parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\n"),
            Ok(Some((404, 45, 5, true)))
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
            Ok(Some((200, 57, 0, false)))
        );
        assert_eq!(
            parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Ok(Some((200, 38, 0, false)))
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\n\r\n"),
            Err(HttpError::Malformed)
        );
        assert_eq!(parse_head(b"SSH-2.0-x\r\n\r\n"), Err(HttpError::Malformed));
    }
}
