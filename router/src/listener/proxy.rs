//! The PROXY protocol (versions 1 and 2, as HAProxy specifies them) on the device
//! listener (`--proxy-protocol`): behind an L4 load balancer every connection comes from
//! the balancer's address; the balancer says where it really came from in a header
//! before anything else. With the header required, the device's address the router uses
//! (per-IP connect rate, `device-alive`'s `address`, the API's `address`) is the one the
//! header names, and a connection without a valid header is closed
//! (`router_proxy_protocol_refused_total`).
//!
//! The header is read with `peek` and then consumed to the byte, so what follows it (an
//! HTTP upgrade, or a TLS ClientHello) is left in the socket for the usual path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Which header versions the listener requires (`off`: none is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    V1,
    V2,
    Any,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Mode::Off),
            "v1" => Ok(Mode::V1),
            "v2" => Ok(Mode::V2),
            "any" => Ok(Mode::Any),
            other => Err(format!("expected off, v1, v2 or any, got {other:?}")),
        }
    }
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Room for a v2 header with its TLVs (the address block's length is 16 bits, but
/// balancers send at most a few hundred bytes).
const MAX_HEADER: usize = 16 + 1024;

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Not enough bytes yet.
    Incomplete,
    /// A header of `len` bytes. `source`: the client's address, or None when the header
    /// says the connection is the balancer's own (v2 LOCAL, v1 UNKNOWN, a family other
    /// than TCP over IPv4/IPv6): then the connection's own address stands.
    Header {
        source: Option<SocketAddr>,
        len: usize,
    },
    Invalid(&'static str),
}

/// Parse a header at the start of `buf`, as `mode` allows.
pub(crate) fn parse(buf: &[u8], mode: Mode) -> Parsed {
    let v1 = matches!(mode, Mode::V1 | Mode::Any);
    let v2 = matches!(mode, Mode::V2 | Mode::Any);
    let n = buf.len().min(V2_SIGNATURE.len());
    if v2 && buf[..n] == V2_SIGNATURE[..n] {
        if n < V2_SIGNATURE.len() {
            return Parsed::Incomplete;
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if v1 && buf[..n] == b"PROXY "[..n] {
        if n < 6 {
            return Parsed::Incomplete;
        }
        return parse_v1(buf);
    }
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    Parsed::Invalid("no PROXY protocol header")
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1 header longer than 107 bytes")
        } else {
            Parsed::Incomplete
        };
    };
    let len = end + 2;
    let Ok(line) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Invalid("PROXY v1 header is not text");
    };
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Parsed::Header { source: None, len },
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let (Ok(src), Ok(_dst), Ok(sport), Ok(_dport)) = (
                src.parse::<IpAddr>(),
                dst.parse::<IpAddr>(),
                sport.parse::<u16>(),
                dport.parse::<u16>(),
            ) else {
                return Parsed::Invalid("PROXY v1 header with a bad address or port");
            };
            if (*fam == "TCP4") != src.is_ipv4() {
                return Parsed::Invalid("PROXY v1 address does not match its family");
            }
            Parsed::Header {
                source: Some(SocketAddr::new(src, sport)),
                len,
            }
        }
        _ => Parsed::Invalid("malformed PROXY v1 header"),
    }
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("PROXY v2 header with another version");
    }
    let fam = buf[13];
    let addr_len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + addr_len;
    if len > MAX_HEADER {
        return Parsed::Invalid("PROXY v2 header too long");
    }
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    let a = &buf[16..len];
    match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection (a health check).
        0x0 => Parsed::Header { source: None, len },
        0x1 => {
            let source = match fam {
                // TCP over IPv4: src, dst, sport, dport.
                0x11 if a.len() >= 12 => Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
                    u16::from_be_bytes([a[8], a[9]]),
                )),
                0x21 if a.len() >= 36 => {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&a[..16]);
                    Some(SocketAddr::new(
                        IpAddr::V6(Ipv6Addr::from(ip)),
                        u16::from_be_bytes([a[32], a[33]]),
                    ))
                }
                0x11 | 0x21 => return Parsed::Invalid("PROXY v2 address block too short"),
                // UNSPEC, UDP, unix sockets: keep the connection's address.
                _ => None,
            };
            Parsed::Header { source, len }
        }
        _ => Parsed::Invalid("PROXY v2 header with an unknown command"),
    }
}

/// Read the header off `stream` (peeked, then consumed exactly). Ok: the client's
/// address if the header names one. Err: why the connection is refused.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    mode: Mode,
    within: Duration,
) -> Result<Option<SocketAddr>, &'static str> {
    let mut buf = vec![0u8; MAX_HEADER];
    let read = async {
        loop {
            stream
                .readable()
                .await
                .map_err(|_| "connection failed before its PROXY header")?;
            let n = match stream.peek(&mut buf).await {
                Ok(0) => return Err("connection closed before its PROXY header"),
                Ok(n) => n,
                Err(_) => return Err("connection failed before its PROXY header"),
            };
            match parse(&buf[..n], mode) {
                Parsed::Header { source, len } => {
                    let mut header = vec![0u8; len];
                    stream
                        .read_exact(&mut header)
                        .await
                        .map_err(|_| "connection failed in its PROXY header")?;
                    return Ok(source);
                }
                Parsed::Invalid(why) => return Err(why),
                // The bytes that are there stay readable: wait a little for the rest
                // instead of peeking in a loop.
                Parsed::Incomplete => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .unwrap_or(Err("no PROXY header in time"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, addr: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        h.extend_from_slice(addr);
        h
    }

    #[test]
    fn version_1() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\nGET / HTTP/1.1";
        assert_eq!(
            parse(h, Mode::V1),
            Parsed::Header {
                source: Some("192.0.2.7:51000".parse().unwrap()),
                len: 45
            }
        );
        assert_eq!(
            parse(h, Mode::V2),
            Parsed::Invalid("no PROXY protocol header")
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(
            parse(h6, Mode::Any),
            Parsed::Header {
                source: Some("[2001:db8::1]:4000".parse().unwrap()),
                len: h6.len()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n", Mode::V1),
            Parsed::Header {
                source: None,
                len: 15
            }
        );
        // Every cut of a good header is incomplete, not invalid.
        for cut in 0..h.len().min(44) {
            assert_eq!(parse(&h[..cut], Mode::Any), Parsed::Incomplete, "{cut}");
        }
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 51000\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 300.0.0.1 198.51.100.1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            b"GET /ws HTTP/1.1\r\n",
        ] {
            assert!(
                matches!(parse(bad, Mode::Any), Parsed::Invalid(_)),
                "{bad:?}"
            );
        }
        let long = [b"PROXY ".to_vec(), vec![b'1'; 200]].concat();
        assert!(matches!(parse(&long, Mode::V1), Parsed::Invalid(_)));
    }

    #[test]
    fn version_2() {
        let mut addr = vec![192, 0, 2, 7, 198, 51, 100, 1];
        addr.extend_from_slice(&51000u16.to_be_bytes());
        addr.extend_from_slice(&443u16.to_be_bytes());
        let mut h = v2(1, 0x11, &addr);
        let len = h.len();
        h.extend_from_slice(b"\x16\x03\x01"); // a TLS record follows
        assert_eq!(
            parse(&h, Mode::V2),
            Parsed::Header {
                source: Some("192.0.2.7:51000".parse().unwrap()),
                len
            }
        );
        assert_eq!(
            parse(&h, Mode::V1),
            Parsed::Invalid("no PROXY protocol header")
        );
        for cut in 0..len {
            assert_eq!(parse(&h[..cut], Mode::Any), Parsed::Incomplete, "{cut}");
        }
        let mut a6 = vec![0u8; 36];
        a6[0] = 0x20;
        a6[1] = 0x01;
        a6[15] = 9;
        a6[32..34].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &a6), Mode::Any),
            Parsed::Header {
                source: Some("[2001::9]:7".parse().unwrap()),
                len: 52
            }
        );
        // LOCAL (a health check) and UNSPEC keep the connection's own address.
        assert_eq!(
            parse(&v2(0, 0x00, &[]), Mode::V2),
            Parsed::Header {
                source: None,
                len: 16
            }
        );
        assert!(matches!(
            parse(&v2(1, 0x11, &[1, 2, 3]), Mode::V2),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(&v2(5, 0x11, &addr), Mode::V2),
            Parsed::Invalid(_)
        ));
        let mut wrong_version = v2(1, 0x11, &addr);
        wrong_version[12] = 0x11;
        assert!(matches!(
            parse(&wrong_version, Mode::V2),
            Parsed::Invalid(_)
        ));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&huge, Mode::V2), Parsed::Invalid(_)));
    }
}
