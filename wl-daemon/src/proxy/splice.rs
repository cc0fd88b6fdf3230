//! Zero-copy relaying of a spliced connection: socket → pipe → socket with splice(2), so the
//! bytes of connections wl does not inspect never enter user space.
//!
//! In: the agent's accepted socket and the upstream socket. Out: the byte counts each way
//! once both directions have reached end of stream (each EOF is passed on as a write
//! shutdown, so half-closed protocols keep working). Whenever everything the agent has sent
//! so far is in the upstream socket, the caller hears how much that is: the kernel relay
//! (`intercept/relay.rs`) may then take the agent-to-upstream half over.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::{io::Interest, net::TcpStream};

/// Pipe capacity per direction; also the most one splice call moves.
const PIPE_SIZE: i32 = 1 << 20;

/// Bytes relayed by one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Agent to upstream, all of them: what went into the upstream socket.
    pub up: u64,
    /// Of `up`, those the kernel relay moved (not the daemon).
    pub up_kernel: u64,
    /// Upstream to agent.
    pub down: u64,
}

/// Relays both directions until both have ended.
/// `caught_up(n)`: the first `n` bytes from the agent are in the upstream socket and no
/// more are waiting to be read.
pub async fn relay(
    agent: &TcpStream,
    upstream: &TcpStream,
    caught_up: impl FnMut(u64),
) -> io::Result<Relayed> {
    let (up, down) = tokio::try_join!(one_way(agent, upstream, caught_up), one_way(upstream, agent, |_| {}))?;
    Ok(Relayed {
        up: up.into_dest.max(up.spliced),
        up_kernel: up.into_dest.saturating_sub(up.spliced),
        down: down.spliced,
    })
}

/// One direction's counts.
struct OneWay {
    /// Bytes this relay moved.
    spliced: u64,
    /// Bytes written into the destination socket by anyone (this relay and the kernel
    /// relay), counted when the source ended.
    into_dest: u64,
}

/// Data bytes ever written into a connected TCP socket: those the peer has acknowledged
/// plus those still queued (`TCP_INFO` and `SIOCOUTQ`), less the SYN's sequence number.
/// Call before a FIN is queued.
///
/// The two numbers come from two calls, and an acknowledgement arriving between them
/// moves bytes from the second to the first: read that way once, the sum came out short by
/// whatever was acknowledged meanwhile (128 KiB in one end-to-end run). So the
/// acknowledged count is read on both sides of the queue length, and the sum is taken only
/// when it did not move (bytes written no longer change when this is called, so the
/// acknowledgements soon stop).
pub fn bytes_written(sock: &impl AsRawFd) -> io::Result<u64> {
    const TRIES: usize = 1000;
    let mut acked = bytes_acked(sock)?;
    for _ in 0..TRIES {
        let queued = send_queue_len(sock)?;
        let acked_after = bytes_acked(sock)?;
        if acked_after == acked {
            return Ok((acked + queued).saturating_sub(1));
        }
        acked = acked_after;
    }
    Err(io::Error::other("the acknowledged byte count kept moving while it was read"))
}

/// `tcpi_bytes_acked`: bytes the peer has acknowledged, counting the SYN as one.
fn bytes_acked(sock: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: tcp_info is plain integers; the kernel writes at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, pointer and length for TCP_INFO.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked)
}

/// `SIOCOUTQ`: bytes written but not yet acknowledged.
fn send_queue_len(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as u64)
}

fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A larger pipe means fewer round trips per megabyte; the default (64 KiB) still works
    // when the kernel refuses (pipe-max-size, per-user pipe limits).
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((r, w))
}

fn splice_nb(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    splice(from, None, to, None, len, SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK)
        .map_err(io::Error::from)
}

async fn one_way(from: &TcpStream, to: &TcpStream, mut caught_up: impl FnMut(u64)) -> io::Result<OneWay> {
    let (pipe_r, pipe_w) = new_pipe()?;
    let mut total = 0u64;
    let mut reported = None;
    loop {
        // Fill the (empty) pipe from the source socket.
        let n = loop {
            match from
                .try_io(Interest::READABLE, || splice_nb(from.as_fd(), pipe_w.as_fd(), PIPE_SIZE as usize))
            {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing to read (as far as tokio knows; an understatement is
                    // harmless): all `total` bytes read so far are in `to`.
                    if reported != Some(total) {
                        caught_up(total);
                        reported = Some(total);
                    }
                    from.readable().await?;
                }
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // End of stream: pass it on, keep the other direction going. Everything the
            // source sent is in `to` by now (the kernel relay's bytes too: they went in
            // before the source's end of stream was sent).
            let into_dest = bytes_written(to).unwrap_or(total);
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(OneWay { spliced: total, into_dest });
        }
        // Drain the pipe into the destination socket.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice_nb(pipe_r.as_fd(), to.as_fd(), left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Two connected sockets over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn relays_both_ways_and_passes_half_close_on() {
        let (mut agent, agent_side) = pair().await;
        let (upstream_side, mut upstream) = pair().await;
        let relay = tokio::spawn(async move { super::relay(&agent_side, &upstream_side, |_| {}).await });

        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        agent.write_all(&big).await.unwrap();
        agent.shutdown().await.unwrap(); // half-close: the upstream must see EOF...
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        // ...and can still answer.
        upstream.write_all(b"done").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut answer = Vec::new();
        agent.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"done");
        let relayed = relay.await.unwrap().unwrap();
        assert_eq!(relayed, super::Relayed { up: big.len() as u64, up_kernel: 0, down: 4 });
    }

    #[tokio::test]
    async fn bytes_written_counts_data_only() {
        let (mut a, mut b) = pair().await;
        assert_eq!(super::bytes_written(&a).unwrap(), 0);
        a.write_all(&[7u8; 12345]).await.unwrap();
        // Queued or acknowledged, each byte counts once.
        assert_eq!(super::bytes_written(&a).unwrap(), 12345);
        let mut got = vec![0u8; 12345];
        b.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(super::bytes_written(&a).unwrap(), 12345);
    }

    /// The race it guards against: with a reader still draining, acknowledgements arrive
    /// all the time, and every reading must still be the exact count.
    #[test]
    fn bytes_written_is_exact_while_acknowledgements_arrive() {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        const CHUNK: usize = 1 << 20;
        const CHUNKS: usize = 16;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        let go = std::sync::Arc::new(AtomicBool::new(false));
        let reader = std::thread::spawn({
            let go = go.clone();
            move || {
                while !go.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                // Slowly, so that the draining (and its acknowledgements) lasts a while.
                let mut buf = vec![0u8; 16 * 1024];
                let mut total = 0;
                while let Ok(n @ 1..) = b.read(&mut buf) {
                    total += n;
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                total
            }
        });
        let chunk = vec![7u8; CHUNK];
        let writer = std::thread::spawn(move || {
            for _ in 0..CHUNKS {
                a.write_all(&chunk).unwrap();
            }
            a
        });
        go.store(true, Ordering::Release);
        let a = writer.join().unwrap();
        let mut readings = 0;
        while super::send_queue_len(&a).unwrap() > 0 {
            assert_eq!(super::bytes_written(&a).unwrap(), (CHUNK * CHUNKS) as u64, "reading {readings}");
            readings += 1;
        }
        a.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(reader.join().unwrap(), CHUNK * CHUNKS);
        assert!(readings > 0, "the reader had drained everything before the first reading");
    }
}
