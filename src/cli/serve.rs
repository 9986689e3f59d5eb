//! `ip2p serve`: one model worker per device behind the service's one queue.

use anyhow::Result;
use clap::Args;

use super::model::ModelArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub server: ip2p::server::ServerConfig,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let pipes = a
        .model
        .device
        .0
        .iter()
        .map(|&d| a.model.load_pipeline_on(d))
        .collect::<Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let handle = ip2p::server::start_many(a.server, pipes, a.model.model.clone()).await?;
        eprintln!(
            "ip2p serving {} on {} (gRPC, gRPC-Web, HTTP)",
            a.model.model, handle.addr
        );
        shutdown_signal().await;
        eprintln!("shutting down: letting in-flight edits finish");
        handle.shutdown().await;
        Ok::<(), anyhow::Error>(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
