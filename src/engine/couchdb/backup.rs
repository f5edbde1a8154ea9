//! `kura backup` for CouchDB: one NDJSON part per database.
//!
//! Line 1 is a header (`{"kura":"couchdb-database", …}`: name, partitioned, `_security`,
//! `_revs_limit`); every further line is `{"doc": …}`, one document revision with its
//! `_revisions` history and its attachments inline (base64), for every leaf revision of every
//! document: the winner, conflicts, and deleted leaves. `_local` documents are not included
//! (they never replicate and hold only checkpoints).
//!
//! Memory: documents are fetched in batches of revisions whose bodies are small; a revision
//! with attachments is fetched alone, so the largest thing in memory is one document.

use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use reqwest::Method;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{encode_segment, Client, DATABASE_KIND, FORMAT};
use crate::catalog::{BackupId, Part};
use crate::engine::{BackupContext, BackupOutcome, Selection};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::progress::{human_bytes, ProgressLine};

/// Changes asked for per `_changes` page at most. Each page costs the server a request's
/// overhead, and pouchdb-server much more than that: pages of 1,000 instead of 5,000 cost it
/// about 1.2 s more CPU over 100,000 documents (measured). Memory holds two pages' text at a
/// time (this one and the next, already asked for): [`PAGE_BYTES`] each as a rule, never
/// more than [`PAGE_BYTES_CAP`].
const BATCH: usize = 10_000;
/// What one `_changes` page (with the winners' bodies) should weigh. Documents of up to 8 MB
/// are CouchDB's default limit: a thousand of them in one answer would be gigabytes, so the
/// next page's `limit` follows the weight of the last one. 2 MiB is about 5,000 changes of
/// kilobyte documents, past which larger pages gained nothing measurable.
const PAGE_BYTES: usize = 2 << 20;
/// A `_changes` answer past this is dropped unread and asked again with a smaller `limit`:
/// the last page's weight is a guess about the next one, and documents vary (a page of
/// small deletions followed by kilobyte documents).
const PAGE_BYTES_CAP: usize = 8 << 20;
/// The first page, whose weight is not known yet, asks for this many changes.
const FIRST_PAGE: usize = 16;
/// What one `_bulk_get` answer should weigh, by the sizes of the winners' bodies.
const BULK_GET_BYTES: usize = 2 << 20;
/// The version of the part's header line: 2 streams attachments after their document (and
/// writes design documents last); restore reads 1 and 2.
pub const PART_VERSION: u64 = 2;
/// Revisions per `_bulk_get` of attachment-free documents, and such requests in flight.
const BULK_GET_CHUNK: usize = 100;
const BULK_GET_CONCURRENCY: usize = 4;

pub struct CouchBackup {
    pub client: Arc<Client>,
    pub selection: Selection,
}

pub struct Plan {
    pub server_version: String,
    pub databases: Vec<String>,
}

/// What the exporter hands to the compressor. The stream is whole only after `Done`.
enum Chunk {
    Data(Bytes),
    Done,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatabaseStats {
    pub revisions: u64,
    pub documents_in_changes: u64,
    /// Documents whose winning revision is not deleted: CouchDB's `doc_count` of a restore.
    #[serde(default)]
    pub live_documents: u64,
    #[serde(default)]
    pub deleted_documents: u64,
    pub attachment_bytes: u64,
    pub skipped_revisions: u64,
}

impl CouchBackup {
    pub async fn plan(&self) -> Result<Plan> {
        if !self.selection.exclude_tables.is_empty()
            || !self.selection.exclude_table_data.is_empty()
        {
            return Err(Error::usage(
                "--exclude-table and --exclude-table-data are for PostgreSQL sources; a CouchDB source has databases, not tables (use --exclude-database)",
            ));
        }
        let welcome = self
            .client
            .json(Method::GET, "", None, "reading the server version")
            .await?;
        let server_version = welcome["version"].as_str().unwrap_or("unknown").to_string();
        let vendor = if welcome.get("couchdb").is_some() {
            "CouchDB"
        } else if welcome.get("express-pouchdb").is_some() {
            "pouchdb-server"
        } else {
            "CouchDB-compatible"
        };
        let all = self.client.all_dbs().await?;
        for wanted in &self.selection.include {
            if !all.contains(wanted) {
                return Err(Error::not_found(format!(
                    "database {wanted:?} does not exist on CouchDB {}",
                    self.client.redacted()
                )));
            }
        }
        // System databases (_users, _replicator) only when named explicitly.
        let databases: Vec<String> = all
            .into_iter()
            .filter(|name| self.selection.wants(name))
            .filter(|name| !name.starts_with('_') || self.selection.include.contains(name))
            .collect();
        self.selection.check_planned(
            databases.len(),
            &format!("CouchDB {}", self.client.redacted()),
        )?;
        Ok(Plan {
            server_version: format!("{vendor} {server_version}"),
            databases,
        })
    }

    pub async fn run(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        plan: Plan,
    ) -> Result<BackupOutcome> {
        // CouchDB reports no size that predicts the export's length (attachments are inlined as
        // base64, revisions repeated), so the bar counts without a total.
        let line = ProgressLine::start("backing up", ctx.show_progress, None);
        line.expect(plan.databases.len(), "databases");
        // Databases side by side: a tenant with many small (per-user) databases pays the
        // per-database round trips once per job, not once per database in a row.
        let parts = crate::jobs::run_all(
            plan.databases.iter().enumerate().collect(),
            ctx.jobs,
            &ctx.cancel,
            |(index, database), stop| {
                let ctx = ctx.with_cancel(stop);
                let line = &line;
                async move { self.backup_database(&ctx, id, index, database, line).await }
            },
        )
        .await?;
        line.finish().await;
        Ok(BackupOutcome {
            server_version: plan.server_version,
            tool_version: format!("kura {} (CouchDB HTTP API)", env!("CARGO_PKG_VERSION")),
            parts,
            format_version: crate::catalog::BASE_MANIFEST_VERSION,
        })
    }

    /// One database's part, exported through the changes feed while it uploads.
    async fn backup_database(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        index: usize,
        database: &str,
        line: &ProgressLine,
    ) -> Result<Part> {
        let started = Instant::now();
        let job = line.job(database, None);
        let key_name = BackupContext::database_part_name(index, "ndjson");
        let key = ctx.path.object_key(id, &key_name);
        let (tx, mut rx) = mpsc::channel::<Result<Chunk>>(pipeline::CHANNEL_DEPTH);
        let exporter = tokio::spawn(export_database(
            Arc::clone(&self.client),
            database.to_string(),
            tx,
        ));
        let stored = pipeline::store_stream(
            ctx.store,
            &key,
            &ctx.pipeline,
            &ctx.cancel,
            Some(job),
            move |out: &mut dyn Write| {
                while let Some(chunk) = rx.blocking_recv() {
                    match chunk? {
                        Chunk::Data(bytes) => out.write_all(&bytes)?,
                        Chunk::Done => return Ok(()),
                    }
                }
                Err(Error::failed(
                    "the CouchDB export stopped before the end of the database",
                ))
            },
        )
        .await;
        if stored.is_err() {
            // Nothing will read what it fetches any more.
            exporter.abort();
        }
        let exported = exporter.await;
        let stored =
            stored.map_err(|e| e.context(format!("backing up CouchDB database {database:?}")))?;
        let (properties, stats) = match exported {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                return Err(e.context(format!("backing up CouchDB database {database:?}")))
            }
            Err(e) => {
                return Err(Error::failed(format!(
                    "the export of {database:?} stopped: {e}"
                )))
            }
        };
        line.one_done();
        tracing::info!(
            database = %database,
            revisions = stats.revisions,
            skipped_revisions = stats.skipped_revisions,
            raw_bytes = stored.raw_bytes,
            stored_bytes = stored.stored.bytes,
            seconds = started.elapsed().as_secs_f64(),
            "database {database:?} backed up: {} revisions, {} → {}",
            stats.revisions,
            human_bytes(stored.raw_bytes),
            human_bytes(stored.stored.bytes)
        );
        Ok(Part {
            key: key_name,
            name: database.to_string(),
            kind: DATABASE_KIND.to_string(),
            format: FORMAT.to_string(),
            raw_bytes: stored.raw_bytes,
            stored_bytes: stored.stored.bytes,
            sha256: stored.stored.sha256.clone(),
            compression: ctx.compression(),
            encryption: ctx.encryption(),
            properties,
            counts: Some(
                [
                    ("documents".to_string(), stats.live_documents),
                    ("deleted_documents".to_string(), stats.deleted_documents),
                ]
                .into_iter()
                .collect(),
            ),
        })
    }
}

/// Facts about a database kept in the manifest (restore creates the database from them).
pub fn database_properties(header: &Value, stats: &DatabaseStats) -> Value {
    json!({
        "partitioned": header["partitioned"],
        "revs_limit": header["revs_limit"],
        "doc_count": header["doc_count"],
        "doc_del_count": header["doc_del_count"],
        "revisions": stats.revisions,
        "attachment_bytes": stats.attachment_bytes,
    })
}

async fn export_database(
    client: Arc<Client>,
    db: String,
    tx: mpsc::Sender<Result<Chunk>>,
) -> Result<(Value, DatabaseStats)> {
    let result = export_into(&client, &db, &tx).await;
    match &result {
        Ok(_) => {
            let _ = tx.send(Ok(Chunk::Done)).await;
        }
        Err(e) => {
            // The compressor reports this copy; the original stays with the caller.
            let _ = tx.send(Err(e.clone())).await;
        }
    }
    result
}

async fn send_line(tx: &mpsc::Sender<Result<Chunk>>, value: &Value) -> Result<()> {
    let mut line = serde_json::to_vec(value).expect("JSON serializes");
    line.push(b'\n');
    send_bytes(tx, line).await
}

async fn send_bytes(tx: &mpsc::Sender<Result<Chunk>>, line: Vec<u8>) -> Result<()> {
    tx.send(Ok(Chunk::Data(Bytes::from(line))))
        .await
        .map_err(|_| Error::upload_stopped())
}

async fn export_into(
    client: &Arc<Client>,
    db: &str,
    tx: &mpsc::Sender<Result<Chunk>>,
) -> Result<(Value, DatabaseStats)> {
    let info = client
        .json(
            Method::GET,
            &Client::db_path(db, ""),
            None,
            &format!("reading database {db:?}"),
        )
        .await?;
    let security = client
        .json(
            Method::GET,
            &Client::db_path(db, "_security"),
            None,
            &format!("reading _security of {db:?}"),
        )
        .await?;
    let revs_limit = match client
        .json(
            Method::GET,
            &Client::db_path(db, "_revs_limit"),
            None,
            &format!("reading _revs_limit of {db:?}"),
        )
        .await
    {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(database = db, error = %e, "the server does not report _revs_limit; the restored database keeps its default");
            Value::Null
        }
    };
    let header = json!({
        "kura": "couchdb-database",
        "version": PART_VERSION,
        "name": db,
        "partitioned": info["props"]["partitioned"].as_bool().unwrap_or(false),
        "security": security,
        "revs_limit": revs_limit,
        "doc_count": info["doc_count"],
        "doc_del_count": info["doc_del_count"],
    });
    send_line(tx, &header).await?;

    let mut stats = DatabaseStats::default();
    let mut design_later: Vec<Leaves> = Vec::new();
    // The next page is requested as soon as this one's last_seq is known, so the server
    // reads it while kura fetches revisions and writes this one.
    let mut next = Some(tokio::spawn(changes_page(
        Arc::clone(client),
        db.to_string(),
        Value::from(0),
        FIRST_PAGE,
    )));
    while let Some(pending) = next.take() {
        let ChangesPage { bytes, limit } = pending
            .await
            .map_err(|e| Error::failed(format!("reading the changes of {db:?} stopped: {e}")))??;
        let page: Changes = client.parse(&bytes, &format!("reading the changes of {db:?}"))?;
        let count = page.results.len();
        if more_pages(page.pending, count, limit) && !page.last_seq.is_null() {
            next = Some(tokio::spawn(changes_page(
                Arc::clone(client),
                db.to_string(),
                page.last_seq.clone(),
                next_limit(bytes.len(), count),
            )));
        }
        if page.results.is_empty() {
            break;
        }
        let mut wanted = Vec::new();
        for change in page.results {
            let Some(id) = change.id.map(Cow::into_owned) else {
                continue;
            };
            if id.starts_with("_local/") {
                continue;
            }
            let revs: Vec<String> = change.changes.into_iter().filter_map(|r| r.rev).collect();
            // The winner's size stands for every leaf's: revisions of one document are alike.
            let estimate = change.doc.as_ref().map_or(0, |doc| doc.get().len());
            let leaves = Leaves {
                id,
                revs,
                deleted: change.deleted,
                estimate,
            };
            if leaves.id.starts_with("_design/") {
                // Design documents go last, so a restore writes them after the data (a
                // validate_doc_update must not judge restored documents) without holding them.
                // Only the id and leaf revisions wait: the bodies are fetched again then.
                design_later.push(leaves);
                continue;
            }
            stats.count(&leaves);
            let whole = change
                .doc
                .and_then(|doc| first_generation_line(&leaves.revs, doc));
            match whole {
                Some(line) => {
                    stats.revisions += 1;
                    send_bytes(tx, line).await?;
                }
                None => wanted.extend(leaves.wanted()),
            }
        }
        // The page's text is not needed while its revisions are fetched.
        drop(bytes);
        export_revisions(client, db, wanted, tx, &mut stats).await?;
    }
    let mut wanted = Vec::new();
    for leaves in design_later {
        stats.count(&leaves);
        wanted.extend(leaves.wanted());
    }
    export_revisions(client, db, wanted, tx, &mut stats).await?;
    Ok((database_properties(&header, &stats), stats))
}

/// A page of `_changes` as the server sent it, and the `limit` it was asked with.
struct ChangesPage {
    bytes: Bytes,
    limit: usize,
}

/// A `_changes` answer, parsed in place: the winners' bodies stay the JSON text the server
/// sent, borrowed from the answer. Parsed into `Value` trees, a page of thousands of
/// documents weighs several times its text, and the text is what the part stores (numbers
/// exactly as the server wrote them).
#[derive(serde::Deserialize)]
struct Changes<'a> {
    #[serde(default, borrow)]
    results: Vec<Change<'a>>,
    /// Opaque: a string on CouchDB, a number on pouchdb-server; passed back as it came.
    #[serde(default)]
    last_seq: Value,
    /// Changes after this page (CouchDB 2 and later).
    pending: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Change<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    changes: Vec<LeafRevision>,
    #[serde(default)]
    deleted: bool,
    #[serde(borrow)]
    doc: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct LeafRevision {
    rev: Option<String>,
}

/// A document as the changes feed lists it: its leaf revisions and whether it is deleted.
struct Leaves {
    id: String,
    revs: Vec<String>,
    deleted: bool,
    /// The size of the winner's body, standing for every leaf's.
    estimate: usize,
}

impl Leaves {
    fn wanted(self) -> impl Iterator<Item = WantedRevision> {
        let Leaves {
            id, revs, estimate, ..
        } = self;
        revs.into_iter().map(move |rev| WantedRevision {
            id: id.clone(),
            rev,
            estimate,
        })
    }
}

impl DatabaseStats {
    fn count(&mut self, document: &Leaves) {
        self.documents_in_changes += 1;
        match document.deleted {
            true => self.deleted_documents += 1,
            false => self.live_documents += 1,
        }
    }
}

/// Whether the feed goes on after a page of `count` changes asked with `limit`. CouchDB says
/// how many are left (`pending`); a server that does not (pouchdb-server) is read until a
/// page comes back empty, since a short page may only mean that it (or a proxy) caps
/// `limit`, and stopping there would lose documents unnoticed.
fn more_pages(pending: Option<u64>, count: usize, limit: usize) -> bool {
    match pending {
        Some(pending) => pending > 0 || count >= limit,
        None => count > 0,
    }
}

/// The `limit` of the next `_changes` page: as many changes as should weigh [`PAGE_BYTES`]
/// at the last page's bytes per change, between 1 and [`BATCH`].
fn next_limit(bytes: usize, count: usize) -> usize {
    let per_change = (bytes / count.max(1)).max(1);
    (PAGE_BYTES / per_change).clamp(1, BATCH)
}

/// A leaf revision to fetch, with the expected size of its body.
struct WantedRevision {
    id: String,
    rev: String,
    estimate: usize,
}

/// `wanted` in `_bulk_get` requests of at most [`BULK_GET_CHUNK`] revisions and, by the
/// estimates, [`BULK_GET_BYTES`] (a revision larger than that goes alone).
fn bulk_get_requests(wanted: &[WantedRevision]) -> Vec<Vec<Value>> {
    let mut requests: Vec<Vec<Value>> = Vec::new();
    let mut weight = 0;
    for revision in wanted {
        let full = requests.last().is_none_or(|r| {
            r.len() >= BULK_GET_CHUNK || weight + revision.estimate > BULK_GET_BYTES
        });
        if full {
            requests.push(Vec::new());
            weight = 0;
        }
        weight += revision.estimate;
        requests
            .last_mut()
            .expect("pushed above")
            .push(json!({"id": revision.id, "rev": revision.rev}));
    }
    requests
}

/// One page of `_changes` (all leaf revisions, winners' bodies) after `since`, which is passed
/// back exactly as the server sent it (CouchDB: opaque string, pouchdb-server: integer).
async fn changes_page(
    client: Arc<Client>,
    db: String,
    since: Value,
    mut limit: usize,
) -> Result<ChangesPage> {
    let since_text = match &since {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    loop {
        let path = Client::db_path(
            &db,
            &format!(
                "_changes?style=all_docs&include_docs=true&limit={limit}&since={}",
                encode_segment(&since_text)
            ),
        );
        // One change is read whatever it weighs: it cannot be split.
        let cap = (limit > 1).then_some(PAGE_BYTES_CAP);
        let answer = client
            .answer(
                Method::GET,
                &path,
                None,
                &format!("reading the changes of {db:?}"),
                cap,
            )
            .await?;
        match answer {
            Some(bytes) => return Ok(ChangesPage { bytes, limit }),
            None => {
                tracing::debug!(database = %db, limit, "a page of changes is too large; asking for fewer");
                limit = (limit / 16).max(1);
            }
        }
    }
}

/// A document whose only leaf is its first revision has that revision as its whole history,
/// so the body `_changes?include_docs=true` returned is complete once `_revisions` is added:
/// no `_bulk_get` needed. Returns the part's line for it, the server's text with
/// `_revisions` appended. Anything else (edited, conflicted, deleted, with attachments) is
/// fetched revision by revision.
fn first_generation_line(revs: &[String], doc: &RawValue) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(rename = "_rev", borrow)]
        rev: Option<Cow<'a, str>>,
        #[serde(rename = "_deleted")]
        deleted: Option<serde::de::IgnoredAny>,
        #[serde(rename = "_revisions")]
        revisions: Option<serde::de::IgnoredAny>,
        #[serde(rename = "_attachments")]
        attachments: Option<serde_json::Map<String, Value>>,
    }
    let [rev] = revs else { return None };
    let hash = rev.strip_prefix("1-")?;
    // The part is one document per line: text that a server sent pretty-printed is
    // written again, compact, by the revision fetch.
    if doc.get().contains('\n') {
        return None;
    }
    let head: Head = serde_json::from_str(doc.get()).ok()?;
    let has_attachments = head.attachments.is_some_and(|a| !a.is_empty());
    if head.rev.as_deref() != Some(rev.as_str())
        || has_attachments
        || head.deleted.is_some()
        || head.revisions.is_some()
    {
        return None;
    }
    let members = doc.get().trim_end().strip_suffix('}')?;
    let mut line = Vec::with_capacity(members.len() + hash.len() + 48);
    line.extend_from_slice(b"{\"doc\":");
    line.extend_from_slice(members.as_bytes());
    if !members.trim_end().ends_with('{') {
        line.push(b',');
    }
    line.extend_from_slice(b"\"_revisions\":{\"start\":1,\"ids\":[");
    line.extend_from_slice(&serde_json::to_vec(hash).expect("a string serializes"));
    line.extend_from_slice(b"]}}}\n");
    Some(line)
}

/// Fetch the given revisions (with history and attachment stubs) and write them; each
/// attachment's bytes follow its document, streamed (see [`export_attachments`]).
async fn export_revisions(
    client: &Client,
    db: &str,
    wanted: Vec<WantedRevision>,
    tx: &mpsc::Sender<Result<Chunk>>,
    stats: &mut DatabaseStats,
) -> Result<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    // A few requests in flight keep the server busy while kura writes; answers are written
    // as they arrive, in order, so a backup of the same data is the same bytes.
    let requests = bulk_get_requests(&wanted);
    let mut chunks = requests.iter().map(Vec::as_slice);
    let mut answers = futures::stream::FuturesOrdered::new();
    for chunk in chunks.by_ref().take(BULK_GET_CONCURRENCY) {
        answers.push_back(bulk_get(client, db, chunk, false));
    }
    while let Some(answer) = answers.next().await {
        let docs = answer?;
        if let Some(chunk) = chunks.next() {
            answers.push_back(bulk_get(client, db, chunk, false));
        }
        for doc in docs.docs {
            if doc["_attachments"]
                .as_object()
                .is_some_and(|a| !a.is_empty())
            {
                // The document with its stubs, then each attachment's bytes as they arrive.
                match export_attachments(client, db, &doc, tx).await? {
                    Some(bytes) => {
                        stats.attachment_bytes += bytes;
                        stats.revisions += 1;
                    }
                    None => stats.skipped_revisions += 1,
                }
            } else {
                stats.revisions += 1;
                send_line(tx, &json!({ "doc": doc })).await?;
            }
        }
        stats.skipped_revisions += docs.gone;
    }
    Ok(())
}

/// Raw bytes of an attachment per NDJSON line (base64 makes it a third longer).
const ATTACHMENT_CHUNK: usize = 256 * 1024;

/// Write `doc`'s line, then stream every attachment (in the order of its `_attachments`
/// object) into the part as `{"data": "<base64>"}` lines; returns the bytes written. The
/// stubs' lengths say where one attachment ends, so restore needs no other marker.
///
/// `None`: the revision was replaced and compacted away after `_changes` listed it (its first
/// attachment is gone); nothing was written, and its successor comes later in the feed.
async fn export_attachments(
    client: &Client,
    db: &str,
    doc: &Value,
    tx: &mpsc::Sender<Result<Chunk>>,
) -> Result<Option<u64>> {
    let id = doc["_id"].as_str().unwrap_or_default();
    let rev = doc["_rev"].as_str().unwrap_or_default();
    let mut total = 0;
    let mut started = false;
    for (name, stub) in doc["_attachments"].as_object().into_iter().flatten() {
        // Restore needs every length to find where an attachment ends.
        let expected = stub["length"].as_u64().ok_or_else(|| {
            Error::failed(format!(
                "CouchDB listed attachment {name:?} of document {id:?} in {db:?} without its length"
            ))
        })?;
        let path = attachment_path(db, id, name, rev);
        let mut response = client.request(Method::GET, &path, None).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND && !started {
            tracing::warn!(
                database = db,
                id,
                rev,
                "a revision disappeared during the backup; its successor is backed up instead"
            );
            return Ok(None);
        }
        if !started {
            send_line(tx, &json!({ "doc": doc, "attachments": "follow" })).await?;
            started = true;
        }
        if !response.status().is_success() {
            return Err(Error::failed(format!(
                "reading attachment {name:?} of document {id:?} (rev {rev}) in {db:?}: HTTP {}",
                response.status()
            )));
        }
        let mut pending = bytes::BytesMut::new();
        let mut written = 0u64;
        loop {
            let chunk = response.chunk().await.map_err(|e| {
                Error::with_source(
                    ErrorKind::Database,
                    format!("reading attachment {name:?} of document {id:?} in {db:?}"),
                    e,
                )
            })?;
            let done = chunk.is_none();
            if let Some(chunk) = chunk {
                pending.extend_from_slice(&chunk);
            }
            while pending.len() >= ATTACHMENT_CHUNK || (done && !pending.is_empty()) {
                let piece = pending.split_to(pending.len().min(ATTACHMENT_CHUNK));
                written += piece.len() as u64;
                send_line(
                    tx,
                    &json!({ "data": base64::engine::general_purpose::STANDARD.encode(&piece) }),
                )
                .await?;
            }
            if done {
                break;
            }
        }
        if expected != written {
            return Err(Error::failed(format!(
                "attachment {name:?} of document {id:?} in {db:?} is {written} bytes, but its stub says {expected}: was the document compacted during the backup? Run the backup again"
            )));
        }
        total += written;
    }
    Ok(Some(total))
}

/// `/{db}/{doc}/{attachment}?rev=…`, each part percent-encoded; `_design/` stays literal and
/// the `/` inside attachment names too, as CouchDB's URL scheme has them.
pub fn attachment_path(db: &str, id: &str, name: &str, rev: &str) -> String {
    let name: Vec<String> = name.split('/').map(encode_segment).collect();
    format!(
        "{}/{}?rev={}",
        Client::doc_path(db, id),
        name.join("/"),
        encode_segment(rev)
    )
}

struct Fetched {
    docs: Vec<Value>,
    /// Revisions that stopped being available between `_changes` and `_bulk_get`.
    gone: u64,
}

async fn bulk_get(
    client: &Client,
    db: &str,
    wanted: &[Value],
    attachments: bool,
) -> Result<Fetched> {
    let path = Client::db_path(
        db,
        &format!("_bulk_get?revs=true&attachments={attachments}"),
    );
    let mut answer = client
        .json(
            Method::POST,
            &path,
            Some(json!({ "docs": wanted })),
            &format!("reading documents of {db:?}"),
        )
        .await?;
    let mut fetched = Fetched {
        docs: Vec::with_capacity(wanted.len()),
        gone: 0,
    };
    let results = answer["results"].as_array_mut().map(std::mem::take);
    for mut result in results.into_iter().flatten() {
        let id = result["id"].clone();
        let entries = result["docs"].as_array_mut().map(std::mem::take);
        for mut entry in entries.into_iter().flatten() {
            if let Some(doc) = entry.get_mut("ok").map(Value::take) {
                fetched.docs.push(doc);
                continue;
            }
            let error = &entry["error"];
            let kind = error["error"].as_str().unwrap_or("");
            if kind == "not_found" || kind == "missing" {
                // Replaced (or compacted away) after _changes listed it; its successor comes
                // later in the feed.
                tracing::warn!(database = db, %id, rev = %error["rev"], "a revision disappeared during the backup; its successor is backed up instead");
                fetched.gone += 1;
            } else {
                return Err(Error::failed(format!(
                    "CouchDB could not read document {id} ({}) in {db:?}: {kind} {}",
                    error["rev"],
                    error["reason"].as_str().unwrap_or("")
                )));
            }
        }
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_requests_are_bounded_by_bytes_as_well_as_count() {
        // Tiny documents: the count bounds the page; kilobyte ones: the bytes do.
        assert_eq!(next_limit(30_000, 1000), BATCH);
        assert_eq!(next_limit(300_000, 1000), (2 << 20) / 300);
        // 1 MB documents: a few per page; 20 MB ones: one at a time.
        assert_eq!(next_limit(64 << 20, 64), 2);
        assert_eq!(next_limit(20 << 20, 1), 1);
        assert_eq!(next_limit(0, 0), BATCH);

        let revision = |estimate| WantedRevision {
            id: "d".into(),
            rev: "1-a".into(),
            estimate,
        };
        let small: Vec<WantedRevision> = (0..250).map(|_| revision(100)).collect();
        let sizes: Vec<usize> = bulk_get_requests(&small).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        let large: Vec<WantedRevision> = [1 << 20, 1 << 20, 1 << 20, 8 << 20, 10]
            .into_iter()
            .map(revision)
            .collect();
        let sizes: Vec<usize> = bulk_get_requests(&large).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 1, 1, 1]);
        assert!(bulk_get_requests(&[]).is_empty());
    }

    #[test]
    fn only_unedited_documents_skip_the_revision_fetch() {
        let raw = |v: Value| RawValue::from_string(v.to_string()).unwrap();
        let revs = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let doc = json!({"_id": "a", "_rev": "1-abc", "v": 1.50, "big": 12345678901234567890u64});
        let line = first_generation_line(&revs(&["1-abc"]), &raw(doc.clone())).unwrap();
        assert!(line.ends_with(b"\n"));
        let parsed: Value = serde_json::from_slice(&line).unwrap();
        let mut expected = doc.clone();
        expected["_revisions"] = json!({"start": 1, "ids": ["abc"]});
        assert_eq!(parsed, json!({ "doc": expected }));
        // The server's text is kept as it was sent: key order, spacing, numbers.
        let text = r#"{"_id":"b","_rev":"1-def","n":1e3, "z":[] }"#;
        let line = first_generation_line(
            &revs(&["1-def"]),
            &RawValue::from_string(text.into()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(line).unwrap(),
            r#"{"doc":{"_id":"b","_rev":"1-def","n":1e3, "z":[] ,"_revisions":{"start":1,"ids":["def"]}}}"#.to_string() + "\n"
        );

        let edited = raw(json!({"_id": "a", "_rev": "2-def"}));
        assert!(first_generation_line(&revs(&["2-def"]), &edited).is_none());
        assert!(first_generation_line(&revs(&["1-abc", "1-xyz"]), &raw(doc.clone())).is_none());
        assert!(
            first_generation_line(&revs(&["1-xyz"]), &raw(doc.clone())).is_none(),
            "a winner that is not the leaf"
        );
        let deleted = raw(json!({"_id": "a", "_rev": "1-abc", "_deleted": true}));
        assert!(first_generation_line(&revs(&["1-abc"]), &deleted).is_none());
        let attached =
            raw(json!({"_id": "a", "_rev": "1-abc", "_attachments": {"f": {"stub": true}}}));
        assert!(first_generation_line(&revs(&["1-abc"]), &attached).is_none());
        let no_attachments = raw(json!({"_id": "a", "_rev": "1-abc", "_attachments": {}}));
        assert!(first_generation_line(&revs(&["1-abc"]), &no_attachments).is_some());
        let pretty =
            RawValue::from_string("{\n  \"_id\": \"a\",\n  \"_rev\": \"1-abc\"\n}".into()).unwrap();
        assert!(
            first_generation_line(&revs(&["1-abc"]), &pretty).is_none(),
            "one line per document"
        );
    }

    #[test]
    fn the_feed_ends_where_the_server_says_or_at_an_empty_page() {
        assert!(more_pages(Some(5), 100, 100));
        assert!(!more_pages(Some(0), 40, 100));
        assert!(
            more_pages(Some(0), 100, 100),
            "a full page is followed anyway"
        );
        // No `pending`: a short page may be a capped limit, not the end.
        assert!(more_pages(None, 40, 100));
        assert!(!more_pages(None, 0, 100));
    }

    #[test]
    fn a_changes_page_keeps_the_bodies_as_text() {
        let page: Changes = serde_json::from_str(
            r#"{"results":[{"seq":1,"id":"a","changes":[{"rev":"1-x"},{"rev":"2-y"}],"deleted":true,"doc":{"_id":"a","n":1}},
                           {"seq":"2-g1AAA","id":"_design/d","changes":[{"rev":"1-z"}]}],"last_seq":"2-g1AAA","pending":0}"#,
        )
        .unwrap();
        assert_eq!(page.last_seq, json!("2-g1AAA"));
        assert_eq!(page.pending, Some(0));
        let first = &page.results[0];
        assert_eq!(first.id.as_deref(), Some("a"));
        assert!(first.deleted);
        assert_eq!(first.doc.as_ref().unwrap().get(), r#"{"_id":"a","n":1}"#);
        let revs: Vec<_> = first.changes.iter().filter_map(|r| r.rev.clone()).collect();
        assert_eq!(revs, ["1-x", "2-y"]);
        assert!(page.results[1].doc.is_none() && !page.results[1].deleted);
        let numbered: Changes = serde_json::from_str(r#"{"results":[],"last_seq":7}"#).unwrap();
        assert_eq!(numbered.last_seq, json!(7));
        assert_eq!(numbered.pending, None);
    }
}
