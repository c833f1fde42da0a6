//! End-to-end tests of the HTTP API over loopback with the real model. Most cases share one server
//! (this custom harness starts it on first use and stops it at the end); cases that watch
//! server-wide state (load gauges, the loading phase) start their own.

#[path = "../common/mod.rs"]
mod common;

mod adaptive;
mod auth;
mod bench;
mod best_of_n;
mod chat;
mod completions;
mod config;
mod equilibrium;
mod errors;
mod genarm;
mod lifecycle;
mod openapi;
mod scoring;
mod search;
mod server;
mod soak;
mod structured;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use libtest_mimic::{Arguments, Trial};
use server::{Client, Server};

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A case on the shared server.
type Case = fn(Client) -> CaseFuture;
/// A case that starts its own server.
type OwnCase = fn() -> CaseFuture;

/// `(name, case)` for each `async fn name(c: Client)` (or `async fn name()` with `own`).
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        vec![$((stringify!($case), (|c| Box::pin($case(c)) as $crate::CaseFuture) as $crate::Case)),*]
    };
    (own: $($case:ident),* $(,)?) => {
        vec![$((stringify!($case), (|| Box::pin($case()) as $crate::CaseFuture) as $crate::OwnCase)),*]
    };
}
pub(crate) use cases;

/// The shared server, started by the first case that needs it.
#[derive(Default)]
struct Shared {
    server: tokio::sync::OnceCell<Server>,
}

impl Shared {
    async fn client(&self) -> Client {
        self.server
            .get_or_init(|| Server::ready(&[]))
            .await
            .client()
    }
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let runtime = Arc::new(tokio::runtime::Runtime::new().expect("a tokio runtime"));
    let shared = Arc::new(Shared::default());
    let mut trials = Vec::new();
    let groups = [
        ("completions", completions::cases()),
        ("chat", chat::cases()),
        ("errors", errors::cases()),
        ("openapi", openapi::cases()),
        ("bench", bench::cases()),
        ("genarm", genarm::cases()),
        ("best_of_n", best_of_n::cases()),
        ("search", search::cases()),
        ("equilibrium", equilibrium::cases()),
        ("adaptive", adaptive::cases()),
        ("scoring", scoring::cases()),
        ("structured", structured::cases()),
    ];
    for (group, cases) in groups {
        for (name, case) in cases {
            let (runtime, shared) = (runtime.clone(), shared.clone());
            trials.push(Trial::test(format!("{group}::{name}"), move || {
                runtime.block_on(async { case(shared.client().await).await });
                Ok(())
            }));
        }
    }
    let own = [
        ("lifecycle", lifecycle::cases()),
        ("auth", auth::cases()),
        ("config", config::cases()),
        ("soak", soak::cases()),
        ("genarm", genarm::own_cases()),
        ("best_of_n", best_of_n::own_cases()),
        ("search", search::own_cases()),
    ];
    for (group, name, case) in own
        .into_iter()
        .flat_map(|(g, cases)| cases.into_iter().map(move |(n, c)| (g, n, c)))
    {
        let runtime = runtime.clone();
        trials.push(Trial::test(format!("{group}::{name}"), move || {
            runtime.block_on(case());
            Ok(())
        }));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    drop(shared); // stops the shared server
    conclusion.exit_code()
}
