//! The protocol tap: a stream wrapper that follows the PostgreSQL message
//! framing in both directions, so the pool knows — without a round trip —
//! whether a connection is idle, inside a transaction, still has requests in
//! flight, has been told FATAL, and how many queries it has served.
//!
//! tokio-postgres runs over any `AsyncRead + AsyncWrite` (`Config::connect_raw`),
//! so the pool hands it a [`TapStream`] around the socket. The tap only reads
//! message headers (tag and length) and the few bodies it needs:
//! ReadyForQuery (1 byte) and ErrorResponse (bounded). Everything else is
//! skipped by length, so the cost is a few branches per message.
//!
//! One race to keep in mind: tokio-postgres hands an ErrorResponse to the
//! caller before it reads the ReadyForQuery behind it, so right after a failed
//! statement [`TapState::status`] can still be stale. It is exact only when
//! [`TapState::in_flight`] is zero; [`TapState::settled`] waits for that.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::sql::{self, Effects};

/// Transaction status from the last ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxStatus {
    /// Not in a transaction block.
    Idle,
    /// In a transaction block.
    InTransaction,
    /// In a failed transaction block: every statement fails until ROLLBACK.
    Failed,
}

/// What the tap has learned about one connection. Shared between the
/// connection's driver task (which writes it) and the pool (which reads it).
#[derive(Debug)]
pub(crate) struct TapState {
    /// The startup message, Query ('Q') and Sync ('S') messages written:
    /// each is answered by exactly one ReadyForQuery.
    requests_sent: AtomicU64,
    /// ReadyForQuery ('Z') messages received.
    ready_received: AtomicU64,
    /// Query ('Q') and Execute ('E') messages written.
    queries: AtomicU64,
    /// Status byte of the last ReadyForQuery.
    status: AtomicU8,
    /// SQLSTATE of a FATAL/PANIC error, packed; 0 when none.
    fatal: AtomicU64,
    /// The stream hit EOF or an I/O error.
    eof: AtomicBool,
    /// Session state the statements written (or the settings the server
    /// reported) may have left: bits of [`Effects`].
    effects: AtomicU8,
    /// Woken on every ReadyForQuery and at EOF.
    ready: Notify,
}

impl TapState {
    pub(crate) fn new() -> Self {
        TapState {
            requests_sent: AtomicU64::new(0),
            ready_received: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            status: AtomicU8::new(b'I'),
            fatal: AtomicU64::new(0),
            eof: AtomicBool::new(false),
            effects: AtomicU8::new(0),
            ready: Notify::new(),
        }
    }

    /// The session state the connection may carry since the last
    /// [`take_effects`](Self::take_effects).
    pub(crate) fn effects(&self) -> Effects {
        Effects::from_bits(self.effects.load(Ordering::Acquire))
    }

    /// Forgets the session state seen so far (after a reset) and returns it.
    pub(crate) fn take_effects(&self) -> Effects {
        Effects::from_bits(self.effects.swap(0, Ordering::AcqRel))
    }

    /// Forgets `effects` alone.
    pub(crate) fn clear_effects(&self, effects: Effects) {
        self.effects.fetch_and(!effects.bits(), Ordering::AcqRel);
    }

    /// Records session state the connection may carry.
    pub(crate) fn add_effects(&self, effects: Effects) {
        if effects != Effects::NONE {
            self.effects.fetch_or(effects.bits(), Ordering::AcqRel);
        }
    }

    /// Requests written whose ReadyForQuery has not arrived yet.
    pub(crate) fn in_flight(&self) -> u64 {
        // Read the received count first: `sent` only grows, so the difference
        // can only be over-estimated, never hidden.
        let received = self.ready_received.load(Ordering::Acquire);
        let sent = self.requests_sent.load(Ordering::Acquire);
        sent.saturating_sub(received)
    }

    /// Transaction status as of the last ReadyForQuery.
    pub(crate) fn status(&self) -> TxStatus {
        match self.status.load(Ordering::Acquire) {
            b'T' => TxStatus::InTransaction,
            b'E' => TxStatus::Failed,
            _ => TxStatus::Idle,
        }
    }

    /// Requests written (the start-up message, simple queries, Syncs):
    /// each is one round trip.
    pub(crate) fn requests(&self) -> u64 {
        self.requests_sent.load(Ordering::Acquire)
    }

    /// Statements executed on this connection (simple queries and Executes).
    pub(crate) fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// SQLSTATE of a FATAL error the server sent, if any.
    pub(crate) fn fatal_code(&self) -> Option<String> {
        let packed = self.fatal.load(Ordering::Acquire);
        (packed != 0).then(|| {
            let bytes = packed.to_be_bytes();
            String::from_utf8_lossy(&bytes[3..]).into_owned()
        })
    }

    /// The server said FATAL or the stream ended: the connection is unusable.
    pub(crate) fn is_dead(&self) -> bool {
        self.fatal.load(Ordering::Acquire) != 0 || self.eof.load(Ordering::Acquire)
    }

    /// Clean enough to hand out as is: nothing in flight, not in a
    /// transaction, not dead.
    pub(crate) fn is_clean(&self) -> bool {
        self.in_flight() == 0 && self.status() == TxStatus::Idle && !self.is_dead()
    }

    /// Waits until nothing is in flight (true) or the connection died
    /// (false). Not bounded: callers wrap it in a timeout.
    pub(crate) async fn settled(&self) -> bool {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_dead() {
                return false;
            }
            if self.in_flight() == 0 {
                return true;
            }
            notified.await;
        }
    }

    /// Waits until the connection is dead (FATAL or end of stream).
    pub(crate) async fn closed(&self) {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_dead() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn mark_eof(&self) {
        self.eof.store(true, Ordering::Release);
        self.ready.notify_waiters();
    }
}

/// Incremental parser of one direction of the message stream.
#[derive(Debug)]
struct Framer {
    /// Bytes of the current header collected so far.
    header: [u8; 5],
    header_len: usize,
    /// Header size of the next message: 4 for the untagged startup message,
    /// 5 afterwards.
    header_size: usize,
    /// Body bytes of the current message still to come; `None` while reading
    /// a header.
    remaining: Option<usize>,
    tag: u8,
    /// Body of the current message when it is one we need.
    body: Vec<u8>,
    capture: usize,
    /// Length of the current message's body.
    len: usize,
}

/// ErrorResponse bodies are captured up to this many bytes; the severity and
/// SQLSTATE fields come first in practice.
const ERROR_CAPTURE: usize = 512;

/// Query and Parse bodies (statement text) are read up to this many bytes;
/// a longer statement counts as leaving every kind of session state.
const SQL_CAPTURE: usize = 64 * 1024;

/// The session state the text of a Query ('Q') or Parse ('P') body may
/// leave; every kind when the body was too long to read whole.
fn statement_effects(tag: u8, body: &[u8], whole: bool) -> Effects {
    if !whole {
        return Effects::ALL;
    }
    let text = match tag {
        // Parse: statement name, NUL, text, NUL, parameter types.
        b'P' => {
            let after_name = body
                .iter()
                .position(|&b| b == 0)
                .map_or(body.len(), |p| p + 1);
            &body[after_name..]
        }
        _ => body,
    };
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    sql::effects(&text[..end])
}

impl Framer {
    fn new(untagged_first: bool) -> Self {
        Framer {
            header: [0; 5],
            header_len: 0,
            header_size: if untagged_first { 4 } else { 5 },
            remaining: None,
            tag: 0,
            body: Vec::new(),
            capture: 0,
            len: 0,
        }
    }

    /// Feeds bytes; calls `on_message(tag, captured_body, whole)` for each
    /// message completed (`whole`: the body was captured entirely). The
    /// callback decides what to capture via `capture_len`.
    fn feed(
        &mut self,
        mut data: &[u8],
        capture_len: impl Fn(u8) -> usize,
        mut on_message: impl FnMut(u8, &[u8], bool),
    ) {
        while !data.is_empty() {
            match self.remaining {
                None => {
                    let want = self.header_size - self.header_len;
                    let n = want.min(data.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                    self.header_len += n;
                    data = &data[n..];
                    if self.header_len < self.header_size {
                        return;
                    }
                    let (tag, len_bytes) = if self.header_size == 4 {
                        (0u8, &self.header[..4])
                    } else {
                        (self.header[0], &self.header[1..5])
                    };
                    let len = u32::from_be_bytes([
                        len_bytes[0],
                        len_bytes[1],
                        len_bytes[2],
                        len_bytes[3],
                    ]);
                    self.tag = tag;
                    self.header_len = 0;
                    self.header_size = 5;
                    self.capture = capture_len(tag);
                    self.body.clear();
                    let remaining = (len as usize).saturating_sub(4);
                    self.len = remaining;
                    if remaining == 0 {
                        on_message(tag, &[], true);
                    } else {
                        self.remaining = Some(remaining);
                    }
                }
                Some(remaining) => {
                    let n = remaining.min(data.len());
                    let room = self.capture.saturating_sub(self.body.len());
                    if room > 0 {
                        self.body.extend_from_slice(&data[..n.min(room)]);
                    }
                    data = &data[n..];
                    if n == remaining {
                        self.remaining = None;
                        let whole = self.body.len() == self.len;
                        on_message(self.tag, &self.body, whole);
                    } else {
                        self.remaining = Some(remaining - n);
                    }
                }
            }
        }
    }
}

/// Severity and SQLSTATE of an ErrorResponse body.
fn error_fields(body: &[u8]) -> (Option<&[u8]>, Option<&[u8]>) {
    let (mut severity, mut localized, mut code) = (None, None, None);
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = &tail[..end];
        match field {
            b'V' => severity = Some(value),
            b'S' => localized = Some(value),
            b'C' => code = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    (severity.or(localized), code)
}

fn pack_code(code: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = code.len().min(5);
    bytes[8 - n..].copy_from_slice(&code[..n]);
    u64::from_be_bytes(bytes).max(1)
}

/// A stream that reports protocol events to a [`TapState`].
#[derive(Debug)]
pub(crate) struct TapStream<S> {
    inner: S,
    state: Arc<TapState>,
    reads: Framer,
    writes: Framer,
    /// The copy-in bookkeeping, shared by both directions.
    copy: CopyIn,
}

/// COPY FROM STDIN through the extended protocol: the client sends Bind,
/// Execute and Sync at once, the server enters copy-in mode at the Execute
/// and *ignores* Syncs until CopyDone or CopyFail. Those Syncs get no
/// ReadyForQuery, so they must not count as requests in flight.
#[derive(Debug, Default)]
struct CopyIn {
    /// Syncs written since the last Execute.
    syncs_since_execute: u64,
    /// The server answered with CopyInResponse: copy-in mode.
    active: bool,
}

impl<S> TapStream<S> {
    pub(crate) fn new(inner: S, state: Arc<TapState>) -> Self {
        TapStream {
            inner,
            state,
            reads: Framer::new(false),
            writes: Framer::new(true),
            copy: CopyIn::default(),
        }
    }

    /// The stream under the tap.
    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    fn observe_read(&mut self, data: &[u8]) {
        let state = &self.state;
        let copy = &mut self.copy;
        self.reads.feed(
            data,
            |tag| match tag {
                b'Z' => 1,
                b'E' => ERROR_CAPTURE,
                _ => 0,
            },
            |tag, body, _| match tag {
                b'Z' => {
                    if let Some(&status) = body.first() {
                        state.status.store(status, Ordering::Release);
                    }
                    state.ready_received.fetch_add(1, Ordering::AcqRel);
                    state.ready.notify_waiters();
                }
                b'G' => copy.active = true,
                // ParameterStatus after start-up: a reported setting changed.
                b'S' if state.ready_received.load(Ordering::Acquire) > 0 => {
                    state.add_effects(Effects::SETTINGS);
                }
                b'E' => {
                    if let (Some(severity), code) = error_fields(body) {
                        if severity == b"FATAL" || severity == b"PANIC" {
                            state
                                .fatal
                                .store(pack_code(code.unwrap_or(b"XX000")), Ordering::Release);
                            state.ready.notify_waiters();
                        }
                    }
                }
                _ => {}
            },
        );
    }

    fn observe_write(&mut self, data: &[u8]) {
        let state = &self.state;
        let copy = &mut self.copy;
        self.writes.feed(
            data,
            |tag| match tag {
                b'Q' | b'P' => SQL_CAPTURE,
                _ => 0,
            },
            |tag, body, whole| match tag {
                // The untagged startup message is answered by the first
                // ReadyForQuery.
                0 => {
                    state.requests_sent.fetch_add(1, Ordering::AcqRel);
                }
                b'P' => state.add_effects(statement_effects(tag, body, whole)),
                b'Q' => {
                    state.add_effects(statement_effects(tag, body, whole));
                    state.queries.fetch_add(1, Ordering::Relaxed);
                    state.requests_sent.fetch_add(1, Ordering::AcqRel);
                    // A simple-query COPY answers its Query itself.
                    copy.syncs_since_execute = 0;
                }
                b'S' => {
                    state.requests_sent.fetch_add(1, Ordering::AcqRel);
                    copy.syncs_since_execute += 1;
                }
                b'E' => {
                    state.queries.fetch_add(1, Ordering::Relaxed);
                    copy.syncs_since_execute = 0;
                }
                // CopyDone, CopyFail: the Syncs the server ignored in
                // copy-in mode are settled as if answered.
                b'c' | b'f' if copy.active => {
                    copy.active = false;
                    let ignored = std::mem::take(&mut copy.syncs_since_execute);
                    state.ready_received.fetch_add(ignored, Ordering::AcqRel);
                }
                _ => {}
            },
        );
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TapStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &poll {
            Poll::Ready(Ok(())) => {
                let filled = &buf.filled()[before..];
                if filled.is_empty() {
                    this.state.mark_eof();
                } else {
                    this.observe_read(filled);
                }
            }
            Poll::Ready(Err(_)) => this.state.mark_eof(),
            Poll::Pending => {}
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TapStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, data);
        match &poll {
            Poll::Ready(Ok(n)) => this.observe_write(&data[..*n]),
            Poll::Ready(Err(_)) => this.state.mark_eof(),
            Poll::Pending => {}
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn startup() -> Vec<u8> {
        let body = b"\x00\x03\x00\x00user\x00app\x00\x00";
        let mut v = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn error_body(severity: &str, code: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (f, v) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', "boom"),
        ] {
            b.push(f);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    /// Client stream: startup, then a simple query, then an extended query.
    fn client_bytes() -> Vec<u8> {
        let mut v = startup();
        v.extend(msg(b'Q', b"BEGIN\0"));
        v.extend(msg(b'P', b"\0select 1\0\0\0"));
        v.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        v.extend(msg(b'E', b"\0\0\0\0\0"));
        v.extend(msg(b'S', b""));
        v
    }

    fn server_bytes() -> Vec<u8> {
        let mut v = msg(b'R', &[0, 0, 0, 0]);
        v.extend(msg(b'Z', b"I"));
        v.extend(msg(b'C', b"BEGIN\0"));
        v.extend(msg(b'Z', b"T"));
        v.extend(msg(b'E', &error_body("ERROR", "42601")));
        v.extend(msg(b'Z', b"E"));
        v
    }

    fn run(chunks_c: &[usize], chunks_s: &[usize]) -> Arc<TapState> {
        let state = Arc::new(TapState::new());
        let mut tap = TapStream::new((), state.clone());
        let feed_chunks = |data: Vec<u8>, sizes: &[usize], f: &mut dyn FnMut(&[u8])| {
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = sizes
                    .get(i)
                    .copied()
                    .unwrap_or(rest.len())
                    .clamp(1, rest.len());
                f(&rest[..n]);
                rest = &rest[n..];
                i += 1;
            }
        };
        feed_chunks(client_bytes(), chunks_c, &mut |d| tap.observe_write(d));
        feed_chunks(server_bytes(), chunks_s, &mut |d| tap.observe_read(d));
        state
    }

    #[test]
    fn follows_requests_transactions_and_queries() {
        let state = run(&[], &[]);
        assert_eq!(state.requests_sent.load(Ordering::Relaxed), 3);
        assert_eq!(state.ready_received.load(Ordering::Relaxed), 3);
        assert_eq!(state.in_flight(), 0);
        assert_eq!(state.queries(), 2);
        assert_eq!(state.status(), TxStatus::Failed);
        assert!(!state.is_dead());
    }

    #[test]
    fn copy_in_syncs_the_server_ignores_are_not_in_flight() {
        let state = Arc::new(TapState::new());
        let mut tap = TapStream::new((), state.clone());
        tap.observe_write(&startup());
        tap.observe_read(&msg(b'Z', b"I"));
        // COPY t FROM STDIN, extended: Bind, Execute, Sync at once.
        let mut copy = msg(b'B', b"\0\0\0\0\0\0\0\0");
        copy.extend(msg(b'E', b"\0\0\0\0\0"));
        copy.extend(msg(b'S', b""));
        tap.observe_write(&copy);
        tap.observe_read(&msg(b'2', b""));
        tap.observe_read(&msg(b'G', b"\0\0\0"));
        tap.observe_write(&msg(b'd', b"1\n"));
        let mut done = msg(b'c', b"");
        done.extend(msg(b'S', b""));
        tap.observe_write(&done);
        assert_eq!(state.in_flight(), 1, "the CopyDone's Sync is answered");
        tap.observe_read(&msg(b'C', b"COPY 1\0"));
        tap.observe_read(&msg(b'Z', b"I"));
        assert_eq!(state.in_flight(), 0);
        assert!(state.is_clean());
    }

    #[test]
    fn session_state_is_read_from_statements_and_reported_settings() {
        let state = Arc::new(TapState::new());
        let mut tap = TapStream::new((), state.clone());
        tap.observe_write(&startup());
        // Start-up's ParameterStatus messages do not count.
        tap.observe_read(&msg(b'S', b"application_name\0app\0"));
        tap.observe_read(&msg(b'Z', b"I"));
        assert_eq!(state.effects(), Effects::NONE);
        tap.observe_write(&msg(b'Q', b"SELECT 1\0"));
        tap.observe_write(&msg(b'P', b"s1\0SELECT 1\0\0\0"));
        assert_eq!(state.effects(), Effects::NONE);
        tap.observe_write(&msg(b'Q', b"LISTEN jobs\0"));
        tap.observe_write(&msg(b'P', b"s2\0SELECT pg_advisory_lock($1)\0\0\0"));
        assert_eq!(state.effects(), Effects::LISTEN | Effects::ADVISORY);
        tap.observe_read(&msg(b'S', b"TimeZone\0UTC\0"));
        assert_eq!(
            state.take_effects(),
            Effects::LISTEN | Effects::ADVISORY | Effects::SETTINGS
        );
        assert_eq!(state.effects(), Effects::NONE);
        // Too long to read: every kind.
        let mut long = b"SELECT '".to_vec();
        long.extend(std::iter::repeat_n(b'x', SQL_CAPTURE));
        long.extend(b"'\0");
        tap.observe_write(&msg(b'Q', &long));
        assert_eq!(state.effects(), Effects::ALL);
    }

    #[test]
    fn fatal_error_marks_connection_dead_with_its_code() {
        let state = Arc::new(TapState::new());
        let mut tap = TapStream::new((), state.clone());
        tap.observe_read(&msg(b'E', &error_body("FATAL", "57P01")));
        assert!(state.is_dead());
        assert_eq!(state.fatal_code().as_deref(), Some("57P01"));
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_result(
            c in proptest::collection::vec(1usize..16, 0..40),
            s in proptest::collection::vec(1usize..16, 0..40),
        ) {
            let state = run(&c, &s);
            prop_assert_eq!(state.requests_sent.load(Ordering::Relaxed), 3);
            prop_assert_eq!(state.ready_received.load(Ordering::Relaxed), 3);
            prop_assert_eq!(state.queries(), 2);
            prop_assert_eq!(state.status(), TxStatus::Failed);
            prop_assert!(!state.is_dead());
        }
    }
}
