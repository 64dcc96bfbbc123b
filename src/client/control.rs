//! The control socket between a running `coda-mount` and the `coda` CLI
//! (docs/MOUNT.md). A Unix stream socket at `cache_dir/control.sock`; per
//! connection one request line in, one response out, then the server closes.
//!
//! Request: the command and its arguments separated by TAB, ending in `\n`.
//! Response: `ok` or `err ERRNO MESSAGE` on the first line, then any number
//! of output lines, then end of stream.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The socket's name inside `cache_dir`.
pub const SOCKET_NAME: &str = "control.sock";

/// Longest request line accepted (bytes).
pub const MAX_REQUEST: usize = 64 * 1024;

/// Where the control socket of the mount using `cache_dir` lives.
pub fn socket_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(SOCKET_NAME)
}

/// A response: success with output lines, or an errno and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The command succeeded; its output, one string per line.
    Ok(Vec<String>),
    /// The command failed.
    Err {
        /// A positive errno (`EINVAL` for a malformed request).
        errno: i32,
        /// Why, for a person; newlines are flattened to spaces on the wire.
        message: String,
    },
}

/// Encode a request line; `None` if a field holds a TAB or newline (or the
/// command is empty).
pub fn encode_request(fields: &[&str]) -> Option<String> {
    if fields.first().is_none_or(|c| c.is_empty())
        || fields.iter().any(|f| f.contains(['\t', '\n', '\r']))
    {
        return None;
    }
    Some(format!("{}\n", fields.join("\t")))
}

/// Split a request line (without its newline) into fields.
pub fn decode_request(line: &str) -> Vec<String> {
    line.trim_end_matches(['\n', '\r'])
        .split('\t')
        .map(str::to_string)
        .collect()
}

impl Response {
    /// The response as sent on the socket: `ok` and the output lines, or
    /// one `err ERRNO MESSAGE` line. Newlines inside a line become spaces so
    /// the framing holds.
    pub fn encode(&self) -> String {
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        match self {
            Response::Ok(lines) => {
                let mut s = String::from("ok\n");
                for l in lines {
                    s.push_str(&one_line(l));
                    s.push('\n');
                }
                s
            }
            Response::Err { errno, message } => format!("err {errno} {}\n", one_line(message)),
        }
    }

    /// Parse everything read from the socket; `None` if the first line is
    /// neither `ok` nor `err` with a numeric errno.
    pub fn decode(text: &str) -> Option<Response> {
        let mut lines = text.lines();
        let first = lines.next()?;
        if first == "ok" {
            return Some(Response::Ok(lines.map(str::to_string).collect()));
        }
        let rest = first.strip_prefix("err ")?;
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(Response::Err {
            errno: code.parse().ok()?,
            message: message.to_string(),
        })
    }
}

/// Send one request to the mount behind `socket` and read its response.
/// Connection errors (no socket, nobody listening) come back as the
/// `io::Error`, so a caller can tell "no running mount" from a failure.
pub fn call(socket: &Path, fields: &[&str], timeout: Duration) -> std::io::Result<Response> {
    let line = encode_request(fields).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "arguments may not hold TAB or newline",
        )
    })?;
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(line.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut text = String::new();
    let mut r = BufReader::new(s);
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            break;
        }
        text.push_str(&l);
    }
    Response::decode(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed response from the mount: {text:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let l = encode_request(&["failover", "/a b/web", "/local"]).unwrap();
        assert_eq!(l, "failover\t/a b/web\t/local\n");
        assert_eq!(decode_request(&l), vec!["failover", "/a b/web", "/local"]);
        assert_eq!(encode_request(&["x", "a\tb"]), None);
        assert_eq!(encode_request(&[""]), None);
        for r in [
            Response::Ok(vec![]),
            Response::Ok(vec!["state: connected".into(), "x: y".into()]),
            Response::Err {
                errno: 5,
                message: "I/O error: gone".into(),
            },
        ] {
            assert_eq!(Response::decode(&r.encode()), Some(r));
        }
        assert_eq!(Response::decode("bogus\n"), None);
    }
}
