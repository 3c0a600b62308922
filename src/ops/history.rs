//! `entitlement-worker history`: an organization's ledger entries, newest first, paged.

use chrono::{DateTime, Utc};
use futures::stream::{BoxStream, StreamExt as _};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::cell;

/// One ledger entry, as the history and the export show it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct LedgerRow {
    pub sequence: i64,
    pub recorded_at: DateTime<Utc>,
    pub kind: String,
    pub product: String,
    pub quantity: i64,
    pub workspace_id: Option<String>,
    pub pool_available_after: i64,
    pub caused_by: String,
    /// The grant whose units moved, for grant, expiry and revocation entries.
    pub grant_id: Option<String>,
    pub actor: Option<String>,
    pub entry_id: Uuid,
}

/// Which entries to show.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub org_id: String,
    pub workspace_id: Option<String>,
    pub product: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Only entries with a smaller sequence: the next page after one that ended there.
    pub before_sequence: Option<i64>,
    pub limit: i64,
}

/// Newest first: the organization's blocks by their primary key backwards, each block's
/// entries last first, so a page reads only the blocks it shows (and those it skips by the
/// filters).
const SELECT_ENTRIES: &str = "SELECT b.first_sequence + e.n - 1 AS sequence, e.recorded_at,
        e.kind, e.product, e.quantity, e.workspace_id, e.pool_available_after, e.caused_by,
        e.grant_id, e.actor, e.entry_id
   FROM ledger_blocks b
  CROSS JOIN LATERAL unnest(b.entry_ids, b.products, b.kinds, b.quantities, b.workspace_ids,
                            b.pool_available_after, b.caused_by, b.grant_ids, b.actors,
                            b.recorded_at)
        WITH ORDINALITY AS e (entry_id, product, kind, quantity, workspace_id,
                              pool_available_after, caused_by, grant_id, actor, recorded_at, n)
  WHERE b.org_id = $1
    AND ($2::text IS NULL OR e.workspace_id = $2)
    AND ($3::text IS NULL OR e.product = $3)
    AND ($4::timestamptz IS NULL OR e.recorded_at >= $4)
    AND ($5::bigint IS NULL OR (b.first_sequence < $5 AND b.first_sequence + e.n - 1 < $5))
  ORDER BY b.first_sequence DESC, e.n DESC
  LIMIT $6";

/// One page of entries, newest first.
pub async fn page(pool: &PgPool, query: &HistoryQuery) -> Result<Vec<LedgerRow>, sqlx::Error> {
    sqlx::query_as(SELECT_ENTRIES)
        .bind(&query.org_id)
        .bind(&query.workspace_id)
        .bind(&query.product)
        .bind(query.since)
        .bind(query.before_sequence)
        .bind(query.limit)
        .fetch_all(pool)
        .await
}

/// The newest `limit` entries of the organization, newest first, streamed (for the
/// export).
pub fn newest_entries<'a>(
    connection: &'a mut PgConnection,
    org_id: &'a str,
    limit: u64,
) -> BoxStream<'a, Result<LedgerRow, sqlx::Error>> {
    sqlx::query_as(SELECT_ENTRIES)
        .bind(org_id)
        .bind(None::<String>)
        .bind(None::<String>)
        .bind(None::<DateTime<Utc>>)
        .bind(None::<i64>)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch(connection)
        .boxed()
}

/// A page as a table, with the option that shows the next page when there may be one.
pub fn to_table(rows: &[LedgerRow], query: &HistoryQuery) -> String {
    let mut out = format!(
        "{:>6}  {}  {}  {} {:>8}  {}  {:>10}  {}\n",
        "seq",
        cell("recorded at (UTC)", 19),
        cell("kind", 15),
        cell("product", 14),
        "quantity",
        cell("workspace / grant", 20),
        "pool after",
        "caused by / actor"
    );
    for row in rows {
        let cause = match &row.actor {
            Some(actor) => format!("{} by {actor}", row.caused_by),
            None => row.caused_by.clone(),
        };
        out.push_str(&format!(
            "{:>6}  {}  {}  {} {:>8}  {}  {:>10}  {}\n",
            row.sequence,
            row.recorded_at.format("%Y-%m-%d %H:%M:%S"),
            cell(&row.kind, 15),
            cell(&row.product, 14),
            row.quantity,
            cell(
                row.workspace_id
                    .as_deref()
                    .or(row.grant_id.as_deref())
                    .unwrap_or("-"),
                20
            ),
            row.pool_available_after,
            cause
        ));
    }
    if rows.is_empty() {
        out.push_str("(no entries)\n");
    } else if rows.len() as i64 == query.limit {
        let last = rows.last().map_or(0, |row| row.sequence);
        out.push_str(&format!("-- more: add --before {last}\n"));
    }
    out
}
