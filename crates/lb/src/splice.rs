//! Zero-copy TCP relaying with splice(2): bytes move socket -> pipe -> socket inside the kernel,
//! never through user space (Linux only; the L4 proxy's data path).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe size asked for (the kernel may cap it at /proc/sys/fs/pipe-max-size).
const PIPE_SIZE: i32 = 1 << 20;

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    // Best effort: a larger pipe moves more per syscall.
    let _ = fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((r, w))
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Relay `from` -> `to` until EOF, then half-close `to`. Returns the bytes moved.
async fn one_way(from: &TcpStream, to: &TcpStream, counter: &Counter) -> io::Result<u64> {
    let (pr, pw) = pipe()?;
    let mut total = 0u64;
    loop {
        let mut in_pipe = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pw, None, PIPE_SIZE as usize, flags()).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if in_pipe == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(total);
        }
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pr, None, to, None, in_pipe, flags()).map_err(io::Error::from)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                    counter.inc_by(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Relay both directions until both reach EOF or one fails.
pub(crate) async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    to_backend: &Counter,
    from_backend: &Counter,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(
        one_way(client, upstream, to_backend),
        one_way(upstream, client, from_backend)
    )
}
