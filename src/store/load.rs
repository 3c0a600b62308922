//! Loading the slice of state a batch needs into a [`Book`], under the organization locks.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::StoreError;
use crate::domain::{
    Assignment, Book, CommandBody, Consumption, Definition, EventId, GrantSource, Input, Lot,
    LotStatus, OrgId, Organization, ParticipantId, ParticipantRecord, Policy, Pool, Product,
    Quantity, Revocation, RevocationTarget, WarningKey, WarningNumbers, WarningRecord,
    WorkspaceCounts, WorkspaceId, WorkspaceLife,
};

/// The advisory lock of the catalogue (rule 14): shared by the transactions that may ask
/// how a module moves, taken alone by those that define products.
const CATALOGUE_LOCK_KEY: i64 = 0x6361_7461_6c6f_6775; // "catalogu"

/// Loads what the inputs need: their organizations (locked), pools and lots; the open
/// shortfalls of the organizations whose pools the batch can credit at `now`, or whose
/// waiting workspaces a module the batch defines may fill; the workspaces, consumption and
/// participants they name, with the workspaces' owners and lives; which of their event ids
/// were already applied; the catalogue's definitions of the products they name or may move.
pub(super) async fn load_book<'a>(
    connection: &mut PgConnection,
    inputs: impl Iterator<Item = &'a Input>,
    policy: Policy,
    now: DateTime<Utc>,
) -> Result<Book, StoreError> {
    let mut orgs = BTreeSet::new();
    let mut granting = BTreeSet::new();
    let mut workspaces = BTreeSet::new();
    let mut participants = BTreeSet::new();
    let mut deduplicated = Vec::new();
    let mut named_grants = BTreeSet::new();
    let mut named_products = BTreeSet::new();
    let mut defined = BTreeSet::new();
    for input in inputs {
        let command = match input {
            Input::Command(command) => command,
            Input::ProductDefined(definition) => {
                defined.insert(definition.product.clone());
                continue;
            }
        };
        orgs.insert(command.org_id.clone());
        if let Some(product) = command.product() {
            named_products.insert(product.clone());
        }
        if let Some(workspace_id) = command.workspace_id() {
            workspaces.insert(workspace_id.as_str().to_owned());
        }
        if let Some((workspace_id, participant_id)) = command.participant() {
            participants.insert((
                workspace_id.as_str().to_owned(),
                participant_id.as_str().to_owned(),
            ));
        }
        if command.needs_deduplication() {
            deduplicated.push((command.event_id.as_str(), command.org_id.as_str()));
        }
        match &command.body {
            CommandBody::EntitlementGranted { .. } => {
                granting.insert(command.org_id.clone());
            }
            CommandBody::EntitlementRevoked {
                target: RevocationTarget::Grant { grant_id, .. },
                ..
            } => {
                named_grants.insert((
                    command.org_id.as_str().to_owned(),
                    grant_id.as_str().to_owned(),
                ));
            }
            _ => {}
        }
    }
    // Rule 14: a module that becomes automatic fills its open shortfalls in every
    // organization, so the organizations waiting for a module the batch defines are locked
    // and loaded like the batch's own.
    let waiting = organizations_waiting_for(connection, &defined).await?;
    orgs.extend(waiting.iter().cloned());
    let orgs: Vec<OrgId> = orgs.into_iter().collect();
    let mut book = lock_and_load_pools(connection, &orgs, policy, now).await?;
    let named_grants: Vec<(String, String)> = named_grants.into_iter().collect();
    load_named_lots(connection, &named_grants, &mut book).await?;
    // Only a pool that gains units fills waiting workspaces (rule 8): a grant in this
    // batch, or a stored lot whose validity starts by `now`. Every other organization's
    // open shortfalls stay in the database; reloading them for each batch made the cost
    // of a batch grow with the shortfalls left open, which modules waiting for a person
    // keep open for good. A batch that defines a product loads them for all its
    // organizations: a shortfall of the module may open earlier in the same batch, in an
    // organization that had none in the database, and the definition must fill it too
    // (definitions are rare, so the cost is too).
    let (crediting, not_crediting): (Vec<&OrgId>, Vec<&OrgId>) = orgs.iter().partition(|org_id| {
        !defined.is_empty()
            || granting.contains(*org_id)
            || waiting.contains(*org_id)
            || has_lot_due(&book, org_id, now)
    });
    book.shortfalls_not_loaded = not_crediting.into_iter().cloned().collect();
    if !crediting.is_empty() {
        let names: Vec<&str> = crediting.into_iter().map(OrgId::as_str).collect();
        load_open_shortfalls(connection, &names, &mut book).await?;
        load_revocations(connection, &names, &mut book).await?;
    }
    lock_and_load_catalogue(connection, &mut book, named_products, &defined, &orgs).await?;
    let workspaces: Vec<String> = workspaces.into_iter().collect();
    load_workspaces(connection, &workspaces, &mut book).await?;

    let (participant_workspaces, participant_ids): (Vec<String>, Vec<String>) =
        participants.into_iter().unzip();
    let rows: Vec<(String, String, DateTime<Utc>, String, bool)> = sqlx::query_as(
        "SELECT p.workspace_id, p.participant_id, p.last_event_at, p.last_event_id, p.counted
           FROM participants p
           JOIN UNNEST($1::text[], $2::text[]) AS wanted (workspace_id, participant_id)
             ON wanted.workspace_id = p.workspace_id AND wanted.participant_id = p.participant_id",
    )
    .bind(&participant_workspaces)
    .bind(&participant_ids)
    .fetch_all(&mut *connection)
    .await?;
    for (workspace_id, participant_id, last_event_at, last_event_id, counted) in rows {
        book.participants.insert(
            (
                parse(WorkspaceId::parse(&workspace_id))?,
                parse(ParticipantId::parse(&participant_id))?,
            ),
            ParticipantRecord {
                last_event_at,
                last_event_id: parse(EventId::parse(&last_event_id))?,
                counted,
                is_new: false,
                dirty: false,
            },
        );
    }

    if !deduplicated.is_empty() {
        // An event recorded before ids were scoped by organization has the organization ''
        // when the upgrade could not tell it (migrations/20261201000001_scoped_event_ids.sql):
        // it still counts as applied for any organization.
        let (events, orgs): (Vec<&str>, Vec<&str>) = deduplicated.into_iter().unzip();
        let seen: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT w.event_id, w.org_id
               FROM UNNEST($1::text[], $2::text[]) AS w (event_id, org_id)
               JOIN processed_events p
                 ON p.event_id = w.event_id AND p.org_id IN (w.org_id, '')",
        )
        .bind(&events)
        .bind(&orgs)
        .fetch_all(&mut *connection)
        .await?;
        for (event_id, org_id) in seen {
            book.processed.insert((
                parse(OrgId::parse(&org_id))?,
                parse(EventId::parse(&event_id))?,
            ));
        }
    }
    Ok(book)
}

/// Locks the organizations (creating their rows if new) and loads their pools, lots, open
/// shortfalls and the definitions of their lots' products: what the clock needs to settle
/// validity windows. Loads also the owners, lives and consumption of `workspaces` (which
/// belong to those organizations): what it needs to turn them past.
pub(super) async fn load_book_for_orgs(
    connection: &mut PgConnection,
    orgs: &[OrgId],
    workspaces: &[String],
    policy: Policy,
    now: DateTime<Utc>,
) -> Result<Book, StoreError> {
    let mut book = lock_and_load_pools(connection, orgs, policy, now).await?;
    let names: Vec<&str> = orgs.iter().map(OrgId::as_str).collect();
    load_open_shortfalls(connection, &names, &mut book).await?;
    load_revocations(connection, &names, &mut book).await?;
    lock_and_load_catalogue(
        connection,
        &mut book,
        BTreeSet::new(),
        &BTreeSet::new(),
        orgs,
    )
    .await?;
    load_workspaces(connection, workspaces, &mut book).await?;
    Ok(book)
}

/// The workspaces by id, with their owner (rule 4) and life (rule 13).
const WORKSPACES_BY_ID: &str =
    "SELECT workspace_id, org_id, name, starts_at, ends_at, archived, live, life_event_at,
            life_event_id
       FROM workspaces WHERE workspace_id = ANY($1)";

type WorkspaceRow = (
    String,
    String,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    bool,
    bool,
    Option<DateTime<Utc>>,
    Option<String>,
);

/// Loads the owners and lives of `workspaces`, and all their consumption rows. Called
/// under the locks of the organizations that own them, since a life or a row only changes
/// under its organization's lock.
async fn load_workspaces(
    connection: &mut PgConnection,
    workspaces: &[String],
    book: &mut Book,
) -> Result<(), StoreError> {
    load_owners_and_lives(connection, workspaces, book).await?;
    let rows: Vec<ConsumptionRow> = sqlx::query_as(CONSUMPTION_COLUMNS_BY_WORKSPACE)
        .bind(workspaces)
        .fetch_all(&mut *connection)
        .await?;
    insert_consumption(book, rows)
}

/// Loads the owners and lives of `workspaces`.
async fn load_owners_and_lives(
    connection: &mut PgConnection,
    workspaces: &[String],
    book: &mut Book,
) -> Result<(), StoreError> {
    let rows: Vec<WorkspaceRow> = sqlx::query_as(WORKSPACES_BY_ID)
        .bind(workspaces)
        .fetch_all(&mut *connection)
        .await?;
    for (workspace_id, org_id, name, starts_at, ends_at, archived, live, event_at, event_id) in rows
    {
        let workspace_id = parse(WorkspaceId::parse(&workspace_id))?;
        if let (Some(event_at), Some(event_id)) = (event_at, event_id) {
            book.workspaces.insert(
                workspace_id.clone(),
                WorkspaceLife::stored(
                    name,
                    starts_at,
                    ends_at,
                    archived,
                    live,
                    event_at,
                    parse(EventId::parse(&event_id))?,
                ),
            );
        }
        book.owners
            .insert(workspace_id, parse(OrgId::parse(&org_id))?);
    }
    Ok(())
}

/// The organizations with open shortfalls of the modules among `products`, in `org_id`
/// order (seats need no definition to move).
async fn organizations_waiting_for(
    connection: &mut PgConnection,
    products: &BTreeSet<Product>,
) -> Result<BTreeSet<OrgId>, StoreError> {
    let modules: Vec<&str> = products
        .iter()
        .filter(|product| !product.is_seat())
        .map(Product::as_str)
        .collect();
    if modules.is_empty() {
        return Ok(BTreeSet::new());
    }
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT org_id FROM consumption
          WHERE product = ANY($1) AND required > allocated",
    )
    .bind(&modules)
    .fetch_all(&mut *connection)
    .await?;
    rows.into_iter()
        .map(|(org_id,)| parse(OrgId::parse(&org_id)))
        .collect()
}

/// Takes the catalogue lock and loads the definitions the book may consult (rule 14): of
/// the products the batch names or defines, and of those whose lots it holds (units that
/// become valid fill waiting workspaces only if their product moves by itself).
///
/// A batch that defines products holds the lock alone; every other transaction that may
/// ask how a module moves shares it. Every transaction takes it after its organizations'
/// locks, so none waits for another in a cycle. `locked` is in `org_id` order. Once a
/// defining batch holds it, no
/// transaction that could open a shortfall of a module is running: the organizations
/// waiting for the modules it defines must then be among those it locked, or it is
/// applied again, now locking them too.
async fn lock_and_load_catalogue(
    connection: &mut PgConnection,
    book: &mut Book,
    mut products: BTreeSet<Product>,
    defined: &BTreeSet<Product>,
    locked: &[OrgId],
) -> Result<(), StoreError> {
    products.extend(defined.iter().cloned());
    products.extend(book.lots.keys().map(|(_, product)| product.clone()));
    if defined.is_empty() {
        if products.iter().all(Product::is_seat) {
            return Ok(());
        }
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(CATALOGUE_LOCK_KEY)
            .execute(&mut *connection)
            .await?;
    } else {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CATALOGUE_LOCK_KEY)
            .execute(&mut *connection)
            .await?;
        let waiting = organizations_waiting_for(connection, defined).await?;
        if let Some(org_id) = waiting
            .iter()
            .find(|org_id| locked.binary_search(org_id).is_err())
        {
            return Err(StoreError::CatalogueRace(org_id.to_string()));
        }
    }
    let names: Vec<&str> = products.iter().map(Product::as_str).collect();
    type DefinitionRow = (
        String,
        String,
        Option<String>,
        Option<String>,
        DateTime<Utc>,
        String,
    );
    let rows: Vec<DefinitionRow> = sqlx::query_as(
        "SELECT product, name, description, assignment, occurred_at, event_id
           FROM products WHERE product = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&mut *connection)
    .await?;
    for (product, name, description, assignment, occurred_at, event_id) in rows {
        let assignment = assignment
            .map(|assignment| {
                Assignment::parse(&assignment)
                    .ok_or_else(|| StoreError::Corrupt(format!("assignment {assignment:?}")))
            })
            .transpose()?;
        book.catalogue.insert(
            parse(Product::parse(&product))?,
            Definition {
                name,
                description,
                assignment,
                occurred_at,
                event_id: parse(EventId::parse(&event_id))?,
                dirty: false,
            },
        );
    }
    Ok(())
}

/// Loads the kept revocations that can still reach a lot (rule 11): the ones a grant or a
/// lot becoming valid needs. A revocation in the batch itself reaches only lots already in
/// the pool, which are loaded.
async fn load_revocations(
    connection: &mut PgConnection,
    orgs: &[&str],
    book: &mut Book,
) -> Result<(), StoreError> {
    type RevocationRow = (
        String,
        String,
        DateTime<Utc>,
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<RevocationRow> = sqlx::query_as(
        "SELECT org_id, event_id, occurred_at, grant_id, quantity, source_kind, source_reference,
                product, reason
           FROM revocations WHERE org_id = ANY($1) AND NOT applied
          ORDER BY org_id, occurred_at, event_id",
    )
    .bind(orgs)
    .fetch_all(&mut *connection)
    .await?;
    for (org_id, event_id, occurred_at, grant_id, quantity, kind, reference, product, reason) in
        rows
    {
        let target = match (grant_id, kind, reference) {
            (Some(grant_id), None, None) => RevocationTarget::Grant {
                grant_id: parse(EventId::parse(&grant_id))?,
                quantity: quantity
                    .map(Quantity::parse)
                    .transpose()
                    .map_err(|error| StoreError::Corrupt(format!("a revocation's {error}")))?,
            },
            (None, Some(kind), Some(reference)) => RevocationTarget::Source {
                source: GrantSource { kind, reference },
                product: product
                    .as_deref()
                    .map(|product| parse(Product::parse(product)))
                    .transpose()?,
            },
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "revocation {event_id:?} names neither one grant nor one source"
                )))
            }
        };
        let org_id = parse(OrgId::parse(&org_id))?;
        book.revocations
            .entry(org_id.clone())
            .or_default()
            .push(Revocation {
                event_id: parse(EventId::parse(&event_id))?,
                org_id,
                occurred_at,
                target,
                reason,
                applied: false,
                is_new: false,
                dirty: false,
            });
    }
    Ok(())
}

/// Whether a pending lot of `org_id` becomes valid by `now`, crediting its pool.
fn has_lot_due(book: &Book, org_id: &OrgId, now: DateTime<Utc>) -> bool {
    book.lots
        .iter()
        .filter(|((owner, _), _)| owner == org_id)
        .flat_map(|(_, lots)| lots)
        .any(|lot| lot.status == LotStatus::Pending && lot.valid_from <= now)
}

async fn load_open_shortfalls(
    connection: &mut PgConnection,
    orgs: &[&str],
    book: &mut Book,
) -> Result<(), StoreError> {
    let rows: Vec<ConsumptionRow> = sqlx::query_as(CONSUMPTION_COLUMNS_OPEN_BY_ORG)
        .bind(orgs)
        .fetch_all(&mut *connection)
        .await?;
    // A refill changes these workspaces' state, whose messages carry their names and lives.
    let mut waiting: Vec<String> = rows.iter().map(|row| row.0.clone()).collect();
    waiting.sort_unstable();
    waiting.dedup();
    insert_consumption(book, rows)?;
    if waiting.is_empty() {
        return Ok(());
    }
    load_owners_and_lives(connection, &waiting, book).await
}

/// Locks the organizations (creating their rows if new) in `org_id` order, so that two
/// batches can never wait on each other in a cycle, and loads their pools, lots and pool
/// warnings.
async fn lock_and_load_pools(
    connection: &mut PgConnection,
    orgs: &[OrgId],
    policy: Policy,
    now: DateTime<Utc>,
) -> Result<Book, StoreError> {
    let mut names: Vec<&str> = orgs.iter().map(OrgId::as_str).collect();
    names.sort_unstable();
    names.dedup();
    let mut book = Book::new(policy);
    if names.is_empty() {
        return Ok(book);
    }
    sqlx::query(
        "INSERT INTO organizations (org_id)
         SELECT org_id FROM UNNEST($1::text[]) AS wanted (org_id) ORDER BY org_id
         ON CONFLICT DO NOTHING",
    )
    .bind(&names)
    .execute(&mut *connection)
    .await?;
    let locked: Vec<(String, i64)> = sqlx::query_as(
        "SELECT org_id, last_sequence FROM organizations
          WHERE org_id = ANY($1) ORDER BY org_id FOR UPDATE",
    )
    .bind(&names)
    .fetch_all(&mut *connection)
    .await?;
    for (org_id, last_sequence) in locked {
        book.organizations.insert(
            parse(OrgId::parse(&org_id))?,
            Organization {
                last_sequence,
                dirty: false,
            },
        );
    }

    /// org, product, available, granted, transferred, expired, revoked, unlimited,
    /// state version, last cause.
    type PoolRow = (
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        bool,
        i64,
        Option<String>,
    );
    let pools: Vec<PoolRow> = sqlx::query_as(
        "SELECT org_id, product, available, granted_total, transferred_total, expired_total,
                revoked_total, unlimited, state_version, last_cause
           FROM pools WHERE org_id = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&mut *connection)
    .await?;
    for (
        org_id,
        product,
        available,
        granted_total,
        transferred_total,
        expired_total,
        revoked_total,
        unlimited,
        state_version,
        last_cause,
    ) in pools
    {
        book.pools.insert(
            (
                parse(OrgId::parse(&org_id))?,
                parse(Product::parse(&product))?,
            ),
            Pool {
                available,
                granted_total,
                transferred_total,
                expired_total,
                revoked_total,
                unlimited,
                state_version,
                loaded_state: None,
                last_cause: last_cause
                    .as_deref()
                    .map(EventId::parse)
                    .transpose()
                    .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                dirty: false,
            },
        );
    }

    let lots: Vec<LotRow> = sqlx::query_as(LOTS_IN_THE_POOL)
        .bind(&names)
        .bind(now)
        .fetch_all(&mut *connection)
        .await?;
    insert_lots(&mut book, lots)?;
    book.remember_pool_states();
    load_warnings(connection, &names, &mut book).await?;
    Ok(book)
}

/// The organizations' pending and active lots, what a batch can draw, credit or expire,
/// and the spent or revoked counted ones still valid at `$2`, whose units count in their
/// pool's low threshold (rule 15).
const LOTS_IN_THE_POOL: &str =
    "SELECT lot_id, org_id, product, quantity, remaining, revoked, occurred_at, valid_from,
            expires_at, status, source_kind, source_reference, drawn, expired, unlimited
       FROM lots
      WHERE org_id = ANY($1)
        AND (status IN ('pending', 'active')
             OR (status IN ('spent', 'revoked') AND NOT unlimited AND quantity > revoked
                 AND (expires_at IS NULL OR expires_at > $2)))";

/// The pool warnings a batch may change: the open ones, each pool's `low` one, and the
/// resolved `expiring` ones whose grant still has units in the pool.
const WARNINGS_OF_ORGS: &str =
    "SELECT org_id, product, grant_id, open, available, threshold, units, expires_at,
            opened_at, revision, recheck_at, recheck_cause
       FROM pool_warnings
      WHERE org_id = ANY($1) AND (open OR kind = 'low' OR units > 0)";

/// org, product, grant ('' for low), open, available, threshold, units, expires_at,
/// opened_at, revision, recheck_at, recheck_cause.
type WarningRow = (
    String,
    String,
    String,
    bool,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i64,
    Option<DateTime<Utc>>,
    Option<String>,
);

async fn load_warnings(
    connection: &mut PgConnection,
    orgs: &[&str],
    book: &mut Book,
) -> Result<(), StoreError> {
    let rows: Vec<WarningRow> = sqlx::query_as(WARNINGS_OF_ORGS)
        .bind(orgs)
        .fetch_all(&mut *connection)
        .await?;
    for (
        org_id,
        product,
        grant_id,
        open,
        available,
        threshold,
        units,
        expires_at,
        opened_at,
        revision,
        recheck_at,
        recheck_cause,
    ) in rows
    {
        let corrupt =
            || StoreError::Corrupt(format!("pool warning {org_id}/{product}/{grant_id:?}"));
        let numbers = match (available, threshold, units, expires_at) {
            (Some(available), Some(threshold), None, None) if grant_id.is_empty() => {
                WarningNumbers::Low {
                    available,
                    threshold,
                }
            }
            (None, None, Some(units), Some(expires_at)) if !grant_id.is_empty() => {
                WarningNumbers::Expiring { units, expires_at }
            }
            _ => return Err(corrupt()),
        };
        let recheck = match (recheck_at, recheck_cause) {
            (Some(at), Some(cause)) => Some((at, parse(EventId::parse(&cause))?)),
            (None, None) => None,
            _ => return Err(corrupt()),
        };
        let key = WarningKey {
            org_id: parse(OrgId::parse(&org_id))?,
            product: parse(Product::parse(&product))?,
            grant_id: if grant_id.is_empty() {
                None
            } else {
                Some(parse(EventId::parse(&grant_id))?)
            },
        };
        book.warnings.insert(
            key,
            WarningRecord {
                open,
                numbers,
                opened_at,
                revision,
                recheck,
                is_new: false,
                dirty: false,
            },
        );
    }
    Ok(())
}

/// The named lots no longer in the pool (same columns as [`LOTS_IN_THE_POOL`]).
const LOTS_NAMED_OUT_OF_THE_POOL: &str =
    "SELECT lot_id, org_id, product, quantity, remaining, revoked, occurred_at, valid_from,
            expires_at, status, source_kind, source_reference, drawn, expired, unlimited
       FROM lots
       JOIN UNNEST($1::text[], $2::text[]) AS named (org_id, lot_id) USING (org_id, lot_id)
      WHERE status NOT IN ('pending', 'active')";

type LotRow = (
    String,
    String,
    String,
    i64,
    i64,
    i64,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    String,
    Option<String>,
    Option<String>,
    i64,
    i64,
    bool,
);

fn insert_lots(book: &mut Book, lots: Vec<LotRow>) -> Result<(), StoreError> {
    for (
        lot_id,
        org_id,
        product,
        quantity,
        remaining,
        revoked,
        occurred_at,
        valid_from,
        expires_at,
        status,
        kind,
        reference,
        drawn,
        expired,
        unlimited,
    ) in lots
    {
        let org_id = parse(OrgId::parse(&org_id))?;
        let product = parse(Product::parse(&product))?;
        let status = LotStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("lot status {status:?}")))?;
        let lot_id = parse(EventId::parse(&lot_id))?;
        let pool = book
            .lots
            .entry((org_id.clone(), product.clone()))
            .or_default();
        // A lot a revocation names may be loaded already, as one its pool's threshold counts.
        if pool.iter().any(|lot| lot.lot_id == lot_id) {
            continue;
        }
        pool.push(Lot {
            lot_id,
            org_id,
            product,
            quantity,
            remaining,
            revoked,
            drawn,
            expired,
            unlimited,
            occurred_at,
            valid_from,
            expires_at,
            status,
            source_kind: kind,
            source_reference: reference,
            is_new: false,
            dirty: false,
        });
    }
    Ok(())
}

/// Loads the lots that revocations in the batch name but that are no longer in the pool
/// (spent, expired or revoked): a revocation that meets its grant is done, whatever it
/// takes, and is not kept waiting for a grant that already came and went.
async fn load_named_lots(
    connection: &mut PgConnection,
    named: &[(String, String)],
    book: &mut Book,
) -> Result<(), StoreError> {
    if named.is_empty() {
        return Ok(());
    }
    let (orgs, grants): (Vec<&str>, Vec<&str>) = named
        .iter()
        .map(|(org, grant)| (org.as_str(), grant.as_str()))
        .unzip();
    let lots: Vec<LotRow> = sqlx::query_as(LOTS_NAMED_OUT_OF_THE_POOL)
        .bind(&orgs)
        .bind(&grants)
        .fetch_all(&mut *connection)
        .await?;
    insert_lots(book, lots)
}

type ConsumptionRow = (
    String,
    String,
    String,
    i64,
    i64,
    Option<DateTime<Utc>>,
    i64,
    Option<DateTime<Utc>>,
    i64,
    Option<String>,
    i64,
);

const CONSUMPTION_COLUMNS_BY_WORKSPACE: &str =
    "SELECT workspace_id, product, org_id, required, allocated, shortfall_since,
            reported_missing, reported_opened_at, alert_revision, last_cause, state_version
       FROM consumption WHERE workspace_id = ANY($1)";

const CONSUMPTION_COLUMNS_OPEN_BY_ORG: &str =
    "SELECT workspace_id, product, org_id, required, allocated, shortfall_since,
            reported_missing, reported_opened_at, alert_revision, last_cause, state_version
       FROM consumption WHERE org_id = ANY($1) AND required > allocated";

fn insert_consumption(book: &mut Book, rows: Vec<ConsumptionRow>) -> Result<(), StoreError> {
    for (
        workspace_id,
        product,
        org_id,
        required,
        allocated,
        shortfall_since,
        reported_missing,
        reported_opened_at,
        alert_revision,
        last_cause,
        state_version,
    ) in rows
    {
        book.consumption.insert(
            (
                parse(WorkspaceId::parse(&workspace_id))?,
                parse(Product::parse(&product))?,
            ),
            Consumption {
                org_id: parse(OrgId::parse(&org_id))?,
                required,
                allocated,
                shortfall_since,
                reported_missing,
                reported_opened_at,
                alert_revision,
                last_cause: last_cause
                    .as_deref()
                    .map(EventId::parse)
                    .transpose()
                    .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                state_version,
                loaded_counts: Some(WorkspaceCounts {
                    required,
                    allocated,
                }),
                is_new: false,
                dirty: false,
            },
        );
    }
    Ok(())
}

/// Values read back were valid when written; one that is not means the table was edited
/// by hand.
pub(super) fn parse<T>(value: Result<T, crate::domain::IdError>) -> Result<T, StoreError> {
    value.map_err(|error| StoreError::Corrupt(format!("a stored identifier {error}")))
}
