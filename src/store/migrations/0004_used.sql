-- When each note and pull request head was last written or read: those
-- unused for `job_retention` are pruned (a row from before starts now).
ALTER TABLE notes ADD COLUMN used_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE heads ADD COLUMN used_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX notes_used ON notes (used_at);
CREATE INDEX heads_used ON heads (used_at);
CREATE INDEX redeliveries_asked ON redeliveries (asked_at);
