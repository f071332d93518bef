-- Every event a host sent: a run's (run_id set), written with the run's
-- end, or the host's own (plugins, caches, the optimizer).
CREATE TABLE events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id   TEXT,
    sequence INTEGER NOT NULL,
    type     TEXT NOT NULL,
    time     TEXT NOT NULL,
    event    TEXT NOT NULL
);
CREATE INDEX events_by_run ON events (run_id, sequence);

-- The metrics document every 10 s while runs end: the dashboard's time
-- series.
CREATE TABLE metrics (
    at       INTEGER PRIMARY KEY NOT NULL,
    document TEXT NOT NULL
);

-- Each step's recent duration (a moving average): what the critical path
-- is estimated from. Replaces history.json beside the cache.
CREATE TABLE durations (
    flow TEXT NOT NULL,
    step TEXT NOT NULL,
    ms   REAL NOT NULL,
    PRIMARY KEY (flow, step)
);

-- How often each plugin and asset was used: what a host preloads.
-- Replaces uses.json beside the cache.
CREATE TABLE uses (
    key   TEXT PRIMARY KEY NOT NULL,
    count INTEGER NOT NULL
);
