//! Criterion benchmarks of one placement decision (place + commit, with departures keeping the
//! cluster at a steady occupancy) on simulated clusters of 1,000 and 10,000 nodes, for each
//! algorithm and strategy. The side-by-side report with packing metrics is the `simulate`
//! example (`scripts/bench-scheduler`).

// The criterion macros generate undocumented functions.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nimbus_scheduler::sim::{self, Algorithm, Simulation};
use nimbus_scheduler::{Policy, Strategy};

fn placement(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    for n in [1_000, 10_000] {
        let nodes = sim::generate_nodes(1, n, 4);
        let work = sim::generate_workload(1, 100_000, &nodes, 4, 0.7);
        for strategy in [Strategy::Spread, Strategy::Binpack] {
            let policy = Policy {
                strategy,
                ..Policy::default()
            };
            for algo in Algorithm::ALL {
                if algo == Algorithm::FullScan && n > 1_000 && strategy == Strategy::Binpack {
                    continue; // slow reference; the spread run shows its cost
                }
                let name = format!(
                    "{}/{}",
                    algo.name(),
                    if strategy == Strategy::Spread {
                        "spread"
                    } else {
                        "binpack"
                    }
                );
                g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                    // Warm the cluster up to steady state, then measure single decisions.
                    let mut s = Simulation::new(&nodes, policy, work.clone(), algo, 7);
                    for _ in 0..50_000 {
                        s.depart();
                        s.decide();
                    }
                    b.iter(|| {
                        if s.remaining() == 0 {
                            s = Simulation::new(&nodes, policy, work.clone(), algo, 7);
                        }
                        s.depart();
                        s.decide()
                    });
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
