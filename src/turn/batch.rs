//! Batched UDP I/O: `recvmmsg` into fixed slots and `sendmmsg` of datagrams to many
//! destinations, so a busy shard makes one system call per batch instead of one per packet.
//! Linux only (the platform kinlink ships for); elsewhere a batch is one datagram.
//!
//! The only module allowed `unsafe`: each block fills C structs that point into buffers
//! which outlive the call, with their lengths, and reads back only what the kernel wrote.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;

/// Datagrams moved per system call, at most.
pub const BATCH: usize = 32;

/// Receive slots: `BATCH` datagrams, each read at `headroom` into a slot of `slot` bytes, so
/// the caller can frame a payload in place (the TURN Data indication header goes in front).
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    headroom: usize,
    meta: Vec<(SocketAddr, usize, bool)>,
    #[cfg(target_os = "linux")]
    names: Vec<libc::sockaddr_storage>,
}

impl RecvBatch {
    /// Slots of `slot` bytes; datagrams land at `headroom` and may be `slot - headroom - 1`
    /// bytes long (one more is a truncated datagram, see [`RecvBatch::get`]).
    pub fn new(slot: usize, headroom: usize) -> Self {
        RecvBatch {
            buf: vec![0u8; slot * BATCH],
            slot,
            headroom,
            meta: Vec::with_capacity(BATCH),
            #[cfg(target_os = "linux")]
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
            names: vec![unsafe { std::mem::zeroed() }; BATCH],
        }
    }

    /// Reads what is queued, up to [`BATCH`] datagrams, without blocking. `Ok(0)` never
    /// happens: an empty socket is `WouldBlock`.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.meta.clear();
        #[cfg(target_os = "linux")]
        {
            let len = self.slot - self.headroom;
            let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: mmsghdr is plain data; every pointer is set below.
            let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for i in 0..BATCH {
                iov[i] = libc::iovec { iov_base: self.buf[i * self.slot + self.headroom..].as_mut_ptr().cast(), iov_len: len };
                hdrs[i].msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                hdrs[i].msg_hdr.msg_iov = &mut iov[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: every header points into buffers that outlive the call, with their lengths.
            let n = unsafe { libc::recvmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for (h, name) in hdrs.iter().zip(&self.names).take(n as usize) {
                let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                // A datagram from an address family we cannot name is skipped (never happens on
                // an inet socket).
                let from = sockaddr_to_std(name).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                self.meta.push((from, h.msg_len as usize, truncated));
            }
            Ok(n as usize)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let (n, from) = socket.recv_from(&mut self.buf[self.headroom..self.slot])?;
            self.meta.push((from, n, n == self.slot - self.headroom));
            Ok(1)
        }
    }

    /// Every slot, for ranges made with [`RecvBatch::offset`].
    pub fn data(&self) -> &[u8] {
        &self.buf
    }

    /// Where datagram `i`'s slot starts in [`RecvBatch::data`].
    pub fn offset(&self, i: usize) -> usize {
        i * self.slot
    }

    /// Datagram `i` of the last read: its source, its slot (payload at `headroom`), its
    /// length, and whether the kernel cut it to fit.
    pub fn get(&mut self, i: usize) -> (SocketAddr, &mut [u8], usize, bool) {
        let (from, len, truncated) = self.meta[i];
        (from, &mut self.buf[i * self.slot..(i + 1) * self.slot], len, truncated)
    }
}

/// Datagrams to send, copied into one buffer, each to its own destination.
#[derive(Default)]
pub struct SendBatch {
    data: Vec<u8>,
    packets: Vec<(SocketAddr, Range<usize>)>,
}

impl SendBatch {
    /// Queues a copy of `payload` for `to`.
    pub fn push(&mut self, to: SocketAddr, payload: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(payload);
        self.packets.push((to, start..self.data.len()));
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Sends everything queued from `socket` and empties the batch. Returns how many
    /// datagrams the kernel refused for want of buffer space (UDP: they are dropped, never
    /// waited for); other per-datagram errors (an unreachable peer) are skipped.
    pub fn flush(&mut self, socket: &UdpSocket) -> usize {
        let refused = send_many(socket, &self.data, &self.packets);
        self.data.clear();
        self.packets.clear();
        refused
    }
}

/// Sends `packets` (ranges of `data`) from `socket`, [`BATCH`] per system call. Returns the
/// number refused with `WouldBlock`.
pub fn send_many(socket: &UdpSocket, data: &[u8], packets: &[(SocketAddr, Range<usize>)]) -> usize {
    let mut refused = 0;
    let mut at = 0;
    while at < packets.len() {
        match send_some(socket, data, &packets[at..]) {
            Ok(n) => at += n.max(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                refused += packets.len() - at;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The datagram at the head failed (e.g. EINVAL for a bad destination): skip it.
            Err(_) => at += 1,
        }
    }
    refused
}

#[cfg(target_os = "linux")]
fn send_some(socket: &UdpSocket, data: &[u8], packets: &[(SocketAddr, Range<usize>)]) -> io::Result<usize> {
    let n = packets.len().min(BATCH);
    // SAFETY: plain data, filled below.
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, (to, range)) in packets.iter().take(n).enumerate() {
        let name_len = std_to_sockaddr(*to, &mut names[i]);
        iov[i] = libc::iovec { iov_base: data[range.clone()].as_ptr() as *mut libc::c_void, iov_len: range.len() };
        hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        hdrs[i].msg_hdr.msg_namelen = name_len;
        hdrs[i].msg_hdr.msg_iov = &mut iov[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at live buffers of the stated lengths; the kernel only reads them.
    let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

#[cfg(not(target_os = "linux"))]
fn send_some(socket: &UdpSocket, data: &[u8], packets: &[(SocketAddr, Range<usize>)]) -> io::Result<usize> {
    let (to, range) = &packets[0];
    socket.send_to(&data[range.clone()], to).map(|_| 1)
}

#[cfg(target_os = "linux")]
fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((u32::from_be(a.sin_addr.s_addr).to_be_bytes(), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn std_to_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for a sockaddr_in.
            let s = unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for a sockaddr_in6.
            let s = unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            s.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_with_sources_and_truncation() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let v6 = UdpSocket::bind("[::1]:0").ok();
        let to = b.local_addr().unwrap();
        let mut out = SendBatch::default();
        for i in 0..40u8 {
            out.push(to, &vec![i; 10 + i as usize]);
        }
        out.push(to, &[9u8; 200]);
        assert_eq!(out.flush(&a), 0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut rb = RecvBatch::new(16 + 100 + 1, 16);
        let mut seen = Vec::new();
        while let Ok(n) = rb.recv(&b) {
            for i in 0..n {
                let (from, slot, len, truncated) = rb.get(i);
                assert_eq!(from, a.local_addr().unwrap());
                seen.push((slot[16], len, truncated));
            }
        }
        assert_eq!(seen.len(), 41, "{BATCH} per call, every datagram");
        assert_eq!(seen[5], (5, 15, false));
        assert_eq!(seen[40], (9, 101, true), "cut to the slot and flagged");
        if let Some(v6) = v6 {
            let mut out = SendBatch::default();
            out.push(v6.local_addr().unwrap(), b"six");
            let s = UdpSocket::bind("[::1]:0").unwrap();
            assert_eq!(out.flush(&s), 0);
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(rb.recv(&v6).unwrap(), 1);
            let (from, slot, len, _) = rb.get(0);
            assert_eq!((from, &slot[16..16 + len]), (s.local_addr().unwrap(), &b"six"[..]));
        }
    }
}
