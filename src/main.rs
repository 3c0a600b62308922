//! The `entitlement-worker` binary: parses arguments, loads settings, runs, exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use entitlement_worker::settings::Settings;
use entitlement_worker::{pipeline, telemetry};

#[derive(Parser)]
#[command(
    name = "entitlement-worker",
    version,
    about = "Keeps an event platform's seat and module entitlements right."
)]
struct Arguments {
    /// A TOML file layered over config/default.toml; ENTITLEMENTS__* variables win over both.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume until SIGTERM or SIGINT, then finish the batch, commit and exit 0.
    ///
    /// Example: ENTITLEMENTS__KAFKA__BROKERS=kafka:9092 entitlement-worker run
    Run,
    /// Start an embedded broker and the worker, play a story and print what the worker
    /// publishes. Needs only PostgreSQL.
    ///
    /// Example: entitlement-worker demo
    Demo {
        /// Keep the worker running after the story, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let settings = match Settings::load(arguments.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("entitlement-worker: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(&settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("entitlement-worker: could not start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match arguments.command {
            Command::Run => pipeline::run(settings, shutdown_signal(), None).await,
            Command::Demo { keep_running } => {
                entitlement_worker::demo::run(settings, keep_running, shutdown_signal()).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "The worker stopped with an error."
            );
            eprintln!("entitlement-worker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM can be handled");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT can be handled");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
