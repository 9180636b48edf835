-- baton's tables on PostgreSQL. Records are the domain's JSON (as on sled);
-- the columns beside them are what queries filter, order or lock on.

CREATE SEQUENCE job_seq;

CREATE TABLE deliveries (
    id          text PRIMARY KEY,
    received_at timestamptz NOT NULL,
    -- A hash of the event and signed body: the same body again is a replay.
    fingerprint text UNIQUE,
    record      jsonb NOT NULL
);
CREATE INDEX deliveries_received ON deliveries (received_at);

CREATE TABLE jobs (
    id          text PRIMARY KEY,
    seq         bigint NOT NULL,
    state       text NOT NULL,
    trigger     text NOT NULL,
    repo        text,
    finished_at timestamptz,
    record      jsonb NOT NULL
);
CREATE INDEX jobs_seq ON jobs (seq);
CREATE INDEX jobs_state_seq ON jobs (state, seq);

-- Queued jobs only: highest priority first, then arrival.
CREATE TABLE queue (
    id       text PRIMARY KEY,
    priority smallint NOT NULL,
    seq      bigint NOT NULL,
    agent    text NOT NULL,
    repo     text
);
CREATE INDEX queue_order ON queue (priority DESC, seq);

-- Running jobs: which replica runs each, until when its lease holds.
CREATE TABLE running (
    id          text PRIMARY KEY,
    replica     text NOT NULL,
    lease_until timestamptz NOT NULL,
    agent       text NOT NULL,
    repo        text
);

CREATE TABLE groups (name text PRIMARY KEY, state jsonb NOT NULL);
CREATE TABLE throttles (key text PRIMARY KEY, runs jsonb NOT NULL);
CREATE TABLE held (subject text PRIMARY KEY, list jsonb NOT NULL);
CREATE TABLE cancels (id text PRIMARY KEY, by_job text NOT NULL);
CREATE TABLE ends (id text PRIMARY KEY);

-- Publications not yet delivered; a replica leases one while it sends it.
CREATE TABLE outbox (
    job         text NOT NULL,
    purpose     text NOT NULL,
    record      jsonb NOT NULL,
    lease_by    text,
    lease_until timestamptz,
    PRIMARY KEY (job, purpose)
);

CREATE TABLE heads (subject text PRIMARY KEY, value text NOT NULL, updated_at text NOT NULL);
CREATE TABLE agents (replica text NOT NULL, job text NOT NULL, process jsonb NOT NULL, PRIMARY KEY (replica, job));
CREATE TABLE schedules (trigger text PRIMARY KEY, last_fired timestamptz NOT NULL);
CREATE TABLE redeliveries (guid text PRIMARY KEY, asked_at timestamptz NOT NULL DEFAULT now());

-- Job logs in chunks, so any replica can serve any job's log.
CREATE TABLE job_logs (job text NOT NULL, start_at bigint NOT NULL, chunk bytea NOT NULL, PRIMARY KEY (job, start_at));
