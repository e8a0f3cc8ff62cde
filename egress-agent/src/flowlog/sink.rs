//! Where flow-log lines go: a file (appended to, created 0600) or standard
//! output. A destination that cannot be written never stops the agent: the
//! first failure is logged, lines are counted as lost while it lasts, and
//! the file is opened again a little later. A file renamed or removed
//! under the agent (log rotation) is noticed and created again.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write as _},
    os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use log::{info, warn};

/// How long an unwritable destination is left alone before trying again,
/// and how often the file is checked for having been rotated away.
pub const RETRY: Duration = Duration::from_secs(5);

/// `--flow-log`: `-` is standard output, anything else a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

impl Destination {
    pub fn parse(arg: &std::path::Path) -> Self {
        if arg.as_os_str() == "-" {
            Self::Stdout
        } else {
            Self::File(arg.to_owned())
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("standard output"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

enum Open {
    Stdout(BufWriter<io::Stdout>),
    File(BufWriter<File>),
}

impl Open {
    fn writer(&mut self) -> &mut dyn io::Write {
        match self {
            Self::Stdout(w) => w,
            Self::File(w) => w,
        }
    }
}

/// The open destination, or when it may be tried again.
pub struct Sink {
    dest: Destination,
    open: Option<Open>,
    retry_at: Option<Instant>,
    /// When to check next that the path still names the open file.
    check_at: Instant,
    /// Lines lost since the destination last failed (reported when it works
    /// again) and in all.
    lost_now: u64,
    lost: u64,
    written: u64,
}

impl Sink {
    /// Open `dest`; failing to is logged and retried later, never an error.
    pub fn new(dest: Destination) -> Self {
        let mut sink = Self {
            dest,
            open: None,
            retry_at: None,
            check_at: Instant::now() + RETRY,
            lost_now: 0,
            lost: 0,
            written: 0,
        };
        sink.reopen(Instant::now());
        sink
    }

    pub fn destination(&self) -> &Destination {
        &self.dest
    }

    /// Lines that could not be written since the start.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Lines written since the start.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn open(dest: &Destination) -> io::Result<Open> {
        Ok(match dest {
            Destination::Stdout => Open::Stdout(BufWriter::new(io::stdout())),
            Destination::File(path) => {
                let mut file = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)?;
                end_torn_line(&mut file)?;
                Open::File(BufWriter::new(file))
            }
        })
    }

    fn reopen(&mut self, now: Instant) {
        match Self::open(&self.dest) {
            Ok(open) => {
                self.open = Some(open);
                self.retry_at = None;
                if self.lost_now > 0 {
                    info!(
                        "flow log {} is writable again ({} lines were lost)",
                        self.dest, self.lost_now
                    );
                    self.lost_now = 0;
                }
            }
            Err(err) => self.failed(now, "opening", &err),
        }
    }

    fn failed(&mut self, now: Instant, what: &str, err: &io::Error) {
        // One warning per outage, not one per line.
        if self.retry_at.is_none() && self.lost_now == 0 {
            warn!(
                "flow log {}: {what} failed: {err}; lines are lost (and counted) until it works again, retried every {RETRY:?}",
                self.dest
            );
        }
        self.open = None;
        self.retry_at = Some(now + RETRY);
    }

    /// Write one line (newline included), buffered until [`Sink::flush`].
    pub fn write(&mut self, line: &str, now: Instant) {
        if self.open.is_none() && self.retry_at.is_some_and(|at| now >= at) {
            self.reopen(now);
        }
        let result = match &mut self.open {
            Some(open) => open.writer().write_all(line.as_bytes()),
            None => {
                self.lose(1);
                return;
            }
        };
        match result {
            Ok(()) => self.written += 1,
            Err(err) => {
                self.failed(now, "writing", &err);
                self.lose(1);
            }
        }
    }

    /// Push buffered lines out (after each batch, so a reader of the file
    /// sees them within moments), and now and then check for rotation.
    pub fn flush(&mut self, now: Instant) {
        let Some(open) = &mut self.open else {
            return;
        };
        if let Err(err) = open.writer().flush() {
            // What the buffer held is gone with the writer; it is not
            // known how much of it reached the file.
            self.failed(now, "writing", &err);
            return;
        }
        if now >= self.check_at {
            self.check_at = now + RETRY;
            if self.rotated() {
                info!("flow log {} was moved away: writing a new one", self.dest);
                self.reopen(now);
            }
        }
    }

    /// Whether the path no longer names the open file (renamed or removed,
    /// as log rotation does).
    fn rotated(&self) -> bool {
        let (Destination::File(path), Some(Open::File(file))) = (&self.dest, &self.open) else {
            return false;
        };
        let Ok(open) = file.get_ref().metadata() else {
            return false;
        };
        match std::fs::metadata(path) {
            Ok(named) => (named.dev(), named.ino()) != (open.dev(), open.ino()),
            Err(_) => true,
        }
    }

    fn lose(&mut self, n: u64) {
        self.lost += n;
        self.lost_now += n;
    }
}

/// A write that failed part-way (a full disk) leaves a line without its
/// newline, and lines appended after it would be glued to it, unreadable.
/// End such a line before appending: only the torn line itself is lost.
fn end_torn_line(file: &mut File) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "egress-flowlog-{label}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn flowlog_sink_file_appends_mode_0600() {
        let dir = temp_dir("append");
        let path = dir.join("flows.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut sink = Sink::new(Destination::parse(&path));
        let now = Instant::now();
        sink.write("{\"a\":1}\n", now);
        sink.flush(now);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n{\"a\":1}\n");
        let fresh = dir.join("new.jsonl");
        let mut sink = Sink::new(Destination::parse(&fresh));
        sink.write("x\n", now);
        sink.flush(now);
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o600,
            "a created flow log is readable by its owner only"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flowlog_sink_unwritable_counts_lost_then_recovers() {
        let dir = temp_dir("retry");
        // A directory where the file should be: opening fails.
        let path = dir.join("flows.jsonl");
        std::fs::create_dir(&path).unwrap();
        let mut sink = Sink::new(Destination::parse(&path));
        // After the failed open: the retry is due RETRY after it at most.
        let start = Instant::now();
        sink.write("a\n", start);
        sink.write("b\n", start + Duration::from_secs(1));
        sink.flush(start);
        assert_eq!(sink.lost(), 2, "lines are counted as lost, not kept");
        std::fs::remove_dir(&path).unwrap();
        sink.write("c\n", start + Duration::from_secs(2));
        assert_eq!(sink.lost(), 3, "no retry before the retry interval");
        sink.write("d\n", start + RETRY);
        sink.flush(start + RETRY);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "d\n");
        assert_eq!((sink.lost(), sink.written()), (3, 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flowlog_sink_torn_line_ended_before_appending() {
        let dir = temp_dir("torn");
        let path = dir.join("flows.jsonl");
        // What a write cut short by a full disk leaves.
        std::fs::write(&path, "{\"a\":1}\n{\"b\":").unwrap();
        let mut sink = Sink::new(Destination::parse(&path));
        let now = Instant::now();
        sink.write("{\"c\":3}\n", now);
        sink.flush(now);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":\n{\"c\":3}\n",
            "the torn line is ended, the next line stands on its own"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flowlog_sink_rotated_file_created_again() {
        let dir = temp_dir("rotate");
        let path = dir.join("flows.jsonl");
        let mut sink = Sink::new(Destination::parse(&path));
        let start = Instant::now();
        sink.write("a\n", start);
        sink.flush(start);
        let rotated = dir.join("flows.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        sink.write("b\n", start);
        sink.flush(start + RETRY);
        sink.write("c\n", start + RETRY);
        sink.flush(start + RETRY);
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "a\nb\n");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "c\n",
            "after the check, lines go to a new file under the configured name"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flowlog_destination_dash_is_stdout() {
        assert_eq!(
            Destination::parse(std::path::Path::new("-")),
            Destination::Stdout
        );
        assert_eq!(
            Destination::parse(std::path::Path::new("/var/log/f")),
            Destination::File("/var/log/f".into())
        );
    }
}
