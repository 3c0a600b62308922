//! Rules 2 and 3: a participant's state is its latest event by (`occurred_at`, then
//! `event_id`), and a participant counts toward its workspace's seats unless that latest
//! event is a cancellation by someone who never activated the app.

use chrono::{DateTime, Utc};

use super::book::{Book, ParticipantRecord, Verdict};
use super::commands::Command;
use super::ids::{EventId, ParticipantId, Product, WorkspaceId};

/// Rule 3, in one place: who counts toward the workspace's seats.
///
/// `cancellation` is None for a participant-added event and `Some(activated)` for a
/// cancellation.
pub fn counts(cancellation: Option<bool>) -> bool {
    // An added participant counts; a cancelled one counts only if it had activated the
    // app, because then the seat was used.
    cancellation.unwrap_or(true)
}

/// Rule 2, in one place: whether an event at (`occurred_at`, `event_id`) is newer than the
/// latest one recorded. Equal keys are the same event seen again.
pub fn is_newer(
    occurred_at: DateTime<Utc>,
    event_id: &EventId,
    latest: &ParticipantRecord,
) -> bool {
    (occurred_at, event_id) > (latest.last_event_at, &latest.last_event_id)
}

impl Book {
    pub(crate) fn record_participant_event(
        &mut self,
        command: &Command,
        workspace_id: &WorkspaceId,
        participant_id: &ParticipantId,
        cancellation: Option<bool>,
        now: DateTime<Utc>,
    ) -> Verdict {
        let key = (workspace_id.clone(), participant_id.clone());
        let (counted_before, is_new) = match self.participants.get(&key) {
            Some(latest) if latest.last_event_id == command.event_id => return Verdict::Duplicate,
            Some(latest) if !is_newer(command.occurred_at, &command.event_id, latest) => {
                return Verdict::Stale
            }
            Some(latest) => (latest.counted, latest.is_new),
            None => (false, true),
        };
        let counted_after = counts(cancellation);
        self.participants.insert(
            key,
            ParticipantRecord {
                last_event_at: command.occurred_at,
                last_event_id: command.event_id.clone(),
                counted: counted_after,
                is_new,
                dirty: true,
            },
        );
        if counted_before != counted_after {
            let seat = Product::seat();
            let consumption = self.consumption_mut(workspace_id, &seat, &command.org_id);
            consumption.required += if counted_after { 1 } else { -1 };
            debug_assert!(consumption.required >= 0, "required never goes below 0");
            consumption.last_cause = Some(command.event_id.clone());
            consumption.dirty = true;
            // Rule 5: seats move by themselves, in the same transaction as the event.
            self.top_up(workspace_id, &seat, &command.org_id, &command.event_id, now);
        }
        Verdict::Applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_participants_count() {
        assert!(counts(None));
    }

    #[test]
    fn cancelled_participants_who_activated_still_count() {
        assert!(counts(Some(true)));
    }

    #[test]
    fn cancelled_participants_who_never_activated_do_not_count() {
        assert!(!counts(Some(false)));
    }

    #[test]
    fn later_events_win_and_event_id_breaks_ties() {
        let at = |second: i64| DateTime::from_timestamp(1_800_000_000 + second, 0).unwrap();
        let latest = ParticipantRecord {
            last_event_at: at(10),
            last_event_id: EventId::parse("m").unwrap(),
            counted: true,
            is_new: false,
            dirty: false,
        };
        assert!(is_newer(at(11), &EventId::parse("a").unwrap(), &latest));
        assert!(!is_newer(at(9), &EventId::parse("z").unwrap(), &latest));
        assert!(is_newer(at(10), &EventId::parse("n").unwrap(), &latest));
        assert!(!is_newer(at(10), &EventId::parse("l").unwrap(), &latest));
        assert!(!is_newer(at(10), &EventId::parse("m").unwrap(), &latest));
    }
}
