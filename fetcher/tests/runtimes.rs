//! A store is used from several tokio runtimes in one process: the daemon
//! takes the lease on its own runtime, then the engine fetches on another.
//! An HTTP connection opened from the first must not strand the requests of
//! the second (seen: `isr resume` from S3 timed out on its first GET, the
//! one `isr log` had just answered). Its own binary: it sets the AWS_*
//! variables of the process.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use bytes::Bytes;
use fetcher::{Store, StoreOptions};

#[test]
fn an_s3_store_answers_from_every_runtime_it_is_used_from() {
    let server = support::S3Server::start();
    for (k, v) in server.env() {
        // SAFETY: this binary's only test sets the variables before it
        // starts any thread of its own; nothing else reads them concurrently.
        unsafe { std::env::set_var(k, v) };
    }
    let options = StoreOptions {
        endpoint: Some(server.endpoint()),
        // No retries: a stranded request fails instead of being retried on
        // a new connection.
        retry_timeout: Duration::ZERO,
        request_timeout: Duration::from_secs(5),
        bwlimit: None,
    };
    let url = format!("s3://{}/runtimes", support::BUCKET);
    let store = Store::open(&url, &options).unwrap();

    // A pooled connection is opened from a runtime that then stops running.
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    first
        .block_on(store.put_head_hint("p", 7))
        .expect("put from the first runtime");
    first
        .block_on(store.put_chunk(&format::ChunkId([3; 32]), Bytes::from_static(b"x")))
        .expect("create from the first runtime");

    // Another runtime (the engine's) uses the same store.
    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..3 {
        let got = second
            .block_on(store.get_chunk(&format::ChunkId([3; 32])))
            .unwrap_or_else(|e| panic!("round {round}: get from a second runtime: {e}"));
        assert_eq!(&got[..], b"x");
        assert!(
            second
                .block_on(store.has_chunk(&format::ChunkId([3; 32])))
                .unwrap()
        );
    }
    // And the first runtime, idle meanwhile, still works too.
    assert!(
        first
            .block_on(store.has_chunk(&format::ChunkId([3; 32])))
            .unwrap()
    );
    drop(first);
    // A runtime made and dropped per call (as short-lived commands do).
    for _ in 0..3 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(
            rt.block_on(store.has_chunk(&format::ChunkId([3; 32])))
                .unwrap()
        );
    }
}
