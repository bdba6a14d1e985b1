//! The socket a connection's threads share, in blocking mode: plain TCP or Unix, optionally
//! wrapped in the TLS session negotiated by STARTTLS.
//!
//! Clones share one socket; the connection code keeps one reader at a time (its read-side
//! lock) and one writer at a time (its write-side lock). Under TLS the two directions share
//! one `rustls::ServerConnection`, so each takes its lock only to decrypt or encrypt, never
//! across a blocking `recv` or `send`: a reader waiting for the client does not hold up
//! replies, and a reply stuck behind a full socket does not stop the reader from taking in
//! requests. Records leave in the order they were encrypted because the writer keeps its own
//! lock from encryption until the bytes are on the socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::ServerConnection;

use super::limits::{READ_BUFFER_BYTES, TLS_SEND_BUFFER_KEEP_BYTES};

/// A connected stream of either family.
#[derive(Debug)]
pub enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Plain {
    fn try_clone(&self) -> io::Result<Plain> {
        Ok(match self {
            Plain::Tcp(s) => Plain::Tcp(s.try_clone()?),
            Plain::Unix(s) => Plain::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Plain::Tcp(s) => s.shutdown(how),
            Plain::Unix(s) => s.shutdown(how),
        };
    }
}

impl Read for Plain {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.read(buf),
            Plain::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Plain {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.write(buf),
            Plain::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.write_vectored(bufs),
            Plain::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::os::fd::AsFd for Plain {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Plain::Tcp(s) => s.as_fd(),
            Plain::Unix(s) => s.as_fd(),
        }
    }
}

/// The TLS state both directions share.
#[derive(Debug)]
struct Tls {
    conn: Mutex<ServerConnection>,
    /// Ciphertext received but not yet handed to rustls (`start..` of the buffer).
    received: Mutex<Received>,
    /// Ciphertext encrypted but not yet sent; held from encryption to `send` (record order).
    sending: Mutex<Vec<u8>>,
}

#[derive(Debug)]
struct Received {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A connection's socket in blocking mode.
#[derive(Debug)]
pub struct Socket {
    plain: Plain,
    tls: Option<Arc<Tls>>,
}

impl Socket {
    pub fn plain(plain: Plain) -> Socket {
        Socket { plain, tls: None }
    }

    /// Wraps a socket whose TLS handshake is complete. Plaintext and ciphertext rustls
    /// already holds stay in `conn` and are read first.
    pub fn tls(plain: Plain, mut conn: ServerConnection) -> Socket {
        // Replies are encrypted whole and sent at once; the connection bounds their size.
        conn.set_buffer_limit(None);
        let tls = Tls {
            conn: Mutex::new(conn),
            received: Mutex::new(Received {
                buf: vec![0; READ_BUFFER_BYTES],
                start: 0,
                end: 0,
            }),
            sending: Mutex::new(Vec::new()),
        };
        Socket {
            plain,
            tls: Some(Arc::new(tls)),
        }
    }

    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(Socket {
            plain: self.plain.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A send that makes no progress for `timeout` fails (`SO_SNDTIMEO`, shared by every
    /// handle on the socket), so a client that stops reading cannot hold its session.
    pub fn set_send_timeout(&self, timeout: std::time::Duration) -> io::Result<()> {
        match &self.plain {
            Plain::Tcp(s) => s.set_write_timeout(Some(timeout)),
            Plain::Unix(s) => s.set_write_timeout(Some(timeout)),
        }
    }

    /// Shuts down the read side: a thread blocked reading sees EOF.
    pub fn shutdown_read(&self) {
        self.plain.shutdown(Shutdown::Read);
    }

    /// Ends the write side, with a TLS close_notify first when TLS is up.
    pub fn shutdown_write(&mut self) {
        if let Some(tls) = self.tls.clone() {
            let mut out = lock(&tls.sending);
            {
                let mut conn = lock(&tls.conn);
                conn.send_close_notify();
                while conn.wants_write() {
                    if conn.write_tls(&mut *out).is_err() {
                        break;
                    }
                }
            }
            let _ = self.plain.write_all(&out);
            out.clear();
        }
        self.plain.shutdown(Shutdown::Write);
    }

    /// Whether a read would find bytes without blocking (a zero-timeout poll; never blocks).
    pub fn readable(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if let Some(tls) = &self.tls {
            let received = lock(&tls.received);
            if received.start < received.end {
                return true;
            }
            drop(received);
            let mut conn = lock(&tls.conn);
            if conn
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() > 0)
            {
                return true;
            }
        }
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&self.plain),
            PollFlags::POLLIN,
        )];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    fn tls_read(plain: &mut Plain, tls: &Tls, buf: &mut [u8]) -> io::Result<usize> {
        let mut received = lock(&tls.received);
        loop {
            {
                let mut conn = lock(&tls.conn);
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if received.start < received.end {
                    let Received {
                        buf: raw,
                        start,
                        end,
                    } = &mut *received;
                    let mut pending = raw.get(*start..*end).unwrap_or_default();
                    let before = pending.len();
                    conn.read_tls(&mut pending)?;
                    *start += before - pending.len();
                    conn.process_new_packets().map_err(tls_error)?;
                    continue;
                }
            }
            // Nothing buffered: wait for the client without holding the session.
            let r = &mut *received;
            let n = plain.read(&mut r.buf)?;
            if n == 0 {
                return Ok(0);
            }
            r.start = 0;
            r.end = n;
        }
    }

    fn tls_write(plain: &mut Plain, tls: &Tls, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&tls.sending);
        let n = {
            let mut conn = lock(&tls.conn);
            let n = conn.writer().write_vectored(bufs)?;
            while conn.wants_write() {
                conn.write_tls(&mut *out)?;
            }
            n
        };
        let sent = plain.write_all(&out);
        out.clear();
        if out.capacity() > TLS_SEND_BUFFER_KEEP_BYTES {
            *out = Vec::new();
        }
        sent.map(|()| n)
    }
}

impl std::os::fd::AsFd for Socket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.plain.as_fd()
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.tls {
            None => self.plain.read(buf),
            Some(tls) => Self::tls_read(&mut self.plain, tls, buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &self.tls {
            None => self.plain.write_vectored(bufs),
            Some(tls) => Self::tls_write(&mut self.plain, tls, bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
