//! nimbus load-balancer data plane.
//!
//! A [`LoadBalancer`] serves one [`LbConfig`]: L7 HTTP/1.1 + HTTP/2 reverse proxy (optionally
//! over TLS 1.3), L4 TCP and UDP proxies, active health checks and passive outlier ejection, an
//! opt-in edge cache and Prometheus metrics. [`LoadBalancer::update`] swaps the configuration
//! atomically (arc-swap): established client connections stay open and pick up the new routes
//! and backends on their next request; removed backends drain.
//!
//! The pure parts ([`balancer`], [`routing`], [`health`], [`cache`]) are unit-tested alone; the
//! runtime is tested over real sockets in `tests/`.
//!
//! # Internals
//!
//! - **Threads.** TCP-based listeners are served thread-per-core like nginx workers
//!   (`workers.rs`): N threads (default: CPUs) each run a single-threaded tokio runtime with its own
//!   `SO_REUSEPORT` accept socket per listener and its own pool of idle backend connections, so a
//!   proxied request never crosses threads. A probe bind without `SO_REUSEPORT` first keeps "port in use"
//!   an error. Health checks, UDP and drain timers run on the caller's runtime.
//!
//! - **Hot swap.** Everything a request needs (pools, balancers, routes, TLS acceptor, cache handle,
//!   hyper builders) is one immutable `Snapshot` behind an `ArcSwap`; each request
//!   loads it once. `update(cfg)` checks the config first (a refused config changes nothing), keeps
//!   listeners whose config did not change (same sockets), binds new ones before publishing, and
//!   reuses backend state by address, so client connections stay open and their next request sees
//!   the new config (tested on one keep-alive connection).
//! - **Draining.** A backend missing from the new config stops getting new requests at once;
//!   in-flight requests finish; its relayed L4 connections get a drain signal and are closed after
//!   `limits.drain_timeout_ms` (flows the kernel forwards: their conntrack entries are deleted then);
//!   its metric series are removed after that.
//! - **Balancing** (`balancer.rs`, pure): `round_robin`, `least_connections` (in-flight requests /
//!   open connections relative to weight, ties rotated), `ip_hash` (rendezvous hash of the client IP:
//!   only clients of a removed backend move), `consistent_hash` (ring with 160 points per weight unit,
//!   keyed by a configured header or the client address), `weighted` (nginx's smooth weighted round
//!   robin). A backend is a candidate when healthy, not ejected and not draining.
//! - **Health** (`health.rs` pure, `backend.rs` runtime): active probes per backend (TCP connect, or
//!   `GET path` expecting a status) with interval, timeout and healthy/unhealthy thresholds. A
//!   backend added while a check is configured starts *pending* (no traffic), is probed at once
//!   and retried from 50 ms while pending, and enters the rotation on its first passed probe; a
//!   request that finds no candidate while a first probe runs waits for it (at most 300 ms).
//!   Without a check a new backend takes traffic at once. Passive outlier ejection: N consecutive failures (connect errors, timeouts,
//!   502/503/504) eject a backend for `base_ejection_ms` x the number of ejections (max 10x).
//! - **L7** (`http.rs`): hyper 1.x server via hyper-util's auto builder (HTTP/1.1 keep-alive and
//!   HTTP/2, h2c by prior knowledge, h2 by ALPN over TLS). Backends are reached over keep-alive
//!   HTTP/1.1 connections with a small hand-written client (`upstream.rs`, wire format in
//!   `h1.rs`), used directly from the task that serves the client connection: the request head
//!   is encoded into one buffer and sent with one write; the response head is parsed with
//!   `httparse` into a `HeaderMap` whose values share the read buffer (interim 1xx responses are
//!   skipped; a `101` (on this path) or a malformed head is a failed backend response, like a connection error);
//!   the response body is read from the backend socket when
//!   hyper's server polls it, delimited per RFC 9112 (`HEAD`/204/304 empty, `Transfer-Encoding:
//!   chunked` decoded, `Content-Length`, or until the backend closes). Request bodies are sent as
//!   they come with their length, or chunked when the length is unknown (HTTP/2 clients), and are
//!   written completely before the response is read (known gap: a backend that answers early
//!   and closes before reading the whole body gives a 502, one that answers early and stops
//!   reading stalls the request until the response timeout, 504). There is no connection task, no channel and no
//!   wake-up between the two sides (hyper's client dispatcher handed each request and response
//!   over a channel; hyper-util's pooled client, used before that, also ran each connection in
//!   its own task). A backend connection is leased for one request and goes back to the client
//!   connection's idle list as soon as the body's last byte is read (a body dropped early, a
//!   response delimited by close, `Connection: close` or extra bytes close it), so a keep-alive
//!   client reuses one backend connection per backend. When the client connection closes, its
//!   idle backend connections move to a per-worker-thread pool (at most 256, 60 s idle) from
//!   which the next client connection of that worker takes them. A reused connection the backend
//!   closed is noticed before use when tokio already knows it readable (no system call
//!   otherwise), else by an end of stream before any response byte, and the request is resent
//!   on a new connection if it has no body. Known gap: idle backend connections of a client
//!   connection that stays open idle are kept until the client or the backend closes them
//!   (nginx's `keepalive` pool shares them between clients), so a
//!   backend sees up to one connection per open client connection. Routing (`routing.rs`, pure): ordered rules on host (exact or
//!   `*.suffix`), path prefix (plain string prefix) and header equality, each pointing at a pool; no
//!   match goes to the first pool. Hop-by-hop headers are stripped both ways; `X-Forwarded-For` is
//!   appended, `X-Forwarded-Proto` set, `X-Request-Id` kept if sane or generated (128-bit hex) and
//!   returned to the client. Sticky sessions: a cookie holding a hash of the backend address.
//!   Requests without a body are retried on another backend after a connect failure (at most 3
//!   tries); requests with a body are sent once. Failures: no available backend or all tries failed
//!   -> 503 with a body naming the LB; timeout waiting for response headers -> 504; other backend
//!   errors -> 502. Malformed requests -> 400 and request heads over `max_header_bytes` (default
//!   16 KiB, hyper's minimum 8 KiB) or with more than 100 headers -> 431, from hyper's HTTP/1
//!   parser, on that connection only; header read timeout 30 s.
//! - **L7 fast path** (`fast.rs`, `fast/write.rs`): a client connection of an LB without an edge cache starts on
//!   a hand-written HTTP/1.1 server path, and hyper serves only what it does not take. Each
//!   request head is parsed with `httparse` from the connection's read buffer; routing, sticky
//!   cookie, hash key and request id are read from the parsed fields, and the backend's request
//!   head is written from them in one pass (hop-by-hop fields and the names `Connection` lists
//!   dropped, `X-Forwarded-For` appended, `X-Forwarded-Proto` and `X-Request-Id` set), with no
//!   `HeaderMap`; the backend's response head is relayed the same way
//!   (`h1::parse_response_relay`: status line, end-to-end fields as they came, `X-Request-Id`,
//!   `Set-Cookie` for stickiness, `Date` if the backend sent none, `Content-Length` or chunked for
//!   bodies of unknown length, `Connection: close` when closing) and goes to the client together
//!   with the body bytes already read, in one write; the rest of the body streams from the
//!   backend connection as the client takes it. Balancing, retries (bodyless requests, up to 3
//!   backends), outlier detection, metrics (requests by class, bytes, in-flight, latency
//!   histogram) and the 502/503/504 bodies are those of the hyper path. Pipelined requests are
//!   answered in order. Protocol upgrades (WebSocket): a `GET` with `Connection: upgrade` and
//!   `Upgrade` (not h2c) is forwarded with those two fields; a `101` from the backend is relayed
//!   (its `Upgrade`, `Connection: upgrade`, end-to-end fields, `X-Request-Id`) and then the two
//!   connections are spliced both ways (bytes either side sent after its head included) until
//!   either closes, counted as one in-flight request and in the byte counters when it ends; any
//!   other answer is an ordinary response. A `101` to a request that asked no upgrade is still a
//!   failed backend response. Handed to hyper for the rest of the connection, with the bytes already
//!   read replayed: requests with a body (`Content-Length` other than 0, `Transfer-Encoding`),
//!   `Expect`, other `Upgrade`s (h2c, non-GET, no `Connection: upgrade`: hyper ignores them), HTTP/1.0, a target not in origin form, a missing or non-ASCII `Host`,
//!   more than 8 names in `Connection`, anything `httparse` refuses or a head over
//!   `max_header_bytes` (hyper answers 400/431 as before), the HTTP/2 preface, and every request
//!   once the LB has a cache (upgrades excepted). Timers: one per connection, armed once and re-armed only when it
//!   fires before the deadline wanted (the 30 s header-read timeout while waiting for a request
//!   head, idle keep-alive included, as hyper's; the response timeout while waiting for a
//!   backend), so a request costs a clock read, not a timer registration. A connection watches
//!   its own child of the listener's cancellation token (the listener's token is one waiter list
//!   locked on every wake-up of every connection task of both workers). On listener stop an
//!   idle connection closes at once; one in a request finishes it (`Connection: close`) within
//!   the drain timeout. Differences from hyper: header names are relayed with the case they came
//!   in, and the reason phrase is the backend's. A client that disconnects while its request
//!   waits for the backend is noticed only when the response is written, so the backend exchange
//!   runs to its response or the response timeout.
//! - **Why hyper and not pingora** (issue 7 asked to measure): a pingora 0.9 proxy configured the
//!   same way (`bench/pingora-proxy`, outside the workspace; `LB_PINGORA=1 scripts/bench-lb`)
//!   served 0.44x-0.76x the requests/s of `nimbus-lb-proxy` with 1.6x-2.2x its CPU per request and a
//!   worse p99 in 3 of 4 runs on this machine, and pingora's `Server` owns the process (signals,
//!   fixed services and listeners, its own runtimes) where the agent starts and updates LBs
//!   in-process; it would also add ~80 crates and cmake to the build. Figures and reasoning:
//!   docs/benchmarks.md, "hyper vs pingora".
//! - **TLS** (`tls.rs`): rustls (ring provider), TLS 1.3 only, ALPN h2 and http/1.1, optionally
//!   restricted to some cipher suites (`TlsConfig::cipher_suites`); a key that does
//!   not match the certificate is refused. The acceptor is part of the snapshot, so a certificate
//!   change applies to new handshakes without rebinding.
//! - **Edge cache** (`cache.rs`): opt-in, GET/HEAD without `Authorization`; shared-cache rules of RFC
//!   9111 without heuristic freshness (`s-maxage` > `max-age` > `Expires - Date`, minus `Age`;
//!   `no-store`, `private`, `Vary: *` never stored; `no-cache` or no explicit freshness stored only
//!   with a validator and revalidated on each use). `Vary` selects variants; stale entries are
//!   revalidated with `If-None-Match`/`If-Modified-Since` and refreshed on 304; a client's matching
//!   `If-None-Match` gets a 304 from the edge. Memory-bounded LRU (`max_bytes`, `max_object_bytes`;
//!   only responses with a `Content-Length` within the object limit are stored). `X-Cache:
//!   HIT|MISS|REVALIDATED` and `Age` on responses.
//! - **L4** (`l4.rs`, `splice.rs`): TCP: pick (client IP as hash key), connect with timeout (up to
//!   3 backends), then relay both directions with splice(2) through a 1 MiB pipe per direction
//!   (zero copy, half-close propagated). The pipe is a buffer: the relay reads into it while it has
//!   room and writes out of it while it holds bytes, tries each splice before waiting and waits for
//!   one readiness event only when neither side moved; tokio's cached readiness is cleared only by
//!   an `EAGAIN` that proves the socket empty (a read into an empty pipe) or full (a write), so a
//!   full pipe never hides data waiting in the socket. UDP: one connected upstream socket per client
//!   address, replies sent from the listener socket, sessions expire after `udp_idle_timeout_ms`.
//!   L4 listeners use the first pool.
//! - **In-kernel L4 path** (`kernel.rs` pure, `kernel_sync.rs` runtime; on by default in the agent,
//!   `kernel_l4` in `LbConfig` names the table prefix): TCP and UDP listeners whose default pool
//!   uses `round_robin`, `weighted`, `ip_hash` or `consistent_hash`, IPv4 only, with backends all on loopback or all elsewhere,
//!   are forwarded by the kernel instead of relayed. Each LB owns a table `ip <prefix>_lb<hash>`:
//!   `nat` chains at prerouting (`dstnat`) and output (-100) match the listener's address and port
//!   (`fib daddr type local` for `0.0.0.0`) and jump to `pick`, one `numgen inc mod W vmap` over
//!   ranges sized by the weights (round robin: weight 1), or for `ip_hash` and `consistent_hash`
//!   one `jhash ip saddr mod 256 seed <fixed> vmap` over 256 buckets, each given to an available
//!   backend by weighted rendezvous hashing (`consistent_hash` weighs by the backend weights,
//!   `ip_hash` not), so a client address keeps its backend and a backend leaving or returning
//!   moves only the clients of the buckets it loses or gains (tested), to a chain per backend that sets a
//!   connection mark (tag `0x4e`, 12 bits of the table name's hash, 12-bit slot), counts the new
//!   connection in a named counter and DNATs. Conntrack keeps every established flow on its
//!   backend, so a config change, a health flip, an agent restart or the table's replacement never
//!   breaks one (tested). Flows DNATed towards another interface than `lo` are masqueraded so
//!   replies return through this node (backends see the node's address, as with the relay). A
//!   `filter` chain at postrouting adds each marked packet to the slot's `tx`/`rx` byte counter
//!   (`counter name ct mark map`). The runtime renders the plan when the snapshot changes (and when an ejection or a drain
//!   timeout ends, at least every 1 s) (availability = healthy, not ejected, not draining) and replaces the table in one
//!   `nft -f` transaction when the text changed; every 2 s it folds the counters into
//!   `requests_total` (one per connection, class 2xx), `bytes_total` (IP bytes) and counts open
//!   flows per slot from `/proc/net/nf_conntrack` (TCP established, UDP all) into `backend_active`
//!   and `client_connections`. A backend's slot derives from a hash of its address (probing past a
//!   slot another address holds) and is not reused while the LB lives, so marks of old flows keep
//!   naming their backend, also across an agent restart. When a backend leaves the table (removed
//!   from the config), its flows keep going for `drain_timeout_ms`, then its conntrack entries are
//!   deleted over ctnetlink (`conntrack.rs`: one `IPCTNL_MSG_CT_DELETE` filtered by mark) and the
//!   flow's next packet is answered with a reset; a stopped LB's flows likewise, by the table's
//!   mark mask. A backend that is only unhealthy keeps its established flows. The user-space listener stays bound (it
//!   reserves the port) and serves what the rules do not take: clients of `127.0.0.1` when the
//!   backends are remote (DNAT from loopback to another interface would need `route_localnet`),
//!   every connection while no backend is available, and everything if `nft` fails (warned once,
//!   retried). The table is deleted on `shutdown`; the agent deletes tables under its prefix that
//!   belong to no running LB on every reconcile (an LB deleted while its agent was down), and
//!   `testkit::remove_datapath` removes them with the rest of a test cloud's datapath. Not in the
//!   kernel path: `least_connections` (needs per-connection state), a `consistent_hash` header
//!   key (L4 hashes the client address either way), passive outlier ejection (the kernel
//!   reports no connect failures; instead a TCP LB forwarded in the kernel without a configured
//!   health check gets an implicit TCP connect check, every 2 s, out after 3 failures, back after
//!   2 successes; a UDP one gets none), the L4 latency histogram (no
//!   connection lifetimes); UDP flows forwarded in the kernel expire by the kernel's conntrack UDP
//!   timeouts (`nf_conntrack_udp_timeout*`), not `udp_idle_timeout_ms`. The kernel's bucket
//!   mapping is its own: a `127.0.0.1` client served by the user-space listener of the same LB is
//!   hashed by the balancer's ring, so it may land on another backend than a remote client with
//!   the same address would. Marks from two LBs whose table
//!   hashes share 12 bits would mix their byte counters (1 in 4096 per pair).
//! - **Metrics** (`metrics.rs`, prometheus-client, prefix `nimbus_lb_`): `requests_total{lb,backend,
//!   class}` (L4: one per connection; backend `cache` for cache hits, `none` for errors made by the
//!   proxy), `backend_active`, `bytes_total{direction}`, `latency_seconds` (time to response
//!   headers; L4: connection lifetime), `backend_healthy`, `client_connections`,
//!   `cache_requests_total{result}`. Hot-path handles are resolved once per backend (atomics only).
//!
//! # Known gaps
//!
//! - VIP: the lease's safety assumes the servers' clocks agree
//!   (the expiry is the proposing leader's wall-clock time; after a leader change a skewed clock
//!   shortens or lengthens leases) and that the holder's agent can fence itself: an agent killed
//!   while its host stays up leaves the VIP on the interface (its listeners are gone) until it
//!   restarts, so both nodes may answer ARP for it (the new holder's gratuitous ARP wins for
//!   clients that heard it; there is no kernel-level fencing such as an ARP filter or STONITH).
//!   The VIP is IPv4 only, one per LB, always a /32 on the underlay interface (no other interface
//!   or prefix can be configured), and a VIP outside the underlay subnet needs the routers to know
//!   it (no BGP/route announcement). The lease is renewed through Raft (~2 log entries/s per
//!   VIP). Existing connections to the old holder break on a takeover (no connection state is
//!   shared). LB placement (`nodes`, `replicas`) chooses nodes by count and name only: not by
//!   load, zone or spread against backends, and not moved back when a better node returns (it is
//!   sticky); LB ports stay cluster-wide even for an LB placed on one node; an LB moved off a node
//!   stops listening there at once (established connections get the drain timeout, then close;
//!   nothing hands them to the new node); with
//!   `replicas` and no `nodes`, the VIP nodes are preferred, but when they are all ineligible the
//!   LB serves elsewhere with nobody allowed to hold its VIP. A route's header value cannot contain
//!   `,` on the CLI (the API accepts it).
//!   Performance (docs/benchmarks.md): L7 0.82-0.92x nginx's requests/s (p99 1.03-1.20x) with
//!   hyper's client, 0.95-1.00x with the own upstream client (28.8k user-space instructions per
//!   request, nginx 30.4k); with the fast path 12.7k instructions and 4.3 system calls per request
//!   (nginx 30.5k, 6.3); bench-lb medians 1.05x, 1.08x, 1.11x, 1.05x, 0.89x, 1.19x, 1.16x and
//!   0.99x nginx's requests/s (p99 0.52x-1.08x; at most nginx's in 6 of 8), median of all 22
//!   rounds 1.07x, ahead in 17 of 20 paired runs: ahead by a few per cent on average, not in
//!   every invocation on the shared machine (the kernel's TCP work, equal for both proxies, is
//!   ~3/4 of the proxy's CPU). Requests hyper still serves
//!   (bodies, HTTP/2, cached LBs) keep the old costs.
//!   L4 on the in-kernel path (the default for eligible listeners): 1.17x, 0.73x and 0.99x direct
//!   in three bench-lb runs, 0.90x in an interleaved hand check; the user-space relay, still used
//!   by ineligible listeners and loopback clients of remote backends, reaches 0.5-0.7x direct,
//!   level with HAProxy `mode tcp` + splice.
//!   WebSocket / `Upgrade` requests are proxied on the HTTP/1.1 fast path only: not over HTTP/2
//!   (extended CONNECT), not when hyper serves the connection (after a request with a body on
//!   it: hyper strips `Upgrade` and a backend's 101 is a 502), and a spliced connection has no
//!   idle timeout. The agent's
//!   `/metrics` is unauthenticated.

pub mod backend;
pub mod balancer;
pub mod cache;
pub mod config;
mod conntrack;
mod fast;
mod h1;
pub mod health;
mod http;
mod kernel;
pub mod kernel_sync;
mod l4;
pub mod metrics;
pub mod routing;
mod runtime;
mod splice;
pub mod tls;
mod upstream;
pub mod workers;

pub use backend::BackendStatus;
pub use balancer::Algorithm;
pub use config::{
    BackendConfig, CacheConfig, HealthCheckConfig, HealthProbe, LbConfig, Limits, ListenerConfig,
    OutlierConfig, PoolConfig, Protocol, RouteConfig, TlsConfig,
};
pub use metrics::Metrics;
pub use routing::{HeaderMatch, RouteMatch};
pub use runtime::LoadBalancer;

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// The configuration cannot be served.
    #[error("invalid load balancer config: {0}")]
    Config(String),
    /// The TLS certificate or key is unusable.
    #[error("tls: {0}")]
    Tls(String),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}
