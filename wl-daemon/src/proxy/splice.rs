//! Zero-copy relaying of a spliced connection: socket → pipe → socket with splice(2), so the
//! bytes of connections wl does not inspect never enter user space.
//!
//! In: the agent's accepted socket and the upstream socket. Out: the byte counts each way
//! once both directions have reached end of stream (each EOF is passed on as a write
//! shutdown, so half-closed protocols keep working).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::{io::Interest, net::TcpStream};

/// Pipe capacity per direction; also the most one splice call moves.
const PIPE_SIZE: i32 = 1 << 20;

/// Relays both directions until both have ended; returns (agent→upstream, upstream→agent).
pub async fn relay(agent: &TcpStream, upstream: &TcpStream) -> io::Result<(u64, u64)> {
    let (up, down) = tokio::try_join!(one_way(agent, upstream), one_way(upstream, agent))?;
    Ok((up, down))
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

async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pipe_r, pipe_w) = new_pipe()?;
    let mut total = 0u64;
    loop {
        // Fill the (empty) pipe from the source socket.
        let n = loop {
            from.readable().await?;
            match from
                .try_io(Interest::READABLE, || splice_nb(from.as_fd(), pipe_w.as_fd(), PIPE_SIZE as usize))
            {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // End of stream: pass it on, keep the other direction going.
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(total);
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
        let relay = tokio::spawn(async move { super::relay(&agent_side, &upstream_side).await });

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
        assert_eq!(relay.await.unwrap().unwrap(), (big.len() as u64, 4));
    }
}
