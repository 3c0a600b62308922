//! The commands the core understands: one per input topic, already validated.

use chrono::{DateTime, Utc};

use super::ids::{EventId, OrgId, ParticipantId, Product, Quantity, WorkspaceId};

/// One accepted input event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub event_id: EventId,
    pub occurred_at: DateTime<Utc>,
    pub org_id: OrgId,
    pub body: CommandBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandBody {
    ParticipantAdded {
        workspace_id: WorkspaceId,
        participant_id: ParticipantId,
    },
    ParticipantCancelled {
        workspace_id: WorkspaceId,
        participant_id: ParticipantId,
        /// Whether the participant had activated the app; if so, it still counts.
        activated: bool,
    },
    ModuleEnabled {
        workspace_id: WorkspaceId,
        /// Never `seat`: the decoder refuses it.
        module: Product,
    },
    EntitlementGranted {
        product: Product,
        /// How many units, or unlimited (rule 12).
        units: GrantUnits,
        /// When the units become available; `occurred_at` when the grant names none.
        valid_from: Option<DateTime<Utc>>,
        expires_at: Option<DateTime<Utc>>,
        source: Option<GrantSource>,
    },
    TransferRequested {
        workspace_id: WorkspaceId,
        product: Product,
        quantity: Quantity,
        requested_by: Actor,
    },
    /// Rule 11: removes units of one grant, or of every grant of a source, that are still
    /// in the pool or not yet valid.
    EntitlementRevoked {
        target: RevocationTarget,
        /// Why, for the people reading the ledger; at most 256 characters.
        reason: Option<String>,
    },
}

/// What a grant brings to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantUnits {
    /// A number of counted units.
    Counted(Quantity),
    /// No limit while the grant is valid (rule 12).
    Unlimited,
}

/// What a revocation removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationTarget {
    /// One grant, by its `event_id`: at most `quantity` of its units, all that are left
    /// without one.
    Grant {
        grant_id: EventId,
        quantity: Option<Quantity>,
    },
    /// Every grant of the source (of `product` only, when given) whose `occurred_at` is not
    /// after the revocation's own.
    Source {
        source: GrantSource,
        product: Option<Product>,
    },
}

/// Where a grant came from (a purchase, a plan, an add-on, a trial...), kept for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSource {
    pub kind: String,
    pub reference: String,
}

/// The person behind a manual transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub user_id: String,
    pub role: String,
}

impl Command {
    /// The workspace the command names, if any; the one tenancy is checked on.
    pub fn workspace_id(&self) -> Option<&WorkspaceId> {
        match &self.body {
            CommandBody::ParticipantAdded { workspace_id, .. }
            | CommandBody::ParticipantCancelled { workspace_id, .. }
            | CommandBody::ModuleEnabled { workspace_id, .. }
            | CommandBody::TransferRequested { workspace_id, .. } => Some(workspace_id),
            CommandBody::EntitlementGranted { .. } | CommandBody::EntitlementRevoked { .. } => None,
        }
    }

    /// The participant the command names, if any.
    pub fn participant(&self) -> Option<(&WorkspaceId, &ParticipantId)> {
        match &self.body {
            CommandBody::ParticipantAdded {
                workspace_id,
                participant_id,
            }
            | CommandBody::ParticipantCancelled {
                workspace_id,
                participant_id,
                ..
            } => Some((workspace_id, participant_id)),
            _ => None,
        }
    }

    /// Grants, transfer requests and revocations are deduplicated by `event_id` through a
    /// stored set;
    /// participant and module events are idempotent by their own ordering and need no set.
    pub fn needs_deduplication(&self) -> bool {
        matches!(
            self.body,
            CommandBody::EntitlementGranted { .. }
                | CommandBody::TransferRequested { .. }
                | CommandBody::EntitlementRevoked { .. }
        )
    }
}
