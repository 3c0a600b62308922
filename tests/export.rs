//! `export` against real PostgreSQL, the workbook read back cell by cell with calamine,
//! and its styles, frozen panes and autofilters checked in the package's XML.

mod common;

use std::io::Read as _;
use std::path::Path;
use std::time::Instant;

use calamine::{open_workbook, Data, DataType as _, Range, Reader, Xlsx};
use chrono::{DateTime, Duration, TimeZone as _, Utc};
use entitlement_worker::codec::{decode, InputKind};
use entitlement_worker::domain::Policy;
use entitlement_worker::ops;
use entitlement_worker::ops::export::{
    export, ExportSummary, DATA_ROWS_MAX, OVERVIEW_POOLS_HEADER_ROW, POOL_HEADERS, SHEETS,
    SOURCE_HEADERS, TOTAL_HEADERS, TRANSACTION_HEADERS, WORKSPACE_HEADERS,
};
use entitlement_worker::ops::history::LedgerRow;
use entitlement_worker::ops::report::Report;
use entitlement_worker::store::{Inbound, Store};
use serde_json::json;
use sqlx::PgPool;

/// Excel's "light red fill with dark red text", as the export writes it.
const RED_FILL: &str = "FFFFC7CE";
const RED_TEXT: &str = "FF9C0006";

fn inbound(offset: i64, kind: InputKind, payload: serde_json::Value) -> Inbound {
    let payload = payload.to_string();
    Inbound {
        topic: format!("{kind:?}"),
        partition: 0,
        offset,
        payload: Some(payload.as_bytes().to_vec()),
        decoded: decode(kind, Some(payload.as_bytes())),
    }
}

/// A migrated database of its own, and a pool on it as the operators' commands open it.
async fn database() -> (Store, PgPool) {
    let settings = common::settings("unused:9092");
    let store = Store::connect(&settings.database).await.expect("connects");
    let pool = ops::connect(&settings.database)
        .await
        .expect("ops connects");
    (store, pool)
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The known story of `acme`, through the worker's own path:
///
/// - t0: seat grants of 3 units, 1 unit expiring at t0+30min and 2 units valid from
///   t0+60d (pending); a gamification grant of 2 units expiring at t0+10d;
/// - t0+1h: the clock expires the 1-unit seat lot;
/// - t0+2h: w-alpha gets 2 participants (2 seats), w-beta 2 (1 seat left: 1 missing),
///   gamification is enabled on w-alpha and w-gamma (nothing moves: modules are manual);
/// - t0+3h: u-alice transfers one gamification unit to w-alpha; w-gamma still misses one.
async fn tell_the_story(store: &Store, t0: DateTime<Utc>) {
    let at = |minutes: i64| rfc3339(t0 + Duration::minutes(minutes));
    let grants = vec![
        inbound(
            0,
            InputKind::EntitlementGranted,
            json!({"event_id": "g-seat", "occurred_at": at(0), "org_id": "acme",
                   "product": "seat", "quantity": 3,
                   "source": {"kind": "plan", "reference": "PLAN-2026"}}),
        ),
        inbound(
            1,
            InputKind::EntitlementGranted,
            json!({"event_id": "g-trial", "occurred_at": at(0), "org_id": "acme",
                   "product": "seat", "quantity": 1, "expires_at": at(30)}),
        ),
        inbound(
            2,
            InputKind::EntitlementGranted,
            json!({"event_id": "g-later", "occurred_at": at(0), "org_id": "acme",
                   "product": "seat", "quantity": 2, "valid_from": at(60 * 24 * 60)}),
        ),
        inbound(
            3,
            InputKind::EntitlementGranted,
            json!({"event_id": "g-gam", "occurred_at": at(0), "org_id": "acme",
                   "product": "gamification", "quantity": 2, "expires_at": at(10 * 24 * 60)}),
        ),
    ];
    store
        .apply_batch(&grants, Policy::default(), t0)
        .await
        .expect("the grants commit");
    store
        .settle_due(Policy::default(), t0 + Duration::hours(1))
        .await
        .expect("the clock runs");

    let mut usage = Vec::new();
    for (n, (workspace, participant)) in [
        ("w-alpha", "p-1"),
        ("w-alpha", "p-2"),
        ("w-beta", "p-3"),
        ("w-beta", "p-4"),
    ]
    .into_iter()
    .enumerate()
    {
        usage.push(inbound(
            n as i64,
            InputKind::ParticipantAdded,
            json!({"event_id": format!("a-{participant}"), "occurred_at": at(120),
                   "org_id": "acme", "workspace_id": workspace, "participant_id": participant}),
        ));
    }
    for (n, workspace) in ["w-alpha", "w-gamma"].into_iter().enumerate() {
        usage.push(inbound(
            n as i64,
            InputKind::ModuleEnabled,
            json!({"event_id": format!("m-{workspace}"), "occurred_at": at(120),
                   "org_id": "acme", "workspace_id": workspace, "module": "gamification"}),
        ));
    }
    store
        .apply_batch(&usage, Policy::default(), t0 + Duration::hours(2))
        .await
        .expect("the usage commits");

    let transfer = inbound(
        0,
        InputKind::TransferRequested,
        json!({"event_id": "t-1", "occurred_at": at(180), "org_id": "acme",
               "workspace_id": "w-alpha", "product": "gamification", "quantity": 1,
               "requested_by": {"user_id": "u-alice", "role": "entitlement_manager"}}),
    );
    let report = store
        .apply_batch(&[transfer], Policy::default(), t0 + Duration::hours(3))
        .await
        .expect("the transfer commits");
    assert_eq!(
        report.ledger_entries.get("manual_transfer"),
        Some(&1),
        "the manual transfer is accepted: {report:?}"
    );
}

fn open(path: &Path) -> Xlsx<std::io::BufReader<std::fs::File>> {
    open_workbook(path).expect("calamine opens the workbook")
}

fn cell(range: &Range<Data>, row: u32, column: u32) -> Data {
    range
        .get_value((row, column))
        .cloned()
        .unwrap_or(Data::Empty)
}

fn text(range: &Range<Data>, row: u32, column: u32) -> String {
    match cell(range, row, column) {
        Data::String(text) => text,
        other => panic!("({row}, {column}) is not text: {other:?}"),
    }
}

/// A number cell holding an integer.
fn integer(range: &Range<Data>, row: u32, column: u32) -> i64 {
    match cell(range, row, column) {
        Data::Float(value) if value.fract() == 0.0 => value as i64,
        Data::Int(value) => value,
        other => panic!("({row}, {column}) is not an integer: {other:?}"),
    }
}

/// A cell holding an Excel datetime (a number with a date format), in UTC.
fn datetime(range: &Range<Data>, row: u32, column: u32) -> DateTime<Utc> {
    match cell(range, row, column) {
        Data::DateTime(value) => Utc.from_utc_datetime(
            &value
                .as_datetime()
                .unwrap_or_else(|| panic!("({row}, {column}) converts to a datetime")),
        ),
        other => panic!("({row}, {column}) is not a datetime: {other:?}"),
    }
}

/// Excel keeps milliseconds (calamine rounds to them); the database keeps microseconds.
fn assert_same_time(read: DateTime<Utc>, stored: DateTime<Utc>, what: &str) {
    let gap = (read - stored).abs();
    assert!(
        gap < Duration::milliseconds(1),
        "{what}: {read} in the workbook, {stored} in the database"
    );
}

fn assert_headers(range: &Range<Data>, row: u32, headers: &[&str]) {
    for (column, header) in (0u32..).zip(headers) {
        assert_eq!(
            &text(range, row, column),
            header,
            "header ({row}, {column})"
        );
    }
    assert_eq!(
        cell(range, row, headers.len() as u32),
        Data::Empty,
        "nothing right of the headers on row {row}"
    );
}

async fn ledger(pool: &PgPool, org_id: &str) -> Vec<LedgerRow> {
    sqlx::query_as(
        "SELECT sequence, recorded_at, kind, product, quantity, workspace_id,
                pool_available_after, caused_by, grant_id, actor, entry_id
           FROM ledger WHERE org_id = $1 ORDER BY sequence DESC",
    )
    .bind(org_id)
    .fetch_all(pool)
    .await
    .expect("the ledger reads")
}

/// A file of the xlsx package, as text.
fn package_file(path: &Path, name: &str) -> String {
    let mut archive =
        zip::ZipArchive::new(std::fs::File::open(path).expect("opens")).expect("a zip file");
    let mut text = String::new();
    archive
        .by_name(name)
        .unwrap_or_else(|error| panic!("{name} in the package: {error}"))
        .read_to_string(&mut text)
        .expect("UTF-8 XML");
    text
}

/// The value of `attribute` in the first tag of `xml`.
fn attribute(xml: &str, attribute: &str) -> Option<String> {
    let tag = &xml[..xml.find('>')?];
    let start = tag.find(&format!(" {attribute}=\""))? + attribute.len() + 3;
    let end = start + tag[start..].find('"')?;
    Some(tag[start..end].to_owned())
}

/// The elements `<name ...>` (or `<name>`) directly listed in `<list ...> ... </list>`.
fn elements<'a>(xml: &'a str, list: &str, name: &str) -> Vec<&'a str> {
    let start = xml
        .find(&format!("<{list}"))
        .unwrap_or_else(|| panic!("<{list}> in styles.xml"));
    let end = start + xml[start..].find(&format!("</{list}>")).expect("closed");
    let body = &xml[start..end];
    let mut found = Vec::new();
    let mut rest = &body[body.find('>').expect("tag") + 1..];
    while let Some(at) = rest.find(&format!("<{name}")) {
        let after = &rest[at + name.len() + 1..];
        if after.starts_with(' ') || after.starts_with('>') || after.starts_with('/') {
            found.push(&rest[at..]);
        }
        rest = after;
    }
    found
}

/// What a cell style looks like: fill colour, font colour, number format.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Style {
    fill: Option<String>,
    font: Option<String>,
    number_format: Option<String>,
}

fn styles(path: &Path) -> Vec<Style> {
    let xml = package_file(path, "xl/styles.xml");
    let fills: Vec<Option<String>> = elements(&xml, "fills", "fill")
        .into_iter()
        .map(|fill| {
            let fill = &fill[..fill.find("</fill>").unwrap_or(fill.len())];
            fill.find("<fgColor")
                .and_then(|at| attribute(&fill[at..], "rgb"))
        })
        .collect();
    let fonts: Vec<Option<String>> = elements(&xml, "fonts", "font")
        .into_iter()
        .map(|font| {
            let font = &font[..font.find("</font>").unwrap_or(font.len())];
            font.find("<color")
                .and_then(|at| attribute(&font[at..], "rgb"))
        })
        .collect();
    let number_formats: Vec<(String, String)> = if xml.contains("<numFmts") {
        elements(&xml, "numFmts", "numFmt")
            .into_iter()
            .map(|format| {
                (
                    attribute(format, "numFmtId").expect("an id"),
                    attribute(format, "formatCode")
                        .expect("a code")
                        .replace("&quot;", "\""),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    elements(&xml, "cellXfs", "xf")
        .into_iter()
        .map(|xf| {
            let index = |name: &str| -> usize {
                attribute(xf, name).map_or(0, |value| value.parse().expect("an index"))
            };
            let number_format = attribute(xf, "numFmtId").and_then(|id| {
                number_formats
                    .iter()
                    .find(|(known, _)| *known == id)
                    .map(|(_, code)| code.clone())
            });
            Style {
                fill: fills[index("fillId")].clone(),
                font: fonts[index("fontId")].clone(),
                number_format,
            }
        })
        .collect()
}

/// The style index of every cell of a worksheet's XML, by (row, column), zero-based.
fn cell_styles(sheet_xml: &str) -> std::collections::HashMap<(u32, u32), usize> {
    let mut found = std::collections::HashMap::new();
    let mut rest = sheet_xml;
    while let Some(at) = rest.find("<c ") {
        rest = &rest[at..];
        let reference = attribute(rest, "r").expect("a cell reference");
        let style = attribute(rest, "s").map_or(0, |value| value.parse().expect("an index"));
        let letters: String = reference
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect();
        let column = letters.chars().fold(0u32, |sum, letter| {
            sum * 26 + (letter as u32 - 'A' as u32 + 1)
        }) - 1;
        let row: u32 = reference[letters.len()..].parse().expect("a row number");
        found.insert((row - 1, column), style);
        rest = &rest[3..];
    }
    found
}

fn assert_frozen_header_and_filter(sheet_xml: &str, filter: &str, name: &str) {
    let pane = &sheet_xml[sheet_xml
        .find("<pane ")
        .unwrap_or_else(|| panic!("{name} has a frozen pane"))..];
    assert_eq!(attribute(pane, "ySplit").as_deref(), Some("1"), "{name}");
    assert_eq!(
        attribute(pane, "state").as_deref(),
        Some("frozen"),
        "{name}"
    );
    assert!(
        sheet_xml.contains(&format!("<autoFilter ref=\"{filter}\"/>")),
        "{name} has the autofilter {filter}"
    );
    assert!(sheet_xml.contains("<cols>"), "{name} sets column widths");
}

fn entries_in_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("the directory reads")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[tokio::test]
async fn the_workbook_holds_the_pools_the_workspaces_and_every_transaction() {
    let (store, pool) = database().await;
    let t0 = Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap() + Duration::microseconds(123_456);
    tell_the_story(&store, t0).await;
    let now = t0 + Duration::hours(4) + Duration::milliseconds(250);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("acme.xlsx");

    let summary = export(&pool, "acme", &path, now, false)
        .await
        .expect("the export succeeds");
    let stored = ledger(&pool, "acme").await;
    assert_eq!(
        summary,
        ExportSummary {
            pools: 2,
            workspace_rows: 4,
            ledger_entries: stored.len() as u64,
            truncated: false,
        }
    );
    assert_eq!(
        entries_in_dir(dir.path()),
        ["acme.xlsx"],
        "no temporary file is left"
    );
    let report = Report::load(&pool, "acme", now).await.expect("the report");

    let mut workbook = open(&path);
    assert_eq!(workbook.sheet_names(), SHEETS.map(str::to_owned));

    // Overview: the title rows, the pools, the totals.
    let overview = workbook.worksheet_range("Overview").expect("Overview");
    assert_eq!(text(&overview, 0, 0), "Entitlements");
    assert_eq!(text(&overview, 1, 0), "Organization");
    assert_eq!(text(&overview, 1, 1), "acme");
    assert_eq!(text(&overview, 2, 0), "Generated at (UTC)");
    assert_same_time(datetime(&overview, 2, 1), now, "generated at");
    assert_eq!(text(&overview, 3, 0), "Workspace rows");
    assert_eq!(integer(&overview, 3, 1), 4);
    assert_eq!(text(&overview, 4, 0), "Ledger entries");
    assert_eq!(integer(&overview, 4, 1), stored.len() as i64);
    let header = OVERVIEW_POOLS_HEADER_ROW;
    assert_eq!(text(&overview, header - 1, 0), "Pools");
    assert_headers(&overview, header, &POOL_HEADERS);
    // product, granted, transferred, expired, revoked, available, expiring within 30 days,
    // pending
    let expected_pools: [(&str, [i64; 7]); 2] = [
        ("seat", [4, 3, 1, 0, 0, 0, 2]),
        ("gamification", [2, 1, 0, 0, 1, 1, 0]),
    ];
    for (row, (product, values)) in (header + 1..).zip(expected_pools) {
        assert_eq!(text(&overview, row, 0), product);
        let read: Vec<i64> = (1..=7)
            .map(|column| integer(&overview, row, column))
            .collect();
        assert_eq!(read, values, "the {product} pool");
    }
    for (row, line) in (header + 1..).zip(&report.pools) {
        assert_eq!(text(&overview, row, 0), line.product);
        let read: Vec<i64> = (1..=7)
            .map(|column| integer(&overview, row, column))
            .collect();
        let expected = [
            line.granted,
            line.transferred,
            line.expired,
            line.revoked,
            line.available,
            line.expiring_soon,
            line.pending,
        ];
        assert_eq!(
            read, expected,
            "the {} pool as `report` reads it",
            line.product
        );
    }
    // Where the units came from: as `report` reads it, adding up to each pool's grants.
    let sources_header = header + 1 + 2 + 2;
    assert_eq!(
        text(&overview, sources_header - 1, 0),
        "Where the units came from"
    );
    assert_headers(&overview, sources_header, &SOURCE_HEADERS);
    assert!(!report.sources.is_empty());
    for (row, line) in (sources_header + 1..).zip(&report.sources) {
        assert_eq!(text(&overview, row, 0), line.product);
        assert_eq!(text(&overview, row, 1), line.source);
        let read: Vec<i64> = (2..=7)
            .map(|column| integer(&overview, row, column))
            .collect();
        let expected = [
            line.granted,
            line.used,
            line.revoked,
            line.expired,
            line.available,
            line.pending,
        ];
        assert_eq!(read, expected, "{line:?}");
    }
    for pool in &report.pools {
        let granted: i64 = report
            .sources
            .iter()
            .filter(|line| line.product == pool.product)
            .map(|line| line.granted)
            .sum();
        assert_eq!(granted, pool.granted, "the {} pool's sources", pool.product);
    }
    let totals_header = sources_header + 1 + report.sources.len() as u32 + 2;
    assert_eq!(text(&overview, totals_header - 1, 0), "Totals by product");
    assert_headers(&overview, totals_header, &TOTAL_HEADERS);
    let expected_totals: [(&str, [i64; 4]); 2] =
        [("seat", [4, 3, 1, 1]), ("gamification", [2, 1, 1, 1])];
    for (row, (product, values)) in (totals_header + 1..).zip(expected_totals) {
        assert_eq!(text(&overview, row, 0), product);
        let read: Vec<i64> = (1..=4)
            .map(|column| integer(&overview, row, column))
            .collect();
        assert_eq!(read, values, "the {product} totals");
    }
    for (row, total) in (totals_header + 1..).zip(&report.totals) {
        assert_eq!(text(&overview, row, 0), total.product);
        let read: Vec<i64> = (1..=4)
            .map(|column| integer(&overview, row, column))
            .collect();
        let expected = [
            total.required,
            total.allocated,
            total.missing,
            total.workspaces_missing,
        ];
        assert_eq!(
            read, expected,
            "the {} totals as `report` adds them",
            total.product
        );
    }
    assert_eq!(overview.end(), Some((totals_header + 2, 7)), "nothing more");

    // Workspaces: missing first, one row per (workspace, product).
    let workspaces = workbook.worksheet_range("Workspaces").expect("Workspaces");
    assert_headers(&workspaces, 0, &WORKSPACE_HEADERS);
    let expected_workspaces = [
        ("w-beta", "seat", 2, 1, 1, true),
        ("w-gamma", "gamification", 1, 0, 1, true),
        ("w-alpha", "seat", 2, 2, 0, false),
        ("w-alpha", "gamification", 1, 1, 0, false),
    ];
    assert_eq!(workspaces.height(), 1 + expected_workspaces.len());
    for (row, expected) in (1u32..).zip(expected_workspaces) {
        let (workspace, product, required, allocated, missing, since) = expected;
        assert_eq!(text(&workspaces, row, 0), workspace, "row {row}");
        assert_eq!(text(&workspaces, row, 1), product, "row {row}");
        assert_eq!(integer(&workspaces, row, 2), required, "row {row}");
        assert_eq!(integer(&workspaces, row, 3), allocated, "row {row}");
        assert_eq!(integer(&workspaces, row, 4), missing, "row {row}");
        // No workspace-updated: each is live and has no name (rule 13).
        assert_eq!(cell(&workspaces, row, 6), Data::Empty, "row {row}");
        assert_eq!(text(&workspaces, row, 7), "live", "row {row}");
        if since {
            assert_same_time(
                datetime(&workspaces, row, 5),
                t0 + Duration::hours(2),
                "missing since",
            );
        } else {
            assert_eq!(cell(&workspaces, row, 5), Data::Empty, "row {row}");
        }
    }
    for (row, line) in (1u32..).zip(&report.workspaces) {
        assert_eq!(text(&workspaces, row, 0), line.workspace_id);
        assert_eq!(text(&workspaces, row, 1), line.product);
        assert_eq!(integer(&workspaces, row, 4), line.missing);
        match line.missing_since {
            Some(since) => assert_same_time(datetime(&workspaces, row, 5), since, "since"),
            None => assert_eq!(cell(&workspaces, row, 5), Data::Empty),
        }
    }

    // Transactions: every ledger entry, newest first, equal to the database's.
    let transactions = workbook
        .worksheet_range("Transactions")
        .expect("Transactions");
    assert_headers(&transactions, 0, &TRANSACTION_HEADERS);
    assert_eq!(transactions.height(), 1 + stored.len());
    // 3 grants (the pending one has no entry yet), 1 expiry, 3 seat transfers, 1 manual.
    assert_eq!(stored.len(), 8, "the story wrote its entries: {stored:?}");
    for (row, entry) in (1u32..).zip(&stored) {
        assert_eq!(integer(&transactions, row, 0), entry.sequence, "row {row}");
        assert_same_time(
            datetime(&transactions, row, 1),
            entry.recorded_at,
            "recorded at",
        );
        assert_eq!(text(&transactions, row, 2), entry.kind, "row {row}");
        assert_eq!(text(&transactions, row, 3), entry.product, "row {row}");
        assert_eq!(integer(&transactions, row, 4), entry.quantity, "row {row}");
        match &entry.workspace_id {
            Some(workspace) => assert_eq!(&text(&transactions, row, 5), workspace),
            None => assert_eq!(cell(&transactions, row, 5), Data::Empty, "row {row}"),
        }
        assert_eq!(
            integer(&transactions, row, 6),
            entry.pool_available_after,
            "row {row}"
        );
        assert_eq!(text(&transactions, row, 7), entry.caused_by, "row {row}");
        match &entry.grant_id {
            Some(grant) => assert_eq!(&text(&transactions, row, 8), grant),
            None => assert_eq!(cell(&transactions, row, 8), Data::Empty, "row {row}"),
        }
        match &entry.actor {
            Some(actor) => assert_eq!(&text(&transactions, row, 9), actor),
            None => assert_eq!(cell(&transactions, row, 9), Data::Empty, "row {row}"),
        }
        assert_eq!(
            text(&transactions, row, 10),
            entry.entry_id.to_string(),
            "row {row}"
        );
    }
    let kinds: Vec<&str> = stored.iter().map(|entry| entry.kind.as_str()).collect();
    for kind in ["grant", "transfer", "expiry", "manual_transfer"] {
        assert!(kinds.contains(&kind), "a {kind} entry in {kinds:?}");
    }
    assert_eq!(
        stored[0].kind, "manual_transfer",
        "the newest entry is first"
    );
    assert_eq!(stored[0].actor.as_deref(), Some("u-alice"));

    // The styles, frozen header rows and autofilters, in the package's XML (calamine
    // reads values, not formats).
    let styles = styles(&path);
    let red = |style: &Style| {
        style.fill.as_deref() == Some(RED_FILL) && style.font.as_deref() == Some(RED_TEXT)
    };
    let sheet_xml = package_file(&path, "xl/worksheets/sheet2.xml");
    assert_frozen_header_and_filter(&sheet_xml, "A1:H5", "Workspaces");
    let cells = cell_styles(&sheet_xml);
    for (row, (.., missing)) in (1u32..).zip(expected_workspaces) {
        for column in 0..8 {
            let style = cells
                .get(&(row, column))
                .map(|index| styles[*index].clone());
            if missing {
                let style = style.unwrap_or_else(|| panic!("({row}, {column}) is written"));
                assert!(red(&style), "({row}, {column}) is red: {style:?}");
            } else if let Some(style) = style {
                assert!(!red(&style), "({row}, {column}) is not red: {style:?}");
            }
        }
        for column in 2..5 {
            assert_eq!(
                styles[cells[&(row, column)]].number_format.as_deref(),
                Some("#,##0"),
                "({row}, {column}) is an integer"
            );
        }
    }
    assert_eq!(
        styles[cells[&(1, 5)]].number_format.as_deref(),
        Some("yyyy-mm-dd hh:mm:ss")
    );
    let sheet_xml = package_file(&path, "xl/worksheets/sheet3.xml");
    assert_frozen_header_and_filter(
        &sheet_xml,
        &format!("A1:K{}", stored.len() + 1),
        "Transactions",
    );
    let cells = cell_styles(&sheet_xml);
    assert_eq!(
        styles[cells[&(1, 1)]].number_format.as_deref(),
        Some("yyyy-mm-dd hh:mm:ss")
    );
    assert_eq!(
        styles[cells[&(1, 0)]].number_format.as_deref(),
        Some("#,##0")
    );
    let sheet_xml = package_file(&path, "xl/worksheets/sheet1.xml");
    let cells = cell_styles(&sheet_xml);
    let seat_totals = styles[cells[&(totals_header + 1, 0)]].clone();
    assert!(
        red(&seat_totals),
        "a product missing units is red on the Overview"
    );
}

/// Rule 14: once the catalogue names gamification, every sheet shows it by its name with
/// its handle; seats, never defined, keep their handle alone.
#[tokio::test]
async fn products_appear_by_their_catalogue_names_with_their_handles() {
    let (store, pool) = database().await;
    let t0 = Utc::now() - Duration::hours(4);
    tell_the_story(&store, t0).await;
    let definition = inbound(
        0,
        InputKind::ProductDefined,
        json!({"event_id": "d-1", "occurred_at": rfc3339(t0), "product": "gamification",
               "name": "Engagement games", "assignment": "manual"}),
    );
    store
        .apply_batch(&[definition], Policy::default(), t0 + Duration::hours(3))
        .await
        .expect("the definition commits");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("acme.xlsx");
    export(&pool, "acme", &path, Utc::now(), false)
        .await
        .expect("the export succeeds");

    let games = "Engagement games (gamification)";
    let mut workbook = open(&path);
    let overview = workbook.worksheet_range("Overview").expect("Overview");
    let header = OVERVIEW_POOLS_HEADER_ROW;
    let pools: Vec<String> = (1..=2).map(|n| text(&overview, header + n, 0)).collect();
    assert_eq!(pools, ["seat", games]);
    // The sources table's lines, up to the blank row before the totals.
    let sources_header = header + 1 + 2 + 2;
    let mut sources: Vec<String> = (sources_header + 1..)
        .map(|row| cell(&overview, row, 0))
        .take_while(|value| *value != Data::Empty)
        .map(|value| value.to_string())
        .collect();
    sources.dedup();
    assert_eq!(sources, ["seat", games]);
    let totals_header = (sources_header..sources_header + 100)
        .find(|row| cell(&overview, *row, 0) == Data::String("Totals by product".into()))
        .unwrap()
        + 1;
    let totals: Vec<String> = (1..=2)
        .map(|n| text(&overview, totals_header + n, 0))
        .collect();
    assert_eq!(totals, ["seat", games]);
    let workspaces = workbook.worksheet_range("Workspaces").expect("Workspaces");
    let products: Vec<String> = (1..=4).map(|row| text(&workspaces, row, 1)).collect();
    assert_eq!(products, ["seat", games, "seat", games]);
    let transactions = workbook
        .worksheet_range("Transactions")
        .expect("Transactions");
    let stored = ledger(&pool, "acme").await;
    for (row, entry) in (1u32..).zip(&stored) {
        let expected = if entry.product == "gamification" {
            games
        } else {
            "seat"
        };
        assert_eq!(text(&transactions, row, 3), expected, "row {row}");
    }
}

/// An unlimited grant has a line of its own among the sources: "Unlimited" where counted
/// units would be, what it gave as used, and "Ended" once it is over; its pool shows
/// "Unlimited" as available while it is valid.
#[tokio::test]
async fn unlimited_grants_appear_as_unlimited_then_ended() {
    let (store, pool) = database().await;
    let t0 = Utc::now() - Duration::hours(4);
    let mut batch = vec![inbound(
        0,
        InputKind::EntitlementGranted,
        json!({"event_id": "g-top", "occurred_at": rfc3339(t0), "org_id": "acme",
               "product": "seat", "unlimited": true,
               "source": {"kind": "plan", "reference": "enterprise"}}),
    )];
    for n in 0..3 {
        batch.push(inbound(
            1 + n,
            InputKind::ParticipantAdded,
            json!({"event_id": format!("a-{n}"), "occurred_at": rfc3339(t0), "org_id": "acme",
                   "workspace_id": "summit", "participant_id": format!("p{n}")}),
        ));
    }
    store
        .apply_batch(&batch, Policy::default(), t0)
        .await
        .expect("the batch commits");
    let sources_line = |path: &Path| {
        let mut workbook = open(path);
        let overview = workbook.worksheet_range("Overview").expect("Overview");
        let pool_row = OVERVIEW_POOLS_HEADER_ROW + 1;
        let available = cell(&overview, pool_row, 5);
        // One pool line, a blank row, the sources' title and headers, then its line.
        let title = OVERVIEW_POOLS_HEADER_ROW + 1 + 2;
        assert_eq!(
            cell(&overview, title, 0),
            Data::String("Where the units came from".into())
        );
        let row = title + 2;
        let line: Vec<Data> = (0..8).map(|column| cell(&overview, row, column)).collect();
        (available, line)
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("acme.xlsx");
    export(&pool, "acme", &path, Utc::now(), false)
        .await
        .expect("the export succeeds");
    let text = |value: &str| Data::String(value.into());
    let (available, line) = sources_line(&path);
    assert_eq!(available, text("Unlimited"));
    assert_eq!(
        line,
        [
            text("seat"),
            text("plan"),
            text("Unlimited"),
            Data::Float(3.0),
            text("-"),
            text("-"),
            text("Unlimited"),
            Data::Float(0.0),
        ]
    );

    let revoke = inbound(
        4,
        InputKind::EntitlementRevoked,
        json!({"event_id": "r-top", "occurred_at": rfc3339(t0), "org_id": "acme",
               "grant_id": "g-top"}),
    );
    store
        .apply_batch(&[revoke], Policy::default(), t0)
        .await
        .expect("the revocation commits");
    export(&pool, "acme", &path, Utc::now(), false)
        .await
        .expect("the export succeeds");
    let (available, line) = sources_line(&path);
    assert_eq!(available, Data::Float(0.0), "counted units only, now none");
    assert_eq!(line[6], text("Ended"));
    assert_eq!(
        line[3],
        Data::Float(3.0),
        "what it gave stays counted as used"
    );
}

#[tokio::test]
async fn an_unknown_organization_fails_plainly_and_leaves_no_file() {
    let (store, pool) = database().await;
    tell_the_story(&store, Utc::now() - Duration::hours(4)).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("nobody.xlsx");

    let error = export(&pool, "nobody", &path, Utc::now(), false)
        .await
        .expect_err("an unknown organization is refused");
    assert_eq!(
        error.to_string(),
        "no organization \"nobody\" is known to the worker"
    );
    assert!(
        entries_in_dir(dir.path()).is_empty(),
        "no file, not even a temporary one"
    );

    let missing = dir.path().join("no-such-directory").join("acme.xlsx");
    let error = export(&pool, "acme", &missing, Utc::now(), false)
        .await
        .expect_err("a missing directory is refused");
    assert!(
        format!("{error:#}").contains("could not write in"),
        "{error:#}"
    );
}

/// The process's resident memory and its peak since the last reset, in KiB (Linux).
fn memory_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// An organization of `workspaces` workspaces (every tenth missing a seat) and `entries`
/// ledger entries (one grant, then one-seat transfers), inserted with SQL.
async fn insert_large_organization(pool: &PgPool, org_id: &str, workspaces: i64, entries: i64) {
    let transfers = entries - 1;
    let granted = transfers + 500;
    let statements = [
        "INSERT INTO organizations (org_id, last_sequence) VALUES ($1, $3)",
        "INSERT INTO pools (org_id, product, available, granted_total, transferred_total,
                            expired_total)
         VALUES ($1, 'seat', $4 - ($3 - 1), $4, $3 - 1, 0)",
        "INSERT INTO workspaces (workspace_id, org_id)
         SELECT $1 || '-ws-' || lpad(n::text, 6, '0'), $1 FROM generate_series(1, $2) n",
        "INSERT INTO ledger_blocks (org_id, first_sequence, last_sequence, entry_ids, products,
                                    kinds, quantities, workspace_ids, pool_available_after,
                                    caused_by, grant_ids, actors, unlimited, recorded_at)
         SELECT $1, 1, 1, ARRAY[md5($1 || '/1')::uuid], '{seat}', '{grant}', ARRAY[$4::bigint],
                '{NULL}', ARRAY[$4::bigint], '{g-big}', '{NULL}', '{NULL}', '{false}',
                ARRAY[timestamptz '2026-01-01 00:00:00+00']",
        // The transfers in blocks of 1,000 entries, as batches would have written them.
        "INSERT INTO ledger_blocks (org_id, first_sequence, last_sequence, entry_ids, products,
                                    kinds, quantities, workspace_ids, pool_available_after,
                                    caused_by, grant_ids, actors, unlimited, recorded_at)
         SELECT $1, f, l, array_agg(md5($1 || '/' || s)::uuid ORDER BY s),
                array_agg('seat'::text ORDER BY s), array_agg('transfer'::text ORDER BY s),
                array_agg(1::bigint ORDER BY s),
                array_agg($1 || '-ws-' || lpad((1 + (s - 2) % $2)::text, 6, '0') ORDER BY s),
                array_agg($4 - (s - 1) ORDER BY s), array_agg('a-' || s ORDER BY s),
                array_agg(NULL::text ORDER BY s), array_agg(NULL::text ORDER BY s),
                array_agg(false ORDER BY s),
                array_agg(timestamptz '2026-01-01 00:00:00+00' + s * interval '1 second'
                          ORDER BY s)
           FROM generate_series(2, $3, 1000) f
          CROSS JOIN LATERAL (SELECT least(f + 999, $3) AS l) last
          CROSS JOIN LATERAL generate_series(f, l) s
          GROUP BY f, l
          ORDER BY f",
        "INSERT INTO consumption (workspace_id, product, org_id, required, allocated,
                                  shortfall_since)
         SELECT w.workspace_id, 'seat', $1,
                count(l.sequence) + CASE WHEN n % 10 = 0 THEN 1 ELSE 0 END, count(l.sequence),
                CASE WHEN n % 10 = 0 THEN timestamptz '2026-02-01 00:00:00+00' END
           FROM (SELECT $1 || '-ws-' || lpad(n::text, 6, '0') AS workspace_id, n
                   FROM generate_series(1, $2) n) w
           LEFT JOIN ledger l ON l.org_id = $1 AND l.workspace_id = w.workspace_id
          GROUP BY w.workspace_id, n",
    ];
    for statement in statements {
        sqlx::query(statement)
            .bind(org_id)
            .bind(workspaces)
            .bind(entries)
            .bind(granted)
            .execute(pool)
            .await
            .unwrap_or_else(|error| panic!("{statement}: {error}"));
    }
}

#[tokio::test]
async fn a_large_organization_exports_in_bounded_memory() {
    let (_store, pool) = database().await;
    let (workspaces, entries) = (20_000_i64, 100_000_i64);
    let started = Instant::now();
    insert_large_organization(&pool, "big", workspaces, entries).await;
    println!(
        "inserted {workspaces} workspaces and {entries} ledger entries in {:.1?}",
        started.elapsed()
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("big.xlsx");

    // Reset the peak resident set (Linux: "5" to clear_refs), so VmHWM is this export's.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = memory_kib();
    let started = Instant::now();
    let summary = export(&pool, "big", &path, Utc::now(), false)
        .await
        .expect("the large export succeeds");
    let seconds = started.elapsed().as_secs_f64();
    let after = memory_kib();
    let size = std::fs::metadata(&path).expect("the file exists").len();
    if let (Some((rss_before, _)), Some((rss_after, peak)), true) = (before, after, reset) {
        println!(
            "exported {} workspace rows and {} ledger entries in {seconds:.1} s, {} KiB on \
             disk; resident {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB \
             (+{} KiB during the export; other tests of this binary may run meanwhile)",
            summary.workspace_rows,
            summary.ledger_entries,
            size / 1024,
            peak.saturating_sub(rss_before)
        );
        // A loose bound, far from a timing: kept in memory, these 1.2 million cells would
        // take some 200 MiB (rust_xlsxwriter's own figures); streamed, a few MiB.
        assert!(
            peak.saturating_sub(rss_before) < 100 * 1024,
            "the export's memory grew by {} KiB",
            peak.saturating_sub(rss_before)
        );
    } else {
        println!(
            "exported in {seconds:.1} s, {} KiB on disk; memory not measured",
            size / 1024
        );
    }
    assert_eq!(
        summary,
        ExportSummary {
            pools: 1,
            workspace_rows: workspaces as u64,
            ledger_entries: entries as u64,
            truncated: false,
        }
    );

    let mut workbook = open(&path);
    let sheet_rows = workbook.worksheet_range("Workspaces").expect("Workspaces");
    assert_eq!(sheet_rows.height(), 1 + workspaces as usize);
    assert_eq!(integer(&sheet_rows, 1, 4), 1, "the missing rows come first");
    assert_eq!(text(&sheet_rows, 1, 0), "big-ws-000010");
    let missing = workspaces as u32 / 10;
    assert_eq!(integer(&sheet_rows, missing, 4), 1);
    assert_eq!(integer(&sheet_rows, missing + 1, 4), 0);
    drop(sheet_rows);
    let transactions = workbook
        .worksheet_range("Transactions")
        .expect("Transactions");
    assert_eq!(transactions.height(), 1 + entries as usize);
    assert_eq!(integer(&transactions, 1, 0), entries, "newest first");
    assert_eq!(
        integer(&transactions, entries as u32, 0),
        1,
        "the grant last"
    );
    assert_eq!(text(&transactions, entries as u32, 2), "grant");
}

/// More ledger entries than an Excel sheet holds: the newest that fit, and a note. Slow
/// (over a million rows, written then read back): `cargo test --test export -- --ignored`.
#[tokio::test]
#[ignore = "slow: over a million ledger entries"]
async fn more_entries_than_a_sheet_holds_are_cut_with_a_note() {
    let (_store, pool) = database().await;
    let entries = DATA_ROWS_MAX as i64 + 25;
    let started = Instant::now();
    insert_large_organization(&pool, "huge", 1_000, entries).await;
    println!(
        "inserted {entries} ledger entries in {:.1?}",
        started.elapsed()
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("huge.xlsx");

    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = memory_kib();
    let started = Instant::now();
    let summary = export(&pool, "huge", &path, Utc::now(), false)
        .await
        .expect("the export succeeds, cut");
    let seconds = started.elapsed().as_secs_f64();
    if let (Some((rss_before, _)), Some((_, peak)), true) = (before, memory_kib(), reset) {
        println!(
            "exported {} ledger entries in {seconds:.1} s, {} KiB on disk, peak resident \
             +{} KiB",
            summary.ledger_entries,
            std::fs::metadata(&path).expect("exists").len() / 1024,
            peak.saturating_sub(rss_before)
        );
    }
    assert_eq!(
        summary,
        ExportSummary {
            pools: 1,
            workspace_rows: 1_000,
            ledger_entries: DATA_ROWS_MAX,
            truncated: true,
        }
    );

    // Read back row by row: the whole sheet in calamine's memory would be gigabytes.
    let mut workbook = open(&path);
    let mut reader = workbook
        .worksheet_cells_reader("Transactions")
        .expect("Transactions");
    let (mut rows, mut last_sequence, mut note) = (0u32, None, None);
    while let Some(cell) = reader.next_cell().expect("a cell") {
        let (row, column) = cell.get_position();
        rows = rows.max(row + 1);
        if row == 0 && column == TRANSACTION_HEADERS.len() as u32 + 1 {
            note = cell.get_value().as_string();
        }
        if column == 0 && row > 0 {
            last_sequence = cell.get_value().as_i64();
        }
    }
    assert_eq!(u64::from(rows), DATA_ROWS_MAX + 1, "every row of the sheet");
    assert_eq!(
        last_sequence,
        Some(26),
        "the 25 oldest entries are left out"
    );
    let note = note.expect("a note next to the header");
    assert!(note.contains("25 oldest"), "{note}");
    drop(reader);
    let overview = workbook.worksheet_range("Overview").expect("Overview");
    let notes: Vec<String> = overview
        .rows()
        .filter_map(|row| row.first()?.get_string().map(str::to_owned))
        .filter(|text| text.contains("left out"))
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].starts_with("25 of the"), "{notes:?}");
}
