//! The JWKS key set (`--auth-jwks FILE|URL`): read from a file (again on SIGHUP), or
//! fetched over HTTPS at start and refreshed on a timer of its own thread, following the
//! answer's `Cache-Control: max-age` within [`MIN_REFRESH`]..[`MAX_REFRESH`]. A token
//! whose `kid` is not in the set asks for one fetch now, at most once per
//! [`REFETCH_EVERY`] whatever the tokens say, so a flood of forged kids cannot hammer the
//! identity service. A fetch that fails keeps the keys of the last one that worked
//! (`router_auth_jwks_age_seconds` says how old they are) and is retried with backoff.
//! Rotation: a key added to the document is accepted from the next fetch on (or at once
//! for a token that names it); a key removed stops new connections only, since
//! connections are checked when they authenticate.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::keys::{self, KeySet};

/// Fewest and most seconds between two scheduled fetches (`max-age` is clamped to them).
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(60);
pub(crate) const MAX_REFRESH: Duration = Duration::from_secs(86_400);
/// Fetches asked for by unknown `kid`s: at most one per this long.
pub(crate) const REFETCH_EVERY: Duration = Duration::from_secs(10);
/// How long a connection whose token names an unknown `kid` waits for that fetch.
pub(crate) const REFETCH_WAIT: Duration = Duration::from_secs(3);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document read.
const MAX_DOCUMENT: usize = 1 << 20;

/// Where the key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    File(PathBuf),
    Url(String),
}

impl Source {
    pub(crate) fn parse(s: &str) -> anyhow::Result<Source> {
        if s.starts_with("https://") {
            Ok(Source::Url(s.to_string()))
        } else if s.starts_with("http://") {
            // Keys fetched in the clear can be swapped by anyone on the path.
            anyhow::bail!(
                "--auth-jwks {s}: an URL must be https:// (a private CA goes in --auth-jwks-ca)"
            )
        } else {
            Ok(Source::File(PathBuf::from(s)))
        }
    }
}

#[derive(Default)]
pub(crate) struct JwksMetrics {
    pub(crate) fetches_ok: AtomicU64,
    pub(crate) fetches_failed: AtomicU64,
    pub(crate) refetches_limited: AtomicU64,
    /// Unix ms of the last successful load; 0: never.
    pub(crate) loaded_at_ms: AtomicU64,
}

/// The key set and what keeps it fresh.
pub(crate) struct Jwks {
    pub(crate) source: Source,
    keys: RwLock<Arc<KeySet>>,
    /// Bumped at each successful load (handshakes waiting for a `kid` watch it).
    version: tokio::sync::watch::Sender<u64>,
    refetch: tokio::sync::Notify,
    last_refetch: Mutex<Option<Instant>>,
    pub(crate) metrics: JwksMetrics,
}

impl Jwks {
    pub(crate) fn new(source: Source) -> Self {
        Jwks {
            source,
            keys: RwLock::new(Arc::new(KeySet::default())),
            version: tokio::sync::watch::Sender::new(0),
            refetch: tokio::sync::Notify::new(),
            last_refetch: Mutex::new(None),
            metrics: JwksMetrics::default(),
        }
    }

    pub(crate) fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replace the key set with the one in `doc` (a JWKS document); the keys left out
    /// are logged. A document that does not parse changes nothing.
    pub(crate) fn load(&self, doc: &[u8]) -> anyhow::Result<usize> {
        let (set, skipped) = keys::from_jwks(doc).map_err(anyhow::Error::msg)?;
        for s in &skipped {
            tracing::warn!(source = ?self.source, "JWKS {s}: left out");
        }
        let n = set.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        self.metrics.loaded_at_ms.store(crate::unix_ms(), Relaxed);
        self.metrics.fetches_ok.fetch_add(1, Relaxed);
        self.version.send_modify(|v| *v += 1);
        Ok(n)
    }

    /// Read the file again (a file source; SIGHUP). An error keeps the keys in use.
    pub(crate) fn reload_file(&self) -> anyhow::Result<usize> {
        let Source::File(path) = &self.source else {
            anyhow::bail!("the key set comes from an URL: it refreshes on its own");
        };
        let doc = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("reading --auth-jwks {}: {e}", path.display()))?;
        self.load(&doc).inspect_err(|_| {
            self.metrics.fetches_failed.fetch_add(1, Relaxed);
        })
    }

    /// A token named a `kid` the set does not have: ask for a fetch now, unless one was
    /// asked for within [`REFETCH_EVERY`] (counted) or the set is a file. True when a
    /// fetch was asked for.
    pub(crate) fn request_refetch(&self) -> bool {
        if !matches!(self.source, Source::Url(_)) {
            return false;
        }
        let mut last = self.last_refetch.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < REFETCH_EVERY) {
            self.metrics.refetches_limited.fetch_add(1, Relaxed);
            return false;
        }
        *last = Some(Instant::now());
        self.refetch.notify_one();
        true
    }

    /// Wait (at most `within`) for the key set to be loaded again.
    pub(crate) async fn changed(&self, within: Duration) {
        let mut rx = self.version.subscribe();
        rx.mark_unchanged();
        let _ = tokio::time::timeout(within, rx.changed()).await;
    }

    /// Seconds since the keys in use were loaded; None: never.
    pub(crate) fn age_secs(&self) -> Option<f64> {
        let at = self.metrics.loaded_at_ms.load(Relaxed);
        (at > 0).then(|| crate::unix_ms().saturating_sub(at) as f64 / 1000.0)
    }
}

/// The refresh loop of an URL source, on a thread of its own, until `stop` flips.
pub(crate) fn spawn_refresher(
    jwks: Arc<Jwks>,
    ca: Option<PathBuf>,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Source::Url(url) = jwks.source.clone() else {
        return Ok(());
    };
    let client = client(ca.as_ref())?;
    crate::runtime_thread("jwks", move |rt| {
        rt.block_on(refresh_loop(jwks, client, url, every, stop));
    })?;
    Ok(())
}

fn client(ca: Option<&PathBuf>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .https_only(true);
    if let Some(path) = ca {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("reading --auth-jwks-ca {}: {e}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("--auth-jwks-ca {}: {e}", path.display()))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    Ok(b.build()?)
}

async fn refresh_loop(
    jwks: Arc<Jwks>,
    client: reqwest::Client,
    url: String,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = crate::retry::Backoff::new(Duration::from_secs(1), MIN_REFRESH);
    loop {
        let wait = match fetch(&client, &url).await {
            Ok((doc, max_age)) => match jwks.load(&doc) {
                Ok(n) => {
                    backoff.reset();
                    tracing::info!(url = %url, keys = n, "JWKS fetched");
                    max_age.unwrap_or(every).clamp(MIN_REFRESH, MAX_REFRESH)
                }
                Err(e) => {
                    jwks.metrics.fetches_failed.fetch_add(1, Relaxed);
                    tracing::error!(url = %url, error = %e, "JWKS fetched but not usable: keeping the keys in use");
                    backoff.next_delay()
                }
            },
            Err(e) => {
                jwks.metrics.fetches_failed.fetch_add(1, Relaxed);
                let age = jwks.age_secs();
                tracing::error!(url = %url, error = %e, keys_age_s = ?age, "JWKS fetch failed: retrying; tokens are checked against the keys of the last fetch that worked");
                backoff.next_delay()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = jwks.refetch.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// GET the document; its bytes and the answer's `max-age`, if any.
async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<(Vec<u8>, Option<Duration>)> {
    let r = client.get(url).send().await?;
    if !r.status().is_success() {
        anyhow::bail!("HTTP {}", r.status());
    }
    let max_age = r
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(max_age);
    if r.content_length()
        .is_some_and(|n| n as usize > MAX_DOCUMENT)
    {
        anyhow::bail!("document over {MAX_DOCUMENT} bytes");
    }
    let body = r.bytes().await?;
    if body.len() > MAX_DOCUMENT {
        anyhow::bail!("document over {MAX_DOCUMENT} bytes");
    }
    Ok((body.to_vec(), max_age))
}

/// `max-age=N` of a Cache-Control value (`no-store`/`no-cache`: 0, clamped later).
pub(crate) fn max_age(v: &str) -> Option<Duration> {
    for d in v.split(',').map(str::trim) {
        if d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        if let Some((k, n)) = d.split_once('=') {
            if k.trim().eq_ignore_ascii_case("max-age") {
                return n
                    .trim()
                    .trim_matches('"')
                    .parse()
                    .ok()
                    .map(Duration::from_secs);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        assert_eq!(
            max_age("public, max-age=600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(max_age("MAX-AGE=\"30\""), Some(Duration::from_secs(30)));
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("private"), None);
        assert_eq!(max_age("max-age=x"), None);
    }

    #[test]
    fn refetches_are_rate_limited_and_only_for_urls() {
        let j = Jwks::new(Source::Url("https://id.example/jwks".into()));
        assert!(j.request_refetch());
        assert!(!j.request_refetch());
        assert!(!j.request_refetch());
        assert_eq!(j.metrics.refetches_limited.load(Relaxed), 2);
        let f = Jwks::new(Source::File("/nonexistent".into()));
        assert!(!f.request_refetch());
        assert!(f.reload_file().is_err());
        assert!(Source::parse("http://id.example/jwks").is_err());
        assert_eq!(
            Source::parse("/etc/hive/jwks.json").unwrap(),
            Source::File("/etc/hive/jwks.json".into())
        );
    }
}
