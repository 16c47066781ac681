//! Raw HTTP over a TCP socket, for requests no HTTP client would send: the bytes go out as
//! given, and what comes back is an answer (status, headers, body), a close, or nothing in time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What came back on a raw connection.
#[derive(Debug)]
pub enum Outcome {
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Closed (or reset) without a byte of answer.
    Closed,
    /// Neither an answer nor a close in time.
    Hung,
}

impl Outcome {
    /// The value of the first header `name` (any case), if the answer has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            Outcome::Answer { headers, .. } => headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Answer { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The body's bytes (none for a close or a hang).
    pub fn body(&self) -> &[u8] {
        match self {
            Outcome::Answer { body, .. } => body,
            _ => &[],
        }
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.body()).into_owned()
    }
}

/// Parses a response out of `raw` once its head and Content-Length body are complete.
fn parse(raw: &[u8], eof: bool) -> Option<Outcome> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let rest = &raw[end + 4..];
    // At EOF a short body is kept as it is: a HEAD answer has none, and for any other the
    // caller's checks see the difference.
    let body = match length {
        Some(n) if rest.len() >= n => rest[..n].to_vec(),
        _ if eof => rest.to_vec(),
        _ => return None,
    };
    Some(Outcome::Answer {
        status,
        headers,
        body,
    })
}

/// Reads one answer until it is complete (head and Content-Length body; without a
/// Content-Length, up to the close), the server closes, or `wait` passes. On a keep-alive
/// connection the next answer can be read after it.
pub fn read_answer(stream: &mut TcpStream, wait: Duration) -> Outcome {
    let deadline = Instant::now() + wait;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(done) = parse(&raw, false) {
            return done;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Outcome::Hung;
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Outcome::Hung
            }
            // A reset: Linux hands out what arrived before it first.
            Err(_) => break,
        }
    }
    if raw.is_empty() {
        Outcome::Closed
    } else {
        parse(&raw, true).unwrap_or(Outcome::Closed)
    }
}

/// Opens a connection and sends `raw` on it (write errors ignored: the server may answer and
/// close before the whole request is sent).
pub fn send(addr: &str, raw: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("write timeout");
    let _ = stream.write_all(raw);
    stream
}

/// Sends `raw` on a connection of its own and reads the answer.
pub fn exchange(addr: &str, raw: &[u8], wait: Duration) -> Outcome {
    read_answer(&mut send(addr, raw), wait)
}

/// Whether the server closes the connection (EOF or a reset) within `wait`; whatever else it
/// sends meanwhile is read and dropped.
pub fn closes(stream: &mut TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}
