//! Databases steps may query: declared by a flow (`[[database]]`) or by the
//! host, and granted to a step by id (`databases = ["orders"]`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::settings::PoolSettings;

/// A database steps may be granted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Database {
    /// How flows and steps name it.
    pub id: String,
    /// `sqlite:PATH` (a relative path is resolved against the flow file's
    /// directory) or `postgres://USER:PASSWORD@HOST:PORT/NAME`.
    pub url: String,
    /// Steps may only read: `execute` is refused, and the database itself
    /// refuses writes (SQLite opens the file read-only; PostgreSQL runs
    /// every call in a `READ ONLY` transaction).
    #[serde(default)]
    pub read_only: bool,
    /// Its connection pool (`reuse` does not apply).
    #[serde(default)]
    pub pool: PoolSettings,
    /// How long one statement may run (ms; 30 000).
    #[serde(default)]
    pub statement_timeout_ms: Option<u64>,
}

/// Which driver a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// `sqlite:…`
    Sqlite,
    /// `postgres://…` or `postgresql://…`
    Postgres,
}

impl Database {
    /// A database with the default pool and timeout.
    pub fn new(id: impl Into<String>, url: impl Into<String>) -> Database {
        Database {
            id: id.into(),
            url: url.into(),
            read_only: false,
            pool: PoolSettings::default(),
            statement_timeout_ms: None,
        }
    }

    /// Makes it read-only.
    pub fn read_only(mut self, read_only: bool) -> Database {
        self.read_only = read_only;
        self
    }

    /// Sets its pool.
    pub fn pool(mut self, pool: PoolSettings) -> Database {
        self.pool = pool;
        self
    }

    /// Sets its statement timeout.
    pub fn statement_timeout_ms(mut self, ms: u64) -> Database {
        self.statement_timeout_ms = Some(ms);
        self
    }

    /// Its driver, or why the URL names none Qflow has.
    pub fn kind(&self) -> Result<DatabaseKind, String> {
        let url = self.url.trim();
        if url.starts_with("sqlite:") {
            Ok(DatabaseKind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseKind::Postgres)
        } else {
            Err(format!(
                "database `{}`: url {:?} is neither sqlite:PATH nor postgres://…",
                self.id,
                self.redacted_url()
            ))
        }
    }

    /// The URL with any password replaced by `***`: what messages show.
    /// Read as a leak would be: the user information runs to the *last*
    /// `@` (a password may hold `/` or `@` unencoded), and a `password`
    /// query parameter is hidden too. When in doubt, more is hidden.
    pub fn redacted_url(&self) -> String {
        let url = self.url.trim();
        let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
        let rest = match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => rest.to_owned(),
            },
            None => rest.to_owned(),
        };
        let Some((path, query)) = rest.split_once('?') else { return format!("{scheme}://{rest}") };
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        format!("{scheme}://{path}?{}", query.join("&"))
    }

    /// A SQLite URL's relative path made absolute against `base`; other
    /// URLs as they are.
    pub fn resolved(mut self, base: &Path) -> Database {
        if let Some(rest) = self.url.trim().strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let (path, query) = match rest.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (rest, None),
            };
            if !path.is_empty() && path != ":memory:" && Path::new(path).is_relative() {
                let absolute = base.join(path);
                self.url = match query {
                    Some(query) => format!("sqlite:{}?{query}", absolute.display()),
                    None => format!("sqlite:{}", absolute.display()),
                };
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        let db = Database::new("o", "postgres://qflow:s3cret@127.0.0.1:5432/orders");
        assert_eq!(db.redacted_url(), "postgres://qflow:***@127.0.0.1:5432/orders");
        assert_eq!(
            Database::new("o", "postgres://qflow@h/db").redacted_url(),
            "postgres://qflow@h/db"
        );
        for (url, shown) in [
            ("postgres://u:p/ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p@ss@h:5432/db?sslmode=off", "postgres://u:***@h:5432/db?sslmode=off"),
            ("postgres://h/db?user=u&password=s3cret", "postgres://h/db?user=u&password=***"),
            ("sqlite:data/x.db?mode=ro", "sqlite:data/x.db?mode=ro"),
        ] {
            assert_eq!(Database::new("o", url).redacted_url(), shown, "{url}");
        }
        assert_eq!(db.kind(), Ok(DatabaseKind::Postgres));
        let bad = Database::new("o", "mysql://u:pw@h/db").kind().unwrap_err();
        assert!(
            bad.contains("database `o`") && bad.contains("***") && !bad.contains("pw"),
            "{bad}"
        );
    }

    #[test]
    fn relative_sqlite_paths_follow_the_flow() {
        let base = Path::new("/flows");
        let resolved = |url: &str| Database::new("o", url).resolved(base).url;
        assert_eq!(resolved("sqlite:data/o.db"), "sqlite:/flows/data/o.db");
        assert_eq!(resolved("sqlite://data/o.db?mode=ro"), "sqlite:/flows/data/o.db?mode=ro");
        assert_eq!(resolved("sqlite:/abs/o.db"), "sqlite:/abs/o.db");
        assert_eq!(resolved("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(resolved("postgres://h/db"), "postgres://h/db");
    }
}
