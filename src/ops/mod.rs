//! Operators' commands: read what the worker keeps (report, history, export), check it
//! (verify), and ask it for changes (grant, revoke, transfer, define-product) through its
//! own input topics, so every change still goes through the worker's single path.

pub mod export;
pub mod history;
pub mod publish;
pub mod report;
pub mod snapshot;
pub mod verify;

use std::str::FromStr;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::settings::{redact_url, DatabaseSettings};

/// Connects to the worker's database for reading, without creating or migrating it: an
/// operator's command must never change the schema, and a missing database is a mistake
/// in the configuration worth saying plainly.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(&settings.url)
        .with_context(|| {
            format!(
                "database.url {:?} is not a PostgreSQL URL",
                redact_url(&settings.url)
            )
        })?
        .application_name("entitlement-worker-ops");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|error| {
            let missing = error
                .as_database_error()
                .and_then(|database| database.code())
                .is_some_and(|code| code == "3D000");
            if missing {
                anyhow::anyhow!(
                    "the database at {} does not exist: has the worker run against it?",
                    redact_url(&settings.url)
                )
            } else {
                anyhow::anyhow!(
                    "could not reach the database at {}: {error}",
                    redact_url(&settings.url)
                )
            }
        })?;
    let migrated: bool = sqlx::query_scalar("SELECT to_regclass('ledger') IS NOT NULL")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        migrated,
        "the database at {} has no ledger: the worker has not set it up yet",
        redact_url(&settings.url)
    );
    Ok(pool)
}

/// A product as people read it (rule 14): its catalogue name with its handle, "Live
/// streaming (live-stream)"; its handle alone when it was never defined (its name is then
/// its handle).
pub(crate) fn product_label(product: &str, name: &str) -> String {
    if name == product {
        product.to_owned()
    } else {
        format!("{name} ({product})")
    }
}

/// Pads or cuts `text` to `width` characters, for table columns.
pub(crate) fn cell(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count > width {
        let cut: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        format!("{text}{}", " ".repeat(width - count))
    }
}

/// A progress bar on stderr counting `unit`, hidden when `progress` is false (no
/// terminal). Cleared when dropped too, so that an error is not printed after a half-drawn
/// bar.
pub(crate) fn progress_bar(
    progress: bool,
    total: u64,
    message: &'static str,
    unit: &'static str,
) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        .with_message(message)
        .with_finish(ProgressFinish::AndClear);
    let template = format!(
        "{{msg:>11}} [{{bar:40}}] {{human_pos}}/{{human_len}} {unit}, {{elapsed}} (eta {{eta}})"
    );
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
