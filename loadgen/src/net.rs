//! Outgoing sockets: spread over local source addresses with IP_BIND_ADDRESS_NO_PORT, so
//! the kernel picks the port at connect time per (source, destination) pair and one host
//! can open far more than ~28k connections to one router address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// Linux's IP_BIND_ADDRESS_NO_PORT (not in every libc crate version).
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

/// `127.0.0.2-127.0.0.250` or a single address or a comma list of either.
pub fn parse_ip_range(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a.trim().parse()?;
                let b: Ipv4Addr = b.trim().parse()?;
                let (lo, hi) = (u32::from(a), u32::from(b));
                anyhow::ensure!(lo <= hi, "empty address range {part}");
                anyhow::ensure!(hi - lo < 65_536, "address range {part} too large");
                out.extend((lo..=hi).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
            }
            None => out.push(part.parse()?),
        }
    }
    anyhow::ensure!(!out.is_empty(), "no source addresses in {spec:?}");
    Ok(out)
}

/// Without --source-ips: a fleet aimed only at loopback spreads over 127.0.0.1-250 by
/// itself. From one source, the kernel's search for a free ephemeral port to the same
/// destination grows with the ports in use (at ~14k connections it took 80% of a
/// worker's CPU in `__inet_hash_connect`); per source address the first port tried is
/// almost always free. Elsewhere the system picks.
pub fn default_sources(dests: &[SocketAddr]) -> Vec<IpAddr> {
    if !dests.is_empty() && dests.iter().all(|d| d.ip().is_loopback() && d.is_ipv4()) {
        (1..=250u8)
            .map(|x| IpAddr::V4(Ipv4Addr::new(127, 0, 0, x)))
            .collect()
    } else {
        Vec::new()
    }
}

pub async fn connect(dest: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = if dest.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = source {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a c_int option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::new(src, 0))?;
    }
    let s = sock.connect(dest).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let v = parse_ip_range("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].to_string(), "127.0.0.4");
        assert_eq!(
            parse_ip_range("127.0.0.9, 127.0.1.1-127.0.1.2")
                .unwrap()
                .len(),
            3
        );
        assert!(parse_ip_range("127.0.0.5-127.0.0.1").is_err());
        assert!(parse_ip_range("nope").is_err());
        assert!(parse_ip_range("").is_err());
    }

    #[test]
    fn loopback_fleets_spread_over_sources() {
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let far: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let v6: SocketAddr = "[::1]:8080".parse().unwrap();
        let s = default_sources(&[lo]);
        assert_eq!(s.len(), 250);
        assert_eq!(s[0].to_string(), "127.0.0.1");
        assert_eq!(s[249].to_string(), "127.0.0.250");
        assert!(default_sources(&[lo, far]).is_empty());
        assert!(default_sources(&[v6]).is_empty());
        assert!(default_sources(&[]).is_empty());
    }
}
