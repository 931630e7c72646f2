//! Zero-copy TCP relaying with splice(2): bytes move socket -> pipe -> socket inside the kernel,
//! never through user space (Linux only; the L4 proxy's data path).
//!
//! Each direction owns a pipe used as a buffer between the two sockets: it keeps reading into
//! the pipe while the pipe has room and writing out of it while it holds bytes, and only waits
//! (for one readiness event) when neither side can make progress. Syscalls are tried before
//! waiting: tokio's cached readiness is only cleared by an `EAGAIN` that proves the socket has
//! nothing (see [`one_way`]), so no wake-up is ever lost.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe size asked for (the kernel may cap it at /proc/sys/fs/pipe-max-size).
const PIPE_SIZE: i32 = 1 << 20;

/// A pipe and its capacity in bytes.
fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let (r, w) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    // Best effort: a larger pipe moves more per syscall. The default pipe is 64 KiB.
    let cap = fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1 << 16);
    Ok((r, w, cap))
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// `Ok(None)` for `EAGAIN`.
fn would_block<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Relay `from` -> `to` until EOF, then half-close `to`. Returns the bytes moved.
///
/// Readiness bookkeeping: a splice into an empty pipe that returns `EAGAIN` proves `from` is
/// drained, so it goes through `try_io` (which then clears `from`'s cached readiness). With
/// bytes already in the pipe, `EAGAIN` may instead mean the pipe is full, so that splice is
/// made directly and clears nothing; the loop then waits for `to` to be writable, and comes
/// back to an empty pipe eventually. A splice out of the pipe returning `EAGAIN` always means
/// `to`'s send buffer is full, so it goes through `try_io` too.
async fn one_way(from: &TcpStream, to: &TcpStream, counter: &Counter) -> io::Result<u64> {
    let (pr, pw, cap) = pipe()?;
    let mut in_pipe = 0usize;
    let mut eof = false;
    let mut total = 0u64;
    loop {
        let mut progress = false;
        if !eof && in_pipe < cap {
            let read =
                || splice(from, None, &pw, None, cap - in_pipe, flags()).map_err(io::Error::from);
            let r = if in_pipe == 0 {
                from.try_io(Interest::READABLE, read)
            } else {
                read()
            };
            match would_block(r)? {
                Some(0) => eof = true,
                Some(n) => {
                    in_pipe += n;
                    progress = true;
                }
                None => {}
            }
        }
        if in_pipe > 0 {
            let r = to.try_io(Interest::WRITABLE, || {
                splice(&pr, None, to, None, in_pipe, flags()).map_err(io::Error::from)
            });
            if let Some(n) = would_block(r)? {
                in_pipe -= n;
                total += n as u64;
                counter.inc_by(n as u64);
                progress = true;
            }
        }
        if eof && in_pipe == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(total);
        }
        if !progress {
            if in_pipe > 0 {
                to.writable().await?;
            } else {
                from.readable().await?;
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
