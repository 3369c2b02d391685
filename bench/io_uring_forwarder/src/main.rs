//! An experiment (not part of kinlink): examples/udp_forwarder on io_uring. The epoll
//! forwarder makes, per packet at 100 allocations, about one `sendmmsg` and one `recvmmsg` on a
//! relay socket each carrying one datagram; this one makes no system call per packet: every
//! socket has a multishot `recvmsg` reading into a provided buffer ring, every datagram goes
//! out with a send SQE straight from the buffer it arrived in (no copy in user space), and one
//! `io_uring_enter` per loop turn submits the sends and reaps what arrived. What it saves
//! against the epoll forwarder is what io_uring could save kinlink's shards.
//!
//! ```text
//! cargo build --release --manifest-path bench/io_uring_forwarder/Cargo.toml
//! URING_TASKRUN=defer target/release/examples/turn_bench --server forwarder \
//!   --forwarder bench/io_uring_forwarder/target/release/io_uring_forwarder --peer echo ...
//! ```
//!
//! Same arguments as udp_forwarder (`--listen ADDR --peer ADDR`); `URING_TASKRUN=defer` runs
//! the receive task work only when the loop enters the kernel (DEFER_TASKRUN, the setting
//! recommended for networking), anything else cooperatively (COOP_TASKRUN).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Provided buffers: count (a power of two), size, group id.
const NBUF: u16 = 8192;
const BUF: usize = 2048;
const BGID: u16 = 7;
/// `user_data`: kind in the top byte, a relay index or buffer id below.
const K_LISTEN: u64 = 1 << 56;
const K_RELAY: u64 = 2 << 56;
const K_SEND: u64 = 3 << 56;
const MASK: u64 = (1 << 56) - 1;

/// The provided-buffer ring: the kernel takes buffers from it for each datagram received;
/// a buffer comes back to it when the send made from it completes.
struct BufRing {
    base: *mut types::BufRingEntry,
    bufs: Vec<u8>,
    tail: u16,
}

impl BufRing {
    fn give(&mut self, bid: u16) {
        // SAFETY: `base` has NBUF entries (allocated in main), the index is masked into them,
        // and buffer `bid` lies inside `bufs`.
        unsafe {
            let e = &mut *self.base.add((self.tail & (NBUF - 1)) as usize);
            e.set_addr(self.bufs.as_ptr().add(bid as usize * BUF) as u64);
            e.set_len(BUF as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given since the last call visible to the kernel.
    fn publish(&self) {
        // SAFETY: the ring's tail lives in its first entry (io_uring_buf_ring), u16-aligned.
        unsafe { (*(types::BufRingEntry::tail(self.base) as *const AtomicU16)).store(self.tail, Ordering::Release) };
    }

    fn buf(&self, bid: u16, len: usize) -> &[u8] {
        &self.bufs[bid as usize * BUF..bid as usize * BUF + len]
    }
}

fn bind(addr: SocketAddr, buf: usize) -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None).unwrap();
    let _ = s.set_recv_buffer_size(buf);
    let _ = s.set_send_buffer_size(buf);
    s.set_nonblocking(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.into()
}

/// A destination address in the form a send SQE points to; boxed by the callers so it stays
/// put while sends reference it.
struct Dest(socket2::SockAddr);

impl Dest {
    fn sqe(&self, fd: i32, data: &[u8], bid: u16) -> squeue::Entry {
        opcode::Send::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
            .dest_addr(self.0.as_ptr().cast())
            .dest_addr_len(self.0.len())
            .build()
            .user_data(K_SEND | bid as u64)
    }
}

fn name_to_addr(name: &[u8]) -> Option<SocketAddr> {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = name.len().min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copies at most the storage's size; the kernel wrote a sockaddr of `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), (&mut storage as *mut libc::sockaddr_storage).cast(), len) };
    // SAFETY: as above.
    unsafe { socket2::SockAddr::new(std::mem::transmute::<libc::sockaddr_storage, socket2::SockAddrStorage>(storage), len as libc::socklen_t) }.as_socket()
}

struct Relay {
    sock: UdpSocket,
    client: Box<Dest>,
}

fn main() {
    let (mut listen, mut peer) = (None::<SocketAddr>, None::<SocketAddr>);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--listen" => listen = Some(v.parse().expect("--listen ADDR")),
            "--peer" => peer = Some(v.parse().expect("--peer ADDR")),
            other => panic!("unknown flag {other}"),
        }
    }
    let (listen, peer) = (listen.expect("--listen"), peer.expect("--peer"));
    let defer = std::env::var("URING_TASKRUN").as_deref() == Ok("defer");
    let peer = Box::new(Dest(peer.into()));
    let listener = bind(listen, 1 << 20);

    let mut builder = IoUring::builder();
    builder.setup_cqsize(32768);
    if defer {
        builder.setup_single_issuer().setup_defer_taskrun();
    } else {
        builder.setup_coop_taskrun();
    }
    let mut ring: IoUring = builder.build(4096).expect("io_uring (refused by seccomp or kernel.io_uring_disabled?)");
    let layout = std::alloc::Layout::from_size_align(NBUF as usize * std::mem::size_of::<types::BufRingEntry>(), 4096).unwrap();
    // SAFETY: a non-zero size; the ring lives as long as the process.
    let base = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
    let mut br = BufRing { base, bufs: vec![0u8; BUF * NBUF as usize], tail: 0 };
    // SAFETY: `base` is page-aligned, NBUF entries long, and never freed.
    unsafe { ring.submitter().register_buf_ring_with_flags(base as u64, NBUF, BGID, 0).expect("provided buffer ring (Linux 5.19+)") };
    for b in 0..NBUF {
        br.give(b);
    }
    br.publish();

    // The multishot receive's template: room for an IPv6 source address, no control data.
    // SAFETY: plain data; all zeroes is valid.
    let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let hdr_ptr: *const libc::msghdr = &*hdr;
    let arm = |fd: i32, ud: u64| opcode::RecvMsgMulti::new(types::Fd(fd), hdr_ptr, BGID).build().user_data(ud);

    let mut relays: Vec<Relay> = Vec::new();
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut pending = vec![arm(listener.as_raw_fd(), K_LISTEN)];
    loop {
        {
            let (submitter, mut sq, _) = ring.split();
            for e in pending.drain(..) {
                // SAFETY: every SQE points at buffers and addresses that outlive it (the
                // buffer ring's buffers, boxed destinations, the boxed msghdr).
                while unsafe { sq.push(&e) }.is_err() {
                    sq.sync();
                    submitter.submit().expect("io_uring_enter");
                    sq.sync();
                }
            }
            sq.sync();
        }
        br.publish();
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        for cqe in ring.completion() {
            let (kind, val, flags, res) = (cqe.user_data() & !MASK, cqe.user_data() & MASK, cqe.flags(), cqe.result());
            if kind == K_SEND {
                br.give(val as u16);
                continue;
            }
            let fd = if kind == K_LISTEN { listener.as_raw_fd() } else { relays[val as usize].sock.as_raw_fd() };
            // A multishot receive ends on an error or when the buffers ran out: arm it again.
            if !cqueue::more(flags) {
                pending.push(arm(fd, cqe.user_data()));
            }
            let Some(bid) = cqueue::buffer_select(flags) else { continue };
            if res < 0 {
                br.give(bid);
                continue;
            }
            let Ok(msg) = types::RecvMsgOut::parse(br.buf(bid, res as usize), &hdr) else {
                br.give(bid);
                continue;
            };
            let payload = msg.payload_data();
            if kind == K_LISTEN {
                let Some(from) = name_to_addr(msg.name_data()) else {
                    br.give(bid);
                    continue;
                };
                let idx = *by_client.entry(from).or_insert_with(|| {
                    let sock = bind(SocketAddr::new(listen.ip(), 0), 256 << 10);
                    pending.push(arm(sock.as_raw_fd(), K_RELAY | relays.len() as u64));
                    relays.push(Relay { sock, client: Box::new(Dest(from.into())) });
                    relays.len() - 1
                });
                pending.push(peer.sqe(relays[idx].sock.as_raw_fd(), payload, bid));
            } else {
                let r = &relays[val as usize];
                pending.push(r.client.sqe(listener.as_raw_fd(), payload, bid));
            }
        }
    }
}
