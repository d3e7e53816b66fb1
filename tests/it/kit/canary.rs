//! A canary tree outside the cache directory, for the hostile-input and layout tests.
//! inotify watches it for the whole test, so any open, read, write, creation or deletion
//! in it by any process fails the test; at the end its files must also be byte-identical.

use std::collections::{BTreeMap, HashMap};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::inotify;

use crate::kit::test_bytes;

/// What `lstat` says about one canary entry; any write, chmod, rename or replacement
/// changes at least one of these (ctime cannot be set from user space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    file_type: u32,
    mode: u32,
    len: u64,
    ino: u64,
    nlink: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    link_target: Option<PathBuf>,
}

pub fn facts(path: &Path) -> Option<Facts> {
    let m = std::fs::symlink_metadata(path).ok()?;
    Some(Facts {
        file_type: m.mode() & 0o170000,
        mode: m.mode(),
        len: m.len(),
        ino: m.ino(),
        nlink: m.nlink(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        link_target: std::fs::read_link(path).ok(),
    })
}

/// A tree outside the cache that nothing may open, read, write, create or delete in: a
/// file, a file named like a cached image, directories with files named by valid ids,
/// and a FIFO (opening it for reading would block). Everything is two hours old, so a
/// cleaner that followed a symlink into it would find its files due for removal.
pub struct Canary {
    pub root: PathBuf,
    inotify: Option<OwnedFd>,
    watches: HashMap<i32, PathBuf>,
    facts: BTreeMap<PathBuf, Facts>,
    contents: BTreeMap<PathBuf, Vec<u8>>,
}

impl Canary {
    pub fn new(parent: &Path) -> Canary {
        let root = parent.join("canary");
        let dirs = [root.clone(), root.join("dir"), root.join("dir/sub")];
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        let files: [(&str, Vec<u8>); 5] = [
            (
                "victim",
                b"canary: nothing may read, change or delete me\n".repeat(50),
            ),
            ("real-b", test_bytes(2000, 77)),
            ("dir/inner-id", b"inner".to_vec()),
            ("dir/sub/deep-id", b"deep".to_vec()),
            ("dir/sub/keep.db", b"not a database".to_vec()),
        ];
        for (rel, data) in &files {
            std::fs::write(root.join(rel), data).unwrap();
        }
        mkfifo(&root.join("fifo"));
        let mut all: Vec<PathBuf> = files.iter().map(|(rel, _)| root.join(rel)).collect();
        all.push(root.join("fifo"));
        // Directories last: setting a file's times does not touch its directory's mtime,
        // but creating files did.
        all.extend(dirs.iter().rev().cloned());
        for p in &all {
            make_old(p);
        }
        let facts = all.iter().map(|p| (p.clone(), facts(p).unwrap())).collect();
        let contents = files
            .iter()
            .map(|(rel, data)| (root.join(rel), data.clone()))
            .collect();
        // Armed last: from here on, any access by anyone is an event.
        let fd =
            inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
        let mut watches = HashMap::new();
        for d in &dirs {
            let wd = inotify::add_watch(&fd, d, inotify::WatchFlags::ALL_EVENTS).unwrap();
            watches.insert(wd, d.clone());
        }
        Canary {
            root,
            inotify: Some(fd),
            watches,
            facts,
            contents,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Fails if anything in the tree was opened, read, written, created, deleted,
    /// renamed or had its attributes changed since it was made.
    pub fn check(&self, when: &str) {
        let mut events = Vec::new();
        let mut buf = [MaybeUninit::<u8>::uninit(); 8192];
        let fd = self.inotify.as_ref().expect("canary still armed");
        let mut reader = inotify::Reader::new(fd, &mut buf);
        loop {
            match reader.next() {
                Ok(e) => events.push(format!(
                    "{}/{}: {:?}",
                    self.watches
                        .get(&e.wd())
                        .map_or("?".into(), |p| p.display().to_string()),
                    e.file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
                    e.events()
                )),
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => panic!("reading canary events: {e}"),
            }
        }
        assert!(
            events.is_empty(),
            "{when}: something touched the canary tree outside the cache:\n{}",
            events.join("\n")
        );
        for (path, before) in &self.facts {
            assert_eq!(
                facts(path).as_ref(),
                Some(before),
                "{when}: canary entry {} changed",
                path.display()
            );
        }
    }

    /// `check`, then compares every file's bytes (after disarming, as reading them is
    /// itself an access).
    pub fn finish(mut self, when: &str) {
        self.check(when);
        self.inotify = None;
        for (path, data) in &self.contents {
            assert_eq!(
                &std::fs::read(path).unwrap(),
                data,
                "{when}: canary file {} changed",
                path.display()
            );
        }
    }
}

/// Sets an entry's times to two hours ago without following a symlink or opening it
/// (opening a FIFO would block).
pub fn make_old(path: &Path) {
    let t = rustix::fs::Timespec {
        tv_sec: chrono::Utc::now().timestamp() - 7200,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

pub fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}
