//! The `entitlement-worker` binary: parses arguments, loads settings, runs, exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use entitlement_worker::settings::Settings;
use entitlement_worker::{ops, pipeline, telemetry};

/// jemalloc instead of the C library's allocator: the worker's threads (tokio's, the
/// consumer's, librdkafka's callbacks) free what others allocated, which glibc's
/// per-thread arenas turned into tens of MiB of resident memory that never came back
/// (docs/performance.md), and it allocates and frees faster. It replaces `malloc` for the
/// whole process (librdkafka's buffers included), and its built-in settings
/// (`.cargo/config.toml`; `MALLOC_CONF` overrides them) hand freed pages back after 1 s
/// and keep one arena for all threads.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Create every topic the worker reads and writes that is missing, each with its
    /// settings (entitlement-state compacted), and say what was made.
    ///
    /// Example: entitlement-worker create-topics --partitions 12 --replication-factor 3
    CreateTopics {
        /// Partitions per topic; the broker's `num.partitions` if absent.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=10_000))]
        partitions: Option<i32>,
        /// Replicas per partition; the broker's `default.replication.factor` if absent.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=32))]
        replication_factor: Option<i32>,
    },
    /// Republish the whole state on entitlement-state (for a new consumer, or after the
    /// topic was lost): queued under the organizations' locks, published in order with
    /// everything else, in bounded memory, with a progress bar on a terminal.
    ///
    /// Example: entitlement-worker snapshot
    Snapshot {
        /// How long to wait for the messages to be published before leaving them to the
        /// worker's relay.
        #[arg(long, default_value_t = 300, value_name = "SECONDS")]
        wait: u64,
    },
    /// Start an embedded broker and the worker, play a story and print what the worker
    /// publishes. Needs only PostgreSQL.
    ///
    /// Example: entitlement-worker demo
    Demo {
        /// Keep the worker running after the story, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// An organization's pools (granted, transferred, expired, available, expiring within
    /// 30 days) and every workspace's required / allocated / missing units, those missing
    /// entitlements first, with totals.
    ///
    /// Example: entitlement-worker report --org acme --format json
    Report {
        /// The organization (`org_id`).
        #[arg(long)]
        org: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// The ledger entries of an organization, newest first, a page at a time.
    ///
    /// Example: entitlement-worker history --org acme --workspace summit-2026 --since 2026-11-01T00:00:00Z
    History {
        /// The organization (`org_id`).
        #[arg(long)]
        org: String,
        /// Only transfers into this workspace.
        #[arg(long)]
        workspace: Option<String>,
        /// Only this product (`seat` or a module handle).
        #[arg(long)]
        product: Option<String>,
        /// Only entries recorded at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only entries older than this sequence: the next page.
        #[arg(long, value_name = "SEQUENCE")]
        before: Option<i64>,
        /// Entries per page.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// An Excel workbook of an organization: Overview, Workspaces and Transactions sheets.
    ///
    /// Example: entitlement-worker export --org acme --output acme.xlsx
    Export {
        /// The organization (`org_id`).
        #[arg(long)]
        org: String,
        /// The .xlsx file to write.
        #[arg(long, value_name = "FILE.xlsx")]
        output: PathBuf,
    },
    /// Credits units to an organization's pool: publishes an `entitlement-granted` message
    /// for the worker to apply.
    ///
    /// Example: entitlement-worker grant --org acme --product seat --quantity 50 --source-kind add_on --reference PO-1234
    Grant {
        /// The organization (`org_id`) whose pool receives the units.
        #[arg(long)]
        org: String,
        /// `seat` or a module handle.
        #[arg(long)]
        product: String,
        /// Units to credit, 1 to 1,000,000.
        #[arg(long)]
        quantity: i64,
        /// When the units become available (RFC 3339); now if absent.
        #[arg(long, value_parser = parse_time)]
        valid_from: Option<chrono::DateTime<chrono::Utc>>,
        /// When the units left in the pool expire (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// plan, add_on, subscription, trial or manual (the default when a reference is
        /// given).
        #[arg(long, requires = "reference")]
        source_kind: Option<String>,
        /// The order, contract or ticket behind the grant: the grant's source, with
        /// `--source-kind`. Without it the grant names no source.
        #[arg(long)]
        reference: Option<String>,
        /// The event id; a new one if absent. Reuse one to retry safely: the worker applies
        /// an event id once.
        #[arg(long)]
        event_id: Option<String>,
    },
    /// Removes units from an organization's pool: publishes an `entitlement-revoked` message
    /// for the worker to apply. It removes the units of one grant (`--grant`, at most
    /// `--quantity`) or of every grant of a source (`--source-kind` and `--reference`, of one
    /// `--product` if given) that are still in the pool or not yet valid; units already in
    /// workspaces stay there. A grant that arrives later loses its units then.
    ///
    /// Example: entitlement-worker revoke --org acme --source-kind trial --reference T-77 --product live-stream --reason "event over"
    Revoke {
        /// The organization (`org_id`) whose pool loses the units.
        #[arg(long)]
        org: String,
        /// The `event_id` of the one grant whose units are removed.
        #[arg(
            long,
            value_name = "GRANT_ID",
            required_unless_present = "source_kind",
            conflicts_with = "source_kind"
        )]
        grant: Option<String>,
        /// At most this many of the grant's units; all that are left if absent.
        #[arg(long, conflicts_with = "source_kind")]
        quantity: Option<i64>,
        /// plan, add_on, subscription, trial or manual: every grant of this source.
        #[arg(long, requires = "reference")]
        source_kind: Option<String>,
        /// The source's reference (order, plan, subscription or ticket).
        #[arg(long, requires = "source_kind")]
        reference: Option<String>,
        /// Only this product of the source's grants.
        #[arg(long, conflicts_with = "grant")]
        product: Option<String>,
        /// Why, for the people reading the ledger (at most 256 characters).
        #[arg(long)]
        reason: Option<String>,
        /// The event id; a new one if absent. Reuse one to retry safely: the worker applies
        /// an event id once.
        #[arg(long)]
        event_id: Option<String>,
    },
    /// Defines a product in the catalogue: publishes a `product-defined` message for the
    /// worker to apply. It names the product (reports show the name) and, for a module,
    /// sets how it moves: `automatic` (from the pool by itself, like seats; workspaces
    /// already waiting for it are filled at once) or `manual` (it waits for a person's
    /// transfer); without `--assignment`, modules.auto_assign decides. The latest definition
    /// of a product wins.
    ///
    /// Example: entitlement-worker define-product --product live-stream --name "Live streaming" --assignment automatic
    DefineProduct {
        /// The product's handle: `seat` or a module's.
        #[arg(long)]
        product: String,
        /// What people call it (1 to 256 characters).
        #[arg(long)]
        name: String,
        /// A longer description (at most 2,000 characters).
        #[arg(long)]
        description: Option<String>,
        /// For a module only: automatic or manual. Seats always move by themselves.
        #[arg(long, value_parser = ["automatic", "manual"])]
        assignment: Option<String>,
        /// The event id; a new one if absent. Reuse one to retry safely: a definition seen
        /// again changes nothing.
        #[arg(long)]
        event_id: Option<String>,
    },
    /// Moves units from an organization's pool to a workspace by hand: publishes an
    /// `entitlement-transfer-requested` message and waits for the worker's answer, the
    /// ledger entry or the dead-letter reason. Exits 0 when the units moved, 1 otherwise.
    ///
    /// Example: entitlement-worker transfer --org acme --workspace summit-2026 --product gamification --quantity 1 --as u-alice --role entitlement_manager
    Transfer {
        /// The organization (`org_id`) whose pool the units leave.
        #[arg(long)]
        org: String,
        /// The workspace (event) that receives them.
        #[arg(long)]
        workspace: String,
        /// `seat` or a module handle.
        #[arg(long)]
        product: String,
        /// Seats to move; 1 for a module.
        #[arg(long, default_value_t = 1)]
        quantity: i64,
        /// The person asking (`requested_by.user_id`).
        #[arg(long = "as", value_name = "USER")]
        user: String,
        /// Their role; only entitlement_manager may transfer.
        #[arg(long)]
        role: String,
        /// How long to wait for the worker's answer, in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The event id; a new one if absent. Reuse one to retry safely.
        #[arg(long)]
        event_id: Option<String>,
    },
    /// Replays the whole ledger and checks every invariant against the stored state;
    /// exits 1 on any mismatch. Cheap enough to run daily.
    ///
    /// Example: entitlement-worker verify
    Verify {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Asks the broker for its default partitions or replication factor.
const BROKER_DEFAULT: i32 = -1;

fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&chrono::Utc))
        .map_err(|error| format!("not an RFC 3339 time ({error}), e.g. 2026-11-01T00:00:00Z"))
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
    if matches!(arguments.command, Command::Run | Command::Demo { .. }) {
        telemetry::init_logging(&settings.log);
    }
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
            Command::Run => pipeline::run(settings, shutdown_signal(), None)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Demo { keep_running } => {
                entitlement_worker::demo::run(settings, keep_running, shutdown_signal())
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::Verify { format } => verify(&settings, format).await,
            command => ops_command(&settings, command).await,
        }
    });
    // The runtime's own drop would wait, without end, for blocking work still running: a
    // consumer whose broker stopped answering could hold the process past the shutdown
    // bound the pipeline has already given up at.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(code) => code,
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

/// How long the process waits, once its work has returned, for blocking work left behind.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(2);

async fn verify(settings: &Settings, format: Format) -> anyhow::Result<ExitCode> {
    let pool = ops::connect(&settings.database).await?;
    let verification = ops::verify::verify(&pool).await?;
    match format {
        Format::Table => print!("{}", verification.to_text()),
        Format::Json => println!("{}", serde_json::to_string_pretty(&verification)?),
    }
    Ok(if verification.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn ops_command(settings: &Settings, command: Command) -> anyhow::Result<ExitCode> {
    let now = chrono::Utc::now();
    match command {
        Command::CreateTopics {
            partitions,
            replication_factor,
        } => {
            let created = entitlement_worker::kafka::admin::create_topics(
                &settings.kafka,
                &settings.topics,
                partitions.unwrap_or(BROKER_DEFAULT),
                replication_factor.unwrap_or(BROKER_DEFAULT),
            )
            .await?;
            let all = settings.topics.all();
            for name in &all {
                let made = created.iter().any(|created| created == name);
                let config = entitlement_worker::kafka::admin::topic_config(&settings.topics, name)
                    .iter()
                    .map(|(key, value)| format!(" ({key}={value})"))
                    .collect::<String>();
                let what = if made { "created" } else { "exists " };
                println!("{what} {name}{config}");
            }
            println!("{} of {} topics created.", created.len(), all.len());
        }
        Command::Snapshot { wait } => {
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let summary =
                ops::snapshot::snapshot(settings, std::time::Duration::from_secs(wait), progress)
                    .await?;
            print!("{}", summary.to_text(&settings.topics.state));
            if summary.unpublished > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Report { org, format } => {
            let pool = ops::connect(&settings.database).await?;
            let report = ops::report::Report::load(&pool, &org, now).await?;
            match format {
                Format::Table => print!("{}", report.to_table()),
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
        }
        Command::History {
            org,
            workspace,
            product,
            since,
            before,
            limit,
            format,
        } => {
            let pool = ops::connect(&settings.database).await?;
            let query = ops::history::HistoryQuery {
                org_id: org,
                workspace_id: workspace,
                product,
                since,
                before_sequence: before,
                limit,
            };
            let rows = ops::history::page(&pool, &query).await?;
            match format {
                Format::Table => print!("{}", ops::history::to_table(&rows, &query)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
        }
        Command::Export { org, output } => {
            let pool = ops::connect(&settings.database).await?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let summary = ops::export::export(&pool, &org, &output, now, progress).await?;
            println!(
                "Wrote {}: {} pools, {} workspace rows, {} ledger entries{}.",
                output.display(),
                summary.pools,
                summary.workspace_rows,
                summary.ledger_entries,
                if summary.truncated {
                    " (cut to Excel's row limit: see the notes in the workbook)"
                } else {
                    ""
                }
            );
        }
        Command::Grant {
            org,
            product,
            quantity,
            valid_from,
            expires_at,
            source_kind,
            reference,
            event_id,
        } => {
            let published = ops::publish::grant(
                settings,
                ops::publish::GrantRequest {
                    org_id: org,
                    product,
                    quantity,
                    valid_from,
                    expires_at,
                    source_kind,
                    source_reference: reference,
                    event_id,
                },
            )
            .await?;
            println!(
                "Published grant {} to {} (partition {}, offset {}); the worker credits it \
                 when it consumes it.",
                published.event_id, published.topic, published.partition, published.offset
            );
        }
        Command::Revoke {
            org,
            grant,
            quantity,
            source_kind,
            reference,
            product,
            reason,
            event_id,
        } => {
            let target = match (grant, source_kind, reference) {
                (Some(grant_id), _, _) => ops::publish::RevokeTarget::Grant { grant_id, quantity },
                (None, Some(kind), Some(reference)) => ops::publish::RevokeTarget::Source {
                    kind,
                    reference,
                    product,
                },
                _ => unreachable!("the arguments name a grant or a source"),
            };
            let published = ops::publish::revoke(
                settings,
                ops::publish::RevokeRequest {
                    org_id: org,
                    target,
                    reason,
                    event_id,
                },
            )
            .await?;
            println!(
                "Published revocation {} to {} (partition {}, offset {}); the worker removes the units when it consumes it.",
                published.event_id, published.topic, published.partition, published.offset
            );
        }
        Command::DefineProduct {
            product,
            name,
            description,
            assignment,
            event_id,
        } => {
            let published = ops::publish::define_product(
                settings,
                ops::publish::DefineRequest {
                    product: product.clone(),
                    name,
                    description,
                    assignment,
                    event_id,
                },
            )
            .await?;
            println!(
                "Published definition {} of {product} to {} (partition {}, offset {}); the \
                 worker applies it when it consumes it.",
                published.event_id, published.topic, published.partition, published.offset
            );
        }
        Command::Transfer {
            org,
            workspace,
            product,
            quantity,
            user,
            role,
            timeout,
            event_id,
        } => {
            let (published, outcome) = ops::publish::transfer(
                settings,
                ops::publish::TransferRequest {
                    org_id: org,
                    workspace_id: workspace,
                    product,
                    quantity,
                    user_id: user,
                    role,
                    event_id,
                },
                std::time::Duration::from_secs(timeout),
            )
            .await?;
            println!(
                "Published transfer request {} to {} (partition {}, offset {}).",
                published.event_id, published.topic, published.partition, published.offset
            );
            match outcome {
                Some(ops::publish::Outcome::Transferred(entry)) => {
                    println!(
                        "Transferred: ledger {} #{}: {} {} -> {} by {}; {} left in the pool.",
                        entry.org_id,
                        entry.sequence,
                        entry.quantity,
                        entry.product,
                        entry.workspace_id.as_deref().unwrap_or("?"),
                        entry.actor.as_deref().unwrap_or("?"),
                        entry.pool_available_after
                    );
                }
                Some(ops::publish::Outcome::Refused(letter)) => {
                    println!("Refused ({}): {}", letter.reason, letter.detail);
                    return Ok(ExitCode::FAILURE);
                }
                None => {
                    println!(
                        "No answer from the worker within {timeout} s: is it running? The \
                         request stays on the topic and is applied when the worker consumes it."
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Run | Command::Demo { .. } | Command::Verify { .. } => {
            unreachable!("handled by main")
        }
    }
    Ok(ExitCode::SUCCESS)
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
