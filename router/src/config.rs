//! Command line and environment configuration: one struct, parsed once in `main`,
//! passed down by reference. Nothing below reads environment variables itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The secret used when none is configured: fine for a laptop, never for a fleet.
/// `router serve` logs a warning when it falls back to it.
pub const DEV_SECRET: &str = "hive-dev-secret";

#[derive(Debug, Parser)]
#[command(
    name = "router",
    version,
    about = "Hive Router: WebSocket gateway for device fleets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: device WebSocket listener, HTTP device API, shards, bus.
    Serve(Box<ServeConfig>),
    /// Print a signed device token (HS256 JWT: sub = device, acc = account, exp).
    Token(TokenArgs),
    /// The configuration file of `router serve --config`: print an example, or check one.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a complete configuration file: every key of `router serve` with its help,
    /// environment variable and default.
    Example,
    /// Check a configuration file (with the environment, as `serve` would read them)
    /// without starting anything.
    Check {
        /// The TOML file.
        #[arg(long, env = "ROUTER_CONFIG")]
        config: PathBuf,
    },
}

/// `--amqp-queue-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// TOML file setting any of these flags by its long name (`max-outbound = 262144`).
    /// Precedence: flag, then environment variable, then the file, then the default; an
    /// unknown key or a bad value stops the start naming the key. `router config example`
    /// prints a complete file.
    #[arg(long, env = "ROUTER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Device WebSocket listener (paths /ws). Shared by all shards with SO_REUSEPORT,
    /// so several router processes may listen on the same port.
    #[arg(long, env = "ROUTER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Backend HTTP API and metrics listener.
    #[arg(long, env = "ROUTER_API", default_value = "127.0.0.1:8081")]
    pub api: SocketAddr,

    /// Number of shards (one OS thread and one single-threaded runtime each).
    /// 0 = number of CPU cores.
    #[arg(long, env = "ROUTER_SHARDS", default_value_t = 0)]
    pub shards: usize,

    /// RabbitMQ URL (amqp://...), or the nodes of one RabbitMQ cluster, comma-separated:
    /// each connection starts at the first and moves on to the next when one fails or is
    /// lost. Absent = embedded in-process bus, no broker needed.
    #[arg(long, env = "ROUTER_AMQP")]
    pub amqp: Option<String>,

    /// Device events the RabbitMQ bridge holds while the broker is unreachable; when
    /// full, the oldest is dropped and counted (router_amqp_dropped_total{reason="buffer_full"}).
    #[arg(long, env = "ROUTER_AMQP_BUFFER", default_value_t = 100_000)]
    pub amqp_buffer: usize,

    /// Publishes to RabbitMQ that may await their publisher confirm at once.
    #[arg(long, env = "ROUTER_AMQP_CONFIRM_WINDOW", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub amqp_confirm_window: u32,

    /// Direct TCP link listener for requests between router nodes (with --amqp):
    /// `auto` (the address this host uses to reach the broker, a free port), an
    /// address `IP:PORT`, or `off` (every envelope through the broker). Peers learn the
    /// address and a per-start token from this node's heartbeats on the broker.
    #[arg(long, env = "ROUTER_CLUSTER_LINK", default_value = "auto")]
    pub cluster_link: String,

    /// Key that seals every envelope between router nodes (HMAC-SHA256; at least 32
    /// bytes): a node drops what does not verify, so broker credentials alone cannot
    /// command devices. Every node of a cluster needs the same key. Absent: derived from
    /// the token secret. Prefer --cluster-key-file or the environment variable.
    #[arg(long, env = "ROUTER_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<String>,

    /// Name of this deployment's cluster (with --amqp): only nodes with the same name
    /// (and key) form one cluster. Two deployments on one broker and vhost with different
    /// names (or secrets) ignore each other instead of merging; a vhost per deployment is
    /// still the cleaner separation (their device events share `hive.events` otherwise).
    #[arg(long, env = "ROUTER_CLUSTER_NAME", default_value = "hive")]
    pub cluster_name: String,

    /// Read the cluster key from this file (trailing newline ignored; at least 32 bytes).
    #[arg(long, env = "ROUTER_CLUSTER_KEY_FILE", conflicts_with = "cluster_key")]
    pub cluster_key_file: Option<PathBuf>,

    /// `HOST:PORT` peers connect to for this node's link, when it differs from the
    /// listener's own address (NAT, a container's published port, a 0.0.0.0 bind).
    #[arg(long, env = "ROUTER_CLUSTER_ADVERTISE")]
    pub cluster_advertise: Option<String>,

    /// PEM CA certificate(s) an `amqps://` broker's certificate is verified against (in
    /// place of the system's roots).
    #[arg(long, env = "ROUTER_AMQP_CA")]
    pub amqp_ca: Option<PathBuf>,

    /// PEM client certificate for `amqps://` (with --amqp-key): for brokers that
    /// require one (RabbitMQ `fail_if_no_peer_cert`, or EXTERNAL authentication).
    #[arg(long, env = "ROUTER_AMQP_CERT", requires = "amqp_key")]
    pub amqp_cert: Option<PathBuf>,

    /// PEM (PKCS#8) private key of --amqp-cert.
    #[arg(long, env = "ROUTER_AMQP_KEY", requires = "amqp_cert")]
    pub amqp_key: Option<PathBuf>,

    /// Type of the durable queue the router declares (--backend-queue): `classic`, or
    /// `quorum` (replicated over a RabbitMQ cluster's nodes: what it holds survives the
    /// loss of a node). A queue that exists already keeps its type (RabbitMQ refuses to
    /// redeclare it as another: delete it first to change).
    #[arg(long, env = "ROUTER_AMQP_QUEUE_TYPE", default_value = "classic")]
    pub amqp_queue_type: QueueType,

    /// Directory for what the router keeps across restarts without a broker (the
    /// embedded bus): the deny-list (`denylist.redb`). Absent: kept in memory only.
    #[arg(long, env = "ROUTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// This node's id (AMQP queue hive.node.<id>). Default: hostname-pid.
    #[arg(long, env = "ROUTER_NODE_ID")]
    pub node_id: Option<String>,

    /// HS256 secret that device tokens are signed with: at least 32 bytes (RFC 7518
    /// §3.2). Prefer --auth-secret-file or the environment variable: a flag is visible to
    /// every user of the machine in `ps`.
    #[arg(long, env = "ROUTER_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,

    /// Read the HS256 secret from this file (trailing newline ignored; at least 32 bytes).
    #[arg(long, env = "ROUTER_AUTH_SECRET_FILE", conflicts_with = "auth_secret")]
    pub auth_secret_file: Option<PathBuf>,

    /// Development mode: without --auth-secret, accept tokens signed with the public
    /// development secret `hive-dev-secret` (anyone can mint them). Without a secret and
    /// without --dev the router refuses to start, unless devices authenticate only by
    /// client certificate (--client-ca) or NervesHub keys (--nerves-keys): then no token
    /// is accepted.
    #[arg(long, env = "ROUTER_DEV")]
    pub dev: bool,

    /// PEM public key(s) device tokens may be signed with (RSA: RS256/384/512 and
    /// PS256/384/512; EC P-256: ES256; P-384: ES384; Ed25519: EdDSA), comma-separated or
    /// repeated. A token with a `kid` header is checked against the key whose file is
    /// named `<kid>.pem`; one without, against every key of its algorithm's type.
    #[arg(long, env = "ROUTER_AUTH_PUBLIC_KEY", value_delimiter = ',')]
    pub auth_public_key: Vec<PathBuf>,

    /// JWKS document of the identity service: a file (read again on SIGHUP) or an
    /// `https://` URL (fetched at start, then refreshed as its Cache-Control max-age says,
    /// within 60 s..24 h, or every --auth-jwks-refresh). A token's `kid` selects the key;
    /// an unknown `kid` fetches the document again (at most once per 10 s).
    #[arg(long, env = "ROUTER_AUTH_JWKS")]
    pub auth_jwks: Option<String>,

    /// PEM CA certificate(s) the JWKS URL's certificate may be signed by (a private CA),
    /// in addition to the system's roots.
    #[arg(long, env = "ROUTER_AUTH_JWKS_CA", requires = "auth_jwks")]
    pub auth_jwks_ca: Option<PathBuf>,

    /// Seconds between JWKS fetches when the answer gives no Cache-Control max-age.
    #[arg(long, env = "ROUTER_AUTH_JWKS_REFRESH", default_value_t = 300, value_parser = clap::value_parser!(u64).range(60..=86_400))]
    pub auth_jwks_refresh: u64,

    /// The `iss` every device token must carry. Absent: not checked.
    #[arg(long, env = "ROUTER_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,

    /// The `aud` every device token must carry (or list). Absent: not checked.
    #[arg(long, env = "ROUTER_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,

    /// Seconds of clock skew allowed on a token's `exp` and `nbf`.
    #[arg(long, env = "ROUTER_AUTH_LEEWAY", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=300))]
    pub auth_leeway: u64,

    /// Longest a device token may still be valid when it is presented, in seconds
    /// (`exp` further away is refused with 4401, reason `lifetime`).
    #[arg(long, env = "ROUTER_AUTH_MAX_TOKEN_LIFETIME", default_value_t = crate::auth::DEFAULT_MAX_TOKEN_LIFETIME, value_parser = clap::value_parser!(u64).range(60..=315_360_000))]
    pub auth_max_token_lifetime: u64,

    /// Close a token-authenticated connection with 4401 `token expired` once its token's
    /// `exp` has passed (checked at each ping), unless the device presented a newer token
    /// on the open connection (Hive: a `Bearer T` text message). Connections
    /// authenticated by certificate or NervesHub signature have no expiry.
    #[arg(long, env = "ROUTER_CLOSE_ON_TOKEN_EXPIRY")]
    pub close_on_token_expiry: bool,

    /// Most devices of one account connected at once in the whole cluster (each node
    /// adds its peers' counts from their heartbeats: up to a second old); beyond it a new
    /// connection is closed with 4429. 0 = no limit.
    #[arg(long, env = "ROUTER_ACCOUNT_MAX_DEVICES", default_value_t = 0)]
    pub account_max_devices: u32,

    /// Messages per second the devices of one account may send to one node (each shard
    /// allows its share); beyond it they are answered `rate-limited`, like a device over
    /// its own rate. 0 = no limit.
    #[arg(long, env = "ROUTER_ACCOUNT_MAX_RATE", default_value_t = 0)]
    pub account_max_rate: u32,

    /// Seconds between WebSocket pings to each device; each pong yields a device-alive event
    /// (at most one per --device-alive-interval).
    #[arg(long, env = "ROUTER_PING_INTERVAL", default_value_t = 30)]
    pub ping_interval: u64,

    /// Seconds between device-alive events of one device (0: one per ping). Idle devices
    /// cost the broker one message each per this period: 1,000 devices at 30 s are 33
    /// messages/s; set it above the ping interval to keep pinging often (dead
    /// connections found fast) while the backend hears of each device less often.
    #[arg(long, env = "ROUTER_DEVICE_ALIVE_INTERVAL", default_value_t = 0)]
    pub device_alive_interval: u64,

    /// The realm every Hivekit device (`/v1/ws`) lives in. Absent: each device's realm is
    /// its account UUID (the token's `acc`).
    #[arg(long, env = "ROUTER_HIVEKIT_REALM", value_parser = parse_realm)]
    pub hivekit_realm: Option<String>,

    /// NervesHub shared-secret authentication: a TOML file of `[[device]]` keys (`key`,
    /// `secret`, `identifier`, `device` UUID, `account` UUID) and `[[product]]` keys
    /// (`key` = nhp_..., `secret`, `account`). Read again on SIGHUP. Absent: devices
    /// sending `x-nh-*` headers are refused (401).
    #[arg(long, env = "ROUTER_NERVES_KEYS")]
    pub nerves_keys: Option<PathBuf>,

    /// Fewest PBKDF2 iterations a shared-secret signature may use (`x-nh-alg`).
    #[arg(long, env = "ROUTER_NERVES_MIN_ITERATIONS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub nerves_min_iterations: u32,

    /// Oldest a shared-secret signature may be, in seconds (NervesHub: 90).
    #[arg(long, env = "ROUTER_NERVES_MAX_AGE", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub nerves_max_age: u64,

    /// NervesHub extensions a device may attach (comma-separated, e.g. `health,geo`):
    /// offered to devices of API 2.2.0 and later (`extensions:get`) and accepted at their
    /// `extensions` join. Empty: no extensions.
    #[arg(
        long,
        env = "ROUTER_NERVES_EXTENSIONS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub nerves_extensions: Vec<String>,

    /// Accept permessage-deflate when a device offers it (NervesHub devices do), without
    /// context takeover: each message compressed on its own, no compressor kept between
    /// messages. Only for devices that authenticate on the upgrade request (header,
    /// query, certificate, shared secret). Costs CPU per message; see docs/performance.md.
    #[arg(long, env = "ROUTER_PERMESSAGE_DEFLATE")]
    pub permessage_deflate: bool,

    /// Seconds a connection may stay unauthenticated before it is closed with 4408.
    #[arg(long, env = "ROUTER_AUTH_TIMEOUT", default_value_t = 10)]
    pub auth_timeout: u64,

    /// Largest WebSocket message (after reassembly) a device may send, in bytes; larger closes with 1009.
    #[arg(long, env = "ROUTER_MAX_FRAME", default_value_t = 64 * 1024)]
    pub max_frame: usize,

    /// Frames one WebSocket message may be split into (each also costs a --device-rate
    /// token); more closes with 1009.
    #[arg(long, env = "ROUTER_MAX_FRAGMENTS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_fragments: u32,

    /// Serve a WebSocket conformance echo at `/conformance/echo` (token required, as on
    /// `/ws`): every text and binary message sent back as it came, through the same
    /// connection code as devices, for the Autobahn TestSuite (scripts/autobahn.sh).
    /// Nothing it receives reaches the bus. A test setting: a command-line flag only (no
    /// environment variable, no config file key), never for a deployment.
    #[arg(long)]
    pub websocket_conformance_echo: bool,

    /// Default timeout of a request sent through the HTTP API when the body gives no timeout_ms.
    #[arg(long, env = "ROUTER_REQUEST_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=300_000))]
    pub request_timeout_ms: u64,

    /// Bytes that may wait in one device's outbound queue (slow reader); beyond it events
    /// to that device are dropped and counted, and requests are refused with HTTP 503.
    #[arg(long, env = "ROUTER_MAX_OUTBOUND", default_value_t = 256 * 1024)]
    pub max_outbound: usize,

    /// Capacity of each bounded cross-thread queue (shard inboxes, bus).
    #[arg(long, env = "ROUTER_QUEUE_CAPACITY", default_value_t = 65_536)]
    pub queue_capacity: usize,

    /// Keep transparent huge pages for the router process. By default `router serve`
    /// turns them off for itself (prctl PR_SET_THP_DISABLE): where the kernel's THP mode
    /// is `always`, the allocator's heap was faulted in 2 MiB at a time, which nearly
    /// doubled the router's memory for the same devices and gained no throughput here.
    #[arg(long, env = "ROUTER_TRANSPARENT_HUGEPAGES")]
    pub transparent_hugepages: bool,

    /// Bearer token the HTTP API requires (`Authorization: Bearer T`); /healthz and
    /// /readyz stay open. Absent = no API auth (the API binds to loopback by default).
    #[arg(long, env = "ROUTER_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Messages per second one device may send (token bucket refill rate).
    #[arg(long, env = "ROUTER_DEVICE_RATE", default_value_t = 100)]
    pub device_rate: u32,

    /// Burst of messages above the rate one device may send; excess is answered with
    /// `rate-limited`, and another burst's worth of excess closes it with 1008.
    #[arg(long, env = "ROUTER_DEVICE_BURST", default_value_t = 200)]
    pub device_burst: u32,

    /// New connections per second accepted from one source IP (per shard); beyond it
    /// the upgrade is refused with HTTP 429. 0 = no limit.
    #[arg(long, env = "ROUTER_IP_CONNECT_RATE", default_value_t = 0)]
    pub ip_connect_rate: u32,

    /// Open device connections this process accepts (authenticated or not); beyond it
    /// new upgrades get HTTP 503 at once. Keep it below the open-file limit with headroom.
    #[arg(long, env = "ROUTER_MAX_CONNECTIONS", default_value_t = 18_000)]
    pub max_connections: usize,

    /// PROXY protocol header required on the device listener, from an L4 load balancer
    /// in front: off, v1, v2 or any. The header's client address is then the device's
    /// address (per-IP connect rate, device-alive, the API); a connection without a
    /// valid header is closed (router_proxy_protocol_refused_total).
    #[arg(long, env = "ROUTER_PROXY_PROTOCOL", default_value = "off")]
    pub proxy_protocol: crate::listener::proxy::Mode,

    /// TCP_DEFER_ACCEPT on the device listener, in seconds: a connection reaches the
    /// router only once its first bytes (the upgrade request) are in, one wake-up less
    /// per connect; a silent one holds no descriptor meanwhile (the kernel keeps it and
    /// hands it over after about this long). 0 = off.
    #[arg(long, env = "ROUTER_DEFER_ACCEPT", default_value_t = 1)]
    pub defer_accept: u32,

    /// On SIGTERM: seconds over which devices are closed with 1001 (spread, so they do
    /// not all reconnect at once) while in-flight requests finish.
    #[arg(long, env = "ROUTER_DRAIN_SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,

    /// PEM certificate chain for wss:// on the device listener (with --tls-key).
    #[arg(long, env = "ROUTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "ROUTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: a device presenting a certificate signed by it is authenticated by
    /// it (device UUID = subject CN, account UUID = --mtls-account-field), no token needed.
    #[arg(long, env = "ROUTER_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,

    /// Which subject field of a client certificate holds the account UUID: ou, o or uid.
    #[arg(long, env = "ROUTER_MTLS_ACCOUNT_FIELD", default_value = "ou", value_parser = ["ou", "o", "uid"])]
    pub mtls_account_field: String,

    // --- Backend delivery (`backend`): hive.events -> HTTP POST to the backend ---
    /// Deliver device events to this backend URL by HTTP POST (batched JSON arrays),
    /// consuming them from RabbitMQ: requires --amqp. Absent = no backend delivery.
    #[arg(long, env = "ROUTER_BACKEND_URL", requires = "amqp")]
    pub backend_url: Option<String>,

    /// Durable queue the backend delivery consumes (shared by every router node).
    #[arg(long, env = "ROUTER_BACKEND_QUEUE", default_value = "hive.backend")]
    pub backend_queue: String,

    /// Routing keys binding --backend-queue to hive.events, comma-separated.
    #[arg(
        long,
        env = "ROUTER_BACKEND_BINDINGS",
        default_value = "#",
        value_delimiter = ','
    )]
    pub backend_bindings: Vec<String>,

    /// Deliveries unacked at once (basic.qos prefetch) on the backend consumer.
    #[arg(long, env = "ROUTER_BACKEND_PREFETCH", default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
    pub backend_prefetch: u16,

    /// Most events in one POST to the backend.
    #[arg(long, env = "ROUTER_BACKEND_BATCH", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub backend_batch: u32,

    /// Milliseconds a batch waits for more events after its first one.
    #[arg(long, env = "ROUTER_BACKEND_BATCH_WAIT_MS", default_value_t = 20)]
    pub backend_batch_wait_ms: u64,

    /// Timeout of one POST to the backend, milliseconds.
    #[arg(long, env = "ROUTER_BACKEND_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub backend_timeout_ms: u64,

    /// PEM CA certificate(s) an https:// backend's certificate may be signed by, in
    /// addition to the system's roots (a private CA).
    #[arg(long, env = "ROUTER_BACKEND_CA", requires = "backend_url")]
    pub backend_ca: Option<PathBuf>,

    /// Sent to the backend as `Authorization: Bearer T`. Never logged.
    #[arg(long, env = "ROUTER_BACKEND_TOKEN", hide_env_values = true)]
    pub backend_token: Option<String>,

    // --- Budgets of what an unauthenticated peer or an API client may hold ---
    /// Device connections this process holds unauthenticated at once (upgrading, or
    /// upgraded and waiting for a `Bearer` frame); at most half of --max-connections
    /// counts, so authenticated devices always have the other half. Beyond it a new
    /// connection that does not bring its credentials on the upgrade request within 1 s
    /// is refused with HTTP 503. Connections whose upgrade request carries them are
    /// authenticated at once and never count.
    #[arg(long, env = "ROUTER_MAX_UNAUTHENTICATED", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unauthenticated: u32,

    /// Unauthenticated device connections one source IP may hold at once (with
    /// --proxy-protocol, the header's address); beyond it new ones that are not
    /// authenticated at accept are refused with HTTP 429. 0 = no limit (behind a
    /// balancer that sends no PROXY header, every device has its address).
    #[arg(long, env = "ROUTER_MAX_UNAUTHENTICATED_PER_IP", default_value_t = 512)]
    pub max_unauthenticated_per_ip: u32,

    /// Pings a device may send before it is authenticated (each answered); one more
    /// closes it with 1008.
    #[arg(long, env = "ROUTER_MAX_UNAUTHENTICATED_PINGS", default_value_t = 5)]
    pub max_unauthenticated_pings: u32,

    /// Requests waiting for one device's ack or response at once; beyond it the API
    /// answers 429 `too-many-pending`.
    #[arg(long, env = "ROUTER_MAX_PENDING", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending: u32,

    /// Open connections the HTTP API serves at once; beyond it a new one is answered
    /// 503 and closed. Every API connection must send its request headers within 10 s.
    #[arg(long, env = "ROUTER_API_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub api_max_connections: u32,

    /// Open `/v1/events` streams at once; beyond it a new subscriber gets 503.
    #[arg(long, env = "ROUTER_MAX_SSE_SUBSCRIBERS", default_value_t = 64)]
    pub max_sse_subscribers: u32,

    /// Origins (`https://console.example.com`, comma-separated) whose browser pages may
    /// call the API. A request with any other `Origin` header is refused with 403
    /// (the API's own address, `localhost` and loopback addresses on its port are
    /// always allowed); requests without one (curl, backends) are not affected.
    #[arg(long, env = "ROUTER_API_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub api_allowed_origins: Vec<String>,

    /// Host names (comma-separated, `name` or `name:port`) the API answers to besides IP
    /// addresses and `localhost`: a request whose `Host` is another name is refused
    /// with 403 (DNS rebinding).
    #[arg(long, env = "ROUTER_API_ALLOWED_HOSTS", value_delimiter = ',')]
    pub api_allowed_hosts: Vec<String>,
}

impl ServeConfig {
    /// Number of shards after resolving 0 to the core count.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The token secret: --auth-secret, else --auth-secret-file, else the dev secret with
    /// --dev, else none (only with another way for devices to authenticate: public keys,
    /// certificates, NervesHub keys). A secret
    /// shorter than [`MIN_SECRET_LEN`](crate::auth::MIN_SECRET_LEN) bytes, an empty one
    /// included, is an error, and so is no secret at all with nothing else configured.
    pub fn secret(&self) -> anyhow::Result<TokenSecret> {
        use crate::auth::MIN_SECRET_LEN;
        let (given, from) = if let Some(s) = &self.auth_secret {
            (s.clone(), "--auth-secret")
        } else if let Some(path) = &self.auth_secret_file {
            let s = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("reading --auth-secret-file {}: {e}", path.display())
            })?;
            (
                s.trim_end_matches(['\r', '\n']).to_string(),
                "--auth-secret-file",
            )
        } else if self.dev {
            return Ok(TokenSecret::Dev);
        } else if !self.auth_public_key.is_empty()
            || self.auth_jwks.is_some()
            || self.client_ca.is_some()
            || self.nerves_keys.is_some()
        {
            return Ok(TokenSecret::None);
        } else {
            anyhow::bail!(
                "no token secret and no public key: give --auth-public-key or --auth-jwks (tokens \
                 from your identity service), or --auth-secret-file FILE (or ROUTER_AUTH_SECRET) \
                 with at least {MIN_SECRET_LEN} random bytes, e.g. from `openssl rand -hex 32`; \
                 or --dev to accept tokens signed with the public development secret (anyone can \
                 mint them: for a laptop, never for a fleet)"
            );
        };
        if given.len() < MIN_SECRET_LEN {
            anyhow::bail!(
                "{from} is {} bytes: an HS256 secret must have at least {MIN_SECRET_LEN} \
                 (RFC 7518 §3.2; a short one can be found offline from a single token), \
                 e.g. from `openssl rand -hex 32`",
                given.len()
            );
        }
        Ok(TokenSecret::Secret(given))
    }

    /// The shortest gap between two device-alive events of one device, in seconds: half
    /// a ping interval (so every solicited pong counts, a device spraying unsolicited
    /// pongs does not), or --device-alive-interval less that half when it is longer.
    pub fn device_alive_gap(&self) -> u64 {
        let half = self.ping_interval / 2;
        self.device_alive_interval.saturating_sub(half).max(half)
    }

    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "node".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// A config for tests and embedding: loopback, ephemeral ports.
    pub fn for_tests(secret: &str) -> Self {
        ServeConfig {
            config: None,
            listen: "127.0.0.1:0".parse().expect("literal addr"),
            api: "127.0.0.1:0".parse().expect("literal addr"),
            shards: 2,
            amqp: None,
            amqp_buffer: 100_000,
            amqp_confirm_window: 1000,
            cluster_link: "auto".into(),
            amqp_queue_type: QueueType::Classic,
            amqp_ca: None,
            amqp_cert: None,
            amqp_key: None,
            cluster_advertise: None,
            cluster_key: None,
            cluster_key_file: None,
            cluster_name: "hive".into(),
            // Unique: nodes sharing a broker must have distinct ids.
            node_id: Some(format!("test-{}", uuid::Uuid::new_v4().simple())),
            data_dir: None,
            auth_secret: Some(secret.into()),
            auth_secret_file: None,
            dev: false,
            auth_public_key: Vec::new(),
            auth_jwks: None,
            auth_jwks_ca: None,
            auth_jwks_refresh: 300,
            auth_issuer: None,
            auth_audience: None,
            auth_leeway: 5,
            auth_max_token_lifetime: crate::auth::DEFAULT_MAX_TOKEN_LIFETIME,
            close_on_token_expiry: false,
            account_max_devices: 0,
            account_max_rate: 0,
            ping_interval: 30,
            device_alive_interval: 0,
            auth_timeout: 10,
            hivekit_realm: None,
            nerves_keys: None,
            permessage_deflate: false,
            nerves_min_iterations: 1000,
            nerves_max_age: 90,
            nerves_extensions: Vec::new(),
            max_frame: 64 * 1024,
            max_fragments: 1024,
            websocket_conformance_echo: false,
            request_timeout_ms: 10_000,
            max_outbound: 256 * 1024,
            queue_capacity: 65_536,
            transparent_hugepages: false,
            api_token: None,
            device_rate: 100,
            device_burst: 200,
            ip_connect_rate: 0,
            max_connections: 18_000,
            defer_accept: 1,
            proxy_protocol: crate::listener::proxy::Mode::Off,
            drain_seconds: 2,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            mtls_account_field: "ou".into(),
            backend_url: None,
            backend_queue: "hive.backend".into(),
            backend_bindings: vec!["#".into()],
            backend_prefetch: 1000,
            backend_batch: 100,
            backend_batch_wait_ms: 20,
            backend_timeout_ms: 5000,
            backend_token: None,
            backend_ca: None,
            max_unauthenticated: 2000,
            max_unauthenticated_per_ip: 512,
            max_unauthenticated_pings: 5,
            max_pending: 256,
            api_max_connections: 1024,
            max_sse_subscribers: 64,
            api_allowed_origins: Vec::new(),
            api_allowed_hosts: Vec::new(),
        }
    }
}

impl ServeConfig {
    /// The cluster key's bytes: --cluster-key, else --cluster-key-file; None: derive it
    /// from the token secret. Shorter than 32 bytes is an error.
    pub fn cluster_key(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let (key, from) = if let Some(k) = &self.cluster_key {
            (k.clone(), "--cluster-key")
        } else if let Some(path) = &self.cluster_key_file {
            let s = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("reading --cluster-key-file {}: {e}", path.display())
            })?;
            (
                s.trim_end_matches(['\r', '\n']).to_string(),
                "--cluster-key-file",
            )
        } else {
            return Ok(None);
        };
        if key.len() < 32 {
            anyhow::bail!(
                "{from} is {} bytes: the cluster key must have at least 32 (e.g. from \
                 `openssl rand -hex 32`)",
                key.len()
            );
        }
        Ok(Some(key.into_bytes()))
    }
}

/// Where device tokens are checked against (see [`ServeConfig::secret`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSecret {
    /// The operator's secret.
    Secret(String),
    /// --dev: the public development secret.
    Dev,
    /// No secret and no --dev, devices authenticate otherwise: no HS256 token is accepted.
    None,
}

/// A realm name: 1 to 128 bytes, no control characters.
fn parse_realm(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > crate::protocol::hivekit::MAX_NAME
        || s.chars().any(char::is_control)
    {
        return Err(format!(
            "a realm is 1 to {} bytes without control characters",
            crate::protocol::hivekit::MAX_NAME
        ));
    }
    Ok(s.into())
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Device UUID (the token's `sub`).
    #[arg(long)]
    pub device: uuid::Uuid,
    /// Account UUID (the token's `acc`).
    #[arg(long)]
    pub account: uuid::Uuid,
    /// Seconds until the token expires: at most --auth-max-token-lifetime.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl: u64,
    /// The longest --ttl allowed: the same setting as `router serve`'s (a longer token
    /// would be refused there).
    #[arg(long, env = "ROUTER_AUTH_MAX_TOKEN_LIFETIME", default_value_t = crate::auth::DEFAULT_MAX_TOKEN_LIFETIME, value_parser = clap::value_parser!(u64).range(60..=315_360_000))]
    pub auth_max_token_lifetime: u64,
    /// HS256 secret, at least 32 bytes (prefer the environment variable: a flag shows in
    /// `ps`).
    #[arg(long, env = "ROUTER_AUTH_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Sign with the public development secret (what `router serve --dev` accepts) when
    /// no --secret is given.
    #[arg(long, env = "ROUTER_DEV")]
    pub dev: bool,
}

impl TokenArgs {
    /// The secret to sign with, or why this token cannot be minted.
    pub fn secret(&self) -> anyhow::Result<String> {
        use crate::auth::MIN_SECRET_LEN;
        if self.ttl > self.auth_max_token_lifetime {
            anyhow::bail!(
                "--ttl {} is longer than --auth-max-token-lifetime {}: the router would refuse \
                 this token",
                self.ttl,
                self.auth_max_token_lifetime
            );
        }
        match &self.secret {
            Some(s) if s.len() < MIN_SECRET_LEN => anyhow::bail!(
                "--secret is {} bytes: an HS256 secret must have at least {MIN_SECRET_LEN}",
                s.len()
            ),
            Some(s) => Ok(s.clone()),
            None if self.dev => Ok(DEV_SECRET.to_string()),
            None => anyhow::bail!(
                "no --secret (or ROUTER_AUTH_SECRET): give the router's secret, or --dev for \
                 the public development secret"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ServeConfig;

    #[test]
    fn device_alive_gap_is_half_a_ping_or_the_interval_less_that() {
        let mut c = ServeConfig::for_tests("s");
        c.ping_interval = 30;
        assert_eq!(c.device_alive_gap(), 15);
        c.device_alive_interval = 10; // shorter than a ping: one per ping
        assert_eq!(c.device_alive_gap(), 15);
        c.device_alive_interval = 120; // pongs at 0, 30, .. 120: events at 0 and 120
        assert_eq!(c.device_alive_gap(), 105);
    }
}
