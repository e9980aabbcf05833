//! `--source dir:PATH`: a directory of manifests, re-read as its files change.
//!
//! The directory is watched with inotify, so a change is seen as soon as the file is closed
//! or renamed into place, and only the files named by events are looked at again. A full
//! rescan (a stat of every file) still runs every [`RESCAN_INTERVAL`], and whenever the events
//! cannot be trusted to name every change (the kernel's queue overflowed, a ConfigMap-style
//! `..data` symlink swap, a subdirectory): it catches writers that keep a file open and
//! filesystems without inotify. Without inotify at all the directory is polled.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Batch, Objects, Store, is_manifest_name, manifest_files, read_file};
use crate::cores;
use crate::model::Limits;
use crate::plan::Inputs;

/// How often every file is checked even when no event arrived.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// How often the directory is checked when it cannot be watched.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What identifies a file's content without reading it: a rewrite through rename changes the
/// inode, an in-place rewrite the length or the (nanosecond) modification time.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
    inode: u64,
}

impl Stamp {
    const NONE: Stamp = Stamp {
        len: 0,
        mtime: None,
        inode: 0,
    };

    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: meta.len(),
            mtime: meta.modified().ok(),
            inode: meta.ino(),
        })
    }
}

/// The directory's files as last read: each file is read and validated again only when its
/// stamp changes, so a change to one small file of thousands costs one file.
struct DirCache {
    limits: Limits,
    stamps: BTreeMap<PathBuf, Stamp>,
    store: Store<PathBuf>,
}

impl DirCache {
    fn new(limits: Limits) -> Self {
        DirCache {
            limits,
            stamps: BTreeMap::new(),
            store: Store::default(),
        }
    }

    /// Checks every file; `true` if anything changed (a file changed, appeared or went away).
    /// The files to read are read and validated on every core (a first read of thousands of
    /// files is the controller's start-up time).
    fn rescan(&mut self, dir: &Path) -> bool {
        let files: BTreeSet<PathBuf> = manifest_files(dir).into_iter().collect();
        let gone: Vec<PathBuf> = self
            .stamps
            .keys()
            .filter(|p| !files.contains(*p))
            .cloned()
            .collect();
        let mut changed = false;
        for path in gone {
            changed |= self.check(path);
        }
        let stale: Vec<(PathBuf, Option<Stamp>)> = files
            .into_iter()
            .map(|p| {
                let stamp = Stamp::of(&p);
                (p, stamp)
            })
            .filter(|(p, stamp)| stamp.is_none() || self.stamps.get(p) != stamp.as_ref())
            .collect();
        changed |= !stale.is_empty();
        for (path, stamp, batch) in read_all(stale, &self.limits) {
            self.store.set(path.clone(), batch);
            self.stamps.insert(path, stamp.unwrap_or(Stamp::NONE));
        }
        changed
    }

    /// Checks the named files only; `true` if anything changed.
    fn check_names(&mut self, dir: &Path, names: BTreeSet<OsString>) -> bool {
        let mut changed = false;
        for name in names {
            changed |= self.check(dir.join(name));
        }
        changed
    }

    /// Reads one file again if its stamp changed, or forgets it if it is gone.
    fn check(&mut self, path: PathBuf) -> bool {
        if !path.is_file() {
            let known = self.stamps.remove(&path).is_some();
            self.store.remove(&path);
            return known;
        }
        let stamp = Stamp::of(&path);
        if stamp.is_some() && self.stamps.get(&path) == stamp.as_ref() {
            return false;
        }
        self.store
            .set(path.clone(), read_batch(&path, &self.limits));
        // A file that vanished between the check and its stat gets an empty stamp, so it is
        // read again next time.
        self.stamps.insert(path, stamp.unwrap_or(Stamp::NONE));
        true
    }

    fn inputs(&self) -> Inputs {
        self.store.inputs()
    }
}

fn read_batch(path: &Path, limits: &Limits) -> Batch {
    let mut objects = Objects::default();
    read_file(path, &mut objects);
    Batch::validate(&objects, limits)
}

/// Reads and validates files on every available core, returning them in the order given.
fn read_all(
    files: Vec<(PathBuf, Option<Stamp>)>,
    limits: &Limits,
) -> Vec<(PathBuf, Option<Stamp>, Batch)> {
    cores::map(&files, |(path, stamp)| {
        (path.clone(), stamp.clone(), read_batch(path, limits))
    })
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
        Ok(DirWatch { fd })
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
/// published before any event is awaited, so a consumer can wait for "synced" by waiting
/// for the first change.
pub async fn run_dir(
    dir: PathBuf,
    limits: Limits,
    tx: watch::Sender<Option<Arc<Inputs>>>,
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
    publish(&cache, &dir, &tx, started);
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
            if watch.is_none() && last_watch_attempt.elapsed() >= RESCAN_INTERVAL {
                // Polling: try to watch again now and then (the directory may be back).
                last_watch_attempt = Instant::now();
                watch = DirWatch::new(&dir).ok();
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
        if changed {
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
