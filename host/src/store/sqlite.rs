//! The embedded run store: one SQLite file, in WAL mode so that readers
//! (the API, `qflow runs`) never wait for the writer, migrated at open.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use crate::model::{RunQuery, RunRecord, RunState, RunStore, RunSummary, StoreError, StoreWrite};

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
            .busy_timeout(BUSY_TIMEOUT);
        // A handful of readers beside the one writer task.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| failed(&e))?;
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
            }
        }
        tx.commit().await.map_err(database)
    }

    async fn fetch_runs(&self, query: RunQuery) -> Result<Vec<RunRecord>, StoreError> {
        // Filters are bound, never spliced in; a page continues strictly
        // after the (start, id) of the run it ended on.
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
        let mut statement = sqlx::query(&sql);
        if let Some(flow) = &query.flow {
            statement = statement.bind(flow);
        }
        if let Some(status) = query.status {
            statement = statement.bind(status.as_str());
        }
        if let Some(before) = &query.before {
            statement = statement.bind(before);
        }
        let rows = statement.bind(query.limit).fetch_all(&self.pool).await.map_err(database)?;
        rows.iter().map(record).collect()
    }
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
