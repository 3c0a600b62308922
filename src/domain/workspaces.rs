//! Rule 13, workspaces have a life: `workspace-updated` sets a workspace's name, dates and
//! archived flag, the latest such event by (`occurred_at`, then `event_id`) replacing
//! everything an earlier one said. A workspace is live until its `ends_at` has passed or
//! it is archived, then past; a workspace never updated is live and has no name. Being
//! past changes nothing else: the workspace keeps what it holds and its participants still
//! count. Tenancy (rule 4) is checked before, like for any event naming a workspace.

use chrono::{DateTime, Utc};

use super::book::{Book, Verdict};
use super::commands::Command;
use super::ids::{EventId, WorkspaceId};

/// Rule 13 in one place: whether a workspace with this life is live at `now`.
pub fn is_live(archived: bool, ends_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    !archived && ends_at.is_none_or(|end| end > now)
}

/// A workspace's life: what its latest `workspace-updated` said, and whether it is live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceLife {
    /// None when the latest event named none.
    pub name: Option<String>,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub archived: bool,
    /// The latest event, which decided the fields above: only a later one by
    /// (`occurred_at`, then `event_id`) replaces them.
    pub last_event_at: DateTime<Utc>,
    pub last_event_id: EventId,
    /// [`is_live`] as of the last time the book looked at the clock for this workspace.
    pub live: bool,
    /// The name and liveness stored before the batch (no name, live, for a workspace that
    /// had no life yet): what [`Book::life_changed`] compares with.
    pub loaded_name: Option<String>,
    pub loaded_live: bool,
    /// True when no life was stored for the workspace before the batch.
    pub is_new: bool,
    pub dirty: bool,
}

impl WorkspaceLife {
    /// A life as stored before the batch.
    #[allow(clippy::too_many_arguments)]
    pub fn stored(
        name: Option<String>,
        starts_at: Option<DateTime<Utc>>,
        ends_at: Option<DateTime<Utc>>,
        archived: bool,
        live: bool,
        last_event_at: DateTime<Utc>,
        last_event_id: EventId,
    ) -> Self {
        Self {
            loaded_name: name.clone(),
            loaded_live: live,
            name,
            starts_at,
            ends_at,
            archived,
            last_event_at,
            last_event_id,
            live,
            is_new: false,
            dirty: false,
        }
    }
}

/// The fields of a `workspace-updated`, as the core takes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LifeUpdate<'a> {
    pub name: Option<&'a str>,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub archived: bool,
}

impl Book {
    /// Applies a `workspace-updated` that is later than the workspace's latest one: its
    /// fields replace the whole life, absent ones meaning not set. The same event again is
    /// a duplicate; an older one that arrives late is stale (rule 2's ordering).
    pub(crate) fn update_life(
        &mut self,
        command: &Command,
        workspace_id: &WorkspaceId,
        update: LifeUpdate<'_>,
        now: DateTime<Utc>,
    ) -> Verdict {
        debug_assert!(
            match (update.starts_at, update.ends_at) {
                (Some(start), Some(end)) => end > start,
                _ => true,
            },
            "the decoder refuses an end that is not after the start"
        );
        let (loaded_name, loaded_live, is_new) = match self.workspaces.get(workspace_id) {
            Some(life) if life.last_event_id == command.event_id => return Verdict::Duplicate,
            Some(life)
                if (command.occurred_at, &command.event_id)
                    <= (life.last_event_at, &life.last_event_id) =>
            {
                return Verdict::Stale
            }
            Some(life) => (life.loaded_name.clone(), life.loaded_live, life.is_new),
            None => (None, true, true),
        };
        self.workspaces.insert(
            workspace_id.clone(),
            WorkspaceLife {
                name: update.name.map(str::to_owned),
                starts_at: update.starts_at,
                ends_at: update.ends_at,
                archived: update.archived,
                last_event_at: command.occurred_at,
                last_event_id: command.event_id.clone(),
                live: is_live(update.archived, update.ends_at, now),
                loaded_name,
                loaded_live,
                is_new,
                dirty: true,
            },
        );
        Verdict::Applied
    }

    /// Brings the workspace's liveness up to `now`: a workspace whose `ends_at` has passed
    /// turns past without any event. Marks the life dirty when it changes; a workspace
    /// without a life in the book stays as it is (live).
    pub fn refresh_life(&mut self, workspace_id: &WorkspaceId, now: DateTime<Utc>) {
        if let Some(life) = self.workspaces.get_mut(workspace_id) {
            let live = is_live(life.archived, life.ends_at, now);
            if live != life.live {
                life.live = live;
                life.dirty = true;
            }
        }
    }

    /// Whether the workspace is live (rule 13); a workspace never updated is.
    pub fn is_live(&self, workspace_id: &WorkspaceId) -> bool {
        self.workspaces
            .get(workspace_id)
            .is_none_or(|life| life.live)
    }

    /// The workspace's name, if its latest `workspace-updated` gave one.
    pub fn workspace_name(&self, workspace_id: &WorkspaceId) -> Option<&str> {
        self.workspaces
            .get(workspace_id)
            .and_then(|life| life.name.as_deref())
    }

    /// The workspaces whose name or liveness differs from what was stored before the
    /// batch, in no particular order: those whose published state must say so.
    pub fn life_changed(&self) -> impl Iterator<Item = &WorkspaceId> {
        self.workspaces
            .iter()
            .filter(|(_, life)| life.name != life.loaded_name || life.live != life.loaded_live)
            .map(|(workspace_id, _)| workspace_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minute: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + minute * 60, 0).unwrap()
    }

    #[test]
    fn a_workspace_is_live_until_it_ends_or_is_archived() {
        assert!(is_live(false, None, at(0)));
        assert!(is_live(false, Some(at(1)), at(0)));
        assert!(
            !is_live(false, Some(at(0)), at(0)),
            "ends_at passed at its instant"
        );
        assert!(!is_live(false, Some(at(0)), at(1)));
        assert!(!is_live(true, None, at(0)));
        assert!(!is_live(true, Some(at(1)), at(0)));
    }
}
