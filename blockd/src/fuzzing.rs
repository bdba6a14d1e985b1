//! Fuzzing harnesses for the NBD server's decoders (see `raid::fuzzing` for the scheme).
//! Not part of the API: shared by the cargo-fuzz targets in `fuzz/` and the seeded unit
//! tests.
//!
//! - [`handshake`]: [`negotiate`] reading a client's side of the handshake from a byte
//!   slice and writing into a `Vec`, against a volume manager with one volume (or two, one
//!   read-only). Mode byte: bit 0 the two-volume manager, bit 1 the server is shutting down.
//!   Properties: whatever the client sends, every byte the server writes after its greeting
//!   is a well-framed option reply (or, last, the EXPORT_NAME answer), and an agreed session
//!   has consistent flags.
//! - [`transmission`]: the connection thread's reading of requests (`complete_request`,
//!   `read_request`, [`validate`], draining, reply encoding) over a byte slice, for the export
//!   and buffer size the mode byte picks. Properties: a request that `validate` lets run is
//!   within the export, aligned, within the payload limit and allowed by the negotiated
//!   features; a rejected one drains at most [`DRAIN_MAX_BYTES`]; a request that
//!   `complete_request` called whole is read without another `recv`; replies are well framed.

use std::io::{self, BufReader, Cursor};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use raid::{CacheMode, DeviceEngine};
use tokio_util::sync::CancellationToken;
use volmgr::catalog::LocalFileStore;
use volmgr::{ManagerConfig, VolumeManager};

use crate::budget::Budgets;
use crate::nbd::conn::{complete_request, drain, read_request};
use crate::nbd::handshake::{negotiate, transmission_flags, Admission, HandshakeError, Negotiated};
use crate::nbd::limits::*;
use crate::nbd::session::{validate, Encoder, Export, Outcome, Request, Verdict};
use crate::nbd::wire::*;

/// The volume every seed names.
pub const VOLUME: &str = "disk";
/// The read-only volume of the two-volume manager.
pub const VOLUME_RO: &str = "ro";
const VOLUME_BYTES: u64 = 1 << 20;

/// Two volume managers over a scratch data directory (removed on drop): one serving
/// [`VOLUME`] alone, one serving it and the read-only [`VOLUME_RO`].
#[derive(Debug)]
pub struct HandshakeFixture {
    dir: PathBuf,
    single: VolumeManager,
    pair: VolumeManager,
}

impl HandshakeFixture {
    pub fn new() -> io::Result<HandshakeFixture> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "blockd-fuzz-handshake-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = dir.join("volume.img");
        std::fs::create_dir_all(&dir)?;
        std::fs::File::create(&file)?.set_len(VOLUME_BYTES)?;
        let manager = |name: &str, volumes: &[(&str, bool)]| -> io::Result<VolumeManager> {
            let data_dir = dir.join(name);
            let mgr = VolumeManager::open(
                ManagerConfig {
                    data_dir: data_dir.clone(),
                    default_cache: CacheMode::Writeback,
                    default_volume: None,
                },
                Arc::new(LocalFileStore::new(&data_dir)),
                DeviceEngine::sync(),
            )
            .map_err(io::Error::other)?;
            for &(volume, read_only) in volumes {
                mgr.add_file_volume(volume, &file, CacheMode::Writeback, read_only)
                    .map_err(io::Error::other)?;
            }
            Ok(mgr)
        };
        Ok(HandshakeFixture {
            single: manager("single", &[(VOLUME, false)])?,
            pair: manager("pair", &[(VOLUME, false), (VOLUME_RO, true)])?,
            dir,
        })
    }
}

impl Drop for HandshakeFixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn admission() -> Admission {
    Admission {
        shutdown: CancellationToken::new(),
        budgets: Budgets::new(CONNECTIONS_DEFAULT_MAX, SEND_TIMEOUT),
    }
}

/// The handshake harness.
pub fn handshake(fx: &HandshakeFixture, data: &[u8]) {
    let Some((&mode, mut client)) = data.split_first() else {
        return;
    };
    let mgr = if mode & 1 == 0 { &fx.single } else { &fx.pair };
    let mut server = Vec::new();
    let admission = admission();
    if mode & 2 != 0 {
        admission.shutdown.cancel();
    }
    let result = raid::fuzzing::ready(negotiate(&mut client, &mut server, mgr, &admission));
    check_handshake_output(&server, &result);
    if let Ok(Some(neg)) = &result {
        assert_eq!(neg.flags, transmission_flags(&neg.volume, neg.structured));
        assert!(
            neg.structured || !neg.extended,
            "extended headers without structured"
        );
        assert!(
            neg.structured || neg.meta_allocation.is_none(),
            "a metadata context without structured replies"
        );
        assert!(mgr.lookup(neg.volume.name()).is_some());
    }
}

fn check_handshake_output(out: &[u8], result: &Result<Option<Negotiated>, HandshakeError>) {
    let Some((hello, mut rest)) = out.split_at_checked(18) else {
        panic!("the server greeting is cut short");
    };
    assert_eq!(hello[..8], NBDMAGIC.to_be_bytes());
    let mut last = None;
    while let Some((head, after)) = rest.split_at_checked(20) {
        if head[..8] != REP_MAGIC.to_be_bytes() {
            break;
        }
        let field =
            |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let Some(next) = after.get(field(16) as usize..) else {
            panic!("an option reply is longer than what the server wrote");
        };
        last = Some((field(8), field(12)));
        rest = next;
    }
    match result {
        // EXPORT_NAME's answer: size, flags, and 124 zeroes unless the client said not to.
        Ok(Some(neg)) if !rest.is_empty() => {
            assert!(
                rest.len() == 10 || rest.len() == 134,
                "EXPORT_NAME answer of {} bytes",
                rest.len()
            );
            assert_eq!(rest[..8], neg.volume.size_bytes().to_be_bytes());
            assert_eq!(rest[8..10], neg.flags.to_be_bytes());
        }
        Ok(Some(_)) => assert_eq!(last, Some((OPT_GO, REP_ACK)), "GO succeeded without an ACK"),
        _ => assert!(
            rest.is_empty(),
            "{} bytes after the last option reply",
            rest.len()
        ),
    }
}

const EXPORT_BYTES: [u64; 4] = [512, 1 << 20, 1 << 40, !511u64];
const BUFFER_BYTES: [usize; 4] = [16, 61, 4096, 1 << 16];

/// The export and the read buffer size that a transmission mode byte picks.
fn transmission_mode(mode: u8) -> (Export, usize) {
    let extended = mode & 4 != 0;
    let export = Export {
        size: EXPORT_BYTES[usize::from(mode >> 4) & 3],
        read_only: mode & 1 != 0,
        structured: extended || mode & 2 != 0,
        extended,
        meta_allocation: mode & 8 != 0,
    };
    (export, BUFFER_BYTES[usize::from(mode >> 6)])
}

/// The transmission harness.
pub fn transmission(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let (ex, buffer_bytes) = transmission_mode(mode);
    let enc = Encoder::new(ex.structured, ex.extended, 1);
    let mut r = BufReader::with_capacity(buffer_bytes, Cursor::new(stream));
    let consumed = |r: &BufReader<Cursor<&[u8]>>| r.get_ref().position() - r.buffer().len() as u64;
    let mut out = Vec::new();
    loop {
        let start = consumed(&r);
        let buffered = r.buffer().len() as u64;
        let complete = complete_request(r.buffer(), ex.extended);
        let req = match read_request(&mut r, ex.extended) {
            Ok(Some(req)) => req,
            Ok(None) => {
                assert_eq!(start, stream.len() as u64, "a clean end before the end");
                return;
            }
            Err(e) => {
                assert!(
                    !complete || e.kind() != io::ErrorKind::UnexpectedEof,
                    "a complete request was cut short"
                );
                return;
            }
        };
        let verdict = validate(&req, &ex);
        check_verdict(&req, &ex, &verdict);
        let (payload, outcome) = match verdict {
            Verdict::Close => return,
            Verdict::Reject { errno, drain, why } => (drain, Outcome::Error(errno, why)),
            Verdict::Run if req.kind == CMD_WRITE => (req.len, Outcome::Done),
            Verdict::Run => (0, Outcome::Done),
        };
        let read = drain(&mut r, payload);
        if complete {
            assert!(read.is_ok(), "a complete request ran out of bytes");
            assert!(
                consumed(&r) - start <= buffered,
                "a complete request needed more than the buffer"
            );
        }
        if read.is_err() {
            return;
        }
        let before = out.len();
        // Requests that run are answered as done: there is no volume to run them on.
        let _ = enc.encode(&mut out, req, outcome);
        check_reply(&out[before..], &req, &ex);
    }
}

fn check_verdict(req: &Request, ex: &Export, verdict: &Verdict) {
    let payload_flag = req.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    let carries = req.kind == CMD_WRITE || (ex.extended && payload_flag);
    match *verdict {
        Verdict::Run => {
            assert!(req.kind <= CMD_BLOCK_STATUS && req.kind != CMD_DISC);
            if req.kind == CMD_FLUSH {
                assert_eq!((req.offset, req.len), (0, 0));
                return;
            }
            let end = req.offset.checked_add(req.len);
            assert!(
                end.is_some_and(|end| end <= ex.size),
                "runs beyond the export"
            );
            assert!(req.len > 0 && req.offset.is_multiple_of(512) && req.len.is_multiple_of(512));
            if matches!(req.kind, CMD_READ | CMD_WRITE) {
                assert!(req.len <= u64::from(PAYLOAD_MAX_BYTES));
            }
            if matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
                assert!(!ex.read_only, "a write runs on a read-only export");
            }
            assert!(req.kind != CMD_BLOCK_STATUS || ex.meta_allocation);
            assert!(!payload_flag || (ex.extended && req.kind == CMD_WRITE));
            assert!(req.flags & CMD_FLAG_DF == 0 || (ex.structured && req.kind == CMD_READ));
        }
        Verdict::Reject { errno, drain, .. } => {
            assert!(matches!(errno, EINVAL | EPERM | ENOSPC), "errno {errno}");
            assert!(drain <= DRAIN_MAX_BYTES);
            assert_eq!(drain, if carries { req.len } else { 0 });
        }
        Verdict::Close => {
            assert!(req.kind == CMD_DISC || (carries && req.len > DRAIN_MAX_BYTES));
        }
    }
}

fn check_reply(reply: &[u8], req: &Request, ex: &Export) {
    let be32 = |at: usize| {
        reply
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let cookie = reply.get(8..16).map(|b| b == req.cookie.to_be_bytes());
    let (magic, header, len) = if ex.extended {
        let len = reply
            .get(24..32)
            .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
        (EXTENDED_REPLY_MAGIC, 32, len)
    } else if ex.structured && reply.len() != 16 {
        (STRUCTURED_REPLY_MAGIC, 20, be32(16).map(u64::from))
    } else {
        (SIMPLE_REPLY_MAGIC, 16, Some(0))
    };
    assert_eq!(be32(0), Some(magic), "reply magic");
    assert_eq!(cookie, Some(true), "reply cookie");
    assert_eq!(len, Some((reply.len() - header) as u64), "reply length");
}

/// Encodes a client's handshake: flags, then each option.
fn options(flags: u32, opts: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = flags.to_be_bytes().to_vec();
    for (option, data) in opts {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    }
    b
}

fn name_and_infos(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

fn meta_queries(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Client handshakes as qemu, nbd-client, libnbd and older clients send them, and a few
/// that the server refuses, under every mode.
pub fn handshake_seeds() -> Vec<Vec<u8>> {
    let fixed = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let go = |name: &str| {
        (
            OPT_GO,
            name_and_infos(name, &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
        )
    };
    let scripts = vec![
        options(fixed, &[go(VOLUME)]),
        options(fixed, &[go("")]),
        options(FLAG_C_FIXED_NEWSTYLE, &[(OPT_EXPORT_NAME, VOLUME.into())]),
        options(0, &[(OPT_LIST, vec![]), (OPT_EXPORT_NAME, VOLUME.into())]),
        options(
            fixed,
            &[
                (OPT_STRUCTURED_REPLY, vec![]),
                (OPT_LIST_META_CONTEXT, meta_queries(VOLUME, &["base:"])),
                (
                    OPT_SET_META_CONTEXT,
                    meta_queries(VOLUME, &[META_BASE_ALLOCATION]),
                ),
                (OPT_INFO, name_and_infos(VOLUME_RO, &[INFO_DESCRIPTION])),
                go(VOLUME),
            ],
        ),
        options(
            fixed,
            &[
                (OPT_EXTENDED_HEADERS, vec![]),
                (OPT_STRUCTURED_REPLY, vec![]),
                (
                    OPT_SET_META_CONTEXT,
                    meta_queries(VOLUME, &[META_BASE_ALLOCATION, "qemu:dirty-bitmap:x"]),
                ),
                go(VOLUME),
            ],
        ),
        options(
            fixed,
            &[
                (OPT_STARTTLS, vec![]),
                (42, vec![1, 2, 3]),
                (OPT_LIST, vec![]),
                (OPT_ABORT, vec![]),
            ],
        ),
        options(
            fixed,
            &[
                (OPT_EXTENDED_HEADERS, vec![]),
                (OPT_EXPORT_NAME, VOLUME.into()),
            ],
        ),
        options(
            fixed,
            &[(OPT_INFO, name_and_infos("nope", &[])), go(VOLUME_RO)],
        ),
    ];
    let mut seeds = Vec::new();
    for s in scripts {
        for mode in 0..4u8 {
            seeds.push([&[mode][..], &s].concat());
        }
    }
    seeds
}

/// Encodes one request header in the compact or the extended form.
pub fn request(extended: bool, kind: u16, flags: u16, offset: u64, len: u64) -> Vec<u8> {
    let mut b = Vec::new();
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    if extended {
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
    b
}

/// Request streams of every command, valid and refused, for compact and extended headers.
pub fn transmission_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for extended in [false, true] {
        let rq = |kind, flags, offset, len| request(extended, kind, flags, offset, len);
        let write = |offset, len: u64| {
            [
                rq(CMD_WRITE, CMD_FLAG_FUA, offset, len),
                vec![0xab; len as usize],
            ]
            .concat()
        };
        let streams = vec![
            [
                rq(CMD_READ, 0, 0, 4096),
                write(4096, 512),
                rq(CMD_FLUSH, 0, 0, 0),
                rq(CMD_TRIM, 0, 0, 1024),
                rq(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    512,
                ),
                rq(CMD_CACHE, 0, 0, 512),
                rq(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096),
                rq(CMD_DISC, 0, 0, 0),
            ]
            .concat(),
            [
                rq(CMD_READ, CMD_FLAG_DF, 1, 512),
                write(1 << 20, 512),
                rq(CMD_WRITE, 0, 0, 0),
                rq(9, 0, 0, 512),
                rq(CMD_READ, 0, !511u64, 512),
                rq(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 512),
            ]
            .concat(),
            write(0, 1536),
        ];
        for s in streams {
            for mode in [0u8, 0x02, 0x0a, 0x1b, 0x5e, 0xc6] {
                let mode = if extended { mode | 4 } else { mode & !4 };
                seeds.push([&[mode][..], &s].concat());
            }
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_seeds_negotiate() {
        let fx = HandshakeFixture::new().unwrap();
        let agreed = handshake_seeds()
            .iter()
            .filter(|s| s[0] & 2 == 0)
            .filter(|s| {
                let mut client = &s[1..];
                let mut server = Vec::new();
                let mgr = if s[0] & 1 == 0 { &fx.single } else { &fx.pair };
                matches!(
                    raid::fuzzing::ready(negotiate(&mut client, &mut server, mgr, &admission())),
                    Ok(Some(_))
                )
            })
            .count();
        assert!(
            agreed >= 8,
            "only {agreed} seed handshakes agreed on a session"
        );
    }

    #[test]
    fn handshake_survives_seeded_inputs() {
        let fx = HandshakeFixture::new().unwrap();
        raid::fuzzing::run_seeded("handshake", &handshake_seeds(), 10_000, |d| {
            handshake(&fx, d)
        });
    }

    #[test]
    fn transmission_survives_seeded_inputs() {
        raid::fuzzing::run_seeded("transmission", &transmission_seeds(), 20_000, transmission);
    }
}
