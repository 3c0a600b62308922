//! Rule 4, tenancy: a workspace belongs to the organization of the first accepted event
//! that names it; an event naming it under another organization is refused and changes
//! nothing.

use super::book::Book;
use super::ids::{OrgId, WorkspaceId};

impl Book {
    /// True when `org_id` may name the workspace: it owns it, or nobody does yet.
    pub(crate) fn may_name(&self, workspace_id: &WorkspaceId, org_id: &OrgId) -> bool {
        self.owners
            .get(workspace_id)
            .is_none_or(|owner| owner == org_id)
    }

    /// Records the owner of a workspace named by an accepted event, if it had none.
    pub(crate) fn claim(&mut self, workspace_id: &WorkspaceId, org_id: &OrgId) {
        if !self.owners.contains_key(workspace_id) {
            self.owners.insert(workspace_id.clone(), org_id.clone());
            self.new_claims.push((workspace_id.clone(), org_id.clone()));
        }
    }
}
