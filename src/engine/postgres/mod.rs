//! PostgreSQL: preflight over tokio-postgres, dumps with pg_dump/pg_dumpall, restores with
//! pg_restore and psql.
//!
//! Formats: roles, tablespaces and memberships come from `pg_dumpall --globals-only` (SQL);
//! each database is one `pg_dump --format=custom` archive, which pg_dump takes from a single
//! repeatable-read snapshot and which lets pg_restore pick a single table later.
//! With `--jobs` > 1, a database with large tables is split, as `pg_dump -j` splits it but
//! streamed: a `--schema-only` archive (the database part, [`SCHEMA_FORMAT`]), each large
//! table's rows as `COPY … TO STDOUT` text ([`COPY_FORMAT`]) and one `--data-only` archive for
//! the rest of the data ([`TABLE_DATA_KIND`] parts), every one of them read in the same
//! exported snapshot.
//! Database-level properties (encoding, locale, owner, settings, grants, comment) are read
//! from the catalog and kept in the manifest, because pg_dump only emits them with `--create`,
//! which would tie the dump to the original database name.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::config::SourceUrl;
use crate::error::{Error, ErrorKind, Result};

pub mod backup;
mod engine;
pub mod pattern;
mod postdata;
pub mod preflight;
pub mod restore;
pub mod tls;

pub use engine::{describe_part, PostgresEngine};

/// `text`, in encoding `from`, in encoding `to` (PostgreSQL's names: LATIN1, EUC_JP, …);
/// `Ok(Err(reason))` when it is not valid `from` or has no form in `to`.
///
/// The server converts: it knows every encoding a database can have. `session` is opened in
/// `database` only when something needs converting (every server encoding is ASCII below
/// 0x80), and kept for the next call. SQL_ASCII converts to nothing: its bytes stay as they
/// are, checked against `to`.
async fn convert_encoding(
    target: &Connection,
    session: &mut Option<Client>,
    database: &str,
    text: &[u8],
    from: &str,
    to: &str,
) -> Result<std::result::Result<Vec<u8>, String>> {
    if text.is_ascii() || from.eq_ignore_ascii_case(to) {
        return Ok(Ok(text.to_vec()));
    }
    if session.is_none() {
        *session = Some(target.connect(database).await?);
    }
    let client = session.as_ref().expect("just connected");
    match client
        .query_one("SELECT convert($1, $2, $3)", &[&text, &from, &to])
        .await
    {
        Ok(row) => Ok(Ok(row.get(0))),
        Err(e) => match (e.code(), e.as_db_error()) {
            (
                Some(&SqlState::CHARACTER_NOT_IN_REPERTOIRE | &SqlState::UNTRANSLATABLE_CHARACTER),
                Some(db),
            ) => Ok(Err(db.message().to_string())),
            _ => Err(preflight::query_error(
                target,
                &format!("converting text from {from} to {to}"),
                e,
            )),
        },
    }
}

/// Part object kinds in the manifest.
pub const GLOBALS_KIND: &str = "postgres.globals";
pub const DATABASE_KIND: &str = "postgres.database";
/// Data of a database written as several parts (manifest format 4); see [`DataPiece`].
pub const TABLE_DATA_KIND: &str = "postgres.table-data";

/// Part formats: a whole database, the schema of a split one, and its data pieces.
pub const WHOLE_FORMAT: &str = "pg_dump-custom";
pub const SCHEMA_FORMAT: &str = "pg_dump-custom-schema";
pub const DATA_FORMAT: &str = "pg_dump-custom-data";
/// One table's rows as `COPY … TO STDOUT` text (manifest format 5), read by kura itself on
/// a session that imported the database's snapshot: no pg_dump run (and its reading of the
/// whole catalog) per table, and restored by `COPY … FROM STDIN` with no pg_restore or psql
/// between the object and the server. Its [`DataPiece::copy`] says how to read it back.
pub const COPY_FORMAT: &str = "pg-copy-text";

/// The properties of a [`TABLE_DATA_KIND`] part: whose data it holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPiece {
    /// The key of the database's schema part.
    pub of: String,
    /// The one table whose rows it holds, or `None` for the rest of the database's data
    /// (small tables, sequence values, large objects).
    pub table: Option<TableName>,
    /// For a [`COPY_FORMAT`] part: the columns and encoding of its text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyText>,
}

/// What a [`COPY_FORMAT`] part's text holds: rows of `columns`, one per line, in the text
/// format of `COPY`, encoded in `encoding`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopyText {
    /// The table's stored columns in their order, as pg_dump lists them: generated columns
    /// are left out (the server computes them again) and so are dropped ones.
    pub columns: Vec<String>,
    /// The source database's encoding, which pg_dump also writes its data in: no
    /// conversion on either side, and a SQL_ASCII database's bytes kept as they are.
    pub encoding: String,
}

impl CopyText {
    /// `COPY table (columns) FROM STDIN`, which loads this text into `table`.
    pub fn copy_from(&self, table: &TableName) -> String {
        format!(
            "COPY {}{} FROM STDIN{}",
            table.pattern(),
            self.column_list(),
            self.encoding_option()
        )
    }

    /// `COPY table (columns) TO STDOUT`, which writes this text.
    pub fn copy_to(&self, table: &TableName) -> String {
        format!(
            "COPY {}{} TO STDOUT{}",
            table.pattern(),
            self.column_list(),
            self.encoding_option()
        )
    }

    /// The text's encoding as COPY's own option: the session, and so the statement with its
    /// column names and the server's messages, stays in UTF-8.
    fn encoding_option(&self) -> String {
        format!(" WITH (ENCODING {})", quote_literal(&self.encoding))
    }

    /// ` (a, b)`, or nothing for a table with no columns (allowed; `()` is a syntax error).
    fn column_list(&self) -> String {
        match self.columns.is_empty() {
            true => String::new(),
            false => format!(
                " ({})",
                self.columns
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// As a pg_dump `--table` pattern that matches this one table and nothing else: inside
    /// double quotes, `*`, `?` and `.` are literal.
    pub fn pattern(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// How to reach one PostgreSQL server, built from its URL.
#[derive(Debug, Clone)]
pub struct Connection {
    url: SourceUrl,
}

impl Connection {
    pub fn new(url: SourceUrl) -> Result<Self> {
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(Error::usage(format!(
                "{} is not a PostgreSQL URL: expected postgres://user:password@host:5432/postgres",
                url.redacted()
            )));
        }
        Ok(Connection { url })
    }

    pub fn redacted(&self) -> String {
        self.url.redacted()
    }

    /// The database named in the URL, used for server-wide queries; `postgres` by default.
    pub fn maintenance_database(&self) -> String {
        self.url
            .path_database()
            .unwrap_or_else(|| "postgres".to_string())
    }

    fn query_param(&self, name: &str) -> Option<String> {
        self.url
            .query_pairs()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    fn host(&self) -> String {
        self.query_param("host")
            .or_else(|| self.url.host())
            .unwrap_or_else(|| "localhost".to_string())
    }

    fn user(&self) -> Option<String> {
        self.url.username().or_else(|| self.query_param("user"))
    }

    /// libpq environment for a child process connecting to `database`. The password goes in
    /// PGPASSWORD, never on the command line.
    pub fn child_env(&self, database: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("PGHOST".to_string(), self.host()),
            ("PGDATABASE".to_string(), database.to_string()),
            ("PGAPPNAME".to_string(), "kura".to_string()),
        ];
        if let Some(port) = self.url.port() {
            env.push(("PGPORT".into(), port.to_string()));
        }
        if let Some(user) = self.user() {
            env.push(("PGUSER".into(), user));
        }
        if let Some(password) = self.url.password() {
            env.push(("PGPASSWORD".into(), password.expose().to_string()));
        }
        for (param, var) in [
            ("sslmode", "PGSSLMODE"),
            ("sslrootcert", "PGSSLROOTCERT"),
            ("sslcert", "PGSSLCERT"),
            ("sslkey", "PGSSLKEY"),
            ("connect_timeout", "PGCONNECT_TIMEOUT"),
            ("options", "PGOPTIONS"),
        ] {
            if let Some(value) = self.query_param(param) {
                env.push((var.into(), value));
            }
        }
        env
    }

    /// A command for a PostgreSQL client tool, connected through the environment only.
    pub fn command(&self, program: &Path, database: &str) -> Command {
        let mut command = Command::new(program);
        // Inherited settings must not redirect the child to another server or service, nor
        // write a dump in another encoding than the database's, which a restore assumes
        // (pg_restore matches --table names byte for byte).
        for var in [
            "PGSERVICE",
            "PGSERVICEFILE",
            "PGHOSTADDR",
            "PGTARGETSESSIONATTRS",
            "PGCLIENTENCODING",
        ] {
            command.env_remove(var);
        }
        command.envs(self.child_env(database));
        command
    }

    pub async fn connect(&self, database: &str) -> Result<Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .dbname(database)
            .application_name("kura")
            .connect_timeout(std::time::Duration::from_secs(
                self.query_param("connect_timeout")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(15),
            ));
        if let Some(port) = self.url.port() {
            config.port(port);
        }
        if let Some(user) = self.user() {
            config.user(user);
        } else if let Ok(user) = std::env::var("PGUSER").or_else(|_| std::env::var("USER")) {
            config.user(user);
        }
        if let Some(password) = self.url.password() {
            config.password(password.expose());
        } else if let Ok(password) = std::env::var("PGPASSWORD") {
            config.password(password);
        }
        let tls = tls::PgTls::resolve(|name| self.query_param(name))
            .map_err(|e| e.context(self.redacted()))?;
        let password_given =
            self.url.password().is_some() || std::env::var_os("PGPASSWORD").is_some();
        // libpq never asks for TLS over a Unix socket.
        config.ssl_mode(match self.host().starts_with('/') {
            true => tokio_postgres::config::SslMode::Disable,
            false => tls.first_attempt(),
        });
        let connector = tls.connector()?;
        let mut connected = config.connect(connector.clone()).await;
        if tls.mode == tls::SslMode::Allow {
            // libpq's `allow`: plain first, TLS when the server turns a plain session away.
            if let Err(e) = &connected {
                if e.code()
                    == Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
                {
                    config.ssl_mode(tokio_postgres::config::SslMode::Require);
                    connected = config.connect(connector).await;
                }
            }
        }
        let (client, connection) =
            connected.map_err(|e| self.connect_error(database, password_given, &tls, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }
}

impl Connection {
    /// 3/4 mean "retry later" to a Job, so only what a retry can fix is `Database`: an
    /// unreachable server, a lost connection, rejected credentials (a rotated Secret reaches a
    /// new pod). A missing password or database is a configuration error (2).
    fn connect_error(
        &self,
        database: &str,
        password_given: bool,
        tls: &tls::PgTls,
        err: tokio_postgres::Error,
    ) -> Error {
        use std::error::Error as _;
        use tokio_postgres::error::SqlState;
        let transport = err.source().is_some_and(|s| s.is::<std::io::Error>()) || err.is_closed();
        let at = format!("PostgreSQL database {database:?} at {}", self.redacted());
        let server = match self.url.port() {
            Some(port) => format!("{}:{port}", self.host()),
            None => self.host(),
        };
        if let Some(failure) = crate::tls::explain_failure(&err, &server, &TLS_FIXES) {
            return Error::with_source(
                ErrorKind::Database,
                format!("cannot connect to {at}: {failure}"),
                err,
            );
        }
        // tokio-postgres' own words when the server answers "no TLS here" to sslmode=require.
        if err.to_string().contains("server does not support TLS") {
            return Error::with_source(
                ErrorKind::Database,
                format!(
                    "cannot connect to {at}: sslmode={} asks for TLS and the server does not offer it: enable ssl on the server, or use sslmode=prefer",
                    tls.mode.as_str()
                ),
                err,
            );
        }
        let plain = tls.mode == tls::SslMode::Disable;
        let (kind, advice) = match err.code() {
            Some(code) if *code == SqlState::INVALID_CATALOG_NAME => {
                return Error::usage(format!(
                    "{at} does not exist: fix the database name in the URL (postgres://…/DATABASE), or create it"
                ))
            }
            Some(code) if *code == SqlState::INVALID_PASSWORD => (
                ErrorKind::Database,
                "password authentication failed: check the password in the URL or Secret",
            ),
            // pg_hba.conf has no line for this session; with sslmode=disable the likeliest
            // reason is a server that accepts only TLS (hostssl), as managed services do.
            Some(code) if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION && plain => (
                ErrorKind::Database,
                "the server rejected an unencrypted session (sslmode=disable): a server that accepts only TLS needs sslmode=verify-full and sslrootcert=FILE; otherwise check the user name and pg_hba.conf",
            ),
            Some(code) if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => (
                ErrorKind::Database,
                "the server rejected the user: check the user name and pg_hba.conf",
            ),
            Some(code) if *code == SqlState::TOO_MANY_CONNECTIONS => {
                (ErrorKind::Database, "the server has no free connection slots")
            }
            Some(_) => (ErrorKind::Database, "the server refused the connection"),
            // Neither the server nor the network: the client gave up before asking, which
            // without a password means the server asked for one.
            None if !transport && !password_given => return self.url.missing_password("PostgreSQL"),
            None if !transport => (ErrorKind::Database, "the connection failed"),
            None => (
                ErrorKind::Database,
                "is the server running and reachable on that host and port?",
            ),
        };
        Error::with_source(kind, format!("cannot connect to {at}: {advice}"), err)
    }
}

const TLS_FIXES: crate::tls::Fixes<'static> = crate::tls::Fixes {
    unknown_ca: "give the CA certificate that signed it as sslrootcert=FILE in the URL (or PGSSLROOTCERT)",
    name_mismatch: "connect with a host name the certificate lists, or use sslmode=verify-ca to check only the CA",
};

/// The client programs kura runs, of a major version no older than the server's.
#[derive(Debug, Clone)]
pub struct Tools {
    pub pg_dump: PathBuf,
    pub pg_dumpall: PathBuf,
    pub pg_restore: PathBuf,
    pub psql: PathBuf,
    pub version: String,
    pub major: u32,
}

impl Tools {
    /// Find client tools for a server of major version `server_major`: in `bin_dir` if given,
    /// else on PATH and in Debian's versioned directories (`/usr/lib/postgresql/N/bin`), in
    /// the order [`tool_dirs`] gives.
    /// `why` explains the required version in the error ("the server is PostgreSQL 15").
    ///
    /// Runs each candidate's `--version` on a blocking thread, off the async path.
    pub async fn locate(bin_dir: Option<&Path>, server_major: u32, why: &str) -> Result<Tools> {
        let bin_dir = bin_dir.map(Path::to_path_buf);
        let why = why.to_string();
        tokio::task::spawn_blocking(move || {
            Tools::locate_now(bin_dir.as_deref(), server_major, &why)
        })
        .await
        .map_err(|e| Error::failed(format!("locating the PostgreSQL client tools: {e}")))?
    }

    fn locate_now(bin_dir: Option<&Path>, server_major: u32, why: &str) -> Result<Tools> {
        let candidates = match bin_dir {
            Some(dir) => vec![Some(dir.to_path_buf())],
            None => {
                let versioned = std::fs::read_dir("/usr/lib/postgresql")
                    .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
                    .unwrap_or_default();
                // A cluster or version chosen for the wrapper (PGCLUSTER, ~/.postgresqlrc)
                // is the operator's choice: the wrapper stays first then.
                let chosen = std::env::var_os("PGCLUSTER").is_some()
                    || std::env::var_os("HOME")
                        .is_some_and(|home| Path::new(&home).join(".postgresqlrc").exists());
                let wrapper =
                    !chosen && on_path("pg_dump").is_some_and(|tool| is_pg_wrapper(&tool));
                tool_dirs(versioned, wrapper)
            }
        };
        let mut found = Vec::new();
        for dir in candidates {
            let tools = Tools::in_dir(dir.as_deref());
            match tools.probe() {
                Ok(tools) if tools.major >= server_major => return Ok(tools),
                Ok(tools) => found.push(tools.version),
                Err(_) if bin_dir.is_none() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::usage(if found.is_empty() {
            "pg_dump not found: install the PostgreSQL client (e.g. apt-get install postgresql-client) or set --pg-bin-dir".to_string()
        } else {
            format!(
                "{why}, so the PostgreSQL client tools must be version {server_major} or newer, but the newest found is {}: install postgresql-client-{server_major} or set --pg-bin-dir",
                found.join(", ")
            )
        }))
    }

    fn in_dir(dir: Option<&Path>) -> Tools {
        let at = |name: &str| match dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        };
        Tools {
            pg_dump: at("pg_dump"),
            pg_dumpall: at("pg_dumpall"),
            pg_restore: at("pg_restore"),
            psql: at("psql"),
            version: String::new(),
            major: 0,
        }
    }

    fn probe(mut self) -> Result<Tools> {
        let output = Command::new(&self.pg_dump)
            .arg("--version")
            .output()
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Usage,
                    format!("cannot run {}", self.pg_dump.display()),
                    e,
                )
            })?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
        self.major = parse_tool_major(&text).ok_or_else(|| {
            Error::usage(format!("cannot read the version of pg_dump from {text:?}"))
        })?;
        self.version = text;
        Ok(self)
    }
}

/// Where to look for the client tools, in order: `None` is `PATH`. Debian's and PGDG's
/// `/usr/bin/pg_dump` (and psql, pg_restore) is `pg_wrapper`, a Perl script that picks a
/// version and execs `/usr/lib/postgresql/<version>/bin/pg_dump`: about 50 ms of CPU and a
/// Perl start on every run, paid per database, per part of a split one and per restore
/// tool (a fifth of the client CPU of a restore of 13 databases, measured). When `PATH` has
/// the wrapper (and no cluster was chosen for it), the versioned directories come first,
/// newest first, which is the version the wrapper itself runs for a remote server; `PATH`
/// stays the fallback. A `PATH` tool of another kind (a source build in /usr/local) is the
/// user's choice and comes first.
fn tool_dirs(mut versioned: Vec<PathBuf>, path_has_wrapper: bool) -> Vec<Option<PathBuf>> {
    versioned.sort_by(|a, b| version_of_dir(b).cmp(&version_of_dir(a)).then(b.cmp(a)));
    let versioned = versioned.into_iter().map(Some);
    match path_has_wrapper {
        true => versioned.chain([None]).collect(),
        false => [None].into_iter().chain(versioned).collect(),
    }
}

/// `/usr/lib/postgresql/15/bin` → 15, so that 9.6 sorts below 15.
fn version_of_dir(dir: &Path) -> Option<u32> {
    let version = dir.parent()?.file_name()?.to_str()?;
    version.split('.').next()?.parse().ok()
}

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
}

fn is_pg_wrapper(tool: &Path) -> bool {
    std::fs::canonicalize(tool).is_ok_and(|real| real.file_name() == Some("pg_wrapper".as_ref()))
}

/// `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15.
fn parse_tool_major(text: &str) -> Option<u32> {
    text.split_whitespace()
        .find_map(|word| word.split('.').next()?.parse::<u32>().ok())
}

/// The tables a backup leaves out (`--exclude-table`, `--exclude-table-data`), as patterns
/// the server matches the way it does for pg_dump.
#[derive(Debug, Default)]
pub struct TableExclusions {
    pub tables: Vec<pattern::NamePattern>,
    pub data: Vec<pattern::NamePattern>,
}

impl TableExclusions {
    pub fn parse(tables: &[String], data: &[String]) -> Result<TableExclusions> {
        let parse = |flag: &str, patterns: &[String]| {
            patterns
                .iter()
                .map(|p| {
                    pattern::NamePattern::parse(p)
                        .map_err(|e| Error::usage(format!("{flag} {p}: {e}")))
                })
                .collect::<Result<Vec<_>>>()
        };
        Ok(TableExclusions {
            tables: parse("--exclude-table", tables)?,
            data: parse("--exclude-table-data", data)?,
        })
    }

    /// `schema.table` of every table in the database that one of `patterns` matches.
    async fn matching(
        client: &Client,
        patterns: &[pattern::NamePattern],
    ) -> Result<std::collections::BTreeSet<String>> {
        let mut found = std::collections::BTreeSet::new();
        for p in patterns {
            let rows = client
                .query(
                    "SELECT n.nspname::text || '.' || c.relname::text
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relname ~ $1
                        AND CASE WHEN $2::text IS NULL THEN pg_catalog.pg_table_is_visible(c.oid)
                                 ELSE n.nspname ~ $2 END",
                    &[&p.name, &p.schema],
                )
                .await
                .map_err(|e| {
                    Error::with_source(ErrorKind::Database, "matching --exclude-table patterns", e)
                })?;
            found.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        Ok(found)
    }
}

/// Rows of every table whose data pg_dump writes, by `schema.table`: ordinary and partition
/// tables outside the system schemas, not owned by an extension (pg_dump skips those), not
/// temporary. Backup records these in the manifest; `verify --deep` counts a restore the same
/// way. Tables the backup leaves out are not listed; those whose rows it leaves out count 0;
/// those `counted_elsewhere` (as their rows were read) are skipped.
pub async fn count_rows(
    client: &Client,
    exclusions: &TableExclusions,
    counted_elsewhere: &[TableName],
) -> Result<std::collections::BTreeMap<String, u64>> {
    let left_out = TableExclusions::matching(client, &exclusions.tables).await?;
    let emptied = TableExclusions::matching(client, &exclusions.data).await?;
    let tables = client
        .query(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND c.relpersistence <> 't'
                AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                   AND d.deptype = 'e')
              ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| Error::with_source(ErrorKind::Database, "listing tables", e))?;
    let mut counts = std::collections::BTreeMap::new();
    for row in tables {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let key = format!("{schema}.{table}");
        if left_out.contains(&key)
            || counted_elsewhere
                .iter()
                .any(|t| t.schema == schema && t.name == table)
        {
            continue;
        }
        if emptied.contains(&key) {
            counts.insert(key, 0);
            continue;
        }
        let count: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM ONLY {}.{}",
                    quote_ident(&schema),
                    quote_ident(&table)
                ),
                &[],
            )
            .await
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Database,
                    format!("counting the rows of {schema}.{table}"),
                    e,
                )
            })?
            .get(0);
        counts.insert(key, count as u64);
    }
    Ok(counts)
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quote a string literal for SQL.
pub fn quote_literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_statements_quote_every_name_and_drop_an_empty_column_list() {
        let table = TableName {
            schema: "Odd \"Schema\"".into(),
            name: "Mixed Case".into(),
        };
        let text = CopyText {
            columns: vec!["id".into(), "Total \"Amount\"".into()],
            encoding: "LATIN1".into(),
        };
        assert_eq!(
            text.copy_to(&table),
            r#"COPY "Odd ""Schema"""."Mixed Case" ("id", "Total ""Amount""") TO STDOUT WITH (ENCODING 'LATIN1')"#
        );
        assert_eq!(
            text.copy_from(&table),
            r#"COPY "Odd ""Schema"""."Mixed Case" ("id", "Total ""Amount""") FROM STDIN WITH (ENCODING 'LATIN1')"#
        );
        let none = CopyText {
            columns: Vec::new(),
            encoding: "UTF8".into(),
        };
        assert_eq!(
            none.copy_from(&table),
            r#"COPY "Odd ""Schema"""."Mixed Case" FROM STDIN WITH (ENCODING 'UTF8')"#
        );
    }

    #[test]
    fn the_versioned_tools_come_before_debians_perl_wrapper() {
        let dirs = [
            "/usr/lib/postgresql/9.6/bin",
            "/usr/lib/postgresql/17/bin",
            "/usr/lib/postgresql/15/bin",
        ]
        .map(PathBuf::from)
        .to_vec();
        let newest_first = [
            "/usr/lib/postgresql/17/bin",
            "/usr/lib/postgresql/15/bin",
            "/usr/lib/postgresql/9.6/bin",
        ]
        .map(|d| Some(PathBuf::from(d)));
        let wrapped = tool_dirs(dirs.clone(), true);
        assert_eq!(wrapped[..3], newest_first);
        assert_eq!(wrapped[3], None, "PATH is the fallback");
        let own = tool_dirs(dirs, false);
        assert_eq!(
            own[0], None,
            "a PATH tool that is not the wrapper is the user's choice"
        );
        assert_eq!(own[1..], newest_first);
        assert_eq!(tool_dirs(Vec::new(), true), vec![None]);
    }

    #[test]
    fn tool_versions() {
        assert_eq!(
            parse_tool_major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_tool_major("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_tool_major("nonsense"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("Sales \"Data\""), "\"Sales \"\"Data\"\"\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
    }

    #[test]
    fn child_env_carries_password_not_argv() {
        let url =
            SourceUrl::parse("postgres://kura:s3cr%3Et@db.local:5433/app?sslmode=prefer").unwrap();
        let conn = Connection::new(url).unwrap();
        let env = conn.child_env("shop");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PGPASSWORD"), Some("s3cr>t"));
        assert_eq!(get("PGHOST"), Some("db.local"));
        assert_eq!(get("PGPORT"), Some("5433"));
        assert_eq!(get("PGDATABASE"), Some("shop"));
        assert_eq!(get("PGSSLMODE"), Some("prefer"));
        let command = conn.command(Path::new("pg_dump"), "shop");
        assert_eq!(command.get_args().count(), 0);
    }
}
