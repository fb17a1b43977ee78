//! Container logs in CRI format (`<RFC3339Nano> stdout|stderr F|P <content>` per line, what
//! runc's log shim and CRI runtimes write) decoded into what `kubectl logs` prints.
//!
//! Pure: bytes in, lines out; the caller does the file I/O and the clock. Written by hand
//! because no crate decodes the CRI log format (kubelet's reader is Go, in
//! pkg/kubelet/kuberuntime/logs).

use std::collections::VecDeque;

use k8s_openapi::jiff::Timestamp;

/// A raw line longer than this without a newline is cut into pieces (a writer that never
/// ends its line must not make the agent buffer without bound).
pub const MAX_RAW_LINE: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One logical line: partial (`P`) pieces joined up to their full (`F`) end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// The time of the line's first piece.
    pub time: Timestamp,
    pub stream: Stream,
    /// Without the trailing newline.
    pub content: Vec<u8>,
}

struct Parsed<'a> {
    time: Timestamp,
    stream: Stream,
    full: bool,
    content: &'a [u8],
}

/// Parses one raw line (without its newline); None for anything malformed.
fn parse(raw: &[u8]) -> Option<Parsed<'_>> {
    let mut fields = raw.splitn(4, |b| *b == b' ');
    let time: Timestamp = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let stream = match fields.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    // Tags are `:`-separated; the first says full or partial (kubelet reads it the same way).
    let tags = fields.next()?;
    let full = match tags.split(|b| *b == b':').next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    // An empty line may be written with or without the separating space.
    let content = fields.next().unwrap_or(&[]);
    Some(Parsed { time, stream, full, content })
}

/// Turns a byte stream (read in arbitrary chunks, possibly ending mid-line while a writer is
/// still writing) into logical lines.
#[derive(Default)]
pub struct CriDecoder {
    /// The bytes of a raw line whose newline has not arrived yet.
    pending: Vec<u8>,
    /// Joined partial pieces per stream, waiting for their `F`.
    partial: [Option<LogLine>; 2],
    /// Malformed raw lines skipped so far.
    pub skipped: u64,
}

impl CriDecoder {
    pub fn new() -> CriDecoder {
        CriDecoder::default()
    }

    /// Feeds bytes; complete logical lines are appended to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<LogLine>) {
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    if self.pending.is_empty() {
                        self.line(&bytes[..i], out);
                    } else {
                        self.pending.extend_from_slice(&bytes[..i]);
                        let raw = std::mem::take(&mut self.pending);
                        self.line(&raw, out);
                    }
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.pending.extend_from_slice(bytes);
                    if self.pending.len() > MAX_RAW_LINE {
                        let raw = std::mem::take(&mut self.pending);
                        self.line(&raw, out);
                    }
                    return;
                }
            }
        }
    }

    /// The writer is done (the container ended, or this is a one-shot read): what is left
    /// becomes lines too (an unfinished partial line still shows, as kubelet shows it).
    pub fn finish(&mut self, out: &mut Vec<LogLine>) {
        if !self.pending.is_empty() {
            let raw = std::mem::take(&mut self.pending);
            self.line(&raw, out);
        }
        let mut rest: Vec<LogLine> = self.partial.iter_mut().filter_map(Option::take).collect();
        rest.sort_by_key(|l| l.time);
        out.extend(rest);
    }

    fn line(&mut self, raw: &[u8], out: &mut Vec<LogLine>) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let Some(p) = parse(raw) else {
            if !raw.is_empty() {
                self.skipped += 1;
            }
            return;
        };
        let slot = &mut self.partial[p.stream as usize];
        let line = match slot.take() {
            Some(mut joined) => {
                joined.content.extend_from_slice(p.content);
                joined
            }
            None => LogLine { time: p.time, stream: p.stream, content: p.content.to_vec() },
        };
        if p.full {
            out.push(line);
        } else {
            *slot = Some(line);
        }
    }
}

/// What the client asked for (kubelet's `containerLogs` query, kubectl's flags).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    /// Only the last N lines (of what the file holds when the request comes).
    pub tail_lines: Option<usize>,
    /// Only lines at or after this time (`sinceSeconds` resolved against the clock, or `sinceTime`).
    pub since: Option<Timestamp>,
    pub timestamps: bool,
    /// Stop after this many bytes of output.
    pub limit_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct BadOption(pub String);

impl LogOptions {
    /// From query pairs; `now` resolves `sinceSeconds`.
    pub fn from_query(pairs: &[(String, String)], now: Timestamp) -> Result<LogOptions, BadOption> {
        let get = |k: &str| pairs.iter().rev().find(|(key, v)| key == k && !v.is_empty()).map(|(_, v)| v.as_str());
        let flag = |k: &str| -> Result<bool, BadOption> {
            match get(k) {
                None | Some("false" | "0" | "False") => Ok(false),
                Some("true" | "1" | "True") => Ok(true),
                Some(v) => Err(BadOption(format!("{k}={v:?} is not a boolean"))),
            }
        };
        let int = |k: &str| -> Result<Option<i64>, BadOption> {
            get(k).map(|v| v.parse::<i64>().map_err(|_| BadOption(format!("{k}={v:?} is not an integer")))).transpose()
        };
        let mut o = LogOptions { follow: flag("follow")?, previous: flag("previous")?, timestamps: flag("timestamps")?, ..Default::default() };
        if let Some(n) = int("tailLines")? {
            // kubectl's --tail=-1 means everything; it does not send it, others might.
            if n >= 0 {
                o.tail_lines = Some(usize::try_from(n).unwrap_or(usize::MAX));
            }
        }
        if let Some(n) = int("limitBytes")? {
            if n < 1 {
                return Err(BadOption(format!("limitBytes={n} must be greater than zero")));
            }
            o.limit_bytes = Some(n as u64);
        }
        match (int("sinceSeconds")?, get("sinceTime")) {
            (Some(_), Some(_)) => return Err(BadOption("at most one of sinceSeconds or sinceTime may be specified".into())),
            (Some(s), None) => {
                if s < 1 {
                    return Err(BadOption(format!("sinceSeconds={s} must be greater than zero")));
                }
                let span = k8s_openapi::jiff::SignedDuration::from_secs(s);
                o.since = Some(now.checked_sub(span).unwrap_or(Timestamp::MIN));
            }
            (None, Some(t)) => {
                o.since = Some(t.parse().map_err(|e| BadOption(format!("sinceTime={t:?} is not an RFC 3339 time: {e}")))?);
            }
            (None, None) => {}
        }
        Ok(o)
    }
}

/// Applies `since`, `timestamps` and `limitBytes` to lines as they come, and `tailLines` to
/// what was in the file before following starts.
pub struct LogFilter {
    opts: LogOptions,
    tail: Option<VecDeque<LogLine>>,
    written: u64,
}

impl LogFilter {
    pub fn new(opts: LogOptions) -> LogFilter {
        let tail = opts.tail_lines.map(|n| VecDeque::with_capacity(n.min(4096)));
        LogFilter { opts, tail, written: 0 }
    }

    /// Whether `limitBytes` is used up (nothing more will come out).
    pub fn done(&self) -> bool {
        self.opts.limit_bytes.is_some_and(|l| self.written >= l)
    }

    /// A line of what the file held at the start (subject to `tailLines`); output appended to `out`.
    pub fn backlog(&mut self, line: LogLine, out: &mut Vec<u8>) {
        match (&mut self.tail, self.opts.tail_lines) {
            (Some(q), Some(n)) => {
                if n == 0 {
                    return;
                }
                if q.len() == n {
                    q.pop_front();
                }
                q.push_back(line);
            }
            _ => self.emit(&line, out),
        }
    }

    /// The backlog is over: the kept tail goes out, and later lines pass straight through.
    pub fn end_backlog(&mut self, out: &mut Vec<u8>) {
        if let Some(q) = self.tail.take() {
            for line in q {
                self.emit(&line, out);
            }
        }
    }

    /// A line written after the request came (following).
    pub fn live(&mut self, line: &LogLine, out: &mut Vec<u8>) {
        self.emit(line, out);
    }

    fn emit(&mut self, line: &LogLine, out: &mut Vec<u8>) {
        if self.done() || self.opts.since.is_some_and(|s| line.time < s) {
            return;
        }
        let mut text = Vec::with_capacity(line.content.len() + 32);
        if self.opts.timestamps {
            // kubelet prints RFC3339Nano with all nine digits.
            text.extend_from_slice(format!("{:.9} ", line.time).as_bytes());
        }
        text.extend_from_slice(&line.content);
        text.push(b'\n');
        if let Some(limit) = self.opts.limit_bytes {
            let room = limit.saturating_sub(self.written) as usize;
            text.truncate(room);
        }
        self.written += text.len() as u64;
        out.extend_from_slice(&text);
    }
}

/// The whole of `bytes` rendered with `opts` (a one-shot read: no follow).
pub fn render_all(bytes: &[u8], opts: &LogOptions) -> Vec<u8> {
    let mut dec = CriDecoder::new();
    let mut lines = Vec::new();
    dec.push(bytes, &mut lines);
    dec.finish(&mut lines);
    let mut f = LogFilter::new(opts.clone());
    let mut out = Vec::new();
    for l in lines {
        f.backlog(l, &mut out);
    }
    f.end_backlog(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2024-05-01T10:00:00.000000001Z stdout F first\n\
2024-05-01T10:00:01.5Z stderr F warn: second\n\
2024-05-01T10:00:02Z stdout P par\n\
2024-05-01T10:00:02.1Z stdout P ti\n\
2024-05-01T10:00:02.2Z stdout F al\n\
2024-05-01T10:00:03Z stdout F last\n";

    fn text(opts: LogOptions) -> String {
        String::from_utf8(render_all(LOG.as_bytes(), &opts)).expect("utf-8")
    }

    #[test]
    fn plain_output_joins_partials_and_merges_streams() {
        assert_eq!(text(LogOptions::default()), "first\nwarn: second\npartial\nlast\n");
    }

    #[test]
    fn tail_counts_logical_lines() {
        assert_eq!(text(LogOptions { tail_lines: Some(2), ..Default::default() }), "partial\nlast\n");
        assert_eq!(text(LogOptions { tail_lines: Some(1), ..Default::default() }), "last\n");
        assert_eq!(text(LogOptions { tail_lines: Some(0), ..Default::default() }), "");
        assert_eq!(text(LogOptions { tail_lines: Some(99), ..Default::default() }), "first\nwarn: second\npartial\nlast\n");
    }

    #[test]
    fn since_drops_older_lines_by_first_piece_time() {
        let since = "2024-05-01T10:00:01.5Z".parse().ok();
        assert_eq!(text(LogOptions { since, ..Default::default() }), "warn: second\npartial\nlast\n");
        let since = "2024-05-01T10:00:02.1Z".parse().ok();
        // The joined line carries its first piece's time (10:00:02), before `since`.
        assert_eq!(text(LogOptions { since, ..Default::default() }), "last\n");
    }

    #[test]
    fn timestamps_are_rfc3339_nano_with_nine_digits() {
        let out = text(LogOptions { timestamps: true, tail_lines: Some(2), ..Default::default() });
        assert_eq!(out, "2024-05-01T10:00:02.000000000Z partial\n2024-05-01T10:00:03.000000000Z last\n");
        let first = text(LogOptions { timestamps: true, ..Default::default() });
        assert!(first.starts_with("2024-05-01T10:00:00.000000001Z first\n"), "{first}");
    }

    #[test]
    fn limit_bytes_cuts_output() {
        assert_eq!(text(LogOptions { limit_bytes: Some(8), ..Default::default() }), "first\nwa");
    }

    #[test]
    fn malformed_lines_are_skipped_without_panic() {
        let junk = "not a log line\n\
2024-05-01T10:00:00Z stdout F ok\n\
2024-13-45T99:00:00Z stdout F bad time\n\
2024-05-01T10:00:00Z stdin F bad stream\n\
2024-05-01T10:00:00Z stdout X bad tag\n\
2024-05-01T10:00:00Z\n";
        let mut bytes = junk.as_bytes().to_vec();
        bytes.extend_from_slice(b"\xff\xfe\x00 binary\n\n2024-05-01T10:00:00Z stdout F\n2024-05-01T10:00:00Z stdout F:extra tagged\n");
        let mut dec = CriDecoder::new();
        let mut lines = Vec::new();
        dec.push(&bytes, &mut lines);
        dec.finish(&mut lines);
        let contents: Vec<&[u8]> = lines.iter().map(|l| l.content.as_slice()).collect();
        assert_eq!(contents, vec![&b"ok"[..], b"", b"tagged"]);
        assert_eq!(dec.skipped, 6);
    }

    #[test]
    fn chunks_split_anywhere_decode_the_same() {
        let whole = render_all(LOG.as_bytes(), &LogOptions::default());
        for size in [1usize, 2, 3, 7, 13, 50] {
            let mut dec = CriDecoder::new();
            let mut lines = Vec::new();
            for chunk in LOG.as_bytes().chunks(size) {
                dec.push(chunk, &mut lines);
            }
            dec.finish(&mut lines);
            let mut f = LogFilter::new(LogOptions::default());
            let mut out = Vec::new();
            for l in lines {
                f.backlog(l, &mut out);
            }
            f.end_backlog(&mut out);
            assert_eq!(out, whole, "chunk size {size}");
        }
    }

    #[test]
    fn an_incomplete_last_line_waits_for_its_newline() {
        let mut dec = CriDecoder::new();
        let mut lines = Vec::new();
        dec.push(b"2024-05-01T10:00:00Z stdout F hel", &mut lines);
        assert!(lines.is_empty());
        dec.push(b"lo\n", &mut lines);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].content, b"hello");
    }

    #[test]
    fn interleaved_partials_of_two_streams_join_per_stream() {
        let log = "2024-05-01T10:00:00Z stdout P a\n2024-05-01T10:00:00Z stderr P x\n2024-05-01T10:00:01Z stdout F b\n2024-05-01T10:00:01Z stderr F y\n";
        let out = render_all(log.as_bytes(), &LogOptions::default());
        assert_eq!(out, b"ab\nxy\n");
        // A dangling partial (the container died mid-line) still shows at the end.
        let out = render_all(b"2024-05-01T10:00:00Z stdout P unfinished\n", &LogOptions::default());
        assert_eq!(out, b"unfinished\n");
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let mut dec = CriDecoder::new();
        let mut lines = Vec::new();
        let big = vec![b'a'; MAX_RAW_LINE + 10];
        dec.push(&big, &mut lines);
        assert!(dec.pending.is_empty(), "the pending buffer was dropped");
        assert_eq!(dec.skipped, 1);
    }

    #[test]
    fn options_from_query() {
        let now: Timestamp = "2024-05-01T10:00:10Z".parse().expect("time");
        let q = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let o = LogOptions::from_query(&q(&[("follow", "true"), ("tailLines", "3"), ("sinceSeconds", "5"), ("timestamps", "true")]), now).expect("ok");
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!(o.tail_lines, Some(3));
        assert_eq!(o.since, "2024-05-01T10:00:05Z".parse().ok());
        let o = LogOptions::from_query(&q(&[("sinceTime", "2024-05-01T09:00:00Z"), ("previous", "true")]), now).expect("ok");
        assert!(o.previous);
        assert_eq!(o.since, "2024-05-01T09:00:00Z".parse().ok());
        for bad in [
            vec![("tailLines", "x")],
            vec![("follow", "yes")],
            vec![("sinceSeconds", "0")],
            vec![("limitBytes", "-1")],
            vec![("sinceTime", "yesterday")],
            vec![("sinceSeconds", "1"), ("sinceTime", "2024-05-01T09:00:00Z")],
        ] {
            assert!(LogOptions::from_query(&q(&bad), now).is_err(), "{bad:?}");
        }
        assert_eq!(LogOptions::from_query(&q(&[("tailLines", "-1")]), now).expect("ok").tail_lines, None);
    }
}
