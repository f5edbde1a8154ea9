//! What kura learns from the server before dumping anything: version, privileges, and each
//! database's properties, which the manifest keeps so restore can recreate the database.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::{quote_ident, quote_literal, Connection};
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// `server_version`, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub version: String,
    pub major: u32,
    pub current_user: String,
    pub is_superuser: bool,
    pub databases: Vec<DatabaseProps>,
}

/// One privilege from a database's ACL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// A role name, or `PUBLIC`.
    pub grantee: String,
    pub privilege: String,
    pub grantable: bool,
}

/// `ALTER DATABASE … SET` (role `None`) or `ALTER ROLE … IN DATABASE … SET`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    pub role: Option<String>,
    pub name: String,
    pub value: String,
}

/// Everything about a database that lives outside its own dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseProps {
    pub name: String,
    pub owner: String,
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    /// `c` (libc) or `i` (ICU); PostgreSQL 15+.
    pub locale_provider: Option<String>,
    pub icu_locale: Option<String>,
    pub connection_limit: i32,
    pub size_bytes: i64,
    pub comment: Option<String>,
    /// `None` means the default privileges (the database's ACL was never changed).
    pub grants: Option<Vec<Grant>>,
    pub settings: Vec<Setting>,
}

pub async fn inspect(connection: &Connection) -> Result<ServerInfo> {
    let database = connection.maintenance_database();
    let client = connection.connect(&database).await?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int, \
             current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(|e| query_error(connection, "reading the server version", e))?;
    let version_num: i32 = row.get(1);
    let major = (version_num / 10000) as u32;
    let databases = list_databases(&client, connection, major).await?;
    Ok(ServerInfo {
        version: row.get(0),
        major,
        current_user: row.get(2),
        is_superuser: row.get::<_, Option<bool>>(3).unwrap_or(false),
        databases,
    })
}

/// A failed statement is `Failed` (retrying will not help); a lost connection is `Database`.
pub fn query_error(connection: &Connection, what: &str, err: tokio_postgres::Error) -> Error {
    let detail = err
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| err.to_string());
    let kind = if err.is_closed() || err.as_db_error().is_none() {
        ErrorKind::Database
    } else {
        ErrorKind::Failed
    };
    Error::with_source(
        kind,
        format!("{what} on {}: {detail}", connection.redacted()),
        err,
    )
}

/// Databases that hold data (no templates, none that refuse connections), with their props.
pub async fn list_databases(
    client: &Client,
    connection: &Connection,
    major: u32,
) -> Result<Vec<DatabaseProps>> {
    let locale_columns = if major >= 15 {
        "d.datlocprovider::text, d.daticulocale"
    } else {
        "NULL::text, NULL::text"
    };
    let sql = format!(
        "SELECT d.datname, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), \
                d.datcollate, d.datctype, {locale_columns}, d.datconnlimit, \
                pg_database_size(d.oid), shobj_description(d.oid, 'pg_database'), \
                CASE WHEN d.datacl IS NULL THEN NULL ELSE \
                  (SELECT coalesce(json_agg(json_build_object( \
                     'grantee', CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, \
                     'privilege', a.privilege_type, 'grantable', a.is_grantable)), '[]'::json)::text \
                   FROM aclexplode(d.datacl) a) END, \
                (SELECT coalesce(json_agg(json_build_object( \
                     'role', CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, \
                     'config', s.setconfig)), '[]'::json)::text \
                 FROM pg_db_role_setting s WHERE s.setdatabase = d.oid) \
         FROM pg_database d \
         WHERE NOT d.datistemplate AND d.datallowconn \
         ORDER BY d.datname"
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| query_error(connection, "listing databases", e))?;
    rows.iter()
        // pg_database_size is NULL for a database dropped while this query ran (another
        // session's DROP DATABASE): it is gone, so it is not listed.
        .filter(|row| row.get::<_, Option<i64>>(8).is_some())
        .map(|row| {
            let grants: Option<String> = row.get(10);
            let settings_json: String = row.get(11);
            Ok(DatabaseProps {
                name: row.get(0),
                owner: row.get(1),
                encoding: row.get(2),
                collate: row.get(3),
                ctype: row.get(4),
                locale_provider: row.get(5),
                icu_locale: row.get(6),
                connection_limit: row.get(7),
                size_bytes: row.get(8),
                comment: row.get(9),
                grants: grants
                    .map(|g| serde_json::from_str(&g))
                    .transpose()
                    .map_err(|e| Error::failed(format!("reading database privileges: {e}")))?,
                settings: parse_settings(&settings_json)?,
            })
        })
        .collect()
}

fn parse_settings(json: &str) -> Result<Vec<Setting>> {
    #[derive(Deserialize)]
    struct Row {
        role: Option<String>,
        config: Vec<String>,
    }
    let rows: Vec<Row> = serde_json::from_str(json)
        .map_err(|e| Error::failed(format!("reading database settings: {e}")))?;
    Ok(rows
        .into_iter()
        .flat_map(|row| {
            let role = row.role;
            row.config.into_iter().filter_map(move |entry| {
                let (name, value) = entry.split_once('=')?;
                Some(Setting {
                    role: role.clone(),
                    name: name.to_string(),
                    value: value.to_string(),
                })
            })
        })
        .collect())
}

/// Settings whose value is a list that pg_dump quotes element by element.
const LIST_SETTINGS: &[&str] = &[
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
    "shared_preload_libraries",
    "local_preload_libraries",
    "unix_socket_directories",
];

impl DatabaseProps {
    /// `CREATE DATABASE` for `target` reproducing encoding, locale and owner.
    pub fn create_statement(&self, target: &str, owner_exists: bool) -> String {
        let mut sql = format!(
            "CREATE DATABASE {} WITH TEMPLATE = template0 ENCODING = {}",
            quote_ident(target),
            quote_literal(&self.encoding)
        );
        match (self.locale_provider.as_deref(), &self.icu_locale) {
            (Some("i"), Some(icu)) => sql.push_str(&format!(
                " LOCALE_PROVIDER = icu ICU_LOCALE = {}",
                quote_literal(icu)
            )),
            (Some("c"), _) => sql.push_str(" LOCALE_PROVIDER = libc"),
            _ => {}
        }
        sql.push_str(&format!(
            " LC_COLLATE = {} LC_CTYPE = {}",
            quote_literal(&self.collate),
            quote_literal(&self.ctype)
        ));
        if owner_exists {
            sql.push_str(&format!(" OWNER = {}", quote_ident(&self.owner)));
        }
        if self.connection_limit != -1 {
            sql.push_str(&format!(" CONNECTION LIMIT = {}", self.connection_limit));
        }
        sql
    }

    /// Settings, privileges and comment for `target`, run after its contents are restored.
    pub fn property_statements(&self, target: &str) -> Vec<String> {
        let db = quote_ident(target);
        let mut statements = Vec::new();
        if let Some(comment) = &self.comment {
            statements.push(format!(
                "COMMENT ON DATABASE {db} IS {}",
                quote_literal(comment)
            ));
        }
        for setting in &self.settings {
            let value = if LIST_SETTINGS.contains(&setting.name.as_str()) {
                setting
                    .value
                    .split(',')
                    .map(|v| quote_literal(v.trim().trim_matches('"')))
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                quote_literal(&setting.value)
            };
            let name = quote_ident(&setting.name);
            statements.push(match &setting.role {
                None => format!("ALTER DATABASE {db} SET {name} = {value}"),
                Some(role) => format!(
                    "ALTER ROLE {} IN DATABASE {db} SET {name} = {value}",
                    quote_ident(role)
                ),
            });
        }
        if let Some(grants) = &self.grants {
            // An explicit ACL replaces the defaults, so start from nothing, as pg_dump does.
            statements.push(format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"));
            statements.push(format!(
                "REVOKE ALL ON DATABASE {db} FROM {}",
                quote_ident(&self.owner)
            ));
            for grant in grants {
                let grantee = if grant.grantee == "PUBLIC" {
                    "PUBLIC".to_string()
                } else {
                    quote_ident(&grant.grantee)
                };
                statements.push(format!(
                    "GRANT {} ON DATABASE {db} TO {grantee}{}",
                    grant.privilege,
                    if grant.grantable {
                        " WITH GRANT OPTION"
                    } else {
                        ""
                    }
                ));
            }
        }
        statements
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> DatabaseProps {
        DatabaseProps {
            name: "Sales Data".into(),
            owner: "app".into(),
            encoding: "LATIN1".into(),
            collate: "C".into(),
            ctype: "C".into(),
            locale_provider: Some("c".into()),
            icu_locale: None,
            connection_limit: 20,
            size_bytes: 1,
            comment: Some("it's ours".into()),
            grants: Some(vec![Grant {
                grantee: "reporting".into(),
                privilege: "CONNECT".into(),
                grantable: false,
            }]),
            settings: vec![
                Setting {
                    role: None,
                    name: "search_path".into(),
                    value: "app, public".into(),
                },
                Setting {
                    role: Some("reporting".into()),
                    name: "work_mem".into(),
                    value: "64MB".into(),
                },
            ],
        }
    }

    #[test]
    fn create_reproduces_encoding_locale_owner() {
        assert_eq!(
            props().create_statement("copy", true),
            "CREATE DATABASE \"copy\" WITH TEMPLATE = template0 ENCODING = 'LATIN1' LOCALE_PROVIDER = libc LC_COLLATE = 'C' LC_CTYPE = 'C' OWNER = \"app\" CONNECTION LIMIT = 20"
        );
    }

    #[test]
    fn properties_follow_the_target_name() {
        let statements = props().property_statements("copy");
        assert_eq!(
            statements,
            vec![
                "COMMENT ON DATABASE \"copy\" IS 'it''s ours'",
                "ALTER DATABASE \"copy\" SET \"search_path\" = 'app', 'public'",
                "ALTER ROLE \"reporting\" IN DATABASE \"copy\" SET \"work_mem\" = '64MB'",
                "REVOKE ALL ON DATABASE \"copy\" FROM PUBLIC",
                "REVOKE ALL ON DATABASE \"copy\" FROM \"app\"",
                "GRANT CONNECT ON DATABASE \"copy\" TO \"reporting\"",
            ]
        );
    }

    #[test]
    fn settings_parse() {
        let parsed =
            parse_settings(r#"[{"role":null,"config":["a=1","search_path=x, y"]}]"#).unwrap();
        assert_eq!(parsed[1].value, "x, y");
    }
}
