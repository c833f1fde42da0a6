//! Drives one run. Closed loop: N clients, each sending its next request when its last one ends,
//! so the load adapts to the server. Open loop: Poisson arrivals sent on schedule however many are
//! still in flight, so a slow server queues up instead of being offered less (no coordinated
//! omission).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;

use super::client::{self, Prompt, Sample, Target};
use super::workload::Workload;

#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// This many clients in a closed loop.
    Closed(usize),
    /// Requests per second, Poisson arrivals.
    Open(f64),
}

/// When a run stops sending: after `requests`, or after `duration` (requests in flight finish).
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    Requests(usize),
    Duration(Duration),
}

/// One run's samples in sending order, its wall time in seconds, and the long prompt's request.
pub struct Ran {
    pub samples: Vec<Sample>,
    pub duration_s: f64,
    pub long: Option<Sample>,
}

/// Run `load` until `stop`. `stream` tells runs apart: it picks their prompts and arrival times.
/// `long`: one more request, sent that long after the start, outside the run's samples.
#[allow(clippy::too_many_arguments)]
pub async fn drive(
    target: &Arc<Target>,
    workload: &Arc<Workload>,
    stream: u64,
    load: Load,
    stop: Stop,
    seed: u64,
    long: Option<(Duration, Prompt)>,
    progress: &ProgressBar,
) -> Ran {
    let origin = Instant::now();
    let long = long.map(|(after, prompt)| {
        let target = target.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until((origin + after).into()).await;
            client::send(&target, &prompt, usize::MAX, origin).await
        })
    });
    let mut tasks = JoinSet::new();
    let shared = (target.clone(), workload.clone(), progress.clone());
    let request = move |i: usize| {
        let (target, workload, progress) = shared.clone();
        async move {
            let sample = client::send(&target, &workload.prompt(stream, i), i, origin).await;
            progress.inc(1);
            sample
        }
    };
    match load {
        Load::Closed(clients) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..clients {
                let (next, request) = (next.clone(), request.clone());
                tasks.spawn(async move {
                    let mut samples = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let more = match stop {
                            Stop::Requests(n) => i < n,
                            Stop::Duration(d) => origin.elapsed() < d,
                        };
                        if !more {
                            return samples;
                        }
                        samples.push(request(i).await);
                    }
                });
            }
        }
        Load::Open(rate) => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(stream);
            let mut at = Duration::ZERO;
            for i in 0.. {
                // Exponential gaps: −ln(U)/rate with U in (0, 1].
                let u: f64 = 1.0 - rng.random::<f64>();
                at += Duration::from_secs_f64(-u.ln() / rate);
                let more = match stop {
                    Stop::Requests(n) => i < n,
                    Stop::Duration(d) => at < d,
                };
                if !more {
                    break;
                }
                tokio::time::sleep_until((origin + at).into()).await;
                let request = request(i);
                tasks.spawn(async move { vec![request.await] });
            }
        }
    }
    let mut samples: Vec<Sample> = tasks.join_all().await.into_iter().flatten().collect();
    samples.sort_by_key(|s| s.index);
    let duration_s = origin.elapsed().as_secs_f64();
    let long = match long {
        Some(task) => task.await.ok(),
        None => None,
    };
    Ran {
        samples,
        duration_s,
        long,
    }
}
