//! One conformance suite, run against every ObjectStore implementation (restic's
//! `backend/test/suite.go`, object_store's `integration.rs`): the contract in
//! `src/storage/mod.rs` holds for `file://`, for moto's S3 and for s3s-fs (which checks
//! request signatures).

mod common;

use bytes::Bytes;
use futures::StreamExt;
use kura::pipeline::{self, PipelineOptions};
use kura::storage::local::LocalStore;
use kura::storage::testing::FailingStore;
use kura::storage::{ObjectStore, S3Options};
use kura::ErrorKind;
use tokio_util::sync::CancellationToken;

async fn read_all(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    let mut object = store.get(key).await.unwrap();
    let mut data = Vec::new();
    while let Some(chunk) = object.stream.next().await {
        data.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(
        object.size,
        data.len() as u64,
        "get reports the size of {key}"
    );
    data
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

/// `lists_uploads`: whether the server implements ListMultipartUploads (s3s-fs does not; ICOS,
/// AWS, MinIO and moto do). `atomic_create`: whether concurrent `If-None-Match: *` writes
/// have exactly one winner. AWS S3 guarantees it; moto and s3s-fs check the condition and
/// then write without holding a lock, so racing writers all "win" there (the lock module
/// reads its object back for exactly such stores).
async fn conformance(store: &dyn ObjectStore, lists_uploads: bool, atomic_create: bool) {
    store.check().await.expect("check passes on a usable store");

    // put / get / head / overwrite
    store
        .put("t/a/one.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(read_all(store, "t/a/one.json").await, b"{}");
    store
        .put("t/a/one.json", Bytes::from_static(b"[1]"))
        .await
        .unwrap();
    assert_eq!(read_all(store, "t/a/one.json").await, b"[1]");
    let meta = store
        .head("t/a/one.json")
        .await
        .unwrap()
        .expect("head finds the object");
    assert_eq!(meta.size, 3);
    assert!(store.head("t/a/missing").await.unwrap().is_none());
    let missing = store
        .get("t/a/missing")
        .await
        .err()
        .expect("get of a missing key fails");
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{}", missing.chain());
    store.put("t/a/empty", Bytes::new()).await.unwrap();
    assert!(read_all(store, "t/a/empty").await.is_empty());

    // multipart: invisible until complete, whole afterwards, in order
    let first = pattern(5 * 1024 * 1024, 1);
    let second = pattern(1234, 2);
    let mut upload = store.put_multipart("t/b/big.bin").await.unwrap();
    let f1 = upload.put_part(first.clone());
    let f2 = upload.put_part(second.clone());
    let (r2, r1) = tokio::join!(f2, f1);
    r1.unwrap();
    r2.unwrap();
    assert!(
        store.head("t/b/big.bin").await.unwrap().is_none(),
        "not visible before complete"
    );
    assert!(
        store.list("t/b/").await.unwrap().is_empty(),
        "list hides unfinished uploads"
    );
    if lists_uploads {
        assert_eq!(store.list_uploads("t/b/").await.unwrap().len(), 1);
    }
    upload.complete().await.unwrap();
    let data = read_all(store, "t/b/big.bin").await;
    assert_eq!(data.len(), first.len() + second.len());
    assert!(data[..first.len()] == first[..] && data[first.len()..] == second[..]);
    if lists_uploads {
        assert!(store.list_uploads("t/b/").await.unwrap().is_empty());
    }

    // abort: nothing stored, nothing pending
    let mut upload = store.put_multipart("t/c/aborted.bin").await.unwrap();
    upload.put_part(pattern(5 * 1024 * 1024, 3)).await.unwrap();
    upload.abort().await.unwrap();
    upload.abort().await.expect("abort is idempotent");
    assert!(store.head("t/c/aborted.bin").await.unwrap().is_none());
    if lists_uploads {
        assert!(store.list_uploads("t/c/").await.unwrap().is_empty());

        // an upload left behind is reported and can be aborted later (what prune does)
        let mut upload = store.put_multipart("t/c/left.bin").await.unwrap();
        upload.put_part(pattern(10, 4)).await.unwrap();
        drop(upload);
        let pending = store.list_uploads("t/c/").await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].key, "t/c/left.bin");
        store.abort_upload(&pending[0]).await.unwrap();
        assert!(store.list_uploads("t/c/").await.unwrap().is_empty());
    }

    // list: prefix, sorted, complete across pages (S3 pages at 1000 keys)
    let keys: Vec<String> = (0..1003).map(|i| format!("t/d/{i:05}")).collect();
    futures::stream::iter(keys.clone())
        .for_each_concurrent(32, |key| async move {
            store.put(&key, Bytes::from_static(b"x")).await.unwrap();
        })
        .await;
    let listed: Vec<String> = store
        .list("t/d/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(listed, keys);
    let all = store.list("t/").await.unwrap();
    assert!(
        all.windows(2).all(|w| w[0].key < w[1].key),
        "list is sorted"
    );
    assert!(all.iter().any(|o| o.key == "t/a/one.json"));
    assert!(store.list("t/zzz/").await.unwrap().is_empty());

    // delete: batches, idempotent, nothing refused on a plain bucket
    assert!(store.delete(&keys).await.unwrap().is_empty());
    assert!(store
        .delete(&keys)
        .await
        .expect("deleting missing keys succeeds")
        .is_empty());

    // put_if_absent: creates once, never replaces, and the loser of a race sees AlreadyExists
    use kura::storage::Created;
    let lock = "t/e/lock.json";
    assert_eq!(
        store
            .put_if_absent(lock, Bytes::from_static(b"first"))
            .await
            .unwrap(),
        Created::Created
    );
    assert_eq!(
        store
            .put_if_absent(lock, Bytes::from_static(b"second"))
            .await
            .unwrap(),
        Created::AlreadyExists
    );
    assert_eq!(read_all(store, lock).await, b"first");
    store.delete(&[lock.to_string()]).await.unwrap();
    if atomic_create {
        let racers = futures::future::join_all(
            (0..8u8).map(|i| store.put_if_absent("t/e/race.json", Bytes::from(vec![b'0' + i]))),
        )
        .await;
        let winners = racers
            .iter()
            .filter(|r| matches!(r, Ok(Created::Created)))
            .count();
        assert_eq!(
            winners, 1,
            "exactly one conditional create wins: {racers:?}"
        );
        store.delete(&["t/e/race.json".to_string()]).await.unwrap();
    }
    assert!(store.list("t/d/").await.unwrap().is_empty());

    // invalid keys never escape the prefix
    assert_eq!(
        store
            .put("../escape", Bytes::new())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Usage
    );
}

/// The pipeline aborts the multipart upload when a part fails, and nothing appears.
async fn failed_part_aborts(store: impl ObjectStore + 'static) {
    let failing = FailingStore::new(store, 2);
    let options = PipelineOptions {
        part_size: 5 * 1024 * 1024,
        ..PipelineOptions::default()
    };
    let result = pipeline::store_stream(
        &failing,
        "t/e/failing.zst",
        &options,
        &CancellationToken::new(),
        None,
        |out| {
            // Incompressible, so the stored stream is several parts long.
            for _ in 0..24 {
                out.write_all(&common::noise(1024 * 1024))?;
            }
            Ok(())
        },
    )
    .await;
    let err = result.expect_err("an injected part failure fails the upload");
    assert!(err.chain().contains("injected failure"), "{}", err.chain());
    assert!(failing.head("t/e/failing.zst").await.unwrap().is_none());
    assert!(
        failing.list_uploads("t/e/").await.unwrap().is_empty(),
        "the upload was aborted"
    );
}

/// A producer that fails (like pg_dump exiting 1) leaves nothing either.
async fn failed_producer_aborts(store: &dyn ObjectStore) {
    let options = PipelineOptions {
        part_size: 5 * 1024 * 1024,
        ..PipelineOptions::default()
    };
    let err = pipeline::store_stream(
        store,
        "t/f/dump.zst",
        &options,
        &CancellationToken::new(),
        None,
        |out| {
            let noise = common::noise(12 * 1024 * 1024);
            out.write_all(&noise)?;
            Err(kura::Error::failed("pg_dump failed (exit status 1): boom"))
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.to_string(), "pg_dump failed (exit status 1): boom");
    assert!(store.head("t/f/dump.zst").await.unwrap().is_none());
    assert!(store.list_uploads("t/f/").await.unwrap().is_empty());
}

#[tokio::test]
async fn local_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    conformance(&store, true, true).await;
    failed_producer_aborts(&store).await;
    failed_part_aborts(store).await;
}

async fn s3_store(
    endpoint: &str,
    access: &str,
    secret: &str,
    bucket: &str,
) -> kura::storage::s3::S3Store {
    // The SDK reads credentials from the environment, like kura in production.
    std::env::set_var("AWS_ACCESS_KEY_ID", access);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
    kura::storage::s3::S3Store::new(
        bucket,
        "conformance/prefix",
        &S3Options {
            endpoint: Some(endpoint.to_string()),
            region: Some("us-east-1".into()),
            path_style: true,
            ..S3Options::default()
        },
    )
    .await
    .unwrap()
}

// The two S3 servers run in one test so the AWS_* variables set for each do not race.
#[tokio::test]
async fn s3_stores_conform() {
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let s3s = require!("KURA_TEST_S3S_ENDPOINT");
    let access = require!("KURA_TEST_S3S_ACCESS_KEY");
    let secret = require!("KURA_TEST_S3S_SECRET_KEY");

    let bucket = common::unique("conf").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let store = s3_store(&moto, "testing", "testing", &bucket).await;
    conformance(&store, true, false).await;
    failed_producer_aborts(&store).await;
    failed_part_aborts(store).await;

    let bucket = common::unique("conf").replace('_', "-");
    common::create_bucket(&s3s, &access, &secret, &bucket).await;
    let store = s3_store(&s3s, &access, &secret, &bucket).await;
    conformance(&store, false, false).await;

    // Wrong secret: the signature check fails with a clear, non-retried error.
    let wrong = s3_store(&s3s, &access, "not-the-secret", &bucket).await;
    let err = wrong.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Storage);
    assert!(
        err.to_string().contains("rejected the credentials"),
        "{}",
        err.chain()
    );
    assert!(!err.chain().contains("not-the-secret"));

    // Missing bucket.
    let missing = s3_store(&s3s, &access, &secret, "no-such-bucket-kura").await;
    let err = missing.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Storage);
    assert!(
        err.to_string().contains("does not exist"),
        "{}",
        err.chain()
    );

    // Nothing listening.
    let nowhere = s3_store("http://127.0.0.1:9", &access, &secret, &bucket).await;
    let err = nowhere.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Storage);
    assert!(err.to_string().contains("cannot reach"), "{}", err.chain());
}
