//! Turning a store URL (and an S3 endpoint) into an object_store back end,
//! checking everything the user typed first: object_store panics on some
//! malformed endpoints, and the url crate reads `file:relative` as
//! `/relative`.

use object_store::client::SpawnedReqwestConnector;
use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ClientOptions, ObjectStore, RetryConfig};

use super::StoreOptions;
use crate::Error;

/// What [`Store::open`](super::Store::open) builds on.
pub(super) struct Backend {
    pub inner: Arc<dyn ObjectStore>,
    pub writable: bool,
    /// The directory of a `file://` store (which need not exist yet).
    pub local_root: Option<PathBuf>,
}

pub(super) fn open(url: &str, options: &StoreOptions) -> Result<Backend, Error> {
    let bad = |why: String| Error::BadUrl {
        url: url.to_owned(),
        why,
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    // Retries happen in `Store`, around whole operations (see `retry`).
    let retry = RetryConfig {
        max_retries: 0,
        retry_timeout: Duration::ZERO,
        ..RetryConfig::default()
    };
    let client = ClientOptions::new()
        .with_timeout(options.request_timeout)
        .with_connect_timeout(Duration::from_secs(5));
    let backend = |inner, writable| Backend {
        inner,
        writable,
        local_root: None,
    };
    Ok(match parsed.scheme() {
        "file" => {
            // `file:relative` and `file://relative` parse as absolute paths
            // the user did not name; only `file:///abs` and
            // `file://localhost/abs` say what they mean.
            let rest = &url["file:".len()..];
            if !(rest.starts_with("///") || rest.starts_with("//localhost/")) {
                return Err(bad("not an absolute local path: write file:///PATH".into()));
            }
            let path = parsed
                .to_file_path()
                .map_err(|_| bad("not an absolute local path: write file:///PATH".into()))?;
            let prefix = object_store::path::Path::from_absolute_path(&path)
                .map_err(|e| bad(e.to_string()))?;
            // Without fsync a host crash can leave a durable manifest naming
            // empty chunk files (invariant 4). With it, every put syncs the
            // file, then links it into place and syncs the directory (and any
            // directory it had to create, the store's own included), before
            // it returns.
            let fs = object_store::local::LocalFileSystem::new().with_fsync(true);
            Backend {
                inner: Arc::new(object_store::prefix::PrefixStore::new(fs, prefix)),
                writable: true,
                local_root: Some(path),
            }
        }
        "s3" => {
            let bucket = parsed
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| bad("no bucket: use s3://BUCKET/PREFIX".into()))?;
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            let (endpoint, from) = match &options.endpoint {
                Some(e) => (Some(e.clone()), "--endpoint or AWS_ENDPOINT_URL"),
                None => (std::env::var("AWS_ENDPOINT_URL").ok(), "AWS_ENDPOINT_URL"),
            };
            let mut client = client;
            if let Some(endpoint) = endpoint {
                let checked = check_endpoint(&endpoint).map_err(|why| Error::BadEndpoint {
                    endpoint: endpoint.clone(),
                    from,
                    store: url.to_owned(),
                    why,
                })?;
                // The user named a plain-http endpoint: allow it.
                if checked.scheme() == "http" {
                    client = client.with_allow_http(true);
                }
                builder = builder.with_endpoint(endpoint);
            }
            if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1") {
                client = client.with_allow_http(true);
            }
            let s3 = builder
                .with_http_connector(SpawnedReqwestConnector::new(super::io_runtime()?))
                .with_client_options(client)
                .build()
                .map_err(|e| client_error(url, e))?;
            backend(with_prefix(Arc::new(s3), parsed.path()), true)
        }
        "http" | "https" => {
            check_endpoint(url).map_err(bad)?;
            let http = object_store::http::HttpBuilder::new()
                .with_url(url)
                .with_retry(retry)
                .with_http_connector(SpawnedReqwestConnector::new(super::io_runtime()?))
                .with_client_options(client.with_allow_http(true))
                .build()
                .map_err(|e| client_error(url, e))?;
            backend(Arc::new(http), false)
        }
        "memory" => backend(Arc::new(object_store::memory::InMemory::new()), true),
        other => {
            return Err(bad(format!(
                "unknown scheme {other:?}: use file://, s3://, http(s):// or memory://"
            )));
        }
    })
}

/// An endpoint must be an absolute http(s) URL with a host.
fn check_endpoint(endpoint: &str) -> Result<url::Url, String> {
    if endpoint.trim().is_empty() {
        return Err("empty; give a URL such as http://127.0.0.1:9000".into());
    }
    let u = url::Url::parse(endpoint).map_err(|e| match e {
        url::ParseError::RelativeUrlWithoutBase => {
            "no scheme; write http://HOST:PORT or https://HOST".to_owned()
        }
        e => e.to_string(),
    })?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {:?} is not http or https; write http://HOST:PORT or https://HOST",
            u.scheme()
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    Ok(u)
}

/// Explains why object_store could not build its HTTP client. The usual
/// cause is a host without CA certificates: reqwest then fails with a bare
/// "builder error", even for an http:// endpoint, because it sets up TLS
/// before it knows it will not need it.
fn client_error(url: &str, e: object_store::Error) -> Error {
    let mut chain = Vec::new();
    let mut cause: Option<&(dyn StdError + 'static)> = Some(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !chain.iter().any(|t: &String| t.contains(&text)) {
            chain.push(text);
        }
        cause = c.source();
    }
    let all = chain.join(": ");
    let why = if all.contains("CA certificates") {
        format!(
            "no CA certificates found ({all}); install ca-certificates or set SSL_CERT_FILE \
             to a PEM bundle"
        )
    } else {
        all
    };
    Error::HttpClient {
        store: url.to_owned(),
        why,
    }
}

fn with_prefix(store: Arc<dyn ObjectStore>, prefix: &str) -> Arc<dyn ObjectStore> {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        for bad in [
            "",
            " ",
            "127.0.0.1:9000",
            "localhost:9000",
            "http://[::1",
            "ftp://host",
            "http://",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad:?}");
        }
        for ok in [
            "http://127.0.0.1:9000",
            "https://s3.example.com",
            "http://[::1]:9",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok:?}");
        }
    }
}
