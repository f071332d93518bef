//! Runs a configured SQL statement on a database granted to the step, with
//! values from the step's input as its parameters (bound, never spliced).
//!
//! ```toml
//! [[step]]
//! id = "store"
//! plugin = "sql"
//! databases = ["orders"]
//! config = { db = "orders", each = true, params = ["id", "total"],
//!            setup = ["CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, total REAL)"],
//!            statement = "INSERT INTO orders (id, total) VALUES ($1, $2)" }
//! ```
//!
//! - `params` names the input's fields that fill `$1`, `$2`, …
//!   (`params = []`: none, whatever the input); without it, an array input
//!   is the parameters in order, a scalar is `$1`, null is none, and an
//!   object is refused (say which fields).
//! - `setup` statements run in every instance's `init`, and the pool may
//!   make an instance ahead of demand: write them to be repeated (`CREATE
//!   TABLE IF NOT EXISTS`). One that fails on a constraint is tried once
//!   more: in PostgreSQL, two `CREATE TABLE IF NOT EXISTS` at once collide
//!   on the catalog's unique index, and the loser finds the table there
//!   when it tries again.
//! - `each = true` runs the statement once per element of an array input.
//! - A statement that starts with `SELECT`, `WITH`, `VALUES`, `PRAGMA`,
//!   `SHOW` or `EXPLAIN`, or says `RETURNING`, returns its rows (an array of
//!   objects; with `each`, an array of those); any other returns
//!   `{"rows_affected": N}`, summed over `each`.

use qflow_sdk::serde_json::{Value, json};
use qflow_sdk::sql::{self, param};
use qflow_sdk::{Error, Step, export_step};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(crate = "qflow_sdk::serde", deny_unknown_fields)]
struct Config {
    db: String,
    statement: String,
    #[serde(default)]
    params: Option<Vec<String>>,
    #[serde(default)]
    each: bool,
    #[serde(default)]
    setup: Vec<String>,
}

struct Sql {
    config: Config,
    returns_rows: bool,
}

impl Step for Sql {
    type Config = Config;
    type Input = Value;
    type Output = Value;

    fn new(config: Config) -> Result<Self, Error> {
        for statement in &config.setup {
            setup(&config.db, statement)
                .map_err(|e| Error::bad_config(format!("setup statement {statement:?}: {e}")))?;
        }
        let returns_rows = returns_rows(&config.statement);
        Ok(Sql { config, returns_rows })
    }

    fn run(&mut self, input: Value) -> Result<Value, Error> {
        if !self.config.each {
            return self.once(&input);
        }
        let Value::Array(items) = input else {
            return Err(Error::bad_input("`each = true` needs an array input"));
        };
        if self.returns_rows {
            let rows: Result<Vec<Value>, Error> =
                items.iter().map(|item| self.once(item)).collect();
            return Ok(Value::Array(rows?));
        }
        let mut affected = 0;
        for item in &items {
            affected += self.execute(item)?;
        }
        Ok(json!({ "rows_affected": affected }))
    }
}

impl Sql {
    fn once(&self, item: &Value) -> Result<Value, Error> {
        if self.returns_rows {
            let rows: Vec<Value> =
                sql::query(&self.config.db, &self.config.statement, &self.params(item)?)?;
            Ok(Value::Array(rows))
        } else {
            Ok(json!({ "rows_affected": self.execute(item)? }))
        }
    }

    fn execute(&self, item: &Value) -> Result<u64, Error> {
        sql::execute(&self.config.db, &self.config.statement, &self.params(item)?)
    }

    /// The statement's parameters from one input value.
    fn params(&self, item: &Value) -> Result<Vec<sql::Value>, Error> {
        match (&self.config.params, item) {
            (Some(fields), _) if fields.is_empty() => Ok(Vec::new()),
            (Some(fields), Value::Object(object)) => fields
                .iter()
                .map(|field| {
                    object.get(field).map(param).ok_or_else(|| {
                        Error::bad_input(format!(
                            "the input has no field `{field}` for the statement"
                        ))
                    })
                })
                .collect(),
            (Some(_), other) => Err(Error::bad_input(format!(
                "`params` names fields, so the input must be an object, not {}",
                kind(other)
            ))),
            (None, Value::Array(values)) => Ok(values.iter().map(param).collect()),
            (None, Value::Object(_)) => Err(Error::bad_config(
                "the input is an object: say which fields fill $1, $2, … with `params = [\"field\", …]`",
            )),
            (None, Value::Null) => Ok(Vec::new()),
            (None, scalar) => Ok(vec![param(scalar)]),
        }
    }
}

/// Runs a setup statement, a second time if it lost a race (see above).
fn setup(db: &str, statement: &str) -> Result<u64, Error> {
    match sql::execute(db, statement, &[]) {
        Err(e) if e.code == "sql-constraint" => sql::execute(db, statement, &[]),
        done => done,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether a statement returns rows: a query by its first word (after any
/// comments), or one that says `RETURNING`.
fn returns_rows(statement: &str) -> bool {
    let first = skip_comments(statement).split(|c: char| !c.is_ascii_alphabetic()).next();
    let first = first.unwrap_or("");
    let query = ["SELECT", "WITH", "VALUES", "PRAGMA", "SHOW", "EXPLAIN"];
    query.iter().any(|q| first.eq_ignore_ascii_case(q))
        || statement.to_ascii_uppercase().contains("RETURNING")
}

/// The statement after its leading whitespace and comments.
fn skip_comments(mut statement: &str) -> &str {
    loop {
        statement = statement.trim_start();
        if let Some(rest) = statement.strip_prefix("--") {
            statement = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = statement.strip_prefix("/*") {
            statement = rest.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return statement;
        }
    }
}

export_step!(Sql, "Runs a configured SQL statement with the step's input as its parameters");
