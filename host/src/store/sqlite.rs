//! The embedded run store: one SQLite file, in WAL mode so that readers
//! (the API, `qflow runs`) never wait for the writer, migrated at open.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::HashMap;

use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use crate::model::{
    Durations, Event, MetricsSnapshot, Retention, RunQuery, RunRecord, RunState, RunStore,
    RunSummary, StoreError, StoreWrite,
};

/// The schema's versions, applied in order at open (`host/migrations/sqlite`).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for a lock another process holds (a `qflow
/// run` beside a server) before it fails: long enough for any batch.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A run store in a SQLite file.
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`, applies the migrations it
    /// lacks, and marks as interrupted every run whose process is gone.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_waiting(path, BUSY_TIMEOUT).await
    }

    /// [`SqliteStore::open`], waiting at most `busy` for a lock another
    /// process holds.
    pub async fn open_waiting(path: &Path, busy: Duration) -> Result<SqliteStore, StoreError> {
        let failed = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // With a write-ahead log, NORMAL never corrupts the database and
            // loses nothing when the process dies; only a power loss may
            // take the last commits. It spares every commit an fsync.
            .synchronous(SqliteSynchronous::Normal)
            // Pruned runs give their pages back a few at a time.
            .auto_vacuum(SqliteAutoVacuum::Incremental)
            .busy_timeout(busy);
        // Two processes opening a new file at once would both apply the
        // first migration: the setup below is one process's at a time.
        let _setup = setup_lock(path, busy).await.map_err(|e| failed(&e))?;
        // A handful of readers beside the one writer task.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| failed(&e))?;
        // A file made before incremental vacuum was asked for keeps its old
        // mode until it is vacuumed once.
        let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum")
            .fetch_one(&pool)
            .await
            .map_err(|e| failed(&e))?;
        if mode != 2 {
            sqlx::query("PRAGMA auto_vacuum = INCREMENTAL")
                .execute(&pool)
                .await
                .map_err(|e| failed(&e))?;
            sqlx::query("VACUUM").execute(&pool).await.map_err(|e| failed(&e))?;
        }
        MIGRATOR.run(&pool).await.map_err(|e| failed(&e))?;
        let store = SqliteStore { pool, path: path.to_path_buf() };
        store.mark_interrupted().await.map_err(|e| failed(&e))?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs left `running` by a process that no longer exists never end:
    /// say so. (A process id reused since only delays this to the next
    /// open after that process ends.)
    async fn mark_interrupted(&self) -> Result<(), StoreError> {
        let owners: Vec<i64> =
            sqlx::query_scalar("SELECT DISTINCT owner_pid FROM runs WHERE status = 'running'")
                .fetch_all(&self.pool)
                .await
                .map_err(database)?;
        for pid in owners.into_iter().filter(|&pid| !process_alive(pid)) {
            sqlx::query(
                "UPDATE runs SET status = 'interrupted' WHERE status = 'running' AND owner_pid = ?",
            )
            .bind(pid)
            .execute(&self.pool)
            .await
            .map_err(database)?;
        }
        Ok(())
    }

    async fn write_batch(&self, batch: Vec<StoreWrite>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(database)?;
        for write in batch {
            match write {
                StoreWrite::Started(start) => {
                    sqlx::query(
                        "INSERT OR REPLACE INTO runs (id, flow, flow_hash, flow_text, flow_origin, \
                         input, status, owner_pid, started_at) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                    )
                    .bind(&start.run_id)
                    .bind(&start.flow)
                    .bind(&start.flow_hash)
                    .bind(&start.flow_text)
                    .bind(&start.flow_origin)
                    .bind(start.input.to_string())
                    .bind(i64::from(std::process::id()))
                    .bind(start.started_at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(database)?;
                }
                StoreWrite::Finished { summary, ended_at_ms } => {
                    let text = serde_json::to_string(&summary)
                        .map_err(|e| StoreError::Database(e.to_string()))?;
                    sqlx::query(
                        "UPDATE runs SET status = ?, ended_at = ?, summary = ? WHERE id = ?",
                    )
                    .bind(RunState::from(summary.status).as_str())
                    .bind(ended_at_ms)
                    .bind(text)
                    .bind(&summary.run_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(database)?;
                }
                StoreWrite::Events(events) => {
                    for event in events {
                        let text = serde_json::to_string(&event)
                            .map_err(|e| StoreError::Database(e.to_string()))?;
                        let time = humantime::format_rfc3339_micros(event.time).to_string();
                        sqlx::query(
                            "INSERT INTO events (run_id, sequence, type, time, event) VALUES (?, ?, ?, ?, ?)",
                        )
                        .bind(event.data.run_id())
                        .bind(i64::try_from(event.sequence).unwrap_or(i64::MAX))
                        .bind(event.data.kind())
                        .bind(time)
                        .bind(text)
                        .execute(&mut *tx)
                        .await
                        .map_err(database)?;
                    }
                }
                StoreWrite::Metrics { at_ms, document } => {
                    sqlx::query("INSERT OR REPLACE INTO metrics (at, document) VALUES (?, ?)")
                        .bind(at_ms)
                        .bind(document.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(database)?;
                }
                StoreWrite::Durations { flow, steps } => {
                    for (step, ms) in steps {
                        sqlx::query(
                            "INSERT OR REPLACE INTO durations (flow, step, ms) VALUES (?, ?, ?)",
                        )
                        .bind(&flow)
                        .bind(step)
                        .bind(ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(database)?;
                    }
                }
                StoreWrite::Uses(uses) => {
                    for (key, count) in uses {
                        sqlx::query("INSERT OR REPLACE INTO uses (key, count) VALUES (?, ?)")
                            .bind(key)
                            .bind(i64::try_from(count).unwrap_or(i64::MAX))
                            .execute(&mut *tx)
                            .await
                            .map_err(database)?;
                    }
                }
            }
        }
        tx.commit().await.map_err(database)
    }

    async fn prune_runs(&self, retention: Retention) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut tx = self.pool.begin().await.map_err(database)?;
        if let Some(days) = retention.keep_days {
            let day_ms: i64 = 86_400_000;
            let cutoff = unix_ms()
                .saturating_sub(day_ms.saturating_mul(i64::try_from(days).unwrap_or(i64::MAX)));
            removed += sqlx::query("DELETE FROM runs WHERE started_at < ? AND status != 'running'")
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(database)?
                .rows_affected();
            sqlx::query("DELETE FROM metrics WHERE at < ?")
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(database)?;
        }
        if let Some(keep) = retention.keep_runs {
            // Everything older than the run that is `keep`-th newest.
            removed += sqlx::query(
                "DELETE FROM runs WHERE status != 'running' AND (started_at, id) < \
                 (SELECT started_at, id FROM runs ORDER BY started_at DESC, id DESC LIMIT 1 OFFSET ?)",
            )
            .bind(i64::try_from(keep.saturating_sub(1)).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(database)?
            .rows_affected();
        }
        if removed > 0 {
            sqlx::query(
                "DELETE FROM events WHERE run_id IS NOT NULL AND run_id NOT IN (SELECT id FROM runs)",
            )
            .execute(&mut *tx)
            .await
            .map_err(database)?;
        }
        tx.commit().await.map_err(database)?;
        if removed > 0 {
            // Give the freed pages back to the file system, a few at a time
            // so that no writer waits long behind it.
            sqlx::query("PRAGMA incremental_vacuum(2000)")
                .execute(&self.pool)
                .await
                .map_err(database)?;
        }
        Ok(removed)
    }

    /// How SQLite reads the runs `query` asks for, line by line (`EXPLAIN
    /// QUERY PLAN`): listing must go through an index, however many runs
    /// there are.
    #[doc(hidden)]
    pub async fn listing_plan(&self, query: &RunQuery) -> Result<Vec<String>, StoreError> {
        let sql = format!("EXPLAIN QUERY PLAN {}", listing_sql(query));
        let rows =
            bind_listing(sqlx::query(&sql), query).fetch_all(&self.pool).await.map_err(database)?;
        rows.iter().map(|row| row.try_get::<String, _>("detail").map_err(database)).collect()
    }

    async fn fetch_runs(&self, query: RunQuery) -> Result<Vec<RunRecord>, StoreError> {
        let sql = listing_sql(&query);
        let rows = bind_listing(sqlx::query(&sql), &query)
            .fetch_all(&self.pool)
            .await
            .map_err(database)?;
        rows.iter().map(record).collect()
    }
}

/// The listing's SQL. Filters are bound, never spliced in; a page
/// continues strictly after the (start, id) of the run it ended on.
fn listing_sql(query: &RunQuery) -> String {
    {
        let mut sql = String::from(
            "SELECT id, flow, flow_hash, status, started_at, ended_at, input, summary FROM runs WHERE 1 = 1",
        );
        if query.flow.is_some() {
            sql += " AND flow = ?";
        }
        if query.status.is_some() {
            sql += " AND status = ?";
        }
        if query.before.is_some() {
            sql += " AND (started_at, id) < (SELECT started_at, id FROM runs WHERE id = ?)";
        }
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?";
        sql
    }
}

/// The listing's parameters, in the order of [`listing_sql`].
fn bind_listing<'q>(
    mut statement: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    query: &'q RunQuery,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    if let Some(flow) = &query.flow {
        statement = statement.bind(flow);
    }
    if let Some(status) = query.status {
        statement = statement.bind(status.as_str());
    }
    if let Some(before) = &query.before {
        statement = statement.bind(before);
    }
    statement.bind(query.limit)
}

impl RunStore for SqliteStore {
    fn write(&self, batch: Vec<StoreWrite>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write_batch(batch).boxed()
    }

    fn run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Option<RunRecord>, StoreError>> {
        async move {
            let row = sqlx::query(
                "SELECT id, flow, flow_hash, status, started_at, ended_at, input, summary \
                 FROM runs WHERE id = ?",
            )
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(database)?;
            row.as_ref().map(record).transpose()
        }
        .boxed()
    }

    fn runs(&self, query: RunQuery) -> BoxFuture<'_, Result<Vec<RunRecord>, StoreError>> {
        self.fetch_runs(query).boxed()
    }

    fn flow_of<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<(String, String)>, StoreError>> {
        async move {
            sqlx::query_as("SELECT flow_text, flow_origin FROM runs WHERE id = ?")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(database)
        }
        .boxed()
    }

    fn events<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        async move {
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT event FROM events WHERE run_id = ? ORDER BY sequence, id")
                    .bind(run_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(database)?;
            decode_events(rows, &format!("an event of run {run_id}"))
        }
        .boxed()
    }

    fn host_events<'a>(
        &'a self,
        prefix: &'a str,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        async move {
            // A prefix, not a pattern: `%` and `_` in it match themselves.
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT event FROM (SELECT id, event FROM events WHERE run_id IS NULL \
                 AND substr(type, 1, length(?1)) = ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id",
            )
            .bind(prefix)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(database)?;
            decode_events(rows, "a host event")
        }
        .boxed()
    }

    fn metrics(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<MetricsSnapshot>, StoreError>> {
        async move {
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT at, document FROM (SELECT at, document FROM metrics WHERE at >= ? \
                 ORDER BY at DESC LIMIT ?) ORDER BY at",
            )
            .bind(since_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(database)?;
            rows.into_iter()
                .map(|(at_ms, text)| {
                    let document = serde_json::from_str(&text)
                        .map_err(|e| StoreError::Corrupt(format!("a metrics snapshot: {e}")))?;
                    Ok(MetricsSnapshot { at_ms, document })
                })
                .collect()
        }
        .boxed()
    }

    fn durations(&self) -> BoxFuture<'_, Result<Durations, StoreError>> {
        async move {
            let rows: Vec<(String, String, f64)> =
                sqlx::query_as("SELECT flow, step, ms FROM durations")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(database)?;
            let mut durations = Durations::new();
            for (flow, step, ms) in rows {
                durations.entry(flow).or_default().insert(step, ms);
            }
            Ok(durations)
        }
        .boxed()
    }

    fn uses(&self) -> BoxFuture<'_, Result<HashMap<String, u64>, StoreError>> {
        async move {
            let rows: Vec<(String, i64)> = sqlx::query_as("SELECT key, count FROM uses")
                .fetch_all(&self.pool)
                .await
                .map_err(database)?;
            Ok(rows.into_iter().map(|(key, n)| (key, u64::try_from(n).unwrap_or(0))).collect())
        }
        .boxed()
    }

    fn prune(&self, retention: Retention) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.prune_runs(retention).boxed()
    }
}

/// Now, in ms since the Unix epoch.
fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn database(e: sqlx::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn record(row: &SqliteRow) -> Result<RunRecord, StoreError> {
    let column = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let run_id: String = row.try_get("id").map_err(column)?;
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Corrupt(format!("run {run_id}: {what}: {e}"))
    };
    let status: String = row.try_get("status").map_err(column)?;
    let input: String = row.try_get("input").map_err(column)?;
    let summary: Option<String> = row.try_get("summary").map_err(column)?;
    Ok(RunRecord {
        flow: row.try_get("flow").map_err(column)?,
        flow_hash: row.try_get("flow_hash").map_err(column)?,
        status: RunState::from_str(&status).map_err(|e| corrupt("status", &e))?,
        started_at_ms: row.try_get("started_at").map_err(column)?,
        ended_at_ms: row.try_get("ended_at").map_err(column)?,
        input: serde_json::from_str(&input).map_err(|e| corrupt("input", &e))?,
        summary: summary
            .map(|s| serde_json::from_str::<RunSummary>(&s))
            .transpose()
            .map_err(|e| corrupt("summary", &e))?,
        run_id,
    })
}

/// Whether process `pid` still runs (on Linux, by its `/proc` entry;
/// elsewhere only this process is known to run).
fn process_alive(pid: i64) -> bool {
    if pid == i64::from(std::process::id()) {
        return true;
    }
    cfg!(target_os = "linux") && Path::new(&format!("/proc/{pid}")).exists()
}

/// Stored events read back; `what` names one in the error if one is not
/// an event.
fn decode_events(rows: Vec<(String,)>, what: &str) -> Result<Vec<Event>, StoreError> {
    rows.into_iter()
        .map(|(text,)| {
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
        })
        .collect()
}

/// An exclusive lock on `<db>.lock` (a file beside the database, not the
/// database itself: SQLite's own locks are `fcntl` locks, which NFS would
/// merge with ours), tried until `busy` has passed. Released when dropped.
async fn setup_lock(db: &Path, busy: Duration) -> std::io::Result<std::fs::File> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&name)?;
    let deadline = tokio::time::Instant::now() + busy;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::other(format!(
                    "another process held {} for longer than {} ms",
                    Path::new(&name).display(),
                    busy.as_millis()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}
