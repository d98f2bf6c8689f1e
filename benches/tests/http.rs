//! Host tests of the benchmarks' HTTP file server on a real socket: whole
//! files, byte ranges and HEAD on one kept-alive connection, and the
//! errors (missing file, unsatisfiable range, escapes from the root).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use benches::http::FileServer;

/// Sends one request on `conn` and reads the answer: status line, headers
/// (lower-case names), body (none for HEAD).
fn ask(
    conn: &mut BufReader<TcpStream>,
    request: &str,
    head: bool,
) -> (String, Vec<(String, String)>, Vec<u8>) {
    conn.get_mut().write_all(request.as_bytes()).unwrap();
    let mut status = String::new();
    conn.read_line(&mut status).unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        conn.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap();
    let mut body = vec![0u8; if head { 0 } else { len }];
    conn.read_exact(&mut body).unwrap();
    (status.trim_end().to_owned(), headers, body)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn ranges_head_and_keep_alive_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("image"), &data).unwrap();
    let server = FileServer::start(dir.path()).unwrap();
    let mut conn = BufReader::new(TcpStream::connect(server.addr()).unwrap());

    let (status, h, body) = ask(&mut conn, "GET /image HTTP/1.1\r\nHost: x\r\n\r\n", false);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(header(&h, "accept-ranges"), Some("bytes"));
    assert_eq!(body, data);

    let (status, h, body) = ask(
        &mut conn,
        "GET /image HTTP/1.1\r\nRange: bytes=1000-1999\r\n\r\n",
        false,
    );
    assert_eq!(status, "HTTP/1.1 206 Partial Content");
    assert_eq!(header(&h, "content-range"), Some("bytes 1000-1999/100000"));
    assert_eq!(body, data[1000..2000]);

    let (_, h, body) = ask(
        &mut conn,
        "GET /image HTTP/1.1\r\nrange: bytes=-10\r\n\r\n",
        false,
    );
    assert_eq!(
        header(&h, "content-range"),
        Some("bytes 99990-99999/100000")
    );
    assert_eq!(body, data[99_990..]);

    let (status, h, body) = ask(&mut conn, "HEAD /image HTTP/1.1\r\n\r\n", true);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(header(&h, "content-length"), Some("100000"));
    assert!(body.is_empty());

    let (status, ..) = ask(
        &mut conn,
        "GET /image HTTP/1.1\r\nRange: bytes=100000-\r\n\r\n",
        false,
    );
    assert_eq!(status, "HTTP/1.1 416 Range Not Satisfiable");
    let (status, ..) = ask(&mut conn, "GET /missing HTTP/1.1\r\n\r\n", false);
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, ..) = ask(&mut conn, "GET /../image HTTP/1.1\r\n\r\n", false);
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert_eq!(server.requests(), 7, "all on the one connection");
}
