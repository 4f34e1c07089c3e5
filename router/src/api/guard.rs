//! What keeps a web browser out of the API: any page may send a request to 127.0.0.1
//! (a `text/plain` POST needs no preflight), and a page whose name resolves to 127.0.0.1
//! (DNS rebinding) is same-origin with it. So: a request with an `Origin` that is not
//! the API's own or allowed (`--api-allowed-origins`) is refused, so is a `Host` that
//! names anything but an IP address, `localhost` or an allowed name
//! (`--api-allowed-hosts`), and a POST body must be `application/json`. Clients that are
//! not browsers send no `Origin` and the address they connected to as `Host`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiState};

/// Who may call the API, from the configuration and the address it listens on.
pub(crate) struct Allowed {
    /// The API's listening address.
    api: SocketAddr,
    /// `--api-allowed-origins`, lowercase, without a trailing `/`.
    origins: Vec<String>,
    /// `--api-allowed-hosts`, lowercase: `name` (any port) or `name:port`.
    hosts: Vec<String>,
}

impl Allowed {
    pub(crate) fn new(api: SocketAddr, origins: &[String], hosts: &[String]) -> Self {
        let clean = |v: &[String]| {
            v.iter()
                .map(|s| s.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Allowed {
            api,
            origins: clean(origins),
            hosts: clean(hosts),
        }
    }

    /// A `Host` header value: an IP address (any port: a rebinding page cannot make a
    /// browser send one for its own name), `localhost`, or an allowed name.
    pub(crate) fn host(&self, value: &str) -> bool {
        let value = value.trim().to_ascii_lowercase();
        let name = split_port(&value).0;
        name.starts_with('[') // an IPv6 literal
            || name.parse::<IpAddr>().is_ok()
            || name == "localhost"
            || self.hosts.iter().any(|h| *h == value || *h == name)
    }

    /// An `Origin` header value: allowed by name, the API's own address (or `localhost`,
    /// a loopback address on its port), or the origin the request was sent to (`host`).
    pub(crate) fn origin(&self, value: &str, host: Option<&str>) -> bool {
        let value = value.trim().trim_end_matches('/').to_ascii_lowercase();
        if self.origins.contains(&value) {
            return true;
        }
        let Some((scheme, authority)) = value.split_once("://") else {
            return false; // `null` (a sandboxed page, a file) and anything else
        };
        if host.is_some_and(|h| h.trim().eq_ignore_ascii_case(authority)) {
            return true;
        }
        let (name, port) = split_port(authority);
        let port = match (port, scheme) {
            (Some(p), _) => p.parse::<u16>().ok(),
            (None, "http") => Some(80),
            (None, "https") => Some(443),
            (None, _) => None,
        };
        if port != Some(self.api.port()) {
            return false;
        }
        let ip = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>();
        name == "localhost" || ip.is_ok_and(|ip| ip.is_loopback() || ip == self.api.ip())
    }
}

/// `name:port` -> (name, Some(port)); an IPv6 literal keeps its brackets.
fn split_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(end) = authority.strip_prefix('[').and_then(|r| r.find(']')) {
        let (name, rest) = authority.split_at(end + 2);
        return (name, rest.strip_prefix(':'));
    }
    match authority.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (name, Some(port))
        }
        _ => (authority, None),
    }
}

/// Refuse (403) a foreign `Host` or `Origin` before anything else runs.
pub(crate) async fn browsers(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let api = &st.shared.metrics.api;
    let headers = req.headers();
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    let host = text(header::HOST);
    if let Some(h) = host {
        if !st.allowed.host(h) {
            api.refused_host.fetch_add(1, Relaxed);
            let message = format!(
                "Host {h:?} is not this API's (an IP address, localhost, or --api-allowed-hosts)"
            );
            return ApiError::new(StatusCode::FORBIDDEN, "forbidden-host", message).into_response();
        }
    }
    if let Some(o) = text(header::ORIGIN) {
        if !st.allowed.origin(o, host) {
            api.refused_origin.fetch_add(1, Relaxed);
            let message = format!(
                "requests from Origin {o:?} are refused (browsers; see --api-allowed-origins)"
            );
            return ApiError::new(StatusCode::FORBIDDEN, "forbidden-origin", message)
                .into_response();
        }
    }
    next.run(req).await
}

/// A POST to a device (event or request) carries JSON: 415 otherwise.
pub(crate) async fn json_bodies(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    if req.method() == Method::POST && req.uri().path().starts_with("/v1/") {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            st.shared
                .metrics
                .api
                .refused_media_type
                .fetch_add(1, Relaxed);
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "the body must be JSON, sent with Content-Type: application/json",
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::{split_port, Allowed};

    fn allowed() -> Allowed {
        Allowed::new(
            "127.0.0.1:8081".parse().unwrap(),
            &["https://Console.example.com/".into()],
            &["router.internal".into(), "api.example:9000".into()],
        )
    }

    #[test]
    fn hosts() {
        let a = allowed();
        for ok in [
            "127.0.0.1:8081",
            "10.1.2.3:80",
            "[::1]:8081",
            "localhost:8081",
            "LOCALHOST",
            "router.internal:8081",
            "api.example:9000",
        ] {
            assert!(a.host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8081",
            "x",
            "api.example:9001",
            "localhost.evil:8081",
        ] {
            assert!(!a.host(bad), "{bad}");
        }
    }

    #[test]
    fn origins() {
        let a = allowed();
        for ok in [
            "http://127.0.0.1:8081",
            "http://localhost:8081",
            "http://[::1]:8081",
            "https://console.example.com",
        ] {
            assert!(a.origin(ok, None), "{ok}");
        }
        assert!(a.origin("http://10.0.0.5:8081", Some("10.0.0.5:8081")));
        for bad in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:9999",
            "http://localhost",
            "https://console.example.com.evil",
            "http://10.0.0.5:8081",
        ] {
            assert!(!a.origin(bad, Some("127.0.0.1:8081")), "{bad}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(split_port("a:1"), ("a", Some("1")));
        assert_eq!(split_port("a"), ("a", None));
        assert_eq!(split_port("[::1]:80"), ("[::1]", Some("80")));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
    }
}
