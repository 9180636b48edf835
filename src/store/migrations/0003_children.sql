-- A job's children (`[job] delegate`): listed by their parent, newest first.
CREATE INDEX jobs_parent_seq ON jobs ((record->>'parent'), seq) WHERE record->>'parent' IS NOT NULL;
