//! Packet captures for tests: `tcpdump` on an interface of a network namespace, and a reader
//! of the classic pcap format (Ethernet, IPv4, TCP) that rebuilds TCP flows and checks how
//! they begin (a TLS 1.3 ClientHello, then a ServerHello choosing TLS 1.3).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::KitError;

/// A running `tcpdump -w` (stopped on [`Capture::stop`] or drop).
pub struct Capture {
    child: Option<Child>,
    /// The pcap file.
    pub path: PathBuf,
}

impl Capture {
    /// Captures the TCP packets on `iface` of network namespace `ns` into `path` (whole
    /// packets, written as they come); returns once tcpdump listens.
    pub fn start(ns: &str, iface: &str, path: &Path) -> Result<Self, KitError> {
        let log = path.with_extension("log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-i", iface, "-n", "-s", "0"])
            // Each packet to the file as it comes (not in kernel blocks of up to a second).
            .args(["--immediate-mode", "-U"])
            .arg("-w")
            .arg(path)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening on") {
                return Ok(Self {
                    child: Some(child),
                    path: path.to_owned(),
                });
            }
            if child.try_wait()?.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(KitError::NotReady(format!(
                    "tcpdump on {ns}/{iface}: {text}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops tcpdump once it has written everything sent before: it opens a TCP connection to
    /// `marker` (an address whose packets cross the interface; refused or not) and waits for
    /// its SYN in the file (tcpdump drops what it has not read yet when it stops). Returns the
    /// capture without the marker's packets.
    pub fn stop_after(mut self, marker: SocketAddrV4) -> Result<Vec<Packet>, KitError> {
        let _ = std::net::TcpStream::connect_timeout(&marker.into(), Duration::from_secs(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = loop {
            let packets = read(&std::fs::read(&self.path)?)?;
            if packets.iter().any(|p| p.dst == marker) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.terminate();
        if !seen {
            return Err(bad(&format!(
                "the marker connection to {marker} never showed"
            )));
        }
        Ok(read(&std::fs::read(&self.path)?)?
            .into_iter()
            .filter(|p| p.src != marker && p.dst != marker)
            .collect())
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// One TCP segment of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Source.
    pub src: SocketAddrV4,
    /// Destination.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// SYN without ACK: the opening of a connection.
    pub syn: bool,
    /// The TCP payload.
    pub payload: Vec<u8>,
}

fn bad(m: &str) -> KitError {
    KitError::NotReady(format!("pcap: {m}"))
}

/// The TCP/IPv4 segments of a classic pcap file (either byte order, micro- or nanosecond
/// timestamps) of Ethernet frames; other frames are skipped.
pub fn read(data: &[u8]) -> Result<Vec<Packet>, KitError> {
    if data.len() < 24 {
        return Err(bad("shorter than its header"));
    }
    let magic = [data[0], data[1], data[2], data[3]];
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return Err(bad("not a pcap file")),
    };
    let u32_at = |b: &[u8], at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    if u32_at(data, 20) != 1 {
        return Err(bad("link type is not Ethernet"));
    }
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let caplen = u32_at(data, at + 8) as usize;
        let start = at + 16;
        let Some(frame) = data.get(start..start + caplen) else {
            break; // cut short by the stop
        };
        at = start + caplen;
        if let Some(p) = tcp_of_frame(frame) {
            out.push(p);
        }
    }
    Ok(out)
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn tcp_of_frame(f: &[u8]) -> Option<Packet> {
    if f.len() < 14 || be16(f, 12) != 0x0800 {
        return None;
    }
    let ip = &f[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = be16(ip, 2).min(ip.len());
    let tcp = ip.get(ihl..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let hlen = usize::from(tcp[12] >> 4) * 4;
    let addr = |o: usize, p: usize| {
        SocketAddrV4::new(
            Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]),
            u16::try_from(be16(tcp, p)).unwrap_or(0),
        )
    };
    Some(Packet {
        src: addr(12, 0),
        dst: addr(16, 2),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        syn: tcp[13] & 0x12 == 0x02,
        payload: tcp.get(hlen..)?.to_vec(),
    })
}

/// A TCP connection of a capture: its opening and the first bytes each side sent (in
/// sequence order, retransmissions merged).
#[derive(Debug, Clone, Default)]
pub struct Flow {
    /// The side that sent the SYN (`None`: no SYN in the capture).
    pub client: Option<SocketAddrV4>,
    /// The other side.
    pub server: Option<SocketAddrV4>,
    /// The client's first bytes (up to 16 KiB).
    pub client_bytes: Vec<u8>,
    /// The server's first bytes (up to 16 KiB).
    pub server_bytes: Vec<u8>,
}

/// The flows of `packets` by their unordered address pair.
pub fn flows(packets: &[Packet]) -> Vec<Flow> {
    type Side = BTreeMap<u32, Vec<u8>>;
    type Open = Option<(SocketAddrV4, u32)>;
    let mut by: BTreeMap<(SocketAddrV4, SocketAddrV4), (Open, Side, Side)> = BTreeMap::new();
    for p in packets {
        let key = if p.src < p.dst {
            (p.src, p.dst)
        } else {
            (p.dst, p.src)
        };
        let e = by.entry(key).or_default();
        if p.syn {
            e.0 = Some((p.src, p.seq.wrapping_add(1)));
        }
        if p.payload.is_empty() {
            continue;
        }
        let side = if p.src == key.0 { &mut e.1 } else { &mut e.2 };
        side.entry(p.seq).or_insert_with(|| p.payload.clone());
    }
    by.into_iter()
        .map(|((a, b), (open, sa, sb))| {
            let Some((client, isn)) = open else {
                return Flow {
                    client: None,
                    server: None,
                    client_bytes: first_bytes(&sa, None),
                    server_bytes: first_bytes(&sb, None),
                };
            };
            let server = if client == a { b } else { a };
            let (cs, ss) = if client == a { (&sa, &sb) } else { (&sb, &sa) };
            Flow {
                client: Some(client),
                server: Some(server),
                client_bytes: first_bytes(cs, Some(isn)),
                server_bytes: first_bytes(ss, None),
            }
        })
        .collect()
}

/// The contiguous bytes of `segments` from `start` (default: the lowest sequence number: the
/// server's side, whose SYN-ACK is not tracked). Sequence wrap-around is not handled.
fn first_bytes(segments: &BTreeMap<u32, Vec<u8>>, start: Option<u32>) -> Vec<u8> {
    let Some(mut next) = start.or_else(|| segments.keys().next().copied()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while out.len() < 16 << 10 {
        // The segment covering `next` (a retransmission may start earlier).
        let Some((&seq, data)) = segments
            .range(..=next)
            .next_back()
            .filter(|(&s, d)| (next - s) < d.len() as u32)
        else {
            break;
        };
        let skip = (next - seq) as usize;
        out.extend_from_slice(&data[skip..]);
        next = seq.wrapping_add(data.len() as u32);
    }
    out
}

/// The extensions of a TLS handshake message of `kind` (1: ClientHello, 2: ServerHello) that
/// opens `bytes` (one TLS record): `(type, data)` pairs, or why not.
pub fn hello_extensions(bytes: &[u8], kind: u8) -> Result<Vec<(u16, Vec<u8>)>, String> {
    let need = |n: usize, what: &str| {
        if bytes.len() < n {
            Err(format!("{} bytes end before the {what}", bytes.len()))
        } else {
            Ok(())
        }
    };
    need(9, "record and handshake headers")?;
    if bytes[0] != 0x16 || bytes[1] != 0x03 {
        return Err(format!(
            "not a TLS handshake record: starts {:02x?} ({:?})",
            &bytes[..bytes.len().min(8)],
            String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
        ));
    }
    if bytes[5] != kind {
        return Err(format!("handshake type {} instead of {kind}", bytes[5]));
    }
    let record_end = 5 + be16(bytes, 3);
    need(record_end, "end of the record")?;
    let body = &bytes[9..record_end];
    // legacy_version, random, session id
    let mut at = 2 + 32;
    let len = |at: usize, n: usize| -> Result<usize, String> {
        body.get(at..at + n)
            .map(|b| b.iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x)))
            .ok_or_else(|| "truncated hello".to_owned())
    };
    at += 1 + len(at, 1)?;
    if kind == 1 {
        at += 2 + len(at, 2)?; // cipher suites
        at += 1 + len(at, 1)?; // compression methods
    } else {
        at += 2 + 1; // cipher suite, compression method
    }
    let end = at + 2 + len(at, 2)?;
    at += 2;
    let mut out = Vec::new();
    while at + 4 <= end.min(body.len()) {
        let t = u16::try_from(len(at, 2)?).unwrap_or(0);
        let n = len(at + 2, 2)?;
        let data = body
            .get(at + 4..at + 4 + n)
            .ok_or("truncated extension")?
            .to_vec();
        out.push((t, data));
        at += 4 + n;
    }
    Ok(out)
}

/// The `supported_versions` extension type.
pub const SUPPORTED_VERSIONS: u16 = 0x002b;

/// Why `bytes` does not begin with a ClientHello offering TLS 1.3 (`None`: it does).
pub fn not_a_tls13_client_hello(bytes: &[u8]) -> Option<String> {
    let ext = match hello_extensions(bytes, 1) {
        Ok(e) => e,
        Err(e) => return Some(e),
    };
    let Some((_, v)) = ext.iter().find(|(t, _)| *t == SUPPORTED_VERSIONS) else {
        return Some("no supported_versions extension".into());
    };
    let offered = v.get(1..).unwrap_or_default();
    (!offered.chunks(2).any(|c| c == [0x03, 0x04]))
        .then(|| format!("supported_versions {offered:02x?} lacks TLS 1.3"))
}

/// Why `bytes` does not begin with a ServerHello choosing TLS 1.3 (`None`: it does).
pub fn not_a_tls13_server_hello(bytes: &[u8]) -> Option<String> {
    let ext = match hello_extensions(bytes, 2) {
        Ok(e) => e,
        Err(e) => return Some(e),
    };
    match ext.iter().find(|(t, _)| *t == SUPPORTED_VERSIONS) {
        Some((_, v)) if v == &[0x03, 0x04] => None,
        Some((_, v)) => Some(format!("the server chose version {v:02x?}")),
        None => Some("no supported_versions extension: not TLS 1.3".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pcap file (little-endian, microseconds) of the Ethernet frames of `packets`.
    fn pcap_of(packets: &[(&str, &str, u32, u8, &[u8])]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&4u16.to_le_bytes());
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&65535u32.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        for (src, dst, seq, flags, payload) in packets {
            let src: SocketAddrV4 = src.parse().unwrap();
            let dst: SocketAddrV4 = dst.parse().unwrap();
            let mut tcp = Vec::new();
            tcp.extend_from_slice(&src.port().to_be_bytes());
            tcp.extend_from_slice(&dst.port().to_be_bytes());
            tcp.extend_from_slice(&seq.to_be_bytes());
            tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, *flags, 0xff, 0xff, 0, 0, 0, 0]);
            tcp.extend_from_slice(payload);
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&u16::try_from(20 + tcp.len()).unwrap().to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
            ip.extend_from_slice(&src.ip().octets());
            ip.extend_from_slice(&dst.ip().octets());
            ip.extend_from_slice(&tcp);
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&[0x08, 0x00]);
            frame.extend_from_slice(&ip);
            f.extend_from_slice(&[0; 8]);
            f.extend_from_slice(&u32::try_from(frame.len()).unwrap().to_le_bytes());
            f.extend_from_slice(&u32::try_from(frame.len()).unwrap().to_le_bytes());
            f.extend_from_slice(&frame);
        }
        f
    }

    /// A ClientHello record offering `versions`, padded with a 300-byte extension.
    fn client_hello(versions: &[u16]) -> Vec<u8> {
        let mut sv = vec![u8::try_from(versions.len() * 2).unwrap()];
        for v in versions {
            sv.extend_from_slice(&v.to_be_bytes());
        }
        let mut ext = Vec::new();
        for (t, d) in [(0x0015u16, vec![0u8; 300]), (SUPPORTED_VERSIONS, sv)] {
            ext.extend_from_slice(&t.to_be_bytes());
            ext.extend_from_slice(&u16::try_from(d.len()).unwrap().to_be_bytes());
            ext.extend_from_slice(&d);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&u16::try_from(ext.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn a_split_and_retransmitted_client_hello_is_reassembled() {
        let hello = client_hello(&[0x0304, 0x0303]);
        let (a, b) = hello.split_at(100);
        let c = "10.0.0.2:40000";
        let s = "10.0.0.1:7443";
        let file = pcap_of(&[
            (c, s, 999, 0x02, b""),
            (s, c, 5000, 0x12, b""),
            (c, s, 1000, 0x10, a),
            (c, s, 1000, 0x10, a),
            (c, s, 1100, 0x18, b),
            (c, "10.0.0.3:7444", 1, 0x02, b""),
            (c, "10.0.0.3:7444", 2, 0x18, b"GET / HTTP/1.1\r\n\r\n"),
        ]);
        let packets = read(&file).unwrap();
        assert_eq!(packets.len(), 7);
        let flows = flows(&packets);
        assert_eq!(flows.len(), 2);
        let tls = flows
            .iter()
            .find(|f| f.server == Some(s.parse().unwrap()))
            .unwrap();
        assert_eq!(tls.client, Some(c.parse().unwrap()));
        assert_eq!(tls.client_bytes, hello);
        assert_eq!(not_a_tls13_client_hello(&tls.client_bytes), None);
        let plain = flows
            .iter()
            .find(|f| f.server.map(|a| a.port()) == Some(7444))
            .unwrap();
        assert!(not_a_tls13_client_hello(&plain.client_bytes)
            .unwrap()
            .contains("GET / HTTP/1.1"));
    }

    #[test]
    fn a_hello_without_tls13_is_refused() {
        assert!(not_a_tls13_client_hello(&client_hello(&[0x0303]))
            .unwrap()
            .contains("lacks TLS 1.3"));
        let mut hello = client_hello(&[0x0304]);
        hello.truncate(60);
        assert!(not_a_tls13_client_hello(&hello).is_some());
    }
}
