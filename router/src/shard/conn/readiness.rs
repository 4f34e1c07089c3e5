//! A connection's side of the shard's poller: starting and resuming reads, readiness
//! events, the linger after a close, and the interest the shard registers for it.

use std::io::{self, Read};

use super::{Conn, Linger, Phase, Reads, READS_PER_WAKE};
use crate::shard::poller::{HUP_ERR, IN, OUT};
use crate::shard::ShardCtx;

impl Conn {
    /// Just adopted: bytes that came with the handshake, and what rustls already holds.
    pub fn start(&mut self, ctx: &mut ShardCtx, mut leftover: Vec<u8>) {
        if !leftover.is_empty() {
            self.on_bytes(ctx, &mut leftover);
        }
        if self.st.tls.is_some() {
            self.drain_plaintext(ctx);
        }
    }

    /// Backpressure is over: handle the bytes that waited, then what rustls holds.
    pub fn resume(&mut self, ctx: &mut ShardCtx) {
        if self.is_done() {
            return;
        }
        self.on_bytes(ctx, &mut []);
        if self.st.tls.is_some() {
            self.drain_plaintext(ctx);
        }
    }

    /// Readiness reported by the shard's poller.
    pub fn on_event(&mut self, ctx: &mut ShardCtx, events: u32) {
        let lingering = matches!(
            self.st.phase,
            Phase::Closing {
                linger: Linger::Started | Linger::WriteShut,
                ..
            }
        );
        if events & (IN | HUP_ERR) != 0 {
            if lingering && !self.reads_while_closing() {
                self.linger_read(ctx);
            } else if !self.is_done() {
                self.on_readable(ctx);
            }
        }
        if events & OUT != 0 {
            self.flush();
        }
    }

    /// While closing: discard what the peer still sends until its FIN.
    fn linger_read(&mut self, ctx: &mut ShardCtx) {
        let mut buf = std::mem::take(&mut ctx.read_buf);
        for _ in 0..READS_PER_WAKE {
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.st.phase = Phase::Dead;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.st.phase = Phase::Dead;
                    break;
                }
            }
        }
        ctx.read_buf = buf;
    }

    /// After any change: the events to wait for next, or None when the connection is
    /// finished (the socket is gone, or the peer completed the close) and must be
    /// released. Sets `started_linger` the first time it finds the connection closing,
    /// so the shard starts the linger deadline.
    pub fn settle(&mut self, started_linger: &mut bool) -> Option<u32> {
        let phase = self.st.phase;
        match phase {
            Phase::Dead => return None,
            Phase::Open => {}
            Phase::Closing { .. } => return self.settle_closing(started_linger),
        }
        Some(if self.has_out() { IN | OUT } else { IN })
    }

    /// A closing connection: the linger starts (the first time), what is queued goes
    /// out, then our write side is shut down and the peer's FIN awaited; or, when the
    /// peer closed first, the connection is finished once its answer is out.
    fn settle_closing(&mut self, started_linger: &mut bool) -> Option<u32> {
        {
            let st = &mut self.st;
            if let Phase::Closing { linger, .. } = &mut st.phase {
                if *linger == Linger::NotStarted {
                    *linger = Linger::Started;
                    *started_linger = true;
                    if let Some(tls) = st.tls.as_mut() {
                        tls.send_close_notify();
                    }
                }
            }
        }
        self.flush();
        let st = &mut self.st;
        let has_out = st.has_out();
        let Phase::Closing { reads, linger } = &mut st.phase else {
            // Flushing found the socket gone.
            return None;
        };
        if has_out {
            return Some(IN | OUT);
        }
        // RFC 6455 §7.1.1: after the close handshake the server closes the TCP
        // connection first. The peer has said its last word; close, and its FIN
        // needs no waiting for.
        if *reads == Reads::PeerClosed {
            return None;
        }
        if *linger != Linger::WriteShut {
            *linger = Linger::WriteShut;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Some(IN)
    }

    /// The registered interest, updated when `want` differs; Some(want) if it changed.
    pub fn set_interest(&mut self, want: u32) -> Option<u32> {
        let st = &mut self.st;
        (st.interest != want).then(|| {
            st.interest = want;
            want
        })
    }
}
