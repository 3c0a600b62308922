//! Writing back what a batch changed: one statement per table, rows passed as arrays.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::StoreError;
use crate::codec::entry_id;
use crate::domain::{
    Assignment, Book, Consumption, LedgerEntry, ParticipantId, ParticipantRecord, Product,
    RevocationTarget, WarningNumbers, WorkspaceId,
};

pub(super) async fn write_book(
    connection: &mut PgConnection,
    book: &Book,
) -> Result<(), StoreError> {
    claim_workspaces(connection, book).await?;
    write_lives(connection, book).await?;
    write_organizations(connection, book).await?;
    write_pools(connection, book).await?;
    write_lots(connection, book).await?;
    write_warnings(connection, book).await?;
    write_revocations(connection, book).await?;
    write_catalogue(connection, book).await?;
    write_consumption(connection, book).await?;
    write_participants(connection, book).await?;
    write_processed(connection, book).await?;
    write_ledger(connection, book).await?;
    Ok(())
}

/// Inserts the workspaces first claimed in this batch. If another worker claimed one of
/// them in the meantime the batch is applied again, now seeing that owner.
async fn claim_workspaces(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    if book.new_claims.is_empty() {
        return Ok(());
    }
    let mut claims: Vec<(&str, &str)> = book
        .new_claims
        .iter()
        .map(|(workspace_id, org_id)| (workspace_id.as_str(), org_id.as_str()))
        .collect();
    // Sorted, so two batches claiming overlapping workspaces wait in the same order.
    claims.sort_unstable();
    let (workspaces, orgs): (Vec<&str>, Vec<&str>) = claims.into_iter().unzip();
    let inserted: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO workspaces (workspace_id, org_id)
         SELECT workspace_id, org_id FROM UNNEST($1::text[], $2::text[]) AS c (workspace_id, org_id)
         ON CONFLICT DO NOTHING
         RETURNING workspace_id",
    )
    .bind(&workspaces)
    .bind(&orgs)
    .fetch_all(&mut *connection)
    .await?;
    if inserted.len() != workspaces.len() {
        let missing = workspaces
            .iter()
            .find(|workspace| !inserted.iter().any(|(done,)| done == *workspace))
            .map(|workspace| workspace.to_string())
            .unwrap_or_default();
        return Err(StoreError::ClaimRace(missing));
    }
    Ok(())
}

/// The lives the batch changed (rule 13), each on its workspace's row, claimed before. A
/// life new to the workspace goes where none is stored yet, a changed one where one is: any
/// other count means the tables changed behind the worker's back.
async fn write_lives(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let mut dirty: Vec<_> = book
        .workspaces
        .iter()
        .filter(|(_, life)| life.dirty)
        .collect();
    // In workspace order, so that two batches would wait on the rows in the same order.
    dirty.sort_by_key(|(workspace_id, _)| *workspace_id);
    let workspaces: Vec<&str> = dirty.iter().map(|(id, _)| id.as_str()).collect();
    let names: Vec<Option<&str>> = dirty.iter().map(|(_, l)| l.name.as_deref()).collect();
    let starts: Vec<Option<DateTime<Utc>>> = dirty.iter().map(|(_, l)| l.starts_at).collect();
    let ends: Vec<Option<DateTime<Utc>>> = dirty.iter().map(|(_, l)| l.ends_at).collect();
    let archived: Vec<bool> = dirty.iter().map(|(_, l)| l.archived).collect();
    let live: Vec<bool> = dirty.iter().map(|(_, l)| l.live).collect();
    let times: Vec<DateTime<Utc>> = dirty.iter().map(|(_, l)| l.last_event_at).collect();
    let events: Vec<&str> = dirty
        .iter()
        .map(|(_, l)| l.last_event_id.as_str())
        .collect();
    let new: Vec<bool> = dirty.iter().map(|(_, l)| l.is_new).collect();
    let statement = sqlx::query(UPDATE_LIVES)
        .bind(workspaces)
        .bind(names)
        .bind(starts)
        .bind(ends)
        .bind(archived)
        .bind(live)
        .bind(times)
        .bind(events)
        .bind(new);
    execute_for_each(connection, statement, "workspaces", dirty.len()).await
}

const UPDATE_LIVES: &str = "UPDATE workspaces w SET
         name = u.name, starts_at = u.starts_at, ends_at = u.ends_at, archived = u.archived,
         live = u.live, life_event_at = u.life_event_at, life_event_id = u.life_event_id
       FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::bool[],
                   $6::bool[], $7::timestamptz[], $8::text[], $9::bool[])
         AS u (workspace_id, name, starts_at, ends_at, archived, live, life_event_at,
               life_event_id, is_new)
      WHERE w.workspace_id = u.workspace_id AND (w.life_event_id IS NULL) = u.is_new";

async fn write_organizations(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let (orgs, sequences): (Vec<&str>, Vec<i64>) = book
        .organizations
        .iter()
        .filter(|(_, organization)| organization.dirty)
        .map(|(org_id, organization)| (org_id.as_str(), organization.last_sequence))
        .unzip();
    if orgs.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE organizations o SET last_sequence = u.last_sequence
           FROM UNNEST($1::text[], $2::bigint[]) AS u (org_id, last_sequence)
          WHERE o.org_id = u.org_id",
    )
    .bind(&orgs)
    .bind(&sequences)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

async fn write_pools(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let dirty: Vec<_> = book.pools.iter().filter(|(_, pool)| pool.dirty).collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let orgs: Vec<&str> = dirty.iter().map(|((org, _), _)| org.as_str()).collect();
    let products: Vec<&str> = dirty
        .iter()
        .map(|((_, product), _)| product.as_str())
        .collect();
    let available: Vec<i64> = dirty.iter().map(|(_, pool)| pool.available).collect();
    let granted: Vec<i64> = dirty.iter().map(|(_, pool)| pool.granted_total).collect();
    let transferred: Vec<i64> = dirty
        .iter()
        .map(|(_, pool)| pool.transferred_total)
        .collect();
    let expired: Vec<i64> = dirty.iter().map(|(_, pool)| pool.expired_total).collect();
    let revoked: Vec<i64> = dirty.iter().map(|(_, pool)| pool.revoked_total).collect();
    let unlimited: Vec<bool> = dirty.iter().map(|(_, pool)| pool.unlimited).collect();
    let versions: Vec<i64> = dirty.iter().map(|(_, pool)| pool.state_version).collect();
    let causes: Vec<Option<&str>> = dirty
        .iter()
        .map(|(_, pool)| pool.last_cause.as_ref().map(|cause| cause.as_str()))
        .collect();
    sqlx::query(
        "INSERT INTO pools (org_id, product, available, granted_total, transferred_total,
                            expired_total, revoked_total, unlimited, state_version, last_cause)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                              $6::bigint[], $7::bigint[], $8::boolean[], $9::bigint[], $10::text[])
         ON CONFLICT (org_id, product) DO UPDATE SET
             available = EXCLUDED.available,
             granted_total = EXCLUDED.granted_total,
             transferred_total = EXCLUDED.transferred_total,
             expired_total = EXCLUDED.expired_total,
             revoked_total = EXCLUDED.revoked_total,
             unlimited = EXCLUDED.unlimited,
             state_version = EXCLUDED.state_version,
             last_cause = COALESCE(EXCLUDED.last_cause, pools.last_cause)",
    )
    .bind(&orgs)
    .bind(&products)
    .bind(&available)
    .bind(&granted)
    .bind(&transferred)
    .bind(&expired)
    .bind(&revoked)
    .bind(&unlimited)
    .bind(&versions)
    .bind(&causes)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

async fn write_lots(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let dirty: Vec<_> = book
        .lots
        .values()
        .flatten()
        .filter(|lot| lot.dirty)
        .collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = dirty.iter().map(|lot| lot.lot_id.as_str()).collect();
    let orgs: Vec<&str> = dirty.iter().map(|lot| lot.org_id.as_str()).collect();
    let products: Vec<&str> = dirty.iter().map(|lot| lot.product.as_str()).collect();
    let quantities: Vec<i64> = dirty.iter().map(|lot| lot.quantity).collect();
    let remaining: Vec<i64> = dirty.iter().map(|lot| lot.remaining).collect();
    let revoked: Vec<i64> = dirty.iter().map(|lot| lot.revoked).collect();
    let drawn: Vec<i64> = dirty.iter().map(|lot| lot.drawn).collect();
    let expired: Vec<i64> = dirty.iter().map(|lot| lot.expired).collect();
    let unlimited: Vec<bool> = dirty.iter().map(|lot| lot.unlimited).collect();
    let occurred_at: Vec<DateTime<Utc>> = dirty.iter().map(|lot| lot.occurred_at).collect();
    let valid_from: Vec<DateTime<Utc>> = dirty.iter().map(|lot| lot.valid_from).collect();
    let expires_at: Vec<Option<DateTime<Utc>>> = dirty.iter().map(|lot| lot.expires_at).collect();
    let status: Vec<&str> = dirty.iter().map(|lot| lot.status.as_str()).collect();
    let kinds: Vec<Option<&str>> = dirty.iter().map(|lot| lot.source_kind.as_deref()).collect();
    let references: Vec<Option<&str>> = dirty
        .iter()
        .map(|lot| lot.source_reference.as_deref())
        .collect();
    sqlx::query(
        "INSERT INTO lots (lot_id, org_id, product, quantity, remaining, valid_from, expires_at,
                           status, source_kind, source_reference, revoked, occurred_at,
                           drawn, expired, unlimited)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                              $6::timestamptz[], $7::timestamptz[], $8::text[], $9::text[], $10::text[],
                              $11::bigint[], $12::timestamptz[], $13::bigint[], $14::bigint[],
                              $15::boolean[])
         ON CONFLICT (org_id, lot_id) DO UPDATE SET
             remaining = EXCLUDED.remaining, status = EXCLUDED.status, revoked = EXCLUDED.revoked,
             drawn = EXCLUDED.drawn, expired = EXCLUDED.expired",
    )
    .bind(&ids)
    .bind(&orgs)
    .bind(&products)
    .bind(&quantities)
    .bind(&remaining)
    .bind(&valid_from)
    .bind(&expires_at)
    .bind(&status)
    .bind(&kinds)
    .bind(&references)
    .bind(&revoked)
    .bind(&occurred_at)
    .bind(&drawn)
    .bind(&expired)
    .bind(&unlimited)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The pool warnings whose record changed: published, or with a new recheck time.
async fn write_warnings(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let dirty: Vec<_> = book
        .warnings
        .iter()
        .filter(|(_, record)| record.dirty)
        .collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let orgs: Vec<&str> = dirty.iter().map(|(key, _)| key.org_id.as_str()).collect();
    let products: Vec<&str> = dirty.iter().map(|(key, _)| key.product.as_str()).collect();
    let kinds: Vec<&str> = dirty.iter().map(|(key, _)| key.kind()).collect();
    let grants: Vec<&str> = dirty
        .iter()
        .map(|(key, _)| key.grant_id.as_ref().map_or("", |grant| grant.as_str()))
        .collect();
    let open: Vec<bool> = dirty.iter().map(|(_, record)| record.open).collect();
    let mut available: Vec<Option<i64>> = Vec::with_capacity(dirty.len());
    let mut thresholds: Vec<Option<i64>> = Vec::with_capacity(dirty.len());
    let mut units: Vec<Option<i64>> = Vec::with_capacity(dirty.len());
    let mut expires: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(dirty.len());
    for (_, record) in &dirty {
        match record.numbers {
            WarningNumbers::Low {
                available: left,
                threshold,
            } => {
                available.push(Some(left));
                thresholds.push(Some(threshold));
                units.push(None);
                expires.push(None);
            }
            WarningNumbers::Expiring {
                units: held,
                expires_at,
            } => {
                available.push(None);
                thresholds.push(None);
                units.push(Some(held));
                expires.push(Some(expires_at));
            }
        }
    }
    let opened: Vec<Option<DateTime<Utc>>> =
        dirty.iter().map(|(_, record)| record.opened_at).collect();
    let revisions: Vec<i64> = dirty.iter().map(|(_, record)| record.revision).collect();
    let recheck_at: Vec<Option<DateTime<Utc>>> = dirty
        .iter()
        .map(|(_, record)| record.recheck.as_ref().map(|(at, _)| *at))
        .collect();
    let recheck_cause: Vec<Option<&str>> = dirty
        .iter()
        .map(|(_, record)| record.recheck.as_ref().map(|(_, cause)| cause.as_str()))
        .collect();
    sqlx::query(
        "INSERT INTO pool_warnings (org_id, product, kind, grant_id, open, available, threshold,
                                    units, expires_at, opened_at, revision, recheck_at,
                                    recheck_cause)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::boolean[],
                              $6::bigint[], $7::bigint[], $8::bigint[], $9::timestamptz[],
                              $10::timestamptz[], $11::bigint[], $12::timestamptz[], $13::text[])
         ON CONFLICT (org_id, product, kind, grant_id) DO UPDATE SET
             open = EXCLUDED.open, available = EXCLUDED.available,
             threshold = EXCLUDED.threshold, units = EXCLUDED.units,
             expires_at = EXCLUDED.expires_at, opened_at = EXCLUDED.opened_at,
             revision = EXCLUDED.revision, recheck_at = EXCLUDED.recheck_at,
             recheck_cause = EXCLUDED.recheck_cause",
    )
    .bind(&orgs)
    .bind(&products)
    .bind(&kinds)
    .bind(&grants)
    .bind(&open)
    .bind(&available)
    .bind(&thresholds)
    .bind(&units)
    .bind(&expires)
    .bind(&opened)
    .bind(&revisions)
    .bind(&recheck_at)
    .bind(&recheck_cause)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// New revocations are inserted; a stored one changes only when it is applied.
async fn write_revocations(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let dirty: Vec<_> = book
        .revocations
        .values()
        .flatten()
        .filter(|revocation| revocation.dirty)
        .collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let orgs: Vec<&str> = dirty.iter().map(|r| r.org_id.as_str()).collect();
    let ids: Vec<&str> = dirty.iter().map(|r| r.event_id.as_str()).collect();
    let times: Vec<DateTime<Utc>> = dirty.iter().map(|r| r.occurred_at).collect();
    let mut grants: Vec<Option<&str>> = Vec::with_capacity(dirty.len());
    let mut quantities: Vec<Option<i64>> = Vec::with_capacity(dirty.len());
    let mut kinds: Vec<Option<&str>> = Vec::with_capacity(dirty.len());
    let mut references: Vec<Option<&str>> = Vec::with_capacity(dirty.len());
    let mut products: Vec<Option<&str>> = Vec::with_capacity(dirty.len());
    for revocation in &dirty {
        match &revocation.target {
            RevocationTarget::Grant { grant_id, quantity } => {
                grants.push(Some(grant_id.as_str()));
                quantities.push(quantity.map(|quantity| quantity.get()));
                kinds.push(None);
                references.push(None);
                products.push(None);
            }
            RevocationTarget::Source { source, product } => {
                grants.push(None);
                quantities.push(None);
                kinds.push(Some(source.kind.as_str()));
                references.push(Some(source.reference.as_str()));
                products.push(product.as_ref().map(|product| product.as_str()));
            }
        }
    }
    let reasons: Vec<Option<&str>> = dirty.iter().map(|r| r.reason.as_deref()).collect();
    let applied: Vec<bool> = dirty.iter().map(|r| r.applied).collect();
    sqlx::query(
        "INSERT INTO revocations (org_id, event_id, occurred_at, grant_id, quantity, source_kind,
                                  source_reference, product, reason, applied)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::bigint[],
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::bool[])
         ON CONFLICT (org_id, event_id) DO UPDATE SET applied = EXCLUDED.applied",
    )
    .bind(&orgs)
    .bind(&ids)
    .bind(&times)
    .bind(&grants)
    .bind(&quantities)
    .bind(&kinds)
    .bind(&references)
    .bind(&products)
    .bind(&reasons)
    .bind(&applied)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The definitions the batch applied (rule 14), each the product's row from now on.
async fn write_catalogue(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let mut dirty: Vec<_> = book
        .catalogue
        .iter()
        .filter(|(_, definition)| definition.dirty)
        .collect();
    if dirty.is_empty() {
        return Ok(());
    }
    // In product order, so that two batches would wait on the rows in the same order.
    dirty.sort_by_key(|(product, _)| *product);
    let products: Vec<&str> = dirty.iter().map(|(product, _)| product.as_str()).collect();
    let names: Vec<&str> = dirty.iter().map(|(_, d)| d.name.as_str()).collect();
    let descriptions: Vec<Option<&str>> = dirty
        .iter()
        .map(|(_, d)| d.description.as_deref())
        .collect();
    let assignments: Vec<Option<&str>> = dirty
        .iter()
        .map(|(_, d)| d.assignment.map(Assignment::as_str))
        .collect();
    let times: Vec<DateTime<Utc>> = dirty.iter().map(|(_, d)| d.occurred_at).collect();
    let events: Vec<&str> = dirty.iter().map(|(_, d)| d.event_id.as_str()).collect();
    sqlx::query(
        "INSERT INTO products (product, name, description, assignment, occurred_at, event_id)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
                              $5::timestamptz[], $6::text[])
         ON CONFLICT (product) DO UPDATE SET
             name = EXCLUDED.name, description = EXCLUDED.description,
             assignment = EXCLUDED.assignment, occurred_at = EXCLUDED.occurred_at,
             event_id = EXCLUDED.event_id, updated_at = now()",
    )
    .bind(&products)
    .bind(&names)
    .bind(&descriptions)
    .bind(&assignments)
    .bind(&times)
    .bind(&events)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// New consumption rows are inserted and stored ones updated, each set in one statement:
/// the book knows which rows it loaded, so no row pays for `ON CONFLICT`'s extra index
/// probe.
async fn write_consumption(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let (new, stored): (Vec<_>, Vec<_>) = book
        .consumption
        .iter()
        .filter(|(_, consumption)| consumption.dirty)
        .partition(|(_, consumption)| consumption.is_new);
    let insert = bind_consumption(sqlx::query(INSERT_CONSUMPTION), &new);
    execute_for_each(connection, insert, "consumption", new.len()).await?;
    let update = bind_consumption(sqlx::query(UPDATE_CONSUMPTION), &stored);
    execute_for_each(connection, update, "consumption", stored.len()).await
}

/// The consumption rows of a batch as a relation, for both statements below.
macro_rules! consumption_rows {
    () => {
        "UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::timestamptz[],
            $7::bigint[], $8::timestamptz[], $9::bigint[], $10::text[], $11::bigint[])
       AS c (workspace_id, product, org_id, required, allocated, shortfall_since,
             reported_missing, reported_opened_at, alert_revision, last_cause, state_version)"
    };
}

const INSERT_CONSUMPTION: &str = concat!(
    "INSERT INTO consumption (workspace_id, product, org_id, required, allocated, shortfall_since,
                              reported_missing, reported_opened_at, alert_revision, last_cause,
                              state_version)
     SELECT * FROM ",
    consumption_rows!()
);

const UPDATE_CONSUMPTION: &str = concat!(
    "UPDATE consumption o SET
         required = c.required,
         allocated = c.allocated,
         shortfall_since = c.shortfall_since,
         reported_missing = c.reported_missing,
         reported_opened_at = c.reported_opened_at,
         alert_revision = c.alert_revision,
         last_cause = c.last_cause,
         state_version = c.state_version
       FROM ",
    consumption_rows!(),
    " WHERE o.workspace_id = c.workspace_id AND o.product = c.product AND o.org_id = c.org_id"
);

type Statement<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds the columns of `consumption_rows!` to `statement`.
fn bind_consumption<'q>(
    statement: Statement<'q>,
    rows: &[(&'q (WorkspaceId, Product), &'q Consumption)],
) -> Statement<'q> {
    let workspaces: Vec<&str> = rows.iter().map(|((ws, _), _)| ws.as_str()).collect();
    let products: Vec<&str> = rows
        .iter()
        .map(|((_, product), _)| product.as_str())
        .collect();
    let orgs: Vec<&str> = rows.iter().map(|(_, c)| c.org_id.as_str()).collect();
    let required: Vec<i64> = rows.iter().map(|(_, c)| c.required).collect();
    let allocated: Vec<i64> = rows.iter().map(|(_, c)| c.allocated).collect();
    let since: Vec<Option<DateTime<Utc>>> = rows.iter().map(|(_, c)| c.shortfall_since).collect();
    let reported: Vec<i64> = rows.iter().map(|(_, c)| c.reported_missing).collect();
    let opened: Vec<Option<DateTime<Utc>>> =
        rows.iter().map(|(_, c)| c.reported_opened_at).collect();
    let revisions: Vec<i64> = rows.iter().map(|(_, c)| c.alert_revision).collect();
    let causes: Vec<Option<&str>> = rows
        .iter()
        .map(|(_, c)| c.last_cause.as_ref().map(|cause| cause.as_str()))
        .collect();
    let versions: Vec<i64> = rows.iter().map(|(_, c)| c.state_version).collect();
    statement
        .bind(workspaces)
        .bind(products)
        .bind(orgs)
        .bind(required)
        .bind(allocated)
        .bind(since)
        .bind(reported)
        .bind(opened)
        .bind(revisions)
        .bind(causes)
        .bind(versions)
}

/// Runs a statement that writes `expected` rows of `table` (nothing when there are none).
/// A stored row the book loaded must still be there to update, under the organization
/// lock; any other count means the tables changed behind the worker's back.
async fn execute_for_each(
    connection: &mut PgConnection,
    statement: Statement<'_>,
    table: &str,
    expected: usize,
) -> Result<(), StoreError> {
    if expected == 0 {
        return Ok(());
    }
    let affected = statement.execute(&mut *connection).await?.rows_affected();
    if affected != expected as u64 {
        return Err(StoreError::Corrupt(format!(
            "{affected} {table} rows were written where the batch changed {expected}"
        )));
    }
    Ok(())
}

/// New participants are inserted and known ones updated, each set in one statement.
async fn write_participants(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    let (new, stored): (Vec<_>, Vec<_>) = book
        .participants
        .iter()
        .filter(|(_, record)| record.dirty)
        .partition(|(_, record)| record.is_new);
    copy_new_participants(connection, &new).await?;
    let update = bind_participants(sqlx::query(UPDATE_PARTICIPANTS), &stored);
    execute_for_each(connection, update, "participants", stored.len()).await
}

/// New participants go in with `COPY`, most of a batch's rows: PostgreSQL logs the rows it
/// puts on one page as one WAL record (an `INSERT` logs one per row) and spends less per
/// row on them.
async fn copy_new_participants(
    connection: &mut PgConnection,
    new: &[(&(WorkspaceId, ParticipantId), &ParticipantRecord)],
) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    let mut rows = BinaryCopy::new(5);
    for ((workspace_id, participant_id), record) in new {
        rows.row();
        rows.text(workspace_id.as_str());
        rows.text(participant_id.as_str());
        rows.timestamptz(record.last_event_at);
        rows.text(record.last_event_id.as_str());
        rows.boolean(record.counted);
    }
    let mut copy = connection.copy_in_raw(COPY_PARTICIPANTS).await?;
    if let Err(error) = copy.send(rows.finish()).await {
        copy.abort("the rows could not be sent").await.ok();
        return Err(error.into());
    }
    let written = copy.finish().await?;
    if written != new.len() as u64 {
        return Err(StoreError::Corrupt(format!(
            "{written} participants rows were written where the batch added {}",
            new.len()
        )));
    }
    Ok(())
}

const COPY_PARTICIPANTS: &str = "COPY participants (workspace_id, participant_id, last_event_at,
                                                    last_event_id, counted)
                                  FROM STDIN (FORMAT binary)";

/// Rows in PostgreSQL's binary `COPY` format: a header, then per row its field count and
/// each field's length and bytes in network order, then a trailer.
struct BinaryCopy {
    bytes: Vec<u8>,
    fields: i16,
}

impl BinaryCopy {
    fn new(fields: i16) -> Self {
        let mut bytes = Vec::with_capacity(64 * 1024);
        bytes.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        // No flags (no OIDs), no header extension.
        bytes.extend_from_slice(&0_i32.to_be_bytes());
        bytes.extend_from_slice(&0_i32.to_be_bytes());
        Self { bytes, fields }
    }

    fn row(&mut self) {
        self.bytes.extend_from_slice(&self.fields.to_be_bytes());
    }

    fn field(&mut self, value: &[u8]) {
        let length = i32::try_from(value.len()).expect("a field is shorter than 2 GiB");
        self.bytes.extend_from_slice(&length.to_be_bytes());
        self.bytes.extend_from_slice(value);
    }

    fn text(&mut self, value: &str) {
        self.field(value.as_bytes());
    }

    /// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's epoch.
    fn timestamptz(&mut self, at: DateTime<Utc>) {
        const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
        self.field(&(at.timestamp_micros() - POSTGRES_EPOCH_MICROS).to_be_bytes());
    }

    fn boolean(&mut self, value: bool) {
        self.field(&[u8::from(value)]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&(-1_i16).to_be_bytes());
        self.bytes
    }
}

const UPDATE_PARTICIPANTS: &str = "UPDATE participants p SET
         last_event_at = u.last_event_at, last_event_id = u.last_event_id, counted = u.counted
       FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::bool[])
         AS u (workspace_id, participant_id, last_event_at, last_event_id, counted)
      WHERE p.workspace_id = u.workspace_id AND p.participant_id = u.participant_id";

/// Binds the five participant columns of both statements above to `statement`.
fn bind_participants<'q>(
    statement: Statement<'q>,
    rows: &[(&'q (WorkspaceId, ParticipantId), &'q ParticipantRecord)],
) -> Statement<'q> {
    let workspaces: Vec<&str> = rows.iter().map(|((ws, _), _)| ws.as_str()).collect();
    let participants: Vec<&str> = rows.iter().map(|((_, p), _)| p.as_str()).collect();
    let times: Vec<DateTime<Utc>> = rows.iter().map(|(_, r)| r.last_event_at).collect();
    let events: Vec<&str> = rows.iter().map(|(_, r)| r.last_event_id.as_str()).collect();
    let counted: Vec<bool> = rows.iter().map(|(_, r)| r.counted).collect();
    statement
        .bind(workspaces)
        .bind(participants)
        .bind(times)
        .bind(events)
        .bind(counted)
}

async fn write_processed(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    if book.newly_processed.is_empty() {
        return Ok(());
    }
    let (orgs, ids): (Vec<&str>, Vec<&str>) = book
        .newly_processed
        .iter()
        .map(|(org_id, event_id)| (org_id.as_str(), event_id.as_str()))
        .unzip();
    sqlx::query(
        "INSERT INTO processed_events (event_id, org_id)
         SELECT * FROM UNNEST($1::text[], $2::text[])",
    )
    .bind(&ids)
    .bind(&orgs)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// One block of the ledger as stored (migration 20261207000001): an organization's
/// entries of one batch, consecutive sequences, one array element per entry. The field
/// order is the table's column order: blocks are bound as an array of its row type.
#[derive(sqlx::Type)]
#[sqlx(type_name = "ledger_blocks")]
struct LedgerBlock {
    org_id: String,
    first_sequence: i64,
    last_sequence: i64,
    entry_ids: Vec<uuid::Uuid>,
    products: Vec<String>,
    kinds: Vec<String>,
    quantities: Vec<i64>,
    workspace_ids: Vec<Option<String>>,
    pool_available_after: Vec<i64>,
    caused_by: Vec<String>,
    grant_ids: Vec<Option<String>>,
    actors: Vec<Option<String>>,
    unlimited: Vec<bool>,
    recorded_at: Vec<DateTime<Utc>>,
}

impl LedgerBlock {
    fn new(first: &LedgerEntry) -> Self {
        Self {
            org_id: first.org_id.to_string(),
            first_sequence: first.sequence,
            last_sequence: first.sequence - 1,
            entry_ids: Vec::new(),
            products: Vec::new(),
            kinds: Vec::new(),
            quantities: Vec::new(),
            workspace_ids: Vec::new(),
            pool_available_after: Vec::new(),
            caused_by: Vec::new(),
            grant_ids: Vec::new(),
            actors: Vec::new(),
            unlimited: Vec::new(),
            recorded_at: Vec::new(),
        }
    }

    /// Whether `entry` is the next entry of this block's organization.
    fn continued_by(&self, entry: &LedgerEntry) -> bool {
        self.org_id == entry.org_id.as_str() && self.last_sequence + 1 == entry.sequence
    }

    fn push(&mut self, entry: &LedgerEntry) {
        self.last_sequence = entry.sequence;
        self.entry_ids.push(entry_id(&entry.org_id, entry.sequence));
        self.products.push(entry.product.to_string());
        self.kinds.push(entry.kind.as_str().to_owned());
        self.quantities.push(entry.quantity);
        self.workspace_ids
            .push(entry.workspace_id.as_ref().map(|ws| ws.to_string()));
        self.pool_available_after.push(entry.pool_available_after);
        self.caused_by.push(entry.caused_by.to_string());
        self.grant_ids
            .push(entry.grant_id.as_ref().map(|grant| grant.to_string()));
        self.actors.push(entry.actor.clone());
        self.unlimited.push(entry.unlimited);
        self.recorded_at.push(entry.recorded_at);
    }
}

/// Appends the batch's ledger entries as one block per organization: the batch recorded
/// each organization's entries under its row lock, consecutive from its last sequence.
async fn write_ledger(connection: &mut PgConnection, book: &Book) -> Result<(), StoreError> {
    if book.ledger.is_empty() {
        return Ok(());
    }
    let mut entries: Vec<&LedgerEntry> = book.ledger.iter().collect();
    entries.sort_unstable_by(|a, b| (&a.org_id, a.sequence).cmp(&(&b.org_id, b.sequence)));
    let mut blocks: Vec<LedgerBlock> = Vec::new();
    for entry in entries {
        match blocks.last_mut() {
            Some(block) if block.continued_by(entry) => block.push(entry),
            _ => {
                let mut block = LedgerBlock::new(entry);
                block.push(entry);
                blocks.push(block);
            }
        }
    }
    sqlx::query("INSERT INTO ledger_blocks SELECT * FROM unnest($1::ledger_blocks[])")
        .bind(&blocks)
        .execute(&mut *connection)
        .await?;
    Ok(())
}
