//! The whole state queued again for `entitlement-state` (`entitlement-worker snapshot`):
//! organization by organization, under the same locks as the batches, so that a key's
//! republished state lands in the outbox after every earlier state of that key and before
//! every later one, and the compacted topic's last message per key stays its latest state.
//! Read and queued a page at a time, so memory stays bounded whatever the state's size.

use chrono::{DateTime, Utc};

use super::load::parse;
use super::outbox::{Channel, OutboxMessage};
use super::{Store, StoreError};
use crate::codec::StateMessage;
use crate::domain::{
    EventId, OrgId, PoolState, Product, StateBody, StateChange, StateKey, WorkspaceCounts,
    WorkspaceId,
};

/// What a snapshot of some organizations queued.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub pools: u64,
    pub workspaces: u64,
    /// Keys that name no cause (stored before causes were kept): not queued.
    pub skipped: u64,
    /// The last outbox row written.
    pub last_row: Option<i64>,
}

const LOCK_ORGANIZATIONS: &str =
    "SELECT org_id FROM organizations WHERE org_id = ANY($1) ORDER BY org_id FOR UPDATE";

/// Keys never published before get their first version: a consumer keeps the highest
/// version, and the worker's next change of the key must come after this one.
const FIRST_POOL_VERSIONS: &str =
    "UPDATE pools SET state_version = 1 WHERE org_id = ANY($1) AND state_version = 0";
const FIRST_WORKSPACE_VERSIONS: &str =
    "UPDATE consumption SET state_version = 1 WHERE org_id = ANY($1) AND state_version = 0";

const POOL_STATES: &str = "SELECT p.org_id, p.product, p.available,
        COALESCE((SELECT sum(l.remaining) FROM lots l
                   WHERE l.org_id = p.org_id AND l.product = p.product
                     AND l.status = 'pending'), 0)::bigint,
        p.unlimited, p.granted_total, p.transferred_total, p.expired_total, p.revoked_total,
        p.state_version, p.last_cause
   FROM pools p WHERE p.org_id = ANY($1)
  ORDER BY p.org_id, p.product";

const WORKSPACE_STATES: &str = "SELECT c.org_id, c.workspace_id, c.product, c.required,
        c.allocated, c.state_version, c.last_cause, w.name, w.live
   FROM consumption c JOIN workspaces w ON w.workspace_id = c.workspace_id
  WHERE c.org_id = ANY($1) AND (c.org_id, c.workspace_id, c.product) > ($2, $3, $4)
  ORDER BY c.org_id, c.workspace_id, c.product
  LIMIT $5";

type PoolRow = (
    String,
    String,
    i64,
    i64,
    bool,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
);
type WorkspaceRow = (
    String,
    String,
    String,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    bool,
);

impl Store {
    /// Up to `limit` organizations after `after`, in `org_id` order.
    pub async fn organizations_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT org_id FROM organizations WHERE org_id > $1 ORDER BY org_id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many keys the state has: every pool and every workspace-product.
    pub async fn state_keys(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM pools) + (SELECT count(*) FROM consumption)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(count.max(0) as u64)
    }

    /// Queues the current state of every pool and workspace-product of `orgs` in the
    /// outbox, in one transaction holding their locks, at most `page` messages per outbox
    /// row; `progress` hears how many keys each row held.
    pub async fn queue_state_of(
        &self,
        orgs: &[String],
        page: i64,
        mut progress: impl FnMut(u64),
    ) -> Result<Queued, StoreError> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query(LOCK_ORGANIZATIONS)
            .bind(orgs)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(FIRST_POOL_VERSIONS)
            .bind(orgs)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(FIRST_WORKSPACE_VERSIONS)
            .bind(orgs)
            .execute(&mut *transaction)
            .await?;
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *transaction)
            .await?;
        let mut queued = Queued::default();

        let pools: Vec<PoolRow> = sqlx::query_as(POOL_STATES)
            .bind(orgs)
            .fetch_all(&mut *transaction)
            .await?;
        let seen = pools.len() as u64;
        let mut messages = Vec::with_capacity(pools.len());
        for row in pools {
            let (org, product, available, pending, unlimited, granted, transferred) =
                (row.0, row.1, row.2, row.3, row.4, row.5, row.6);
            let (expired, revoked, version, cause) = (row.7, row.8, row.9, row.10);
            let Some(caused_by) = cause else {
                queued.skipped += 1;
                continue;
            };
            let change = StateChange {
                key: StateKey::Pool {
                    org_id: parse(OrgId::parse(&org))?,
                    product: parse(Product::parse(&product))?,
                },
                body: StateBody::Pool(PoolState {
                    available,
                    pending,
                    unlimited,
                    granted,
                    transferred,
                    expired,
                    revoked,
                }),
                version,
                updated_at: now,
                caused_by: parse(EventId::parse(&caused_by))?,
            };
            messages.push(state_message(&change, None, true));
            queued.pools += 1;
        }
        if let Some(row) = super::outbox::insert(&mut transaction, &[], &messages).await? {
            queued.last_row = Some(row);
        }
        progress(seen);

        let mut after = (String::new(), String::new(), String::new());
        loop {
            let rows: Vec<WorkspaceRow> = sqlx::query_as(WORKSPACE_STATES)
                .bind(orgs)
                .bind(&after.0)
                .bind(&after.1)
                .bind(&after.2)
                .bind(page)
                .fetch_all(&mut *transaction)
                .await?;
            let Some(last) = rows.last() else {
                break;
            };
            after = (last.0.clone(), last.1.clone(), last.2.clone());
            let full = rows.len() as i64 == page;
            let seen = rows.len() as u64;
            let mut messages = Vec::with_capacity(rows.len());
            for (org, workspace, product, required, allocated, version, cause, name, live) in rows {
                let Some(caused_by) = cause else {
                    queued.skipped += 1;
                    continue;
                };
                let change = StateChange {
                    key: StateKey::Workspace {
                        org_id: parse(OrgId::parse(&org))?,
                        workspace_id: parse(WorkspaceId::parse(&workspace))?,
                        product: parse(Product::parse(&product))?,
                    },
                    body: StateBody::Workspace(WorkspaceCounts {
                        required,
                        allocated,
                    }),
                    version,
                    updated_at: now,
                    caused_by: parse(EventId::parse(&caused_by))?,
                };
                messages.push(state_message(&change, name.as_deref(), live));
                queued.workspaces += 1;
            }
            if let Some(row) = super::outbox::insert(&mut transaction, &[], &messages).await? {
                queued.last_row = Some(row);
            }
            progress(seen);
            if !full {
                break;
            }
        }
        transaction.commit().await?;
        Ok(queued)
    }
}

fn state_message(change: &StateChange, name: Option<&str>, live: bool) -> OutboxMessage {
    OutboxMessage::new(
        Channel::State,
        Some(change.key.to_json()),
        &StateMessage::new(change, name, live),
    )
}
