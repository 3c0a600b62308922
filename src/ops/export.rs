//! `entitlement-worker export`: the organization's entitlements as an Excel workbook.
//!
//! Three sheets, as the "Export XLS" of the product it is modelled on:
//!
//! - **Overview**: the organization and the time of the export, its pools (granted,
//!   transferred, expired, revoked, available or unlimited, expiring within 30 days,
//!   pending), where their units came from (per source: granted, used, revoked, expired,
//!   available, pending; unlimited grants on lines of their own) and the totals per
//!   product (required, allocated, missing, workspaces missing).
//! - **Workspaces**: one row per (workspace, product), live workspaces before past ones
//!   (rule 13: ended or archived), with their names; in each, those missing entitlements
//!   first and in red.
//! - **Transactions**: every ledger entry, newest first.
//!
//! Products appear by their catalogue names, with their handles: "Live streaming
//! (live-stream)"; a product never defined by its handle alone (rule 14).
//!
//! Everything is read in one `REPEATABLE READ` read-only transaction, so the three sheets
//! describe the same moment even while the worker keeps writing: the totals are the sums
//! of the Workspaces rows, the newest "pool available after" is the pool's available, and
//! the row counts taken first are the rows streamed afterwards. (That is why the queries
//! here repeat those of `report` and `history` rather than calling their functions: those
//! take the pool and would each see a different moment.)
//!
//! Memory stays bounded however large the organization: the Workspaces and Transactions
//! rows are streamed from the database into "constant memory" worksheets, which flush each
//! row to an anonymous temporary file (in the output's directory, not in a possibly
//! memory-backed `/tmp`) as soon as the next one starts. The workbook is then compressed
//! into a hidden file next to `output` (`.NAME.PID.NANOS.tmp`) and renamed over it only
//! when complete, so a failed export leaves no file, and `output` is never half written.
//! (A process killed during the compression itself leaves that hidden file behind.)
//!
//! Excel holds at most 1,048,576 rows per sheet, 1,048,575 under the header. An
//! organization with more ledger entries (or workspace rows) than that still gets a
//! workbook: the newest entries (the most missing rows first) that fit, a note next to
//! the sheet's header and on the Overview saying how many were left out, a warning on
//! standard error, and `ExportSummary::truncated` set. An export that fails outright would
//! leave the largest organizations with nothing; `history --before` pages through the
//! older entries.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use rust_xlsxwriter::{Color, Format, FormatBorder, Workbook, Worksheet, XlsxError};
use sqlx::{PgConnection, PgPool};

use super::history::newest_entries;
use super::history::LedgerRow;
use super::product_label;
use super::report::{
    pool_lines, source_lines, workspace_lines, PoolLine, ProductTotals, SourceLine, WorkspaceLine,
};

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub pools: u64,
    /// The (workspace, product) rows written on the Workspaces sheet.
    pub workspace_rows: u64,
    /// The ledger entries written on the Transactions sheet.
    pub ledger_entries: u64,
    /// True when a sheet reached Excel's row limit and rows were left out: the oldest
    /// ledger entries, or the last workspace rows (past workspaces, then those missing
    /// least). The sheet and the Overview say how many.
    pub truncated: bool,
}

/// The sheets' names, in order.
pub const SHEETS: [&str; 3] = ["Overview", "Workspaces", "Transactions"];

/// Excel's rows per worksheet.
pub const EXCEL_ROWS_MAX: u64 = 1_048_576;
/// The data rows that fit under a sheet's header row.
pub const DATA_ROWS_MAX: u64 = EXCEL_ROWS_MAX - 1;

/// The headers of the Overview's pools table.
pub const POOL_HEADERS: [&str; 8] = [
    "Product",
    "Granted",
    "Transferred",
    "Expired",
    "Revoked",
    "Available",
    "Expiring within 30 days",
    "Pending",
];
/// The headers of the Overview's sources table.
pub const SOURCE_HEADERS: [&str; 8] = [
    "Product",
    "Source",
    "Granted",
    "Used",
    "Revoked",
    "Expired",
    "Available",
    "Pending",
];
/// The headers of the Overview's totals table.
pub const TOTAL_HEADERS: [&str; 5] = [
    "Product",
    "Required",
    "Allocated",
    "Missing",
    "Workspaces missing",
];
/// The headers of the Workspaces sheet.
pub const WORKSPACE_HEADERS: [&str; 8] = [
    "Workspace",
    "Product",
    "Required",
    "Allocated",
    "Missing",
    "Missing since (UTC)",
    "Name",
    "Life",
];
/// The headers of the Transactions sheet.
pub const TRANSACTION_HEADERS: [&str; 11] = [
    "Sequence",
    "Recorded at (UTC)",
    "Kind",
    "Product",
    "Quantity",
    "Workspace",
    "Pool available after",
    "Caused by",
    "Grant",
    "Actor",
    "Entry ID",
];

const WORKSPACE_WIDTHS: [f64; 8] = [34.0, 20.0, 11.0, 11.0, 11.0, 21.0, 34.0, 8.0];
const TRANSACTION_WIDTHS: [f64; 11] = [
    11.0, 21.0, 17.0, 20.0, 10.0, 34.0, 20.0, 36.0, 36.0, 24.0, 38.0,
];
const OVERVIEW_WIDTHS: [f64; 8] = [24.0, 21.0, 13.0, 11.0, 11.0, 20.0, 23.0, 11.0];

/// Where the Overview's tables start (zero-based rows): the title rows come first.
pub const OVERVIEW_POOLS_HEADER_ROW: u32 = 7;

const INTEGER: &str = "#,##0";
const DATETIME: &str = "yyyy-mm-dd hh:mm:ss";
/// Excel's "light red fill with dark red text".
const RED_FILL: u32 = 0xFFC7CE;
const RED_TEXT: u32 = 0x9C0006;

/// Writes the workbook of `org_id` to `output`; a progress bar on standard error when
/// `progress` is set.
pub async fn export(
    pool: &PgPool,
    org_id: &str,
    output: &Path,
    now: DateTime<Utc>,
    progress: bool,
) -> anyhow::Result<ExportSummary> {
    // The worksheets' rows wait in anonymous temporary files (gone with the process,
    // however it ends) in the output's directory rather than in a possibly memory-backed
    // `/tmp`; setting it checks that the directory is writable before any work.
    let directory = output_directory(output)?;
    let mut workbook = Workbook::new();
    workbook
        .set_tempdir(directory)
        .with_context(|| format!("could not write in {}", directory.display()))?;

    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // The same check, and the same words, as `report`.
    let known: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM organizations WHERE org_id = $1)")
            .bind(org_id)
            .fetch_one(&mut *tx)
            .await?;
    anyhow::ensure!(known, "no organization {org_id:?} is known to the worker");

    let pools = pool_lines(&mut tx, org_id, now).await?;
    let sources = source_lines(&mut tx, org_id).await?;
    let totals = product_totals(&mut tx, org_id).await?;
    let workspace_total: u64 = totals.iter().map(|total| total.rows).sum();
    let ledger_total: u64 = sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(last_sequence - first_sequence + 1), 0)::bigint
               FROM ledger_blocks WHERE org_id = $1",
    )
    .bind(org_id)
    .fetch_one(&mut *tx)
    .await?
    .try_into()?;
    let workspace_rows = workspace_total.min(DATA_ROWS_MAX);
    let ledger_rows = ledger_total.min(DATA_ROWS_MAX);
    let omitted_workspaces = workspace_total - workspace_rows;
    let omitted_entries = ledger_total - ledger_rows;

    let formats = Formats::new();

    let bar = super::progress_bar(progress, workspace_rows + ledger_rows, "exporting", "rows");
    write_overview(
        workbook.add_worksheet(),
        &formats,
        org_id,
        now,
        Overview {
            pools: &pools,
            sources: &sources,
            totals: &totals,
        },
        [
            (
                "Workspace rows",
                "workspace rows",
                workspace_total,
                omitted_workspaces,
            ),
            (
                "Ledger entries",
                "ledger entries",
                ledger_total,
                omitted_entries,
            ),
        ],
    )?;

    let sheet = workbook.add_worksheet_with_constant_memory();
    sheet.set_name(SHEETS[1])?;
    start_table(sheet, &formats, &WORKSPACE_HEADERS, &WORKSPACE_WIDTHS)?;
    if omitted_workspaces > 0 {
        let note = format!(
            "Only the first {workspace_rows} of {workspace_total} rows fit in an Excel sheet: \
             the last {omitted_workspaces} in this order (past workspaces, then those missing \
             least) are left out."
        );
        write_note(sheet, &formats, WORKSPACE_HEADERS.len(), &note)?;
    }
    let mut written = 0u64;
    {
        let mut lines = workspace_lines(&mut tx, org_id, Some(workspace_rows));
        while let Some(line) = lines.try_next().await? {
            written += 1;
            write_workspace(sheet, &formats, to_row(written)?, &line)?;
            bar.inc(1);
        }
    }
    anyhow::ensure!(
        written == workspace_rows,
        "read {written} workspace rows where {workspace_rows} were counted"
    );
    sheet.autofilter(0, 0, to_row(written)?, last_column(&WORKSPACE_HEADERS))?;

    let sheet = workbook.add_worksheet_with_constant_memory();
    sheet.set_name(SHEETS[2])?;
    start_table(sheet, &formats, &TRANSACTION_HEADERS, &TRANSACTION_WIDTHS)?;
    if omitted_entries > 0 {
        let note = format!(
            "Only the newest {ledger_rows} of {ledger_total} ledger entries fit in an Excel \
             sheet: the {omitted_entries} oldest are left out (see `entitlement-worker \
             history --before`)."
        );
        write_note(sheet, &formats, TRANSACTION_HEADERS.len(), &note)?;
    }
    // Every ledger entry's product has a pool: the pools' lines know all their names.
    let names: HashMap<&str, &str> = pools
        .iter()
        .map(|line| (line.product.as_str(), line.product_name.as_str()))
        .collect();
    let mut written_entries = 0u64;
    {
        let mut entries = newest_entries(&mut tx, org_id, ledger_rows);
        while let Some(entry) = entries.try_next().await? {
            written_entries += 1;
            let name = names.get(entry.product.as_str()).copied();
            write_entry(sheet, &formats, to_row(written_entries)?, &entry, name)?;
            bar.inc(1);
        }
    }
    anyhow::ensure!(
        written_entries == ledger_rows,
        "read {written_entries} ledger entries where {ledger_rows} were counted"
    );
    sheet.autofilter(
        0,
        0,
        to_row(written_entries)?,
        last_column(&TRANSACTION_HEADERS),
    )?;
    tx.commit().await?;

    // Compressing a large workbook takes a while: off the runtime's threads.
    bar.set_message("compressing");
    bar.enable_steady_tick(StdDuration::from_millis(200));
    // Only now the output's own temporary file, so that the time in which a killed export
    // leaves it behind is that of the compression alone.
    let mut file = TempFile::create(output)?;
    let handle = file.take()?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut writer = BufWriter::new(handle);
        workbook.save_to_writer(&mut writer)?;
        writer
            .into_inner()
            .map_err(|error| error.into_error())?
            .sync_all()?;
        Ok(())
    })
    .await
    .context("the workbook writer panicked")?
    .with_context(|| format!("could not write {}", file.path.display()))?;
    file.persist(output)?;
    bar.finish_and_clear();

    let truncated = omitted_workspaces > 0 || omitted_entries > 0;
    if truncated {
        eprintln!(
            "warning: {} exceeds Excel's {EXCEL_ROWS_MAX} rows per sheet: \
             {omitted_workspaces} workspace rows and {omitted_entries} ledger entries are not \
             in {}.",
            org_id,
            output.display()
        );
    }
    Ok(ExportSummary {
        pools: pools.len() as u64,
        workspace_rows,
        ledger_entries: ledger_rows,
        truncated,
    })
}

/// The per-product totals, with how many (workspace, product) rows they sum.
struct Totals {
    totals: ProductTotals,
    rows: u64,
}

/// The totals per product, as `Report` adds them up, seat first; summed by the database so
/// that the workspace rows need not be held.
async fn product_totals(tx: &mut PgConnection, org_id: &str) -> anyhow::Result<Vec<Totals>> {
    let rows: Vec<(String, String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT w.product, COALESCE(min(c.name), w.product), sum(w.required)::bigint,
                sum(w.allocated)::bigint, sum(GREATEST(w.required - w.allocated, 0))::bigint,
                count(*) FILTER (WHERE w.required > w.allocated), count(*)
           FROM consumption w
           LEFT JOIN products c ON c.product = w.product
          WHERE w.org_id = $1
          GROUP BY w.product
          ORDER BY w.product <> 'seat', w.product",
    )
    .bind(org_id)
    .fetch_all(tx)
    .await?;
    rows.into_iter()
        .map(
            |(product, product_name, required, allocated, missing, workspaces_missing, rows)| {
                Ok(Totals {
                    totals: ProductTotals {
                        product,
                        product_name,
                        required,
                        allocated,
                        missing,
                        workspaces_missing,
                    },
                    rows: rows.try_into()?,
                })
            },
        )
        .collect()
}

/// The cell formats, each plain and in red (a row missing entitlements).
struct Formats {
    title: Format,
    label: Format,
    section: Format,
    header: Format,
    note: Format,
    text: Format,
    integer: Format,
    datetime: Format,
    text_red: Format,
    integer_red: Format,
    datetime_red: Format,
}

impl Formats {
    fn new() -> Self {
        let red = |format: Format| {
            format
                .set_background_color(Color::RGB(RED_FILL))
                .set_font_color(Color::RGB(RED_TEXT))
        };
        Self {
            title: Format::new().set_bold().set_font_size(14),
            label: Format::new().set_bold(),
            section: Format::new().set_bold().set_font_size(12),
            header: Format::new()
                .set_bold()
                .set_background_color(Color::RGB(0xD9E1F2))
                .set_border_bottom(FormatBorder::Thin),
            note: Format::new()
                .set_italic()
                .set_font_color(Color::RGB(RED_TEXT)),
            text: Format::new(),
            integer: Format::new().set_num_format(INTEGER),
            datetime: Format::new().set_num_format(DATETIME),
            text_red: red(Format::new()),
            integer_red: red(Format::new().set_num_format(INTEGER)),
            datetime_red: red(Format::new().set_num_format(DATETIME)),
        }
    }
}

/// A sheet's header row (frozen) and its columns' widths.
fn start_table(
    sheet: &mut Worksheet,
    formats: &Formats,
    headers: &[&str],
    widths: &[f64],
) -> Result<(), XlsxError> {
    for (column, width) in (0u16..).zip(widths) {
        sheet.set_column_width(column, *width)?;
    }
    for (column, header) in (0u16..).zip(headers) {
        sheet.write_string_with_format(0, column, *header, &formats.header)?;
    }
    sheet.set_freeze_panes(1, 0)?;
    Ok(())
}

/// A note on the header row, one column right of the table (outside the autofilter).
fn write_note(
    sheet: &mut Worksheet,
    formats: &Formats,
    columns: usize,
    note: &str,
) -> Result<(), XlsxError> {
    let column = u16::try_from(columns + 1).unwrap_or(u16::MAX);
    sheet.write_string_with_format(0, column, note, &formats.note)?;
    Ok(())
}

/// The Overview's three tables.
struct Overview<'a> {
    pools: &'a [PoolLine],
    sources: &'a [SourceLine],
    totals: &'a [Totals],
}

fn write_overview(
    sheet: &mut Worksheet,
    formats: &Formats,
    org_id: &str,
    now: DateTime<Utc>,
    tables: Overview<'_>,
    counts: [(&str, &str, u64, u64); 2],
) -> Result<(), XlsxError> {
    let Overview {
        pools,
        sources,
        totals,
    } = tables;
    sheet.set_name(SHEETS[0])?;
    for (column, width) in (0u16..).zip(OVERVIEW_WIDTHS) {
        sheet.set_column_width(column, width)?;
    }
    sheet.write_string_with_format(0, 0, "Entitlements", &formats.title)?;
    sheet.write_string_with_format(1, 0, "Organization", &formats.label)?;
    sheet.write_string(1, 1, org_id)?;
    sheet.write_string_with_format(2, 0, "Generated at (UTC)", &formats.label)?;
    sheet.write_datetime_with_format(2, 1, now.naive_utc(), &formats.datetime)?;
    let mut notes = Vec::new();
    for (row, (label, what, total, omitted)) in (3u32..).zip(counts) {
        sheet.write_string_with_format(row, 0, label, &formats.label)?;
        sheet.write_number_with_format(row, 1, total as f64, &formats.integer)?;
        if omitted > 0 {
            notes.push(format!(
                "{omitted} of the {total} {what} do not fit in an Excel sheet and are left out."
            ));
        }
    }

    let mut row = OVERVIEW_POOLS_HEADER_ROW - 1;
    sheet.write_string_with_format(row, 0, "Pools", &formats.section)?;
    row += 1;
    for (column, header) in (0u16..).zip(POOL_HEADERS) {
        sheet.write_string_with_format(row, column, header, &formats.header)?;
    }
    for line in pools {
        row += 1;
        sheet.write_string(row, 0, product_label(&line.product, &line.product_name))?;
        let values = [
            Some(line.granted),
            Some(line.transferred),
            Some(line.expired),
            Some(line.revoked),
            (!line.unlimited).then_some(line.available),
            Some(line.expiring_soon),
            Some(line.pending),
        ];
        for (column, value) in (1u16..).zip(values) {
            match value {
                Some(value) => {
                    sheet.write_number_with_format(row, column, value as f64, &formats.integer)?
                }
                None => sheet.write_string(row, column, "Unlimited")?,
            };
        }
    }
    if pools.is_empty() {
        row += 1;
        sheet.write_string(row, 0, "(no grants yet)")?;
    }

    row += 2;
    sheet.write_string_with_format(row, 0, "Where the units came from", &formats.section)?;
    row += 1;
    for (column, header) in (0u16..).zip(SOURCE_HEADERS) {
        sheet.write_string_with_format(row, column, header, &formats.header)?;
    }
    for line in sources {
        row += 1;
        sheet.write_string(row, 0, product_label(&line.product, &line.product_name))?;
        sheet.write_string(row, 1, &line.source)?;
        // An unlimited line counts only what it gave (used).
        let unlimited = if line.unlimited_now {
            "Unlimited"
        } else {
            "Ended"
        };
        let values = [
            (!line.unlimited).then_some(line.granted).ok_or("Unlimited"),
            Ok(line.used),
            (!line.unlimited).then_some(line.revoked).ok_or("-"),
            (!line.unlimited).then_some(line.expired).ok_or("-"),
            (!line.unlimited).then_some(line.available).ok_or(unlimited),
            Ok(line.pending),
        ];
        for (column, value) in (2u16..).zip(values) {
            match value {
                Ok(value) => {
                    sheet.write_number_with_format(row, column, value as f64, &formats.integer)?
                }
                Err(text) => sheet.write_string(row, column, text)?,
            };
        }
    }
    if sources.is_empty() {
        row += 1;
        sheet.write_string(row, 0, "(no grants yet)")?;
    }

    row += 2;
    sheet.write_string_with_format(row, 0, "Totals by product", &formats.section)?;
    row += 1;
    for (column, header) in (0u16..).zip(TOTAL_HEADERS) {
        sheet.write_string_with_format(row, column, header, &formats.header)?;
    }
    for Totals { totals: line, .. } in totals {
        row += 1;
        let (text, integer) = if line.missing > 0 {
            (&formats.text_red, &formats.integer_red)
        } else {
            (&formats.text, &formats.integer)
        };
        sheet.write_string_with_format(
            row,
            0,
            product_label(&line.product, &line.product_name),
            text,
        )?;
        let values = [
            line.required,
            line.allocated,
            line.missing,
            line.workspaces_missing,
        ];
        for (column, value) in (1u16..).zip(values) {
            sheet.write_number_with_format(row, column, value as f64, integer)?;
        }
    }
    if totals.is_empty() {
        row += 1;
        sheet.write_string(row, 0, "(no workspaces yet)")?;
    }
    if !notes.is_empty() {
        row += 1;
    }
    for note in notes {
        row += 1;
        sheet.write_string_with_format(row, 0, note, &formats.note)?;
    }
    Ok(())
}

fn write_workspace(
    sheet: &mut Worksheet,
    formats: &Formats,
    row: u32,
    line: &WorkspaceLine,
) -> Result<(), XlsxError> {
    let (text, integer, datetime) = if line.missing > 0 {
        (
            &formats.text_red,
            &formats.integer_red,
            &formats.datetime_red,
        )
    } else {
        (&formats.text, &formats.integer, &formats.datetime)
    };
    sheet.write_string_with_format(row, 0, &line.workspace_id, text)?;
    sheet.write_string_with_format(
        row,
        1,
        product_label(&line.product, &line.product_name),
        text,
    )?;
    sheet.write_number_with_format(row, 2, line.required as f64, integer)?;
    sheet.write_number_with_format(row, 3, line.allocated as f64, integer)?;
    sheet.write_number_with_format(row, 4, line.missing as f64, integer)?;
    match line.missing_since {
        Some(since) => sheet.write_datetime_with_format(row, 5, since.naive_utc(), datetime)?,
        // Filled all along the row when it is red; nothing otherwise.
        None if line.missing > 0 => sheet.write_blank(row, 5, datetime)?,
        None => sheet,
    };
    match &line.name {
        Some(name) => sheet.write_string_with_format(row, 6, name, text)?,
        None if line.missing > 0 => sheet.write_blank(row, 6, text)?,
        None => sheet,
    };
    let life = if line.live { "live" } else { "past" };
    sheet.write_string_with_format(row, 7, life, text)?;
    Ok(())
}

fn write_entry(
    sheet: &mut Worksheet,
    formats: &Formats,
    row: u32,
    entry: &LedgerRow,
    product_name: Option<&str>,
) -> Result<(), XlsxError> {
    sheet.write_number_with_format(row, 0, entry.sequence as f64, &formats.integer)?;
    sheet.write_datetime_with_format(row, 1, entry.recorded_at.naive_utc(), &formats.datetime)?;
    sheet.write_string(row, 2, &entry.kind)?;
    let product = product_name.map_or(entry.product.clone(), |name| {
        product_label(&entry.product, name)
    });
    sheet.write_string(row, 3, product)?;
    sheet.write_number_with_format(row, 4, entry.quantity as f64, &formats.integer)?;
    if let Some(workspace) = &entry.workspace_id {
        sheet.write_string(row, 5, workspace)?;
    }
    sheet.write_number_with_format(row, 6, entry.pool_available_after as f64, &formats.integer)?;
    sheet.write_string(row, 7, &entry.caused_by)?;
    if let Some(grant) = &entry.grant_id {
        sheet.write_string(row, 8, grant)?;
    }
    if let Some(actor) = &entry.actor {
        sheet.write_string(row, 9, actor)?;
    }
    sheet.write_string(row, 10, entry.entry_id.to_string())?;
    Ok(())
}

/// The directory `output` goes to (`.` for a bare file name).
fn output_directory(output: &Path) -> anyhow::Result<&Path> {
    anyhow::ensure!(
        output.file_name().is_some(),
        "{} does not name a file",
        output.display()
    );
    Ok(match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    })
}

fn to_row(index: u64) -> anyhow::Result<u32> {
    u32::try_from(index).context("more rows than a sheet holds")
}

fn last_column(headers: &[&str]) -> u16 {
    u16::try_from(headers.len().saturating_sub(1)).unwrap_or(u16::MAX)
}

/// The workbook while it is being written: a hidden file next to the output, removed
/// unless it is renamed over the output.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
    persisted: bool,
}

impl TempFile {
    fn create(output: &Path) -> anyhow::Result<Self> {
        let name = output
            .file_name()
            .with_context(|| format!("{} does not name a file", output.display()))?
            .to_string_lossy();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let path = output.with_file_name(format!(".{name}.{}.{nanos:09}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("could not create {}", path.display()))?;
        Ok(Self {
            path,
            file: Some(file),
            persisted: false,
        })
    }

    fn take(&mut self) -> anyhow::Result<File> {
        self.file.take().context("the workbook was already written")
    }

    fn persist(mut self, output: &Path) -> anyhow::Result<()> {
        std::fs::rename(&self.path, output).with_context(|| {
            format!(
                "could not move {} to {}",
                self.path.display(),
                output.display()
            )
        })?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            self.file.take();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
