//! Hive Router: a sharded WebSocket gateway for device fleets.
//!
//! Data flow, in module order: `listener` (accept, upgrade, auth) -> `shard`
//! (thread per core, route table, connection loop) -> `protocol` (frames <->
//! messages, no I/O) -> `bus` (events out of the shards: SSE ring, or RabbitMQ) ->
//! `backend` (RabbitMQ -> HTTP POSTs to the backend); `api` (HTTP device service) and
//! `cluster` (requests to devices on other nodes) go the other way. `amqp` is the
//! connection code the RabbitMQ users share, `retry` their backoff.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod amqp;
pub mod api;
pub mod auth;
pub mod backend;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod config_file;
pub mod listener;
pub mod metrics;
pub mod nerves_auth;
pub mod protocol;
pub(crate) mod retry;
pub mod revocation;
pub mod shard;
pub mod tenants;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use auth::Verifier;
use bus::Bus;
use config::ServeConfig;
use metrics::Metrics;
use shard::{ShardHandle, ShardMsg};

/// What every thread of the process shares: immutable config plus handles and counters.
pub struct Shared {
    pub config: ServeConfig,
    pub node_id: String,
    pub verifier: Verifier,
    pub metrics: Metrics,
    pub shards: Vec<ShardHandle>,
    pub bus: Bus,
    pub ready: AtomicBool,
    /// SIGTERM received: refuse new connections and API calls, close devices gradually.
    pub draining: AtomicBool,
    /// Flips to true when the process stops: ends SSE streams and the API server.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// TLS on the device listener (--tls-cert/--tls-key), with mTLS when --client-ca.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// With --amqp: the cluster (membership, directory, envelopes to other nodes).
    pub(crate) cluster: Option<cluster::Cluster>,
    /// With --nerves-keys: NervesHub shared-secret authentication (reloaded on SIGHUP).
    pub nerves: Option<nerves_auth::NervesAuth>,
    /// The deny-list of devices and token ids, checked at authentication.
    pub revocation: Arc<revocation::DenyList>,
    /// Devices per account and the per-account limits.
    pub tenants: tenants::Tenants,
    /// --nerves-extensions, shared by every Phoenix connection.
    pub nerves_extensions: Arc<[String]>,
    /// Device connections not yet authenticated: their budget (--max-unauthenticated).
    pub(crate) unauthenticated: Arc<listener::budget::Unauthenticated>,
}

impl Shared {
    /// With --amqp, ready when the event bridge is connected and the cluster has joined
    /// (never again once draining).
    pub fn update_ready(&self) {
        let bridge_up = self.metrics.bridge.connected.load(Relaxed) == 1;
        let cluster_up = self.cluster.as_ref().is_none_or(|c| c.joined());
        let ready = bridge_up && cluster_up && !self.draining.load(Relaxed);
        self.ready.store(ready, Relaxed);
        // A drain that began meanwhile wins.
        if self.draining.load(Relaxed) {
            self.ready.store(false, Relaxed);
        }
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The URL with its password replaced by `***` (`scheme://user:***@host/...`), for logs
/// and errors. Everything up to the last `@` counts as user info, so a password that
/// holds `/`, `?` or `#` unescaped is hidden too.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// 64 bits that differ per call and per process, not cryptographic (retry jitter, a
/// node's incarnation); link tokens take the OS generator instead.
pub(crate) fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    let s = std::collections::hash_map::RandomState::new();
    s.hash_one((std::process::id(), std::time::Instant::now()))
}

/// A running router: its bound addresses and the means to stop it.
pub struct RouterHandle {
    pub ws_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub shared: Arc<Shared>,
    /// Shard threads, then the API thread last (none with one shard: the API runs on
    /// the shard's thread then).
    threads: Vec<JoinHandle<()>>,
}

impl RouterHandle {
    /// Stop now: close every device with 1001, stop the shards and the API.
    pub fn shutdown(self) {
        self.stop(Duration::ZERO);
    }

    /// Graceful drain (SIGTERM): stop accepting, `/readyz` turns 503, close devices
    /// with 1001 spread over `--drain-seconds`, let in-flight API calls finish.
    pub fn drain(self) {
        let secs = self.shared.config.drain_seconds;
        self.stop(Duration::from_secs(secs));
    }

    fn stop(mut self, spread: Duration) {
        self.shared.ready.store(false, Relaxed);
        self.shared.draining.store(true, Relaxed);
        let deadline = std::time::Instant::now() + spread;
        for s in &self.shared.shards {
            // A full inbox still gets the message eventually: retry briefly.
            for _ in 0..500 {
                if s.send(ShardMsg::Drain(deadline)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let api = if self.shared.shards.len() > 1 {
            self.threads.pop()
        } else {
            None
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Devices are gone: end SSE streams and let the API finish what it holds.
        self.shared.shutdown.send_replace(true);
        if let Some(t) = api {
            let _ = t.join();
        }
    }
}

/// Bind the listeners and start the shard threads and the API thread (with more than
/// one shard; with one, the API runs on the shard's thread).
pub fn start(config: ServeConfig) -> anyhow::Result<RouterHandle> {
    check_config(&config)?;
    let n = config.shard_count();
    let secret = config.secret()?;
    let verifier = verifier(&config, &secret)?;
    let cluster_key = match &config.amqp {
        Some(_) => Some(cluster_key(&config, &secret)?),
        None => None,
    };
    let (ws_addr, listeners) = listener::bind_reuseport(config.listen, n, config.defer_accept)
        .with_context(|| format!("binding device listener {}", config.listen))?;
    let api_listener = std::net::TcpListener::bind(config.api)
        .with_context(|| format!("binding API listener {}", config.api))?;
    api_listener.set_nonblocking(true)?;
    let api_addr = api_listener.local_addr()?;

    let (handles, inboxes): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| ShardHandle::new(config.queue_capacity))
        .unzip();
    let (bus, bus_rx) = Bus::new(config.queue_capacity);
    let node_id = config.node_id();
    let link = bind_cluster_link(&config)?;
    let cluster = cluster_key.map(|key| cluster::Cluster::new(node_id.clone(), link, key));
    let shared = Arc::new(new_shared(
        config, node_id, verifier, handles, bus, cluster,
    )?);
    // --auth-jwks URL: fetched and refreshed on a thread of its own until shutdown.
    if let Some(j) = shared.verifier.jwks() {
        auth::jwks::spawn_refresher(
            j.clone(),
            shared.config.auth_jwks_ca.clone(),
            Duration::from_secs(shared.config.auth_jwks_refresh),
            shared.shutdown.subscribe(),
        )?;
    }

    // --amqp --backend-url: backend delivery on its own thread and AMQP connection,
    // joined after the API has stopped (see `backend`).
    let backend = match (&shared.config.amqp, &shared.config.backend_url) {
        (Some(_), Some(_)) => Some(backend::spawn(shared.clone())?),
        _ => None,
    };
    let api = ApiPart {
        listener: api_listener,
        bus_rx,
        backend,
    };
    let threads = spawn_threads(&shared, inboxes, listeners, api)?;
    // With --amqp, the bridge says when the router is ready (broker connected).
    if shared.config.amqp.is_none() {
        shared.ready.store(true, Relaxed);
    }
    Ok(RouterHandle {
        ws_addr,
        api_addr,
        shared,
        threads,
    })
}

/// The token verifier: HS256 with `secret` (a start without a usable secret or key was
/// refused by [`ServeConfig::secret`]), the public keys of `--auth-public-key` (read now:
/// a bad file stops the start) and the JWKS of `--auth-jwks` (a file read now; an URL
/// fetched by its own thread, see `auth::jwks`).
fn verifier(config: &ServeConfig, secret: &config::TokenSecret) -> anyhow::Result<Verifier> {
    use config::TokenSecret;
    let hmac = match secret {
        TokenSecret::Secret(s) => Some(s.as_str()),
        TokenSecret::Dev => {
            if config.listen.ip().is_loopback() {
                tracing::warn!("--dev: accepting tokens signed with the public development secret");
            } else {
                tracing::warn!(
                    listen = %config.listen,
                    "--dev on a non-loopback address: anyone who can reach it can mint tokens \
                     for any device (the development secret is public)"
                );
            }
            Some(config::DEV_SECRET)
        }
        TokenSecret::None => None,
    };
    let checks = auth::Checks {
        issuer: config.auth_issuer.clone(),
        audience: config.auth_audience.clone(),
        leeway: config.auth_leeway,
    };
    let mut pem = auth::keys::KeySet::default();
    for path in &config.auth_public_key {
        let text = std::fs::read(path)
            .with_context(|| format!("reading --auth-public-key {}", path.display()))?;
        let kid = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        let key = auth::keys::from_pem(&text, kid)
            .map_err(|e| anyhow::anyhow!("--auth-public-key {}: {e}", path.display()))?;
        pem.insert_unnamed_too(key);
    }
    let mut v = Verifier::with(hmac, &checks)
        .with_public_keys(pem)
        .with_max_lifetime(config.auth_max_token_lifetime);
    if let Some(src) = &config.auth_jwks {
        let jwks = Arc::new(auth::jwks::Jwks::new(auth::jwks::Source::parse(src)?));
        if matches!(jwks.source, auth::jwks::Source::File(_)) {
            let n = jwks.reload_file()?;
            tracing::info!(keys = n, "--auth-jwks read");
        }
        v = v.with_jwks(jwks);
    }
    if !v.accepts_tokens() {
        tracing::info!(
            "no token secret or key: devices authenticate by certificate or NervesHub key only"
        );
    }
    Ok(v)
}

/// --amqp: the key every envelope between nodes is sealed with (see `cluster::seal`):
/// the configured one, else derived from the token secret.
fn cluster_key(
    config: &ServeConfig,
    secret: &config::TokenSecret,
) -> anyhow::Result<cluster::seal::ClusterKey> {
    use cluster::seal::ClusterKey;
    use config::TokenSecret;
    if let Some(k) = config.cluster_key()? {
        return Ok(ClusterKey::new(&k).for_cluster(&config.cluster_name));
    }
    let base = match secret {
        TokenSecret::Secret(s) => ClusterKey::derived(s.as_bytes()),
        TokenSecret::Dev => {
            tracing::warn!(
                "--dev with --amqp and no --cluster-key-file: the cluster key comes from the \
                 public development secret, so anyone who can publish on the broker can \
                 command devices"
            );
            ClusterKey::derived(config::DEV_SECRET.as_bytes())
        }
        TokenSecret::None => anyhow::bail!(
            "--amqp without a token secret needs --cluster-key-file (at least 32 bytes, the \
             same on every node): it seals the envelopes between nodes"
        ),
    };
    Ok(base.for_cluster(&config.cluster_name))
}

/// Refuse a start whose broker URL, broker TLS files or backend settings are wrong.
fn check_config(config: &ServeConfig) -> anyhow::Result<()> {
    // A cluster key that would be refused with --amqp is refused without it too.
    config.cluster_key()?;
    if let Some(url) = &config.amqp {
        amqp::check_url(url)?;
        // The TLS files are read now too, so a missing one stops the start.
        amqp::tls_config(config)?;
    }
    if let Some(url) = &config.backend_url {
        backend::check_config(url, config)?;
    }
    Ok(())
}

/// --amqp: the cluster's direct link listener and the address peers are told, bound now
/// so a bad address stops the start.
fn bind_cluster_link(
    config: &ServeConfig,
) -> anyhow::Result<Option<(std::net::TcpListener, String)>> {
    let Some(url) = &config.amqp else {
        return Ok(None);
    };
    let Some(addr) =
        cluster::link::bind_addr(&config.cluster_link, url).map_err(anyhow::Error::msg)?
    else {
        return Ok(None);
    };
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding cluster link listener {addr}"))?;
    let local = l.local_addr()?;
    if local.ip().is_unspecified() && config.cluster_advertise.is_none() {
        anyhow::bail!(
            "--cluster-link {addr} listens on every address: say which one peers \
             reach with --cluster-advertise HOST:PORT"
        );
    }
    let advertised = config
        .cluster_advertise
        .clone()
        .unwrap_or_else(|| local.to_string());
    Ok(Some((l, advertised)))
}

/// What the threads share, from the config and the handles made for it (reads the TLS
/// and NervesHub key files).
fn new_shared(
    config: ServeConfig,
    node_id: String,
    verifier: Verifier,
    shards: Vec<ShardHandle>,
    bus: Bus,
    cluster: Option<cluster::Cluster>,
) -> anyhow::Result<Shared> {
    let revocation = Arc::new(if config.amqp.is_some() {
        revocation::DenyList::clustered()
    } else {
        let store = match &config.data_dir {
            Some(dir) => Some(revocation::store::Store::open(dir)?),
            None => None,
        };
        revocation::DenyList::local(store)?
    });
    let verifier = verifier.with_deny_list(revocation.clone());
    Ok(Shared {
        node_id: node_id.clone(),
        verifier,
        revocation,
        tenants: tenants::Tenants::new(config.account_max_devices, config.account_max_rate),
        metrics: Metrics::new(shards.len()),
        shards,
        bus,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        shutdown: tokio::sync::watch::Sender::new(false),
        tls: tls::server_config(&config)?.map(tokio_rustls::TlsAcceptor::from),
        nerves: match &config.nerves_keys {
            Some(path) => Some(nerves_auth::NervesAuth::new(
                path.clone(),
                config.nerves_min_iterations,
                config.nerves_max_age,
            )?),
            None => None,
        },
        // The flag's empty default parses as one empty name: no extension at all.
        nerves_extensions: config
            .nerves_extensions
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect(),
        unauthenticated: listener::budget::Unauthenticated::new(
            config.max_unauthenticated,
            config.max_unauthenticated_per_ip,
            config.max_connections,
        ),
        cluster,
        config,
    })
}

/// Start a thread per shard, each with its inbox and listener, and the API: on the
/// shard's thread when there is one shard, else on a thread of its own (last).
fn spawn_threads(
    shared: &Arc<Shared>,
    inboxes: Vec<crossbeam_channel::Receiver<ShardMsg>>,
    listeners: Vec<std::net::TcpListener>,
    api: ApiPart,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    // One shard (e.g. one of several processes on a port): the API runs on the shard's
    // own thread, so a request to one of its devices crosses no thread at all (with a
    // thread of its own, each request woke it and the shard twice).
    let api_on_shard = inboxes.len() == 1;
    let mut api = Some(api);
    let mut threads = Vec::new();
    for (id, (rx, l)) in inboxes.into_iter().zip(listeners).enumerate() {
        let sh = shared.clone();
        let api = if api_on_shard { api.take() } else { None };
        threads.push(
            std::thread::Builder::new()
                .name(format!("shard-{id}"))
                .spawn(move || shard::run_shard(id, sh, rx, l, api))?,
        );
    }
    if let Some(api) = api {
        let sh = shared.clone();
        threads.push(runtime_thread("api", move |rt| {
            rt.block_on(api.serve(sh)).join();
        })?);
    }
    Ok(threads)
}

/// A named thread with a current-thread tokio runtime for `body` (the API, the AMQP
/// bridge, the backend delivery). A runtime that cannot be built is logged and the
/// thread ends.
pub(crate) fn runtime_thread(
    name: &str,
    body: impl FnOnce(&tokio::runtime::Runtime) + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let what = name.to_string();
    std::thread::Builder::new()
        .name(what.clone())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => body(&rt),
                Err(e) => tracing::error!(thread = %what, error = %e, "cannot build a runtime"),
            }
        })
}

/// The HTTP API and what drains the bus (the embedded sink, or the AMQP bridge's
/// thread): on a thread of its own, or on the shard's thread when there is one shard.
pub struct ApiPart {
    listener: std::net::TcpListener,
    bus_rx: bus::BusRx,
    backend: Option<JoinHandle<()>>,
}

/// Threads to join once the API has stopped (they flush what they hold).
pub struct ApiThreads(Vec<JoinHandle<()>>);

impl ApiThreads {
    pub fn join(self) {
        for t in self.0 {
            let _ = t.join();
        }
    }
}

impl ApiPart {
    /// Serve until `shared.shutdown` flips (SSE streams end on the same signal; a call
    /// still open 5 s later is cut so the process exits). Call inside a runtime.
    pub async fn serve(self, sh: Arc<Shared>) -> ApiThreads {
        let mut after = Vec::new();
        let sink = Arc::new(bus::sse::SseHub::new(
            bus::sse::SSE_BUFFER_BYTES,
            bus::sse::SSE_BUFFER_EVENTS,
        ));
        // --amqp: the RabbitMQ publisher drains the bus on its own thread (see
        // bus::publisher), joined once the API has stopped so it can flush.
        if sh.config.amqp.is_some() {
            match bus::publisher::spawn(sh.clone(), self.bus_rx, sink.clone()) {
                Ok(t) => after.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start the AMQP bridge thread"),
            }
            // The cluster: its own connection and thread (see cluster::session).
            match cluster::session::spawn(sh.clone()) {
                Ok(t) => after.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start the cluster thread"),
            }
        } else {
            tokio::spawn(bus::embedded::run(sh.clone(), self.bus_rx, sink.clone()));
        }
        after.extend(self.backend);
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot register API listener");
                return ApiThreads(after);
            }
        };
        let mut hard = sh.shutdown.subscribe();
        let allowed = match listener.local_addr() {
            Ok(addr) => api::guard::Allowed::new(
                addr,
                &sh.config.api_allowed_origins,
                &sh.config.api_allowed_hosts,
            ),
            Err(e) => {
                tracing::error!(error = %e, "API listener has no address");
                return ApiThreads(after);
            }
        };
        let app = api::router(api::ApiState {
            shared: sh.clone(),
            sink,
            allowed: Arc::new(allowed),
        });
        let serve = api::serve::serve(listener, app, sh);
        tokio::select! {
            _ = serve => {}
            _ = async move {
                let _ = hard.wait_for(|s| *s).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            } => {}
        }
        ApiThreads(after)
    }
}
