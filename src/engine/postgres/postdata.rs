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

use tokio_util::sync::CancellationToken;

use super::preflight::query_error;
use super::Connection;
use crate::error::{Error, Result};

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
    /// Foreign keys lock two tables each: run one after another, so two of them can never
    /// wait for each other.
    pub foreign_keys: Vec<Entry>,
    /// Everything else (triggers, rules, policies, index attachments, comments, matview
    /// refreshes), in the script's order, after the two above.
    pub rest: Vec<Entry>,
}

impl PostData {
    pub fn parse(script: &str) -> PostData {
        let mut post = PostData::default();
        let mut settings: BTreeMap<String, String> = BTreeMap::new();
        let mut preamble = String::new();
        let mut current: Option<Entry> = None;
        for line in script.lines() {
            // psql meta-commands (`\restrict`, `\unrestrict` of pg_dump 15.14+): the
            // sessions here are not psql.
            if line.starts_with('\\') {
                continue;
            }
            if let Some(header) = line.strip_prefix("-- Name: ") {
                if let Some(done) = current.take() {
                    post.push(done);
                }
                let name = header.split("; Type: ").next().unwrap_or("").to_string();
                let kind = header
                    .split("; Type: ")
                    .nth(1)
                    .and_then(|rest| rest.split(';').next())
                    .unwrap_or("")
                    .to_string();
                let mut sql = String::new();
                for set in settings.values() {
                    sql.push_str(set);
                    sql.push('\n');
                }
                current = Some(Entry { kind, name, sql });
                continue;
            }
            if let Some(rest) = line.strip_prefix("SET ") {
                if let Some((name, _)) = rest.split_once(" = ") {
                    settings.insert(name.trim().to_string(), line.to_string());
                }
            }
            if line.starts_with("--") {
                continue;
            }
            match current.as_mut() {
                Some(entry) => {
                    entry.sql.push_str(line);
                    entry.sql.push('\n');
                }
                None => {
                    preamble.push_str(line);
                    preamble.push('\n');
                }
            }
        }
        if let Some(done) = current.take() {
            post.push(done);
        }
        post.preamble = preamble;
        post
    }

    fn push(&mut self, entry: Entry) {
        match entry.kind.as_str() {
            "INDEX" | "CONSTRAINT" => self.builds.push(entry),
            "FK CONSTRAINT" => self.foreign_keys.push(entry),
            _ => self.rest.push(entry),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.builds.is_empty() && self.foreign_keys.is_empty() && self.rest.is_empty()
    }

    /// Run every entry in `database`: the builds on up to `jobs` sessions, then the foreign
    /// keys and the rest on one. Stops at the first failure (the others finish their current
    /// statement, or are ended by the caller dropping the database) and on `cancel`.
    pub async fn run(
        &self,
        target: &Connection,
        database: &str,
        jobs: usize,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let queue = Mutex::new(self.builds.iter().collect::<VecDeque<_>>());
        let failed = CancellationToken::new();
        let sessions = jobs.clamp(1, self.builds.len().max(1));
        let workers = (0..sessions).map(|_| async {
            let client = self.session(target, database).await?;
            loop {
                if cancel.is_cancelled() {
                    return Err(Error::interrupted());
                }
                if failed.is_cancelled() {
                    return Ok(());
                }
                let Some(entry) = queue.lock().expect("queue lock").pop_front() else {
                    return Ok(());
                };
                if let Err(e) = run_entry(&client, target, entry, cancel).await {
                    failed.cancel();
                    return Err(e);
                }
            }
        });
        let outcomes = futures::future::join_all(workers).await;
        if let Some(err) = outcomes.into_iter().find_map(|o| o.err()) {
            return Err(err);
        }
        let client = self.session(target, database).await?;
        for entry in self.foreign_keys.iter().chain(&self.rest) {
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
        // The caller drops the database (WITH FORCE), which ends this session's statement.
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
        assert_eq!(kinds(&post.foreign_keys), ["u u_t_fkey"]);
        assert_eq!(kinds(&post.rest), ["t audit"]);
        // t_w follows t_v in the script with no SET of its own: it is still in `fast`.
        assert!(post.builds[2]
            .sql
            .contains("SET default_tablespace = fast;"));
        assert!(post.builds[2].sql.contains("CREATE INDEX t_w"));
        assert!(post.builds[0].sql.contains("SET default_tablespace = '';"));
        assert!(post.foreign_keys[0]
            .sql
            .contains("SET default_tablespace = '';"));
        assert!(!post.rest[0].sql.contains("unrestrict"));
        assert!(!post.rest[0].sql.contains("dump complete"));
    }

    #[test]
    fn an_empty_section_has_no_entries() {
        let post = PostData::parse("--\n-- PostgreSQL database dump\n--\nSET x = 1;\n");
        assert!(post.is_empty());
    }
}
