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
}
