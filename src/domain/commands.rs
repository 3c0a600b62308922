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
    /// Rule 13: the workspace's whole life as the event platform sees it now. The latest
    /// such event of a workspace replaces everything an earlier one said; a field it does
    /// not carry is not set.
    WorkspaceUpdated {
        workspace_id: WorkspaceId,
        /// What people call the workspace: 1 to 256 characters.
        name: Option<String>,
        starts_at: Option<DateTime<Utc>>,
        /// When the workspace ends; after `starts_at` when both are given.
        ends_at: Option<DateTime<Utc>>,
        /// False when the event carries no `archived`.
        archived: bool,
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

/// How a module moves into the workspaces that enable it (rule 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Assignment {
    /// From the pool, by itself, the way seats move.
    Automatic,
    /// Only by a person's transfer: an enabled module waits in a shortfall until then.
    Manual,
}

impl Assignment {
    pub fn as_str(self) -> &'static str {
        match self {
            Assignment::Automatic => "automatic",
            Assignment::Manual => "manual",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "automatic" => Assignment::Automatic,
            "manual" => Assignment::Manual,
            _ => return None,
        })
    }
}

/// A `product-defined` event (rule 14): a product's name, description and, for a module,
/// its assignment. It names no organization: the catalogue is the same for all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductDefined {
    pub event_id: EventId,
    pub occurred_at: DateTime<Utc>,
    pub product: Product,
    /// What people call the product: 1 to 256 characters.
    pub name: String,
    /// At most 2,000 characters.
    pub description: Option<String>,
    /// None for `seat`, which always moves by itself (the decoder refuses one), and for a
    /// module whose assignment `modules.auto_assign` decides.
    pub assignment: Option<Assignment>,
}

/// One accepted input: an organization's command, or a definition of the catalogue, which
/// belongs to no organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Command(Command),
    ProductDefined(ProductDefined),
}

impl Input {
    pub fn event_id(&self) -> &EventId {
        match self {
            Input::Command(command) => &command.event_id,
            Input::ProductDefined(definition) => &definition.event_id,
        }
    }

    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Input::Command(command) => command.occurred_at,
            Input::ProductDefined(definition) => definition.occurred_at,
        }
    }

    /// The organization the input belongs to; None for the catalogue's.
    pub fn org_id(&self) -> Option<&OrgId> {
        match self {
            Input::Command(command) => Some(&command.org_id),
            Input::ProductDefined(_) => None,
        }
    }
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
            | CommandBody::TransferRequested { workspace_id, .. }
            | CommandBody::WorkspaceUpdated { workspace_id, .. } => Some(workspace_id),
            CommandBody::EntitlementGranted { .. } | CommandBody::EntitlementRevoked { .. } => None,
        }
    }

    /// The product the command names, if any: the one whose pool or policy it may touch.
    pub fn product(&self) -> Option<&Product> {
        match &self.body {
            CommandBody::ModuleEnabled { module, .. } => Some(module),
            CommandBody::EntitlementGranted { product, .. }
            | CommandBody::TransferRequested { product, .. } => Some(product),
            CommandBody::EntitlementRevoked {
                target: RevocationTarget::Source { product, .. },
                ..
            } => product.as_ref(),
            CommandBody::ParticipantAdded { .. }
            | CommandBody::ParticipantCancelled { .. }
            | CommandBody::EntitlementRevoked { .. }
            | CommandBody::WorkspaceUpdated { .. } => None,
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
    /// stored set; participant, module and workspace-updated events are idempotent by their
    /// own ordering and need no set.
    pub fn needs_deduplication(&self) -> bool {
        matches!(
            self.body,
            CommandBody::EntitlementGranted { .. }
                | CommandBody::TransferRequested { .. }
                | CommandBody::EntitlementRevoked { .. }
        )
    }
}
