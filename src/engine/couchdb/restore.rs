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

use base64::Engine as _;

use super::backup::PART_VERSION;
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
    /// One database: checked first if it exists, else created; removed again if it was
    /// created and the restore fails. Returns the target, the revisions and the bytes.
    async fn restore_step(
        &self,
        ctx: &RestoreContext<'_>,
        part: &Part,
        target: String,
        exists: bool,
        line: &ProgressLine,
    ) -> Result<(String, u64, u64)> {
        let started = Instant::now();
        let job = line.job(&target, Some(part.stored_bytes));
        let key = ctx.path.object_key(&ctx.backup_id, &part.key);
        // Before the database is created: a part that cannot be opened leaves nothing.
        let unseal = ctx.unseal(part)?;
        if exists {
            // No transactions in CouchDB: a database that already exists is only written
            // to once the whole part is known to be intact. That costs a second download
            // of the compressed bytes (hashed, not decompressed); the alternative, a
            // scratch database on the server copied into the target, would cost a second
            // write of every revision there, which is the slower side of a restore.
            pipeline::check_stored(ctx.store, &key, &part.digest(), &ctx.cancel)
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
            unseal,
            Some(job),
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
                return Err(err.or_interrupted(&ctx.cancel).context(format!(
                    "restoring CouchDB database {:?} into {target:?}",
                    part.name
                )));
            }
        };
        line.one_done();
        tracing::info!(
            database = %target,
            source_database = %part.name,
            revisions,
            seconds = started.elapsed().as_secs_f64(),
            "database {target:?} restored from {:?}: {revisions} revisions ({})",
            part.name,
            human_bytes(part.raw_bytes)
        );
        Ok((target, revisions, part.raw_bytes))
    }

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
                    "refusing to restore: {} on CouchDB {} {} documents; restore under another name with --database SRC:DST, or pass --force to add only the revisions that are missing",
                    crate::engine::name_databases(&occupied),
                    self.target.redacted(),
                    if occupied.len() == 1 { "already holds" } else { "already hold" },
                ),
            ));
        }

        let total = steps.iter().map(|(part, _, _)| part.stored_bytes).sum();
        let line = ProgressLine::start("restoring", ctx.show_progress, Some(total));
        line.expect(steps.len(), "databases");
        let mut summary = RestoreSummary::default();
        // Databases side by side; within each, `_bulk_docs` writers in parallel as before.
        let restored = crate::jobs::run_all(steps, ctx.jobs, &ctx.cancel, |step, stop| {
            // CouchDB has no transactions: writing into an existing database is not stopped
            // halfway by another database's failure (only by a signal, as before --jobs).
            let ctx = match step.2 {
                true => ctx.with_cancel(ctx.cancel.clone()),
                false => ctx.with_cancel(stop),
            };
            let line = &line;
            async move {
                let (part, target, exists) = step;
                self.restore_step(&ctx, part, target, exists, line).await
            }
        })
        .await?;
        for (target, revisions, raw_bytes) in restored {
            summary.revisions += revisions;
            summary.raw_bytes += raw_bytes;
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

/// Documents per `_bulk_docs` request at most (besides `--batch-bytes`): servers process a
/// request's documents one after another, so several moderate requests in flight beat one
/// huge one.
const DOCS_PER_BATCH: usize = 500;

/// One stored document revision, as the JSON text it was backed up as.
struct RawDoc {
    id: String,
    rev: Option<String>,
    json: String,
    /// Format 2: the attachments' bytes follow in `{"data": …}` lines.
    attachments_follow: bool,
}

impl RawDoc {
    /// Parse a `{"doc": …}` line, reading only `_id` and `_rev` out of the document.
    fn parse(line: &[u8]) -> serde_json::Result<RawDoc> {
        #[derive(serde::Deserialize)]
        struct Line<'a> {
            #[serde(borrow)]
            doc: &'a serde_json::value::RawValue,
            attachments: Option<&'a str>,
        }
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(rename = "_id")]
            id: String,
            #[serde(rename = "_rev")]
            rev: Option<String>,
        }
        let line: Line = serde_json::from_slice(line)?;
        let head: Head = serde_json::from_str(line.doc.get())?;
        Ok(RawDoc {
            id: head.id,
            rev: head.rev,
            json: line.doc.get().to_string(),
            attachments_follow: line.attachments == Some("follow"),
        })
    }
}

/// Documents gathered for one `_bulk_docs` request.
#[derive(Default)]
struct Batch {
    docs: Vec<RawDoc>,
    bytes: usize,
}

impl Batch {
    /// Add a document; returns the full batch to send first when this one would overflow it
    /// (a single document larger than the limit goes alone).
    fn add(&mut self, doc: RawDoc, max_bytes: usize) -> Option<Vec<RawDoc>> {
        let full = !self.docs.is_empty()
            && (self.bytes + doc.json.len() > max_bytes || self.docs.len() >= DOCS_PER_BATCH);
        let sent = full.then(|| {
            self.bytes = 0;
            std::mem::take(&mut self.docs)
        });
        self.bytes += doc.json.len();
        self.docs.push(doc);
        sent
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
        let mut batch = Batch::default();
        let mut design = Batch::default();
        let mut design_docs = Vec::new();
        let mut revisions = 0u64;
        let mut design_last = false;
        let mut data_done = false;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            let malformed = |e: serde_json::Error| {
                Error::integrity(format!(
                    "the backup of {:?} holds a line that is not a document: {e}",
                    self.db
                ))
            };
            if header.is_none() {
                let value: Value = serde_json::from_slice(&line).map_err(malformed)?;
                if value["kura"] != "couchdb-database" {
                    return Err(Error::integrity(
                        "the part does not start with a kura CouchDB header",
                    ));
                }
                match value["version"].as_u64() {
                    Some(1) => {}
                    Some(PART_VERSION) => design_last = true,
                    other => {
                        return Err(Error::usage(format!(
                            "the backup of {:?} is CouchDB part version {other:?}, newer than this kura reads (1, {PART_VERSION}): use a newer kura",
                            self.db
                        )))
                    }
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
            // Documents stay the JSON text they were stored as: parsing them into values
            // would cost several times their size in memory for nothing.
            let doc = RawDoc::parse(&line).map_err(malformed)?;
            revisions += 1;
            if doc.id.starts_with("_design/") {
                if !design_last {
                    // Format 1 mixed them into the data: they wait for the end.
                    design_docs.push(doc);
                    continue;
                }
                if !data_done {
                    // Format 2 writes them last: the data is all sent once the first arrives.
                    self.write_batch(std::mem::take(&mut batch.docs))?;
                    batch.bytes = 0;
                    self.drain()?;
                    data_done = true;
                }
            }
            if doc.attachments_follow {
                self.write_with_attachments(doc, &mut reader)?;
                continue;
            }
            if let Some(full) = batch.add(doc, self.batch_bytes) {
                self.write_batch(full)?;
            }
        }
        let header = header.ok_or_else(|| Error::integrity("the part is empty"))?;
        self.write_batch(batch.docs)?;
        self.drain()?;
        // Design documents only once every data batch is in.
        for doc in design_docs {
            if let Some(full) = design.add(doc, self.batch_bytes) {
                self.write_batch(full)?;
            }
        }
        self.write_batch(design.docs)?;
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
    fn write_batch(&mut self, mut docs: Vec<RawDoc>) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        if self.force {
            docs = self.missing_only(docs)?;
            if docs.is_empty() {
                return Ok(());
            }
        }
        let size: usize = docs.iter().map(|d| d.json.len() + 1).sum();
        let mut body = Vec::with_capacity(size + 32);
        body.extend_from_slice(br#"{"new_edits":false,"docs":["#);
        for (i, doc) in docs.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(doc.json.as_bytes());
        }
        body.extend_from_slice(b"]}");
        let bytes = Bytes::from(body);
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

    /// One revision whose attachments follow in the part: `PUT …?new_edits=false` with a
    /// `multipart/related` body that streams each attachment from the part as it is read, so
    /// no attachment is ever held whole. (CouchDB's replicator writes attachments the same
    /// way; pouchdb-server parses the body as form data, hence the Content-Disposition
    /// headers, which CouchDB ignores.)
    fn write_with_attachments(&mut self, doc: RawDoc, reader: &mut dyn BufRead) -> Result<()> {
        let malformed = |what: String| {
            Error::integrity(format!("the backup of {:?} is damaged: {what}", self.db))
        };
        let mut value: Value = serde_json::from_str(&doc.json)
            .map_err(|e| malformed(format!("document {:?}: {e}", doc.id)))?;
        let mut lengths = Vec::new();
        for (name, stub) in value["_attachments"].as_object_mut().into_iter().flatten() {
            let length = stub["length"].as_u64().ok_or_else(|| {
                malformed(format!("attachment {name:?} of {:?} has no length", doc.id))
            })?;
            if let Some(stub) = stub.as_object_mut() {
                stub.remove("stub");
                stub.remove("digest");
                stub.insert("follows".into(), Value::Bool(true));
            }
            lengths.push((name.clone(), length));
        }
        let write = !self.force || !self.missing_only(vec![doc])?.is_empty();
        if !write {
            // The target has this revision: read past its attachments.
            for (name, length) in &lengths {
                read_attachment(reader, *length, name, &mut |_| Ok(()))?;
            }
            return Ok(());
        }
        let id = value["_id"].as_str().unwrap_or_default().to_string();
        let boundary = format!("kura-{:016x}", rand::random::<u64>());
        let framing = Framing::new(&boundary, &value, &lengths);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        let path = Client::doc_path(&self.db, &id) + "?new_edits=false";
        let client = Arc::clone(&self.client);
        let content_type = format!("multipart/related; boundary=\"{boundary}\"");
        let length = framing.length;
        let put = self.handle.spawn(async move {
            let response = client
                .request_streamed(Method::PUT, &path, &content_type, length, body)
                .await?;
            let status = response.status();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            if !status.is_success() || answer.get("error").is_some() {
                return Err(Error::failed(format!(
                    "CouchDB {} rejected document {id:?} with its attachments: HTTP {status}: {} {}",
                    client.redacted(),
                    answer["error"].as_str().unwrap_or(""),
                    answer["reason"].as_str().unwrap_or("")
                )));
            }
            Ok(())
        });
        let send = |bytes: Bytes| {
            tx.blocking_send(Ok(bytes))
                .map_err(|_| Error::upload_stopped())
        };
        let fed = (|| {
            for (head, attachment) in &framing.parts {
                send(head.clone())?;
                if let Some((name, length)) = attachment {
                    read_attachment(reader, *length, name, &mut |bytes| send(bytes))?;
                    send(Bytes::from_static(b"\r\n"))?;
                }
            }
            send(framing.end.clone())
        })();
        if fed.is_err() {
            // Abort the request instead of ending it: a body cut short must never look like a
            // complete one to the server.
            let _ = tx.blocking_send(Err(std::io::Error::other("the restore stopped")));
        }
        drop(tx);
        let put = self
            .handle
            .block_on(put)
            .map_err(|e| Error::failed(format!("a CouchDB write task failed: {e}")))?;
        match fed {
            // The server stopped reading: its answer says why.
            Err(e) if crate::pipeline::is_upload_stopped(&e) => put.and(Err(e)),
            // The part itself failed (damaged, truncated): that is the cause, not the
            // request kura aborted because of it.
            Err(e) => Err(e),
            Ok(()) => put,
        }
    }

    /// Keep only the revisions the target lacks (`_revs_diff`), for `--force` restores.
    fn missing_only(&self, docs: Vec<RawDoc>) -> Result<Vec<RawDoc>> {
        let mut asked: Map<String, Value> = Map::new();
        for doc in &docs {
            if let Some(rev) = &doc.rev {
                let entry = asked.entry(doc.id.clone()).or_insert_with(|| json!([]));
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
            .filter(|doc| match &doc.rev {
                None => true,
                Some(rev) => diff[doc.id.as_str()]["missing"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|r| r == rev)),
            })
            .collect())
    }
}

/// The `multipart/related` body of one document and its attachments, but for the attachment
/// bytes, which stream from the part. Every length is known up front, so the request carries a
/// Content-Length: CouchDB before 3.2 does not read chunked multipart uploads.
struct Framing {
    /// Each part's headers (the document's with its JSON), and the attachment that follows.
    parts: Vec<(Bytes, Option<(String, u64)>)>,
    end: Bytes,
    length: u64,
}

impl Framing {
    fn new(boundary: &str, doc: &Value, attachments: &[(String, u64)]) -> Framing {
        // Header values come from the backup: no CR/LF may end a header early.
        let header_safe = |text: &str| text.replace(['"', '\r', '\n'], "_");
        let mut parts = vec![(
            Bytes::from(format!(
                "--{boundary}\r\nContent-Type: application/json\r\nContent-Disposition: form-data; name=\"document\"\r\n\r\n{doc}\r\n"
            )),
            None,
        )];
        for (name, length) in attachments {
            let content_type = doc["_attachments"][name]["content_type"]
                .as_str()
                .map(header_safe)
                .unwrap_or_else(|| "application/octet-stream".into());
            parts.push((
                Bytes::from(format!(
                    "--{boundary}\r\nContent-Type: {content_type}\r\nContent-Disposition: attachment; filename=\"{}\"\r\n\r\n",
                    header_safe(name)
                )),
                Some((name.clone(), *length)),
            ));
        }
        let end = Bytes::from(format!("--{boundary}--\r\n"));
        let length = parts
            .iter()
            .map(|(head, attachment)| {
                head.len() as u64 + attachment.as_ref().map_or(0, |(_, n)| n + 2)
            })
            .sum::<u64>()
            + end.len() as u64;
        Framing { parts, end, length }
    }
}

/// Read `length` bytes of one attachment from its `{"data": "<base64>"}` lines, handing each
/// decoded line to `sink`.
fn read_attachment(
    reader: &mut dyn BufRead,
    length: u64,
    name: &str,
    sink: &mut dyn FnMut(Bytes) -> Result<()>,
) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(borrow)]
        data: std::borrow::Cow<'a, str>,
    }
    let mut remaining = length;
    let mut line = Vec::new();
    while remaining > 0 {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Err(Error::integrity(format!(
                "the backup ends inside attachment {name:?} ({remaining} of {length} bytes missing)"
            )));
        }
        let data: Data = serde_json::from_slice(&line).map_err(|e| {
            Error::integrity(format!(
                "attachment {name:?}: a line that is not attachment data: {e}"
            ))
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.data.as_bytes())
            .map_err(|e| Error::integrity(format!("attachment {name:?}: bad base64: {e}")))?;
        if bytes.len() as u64 > remaining {
            return Err(Error::integrity(format!(
                "attachment {name:?} holds more bytes than its length {length}"
            )));
        }
        remaining -= bytes.len() as u64;
        sink(Bytes::from(bytes))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, padding: usize) -> RawDoc {
        let line = format!(
            "{{\"doc\":{{\"_id\":\"{id}\",\"_rev\":\"1-a\",\"pad\":\"{}\"}}}}\n",
            "x".repeat(padding)
        );
        RawDoc::parse(line.as_bytes()).unwrap()
    }

    #[test]
    fn raw_documents_keep_their_text() {
        let parsed = doc("a/b?c", 3);
        assert_eq!(parsed.id, "a/b?c");
        assert_eq!(parsed.rev.as_deref(), Some("1-a"));
        assert_eq!(parsed.json, r#"{"_id":"a/b?c","_rev":"1-a","pad":"xxx"}"#);
        assert!(RawDoc::parse(b"{\"doc\":{\"no_id\":1}}\n").is_err());
    }

    #[test]
    fn batches_stop_before_the_byte_limit_and_at_the_document_cap() {
        let mut batch = Batch::default();
        assert!(batch.add(doc("a", 40), 100).is_none());
        let sent = batch
            .add(doc("b", 40), 100)
            .expect("the second would pass 100 bytes");
        assert_eq!(sent.len(), 1);
        // A document larger than the limit still goes, alone.
        let sent = batch.add(doc("huge", 500), 100).unwrap();
        assert_eq!(sent[0].id, "b");
        assert_eq!(batch.add(doc("c", 1), 100).unwrap()[0].id, "huge");

        let mut batch = Batch::default();
        let full: Vec<_> = (0..=DOCS_PER_BATCH)
            .filter_map(|i| batch.add(doc(&i.to_string(), 1), usize::MAX))
            .collect();
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].len(), DOCS_PER_BATCH);
    }
}
