//! SQL for steps: `qflow:plugin/sql` over the databases the operator
//! granted, SQLite and PostgreSQL through sqlx.
//!
//! - **Granted, or refused.** A step reaches only the databases its
//!   `databases = [...]` names; a read-only grant refuses `execute`, and
//!   the database itself refuses writes (SQLite opens the file read-only,
//!   PostgreSQL's transaction for each call is `READ ONLY`).
//! - **Bound, never spliced.** Parameters go to the database as values;
//!   one call is one statement. SQLite statements may not `ATTACH`,
//!   `DETACH` or `VACUUM` (which reach files beside the granted one), and
//!   its connections can attach no database.
//! - **Pooled.** Connections live in the generic [`Pool`], one per
//!   database, shared by every step and instance of the host: `min`, `max`,
//!   idle timeout, health checks (a ping), creation and acquisition
//!   timeouts, stats. A connection idle for more than half a second is
//!   pinged before use, so a restarted database costs no step a failure.
//! - **One call, one transaction.** PostgreSQL runs each call in its own
//!   transaction; SQLite refuses `BEGIN` and `SAVEPOINT`.
//! - **Bounded.** A statement timeout (SQLite's interrupted by a progress
//!   handler, PostgreSQL's by its own `statement_timeout`, set in each
//!   call's transaction) and a limit on the rows' JSON.

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value as JsonValue;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow, Postgres};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteRow};
use sqlx::{Column, ConnectOptions, Connection as _, Row, TypeInfo, ValueRef};
use tokio::time::Instant;

use super::bindings::sql::{self, SqlError, SqlErrorKind, Value};
use crate::model::{Database, DatabaseKind, PoolStats};
use crate::pool::{Manager, Pool, PoolConfig, PoolSet};

/// A database's pool where its declaration says nothing: connections made
/// on demand (`min` 0), at most 10, checked every 10 s.
const DEFAULT_POOL: PoolConfig = PoolConfig {
    min: 0,
    max: 10,
    idle_timeout_ms: 60_000,
    health_check_ms: 10_000,
    create_timeout_ms: 10_000,
    acquire_timeout_ms: 30_000,
    min_only_if_slower_than_us: None,
};

/// How long a statement may run where its database says nothing.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection idle this long is pinged before it is used (HikariCP's
/// choice): a database restarted since is found out before the step's
/// statement is sent, not by it.
const VALIDATE_AFTER: Duration = Duration::from_millis(500);

/// How long a ping may take before the connection counts as dead.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The most JSON a query may return: a step's output limit's default.
const MAX_RESULT_BYTES: usize = 16 << 20;

/// SQLite's longest string or blob: no bigger one could be returned.
const MAX_VALUE_BYTES: i32 = 16 << 20;

/// Steps' databases, host-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqlConfig {
    /// Keep connections open for the next call (pooled); off, every call
    /// connects and disconnects (the benchmark's baseline).
    pub keep_connections: bool,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig { keep_connections: true }
    }
}

impl SqlConfig {
    /// Turns keeping connections on or off.
    pub fn keep_connections(mut self, keep: bool) -> Self {
        self.keep_connections = keep;
        self
    }
}

/// The host's databases: a connection pool per declared database.
pub(crate) struct Databases {
    config: SqlConfig,
    /// By declaration; a flow's databases go with it once unused.
    pools: PoolSet<Database, Connector>,
}

impl Databases {
    pub(crate) fn new(config: SqlConfig) -> Databases {
        Databases { config, pools: PoolSet::new() }
    }

    /// Each database's pool figures, by id.
    pub(crate) fn stats(&self) -> Vec<(String, PoolStats)> {
        self.pools.stats(|database| database.id.clone())
    }

    fn pool(&self, database: &Database) -> Result<Arc<Pool<Connector>>, SqlError> {
        self.pools.get(database, || {
            let config = DEFAULT_POOL.with_settings(&database.pool);
            Ok(Pool::new(Connector::new(database)?, config))
        })
    }
}

/// How a database is connected to.
enum Options {
    Sqlite(SqliteConnectOptions),
    Postgres(PgConnectOptions),
}

/// Makes a database's connections.
struct Connector {
    id: Arc<str>,
    options: Options,
    timeout: Duration,
    /// PostgreSQL: what begins each call's transaction, with its timeout.
    begin: String,
}

impl Connector {
    fn new(database: &Database) -> Result<Connector, SqlError> {
        let bad_url = |e: sqlx::Error| SqlError {
            kind: SqlErrorKind::Unavailable,
            message: format!("database `{}`: {}: {e}", database.id, database.redacted_url()),
        };
        let timeout =
            database.statement_timeout_ms.map_or(STATEMENT_TIMEOUT, Duration::from_millis);
        let kind = database
            .kind()
            .map_err(|message| SqlError { kind: SqlErrorKind::Unavailable, message })?;
        let options = match kind {
            DatabaseKind::Sqlite => Options::Sqlite(
                SqliteConnectOptions::from_str(database.url.trim())
                    .map_err(bad_url)?
                    .read_only(database.read_only)
                    .create_if_missing(!database.read_only),
            ),
            DatabaseKind::Postgres => Options::Postgres(
                PgConnectOptions::from_str(database.url.trim())
                    .map_err(bad_url)?
                    .application_name("qflow"),
            ),
        };
        // Each call is one transaction of its own, begun with its timeout
        // in one round trip: a step's `BEGIN` cannot leave one open on a
        // shared connection, nor a `SET statement_timeout` outlive the call
        // that set it. READ ONLY: whatever the statement is (even a `SET`
        // of the session's defaults), it cannot write.
        let begin = format!(
            "BEGIN{}; SET LOCAL statement_timeout = {}",
            if database.read_only { " READ ONLY" } else { "" },
            timeout.as_millis()
        );
        Ok(Connector { id: Arc::from(database.id.as_str()), options, timeout, begin })
    }
}

/// One pooled connection.
pub(crate) struct Connection {
    conn: Conn,
    /// SQLite: when the running statement must stop (ns since `epoch`),
    /// read by its progress handler.
    deadline: Arc<AtomicU64>,
    epoch: Instant,
}

enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Manager for Connector {
    type Resource = Connection;
    type Error = SqlError;

    async fn create(&self) -> Result<Connection, SqlError> {
        let failed = |e: sqlx::Error| SqlError {
            kind: SqlErrorKind::Unavailable,
            message: format!("cannot connect to database `{}`: {e}", self.id),
        };
        let (epoch, deadline) = (Instant::now(), Arc::new(AtomicU64::new(u64::MAX)));
        let conn = match &self.options {
            Options::Sqlite(options) => {
                let mut conn = options.connect().await.map_err(failed)?;
                let mut handle = conn.lock_handle().await.map_err(failed)?;
                // Interrupts a statement past its deadline: the statement
                // fails with SQLITE_INTERRUPT, the connection stays good.
                let watched = deadline.clone();
                handle.set_progress_handler(1000, move || {
                    (epoch.elapsed().as_nanos() as u64) < watched.load(Ordering::Relaxed)
                });
                let db = handle.as_raw_handle().as_ptr();
                // SAFETY: `db` is this open connection's handle, locked for
                // us (sqlx's worker uses it only under the same lock), and
                // `sqlite3_limit` is safe on any open handle. No database
                // can be attached (nor VACUUM run, which attaches one),
                // whatever the statement check missed; no string or blob
                // outgrows what a result may hold.
                #[allow(unsafe_code)]
                unsafe {
                    use libsqlite3_sys::{
                        SQLITE_LIMIT_ATTACHED, SQLITE_LIMIT_LENGTH, sqlite3_limit,
                    };
                    sqlite3_limit(db, SQLITE_LIMIT_ATTACHED, 0);
                    sqlite3_limit(db, SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES);
                }
                drop(handle);
                Conn::Sqlite(conn)
            }
            Options::Postgres(options) => Conn::Postgres(options.connect().await.map_err(failed)?),
        };
        Ok(Connection { conn, deadline, epoch })
    }

    async fn healthy(&self, connection: &mut Connection) -> bool {
        connection.ping().await
    }

    async fn recycle(&self, connection: &mut Connection, idle_since: Instant) -> bool {
        idle_since.elapsed() < VALIDATE_AFTER || connection.ping().await
    }
}

impl Connection {
    /// Whether the database answers, within [`PING_TIMEOUT`]: a server that
    /// stopped answering must not stall the pool's upkeep.
    async fn ping(&mut self) -> bool {
        let pinged = match &mut self.conn {
            Conn::Sqlite(conn) => tokio::time::timeout(PING_TIMEOUT, conn.ping()).await,
            Conn::Postgres(conn) => tokio::time::timeout(PING_TIMEOUT, conn.ping()).await,
        };
        pinged.is_ok_and(|answer| answer.is_ok())
    }
}

/// What a call asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Query,
    Execute,
}

/// What a call returned.
enum Outcome {
    Rows(String),
    Affected(u64),
}

/// A step's SQL: the databases it was granted, over the host's pools. The
/// view `qflow:plugin/sql` is served from.
pub(crate) struct StepSql {
    pub(crate) databases: Arc<Databases>,
    pub(crate) grants: Arc<[Database]>,
    pub(crate) caller: Arc<str>,
}

impl sql::Host for StepSql {
    async fn query(
        &mut self,
        db: String,
        statement: String,
        params: Vec<Value>,
    ) -> Result<String, SqlError> {
        match self.call(&db, &statement, &params, Mode::Query).await? {
            Outcome::Rows(rows) => Ok(rows),
            Outcome::Affected(n) => Ok(format!("[{{\"rows_affected\":{n}}}]")),
        }
    }

    async fn execute(
        &mut self,
        db: String,
        statement: String,
        params: Vec<Value>,
    ) -> Result<u64, SqlError> {
        match self.call(&db, &statement, &params, Mode::Execute).await? {
            Outcome::Affected(n) => Ok(n),
            Outcome::Rows(_) => Ok(0),
        }
    }
}

impl StepSql {
    async fn call(
        &self,
        db: &str,
        statement: &str,
        params: &[Value],
        mode: Mode,
    ) -> Result<Outcome, SqlError> {
        let Some(database) = self.grants.iter().find(|d| d.id == db) else {
            let granted: Vec<&str> = self.grants.iter().map(|d| d.id.as_str()).collect();
            // `db` is the plugin's text: shown escaped, and not at length.
            let shown: String = db.chars().take(200).collect();
            let message = format!(
                "step `{}` has no grant for database `{}` (it may use: {})",
                self.caller,
                crate::model::printable(&shown),
                if granted.is_empty() { "none".to_owned() } else { granted.join(", ") }
            );
            tracing::warn!("{message}");
            return Err(SqlError { kind: SqlErrorKind::UnknownDatabase, message });
        };
        if mode == Mode::Execute && database.read_only {
            return Err(SqlError {
                kind: SqlErrorKind::ReadOnly,
                message: format!("database `{db}` is granted read-only: execute is refused"),
            });
        }
        let pool = self.databases.pool(database)?;
        if let Options::Sqlite(_) = pool.manager().options {
            check_sqlite_statement(statement).map_err(|message| SqlError {
                kind: SqlErrorKind::Syntax,
                message: format!("database `{db}`: {message}"),
            })?;
        }
        let mut connection = pool.acquire().await.map_err(|e| SqlError {
            kind: SqlErrorKind::Unavailable,
            message: format!("database `{db}`: {e}"),
        })?;
        let done = connection.get().run(statement, params, mode, pool.manager()).await;
        let keep = self.databases.config.keep_connections;
        match done {
            Ok(outcome) => {
                if keep {
                    connection.release();
                }
                Ok(outcome)
            }
            Err(failure) => {
                if keep && !failure.broken {
                    connection.release();
                }
                Err(SqlError {
                    kind: failure.kind,
                    message: format!("database `{db}`: {}", failure.message),
                })
            }
        }
    }
}

/// A failed call: its kind and message, and whether the connection is
/// unusable now.
struct Failure {
    kind: SqlErrorKind,
    message: String,
    broken: bool,
}

impl Failure {
    fn new(kind: SqlErrorKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into(), broken: false }
    }
}

impl Connection {
    async fn run(
        &mut self,
        statement: &str,
        params: &[Value],
        mode: Mode,
        connector: &Connector,
    ) -> Result<Outcome, Failure> {
        let limit = connector.timeout;
        match &mut self.conn {
            Conn::Sqlite(conn) => {
                let deadline = (self.epoch.elapsed() + limit).as_nanos() as u64;
                self.deadline.store(deadline, Ordering::Relaxed);
                // The progress handler stops the statement at the deadline;
                // this stops a call stuck outside SQLite's VM (a lock wait).
                let ran =
                    tokio::time::timeout(limit * 2, sqlite(conn, statement, params, mode)).await;
                match ran {
                    Ok(ran) => {
                        self.deadline.store(u64::MAX, Ordering::Relaxed);
                        ran
                    }
                    Err(_) => {
                        // Given up (and the connection dropped): whatever
                        // it waited for, the statement stops at its next step.
                        self.deadline.store(0, Ordering::Relaxed);
                        Err(timed_out(limit, true))
                    }
                }
            }
            Conn::Postgres(conn) => {
                // PostgreSQL ends a statement at its `statement_timeout`
                // itself; this is for a server that stopped answering.
                let ran = postgres(conn, statement, params, mode, &connector.begin);
                tokio::time::timeout(limit + Duration::from_secs(5), ran)
                    .await
                    .unwrap_or_else(|_| Err(timed_out(limit, true)))
            }
        }
    }
}

fn timed_out(limit: Duration, broken: bool) -> Failure {
    let message = format!("the statement ran longer than its timeout of {} ms", limit.as_millis());
    Failure { broken, ..Failure::new(SqlErrorKind::Timeout, message) }
}

async fn sqlite(
    conn: &mut SqliteConnection,
    statement: &str,
    params: &[Value],
    mode: Mode,
) -> Result<Outcome, Failure> {
    let query = bound(statement, params, |query| query.bind(None::<i64>));
    match mode {
        Mode::Execute => {
            let done = query.execute(&mut *conn).await.map_err(sqlite_failure)?;
            Ok(Outcome::Affected(done.rows_affected()))
        }
        Mode::Query => rows_json(query.fetch(&mut *conn), sqlite_value, sqlite_failure)
            .await
            .map(Outcome::Rows),
    }
}

async fn postgres(
    conn: &mut PgConnection,
    statement: &str,
    params: &[Value],
    mode: Mode,
    begin: &str,
) -> Result<Outcome, Failure> {
    let query = bound(statement, params, |query| query.bind(Untyped));
    let mut tx = conn.begin_with(begin.to_owned()).await.map_err(pg_failure)?;
    let outcome = pg_run(&mut tx, query, mode).await?;
    tx.commit().await.map_err(pg_failure)?;
    Ok(outcome)
}

async fn pg_run(
    conn: &mut PgConnection,
    query: Query<'_, Postgres>,
    mode: Mode,
) -> Result<Outcome, Failure> {
    match mode {
        Mode::Execute => {
            let done = query.execute(&mut *conn).await.map_err(pg_failure)?;
            Ok(Outcome::Affected(done.rows_affected()))
        }
        Mode::Query => {
            rows_json(query.fetch(&mut *conn), pg_value, pg_failure).await.map(Outcome::Rows)
        }
    }
}

/// `statement` with `params` bound in order; `null` binds a NULL, which
/// each driver types its own way.
fn bound<'q, DB: sqlx::Database>(
    statement: &'q str,
    params: &'q [Value],
    null: impl Fn(Query<'q, DB>) -> Query<'q, DB>,
) -> Query<'q, DB>
where
    bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    f64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    params.iter().fold(sqlx::query(statement), |query, param| match param {
        Value::Null => null(query),
        Value::Boolean(b) => query.bind(*b),
        Value::Integer(i) => query.bind(*i),
        Value::Real(r) => query.bind(*r),
        Value::Text(t) => query.bind(t.as_str()),
        Value::Blob(b) => query.bind(b.as_slice()),
    })
}

/// A statement with its arguments, for driver `DB`.
type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>;

/// A NULL parameter of no type: PostgreSQL infers it from the statement,
/// as it does for a literal NULL.
struct Untyped;

impl sqlx::Type<Postgres> for Untyped {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl sqlx::Encode<'_, Postgres> for Untyped {
    fn encode_by_ref(
        &self,
        _buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}

/// Rows as a JSON array of objects, within [`MAX_RESULT_BYTES`]: read as
/// they come, so a result over the limit stops there rather than being
/// held whole first.
async fn rows_json<R: Row>(
    mut rows: futures::stream::BoxStream<'_, Result<R, sqlx::Error>>,
    value: impl Fn(&R, usize) -> Result<JsonValue, Failure>,
    failed: fn(sqlx::Error) -> Failure,
) -> Result<String, Failure> {
    use futures::TryStreamExt as _;
    let mut out = String::from("[");
    let mut n = 0;
    while let Some(row) = rows.try_next().await.map_err(failed)? {
        if n == 0 {
            distinct_columns(row.columns())?;
        }
        let mut object = serde_json::Map::with_capacity(row.len());
        for (i, column) in row.columns().iter().enumerate() {
            object.insert(column.name().to_owned(), value(&row, i)?);
        }
        if n > 0 {
            out.push(',');
        }
        n += 1;
        let _ = write!(out, "{}", JsonValue::Object(object));
        if out.len() > MAX_RESULT_BYTES {
            return Err(Failure::new(
                SqlErrorKind::Unsupported,
                format!(
                    "the result is over {MAX_RESULT_BYTES} bytes of JSON after {n} rows (add a LIMIT)"
                ),
            ));
        }
    }
    out.push(']');
    Ok(out)
}

/// A row is an object keyed by column name: two columns of one name would
/// lose one value without a word.
fn distinct_columns<C: Column>(columns: &[C]) -> Result<(), Failure> {
    for (i, column) in columns.iter().enumerate() {
        if columns[..i].iter().any(|c| c.name() == column.name()) {
            return Err(Failure::new(
                SqlErrorKind::Unsupported,
                format!(
                    "two columns are named `{}`: a row is an object keyed by column name, so name them apart (`AS …`)",
                    column.name()
                ),
            ));
        }
    }
    Ok(())
}

fn decode(e: sqlx::Error) -> Failure {
    Failure::new(SqlErrorKind::Unsupported, e.to_string())
}

fn sqlite_value(row: &SqliteRow, i: usize) -> Result<JsonValue, Failure> {
    let raw = row.try_get_raw(i).map_err(decode)?;
    if raw.is_null() {
        return Ok(JsonValue::Null);
    }
    // SQLite's values carry their own storage class, whatever the column says.
    let class = raw.type_info().name().to_owned();
    Ok(match class.as_str() {
        "INTEGER" | "BOOLEAN" => {
            JsonValue::from(row.try_get_unchecked::<i64, _>(i).map_err(decode)?)
        }
        "REAL" => float(row.try_get_unchecked::<f64, _>(i).map_err(decode)?),
        "BLOB" => base64(&row.try_get_unchecked::<Vec<u8>, _>(i).map_err(decode)?),
        _ => JsonValue::from(row.try_get_unchecked::<String, _>(i).map_err(decode)?),
    })
}

fn pg_value(row: &PgRow, i: usize) -> Result<JsonValue, Failure> {
    let raw = row.try_get_raw(i).map_err(decode)?;
    if raw.is_null() {
        return Ok(JsonValue::Null);
    }
    let column = &row.columns()[i];
    let type_name = column.type_info().name();
    Ok(match type_name {
        "BOOL" => JsonValue::from(row.try_get::<bool, _>(i).map_err(decode)?),
        "INT2" => JsonValue::from(row.try_get::<i16, _>(i).map_err(decode)?),
        "INT4" => JsonValue::from(row.try_get::<i32, _>(i).map_err(decode)?),
        "INT8" => JsonValue::from(row.try_get::<i64, _>(i).map_err(decode)?),
        "OID" => {
            JsonValue::from(row.try_get::<sqlx::postgres::types::Oid, _>(i).map_err(decode)?.0)
        }
        "FLOAT4" => float(f64::from(row.try_get::<f32, _>(i).map_err(decode)?)),
        "FLOAT8" => float(row.try_get::<f64, _>(i).map_err(decode)?),
        "NUMERIC" => {
            let decimal = row.try_get::<sqlx::types::Decimal, _>(i).map_err(decode)?;
            let text = decimal.to_string();
            text.parse::<i64>()
                .map(JsonValue::from)
                .or_else(|_| text.parse::<f64>().map(float))
                .unwrap_or(JsonValue::String(text))
        }
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" | "CITEXT" | "UNKNOWN" => {
            JsonValue::from(row.try_get::<String, _>(i).map_err(decode)?)
        }
        "BYTEA" => base64(&row.try_get::<Vec<u8>, _>(i).map_err(decode)?),
        "JSON" | "JSONB" => row.try_get::<JsonValue, _>(i).map_err(decode)?,
        "UUID" => {
            JsonValue::from(row.try_get::<sqlx::types::Uuid, _>(i).map_err(decode)?.to_string())
        }
        "TIMESTAMPTZ" => {
            let at = row.try_get::<time::OffsetDateTime, _>(i).map_err(decode)?;
            formatted(at.format(&time::format_description::well_known::Rfc3339))?
        }
        "TIMESTAMP" => {
            let at = row.try_get::<time::PrimitiveDateTime, _>(i).map_err(decode)?;
            let format = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]"
            );
            formatted(at.format(&format))?
        }
        "DATE" => {
            let date = row.try_get::<time::Date, _>(i).map_err(decode)?;
            let format = time::macros::format_description!("[year]-[month]-[day]");
            formatted(date.format(&format))?
        }
        other => {
            return Err(Failure::new(
                SqlErrorKind::Unsupported,
                format!(
                    "column `{}` has type {other}, which has no JSON form here; cast it in the statement (`{}::text`)",
                    column.name(),
                    column.name()
                ),
            ));
        }
    })
}

/// A date or time as the text it was formatted into.
fn formatted(text: Result<String, time::error::Format>) -> Result<JsonValue, Failure> {
    text.map(JsonValue::from).map_err(|e| decode(sqlx::Error::Decode(Box::new(e))))
}

/// A float as JSON: NaN and the infinities, which JSON lacks, are null.
fn float(f: f64) -> JsonValue {
    serde_json::Number::from_f64(f).map_or(JsonValue::Null, JsonValue::Number)
}

fn base64(bytes: &[u8]) -> JsonValue {
    JsonValue::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Which database a driver error came from: their codes differ.
#[derive(Clone, Copy)]
enum Driver {
    Sqlite,
    Postgres,
}

/// What a driver's error means to a step, and whether it leaves the
/// connection unusable.
fn failure(driver: Driver, e: sqlx::Error) -> Failure {
    use SqlErrorKind as K;
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = db.message().to_owned();
            let (kind, broken) = match driver {
                // An extended result code; its low byte is the primary one.
                Driver::Sqlite => {
                    let kind = match code.parse::<u32>().unwrap_or(1) & 0xff {
                        // "table t already exists": SQLite has no code of
                        // its own for it, only this wording.
                        1 if message.ends_with(" already exists") => K::Constraint,
                        1 => K::Syntax,
                        18 => K::Unsupported,
                        5 | 6 | 10 | 14 => K::Unavailable,
                        8 => K::ReadOnly,
                        9 => K::Timeout,
                        19 => K::Constraint,
                        _ => K::Other,
                    };
                    (kind, false)
                }
                // A SQLSTATE.
                Driver::Postgres => {
                    let kind = match code.as_str() {
                        "25006" => K::ReadOnly,
                        "57014" => K::Timeout,
                        // What a statement creates already exists (database,
                        // schema, table, column, object, alias, function).
                        "42P04" | "42P06" | "42P07" | "42701" | "42710" | "42712" | "42723" => {
                            K::Constraint
                        }
                        c if c.starts_with("42") => K::Syntax,
                        c if c.starts_with("23") => K::Constraint,
                        // A protocol violation the session survives: the
                        // parameters do not fit the statement ("bind message
                        // supplies 1 parameters, but … requires 2").
                        "08P01" => K::Syntax,
                        c if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") => {
                            K::Unavailable
                        }
                        _ => K::Other,
                    };
                    // A server shutting down (57P01 …) ends the session.
                    let broken = code.starts_with("57P") || code.starts_with("08");
                    (kind, broken && code != "08P01")
                }
            };
            let message = match kind {
                K::Timeout => format!("the statement was stopped at its timeout ({message})"),
                _ => message,
            };
            Failure { kind, message, broken }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::PoolClosed
        | sqlx::Error::PoolTimedOut => {
            Failure { kind: K::Unavailable, message: e.to_string(), broken: true }
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => Failure::new(K::Unsupported, e.to_string()),
        _ => Failure::new(K::Other, e.to_string()),
    }
}

fn sqlite_failure(e: sqlx::Error) -> Failure {
    failure(Driver::Sqlite, e)
}

fn pg_failure(e: sqlx::Error) -> Failure {
    failure(Driver::Postgres, e)
}

/// A SQLite statement a step may run: one statement, and none of the
/// commands that reach files beside the granted database.
///
/// sqlx runs every statement in a string, and SQLite's `ATTACH` opens (and
/// `VACUUM INTO` writes) any path the host can reach; what is needed to
/// catch them is SQLite's own lexing of quotes and comments, which this is.
/// A byte SQLite allows inside an identifier or a parameter's name.
fn id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn check_sqlite_statement(statement: &str) -> Result<(), String> {
    let refuse = |message: String| Err(message);
    let bytes = statement.as_bytes();
    let (mut i, mut words) = (0, 0);
    let mut ended = false;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        i += 1;
        match c {
            b'\'' | b'"' | b'`' | b'[' => {
                let close = if c == b'[' { b']' } else { c };
                while i < bytes.len() {
                    if bytes[i] == close {
                        // A doubled quote is an escaped one.
                        if close != b']' && bytes.get(i + 1) == Some(&close) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if bytes.get(i) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if bytes.get(i) == Some(&b'*') => {
                i += 1;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
                continue;
            }
            b';' => {
                ended = true;
                continue;
            }
            c if c.is_ascii_whitespace() => continue,
            // A parameter (`$1`, `:name`, `@x`, `$a::b(…)`), one token as
            // SQLite reads it, so a `--` or a quote inside it starts nothing.
            b'$' | b':' | b'@' | b'#' | b'?' => {
                while i < bytes.len() {
                    if c == b'?' {
                        // `?NNN`: digits only.
                        if !bytes[i].is_ascii_digit() {
                            break;
                        }
                        i += 1;
                    } else if id_char(bytes[i]) {
                        i += 1;
                    } else if c == b'$' && bytes[i] == b'(' && i > start + 1 {
                        while i < bytes.len() && bytes[i] != b')' && !bytes[i].is_ascii_whitespace()
                        {
                            i += 1;
                        }
                        i += 1;
                        break;
                    } else if c == b'$' && bytes[i] == b':' && bytes.get(i + 1) == Some(&b':') {
                        i += 2;
                    } else {
                        break;
                    }
                }
                let name = &statement[start + 1..i.min(statement.len())];
                if c == b'$' && !name.is_empty() && name.bytes().all(|b| b == b'0') {
                    return refuse("parameters are numbered from $1, not $0".to_owned());
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                while i < bytes.len() && id_char(bytes[i]) {
                    i += 1;
                }
                let word = &statement[start..i];
                let first = words == 0;
                words += 1;
                if first && ["BEGIN", "SAVEPOINT"].iter().any(|w| word.eq_ignore_ascii_case(w)) {
                    return refuse(format!(
                        "{} is not allowed: each call is a transaction of its own, and a \
                         connection is shared by every step",
                        word.to_ascii_uppercase()
                    ));
                }
                for refused in ["ATTACH", "DETACH", "VACUUM"] {
                    if word.eq_ignore_ascii_case(refused) {
                        return refuse(format!(
                            "{refused} is not allowed: a step reaches only the database it was granted"
                        ));
                    }
                }
            }
            _ => {}
        }
        if ended {
            return refuse("one call runs one statement; this has more after a `;`".to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_sqlite_statement as check;

    #[test]
    fn a_sqlite_statement_is_one_statement_reaching_no_other_file() {
        assert!(check("SELECT * FROM t WHERE a = $1").is_ok());
        assert!(check("SELECT 1;").is_ok());
        assert!(check("SELECT 1; -- done\n").is_ok());
        assert!(check("SELECT 'attach; vacuum' AS \"detach\", [vacuum] -- attach\n").is_ok());
        assert!(check("SELECT 'it''s; fine'").is_ok());
        assert!(check("/* attach */ SELECT 1").is_ok());
        assert!(check("SELECT attached FROM t").is_ok());
        assert!(check("SELECT $1, $10, :name, @n, ?2, $a::b(x) FROM x$attach").is_ok());
        for bad in [
            "ATTACH DATABASE '/etc/x.db' AS x",
            "attach '/tmp/x' as y",
            "VACUUM INTO '/tmp/copy.db'",
            "SELECT 1; DETACH x",
            "SELECT 1; DELETE FROM t",
            "SELECT 'a'; SELECT 2",
            "SELECT 1 /* c */ ; SELECT 2",
            // Inside a parameter's name, `--`, `/*` and quotes are not
            // comments or strings to SQLite.
            "SELECT $1(--);ATTACH'/tmp/o.db'AS o",
            "SELECT $a::b(/*);VACUUM",
            "SELECT $0",
            "BEGIN",
            " begin immediate",
            "SAVEPOINT a",
        ] {
            assert!(check(bad).is_err(), "{bad} should be refused");
        }
    }
}
