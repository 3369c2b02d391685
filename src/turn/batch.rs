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
/// Where received datagrams land: on a cache line, so the kernel's copy into the slot does not
/// straddle lines at both ends. Measured against slots at odd offsets (8,193-byte strides):
/// about 3% less CPU per relayed packet at 100 allocations, no difference at 1,000
/// (BENCHMARKS.md, "The kernel's share").
const ALIGN: usize = 64;

/// Receive slots: `BATCH` datagrams, each read at `headroom` into a slot of `slot` bytes, so
/// the caller can frame a payload in place (the TURN Data indication header goes in front).
pub struct RecvBatch {
    buf: Vec<u8>,
    /// Where slot 0 starts in `buf`: chosen so that every slot's datagram starts on an
    /// [`ALIGN`] boundary (`buf` is never reallocated).
    first: usize,
    /// Distance between slots: the slot size rounded up to [`ALIGN`].
    stride: usize,
    slot: usize,
    headroom: usize,
    meta: Vec<(SocketAddr, usize, bool)>,
    /// The `recvmmsg` headers and their iovecs, kept between calls: made afresh each call they
    /// cost a 2.5 KB memset per read, and a relay socket's read is often a single datagram.
    /// Their pointers are set at each call, from `&mut self`, and only used during it.
    #[cfg(target_os = "linux")]
    hdrs: Vec<libc::mmsghdr>,
    #[cfg(target_os = "linux")]
    iov: Vec<libc::iovec>,
    #[cfg(target_os = "linux")]
    names: Vec<libc::sockaddr_storage>,
}

// SAFETY: the raw pointers in `hdrs` and `iov` are only dereferenced (by the kernel) during
// `recv`, which sets them from `&mut self` first.
#[cfg(target_os = "linux")]
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Slots of `slot` bytes; datagrams land at `headroom` and may be `slot - headroom - 1`
    /// bytes long (one more is a truncated datagram, see [`RecvBatch::get`]).
    pub fn new(slot: usize, headroom: usize) -> Self {
        let stride = slot.div_ceil(ALIGN) * ALIGN;
        let buf = vec![0u8; stride * BATCH + ALIGN];
        let first = (ALIGN - (buf.as_ptr() as usize + headroom) % ALIGN) % ALIGN;
        #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
        let mut b = RecvBatch {
            buf,
            first,
            stride,
            slot,
            headroom,
            meta: Vec::with_capacity(BATCH),
            // SAFETY (the three below): plain data; all zeroes is a valid value.
            #[cfg(target_os = "linux")]
            hdrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            #[cfg(target_os = "linux")]
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            #[cfg(target_os = "linux")]
            names: vec![unsafe { std::mem::zeroed() }; BATCH],
        };
        #[cfg(target_os = "linux")]
        for (iov, h) in b.iov.iter_mut().zip(&mut b.hdrs) {
            iov.iov_len = slot - headroom;
            h.msg_hdr.msg_iovlen = 1;
        }
        b
    }

    /// Reads what is queued, up to [`BATCH`] datagrams, without blocking. `Ok(0)` never
    /// happens: an empty socket is `WouldBlock`.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.meta.clear();
        #[cfg(target_os = "linux")]
        {
            let (base, stride, headroom) = (self.buf.as_mut_ptr(), self.stride, self.first + self.headroom);
            let iov = self.iov.as_mut_ptr();
            for (i, (h, name)) in self.hdrs.iter_mut().zip(&mut self.names).enumerate() {
                // SAFETY: slot i lies inside `buf` (`first` + BATCH strides), and `iov` has
                // BATCH entries.
                unsafe { (*iov.add(i)).iov_base = base.add(i * stride + headroom).cast() };
                h.msg_hdr.msg_iov = unsafe { iov.add(i) };
                h.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
                // The kernel shortens it to the name it wrote: the whole room again.
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            }
            // SAFETY: every header points into this batch's buffers (see `new`), with their
            // lengths; `&mut self` keeps them alive and unshared for the call.
            let n = unsafe { libc::recvmmsg(socket.as_raw_fd(), self.hdrs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for (h, name) in self.hdrs.iter().zip(&self.names).take(n as usize) {
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
            let (n, from) = socket.recv_from(&mut self.buf[self.first + self.headroom..self.first + self.slot])?;
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
        self.first + i * self.stride
    }

    /// Datagram `i` of the last read: its source, its slot (payload at `headroom`), its
    /// length, and whether the kernel cut it to fit.
    pub fn get(&mut self, i: usize) -> (SocketAddr, &mut [u8], usize, bool) {
        let (from, len, truncated) = self.meta[i];
        let at = self.offset(i);
        (from, &mut self.buf[at..at + self.slot], len, truncated)
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

/// Sends `packets` (ranges of `data`) from `socket`, [`BATCH`] messages per system call;
/// consecutive datagrams to one destination go as one UDP GSO message where the kernel
/// offers it. Returns the number refused with `WouldBlock`.
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

/// Segments in one GSO message, at most (the kernel's UDP_MAX_SEGMENTS was 64 before 6.x).
#[cfg(target_os = "linux")]
const MAX_SEGMENTS: usize = 64;
/// Bytes in one GSO message, at most (a UDP payload is under 65,507).
#[cfg(target_os = "linux")]
const MAX_GSO_BYTES: usize = 65_000;
/// Datagrams in one `sendmmsg` call, at most (GSO messages carry several).
#[cfg(target_os = "linux")]
const MAX_PER_CALL: usize = 8 * BATCH;

/// Whether UDP GSO is used; turned off for the process the first time the kernel refuses it
/// (no checksum offload on the route, an old kernel).
#[cfg(target_os = "linux")]
static GSO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// One message of a `sendmmsg` call: `count` datagrams from `first`, sent as one GSO message
/// of `segment`-byte segments, or as a plain datagram when `segment` is 0.
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Msg {
    first: usize,
    count: usize,
    segment: usize,
}

/// Groups `packets` into at most [`BATCH`] messages, written to `out`; returns how many:
/// runs to one destination whose datagrams all have the first one's size (the last may be
/// shorter) become one GSO message with that segment size.
#[cfg(target_os = "linux")]
fn messages(packets: &[(SocketAddr, Range<usize>)], gso: bool, out: &mut [Msg; BATCH]) -> usize {
    let mut n = 0;
    let mut i = 0;
    let mut total = 0;
    while i < packets.len() && n < BATCH && total < MAX_PER_CALL {
        let (to, first) = &packets[i];
        let seg = first.len();
        let mut k = 1;
        if gso && seg > 0 {
            while i + k < packets.len()
                && k < MAX_SEGMENTS
                && total + k < MAX_PER_CALL
                && (k + 1) * seg <= MAX_GSO_BYTES
                && packets[i + k].0 == *to
                && packets[i + k].1.len() <= seg
            {
                k += 1;
                // A shorter datagram ends the train (only the last segment may be short).
                if packets[i + k - 1].1.len() < seg {
                    break;
                }
            }
        }
        out[n] = Msg { first: i, count: k, segment: if k > 1 { seg } else { 0 } };
        n += 1;
        i += k;
        total += k;
    }
    n
}

#[cfg(target_os = "linux")]
fn send_some(socket: &UdpSocket, data: &[u8], packets: &[(SocketAddr, Range<usize>)]) -> io::Result<usize> {
    use std::mem::MaybeUninit;
    use std::sync::atomic::Ordering;
    let gso = GSO.load(Ordering::Relaxed);
    let mut msgs = [Msg::default(); BATCH];
    let count = messages(packets, gso, &mut msgs);
    let msgs = &msgs[..count];
    // Only the entries a call uses are written: zeroing these arrays whole (10 KB) cost more
    // than the rest of the user-space work, with one datagram per call to a relay socket.
    let mut names = [const { MaybeUninit::<libc::sockaddr_in6>::uninit() }; BATCH];
    let mut iov = [const { MaybeUninit::<libc::iovec>::uninit() }; MAX_PER_CALL];
    let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; BATCH];
    // One UDP_SEGMENT control message per GSO message; u64s keep them aligned for cmsghdr.
    let mut control = [const { MaybeUninit::<[u64; 4]>::uninit() }; BATCH];
    // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
    let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
    // Every write below goes through these, so the pointers handed to the kernel stay valid.
    let (names, iov, hdrs, control) = (names.as_mut_ptr(), iov.as_mut_ptr(), hdrs.as_mut_ptr(), control.as_mut_ptr());
    let mut next_iov = 0;
    for (m, msg) in msgs.iter().enumerate() {
        // SAFETY: m < count <= BATCH, and next_iov + msg.count <= MAX_PER_CALL (`messages`
        // caps the datagrams of a call), so every element written is inside its array; each
        // is written whole before the kernel reads it.
        unsafe {
            let name = &mut *names.add(m);
            let name_len = write_sockaddr(packets[msg.first].0, name);
            for (k, (_, range)) in packets[msg.first..msg.first + msg.count].iter().enumerate() {
                (*iov.add(next_iov + k)).write(libc::iovec { iov_base: data[range.clone()].as_ptr() as *mut libc::c_void, iov_len: range.len() });
            }
            // mmsghdr is plain data; all zeroes is a valid value.
            let h = &mut (*hdrs.add(m)).write(std::mem::zeroed()).msg_hdr;
            h.msg_name = name.as_mut_ptr().cast();
            h.msg_namelen = name_len;
            h.msg_iov = iov.add(next_iov).cast();
            h.msg_iovlen = msg.count as _;
            next_iov += msg.count;
            if msg.segment > 0 {
                // msg_control points at `space` bytes, enough for one cmsghdr and a u16.
                h.msg_control = (*control.add(m)).write([0; 4]).as_mut_ptr().cast();
                h.msg_controllen = space as _;
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = len as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), msg.segment as u16);
            }
        }
    }
    // SAFETY: the first `count` headers are written, and point at written names, iovecs and
    // control data, and at live buffers of the stated lengths; the kernel only reads them.
    let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.cast(), count as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        let e = io::Error::last_os_error();
        let gso_refused = matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) && msgs.first().is_some_and(|m| m.segment > 0);
        if gso_refused {
            GSO.store(false, Ordering::Relaxed);
            tracing::info!(error = %e, "UDP GSO refused by the kernel; sending datagrams one by one (in batches)");
            return send_some(socket, data, packets);
        }
        return Err(e);
    }
    Ok(msgs.iter().take(sent as usize).map(|m| m.count).sum())
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

/// Writes `addr` as a C socket address into `out` (room for either family) and returns its length.
#[cfg(target_os = "linux")]
fn write_sockaddr(addr: SocketAddr, out: &mut std::mem::MaybeUninit<libc::sockaddr_in6>) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is plain data (all zeroes is valid); a sockaddr_in6's room is
            // larger than a sockaddr_in and as aligned.
            unsafe {
                let mut s: libc::sockaddr_in = std::mem::zeroed();
                s.sin_family = libc::AF_INET as libc::sa_family_t;
                s.sin_port = a.port().to_be();
                s.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
                out.as_mut_ptr().cast::<libc::sockaddr_in>().write(s);
            }
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_in6 is plain data; all zeroes is valid.
            let s = out.write(unsafe { std::mem::zeroed() });
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
    fn runs_to_one_destination_become_gso_messages_and_arrive_as_datagrams() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (b, c) = (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap());
        let _ = socket2::SockRef::from(&b).set_recv_buffer_size(4 << 20);
        let (tb, tc) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let mut out = SendBatch::default();
        // 100 equal datagrams to b (two trains: 64 segments at most), a short last one, then
        // c and b interleaved: every datagram must arrive whole, in order, once.
        for i in 0..100u8 {
            out.push(tb, &[i; 300]);
        }
        out.push(tb, &[200; 10]);
        for i in 0..6u8 {
            out.push(if i % 2 == 0 { tc } else { tb }, &[i; 50]);
        }
        #[cfg(target_os = "linux")]
        {
            let mut m = [Msg::default(); BATCH];
            assert_eq!(messages(&out.packets, true, &mut m), 8, "two trains, then the six interleaved datagrams one by one");
            let want = [Msg { first: 0, count: 64, segment: 300 }, Msg { first: 64, count: 37, segment: 300 }, Msg { first: 101, count: 1, segment: 0 }];
            assert_eq!(&m[..3], &want, "trains end at 64 segments and at a short datagram");
            let n = messages(&out.packets, false, &mut m);
            assert!(n == BATCH && m.iter().all(|m| m.count == 1), "one datagram a message without GSO, {BATCH} a call");
        }
        assert_eq!(out.flush(&a), 0);
        #[cfg(target_os = "linux")]
        assert!(GSO.load(std::sync::atomic::Ordering::Relaxed), "loopback takes UDP GSO (Linux 4.18+)");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut rb = RecvBatch::new(1024, 0);
        let mut got_b = Vec::new();
        while let Ok(n) = rb.recv(&b) {
            for i in 0..n {
                let (_, slot, len, _) = rb.get(i);
                got_b.push((slot[0], len));
            }
        }
        let mut want_b: Vec<(u8, usize)> = (0..100u8).map(|i| (i, 300)).collect();
        want_b.push((200, 10));
        want_b.extend([(1, 50), (3, 50), (5, 50)]);
        assert_eq!(got_b, want_b);
        let mut got_c = Vec::new();
        while let Ok(n) = rb.recv(&c) {
            for i in 0..n {
                let (_, slot, len, _) = rb.get(i);
                got_c.push((slot[0], len));
            }
        }
        assert_eq!(got_c, vec![(0, 50), (2, 50), (4, 50)]);
    }

    #[test]
    fn datagrams_land_on_cache_lines_and_offsets_point_at_their_slots() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 1..=3u8 {
            a.send_to(&[i; 30], b.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        // An odd slot size and headroom: the slots are spaced and placed to align anyway.
        let mut rb = RecvBatch::new(13 + 100 + 1, 13);
        assert_eq!(rb.recv(&b).unwrap(), 3);
        for i in 0..3 {
            let offset = rb.offset(i);
            let (_, slot, len, _) = rb.get(i);
            let (at, byte) = (slot[13..].as_ptr() as usize, slot[13]);
            assert_eq!((len, byte), (30, i as u8 + 1));
            assert_eq!(at % ALIGN, 0, "datagram {i} starts on a cache line");
            assert_eq!(rb.data()[offset + 13], byte, "offset({i}) is where get({i}) reads");
        }
    }

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
