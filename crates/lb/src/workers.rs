//! Thread-per-core serving, like nginx workers: N threads, each with its own single-threaded
//! tokio runtime, its own `SO_REUSEPORT` accept socket per listener and its own backend
//! connection pool, so a proxied request never crosses threads.

use std::net::SocketAddr;
use std::sync::OnceLock;

use tokio::runtime::Handle;

static WORKERS: OnceLock<Vec<Handle>> = OnceLock::new();

/// Set the number of worker threads before the first load balancer starts (default: the
/// number of CPUs). Returns false if the pool already exists.
pub fn init(n: usize) -> bool {
    let mut created = false;
    WORKERS.get_or_init(|| {
        created = true;
        spawn(n)
    });
    created
}

fn spawn(n: usize) -> Vec<Handle> {
    (0..n.max(1))
        .map(|i| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("nimbus-lb-{i}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("building a load-balancer worker runtime");
                    let _ = tx.send(rt.handle().clone());
                    rt.block_on(std::future::pending::<()>());
                })
                .expect("spawning a load-balancer worker thread");
            rx.recv().expect("worker runtime handle")
        })
        .collect()
}

/// The worker runtimes.
pub(crate) fn handles() -> &'static [Handle] {
    WORKERS.get_or_init(|| {
        spawn(std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
    })
}

/// Bind `n` TCP sockets on `addr` with `SO_REUSEPORT`. A probe bind without `SO_REUSEPORT`
/// first makes a port already in use fail (instead of silently sharing it) and resolves port 0.
pub(crate) fn bind_reuseport(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let addr = {
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
        let l: std::net::TcpListener = probe.into();
        l.local_addr()?
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        out.push(s.into());
    }
    Ok(out)
}
