//! What the API tests share: a small HTTP/1.1 client, temporary
//! directories and polling.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("p2pchat-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An answer: status and parsed JSON body (`Null` if empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    pub headers: Vec<(String, String)>,
}

impl Answer {
    /// The error code of an error answer.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A client of one node's API.
#[derive(Clone, Debug)]
pub struct Client {
    pub addr: SocketAddr,
    pub token: String,
}

impl Client {
    pub fn get(&self, path: &str) -> Answer {
        self.request("GET", path, None, &[])
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> Answer {
        self.request("POST", path, Some(body.to_string().as_bytes()), &[])
    }

    pub fn post_empty(&self, path: &str) -> Answer {
        self.request("POST", path, None, &[])
    }

    pub fn delete(&self, path: &str) -> Answer {
        self.request("DELETE", path, None, &[])
    }

    /// Any request; `extra` headers replace the defaults of the same name
    /// (`Host`, `Authorization`); a header with an empty value is left out.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>, extra: &[(&str, &str)]) -> Answer {
        let mut headers: Vec<(String, String)> = vec![
            ("Host".into(), self.addr.to_string()),
            ("Authorization".into(), format!("Bearer {}", self.token)),
            ("Connection".into(), "close".into()),
        ];
        for (k, v) in extra {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(k));
            if !v.is_empty() {
                headers.push(((*k).into(), (*v).into()));
            }
        }
        let body = body.unwrap_or_default();
        let mut request = format!("{method} {path} HTTP/1.1\r\n");
        for (k, v) in &headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        let chunked = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("Transfer-Encoding"));
        if !body.is_empty() || method == "POST" {
            request.push_str("Content-Type: application/json\r\n");
            if !chunked {
                request.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
        }
        request.push_str("\r\n");
        let mut stream = TcpStream::connect(self.addr).expect("the API accepts connections");
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        // A server may answer (413) before reading a large body.
        let _ = stream.write_all(body);
        parse(&read_answer(&mut stream))
    }
}

/// One whole answer: its head, then as many body bytes as it says, so that
/// a server keeping the connection open (as after an upgrade request it
/// refused) does not leave the reader waiting for the socket to close.
fn read_answer(stream: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let done = match length {
                Some(length) => raw.len() >= split + 4 + length,
                None if head.contains("transfer-encoding: chunked") => raw.ends_with(b"0\r\n\r\n"),
                None => false,
            };
            if done {
                return raw;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

fn parse(raw: &[u8]) -> Answer {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole HTTP head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))).collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Answer { status, body, headers }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
    out
}

/// Polls `check` every 50 ms for up to 20 s.
#[track_caller]
pub fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    eventually_within(20, what, check)
}

/// Polls `check` every 50 ms for up to `secs` seconds.
#[track_caller]
pub fn eventually_within<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A WebSocket to the node's `/api/ws` (with `query`, e.g. `?types=...`),
/// authenticated with the bearer token; reads time out after 20 s.
pub fn ws_connect(client: &Client, query: &str) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(client.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = tungstenite::handshake::client::Request::builder()
        .uri(format!("ws://{}/api/ws{query}", client.addr))
        .header("Authorization", format!("Bearer {}", client.token))
        .body(())
        .unwrap();
    tungstenite::client(request, stream).expect("the WebSocket opens").0
}
