-- The host's own events (plugins, caches, the optimizer), newest first:
-- the dashboard's plugin page reads them by type.
CREATE INDEX events_of_the_host ON events (type, id) WHERE run_id IS NULL;
