//! `entitlement-worker report`: an organization's pools, where their units came from (by
//! source: plan, add-on, subscription, trial, manual), and its workspaces' consumption,
//! live workspaces before past ones (rule 13) and those missing entitlements first, its
//! products by their catalogue names (rule 14).

use chrono::{DateTime, Duration, Utc};
use futures::stream::{BoxStream, StreamExt as _};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::cell;

/// How far ahead `expiring_soon` looks.
pub const EXPIRY_HORIZON_DAYS: i64 = 30;

/// The open pool warnings of one organization, `low` first, then `expiring` by expiry.
const OPEN_WARNINGS: &str =
    "SELECT w.product, COALESCE(p.name, w.product) AS product_name, w.kind, w.available,
            w.threshold, NULLIF(w.grant_id, '') AS grant_id, w.units, w.expires_at, w.opened_at
       FROM pool_warnings w
       LEFT JOIN products p ON p.product = w.product
      WHERE w.org_id = $1 AND w.open
      ORDER BY w.kind DESC, w.expires_at NULLS FIRST, w.product, w.grant_id";

/// The report, as `--format json` prints it. Field names are a stable interface.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub org_id: String,
    pub generated_at: DateTime<Utc>,
    pub pools: Vec<PoolLine>,
    /// The pool warnings open now (rule 15): `low` first, then `expiring` by expiry.
    pub warnings: Vec<WarningLine>,
    pub sources: Vec<SourceLine>,
    pub workspaces: Vec<WorkspaceLine>,
    pub totals: Vec<ProductTotals>,
    /// The catalogue's definitions of the report's products that were defined, seat first.
    pub products: Vec<ProductLine>,
}

/// A product as the catalogue defines it (rule 14).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProductLine {
    pub product: String,
    pub name: String,
    pub description: Option<String>,
    /// `automatic` or `manual`; None: `modules.auto_assign` decides (always for `seat`).
    pub assignment: Option<String>,
}

/// One pool: what was granted, what left it and how, what is in it now.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct PoolLine {
    pub product: String,
    /// The product's name in the catalogue; its handle when it was never defined.
    pub product_name: String,
    pub granted: i64,
    pub transferred: i64,
    pub expired: i64,
    pub revoked: i64,
    /// Counted units in the pool now, ready to be transferred.
    pub available: i64,
    /// An unlimited grant of the product is valid now: it has no limit (rule 12).
    pub unlimited: bool,
    /// Of `available`, the units whose grant expires within 30 days.
    pub expiring_soon: i64,
    /// Units granted whose validity has not started yet (not in `granted`).
    pub pending: i64,
}

/// An open pool warning, as last published (rule 15).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct WarningLine {
    pub product: String,
    /// The product's name in the catalogue; its handle when it was never defined.
    pub product_name: String,
    /// `low` or `expiring`.
    pub kind: String,
    /// `low`: the pool's available counted units and its threshold.
    pub available: Option<i64>,
    pub threshold: Option<i64>,
    /// `expiring`: the grant, its units still in the pool and when they expire.
    pub grant_id: Option<String>,
    pub units: Option<i64>,
    pub expires_at: Option<DateTime<Utc>>,
    pub opened_at: DateTime<Utc>,
}

/// Where a pool's units came from: its grants of one source kind, counted or unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct SourceLine {
    pub product: String,
    /// The product's name in the catalogue; its handle when it was never defined.
    pub product_name: String,
    /// `plan`, `add_on`, `subscription`, `trial`, `manual`, or `none` for grants without
    /// a source.
    pub source: String,
    /// A line of unlimited grants: `granted`, `revoked`, `expired` and `available` count
    /// no units then, `used` is what they gave.
    pub unlimited: bool,
    /// For a line of unlimited grants: one of them is valid now.
    pub unlimited_now: bool,
    /// Counted units of the grants that became valid.
    pub granted: i64,
    /// Units transferred to workspaces from these grants.
    pub used: i64,
    pub revoked: i64,
    pub expired: i64,
    /// Counted units still in the pool.
    pub available: i64,
    /// Counted units of grants not valid yet.
    pub pending: i64,
}

/// One workspace's consumption of one product.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkspaceLine {
    pub workspace_id: String,
    /// The name its latest `workspace-updated` gave it, if any (rule 13).
    pub name: Option<String>,
    /// Live, or past: ended or archived (rule 13). A workspace never updated is live.
    pub live: bool,
    pub product: String,
    /// The product's name in the catalogue; its handle when it was never defined.
    pub product_name: String,
    pub required: i64,
    pub allocated: i64,
    pub missing: i64,
    /// When the current shortfall opened, if there is one.
    pub missing_since: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProductTotals {
    pub product: String,
    /// The product's name in the catalogue; its handle when it was never defined.
    pub product_name: String,
    pub required: i64,
    pub allocated: i64,
    pub missing: i64,
    pub workspaces_missing: i64,
}

impl Report {
    /// Reads the report of `org_id` as of `now`.
    pub async fn load(pool: &PgPool, org_id: &str, now: DateTime<Utc>) -> anyhow::Result<Self> {
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM organizations WHERE org_id = $1)")
                .bind(org_id)
                .fetch_one(pool)
                .await?;
        anyhow::ensure!(known, "no organization {org_id:?} is known to the worker");
        let mut connection = pool.acquire().await?;
        let pools = pool_lines(&mut connection, org_id, now).await?;
        let warnings: Vec<WarningLine> = sqlx::query_as(OPEN_WARNINGS)
            .bind(org_id)
            .fetch_all(&mut *connection)
            .await?;
        let sources = source_lines(&mut connection, org_id).await?;
        let workspaces: Vec<WorkspaceLine> = workspace_lines(&mut connection, org_id, None)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut totals: Vec<ProductTotals> = Vec::new();
        for line in &workspaces {
            let index = match totals
                .iter()
                .position(|total| total.product == line.product)
            {
                Some(index) => index,
                None => {
                    totals.push(ProductTotals {
                        product: line.product.clone(),
                        product_name: line.product_name.clone(),
                        required: 0,
                        allocated: 0,
                        missing: 0,
                        workspaces_missing: 0,
                    });
                    totals.len() - 1
                }
            };
            let total = &mut totals[index];
            total.required += line.required;
            total.allocated += line.allocated;
            total.missing += line.missing;
            total.workspaces_missing += i64::from(line.missing > 0);
        }
        totals.sort_by(|a, b| product_order(&a.product, &b.product));
        let mut handles: Vec<&str> = pools.iter().map(|line| line.product.as_str()).collect();
        handles.extend(totals.iter().map(|total| total.product.as_str()));
        let products = product_lines(&mut connection, &handles).await?;
        Ok(Self {
            org_id: org_id.to_owned(),
            generated_at: now,
            pools,
            warnings,
            sources,
            workspaces,
            totals,
            products,
        })
    }

    /// The report as a table that fits an 80-column terminal.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Entitlements of {} at {}\n\n",
            self.org_id,
            self.generated_at.format("%Y-%m-%d %H:%M UTC")
        ));
        out.push_str("POOLS (counted units; \"unlimited\" while an unlimited grant is valid)\n");
        out.push_str(&format!(
            "{} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}\n",
            cell("product", 16),
            "granted",
            "moved",
            "expired",
            "revoked",
            "available",
            "exp. 30d",
            "pending"
        ));
        for line in &self.pools {
            let available = if line.unlimited {
                "unlimited".to_owned()
            } else {
                line.available.to_string()
            };
            out.push_str(&format!(
                "{} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}\n",
                cell(&line.product_name, 16),
                line.granted,
                line.transferred,
                line.expired,
                line.revoked,
                available,
                line.expiring_soon,
                line.pending
            ));
        }
        if self.pools.is_empty() {
            out.push_str("(no grants yet)\n");
        }
        if !self.warnings.is_empty() {
            out.push_str("\nWARNINGS (open)\n");
            for warning in &self.warnings {
                let says = crate::codec::warning_numbers(
                    warning.available,
                    warning.threshold,
                    warning.grant_id.as_deref(),
                    warning.units,
                    warning.expires_at,
                );
                out.push_str(&format!(
                    "{} {}: {says} (since {})\n",
                    cell(&warning.product_name, 16),
                    warning.kind,
                    warning.opened_at.format("%Y-%m-%d %H:%M UTC")
                ));
            }
        }
        out.push_str("\nSOURCES (where each pool's units came from)\n");
        out.push_str(&format!(
            "{} {} {:>9} {:>7} {:>7} {:>7} {:>9} {:>7}\n",
            cell("product", 14),
            cell("source", 12),
            "granted",
            "used",
            "revoked",
            "expired",
            "available",
            "pending"
        ));
        for line in &self.sources {
            let (granted, revoked, expired, available) = if line.unlimited {
                let now = if line.unlimited_now {
                    "unlimited"
                } else {
                    "ended"
                };
                (
                    "unlimited".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    now.to_owned(),
                )
            } else {
                (
                    line.granted.to_string(),
                    line.revoked.to_string(),
                    line.expired.to_string(),
                    line.available.to_string(),
                )
            };
            out.push_str(&format!(
                "{} {} {:>9} {:>7} {:>7} {:>7} {:>9} {:>7}\n",
                cell(&line.product_name, 14),
                cell(&line.source, 12),
                granted,
                line.used,
                revoked,
                expired,
                available,
                line.pending
            ));
        }
        for (live, title) in [
            (true, "LIVE WORKSPACES (missing entitlements first)"),
            (
                false,
                "PAST WORKSPACES (ended or archived; missing entitlements first)",
            ),
        ] {
            let lines: Vec<&WorkspaceLine> = self
                .workspaces
                .iter()
                .filter(|line| line.live == live)
                .collect();
            // Past workspaces are shown only when there are some: most organizations have
            // none for a while.
            if !live && lines.is_empty() {
                continue;
            }
            out.push_str(&format!("\n{title}\n"));
            out.push_str(&format!(
                "  {} {} {:>9} {:>9} {:>8}\n",
                cell("workspace", 28),
                cell("product", 16),
                "required",
                "allocated",
                "missing"
            ));
            for line in &lines {
                out.push_str(&format!(
                    "{} {} {} {:>9} {:>9} {:>8}\n",
                    if line.missing > 0 { "!" } else { " " },
                    cell(line.name.as_deref().unwrap_or(&line.workspace_id), 28),
                    cell(&line.product_name, 16),
                    line.required,
                    line.allocated,
                    line.missing
                ));
            }
            if self.workspaces.is_empty() {
                out.push_str("  (no workspaces yet)\n");
            } else if lines.is_empty() {
                out.push_str("  (no live workspaces)\n");
            }
        }
        out.push_str("\nTOTALS\n");
        for total in &self.totals {
            out.push_str(&format!(
                "  {} required {}, allocated {}, missing {} in {} workspace(s)\n",
                cell(&total.product_name, 16),
                total.required,
                total.allocated,
                total.missing,
                total.workspaces_missing
            ));
        }
        if !self.products.is_empty() {
            // The tables show the catalogue's names; this says which handle each stands for.
            out.push_str("\nPRODUCTS (names from the catalogue)\n");
            for line in &self.products {
                let assignment = line
                    .assignment
                    .as_deref()
                    .map_or(String::new(), |assignment| format!(", {assignment}"));
                out.push_str(&format!(
                    "  {} {}{assignment}\n",
                    cell(&line.product, 16),
                    line.name
                ));
            }
        }
        out
    }
}

/// `seat` first, then modules by name.
fn product_order(a: &str, b: &str) -> std::cmp::Ordering {
    (a != "seat", a).cmp(&(b != "seat", b))
}

/// The organization's pools, seat first.
pub async fn pool_lines(
    connection: &mut PgConnection,
    org_id: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<PoolLine>> {
    let horizon = now + Duration::days(EXPIRY_HORIZON_DAYS);
    Ok(sqlx::query_as(
        "SELECT p.product, COALESCE(c.name, p.product) AS product_name,
                p.granted_total AS granted, p.transferred_total AS transferred,
                p.expired_total AS expired, p.revoked_total AS revoked, p.available,
                p.unlimited,
                COALESCE((SELECT sum(l.remaining) FROM lots l
                          WHERE l.org_id = p.org_id AND l.product = p.product
                            AND l.status = 'active' AND l.expires_at <= $2), 0)::bigint
                    AS expiring_soon,
                COALESCE((SELECT sum(l.remaining) FROM lots l
                          WHERE l.org_id = p.org_id AND l.product = p.product
                            AND l.status = 'pending'), 0)::bigint AS pending
           FROM pools p
           LEFT JOIN products c ON c.product = p.product
          WHERE p.org_id = $1
          ORDER BY p.product <> 'seat', p.product",
    )
    .bind(org_id)
    .bind(horizon)
    .fetch_all(connection)
    .await?)
}

/// Where the organization's units came from: per product (seat first) and source kind,
/// counted grants and unlimited grants on lines of their own.
pub async fn source_lines(
    connection: &mut PgConnection,
    org_id: &str,
) -> anyhow::Result<Vec<SourceLine>> {
    Ok(sqlx::query_as(
        "SELECT l.product, COALESCE(c.name, l.product) AS product_name,
                COALESCE(source_kind, 'none') AS source, unlimited,
                bool_or(unlimited AND status = 'active') AS unlimited_now,
                COALESCE(sum(quantity) FILTER (WHERE status <> 'pending'), 0)::bigint AS granted,
                COALESCE(sum(drawn), 0)::bigint AS used,
                COALESCE(sum(revoked), 0)::bigint AS revoked,
                COALESCE(sum(expired), 0)::bigint AS expired,
                COALESCE(sum(remaining) FILTER (WHERE status = 'active'), 0)::bigint AS available,
                COALESCE(sum(remaining) FILTER (WHERE status = 'pending'), 0)::bigint AS pending
           FROM lots l
           LEFT JOIN products c ON c.product = l.product
          WHERE l.org_id = $1
          GROUP BY l.product, c.name, source_kind, unlimited
          ORDER BY l.product <> 'seat', l.product, COALESCE(source_kind, 'none'), unlimited",
    )
    .bind(org_id)
    .fetch_all(connection)
    .await?)
}

/// The organization's (workspace, product) rows, live workspaces first (rule 13), then
/// those missing entitlements (most missing first), then by workspace and product; the
/// first `limit` if given; streamed, for large organizations.
pub fn workspace_lines<'a>(
    connection: &'a mut PgConnection,
    org_id: &'a str,
    limit: Option<u64>,
) -> BoxStream<'a, Result<WorkspaceLine, sqlx::Error>> {
    type Row = (
        String,
        Option<String>,
        bool,
        String,
        String,
        i64,
        i64,
        Option<DateTime<Utc>>,
    );
    sqlx::query_as::<_, Row>(
        "SELECT w.workspace_id, s.name, s.live, w.product, COALESCE(c.name, w.product),
                w.required, w.allocated, w.shortfall_since
           FROM consumption w
           JOIN workspaces s ON s.workspace_id = w.workspace_id
           LEFT JOIN products c ON c.product = w.product
          WHERE w.org_id = $1
          ORDER BY s.live DESC, GREATEST(w.required - w.allocated, 0) DESC, w.workspace_id,
                   w.product <> 'seat', w.product
          LIMIT $2",
    )
    .bind(org_id)
    .bind(limit.map(|limit| i64::try_from(limit).unwrap_or(i64::MAX)))
    .fetch(connection)
    .map(|row| {
        row.map(
            |(
                workspace_id,
                name,
                live,
                product,
                product_name,
                required,
                allocated,
                missing_since,
            )| {
                WorkspaceLine {
                    workspace_id,
                    name,
                    live,
                    product,
                    product_name,
                    required,
                    allocated,
                    missing: (required - allocated).max(0),
                    missing_since,
                }
            },
        )
    })
    .boxed()
}

/// The catalogue's definitions of `handles` that were defined, seat first.
pub async fn product_lines(
    connection: &mut PgConnection,
    handles: &[&str],
) -> anyhow::Result<Vec<ProductLine>> {
    let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT product, name, description, assignment FROM products
          WHERE product = ANY($1)
          ORDER BY product <> 'seat', product",
    )
    .bind(handles)
    .fetch_all(connection)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(product, name, description, assignment)| ProductLine {
            product,
            name,
            description,
            assignment,
        })
        .collect())
}
