//! `kura restore` for CouchDB: recreate each database with its properties and write every
//! document revision back with `new_edits: false`, so revision ids, conflicts and deletions
//! are exactly those of the backup and replication peers recognise them.
//!
//! Order: `_revs_limit` (CouchDB trims histories to it as they are written), documents in
//! batches bounded by bytes, then design documents (so a `validate_doc_update` cannot reject
//! restored data), then `_security`.
//! CouchDB has no transactions. Into a new database the part streams while its SHA-256 is
//! checked, and a corrupt part fails the restore naming it and the database is deleted again;
//! into an existing database (`--force`, or an empty one) the part is checked whole first.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::{Client, DATABASE_KIND};
use crate::catalog::{Manifest, Part};
use crate::engine::{select_parts, DatabaseMapping, RestoreContext};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::progress::{human_bytes, ProgressLine};

pub struct CouchRestore {
    pub target: Arc<Client>,
    pub databases: Vec<DatabaseMapping>,
    pub force: bool,
    /// Upper bound of one `_bulk_docs` request body; some servers and proxies cap it.
    pub batch_bytes: usize,
}

#[derive(Debug, Default)]
pub struct RestoreSummary {
    pub databases: Vec<String>,
    pub revisions: u64,
    pub raw_bytes: u64,
}

impl CouchRestore {
    pub async fn run(
        &self,
        ctx: &RestoreContext<'_>,
        manifest: &Manifest,
    ) -> Result<RestoreSummary> {
        let selected = select_parts(manifest, DATABASE_KIND, &self.databases)?;
        let mut steps = Vec::new();
        let mut occupied = Vec::new();
        for (part, target) in selected {
            let info = self
                .target
                .json(
                    Method::GET,
                    &Client::db_path(&target, ""),
                    None,
                    "checking the target database",
                )
                .await;
            let exists = match info {
                Ok(info) => {
                    let wanted = part.properties["partitioned"].as_bool().unwrap_or(false);
                    let actual = info["props"]["partitioned"].as_bool().unwrap_or(false);
                    if wanted != actual {
                        return Err(Error::usage(format!(
                            "database {:?} on CouchDB {} is {}partitioned but the backup of {:?} is {}: restore under another name with --database SRC:DST",
                            target,
                            self.target.redacted(),
                            if actual { "" } else { "not " },
                            part.name,
                            if wanted { "partitioned" } else { "not partitioned" }
                        )));
                    }
                    let used = info["doc_count"].as_u64().unwrap_or(0)
                        + info["doc_del_count"].as_u64().unwrap_or(0);
                    if used > 0 && !self.force {
                        occupied.push(target.clone());
                    }
                    true
                }
                Err(e) if e.kind() == ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            steps.push((part, target, exists));
        }
        if !occupied.is_empty() {
            return Err(Error::new(
                ErrorKind::TargetNotEmpty,
                format!(
                    "refusing to restore: database {} on CouchDB {} already hold(s) documents; restore under another name with --database SRC:DST, or pass --force to add only the revisions that are missing",
                    occupied.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(", "),
                    self.target.redacted()
                ),
            ));
        }

        let line = ProgressLine::start("restoring", ctx.show_progress);
        let mut summary = RestoreSummary::default();
        for (part, target, exists) in steps {
            let started = Instant::now();
            line.progress().set_label(&target);
            let key = ctx.path.object_key(&ctx.backup_id, &part.key);
            if exists {
                // No transactions in CouchDB: a database that already exists is only written
                // to once the whole part is known to be intact.
                pipeline::read_verified(
                    ctx.store,
                    &key,
                    &part.digest(),
                    None,
                    &ctx.cancel,
                    |input: &mut dyn Read| Ok(std::io::copy(input, &mut std::io::sink())?),
                )
                .await
                .map_err(|e| {
                    e.context(format!(
                        "checking the backup of {:?} before writing into the existing {target:?}",
                        part.name
                    ))
                })?;
            } else {
                self.create_database(&target, part).await?;
            }
            let writer = Writer {
                client: Arc::clone(&self.target),
                db: target.clone(),
                force: self.force && exists,
                batch_bytes: self.batch_bytes,
                handle: tokio::runtime::Handle::current(),
                in_flight: Default::default(),
            };
            let result = pipeline::read_verified(
                ctx.store,
                &key,
                &part.digest(),
                Some(line.progress()),
                &ctx.cancel,
                move |input: &mut dyn Read| {
                    let mut writer = writer;
                    writer.restore(input)
                },
            )
            .await;
            let revisions = match result {
                Ok(revisions) => revisions,
                Err(err) => {
                    if !exists {
                        let path = Client::db_path(&target, "");
                        if let Err(e) = self
                            .target
                            .json(
                                Method::DELETE,
                                &path,
                                None,
                                "removing the half-restored database",
                            )
                            .await
                        {
                            tracing::warn!(database = %target, error = %e, "could not delete the database created for the failed restore");
                        }
                    }
                    let err = if ctx.cancel.is_cancelled() {
                        Error::interrupted()
                    } else {
                        err
                    };
                    return Err(err.context(format!(
                        "restoring CouchDB database {:?} into {target:?}",
                        part.name
                    )));
                }
            };
            tracing::info!(
                database = %target,
                source_database = %part.name,
                revisions,
                seconds = started.elapsed().as_secs_f64(),
                "database {target:?} restored from {:?}: {revisions} revisions ({})",
                part.name,
                human_bytes(part.raw_bytes)
            );
            summary.revisions += revisions;
            summary.raw_bytes += part.raw_bytes;
            summary.databases.push(target);
        }
        line.finish().await;
        Ok(summary)
    }
}

impl CouchRestore {
    async fn create_database(&self, target: &str, part: &Part) -> Result<()> {
        let mut path = Client::db_path(target, "");
        if part.properties["partitioned"].as_bool().unwrap_or(false) {
            path.push_str("?partitioned=true");
        }
        let response = self.target.request(Method::PUT, &path, None).await?;
        match response.status() {
            StatusCode::CREATED | StatusCode::ACCEPTED => Ok(()),
            // A retried PUT whose first attempt got through: it was checked missing just before.
            StatusCode::PRECONDITION_FAILED => Ok(()),
            status => {
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                Err(Error::failed(format!(
                    "creating database {target:?} on CouchDB {}: HTTP {status}: {} {}",
                    self.target.redacted(),
                    answer["error"].as_str().unwrap_or(""),
                    answer["reason"].as_str().unwrap_or("")
                )))
            }
        }
    }
}

/// `_bulk_docs` batches written at the same time.
const WRITES_IN_FLIGHT: usize = 4;

async fn post_bulk_docs(client: Arc<Client>, db: String, body: Bytes) -> Result<()> {
    let size = body.len();
    let path = Client::db_path(&db, "_bulk_docs");
    let response = client.request(Method::POST, &path, Some(body)).await?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return Err(Error::usage(format!(
            "CouchDB {} refused a {size} byte request as too large: lower --batch-bytes, or raise the server's max_http_request_size if a single document is that large",
            client.redacted()
        )));
    }
    if !status.is_success() {
        return Err(Error::failed(format!(
            "writing documents into {db:?} on CouchDB {}: HTTP {status}: {} {}",
            client.redacted(),
            answer["error"].as_str().unwrap_or(""),
            answer["reason"].as_str().unwrap_or("")
        )));
    }
    // With new_edits=false CouchDB answers [] on success; PouchDB lists every write, with
    // `error` set on failures.
    if let Some(failed) = answer
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r.get("error").is_some())
    {
        return Err(Error::failed(format!(
            "CouchDB {} rejected document {} in {db:?}: {} {}",
            client.redacted(),
            failed["id"],
            failed["error"].as_str().unwrap_or(""),
            failed["reason"].as_str().unwrap_or("")
        )));
    }
    Ok(())
}

/// The blocking side of a restore: parses lines and drives HTTP through the runtime handle.
struct Writer {
    client: Arc<Client>,
    db: String,
    force: bool,
    batch_bytes: usize,
    handle: tokio::runtime::Handle,
    in_flight: std::collections::VecDeque<tokio::task::JoinHandle<Result<()>>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // A failed restore stops writing at once; nothing more lands in the target.
        for task in &self.in_flight {
            task.abort();
        }
    }
}

impl Writer {
    fn restore(&mut self, input: &mut dyn Read) -> Result<u64> {
        let mut reader = BufReader::with_capacity(1 << 20, input);
        let mut line = Vec::new();
        let mut header: Option<Value> = None;
        let mut batch: Vec<Value> = Vec::new();
        let mut batch_size = 0usize;
        let mut design: Vec<(usize, Value)> = Vec::new();
        let mut revisions = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            let value: Value = serde_json::from_slice(&line).map_err(|e| {
                Error::integrity(format!(
                    "the backup of {:?} holds a line that is not JSON: {e}",
                    self.db
                ))
            })?;
            if header.is_none() {
                if value["kura"] != "couchdb-database" {
                    return Err(Error::integrity(
                        "the part does not start with a kura CouchDB header",
                    ));
                }
                // Before any document: CouchDB trims each restored history to the limit in
                // force when it is written.
                if let Some(limit) = value["revs_limit"].as_u64() {
                    self.call(
                        Method::PUT,
                        "_revs_limit",
                        Some(json!(limit)),
                        "restoring _revs_limit",
                    )?;
                }
                header = Some(value);
                continue;
            }
            let Some(doc) = value.get("doc").cloned() else {
                continue;
            };
            revisions += 1;
            if doc["_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("_design/"))
            {
                design.push((line.len(), doc));
                continue;
            }
            // Flush before the batch would pass the limit; a single larger document goes alone.
            if batch_size + line.len() > self.batch_bytes && !batch.is_empty() {
                self.write_batch(std::mem::take(&mut batch))?;
                batch_size = 0;
            }
            batch_size += line.len();
            batch.push(doc);
        }
        let header = header.ok_or_else(|| Error::integrity("the part is empty"))?;
        self.write_batch(batch)?;
        self.drain()?;
        // Design documents only once every data batch is in.
        let (mut batch, mut batch_size) = (Vec::new(), 0);
        for (size, doc) in design {
            if batch_size + size > self.batch_bytes && !batch.is_empty() {
                self.write_batch(std::mem::take(&mut batch))?;
                batch_size = 0;
            }
            batch_size += size;
            batch.push(doc);
        }
        self.write_batch(batch)?;
        self.drain()?;
        let security = header["security"].clone();
        if security.as_object().is_some_and(|s| !s.is_empty()) {
            self.call(
                Method::PUT,
                "_security",
                Some(security),
                "restoring _security",
            )?;
        }
        Ok(revisions)
    }

    fn call(&self, method: Method, rest: &str, body: Option<Value>, what: &str) -> Result<Value> {
        let path = Client::db_path(&self.db, rest);
        self.handle
            .block_on(self.client.json(method, &path, body, what))
    }

    /// Send one `_bulk_docs` batch; up to [`WRITES_IN_FLIGHT`] run at once. Revisions carry
    /// their own history, so batches may land in any order.
    fn write_batch(&mut self, mut docs: Vec<Value>) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        if self.force {
            docs = self.missing_only(docs)?;
            if docs.is_empty() {
                return Ok(());
            }
        }
        let body = json!({"docs": docs, "new_edits": false});
        let bytes = Bytes::from(serde_json::to_vec(&body).expect("JSON serializes"));
        while self.in_flight.len() >= WRITES_IN_FLIGHT {
            self.wait_one()?;
        }
        let task = post_bulk_docs(Arc::clone(&self.client), self.db.clone(), bytes);
        self.in_flight.push_back(self.handle.spawn(task));
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        match self.in_flight.pop_front() {
            Some(task) => self
                .handle
                .block_on(task)
                .map_err(|e| Error::failed(format!("a CouchDB write task failed: {e}")))?,
            None => Ok(()),
        }
    }

    /// Wait for every batch sent so far.
    fn drain(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Keep only the revisions the target lacks (`_revs_diff`), for `--force` restores.
    fn missing_only(&self, docs: Vec<Value>) -> Result<Vec<Value>> {
        let mut asked: Map<String, Value> = Map::new();
        for doc in &docs {
            if let (Some(id), Some(rev)) = (doc["_id"].as_str(), doc["_rev"].as_str()) {
                let entry = asked.entry(id.to_string()).or_insert_with(|| json!([]));
                entry.as_array_mut().expect("array").push(json!(rev));
            }
        }
        let diff = self.call(
            Method::POST,
            "_revs_diff",
            Some(Value::Object(asked)),
            "comparing revisions",
        )?;
        Ok(docs
            .into_iter()
            .filter(|doc| {
                let (Some(id), Some(rev)) = (doc["_id"].as_str(), doc["_rev"].as_str()) else {
                    return true;
                };
                diff[id]["missing"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|r| r == rev))
            })
            .collect())
    }
}
