//! The post-data section of a dump (indexes, constraints, triggers, …) run on several
//! sessions, the way `pg_restore -j` runs it: index and constraint builds side by side, then
//! foreign keys, then the rest in the dump's order.
//!
//! The input is `pg_restore --section=post-data --file=-`: a script of entries, each under
//! its `-- Name: …; Type: …; Schema: …; Owner: …` header. pg_restore writes a `SET` only when
//! a setting changes from the entry before, so each entry here carries every setting in force
//! at its header: run on any session, it means what it meant in the script.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::preflight::query_error;
use super::Connection;
use crate::error::{Error, ErrorKind, Result};

/// One entry of the script: its type (`INDEX`, `FK CONSTRAINT`, …) and its SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: String,
    pub name: String,
    pub sql: String,
}

/// The script split into what may run side by side and what must not.
#[derive(Debug, Default)]
pub struct PostData {
    /// The settings before the first entry (search_path, standard_conforming_strings, …).
    pub preamble: String,
    /// Indexes and constraints other than foreign keys: each locks one table, so any
    /// number run at once without deadlocks (two on the same table take turns).
    pub builds: Vec<Entry>,
    /// Everything else, in the script's order, on one session after the builds: foreign
    /// keys (they lock two tables each, so two must never wait for each other, and one to
    /// a partitioned table needs the `INDEX ATTACH` entries before it), triggers, rules,
    /// policies, comments, materialized view refreshes.
    pub in_order: Vec<Entry>,
}

/// While parsing: the preamble (no head) or one entry, with the settings it starts with.
#[derive(Default)]
struct Chunk<'a> {
    head: Option<(String, String)>,
    settings: String,
    lines: Vec<&'a str>,
}

/// The name of the setting a line sets, if it is one of the `SET name = value;` lines
/// pg_restore writes between entries: only the settings it changes per entry, and only a
/// whole statement (a line of a multi-line string that happens to start with `SET ` is not).
fn setting(line: &str) -> Option<String> {
    const PER_ENTRY: [&str; 4] = [
        "default_tablespace",
        "default_table_access_method",
        "default_with_oids",
        "search_path",
    ];
    let (name, value) = line.strip_prefix("SET ")?.split_once(" = ")?;
    let value = value.strip_suffix(';')?;
    let whole = !value.contains(';') && value.matches('\'').count() % 2 == 0;
    (PER_ENTRY.contains(&name) && whole).then(|| name.to_string())
}

impl PostData {
    /// The script as pg_restore printed it, in the dump's encoding, for kura's sessions,
    /// which speak UTF-8: a script that is not UTF-8 already is converted by the server
    /// (PostgreSQL knows every encoding a database can have), in `database`.
    pub async fn from_script(
        script: Vec<u8>,
        target: &Connection,
        database: &str,
    ) -> Result<PostData> {
        let encoding = script_encoding(&script).unwrap_or("UTF8").to_string();
        let unconvertible = |reason: &str| {
            Error::failed(format!(
                "the indexes, constraints or comments of this {encoding} database hold text that \
                 is not valid {encoding} or has no UTF-8 form ({reason}); kura's sessions speak \
                 UTF-8: restore it with --jobs 1, which runs the script through psql as it is"
            ))
        };
        let converted =
            super::convert_encoding(target, &mut None, database, &script, &encoding, "UTF8")
                .await?
                .map_err(|reason| unconvertible(&reason))?;
        let text = String::from_utf8(converted).map_err(|_| unconvertible("not UTF-8"))?;
        Ok(PostData::parse(&in_utf8(&text)))
    }

    pub fn parse(script: &str) -> PostData {
        let mut settings: BTreeMap<String, String> = BTreeMap::new();
        // The preamble, then one chunk per entry.
        let mut chunks = vec![Chunk::default()];
        let lines: Vec<&str> = script.split('\n').collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            // An entry starts at its header block, `--` / `-- Name: …` / `--`; a line like it
            // inside a multi-line string literal (a COMMENT's text) is not alone like that.
            let header = line
                .strip_prefix("-- Name: ")
                .filter(|_| i > 0 && lines[i - 1] == "--" && lines.get(i + 1) == Some(&"--"));
            let Some(header) = header else {
                // psql meta-commands around the script (`\restrict`, `\unrestrict` of
                // pg_dump 15.14+): the sessions here are not psql.
                if !line.starts_with("\\restrict ") && !line.starts_with("\\unrestrict ") {
                    chunks
                        .last_mut()
                        .expect("one chunk at least")
                        .lines
                        .push(line);
                }
                i += 1;
                continue;
            };
            // pg_restore writes the SETs an entry needs just before its header block: they
            // belong to it, and to every entry after it until changed.
            let previous = &mut chunks.last_mut().expect("one chunk at least").lines;
            previous.pop(); // the header block's first `--`
            let mut kept = previous.len();
            while kept > 0 {
                let candidate = previous[kept - 1];
                if candidate.trim().is_empty() || setting(candidate).is_some() {
                    kept -= 1;
                } else {
                    break;
                }
            }
            for moved in previous.drain(kept..) {
                if let Some(name) = setting(moved) {
                    settings.insert(name, moved.to_string());
                }
            }
            let mut parts = header.split("; Type: ");
            let name = parts.next().unwrap_or("").to_string();
            let kind = parts
                .next()
                .and_then(|rest| rest.split(';').next())
                .unwrap_or("")
                .to_string();
            chunks.push(Chunk {
                head: Some((kind, name)),
                settings: settings.values().cloned().collect::<Vec<_>>().join("\n"),
                lines: Vec::new(),
            });
            i += 2;
        }
        let mut post = PostData::default();
        for chunk in chunks {
            let text = chunk.lines.join("\n");
            match chunk.head {
                None => post.preamble = text,
                Some((kind, name)) => post.push(Entry {
                    kind,
                    name,
                    sql: format!("{}\n{text}", chunk.settings),
                }),
            }
        }
        post
    }

    fn push(&mut self, entry: Entry) {
        match entry.kind.as_str() {
            "INDEX" | "CONSTRAINT" => self.builds.push(entry),
            _ => self.in_order.push(entry),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.builds.is_empty() && self.in_order.is_empty()
    }

    /// Run every entry in `database`: the builds on up to `jobs` sessions, then the rest
    /// on one. Every statement holds a permit of `budget`, shared by all the databases a
    /// restore builds at once, so `--jobs` bounds the index builds of the whole run (and the
    /// memory each takes, `maintenance_work_mem`), not of each database. The first failure
    /// stops the other sessions at once (their statements end when the caller drops the
    /// database); so does `cancel`.
    pub async fn run(
        &self,
        target: &Connection,
        database: &str,
        jobs: usize,
        budget: &Semaphore,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let queue = Mutex::new(self.builds.iter().collect::<VecDeque<_>>());
        let stop = cancel.child_token();
        let sessions = jobs.clamp(1, self.builds.len().max(1));
        let workers = (0..sessions).map(|_| async {
            let mut client = None;
            loop {
                let permit = tokio::select! {
                    permit = budget.acquire() => permit.expect("the budget is never closed"),
                    _ = stop.cancelled() => return Err(Error::interrupted()),
                };
                let Some(entry) = queue.lock().expect("queue lock").pop_front() else {
                    return Ok(());
                };
                if client.is_none() {
                    client = Some(self.session(target, database).await?);
                }
                let session = client.as_ref().expect("just connected");
                let ran = run_entry(session, target, entry, &stop).await;
                drop(permit);
                if let Err(err) = ran {
                    stop.cancel();
                    return Err(err);
                }
            }
        });
        let outcomes = futures::future::join_all(workers).await;
        // The failure that stopped the others, not the interruptions it caused.
        let mut errors = outcomes
            .into_iter()
            .filter_map(|o| o.err())
            .collect::<Vec<_>>();
        if !errors.is_empty() {
            let first = errors
                .iter()
                .position(|e| e.kind() != ErrorKind::Interrupted)
                .unwrap_or(0);
            return Err(errors.swap_remove(first));
        }
        if self.in_order.is_empty() {
            return Ok(());
        }
        let client = self.session(target, database).await?;
        for entry in &self.in_order {
            let _permit = budget.acquire().await.expect("the budget is never closed");
            run_entry(&client, target, entry, cancel).await?;
        }
        Ok(())
    }

    async fn session(&self, target: &Connection, database: &str) -> Result<tokio_postgres::Client> {
        let client = target.connect(database).await?;
        client
            .batch_execute(&self.preamble)
            .await
            .map_err(|e| query_error(target, "setting up a post-data session", e))?;
        Ok(client)
    }
}

/// The encoding pg_restore names in the script's header, `SET client_encoding = 'LATIN1';`.
fn script_encoding(script: &[u8]) -> Option<&str> {
    script
        .split(|b| *b == b'\n')
        .find_map(|line| {
            line.strip_prefix(b"SET client_encoding = '")?
                .strip_suffix(b"';")
        })
        .and_then(|name| std::str::from_utf8(name).ok())
}

/// The script with its encoding line, the header's first setting of it, saying what it now
/// is (a line like it further on may be inside a string, and is left alone).
fn in_utf8(script: &str) -> String {
    let mut said = false;
    script
        .split_inclusive('\n')
        .map(
            |line| match !said && line.starts_with("SET client_encoding = '") {
                true => {
                    said = true;
                    "SET client_encoding = 'UTF8';\n"
                }
                false => line,
            },
        )
        .collect()
}

async fn run_entry(
    client: &tokio_postgres::Client,
    target: &Connection,
    entry: &Entry,
    cancel: &CancellationToken,
) -> Result<()> {
    tokio::select! {
        done = client.batch_execute(&entry.sql) => done.map_err(|e| {
            query_error(target, &format!("creating {} {}", entry.kind.to_lowercase(), entry.name), e)
        }),
        // The caller drops the database (ending its sessions first), which ends this
        // session's statement.
        _ = cancel.cancelled() => Err(Error::interrupted()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "--
-- PostgreSQL database dump
--

\\restrict abc123
-- Dumped from database version 15.18

SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);
SET default_tablespace = '';

--
-- Name: t t_pkey; Type: CONSTRAINT; Schema: public; Owner: app
--

ALTER TABLE ONLY public.t
    ADD CONSTRAINT t_pkey PRIMARY KEY (id);


SET default_tablespace = fast;

--
-- Name: t_v; Type: INDEX; Schema: public; Owner: app
--

CREATE INDEX t_v ON public.t USING btree (v);


--
-- Name: t_w; Type: INDEX; Schema: public; Owner: app
--

CREATE INDEX t_w ON public.t USING btree (w);


SET default_tablespace = '';

--
-- Name: u u_t_fkey; Type: FK CONSTRAINT; Schema: public; Owner: app
--

ALTER TABLE ONLY public.u
    ADD CONSTRAINT u_t_fkey FOREIGN KEY (t) REFERENCES public.t(id);


--
-- Name: t audit; Type: TRIGGER; Schema: public; Owner: app
--

CREATE TRIGGER audit AFTER INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION public.audit();


--
-- PostgreSQL database dump complete
--

\\unrestrict abc123
";

    #[test]
    fn entries_are_sorted_into_phases_with_the_settings_in_force() {
        let post = PostData::parse(SCRIPT);
        assert!(post.preamble.contains("SET client_encoding = 'UTF8';"));
        assert!(post
            .preamble
            .contains("set_config('search_path', '', false)"));
        assert!(!post.preamble.contains("restrict"));
        let kinds =
            |entries: &[Entry]| -> Vec<String> { entries.iter().map(|e| e.name.clone()).collect() };
        assert_eq!(kinds(&post.builds), ["t t_pkey", "t_v", "t_w"]);
        assert_eq!(kinds(&post.in_order), ["u u_t_fkey", "t audit"]);
        // t_w follows t_v in the script with no SET of its own: it is still in `fast`.
        assert!(post.builds[2]
            .sql
            .contains("SET default_tablespace = fast;"));
        assert!(post.builds[2].sql.contains("CREATE INDEX t_w"));
        // A SET before a header is the next entry's, not the tail of the one before.
        assert!(post.builds[0].sql.contains("SET default_tablespace = '';"));
        assert!(
            !post.builds[0].sql.contains("fast"),
            "{}",
            post.builds[0].sql
        );
        assert!(post.in_order[0]
            .sql
            .contains("SET default_tablespace = '';"));
        assert!(!post.in_order[1].sql.contains("unrestrict"));
    }

    #[test]
    fn a_comment_whose_text_looks_like_the_script_is_kept_whole() {
        let script = "SET client_encoding = 'UTF8';

--
-- Name: INDEX t_v; Type: COMMENT; Schema: public; Owner: app
--

COMMENT ON INDEX public.t_v IS 'first line
--
-- Name: not a header; Type: INDEX; Schema: x; Owner: y
\\restrict-like text
SET default_tablespace = fast;';

--
-- Name: t_w; Type: INDEX; Schema: public; Owner: app
--

CREATE INDEX t_w ON public.t USING btree (w);
";
        let post = PostData::parse(script);
        assert_eq!(post.in_order.len(), 1);
        let sql = &post.in_order[0].sql;
        for kept in [
            "-- Name: not a header; Type: INDEX",
            "\\restrict-like text",
            "SET default_tablespace = fast;';",
        ] {
            assert!(sql.contains(kept), "{kept:?} lost from {sql}");
        }
        // The string's last line is not a setting of the entry after it.
        assert_eq!(post.builds.len(), 1);
        assert!(
            !post.builds[0].sql.contains("fast"),
            "{}",
            post.builds[0].sql
        );
    }

    #[test]
    fn the_scripts_encoding_is_read_and_then_said_to_be_utf8() {
        let script = b"SET statement_timeout = 0;\nSET client_encoding = 'LATIN1';\nCREATE INDEX \"caf\xe9\" ON t (x);\n";
        assert_eq!(script_encoding(script), Some("LATIN1"));
        assert_eq!(script_encoding(b"SET x = 1;\n"), None);
        assert_eq!(
            in_utf8(
                "SET client_encoding = 'LATIN1';\nCOMMENT ON INDEX \"café\" IS 'x\nSET client_encoding = ''LATIN1'';';\n"
            ),
            "SET client_encoding = 'UTF8';\nCOMMENT ON INDEX \"café\" IS 'x\nSET client_encoding = ''LATIN1'';';\n"
        );
    }

    #[test]
    fn an_empty_section_has_no_entries() {
        let post = PostData::parse("--\n-- PostgreSQL database dump\n--\nSET x = 1;\n");
        assert!(post.is_empty());
    }
}
