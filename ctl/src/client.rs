//! The client side of the local API: one request, a stream of responses.
//!
//! The daemon reads one JSON line ([`Request`]) and answers with JSON lines
//! ([`Response`]) until it closes the connection.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use overlay_proto::api::{Request, Response};

/// Everything that can go wrong talking to the daemon, each with the one line the
/// user sees.
#[derive(Debug)]
pub enum ClientError {
    /// No socket file, or nobody listening on it.
    NotRunning { socket: PathBuf },
    /// The socket exists but its mode keeps us out.
    PermissionDenied {
        socket: PathBuf,
        group: Option<String>,
    },
    /// The daemon took longer than we are willing to wait for its next line.
    TimedOut { socket: PathBuf },
    /// Any other I/O failure on the socket.
    Io { socket: PathBuf, source: io::Error },
    /// The daemon sent something that is not a `Response`.
    BadResponse { line: String, source: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::NotRunning { socket } => write!(
                f,
                "overlayd is not running (no socket at {}); start it with 'sudo overlayd up'",
                socket.display()
            ),
            ClientError::PermissionDenied { socket, group } => match group {
                Some(group) => write!(
                    f,
                    "permission denied on {}; run as root or join the '{group}' group",
                    socket.display()
                ),
                None => write!(
                    f,
                    "permission denied on {}; run as root or join the socket's group",
                    socket.display()
                ),
            },
            ClientError::TimedOut { socket } => {
                write!(f, "overlayd did not answer in time on {}", socket.display())
            }
            ClientError::Io { socket, source } => {
                write!(f, "talking to overlayd on {}: {source}", socket.display())
            }
            ClientError::BadResponse { line, source } => {
                let shown: String = line.chars().take(120).collect();
                write!(f, "overlayd sent an unreadable answer ({source}): {shown}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// An open request whose responses can be read one at a time, as they stream in.
pub struct Exchange {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    line: String,
}

/// Connects to the daemon, sends `request`, and returns the response stream.
///
/// `read_timeout` bounds the wait for each response line, so a wedged daemon turns
/// into an error instead of a hung terminal.
pub fn send(
    socket: &Path,
    request: &Request,
    read_timeout: Duration,
) -> Result<Exchange, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
    let io_err = |source| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(read_timeout))
        .map_err(io_err)?;
    let mut line = serde_json::to_string(request).map_err(|e| io_err(io::Error::other(e)))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io_err)?;
    (&stream).flush().map_err(io_err)?;
    Ok(Exchange {
        socket: socket.to_path_buf(),
        reader: BufReader::new(stream),
        line: String::new(),
    })
}

impl Exchange {
    /// The next response, or `None` once the daemon has closed the connection.
    pub fn next_response(&mut self) -> Result<Option<Response>, ClientError> {
        loop {
            self.line.clear();
            let n = self.reader.read_line(&mut self.line).map_err(|source| {
                if matches!(
                    source.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    ClientError::TimedOut {
                        socket: self.socket.clone(),
                    }
                } else {
                    ClientError::Io {
                        socket: self.socket.clone(),
                        source,
                    }
                }
            })?;
            if n == 0 {
                return Ok(None);
            }
            let trimmed = self.line.trim();
            if trimmed.is_empty() {
                continue;
            }
            return serde_json::from_str(trimmed)
                .map(Some)
                .map_err(|e| ClientError::BadResponse {
                    line: trimmed.to_string(),
                    source: e.to_string(),
                });
        }
    }
}

fn connect_error(socket: &Path, err: io::Error) -> ClientError {
    match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
            socket: socket.to_path_buf(),
        },
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            socket: socket.to_path_buf(),
            group: socket_group(socket),
        },
        _ => ClientError::Io {
            socket: socket.to_path_buf(),
            source: err,
        },
    }
}

/// The name of the group owning the socket, from /etc/group, when it can be found.
fn socket_group(socket: &Path) -> Option<String> {
    let gid = std::fs::metadata(socket).ok()?.gid();
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    group_name(&groups, gid)
}

/// Looks `gid` up in the text of an /etc/group file.
pub fn group_name(etc_group: &str, gid: u32) -> Option<String> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let id: u32 = fields.next()?.parse().ok()?;
        (id == gid && !name.is_empty()).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_name_finds_the_gid() {
        let text = "root:x:0:\nbad line\noverlay:x:998:alice,bob\n";
        assert_eq!(group_name(text, 998).as_deref(), Some("overlay"));
        assert_eq!(group_name(text, 0).as_deref(), Some("root"));
        assert_eq!(group_name(text, 5), None);
    }

    #[test]
    fn missing_socket_reads_as_not_running() {
        let path = Path::new("/nonexistent/overlayd.sock");
        let err = send(path, &Request::Status, Duration::from_secs(1))
            .err()
            .expect("connect must fail");
        assert_eq!(
            err.to_string(),
            "overlayd is not running (no socket at /nonexistent/overlayd.sock); \
             start it with 'sudo overlayd up'"
        );
    }
}
