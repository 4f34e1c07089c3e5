//! `loadgen autobahn-client`: loadgen's WebSocket client (`ws.rs`, what every simulated
//! device runs) as the echo client the Autobahn TestSuite's fuzzingserver tests
//! (scripts/autobahn.sh). For each case: connect to `/runCase?case=N&agent=A`, send
//! every text and binary message back as it came, answer the server's close (or fail
//! the connection with the code its error calls for) and wait for the server to close
//! the TCP connection; then `/updateReports?agent=A` writes the suite's report.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::ws::{self, Incoming, Ws, WsError};

#[derive(Debug, Clone, clap::Args)]
pub struct AutobahnArgs {
    /// The fuzzingserver's URL (`wstest -m fuzzingserver`).
    #[arg(long, default_value = "ws://127.0.0.1:9001")]
    pub url: String,
    /// The agent name the cases are reported under.
    #[arg(long, default_value = "loadgen")]
    pub agent: String,
    /// Only these cases (their numbers, 1-based, as the server counts them; repeat or
    /// comma-separate). Default: every case the server has.
    #[arg(long, value_delimiter = ',')]
    pub cases: Vec<u32>,
}

/// Longest one case may take (the suite's own slowest cases take seconds).
const CASE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the client waits for the server's FIN after its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Run the cases; the process's exit code (the verdicts are in the suite's report).
pub fn run(a: &AutobahnArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen autobahn-client: {e}");
            return 1;
        }
    };
    match rt.block_on(run_cases(a)) {
        Ok(n) => {
            println!(
                "loadgen autobahn-client: {n} cases run, report updated for agent {}",
                a.agent
            );
            0
        }
        Err(e) => {
            eprintln!("loadgen autobahn-client: {e}");
            1
        }
    }
}

async fn run_cases(a: &AutobahnArgs) -> Result<usize, String> {
    let (host, _) = ws::split_url(&a.url).ok_or_else(|| format!("not a ws:// URL: {}", a.url))?;
    let count = {
        let mut w = connect(host, "/getCaseCount").await?;
        let n = match w.recv().await {
            Ok(Incoming::Text(t)) => t
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("getCaseCount answered {t:?}"))?,
            other => return Err(format!("getCaseCount answered {other:?}")),
        };
        finish(&mut w).await;
        n
    };
    let cases: Vec<u32> = if a.cases.is_empty() {
        (1..=count).collect()
    } else {
        a.cases.clone()
    };
    for &case in &cases {
        let target = format!("/runCase?case={case}&agent={}", a.agent);
        let w = connect(host, &target).await;
        match w {
            Ok(mut w) => {
                if tokio::time::timeout(CASE_TIMEOUT, echo(&mut w))
                    .await
                    .is_err()
                {
                    eprintln!("case {case}: still running after {CASE_TIMEOUT:?}, dropped");
                }
            }
            // The suite judges what it saw; a refused connect is its verdict too.
            Err(e) => eprintln!("case {case}: {e}"),
        }
    }
    let mut w = connect(host, &format!("/updateReports?agent={}", a.agent)).await?;
    finish(&mut w).await;
    Ok(cases.len())
}

async fn connect(host: &str, target: &str) -> Result<Ws, String> {
    let tcp = TcpStream::connect(host)
        .await
        .map_err(|e| format!("connect {host}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    ws::handshake(tcp, host, target, None)
        .await
        .map_err(|e| format!("upgrade {target}: {}", e.kind()))
}

/// Echo every message until the server closes; then the closing handshake.
async fn echo(w: &mut Ws) {
    loop {
        match w.recv().await {
            Ok(Incoming::Text(t)) => {
                if w.send_message(0x1, t.as_bytes()).await.is_err() {
                    return;
                }
            }
            Ok(Incoming::Binary(b)) => {
                if w.send_message(0x2, &b).await.is_err() {
                    return;
                }
            }
            Ok(Incoming::Close(code)) => {
                // Echo its code (RFC 6455 §5.5.1); an empty close answered empty.
                w.close_and_wait((code != 1005).then_some(code), CLOSE_WAIT)
                    .await;
                return;
            }
            Err(e) => {
                if let Some(code) = e.close_code() {
                    w.close_and_wait(Some(code), CLOSE_WAIT).await;
                }
                return;
            }
        }
    }
}

/// The server speaks, then closes: read to its close, answer it.
async fn finish(w: &mut Ws) {
    loop {
        match w.recv().await {
            Ok(Incoming::Close(code)) => {
                w.close_and_wait((code != 1005).then_some(code), CLOSE_WAIT)
                    .await;
                return;
            }
            Ok(_) => {}
            Err(WsError::Lost) | Err(_) => return,
        }
    }
}
