//! A static HTTP/1.1 file server on 127.0.0.1 with byte ranges and
//! keep-alive: what nbdkit's curl plugin and a plain download read the raw
//! image from in the P3 benchmark (an HTTP server with Range support, as a
//! user would put an image behind). GET and HEAD of the files under one
//! directory; `Range: bytes=A-B`, `A-` and `-N` (one range) answer 206.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The server; stops accepting when dropped.
#[derive(Debug)]
pub struct FileServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
}

impl FileServer {
    /// Serves the files under `root` on an ephemeral port of 127.0.0.1.
    pub fn start(root: &Path) -> std::io::Result<FileServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (root, flag, count) = (root.to_owned(), stop.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (root, count) = (root.clone(), count.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &root, &count);
                });
            }
        });
        Ok(FileServer {
            addr,
            stop,
            requests,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Answers the requests of one connection until it closes.
fn serve(conn: TcpStream, root: &Path, count: &AtomicU64) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut range = None;
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.to_owned());
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        count.fetch_add(1, Ordering::Relaxed);
        let head = method == "HEAD";
        if method != "GET" && !head {
            respond(&mut out, "405 Method Not Allowed", &[], &[])?;
            continue;
        }
        let Some(path) = resolve(root, target) else {
            respond(&mut out, "404 Not Found", &[], &[])?;
            continue;
        };
        let Ok(mut file) = std::fs::File::open(&path) else {
            respond(&mut out, "404 Not Found", &[], &[])?;
            continue;
        };
        let size = file.metadata()?.len();
        let (status, start, len, content_range) =
            match range.as_deref().map(|r| parse_range(r, size)) {
                None => ("200 OK", 0, size, None),
                Some(Some((a, b))) => (
                    "206 Partial Content",
                    a,
                    b - a + 1,
                    Some(format!("bytes {a}-{b}/{size}")),
                ),
                Some(None) => {
                    let cr = format!("bytes */{size}");
                    respond(
                        &mut out,
                        "416 Range Not Satisfiable",
                        &[("Content-Range", &cr)],
                        &[],
                    )?;
                    continue;
                }
            };
        let mut headers = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\n\
             Content-Type: application/octet-stream\r\n"
        );
        if let Some(cr) = content_range {
            headers.push_str(&format!("Content-Range: {cr}\r\n"));
        }
        headers.push_str("\r\n");
        out.write_all(headers.as_bytes())?;
        if !head {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(start))?;
            std::io::copy(&mut (&mut file).take(len), &mut out)?;
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn respond(
    out: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut s = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    out.write_all(s.as_bytes())?;
    out.write_all(body)?;
    out.flush()
}

/// The file under `root` a request target names (no `..`, no absolute
/// escapes; the query is ignored).
fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split('?').next()?.trim_start_matches('/');
    let rel = Path::new(path);
    if path.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` against a file of `size` bytes:
/// the first and last byte, or `None` if not satisfiable.
fn parse_range(spec: &str, size: u64) -> Option<(u64, u64)> {
    let spec = spec.strip_prefix("bytes=")?.split(',').next()?.trim();
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (size.checked_sub(n.min(size))?, size.checked_sub(1)?)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size.checked_sub(1)?
        } else {
            b.parse::<u64>().ok()?.min(size.checked_sub(1)?)
        };
        (start, end)
    };
    (start <= end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_as_http_says() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-2", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }

    #[test]
    fn targets_stay_under_the_root() {
        let root = Path::new("/srv");
        assert_eq!(
            resolve(root, "/image?x=1"),
            Some(PathBuf::from("/srv/image"))
        );
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/"), None);
    }
}
