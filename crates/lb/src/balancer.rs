//! Backend selection algorithms (pure: no I/O, no clock).
//!
//! A [`Balancer`] is built for one pool from the backends' stable keys and weights and then picks
//! an index among the candidates that are currently available. Availability and in-flight counts
//! are passed in on each pick, so the same code serves L4 and L7 and is unit-tested alone.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Balancing algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Each available backend in turn.
    #[default]
    RoundRobin,
    /// The backend with the fewest in-flight requests (connections for L4), relative to weight.
    LeastConnections,
    /// Rendezvous hash of the client IP: a client keeps its backend while that backend is up.
    IpHash,
    /// A hash ring (160 points per weight unit) keyed by a request header or the client address.
    ConsistentHash,
    /// Smooth weighted round robin (nginx's algorithm).
    Weighted,
}

impl Algorithm {
    /// All algorithms with their wire names.
    pub const ALL: [(&'static str, Algorithm); 5] = [
        ("round_robin", Algorithm::RoundRobin),
        ("least_connections", Algorithm::LeastConnections),
        ("ip_hash", Algorithm::IpHash),
        ("consistent_hash", Algorithm::ConsistentHash),
        ("weighted", Algorithm::Weighted),
    ];

    /// Parse a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, a)| *a)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("round_robin", |(n, _)| n)
    }
}

/// The live view of one backend at pick time.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Whether it may receive new traffic (healthy, not ejected, not draining).
    pub available: bool,
    /// In-flight requests or connections.
    pub active: u64,
    /// Weight (>= 1).
    pub weight: u32,
}

/// What a pick may hash on.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext<'a> {
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// The configured hash header's value, when present.
    pub hash_key: Option<&'a [u8]>,
}

/// A balancer for one pool.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    keys: Vec<u64>,
    cursor: AtomicUsize,
    /// Smooth WRR current weights.
    wrr: Mutex<Vec<i64>>,
    /// Hash ring: (point, backend index), sorted by point.
    ring: Vec<(u64, usize)>,
}

/// A 64-bit FNV-1a hash finished with the splitmix64 mixer: stable across builds and processes.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

impl Balancer {
    /// Build a balancer for backends with these stable keys (e.g. their addresses) and weights.
    pub fn new(algorithm: Algorithm, keys: &[String], weights: &[u32]) -> Self {
        let hashed: Vec<u64> = keys.iter().map(|k| hash64(k.as_bytes())).collect();
        let mut ring = Vec::new();
        if algorithm == Algorithm::ConsistentHash {
            for (i, k) in hashed.iter().enumerate() {
                let points = 160 * u64::from(weights.get(i).copied().unwrap_or(1).clamp(1, 100));
                for p in 0..points {
                    ring.push((mix(k ^ mix(p + 1)), i));
                }
            }
            ring.sort_unstable();
        }
        Self {
            algorithm,
            keys: hashed,
            cursor: AtomicUsize::new(0),
            wrr: Mutex::new(vec![0; keys.len()]),
            ring,
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Pick an available candidate; `None` when none is available. `cands` must be in the same
    /// order (and of the same length) as the keys the balancer was built with.
    pub fn pick(&self, cands: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let n = cands.len();
        if n == 0 || !cands.iter().any(|c| c.available) {
            return None;
        }
        match self.algorithm {
            Algorithm::RoundRobin => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| (start + i) % n)
                    .find(|&i| cands[i].available)
            }
            Algorithm::LeastConnections => {
                // Compare active/weight without division; rotate the start so ties spread.
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<usize> = None;
                for i in (0..n).map(|i| (start + i) % n) {
                    let c = &cands[i];
                    if !c.available {
                        continue;
                    }
                    best = match best {
                        None => Some(i),
                        Some(b) => {
                            let lhs = u128::from(c.active) * u128::from(cands[b].weight.max(1));
                            let rhs = u128::from(cands[b].active) * u128::from(c.weight.max(1));
                            if lhs < rhs {
                                Some(i)
                            } else {
                                Some(b)
                            }
                        }
                    };
                }
                best
            }
            Algorithm::Weighted => {
                let mut cur = self
                    .wrr
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cur.len() != n {
                    *cur = vec![0; n];
                }
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for i in 0..n {
                    if !cands[i].available {
                        continue;
                    }
                    let w = i64::from(cands[i].weight.max(1));
                    cur[i] += w;
                    total += w;
                    if best.is_none_or(|b| cur[i] > cur[b]) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    cur[b] -= total;
                }
                best
            }
            Algorithm::IpHash => {
                let key = ctx.client_ip.map_or(0, |ip| hash64(&ip_bytes(ip)));
                self.rendezvous(cands, key)
            }
            Algorithm::ConsistentHash => {
                let key = match (ctx.hash_key, ctx.client_ip) {
                    (Some(k), _) => hash64(k),
                    (None, Some(ip)) => hash64(&ip_bytes(ip)),
                    (None, None) => 0,
                };
                self.ring_lookup(cands, key)
            }
        }
    }

    fn rendezvous(&self, cands: &[Candidate], key: u64) -> Option<usize> {
        (0..cands.len())
            .filter(|&i| cands[i].available)
            .max_by_key(|&i| mix(key ^ self.keys.get(i).copied().unwrap_or(i as u64)))
    }

    fn ring_lookup(&self, cands: &[Candidate], key: u64) -> Option<usize> {
        if self.ring.is_empty() {
            return self.rendezvous(cands, key);
        }
        let start = self.ring.partition_point(|(p, _)| *p < key);
        let len = self.ring.len();
        (0..len)
            .map(|i| self.ring[(start + i) % len].1)
            .find(|&i| cands.get(i).is_some_and(|c| c.available))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(n: usize) -> Vec<Candidate> {
        vec![
            Candidate {
                available: true,
                active: 0,
                weight: 1
            };
            n
        ]
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn round_robin_is_even_and_skips_unavailable() {
        let b = Balancer::new(Algorithm::RoundRobin, &keys(3), &[1, 1, 1]);
        let mut c = cands(3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[b.pick(&c, &PickContext::default()).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        c[1].available = false;
        for _ in 0..100 {
            assert_ne!(b.pick(&c, &PickContext::default()), Some(1));
        }
        for x in &mut c {
            x.available = false;
        }
        assert_eq!(b.pick(&c, &PickContext::default()), None);
    }

    #[test]
    fn least_connections_prefers_idle_and_respects_weight() {
        let b = Balancer::new(Algorithm::LeastConnections, &keys(3), &[1, 1, 1]);
        let mut c = cands(3);
        c[0].active = 5;
        c[1].active = 0;
        c[2].active = 3;
        for _ in 0..10 {
            assert_eq!(b.pick(&c, &PickContext::default()), Some(1));
        }
        // Weight 4 with 3 active (0.75) beats weight 1 with 1 active (1.0).
        c[0].active = 1;
        c[1].active = 3;
        c[1].weight = 4;
        c[2].active = 2;
        assert_eq!(b.pick(&c, &PickContext::default()), Some(1));
    }

    #[test]
    fn weighted_follows_weights_smoothly() {
        let b = Balancer::new(Algorithm::Weighted, &keys(3), &[5, 1, 1]);
        let mut c = cands(3);
        c[0].weight = 5;
        let seq: Vec<usize> = (0..7)
            .map(|_| b.pick(&c, &PickContext::default()).unwrap())
            .collect();
        // nginx's smooth WRR sequence for 5:1:1.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn ip_hash_is_sticky_and_minimal_on_removal() {
        let b = Balancer::new(Algorithm::IpHash, &keys(4), &[1; 4]);
        let mut c = cands(4);
        let ips: Vec<IpAddr> = (0..200)
            .map(|i| IpAddr::from([192, 168, (i / 250) as u8, (i % 250) as u8]))
            .collect();
        let before: Vec<usize> = ips
            .iter()
            .map(|ip| {
                b.pick(
                    &c,
                    &PickContext {
                        client_ip: Some(*ip),
                        hash_key: None,
                    },
                )
                .unwrap()
            })
            .collect();
        let mut per = [0; 4];
        for &x in &before {
            per[x] += 1;
        }
        assert!(per.iter().all(|&n| n > 20), "spread {per:?}");
        c[2].available = false;
        for (ip, old) in ips.iter().zip(&before) {
            let now = b
                .pick(
                    &c,
                    &PickContext {
                        client_ip: Some(*ip),
                        hash_key: None,
                    },
                )
                .unwrap();
            if *old == 2 {
                assert_ne!(now, 2);
            } else {
                assert_eq!(now, *old, "only clients of the removed backend move");
            }
        }
    }

    #[test]
    fn consistent_hash_by_key_is_stable_and_spreads() {
        let b = Balancer::new(Algorithm::ConsistentHash, &keys(3), &[1, 1, 1]);
        let mut c = cands(3);
        let mut per = [0; 3];
        let mut first = Vec::new();
        for u in 0..3000 {
            let k = format!("user-{u}");
            let ctx = PickContext {
                client_ip: None,
                hash_key: Some(k.as_bytes()),
            };
            let i = b.pick(&c, &ctx).unwrap();
            assert_eq!(b.pick(&c, &ctx), Some(i), "same key, same backend");
            per[i] += 1;
            first.push(i);
        }
        assert!(per.iter().all(|&n| n > 700 && n < 1300), "spread {per:?}");
        c[0].available = false;
        for (u, old) in first.iter().enumerate() {
            let k = format!("user-{u}");
            let ctx = PickContext {
                client_ip: None,
                hash_key: Some(k.as_bytes()),
            };
            let now = b.pick(&c, &ctx).unwrap();
            if *old != 0 {
                assert_eq!(now, *old);
            }
        }
    }

    #[test]
    fn parse_names_round_trip() {
        for (name, a) in Algorithm::ALL {
            assert_eq!(Algorithm::parse(name), Some(a));
            assert_eq!(a.as_str(), name);
        }
        assert_eq!(Algorithm::parse("random"), None);
    }
}
