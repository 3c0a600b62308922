-- Event ids are the producers' choice, so they are unique only within an organization: two
-- organizations may send the same `event_id`. A grant's lot and the record that an event
-- was applied are therefore keyed by (organization, event id), not by the event id alone
-- (with the old keys the second organization's grant overwrote the first one's lot).

ALTER TABLE lots DROP CONSTRAINT lots_pkey;
ALTER TABLE lots ADD PRIMARY KEY (org_id, lot_id);

-- Events applied before this upgrade get their organization from what they left behind:
-- a grant its lot, a manual transfer its ledger entry. A refused transfer request left
-- nothing: it keeps the organization '' (never a valid id), which the worker reads as
-- "applied, whatever the organization", exactly what it meant before.
ALTER TABLE processed_events ADD COLUMN org_id text NOT NULL DEFAULT '';
UPDATE processed_events p SET org_id = l.org_id FROM lots l WHERE l.lot_id = p.event_id;
UPDATE processed_events p
   SET org_id = t.org_id
  FROM (SELECT DISTINCT ON (caused_by) caused_by, org_id
          FROM ledger WHERE kind = 'manual_transfer'
         ORDER BY caused_by, org_id) AS t
 WHERE p.org_id = '' AND t.caused_by = p.event_id;
ALTER TABLE processed_events ALTER COLUMN org_id DROP DEFAULT;
ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey;
-- The event id first: the worker looks events up by id, then compares the organization.
ALTER TABLE processed_events ADD PRIMARY KEY (event_id, org_id);
