//! `--source dir:PATH`: a directory of manifests, re-read as its files change.
//!
//! The directory is watched with inotify, so a change is seen as soon as the file is closed
//! or renamed into place, and only the files named by events are looked at again. A full
//! rescan (a stat of every file) still runs every [`RESCAN_INTERVAL`], and whenever the events
//! cannot be trusted to name every change (the kernel's queue overflowed, a ConfigMap-style
//! `..data` symlink swap, a subdirectory): it catches writers that keep a file open and
//! filesystems without inotify. Without inotify at all the directory is polled.
//!
//! A failure never becomes emptiness. A directory that cannot be read (renamed away, removed,
//! unreadable) keeps every file's objects; a file that cannot be read (EMFILE, EACCES, EIO, a
//! FIFO or directory in its place, a symbolic link leading out of the directory) or no longer
//! parses keeps its own last good objects, and only a file the readable directory no longer
//! has loses them. A failed read records nothing, so it is retried at the next look; what is
//! failing is logged once per change, counted in `source_healthy`/`source_failures`, and
//! named by `/readyz`. A watch follows its directory's inode, not the path: when the path
//! names another directory (a rename away and back, a parent moved), it is watched again.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read as _;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Batch, MAX_FILE_BYTES, Store, is_manifest_name, parse_file};
use crate::cores;
use crate::metrics::Metrics;
use kubenft_plan::Inputs;
use kubenft_plan::model::{Limits, Rejection, one_line};

/// How often every file is checked even when no event arrived.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// How often the directory is checked when it cannot be watched.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What identifies a file's content without reading it: a rewrite through rename changes the
/// inode, an in-place rewrite the length or the (nanosecond) modification time.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            len: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            inode: meta.ino(),
        }
    }

    /// The stamp of `name` in `dir` (following symbolic links, as reading does).
    // `stat`'s field types differ between architectures.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    fn at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<Stamp> {
        let st = rustix::fs::statat(dir, name, AtFlags::empty())?;
        Ok(Stamp {
            len: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            inode: st.st_ino as u64,
        })
    }
}

/// What reading one file gave.
#[derive(Debug)]
enum FileRead {
    /// There is no such file (in a directory that could be read): its objects are deleted.
    Gone,
    /// Read and parsed: the stamp of what was read and its objects, validated.
    Parsed(Stamp, Batch),
    /// Read, but refused as a whole (not YAML, nested too deep, too large): the file keeps its
    /// last good objects. The same content gives the same answer, so its stamp is recorded.
    Refused(Stamp, Rejection),
    /// Could not be read (an I/O error, not a regular file, a symbolic link leading out of the
    /// directory): the file keeps its last good objects, and nothing is recorded, so the next
    /// look (at most [`RESCAN_INTERVAL`] later) tries again. Never a deletion.
    Failed(String),
}

/// Opens a file of the directory for reading (a seam: tests inject failures).
type Opener = fn(BorrowedFd<'_>, &OsStr) -> std::io::Result<File>;

/// What is wrong with a file right now.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Problem {
    rejection: Rejection,
    /// An I/O failure (retried; the source is not healthy meanwhile) rather than content
    /// refused.
    failing: bool,
}

/// One file as last looked at.
#[derive(Debug, Default)]
struct FileState {
    /// The stamp of the content whose outcome is in effect; `None`: read again at the next look.
    stamp: Option<Stamp>,
    problem: Option<Problem>,
}

/// The directory's files as last read: each file is read and validated again only when its
/// stamp changes (or its last read failed), so a change to one small file of thousands costs
/// one file. A failure never turns into emptiness: a directory that cannot be read keeps every
/// file's objects, a file that cannot be read or parsed keeps its own, and only a file the
/// readable directory no longer has loses them.
struct DirCache {
    limits: Limits,
    files: BTreeMap<OsString, FileState>,
    store: Store<OsString>,
    /// Why the directory itself cannot be read, if it cannot.
    dir_error: Option<String>,
    /// Whether the directory has been read once (nothing is published before).
    listed: bool,
    open: Opener,
}

impl DirCache {
    fn new(limits: Limits) -> Self {
        DirCache {
            limits,
            files: BTreeMap::new(),
            store: Store::default(),
            dir_error: None,
            listed: false,
            open: open_beneath,
        }
    }

    /// Checks every file; `true` if anything changed (a file changed, appeared or went away,
    /// or what is failing changed). The files to read are read and validated on every core (a
    /// first read of thousands of files is the controller's start-up time).
    fn rescan(&mut self, dir: &Path) -> bool {
        let listing = open_dir(dir).and_then(|fd| {
            let names = list(fd.as_fd())?;
            Ok((fd, names))
        });
        let (fd, names) = match listing {
            Ok(listing) => listing,
            Err(e) => return self.set_dir_error(dir, Some(e)),
        };
        let mut changed = self.set_dir_error(dir, None);
        self.listed = true;
        // What the readable directory no longer lists is gone.
        let gone: Vec<OsString> = self
            .files
            .keys()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            changed |= self.apply(name, FileRead::Gone);
        }
        let stale: Vec<OsString> = names
            .into_iter()
            .filter(|name| self.stale(fd.as_fd(), name))
            .collect();
        let (limits, open) = (&self.limits, self.open);
        let read = cores::map(&stale, |name| read_file(fd.as_fd(), name, limits, open));
        for (name, result) in stale.into_iter().zip(read) {
            changed |= self.apply(name, result);
        }
        changed
    }

    /// Checks the named files only; `true` if anything changed.
    fn check_names(&mut self, dir: &Path, names: BTreeSet<OsString>) -> bool {
        let fd = match open_dir(dir) {
            Ok(fd) => fd,
            Err(e) => return self.set_dir_error(dir, Some(e)),
        };
        let mut changed = self.set_dir_error(dir, None);
        for name in names {
            if self.stale(fd.as_fd(), &name) {
                let result = read_file(fd.as_fd(), &name, &self.limits, self.open);
                changed |= self.apply(name, result);
            }
        }
        changed
    }

    /// Whether a file must be read: its stamp is not the one whose outcome is in effect.
    fn stale(&self, dir: BorrowedFd<'_>, name: &OsStr) -> bool {
        let recorded = self.files.get(name).and_then(|f| f.stamp.as_ref());
        match (Stamp::at(dir, name), recorded) {
            (Ok(now), Some(recorded)) => now != *recorded,
            // Not known yet, last read failed, gone (the read says so), or a stat error.
            _ => true,
        }
    }

    /// Takes in what reading one file gave; `true` if the view or the failures changed.
    fn apply(&mut self, name: OsString, result: FileRead) -> bool {
        let (stamp, problem) = match result {
            FileRead::Gone => {
                let Some(old) = self.files.remove(&name) else {
                    return false;
                };
                if old.problem.is_some() {
                    info!(file = ?name, "file removed; its error is gone with it");
                }
                self.store.remove(&name);
                return true;
            }
            FileRead::Parsed(stamp, batch) => {
                self.store.set(name.clone(), batch);
                let state = self.files.entry(name.clone()).or_default();
                if state.problem.take().is_some() {
                    info!(file = ?name, "file read again");
                }
                state.stamp = Some(stamp);
                return true;
            }
            FileRead::Refused(stamp, rejection) => (
                Some(stamp),
                Problem {
                    rejection,
                    failing: false,
                },
            ),
            FileRead::Failed(message) => (
                None,
                Problem {
                    rejection: file_rejection(&name, message),
                    failing: true,
                },
            ),
        };
        let kept = self.store.contains(&name);
        let state = self.files.entry(name.clone()).or_default();
        state.stamp = stamp;
        if state.problem.as_ref() == Some(&problem) {
            return false;
        }
        warn!(
            file = ?name,
            problem = %one_line(&problem.rejection.message),
            "{}",
            if kept {
                "cannot use the file; keeping its last good objects"
            } else {
                "cannot use the file"
            }
        );
        state.problem = Some(problem);
        true
    }

    /// Records whether the directory can be read; `true` if that changed.
    fn set_dir_error(&mut self, dir: &Path, error: Option<std::io::Error>) -> bool {
        let error = error.map(|e| format!("cannot read the directory {}: {e}", dir.display()));
        let changed = self.dir_error != error;
        self.dir_error = error;
        changed
    }

    /// What is failing now (the directory, files that cannot be read), for health reports.
    fn failures(&self) -> Vec<String> {
        let files = self.files.iter().filter_map(|(name, f)| match &f.problem {
            Some(p) if p.failing => Some(format!("file {name:?}: {}", p.rejection.message)),
            _ => None,
        });
        self.dir_error.iter().cloned().chain(files).collect()
    }

    /// The view: the objects of every file as last read well, and every file's problem.
    fn inputs(&self) -> Inputs {
        let mut inputs = self.store.inputs();
        let problems = self.files.values().filter_map(|f| f.problem.as_ref());
        inputs
            .rejections
            .extend(problems.map(|p| p.rejection.clone()));
        inputs.rejections.sort();
        inputs
    }
}

fn file_rejection(name: &OsStr, message: String) -> Rejection {
    Rejection {
        kind: "File",
        namespace: String::new(),
        name: name.to_string_lossy().into_owned(),
        field: String::new(),
        message,
    }
}

/// Opens the directory (every file is then looked up through this descriptor, so a directory
/// renamed away in the middle of a scan is read whole or not at all).
fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(dir, flags, Mode::empty())?)
}

/// The names of the manifest files in a directory, sorted.
fn list(dir: BorrowedFd<'_>) -> std::io::Result<BTreeSet<OsString>> {
    let mut names = BTreeSet::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if is_manifest_name(Path::new(name)) {
            names.insert(name.to_owned());
        }
    }
    Ok(names)
}

/// Opens `name` for reading without leaving `dir`: a symbolic link may lead elsewhere in the
/// directory (ConfigMap volumes link every file through `..data`), not out of it.
fn open_beneath(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<File> {
    // Non-blocking, so that a FIFO cannot hang the source.
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(dir, name, flags, Mode::empty(), resolve) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::XDEV) => Err(outside()),
        // No openat2 (Linux before 5.6, or a seccomp filter): open, then check where it is.
        Err(Errno::NOSYS | Errno::PERM) => {
            let file = File::from(rustix::fs::openat(dir, name, flags, Mode::empty())?);
            let real = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}"));
            match (real(dir.as_raw_fd()), real(file.as_raw_fd())) {
                (Ok(d), Ok(f)) if !f.starts_with(&d) => Err(outside()),
                _ => Ok(file),
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn outside() -> std::io::Error {
    std::io::Error::other("a symbolic link leading out of the directory (not followed)")
}

/// Reads and parses one file of the directory.
fn read_file(dir: BorrowedFd<'_>, name: &OsStr, limits: &Limits, open: Opener) -> FileRead {
    let failed = |e: std::io::Error| FileRead::Failed(format!("unreadable: {e}"));
    let file = match open(dir, name) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return FileRead::Gone,
        Err(e) => return failed(e),
    };
    let meta = match file.metadata() {
        Ok(meta) => meta,
        Err(e) => return failed(e),
    };
    if !meta.is_file() {
        return FileRead::Failed("not a regular file".into());
    }
    let stamp = Stamp::of(&meta);
    let shown = name.to_string_lossy();
    let refused = |stamp, message| FileRead::Refused(stamp, file_rejection(name, message));
    if meta.len() > MAX_FILE_BYTES {
        let message = format!(
            "{} bytes is larger than the {MAX_FILE_BYTES} allowed",
            meta.len()
        );
        return refused(stamp, message);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    if let Err(e) = file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes) {
        return failed(e);
    }
    if bytes.len() as u64 > MAX_FILE_BYTES {
        // It grew while being read: refused, and read again at the next look (another stamp).
        return refused(
            stamp,
            format!("larger than the {MAX_FILE_BYTES} bytes allowed"),
        );
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return refused(stamp, "not UTF-8 text".into());
    };
    match parse_file(&shown, &text) {
        Ok(objects) => FileRead::Parsed(stamp, Batch::validate(&objects, limits)),
        Err(rejection) => FileRead::Refused(stamp, rejection),
    }
}

/// What the directory watch reported.
#[derive(Debug, Default)]
struct Events {
    names: BTreeSet<OsString>,
    /// The events do not say which files changed: check them all.
    rescan: bool,
    /// The watch ended (the directory was removed or moved).
    lost: bool,
}

/// An inotify watch on one directory.
struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    /// The directory watched (device and inode): a watch follows its directory, not the
    /// path, so a directory renamed away and another (or the same) put back is noticed here.
    watched: Option<(u64, u64)>,
}

impl DirWatch {
    fn new(dir: &Path) -> std::io::Result<DirWatch> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        inotify::add_watch(
            &fd,
            dir,
            WatchFlags::CLOSE_WRITE
                | WatchFlags::MOVED_TO
                | WatchFlags::MOVED_FROM
                | WatchFlags::CREATE
                | WatchFlags::DELETE
                | WatchFlags::ATTRIB
                | WatchFlags::DELETE_SELF
                | WatchFlags::MOVE_SELF
                | WatchFlags::ONLYDIR,
        )?;
        // `AsyncFd::new` is deprecated because a registered descriptor could be closed behind
        // the reactor's back; here the `AsyncFd` owns the `OwnedFd` and only lends it out by
        // shared reference, so nothing can close it while registered (and `register`, its
        // replacement, is `unsafe`, which this crate forbids).
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd)?;
        Ok(DirWatch {
            fd,
            watched: identity(dir),
        })
    }

    /// Whether the path now names another directory than the one watched.
    fn stale(&self, dir: &Path) -> bool {
        identity(dir).is_some_and(|now| Some(now) != self.watched)
    }

    /// Waits for events and returns all that are queued.
    async fn next(&self) -> std::io::Result<Events> {
        let mut events = Events::default();
        let mut buf = [MaybeUninit::<u8>::uninit(); 16 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut reader = inotify::Reader::new(guard.get_inner(), &mut buf);
            loop {
                match reader.next() {
                    Ok(event) => classify(&event, &mut events),
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            guard.clear_ready();
            if events.rescan || events.lost || !events.names.is_empty() {
                return Ok(events);
            }
        }
    }
}

fn identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

fn classify(event: &inotify::Event<'_>, into: &mut Events) {
    let flags = event.events();
    if flags.intersects(ReadFlags::QUEUE_OVERFLOW) {
        into.rescan = true;
    }
    if flags.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF | ReadFlags::IGNORED) {
        into.lost = true;
    }
    let Some(name) = event.file_name() else {
        return;
    };
    let name = OsString::from(std::ffi::OsStr::from_bytes(name.to_bytes()));
    let text = name.to_string_lossy();
    if flags.intersects(ReadFlags::ISDIR) || text.starts_with("..") {
        // A subdirectory, or an atomic swap of the `..data` link files point through.
        into.rescan = true;
    } else if is_manifest_name(Path::new(&name)) {
        into.names.insert(name);
    }
    // Anything else (an editor's or a writer's temporary file) is not read.
}

/// Watches a directory and publishes validated inputs on every change. The first value is
/// published as soon as the directory could be read, before any event is awaited, so a
/// consumer can wait for "synced" by waiting for the first change; a directory that cannot be
/// read at start publishes nothing (an empty view would make every agent delete every rule).
pub async fn run_dir(
    dir: PathBuf,
    limits: Limits,
    tx: watch::Sender<Option<Arc<Inputs>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut watch = watch_or_poll(&dir);
    let started = Instant::now();
    let scan_dir = dir.clone();
    let Some((mut cache, _)) =
        with_cache(DirCache::new(limits), move |c| c.rescan(&scan_dir)).await
    else {
        return;
    };
    metrics.source_health.report(&cache.failures());
    if cache.listed {
        publish(&cache, &dir, &tx, started);
    }
    let mut last_rescan = Instant::now();
    let mut last_watch_attempt = Instant::now();
    loop {
        let wait = match &watch {
            Some(_) => RESCAN_INTERVAL.saturating_sub(last_rescan.elapsed()),
            None => POLL_INTERVAL,
        };
        let events = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            e = next_events(watch.as_ref()) => e,
            () = tokio::time::sleep(wait) => Events { rescan: true, ..Default::default() },
        };
        let started = Instant::now();
        if events.lost {
            warn!(dir = %dir.display(), "the directory watch ended; watching it again");
            watch = watch_or_poll(&dir);
        }
        let scan_dir = dir.clone();
        let changed = if events.rescan || events.lost {
            match &watch {
                // Polling: try to watch again now and then (the directory may be back).
                None if last_watch_attempt.elapsed() >= RESCAN_INTERVAL => {
                    last_watch_attempt = Instant::now();
                    watch = DirWatch::new(&dir).ok();
                }
                Some(w) if w.stale(&dir) => {
                    warn!(dir = %dir.display(), "the path names another directory than the one watched; watching it again");
                    watch = watch_or_poll(&dir);
                }
                _ => {}
            }
            last_rescan = Instant::now();
            with_cache(cache, move |c| c.rescan(&scan_dir)).await
        } else {
            with_cache(cache, move |c| c.check_names(&scan_dir, events.names)).await
        };
        let Some((back, changed)) = changed else {
            return;
        };
        cache = back;
        metrics.source_health.report(&cache.failures());
        if changed && cache.listed {
            publish(&cache, &dir, &tx, started);
        }
    }
}

/// Runs `f` on the cache off the runtime (reading thousands of files must not hold up agent
/// handshakes). `None` if the runtime is shutting down.
async fn with_cache<T: Send + 'static>(
    mut cache: DirCache,
    f: impl FnOnce(&mut DirCache) -> T + Send + 'static,
) -> Option<(DirCache, T)> {
    cores::off_runtime(move || {
        let out = f(&mut cache);
        (cache, out)
    })
    .await
}

async fn next_events(watch: Option<&DirWatch>) -> Events {
    match watch {
        Some(w) => w.next().await.unwrap_or_else(|e| {
            warn!(error = %e, "reading directory events failed; rescanning");
            Events {
                lost: true,
                ..Default::default()
            }
        }),
        None => std::future::pending().await,
    }
}

fn watch_or_poll(dir: &Path) -> Option<DirWatch> {
    match DirWatch::new(dir) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the directory; polling it");
            None
        }
    }
}

fn publish(
    cache: &DirCache,
    dir: &Path,
    tx: &watch::Sender<Option<Arc<Inputs>>>,
    started: Instant,
) {
    let inputs = cache.inputs();
    info!(
        dir = %dir.display(),
        services = inputs.services.len(),
        slices = inputs.slices.len(),
        nodes = inputs.nodes.len(),
        rejected = inputs.rejections.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "read manifests"
    );
    for r in &inputs.rejections {
        warn!(rejection = %r, "object refused");
    }
    tx.send_replace(Some(Arc::new(inputs)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::test_manifest::service as svc;

    fn cluster_ips(cache: &DirCache) -> Vec<String> {
        cache
            .inputs()
            .services
            .values()
            .map(|s| s.cluster_ips[0].to_string())
            .collect()
    }

    #[test]
    fn the_directory_cache_rereads_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), svc("a", "10.96.0.1")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), svc("b", "10.96.0.2")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let mut cache = DirCache::new(Limits::default());
        assert!(cache.rescan(dir.path()), "first read");
        assert_eq!(cache.inputs().services.len(), 2);
        assert!(!cache.rescan(dir.path()), "nothing changed");

        // A rewrite through rename (as kubectl-style tools and the lab do).
        let tmp = dir.path().join(".b.yaml.tmp");
        std::fs::write(&tmp, svc("b", "10.96.0.3")).unwrap();
        std::fs::rename(&tmp, dir.path().join("b.yaml")).unwrap();
        assert!(cache.rescan(dir.path()), "b rewritten");
        assert_eq!(cluster_ips(&cache), ["10.96.0.1", "10.96.0.3"]);
        assert!(!cache.rescan(dir.path()));

        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert!(cache.rescan(dir.path()), "a removed");
        assert_eq!(cache.inputs().services.len(), 1);
    }

    fn names(cache: &DirCache) -> (Vec<String>, Vec<String>) {
        let i = cache.inputs();
        (
            i.services.keys().map(|id| id.name.clone()).collect(),
            i.nodes.keys().cloned().collect(),
        )
    }

    fn file_problems(cache: &DirCache) -> Vec<String> {
        cache
            .inputs()
            .rejections
            .iter()
            .filter(|r| r.kind == "File")
            .map(ToString::to_string)
            .collect()
    }

    /// Renaming the directory away keeps every object (and says why the source is failing);
    /// when it is back, changes apply again.
    #[test]
    fn a_directory_renamed_away_keeps_its_view() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("manifests");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), svc("a", "10.96.0.1")).unwrap();
        std::fs::write(dir.join("b.yaml"), svc("b", "10.96.0.2")).unwrap();
        let mut cache = DirCache::new(Limits::default());
        assert!(cache.rescan(&dir));
        assert!(cache.failures().is_empty());

        let away = parent.path().join("away");
        std::fs::rename(&dir, &away).unwrap();
        assert!(cache.rescan(&dir), "the failure is news");
        assert_eq!(names(&cache).0, ["a", "b"]);
        let failures = cache.failures();
        assert_eq!(failures.len(), 1);
        assert!(
            failures[0].contains("cannot read the directory"),
            "{failures:?}"
        );
        assert!(!cache.rescan(&dir), "the same failure again is not");
        let events = BTreeSet::from([OsString::from("a.yaml"), OsString::from("b.yaml")]);
        assert!(!cache.check_names(&dir, events));
        assert_eq!(names(&cache).0, ["a", "b"]);

        std::fs::rename(&away, &dir).unwrap();
        std::fs::write(dir.join("c.yaml"), svc("c", "10.96.0.3")).unwrap();
        assert!(cache.rescan(&dir));
        assert!(cache.failures().is_empty());
        assert_eq!(names(&cache).0, ["a", "b", "c"]);
    }

    fn emfile(_: BorrowedFd<'_>, _: &OsStr) -> std::io::Result<File> {
        Err(std::io::Error::from_raw_os_error(24))
    }

    /// A file that cannot be read keeps its objects, and is read again at the next look even
    /// though it did not change (a permission fixed with chmod changes no stamp).
    #[test]
    fn a_file_that_cannot_be_read_keeps_its_objects_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), svc("a", "10.96.0.1")).unwrap();
        let mut cache = DirCache::new(Limits::default());
        cache.rescan(dir.path());
        // Rewritten, but unreadable for now (out of file descriptors).
        std::fs::write(dir.path().join("a.yaml"), svc("a", "10.96.0.9")).unwrap();
        cache.open = emfile;
        assert!(cache.rescan(dir.path()));
        assert_eq!(cluster_ips(&cache), ["10.96.0.1"], "the last good objects");
        let failures = cache.failures();
        assert!(failures[0].contains("\"a.yaml\""), "{failures:?}");
        assert!(!cache.rescan(dir.path()), "still failing: nothing new");
        assert_eq!(cluster_ips(&cache), ["10.96.0.1"]);
        // A file first seen while unreadable contributes nothing, and is no deletion.
        std::fs::write(dir.path().join("b.yaml"), svc("b", "10.96.0.2")).unwrap();
        let events = BTreeSet::from([OsString::from("b.yaml")]);
        assert!(cache.check_names(dir.path(), events));
        assert_eq!(cluster_ips(&cache), ["10.96.0.1"]);
        assert_eq!(cache.failures().len(), 2);

        // Readable again, with no change to the files: both are read.
        cache.open = open_beneath;
        assert!(cache.rescan(dir.path()));
        assert_eq!(cluster_ips(&cache), ["10.96.0.9", "10.96.0.2"]);
        assert!(cache.failures().is_empty());
        assert!(file_problems(&cache).is_empty());
    }

    /// An entry that cannot be read as a file (a directory, a FIFO, in place of a manifest)
    /// keeps the objects the file had; only a file that is really gone loses them.
    #[test]
    fn only_a_file_really_gone_loses_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, svc("a", "10.96.0.1")).unwrap();
        std::fs::write(&b, svc("b", "10.96.0.2")).unwrap();
        let mut cache = DirCache::new(Limits::default());
        cache.rescan(dir.path());
        std::fs::remove_file(&a).unwrap();
        std::fs::create_dir(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &b,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(cache.rescan(dir.path()));
        assert_eq!(names(&cache).0, ["a", "b"]);
        assert_eq!(cache.failures().len(), 2, "{:?}", cache.failures());
        assert!(cache.failures()[0].contains("not a regular file"));

        std::fs::remove_dir(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
        assert!(cache.rescan(dir.path()));
        assert!(names(&cache).0.is_empty());
        assert!(cache.failures().is_empty());
    }

    /// A typo appended to a multi-document file keeps all of that file's objects (its Node
    /// too) and is reported; fixing it applies the file again.
    #[test]
    fn a_file_that_no_longer_parses_keeps_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("all.yaml");
        let good = format!(
            "{}---\n{}---\napiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n",
            svc("a", "10.96.0.1"),
            svc("b", "10.96.0.2")
        );
        std::fs::write(&path, &good).unwrap();
        let mut cache = DirCache::new(Limits::default());
        cache.rescan(dir.path());
        assert_eq!(
            names(&cache),
            (vec!["a".into(), "b".into()], vec!["n1".into()])
        );

        std::fs::write(&path, format!("{good}  spec: [oops\n")).unwrap();
        assert!(cache.rescan(dir.path()));
        assert_eq!(
            names(&cache),
            (vec!["a".into(), "b".into()], vec!["n1".into()])
        );
        let problems = file_problems(&cache);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("all.yaml") && problems[0].contains("not valid YAML"));
        assert!(
            cache.failures().is_empty(),
            "content refused is not a read failure"
        );
        assert!(
            !cache.rescan(dir.path()),
            "the same content is not parsed again"
        );

        std::fs::write(&path, svc("a", "10.96.0.1")).unwrap();
        assert!(cache.rescan(dir.path()));
        assert_eq!(names(&cache), (vec!["a".into()], vec![]));
        assert!(file_problems(&cache).is_empty());

        // A file never parsed contributes nothing.
        std::fs::write(dir.path().join("new.yaml"), "kind: [").unwrap();
        assert!(cache.rescan(dir.path()));
        assert_eq!(names(&cache), (vec!["a".into()], vec![]));
    }

    /// 80,000 nested brackets are refused at once (libyaml took 23 s over them).
    #[test]
    fn deep_nesting_is_refused_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let deep = format!("a: {}{}\n", "[".repeat(80_000), "]".repeat(80_000));
        std::fs::write(dir.path().join("deep.yaml"), deep).unwrap();
        let mut cache = DirCache::new(Limits::default());
        let started = Instant::now();
        cache.rescan(dir.path());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let problems = file_problems(&cache);
        assert!(
            problems[0].contains("deep.yaml") && problems[0].contains("nested more than 64"),
            "{problems:?}"
        );
    }

    /// A symbolic link out of the directory is not followed; links inside it (a ConfigMap
    /// volume's `..data`) are.
    #[test]
    fn symlinks_out_of_the_directory_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.yaml"), svc("s", "10.96.0.66")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::os::unix::fs::symlink(outside.path().join("secret.yaml"), d.join("abs.yaml")).unwrap();
        let relative = Path::new("..")
            .join(outside.path().file_name().unwrap())
            .join("secret.yaml");
        std::os::unix::fs::symlink(&relative, d.join("rel.yaml")).unwrap();
        // As a ConfigMap volume lays it out.
        std::fs::create_dir(d.join("..2026_12_06")).unwrap();
        std::fs::write(d.join("..2026_12_06/web.yaml"), svc("web", "10.96.0.1")).unwrap();
        std::os::unix::fs::symlink("..2026_12_06", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/web.yaml", d.join("web.yaml")).unwrap();

        let mut cache = DirCache::new(Limits::default());
        cache.rescan(d);
        assert_eq!(names(&cache).0, ["web"]);
        let failures = cache.failures();
        assert_eq!(failures.len(), 2, "{failures:?}");
        for (f, name) in failures.iter().zip(["abs.yaml", "rel.yaml"]) {
            assert!(
                f.contains(name) && f.contains("out of the directory"),
                "{f}"
            );
        }
    }

    /// A file name with a newline cannot split a log line.
    #[test]
    fn file_names_stay_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x\nFAKE LOG LINE.yaml"), "a: [").unwrap();
        let mut cache = DirCache::new(Limits::default());
        cache.rescan(dir.path());
        let problems = file_problems(&cache);
        assert_eq!(problems.len(), 1);
        assert!(!problems[0].contains('\n'), "{problems:?}");
        assert!(problems[0].contains("x\\nFAKE"), "{problems:?}");
    }

    /// The running source: a directory put in place of the one watched (here: its parent
    /// renamed away, so the watch gets no event) is read and watched again at the next rescan;
    /// a directory renamed away keeps the published view whole and makes the source
    /// unhealthy; renamed back, changes apply again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_running_source_survives_its_directory_going_away() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let dir = root.join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), svc("a", "10.96.0.1")).unwrap();
        std::fs::write(dir.join("b.yaml"), svc("b", "10.96.0.2")).unwrap();
        let (tx, mut rx) = watch::channel(None);
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_dir(
            dir.clone(),
            Limits::default(),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));
        // Every view published, as Service names.
        let seen = Arc::new(parking_lot::Mutex::new(Vec::<Vec<String>>::new()));
        let spy = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(i) = rx.borrow_and_update().clone() {
                        seen.lock()
                            .push(i.services.keys().map(|id| id.name.clone()).collect());
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        let wait = |what: &'static str, check: Box<dyn Fn() -> bool + Send>| async move {
            let deadline = Instant::now() + RESCAN_INTERVAL * 3;
            while !check() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let last = {
            let seen = seen.clone();
            move || seen.lock().last().cloned().unwrap_or_default()
        };
        let l = last.clone();
        wait("the first view", Box::new(move || l() == ["a", "b"])).await;

        // The parent goes away (no event for the watch), and a new directory takes its place.
        std::fs::rename(&root, tmp.path().join("root-old")).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        for (name, ip) in [("a", "10.96.0.1"), ("b", "10.96.0.2"), ("d", "10.96.0.4")] {
            std::fs::write(dir.join(format!("{name}.yaml")), svc(name, ip)).unwrap();
        }
        let l = last.clone();
        wait(
            "the new directory read",
            Box::new(move || l() == ["a", "b", "d"]),
        )
        .await;
        // Watched again: a change is seen at once, not at the next rescan.
        std::fs::write(dir.join("e.yaml"), svc("e", "10.96.0.5")).unwrap();
        let written = Instant::now();
        let l = last.clone();
        wait("e", Box::new(move || l() == ["a", "b", "d", "e"])).await;
        assert!(
            written.elapsed() < RESCAN_INTERVAL / 2,
            "seen only by a rescan: {:?}",
            written.elapsed()
        );

        std::fs::rename(&dir, tmp.path().join("away")).unwrap();
        let m = metrics.clone();
        wait(
            "the failure reported",
            Box::new(move || m.source_health.problem().is_some()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::fs::rename(tmp.path().join("away"), &dir).unwrap();
        std::fs::write(dir.join("c.yaml"), svc("c", "10.96.0.3")).unwrap();
        let l = last.clone();
        wait(
            "c after the return",
            Box::new(move || l() == ["a", "b", "c", "d", "e"]),
        )
        .await;
        assert!(metrics.source_health.problem().is_none());

        shutdown.cancel();
        task.await.unwrap();
        spy.abort();
        for view in seen.lock().iter() {
            assert!(
                view.starts_with(&["a".to_owned(), "b".to_owned()]),
                "a published view lost Services: {view:?}"
            );
        }
    }

    /// A directory that cannot be read at start publishes nothing (not an empty view, which
    /// would make every agent delete every rule) and says why; once it can, it is read.
    #[tokio::test]
    async fn nothing_is_published_before_the_directory_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("later");
        let (tx, mut rx) = watch::channel(None);
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_dir(
            dir.clone(),
            Limits::default(),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));
        let early = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
        assert!(early.is_err(), "published before the directory was read");
        let problem = metrics.source_health.problem().unwrap_or_default();
        assert!(problem.contains("cannot read the directory"), "{problem:?}");

        // Made elsewhere and renamed into place: an empty directory would be a true view.
        let made = tmp.path().join("made");
        std::fs::create_dir(&made).unwrap();
        std::fs::write(made.join("a.yaml"), svc("a", "10.96.0.1")).unwrap();
        std::fs::rename(&made, &dir).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("published once the directory is there")
            .unwrap();
        let view = rx.borrow().clone().unwrap();
        assert_eq!(view.services.len(), 1);
        assert!(metrics.source_health.problem().is_none());
        shutdown.cancel();
        task.await.unwrap();
    }

    /// The watch names the files renamed into place, written, or removed, and ignores
    /// temporary files; a `..data` swap asks for a rescan.
    #[tokio::test]
    async fn the_watch_names_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let watch = DirWatch::new(dir.path()).unwrap();
        let mut cache = DirCache::new(Limits::default());
        cache.rescan(dir.path());

        let tmp = dir.path().join(".a.yaml.tmp");
        std::fs::write(&tmp, svc("a", "10.96.0.1")).unwrap();
        std::fs::rename(&tmp, dir.path().join("a.yaml")).unwrap();
        std::fs::write(dir.path().join("b.yml"), svc("b", "10.96.0.2")).unwrap();
        let events = next_batch(&watch, 2).await;
        assert!(!events.rescan && !events.lost, "{events:?}");
        assert!(cache.check_names(dir.path(), events.names));
        assert_eq!(cluster_ips(&cache), ["10.96.0.1", "10.96.0.2"]);

        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let events = next_batch(&watch, 1).await;
        assert!(cache.check_names(dir.path(), events.names));
        assert_eq!(cluster_ips(&cache), ["10.96.0.2"]);

        std::os::unix::fs::symlink(".", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        let events = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("no event for the ..data swap")
            .unwrap();
        assert!(events.rescan, "{events:?}");
    }

    /// Events until `want` names are seen (they may arrive in several reads).
    async fn next_batch(watch: &DirWatch, want: usize) -> Events {
        let mut all = Events::default();
        while all.names.len() < want {
            let e = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("no directory event within 5 s")
                .unwrap();
            all.names.extend(e.names);
            all.rescan |= e.rescan;
            all.lost |= e.lost;
        }
        all
    }
}
