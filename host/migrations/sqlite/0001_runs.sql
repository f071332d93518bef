-- Every run: who ran it (to mark it interrupted if that process died), the
-- flow as it was run, and its summary once it ended.
CREATE TABLE runs (
    id          TEXT PRIMARY KEY NOT NULL,
    flow        TEXT NOT NULL,
    flow_hash   TEXT NOT NULL,
    flow_text   TEXT NOT NULL,
    flow_origin TEXT NOT NULL,
    input       TEXT NOT NULL,
    status      TEXT NOT NULL,
    owner_pid   INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    summary     TEXT
);

-- Listing is newest first, by flow, by state, or both; a page continues
-- from the run it ended on.
CREATE INDEX runs_by_start ON runs (started_at DESC, id DESC);
CREATE INDEX runs_by_flow ON runs (flow, started_at DESC, id DESC);
CREATE INDEX runs_by_status ON runs (status, started_at DESC, id DESC);
