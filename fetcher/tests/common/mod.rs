//! Helpers shared by the fetcher's integration tests (beside the
//! workspace-wide `tests/support`).

use object_store::aws::AmazonS3Builder;

use crate::support;

/// A client of the test S3 server, with the test bucket and keys.
pub fn s3_builder(server: &support::S3Server) -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_bucket_name(support::BUCKET)
        .with_endpoint(server.endpoint())
        .with_access_key_id(support::ACCESS_KEY)
        .with_secret_access_key(support::SECRET_KEY)
        .with_region("us-east-1")
        .with_allow_http(true)
}
