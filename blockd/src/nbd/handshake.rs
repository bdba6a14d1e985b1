//! Fixed-newstyle negotiation: the option loop up to EXPORT_NAME or GO.
//!
//! Every option's payload is read in full (after checking its length against
//! [`OPTION_MAX_BYTES`]) before it is parsed, so a bad option never desynchronises the
//! stream: it gets an error reply and the loop goes on. Only violations with no error channel
//! (bad option magic, unknown client flags, an oversized option, an unknown EXPORT_NAME) end
//! the connection.
//!
//! Once the server is shutting down, every option but ABORT is answered with
//! `NBD_REP_ERR_SHUTDOWN` (EXPORT_NAME, which has no error reply, closes the connection), so a
//! client mid-handshake learns why instead of seeing the connection drop.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use volmgr::{Volume, VolumeManager};
use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::limits::*;
use super::tls::TlsMode;
use super::wire::*;
use crate::budget::Budgets;

/// What the client and server agreed on.
#[derive(Debug)]
pub struct Negotiated {
    pub volume: Arc<Volume>,
    pub structured: bool,
    pub extended: bool,
    /// Context id of `base:allocation` if the client selected it.
    pub meta_allocation: Option<u32>,
    pub flags: u16,
    /// The session's slot in the server's session budget, held for the session's life.
    pub slot: Option<OwnedSemaphorePermit>,
}

/// What the server decides about a connection beyond the protocol.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Cancelled at server shutdown: options are then refused with `ERR_SHUTDOWN`.
    pub shutdown: CancellationToken,
    /// The session budget: a GO beyond it is refused with `ERR_POLICY`.
    pub budgets: Arc<Budgets>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("client aborted")]
    Aborted,
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("EXPORT_NAME while the server is shutting down")]
    ShuttingDown,
    #[error("EXPORT_NAME while every session slot is in use")]
    Busy,
}

fn violation(why: impl Into<String>) -> HandshakeError {
    HandshakeError::Protocol(why.into())
}

/// Context id we hand out for `base:allocation`.
const META_ID_ALLOCATION: u32 = 1;

struct State<'a> {
    mgr: &'a VolumeManager,
    structured: bool,
    extended: bool,
    /// (export name the selection was made for, selected) from the last SET_META_CONTEXT.
    meta: Option<(String, bool)>,
}

/// Transmission flags for a volume under the negotiated reply mode.
pub fn transmission_flags(volume: &Volume, structured: bool) -> u16 {
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
    if volume.read_only() {
        flags |= TF_READ_ONLY;
    } else {
        flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if structured {
        // Every READ is answered with a single data chunk, so DF always holds.
        flags |= TF_SEND_DF;
    }
    flags
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let header = OptionReply {
        magic: U64::new(REP_MAGIC),
        option: U32::new(option),
        reply: U32::new(kind),
        length: U32::new(data.len() as u32),
    };
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    w.write_all(&out).await
}

async fn error<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    message: &str,
) -> std::io::Result<()> {
    reply(w, option, kind, message.as_bytes()).await
}

/// How TLS stands on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// Not configured: STARTTLS is refused (the spec's NOTLS mode).
    Off,
    /// Configured, not yet started; `Require` refuses everything else first (FORCEDTLS).
    Offered(TlsMode),
    /// The session is encrypted.
    Up,
}

/// How an option loop ended.
#[derive(Debug)]
pub enum Outcome {
    /// EXPORT_NAME or GO succeeded: enter transmission.
    Go(Negotiated),
    /// The client sent ABORT.
    Aborted,
    /// STARTTLS was acknowledged: run the TLS handshake, call [`Handshake::secured`], then
    /// [`Handshake::options`] again over the encrypted stream.
    StartTls,
}

/// One connection's negotiation, across a STARTTLS upgrade.
#[derive(Debug)]
pub struct Handshake {
    fixed: bool,
    no_zeroes: bool,
    /// Options left before the connection is cut (counted across the upgrade).
    options_left: usize,
    tls: TlsState,
    admission: Admission,
}

/// Runs a plain handshake (no TLS configured). `Ok(None)` means the client ended it cleanly.
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    mgr: &VolumeManager,
    admission: &Admission,
) -> Result<Option<Negotiated>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut s = tokio::io::join(r, w);
    let mut hs = Handshake::greet(&mut s, TlsState::Off, admission).await?;
    match hs.options(&mut s, mgr).await? {
        Outcome::Go(neg) => Ok(Some(neg)),
        Outcome::Aborted => Ok(None),
        Outcome::StartTls => Err(violation("STARTTLS without TLS configured")),
    }
}

impl Handshake {
    /// Sends the greeting and reads the client's flags.
    pub async fn greet<S>(
        s: &mut S,
        tls: TlsState,
        admission: &Admission,
    ) -> Result<Handshake, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).await?;
        s.flush().await?;

        let client_flags = s.read_u32().await?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(violation(format!("unknown client flags {client_flags:#x}")));
        }
        Ok(Handshake {
            fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            options_left: OPTIONS_MAX,
            tls,
            admission: admission.clone(),
        })
    }

    /// A slot in the session budget, or `None` (counted and logged) when all are in use.
    fn session_slot(&self) -> Option<OwnedSemaphorePermit> {
        let budgets = &self.admission.budgets;
        let slot = Arc::clone(&budgets.sessions).try_acquire_owned().ok();
        if slot.is_none() {
            budgets.session_refused();
        }
        slot
    }

    /// Records that the TLS handshake after STARTTLS succeeded.
    pub fn secured(&mut self) {
        self.tls = TlsState::Up;
    }

    /// Runs the option loop until the client enters transmission, aborts or starts TLS.
    /// State negotiated before STARTTLS is forgotten, as the spec requires: each call starts
    /// afresh.
    pub async fn options<S>(
        &mut self,
        s: &mut S,
        mgr: &VolumeManager,
    ) -> Result<Outcome, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut st = State {
            mgr,
            structured: false,
            extended: false,
            meta: None,
        };
        let (fixed, no_zeroes) = (self.fixed, self.no_zeroes);
        while self.options_left > 0 {
            self.options_left -= 1;
            match self.option(s, &mut st, fixed, no_zeroes).await? {
                Some(outcome) => return Ok(outcome),
                None => s.flush().await?,
            }
        }
        Err(violation(format!("more than {OPTIONS_MAX} options")))
    }

    /// Reads and answers one option; `Some` ends the loop.
    async fn option<S>(
        &self,
        s: &mut S,
        st: &mut State<'_>,
        fixed: bool,
        no_zeroes: bool,
    ) -> Result<Option<Outcome>, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mgr = st.mgr;
        let mut head = [0u8; 16];
        s.read_exact(&mut head).await?;
        let head =
            OptionHeader::read_from_bytes(&head).map_err(|_| violation("short option header"))?;
        if head.magic.get() != IHAVEOPT {
            return Err(violation("bad option magic"));
        }
        let option = head.option.get();
        let len = head.length.get();
        if len > OPTION_MAX_BYTES {
            return Err(violation(format!(
                "option {option} of {len} bytes exceeds the {OPTION_MAX_BYTES}-byte limit"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        let w = s;

        if !fixed && option != OPT_EXPORT_NAME {
            error(
                w,
                option,
                REP_ERR_INVALID,
                "only EXPORT_NAME is allowed without fixed newstyle",
            )
            .await?;
            return Ok(None);
        }
        if self.admission.shutdown.is_cancelled() && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::ShuttingDown);
            }
            error(w, option, REP_ERR_SHUTDOWN, "server is shutting down").await?;
            return Ok(None);
        }
        if self.tls == TlsState::Offered(TlsMode::Require)
            && !matches!(option, OPT_STARTTLS | OPT_ABORT)
        {
            if option == OPT_EXPORT_NAME {
                return Err(violation(
                    "EXPORT_NAME before STARTTLS on a TLS-only server",
                ));
            }
            error(
                w,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: connect with nbds:// (or qemu's tls-creds)",
            )
            .await?;
            return Ok(None);
        }
        match option {
            OPT_EXPORT_NAME => {
                if st.extended {
                    return Err(violation("EXPORT_NAME after EXTENDED_HEADERS"));
                }
                let name =
                    String::from_utf8(data).map_err(|_| violation("export name is not UTF-8"))?;
                let volume = mgr
                    .lookup(&name)
                    .ok_or_else(|| violation(format!("EXPORT_NAME for unknown export {name:?}")))?;
                // EXPORT_NAME has no error reply: at the session limit, close.
                let slot = self.session_slot().ok_or(HandshakeError::Busy)?;
                let flags = transmission_flags(&volume, st.structured);
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&volume.size_bytes().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&out).await?;
                w.flush().await?;
                return Ok(Some(Outcome::Go(st.negotiated(volume, &name, slot))));
            }
            OPT_ABORT => {
                // The client may hang up without reading the ACK.
                let _ = reply(w, option, REP_ACK, &[]).await;
                let _ = w.flush().await;
                return Ok(Some(Outcome::Aborted));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error(w, option, REP_ERR_INVALID, "LIST takes no data").await?;
                } else {
                    for volume in mgr.list() {
                        let name = volume.name().as_bytes();
                        let mut body = Vec::with_capacity(4 + name.len());
                        body.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        body.extend_from_slice(name);
                        body.extend_from_slice(description(&volume).as_bytes());
                        reply(w, option, REP_SERVER, &body).await?;
                    }
                    reply(w, option, REP_ACK, &[]).await?;
                }
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    error(w, option, REP_ERR_INVALID, "STARTTLS takes no data").await?;
                } else {
                    match self.tls {
                        TlsState::Off => {
                            error(
                                w,
                                option,
                                REP_ERR_POLICY,
                                "TLS is not configured on this server",
                            )
                            .await?
                        }
                        TlsState::Up => {
                            error(w, option, REP_ERR_INVALID, "TLS is already in use").await?
                        }
                        TlsState::Offered(_) => {
                            reply(w, option, REP_ACK, &[]).await?;
                            w.flush().await?;
                            return Ok(Some(Outcome::StartTls));
                        }
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                let slot = if option == OPT_GO {
                    let Some(slot) = self.session_slot() else {
                        let max = self.admission.budgets.sessions_max();
                        let why = format!(
                            "server busy: all {max} sessions are in use (its --max-connections); try again later"
                        );
                        error(w, option, REP_ERR_POLICY, &why).await?;
                        return Ok(None);
                    };
                    Some(slot)
                } else {
                    None
                };
                if let Some((volume, name)) = st.info(w, option, &data).await? {
                    if let Some(slot) = slot {
                        w.flush().await?;
                        return Ok(Some(Outcome::Go(st.negotiated(volume, &name, slot))));
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(w, option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data").await?;
                } else if st.extended {
                    error(
                        w,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already in use",
                    )
                    .await?;
                } else {
                    st.structured = true;
                    reply(w, option, REP_ACK, &[]).await?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    error(w, option, REP_ERR_INVALID, "EXTENDED_HEADERS takes no data").await?;
                } else {
                    st.extended = true;
                    st.structured = true;
                    reply(w, option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                st.meta_context(w, option, &data).await?
            }
            _ => error(w, option, REP_ERR_UNSUP, "option not supported").await?,
        }
        Ok(None)
    }
}

fn description(volume: &Volume) -> String {
    format!(
        "blockd {} volume, {} bytes{}",
        volume.layout(),
        volume.size_bytes(),
        if volume.read_only() {
            ", read-only"
        } else {
            ""
        }
    )
}

/// Parses INFO/GO data: (export name, requested info types). `None` if malformed.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if name_len > STRING_MAX_BYTES {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let ids = rest.get(2..)?;
    if ids.len() != count * 2 {
        return None;
    }
    let name = String::from_utf8(name.to_vec()).ok()?;
    Some((
        name,
        ids.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Parses LIST/SET_META_CONTEXT data: (export name, queries). `Err` carries the message.
fn parse_meta(data: &[u8]) -> Result<(String, Vec<String>), &'static str> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], &'static str> {
        let end = at.checked_add(n).ok_or("length overflow")?;
        let s = data
            .get(at..end)
            .ok_or("lengths exceed the option length")?;
        at = end;
        Ok(s)
    };
    let u32_at = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let name_len = u32_at(take(4)?);
    if name_len > STRING_MAX_BYTES {
        return Err("export name too long");
    }
    let name = std::str::from_utf8(take(name_len)?)
        .map_err(|_| "export name is not UTF-8")?
        .to_string();
    let count = u32_at(take(4)?);
    if count > META_QUERIES_MAX {
        return Err("too many queries");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32_at(take(4)?);
        if len > STRING_MAX_BYTES {
            return Err("query too long");
        }
        queries.push(
            std::str::from_utf8(take(len)?)
                .map_err(|_| "query is not UTF-8")?
                .to_string(),
        );
    }
    if at != data.len() {
        return Err("trailing bytes after the queries");
    }
    Ok((name, queries))
}

impl State<'_> {
    /// The outcome of a successful GO or EXPORT_NAME for `export`.
    fn negotiated(
        &self,
        volume: Arc<Volume>,
        export: &str,
        slot: OwnedSemaphorePermit,
    ) -> Negotiated {
        Negotiated {
            slot: Some(slot),
            flags: transmission_flags(&volume, self.structured),
            volume,
            structured: self.structured,
            extended: self.extended,
            meta_allocation: self.meta_for(export),
        }
    }

    /// The `base:allocation` id if the selection was made for this export.
    fn meta_for(&self, export: &str) -> Option<u32> {
        match &self.meta {
            Some((name, true)) if name == export => Some(META_ID_ALLOCATION),
            _ => None,
        }
    }

    /// Answers INFO or GO; returns the volume when the answer was a success.
    async fn info<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        option: u32,
        data: &[u8],
    ) -> std::io::Result<Option<(Arc<Volume>, String)>> {
        let Some((name, requested)) = parse_info(data) else {
            error(w, option, REP_ERR_INVALID, "malformed INFO/GO request").await?;
            return Ok(None);
        };
        let Some(volume) = self.mgr.lookup(&name) else {
            let msg = if let Some(reason) = self.mgr.unavailable(&name) {
                format!("export {name:?} is unavailable: {reason}")
            } else if name.is_empty() {
                "no default export: name a volume (volctl volume list)".to_string()
            } else {
                format!("export {name:?} does not exist")
            };
            error(w, option, REP_ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        };
        // Block sizes first: clients that asked must obey them.
        let mut bs = Vec::with_capacity(14);
        bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs.extend_from_slice(&BLOCK_MIN_BYTES.to_be_bytes());
        bs.extend_from_slice(&BLOCK_PREFERRED_BYTES.to_be_bytes());
        bs.extend_from_slice(&PAYLOAD_MAX_BYTES.to_be_bytes());
        reply(w, option, REP_INFO, &bs).await?;
        if requested.contains(&INFO_NAME) {
            let mut body = INFO_NAME.to_be_bytes().to_vec();
            body.extend_from_slice(volume.name().as_bytes());
            reply(w, option, REP_INFO, &body).await?;
        }
        if requested.contains(&INFO_DESCRIPTION) {
            let mut body = INFO_DESCRIPTION.to_be_bytes().to_vec();
            body.extend_from_slice(description(&volume).as_bytes());
            reply(w, option, REP_INFO, &body).await?;
        }
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&volume.size_bytes().to_be_bytes());
        export.extend_from_slice(&transmission_flags(&volume, self.structured).to_be_bytes());
        reply(w, option, REP_INFO, &export).await?;
        reply(w, option, REP_ACK, &[]).await?;
        Ok(Some((volume, name)))
    }

    async fn meta_context<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        option: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta = None;
        }
        if set && !self.structured {
            return error(
                w,
                option,
                REP_ERR_INVALID,
                "SET_META_CONTEXT needs structured replies first",
            )
            .await;
        }
        let (name, queries) = match parse_meta(data) {
            Ok(parsed) => parsed,
            Err(why) => return error(w, option, REP_ERR_INVALID, why).await,
        };
        if self.mgr.lookup(&name).is_none() {
            return error(
                w,
                option,
                REP_ERR_UNKNOWN,
                &format!("export {name:?} does not exist"),
            )
            .await;
        }
        let matches = |q: &str| match q {
            META_BASE_ALLOCATION => true,
            // "base:" lists every base context; in SET it selects nothing.
            "base:" => !set,
            _ => false,
        };
        let selected = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|q| matches(q))
        };
        if selected {
            let id = if set { META_ID_ALLOCATION } else { 0 };
            let mut body = id.to_be_bytes().to_vec();
            body.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            reply(w, option, REP_META_CONTEXT, &body).await?;
        }
        if set {
            self.meta = Some((name, selected));
        }
        reply(w, option, REP_ACK, &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parsing_checks_every_length() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&4u32.to_be_bytes());
        ok.extend_from_slice(b"disk");
        ok.extend_from_slice(&1u16.to_be_bytes());
        ok.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info(&ok),
            Some(("disk".into(), vec![INFO_BLOCK_SIZE]))
        );
        for cut in 0..ok.len() {
            assert_eq!(parse_info(&ok[..cut]), None, "accepted a {cut}-byte prefix");
        }
        let mut long = ok.clone();
        long.push(0);
        assert_eq!(parse_info(&long), None);
        let mut huge = ok.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info(&huge), None);
    }

    #[test]
    fn meta_parsing_checks_every_length() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&0u32.to_be_bytes());
        ok.extend_from_slice(&1u32.to_be_bytes());
        ok.extend_from_slice(&15u32.to_be_bytes());
        ok.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta(&ok),
            Ok((String::new(), vec!["base:allocation".into()]))
        );
        for cut in 0..ok.len() {
            assert!(
                parse_meta(&ok[..cut]).is_err(),
                "accepted a {cut}-byte prefix"
            );
        }
        let mut count = ok.clone();
        count[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta(&count).is_err());
    }
}
