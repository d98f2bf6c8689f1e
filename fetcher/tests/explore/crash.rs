//! Crash states: the cache files a crash at some point of the log could
//! leave behind.
//!
//! * A crash of the process keeps everything it wrote (the page cache
//!   survives): every operation of the prefix, applied.
//! * A crash of the host keeps, per file, everything before the file's
//!   last fdatasync in the prefix; of each 4 KiB page changed since, the
//!   content it had at some moment since (a seeded choice per page: none
//!   of the later changes, some of them in order, or all), so later writes
//!   may persist without earlier ones and a write may be torn at page
//!   granularity. A file replaced by rename (written, synced, renamed, the
//!   directory synced) is durable as a whole; a removal may be undone.
//!   Truncations since the last sync may be lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use fetcher::local::cache::FileOp;

/// A cache directory's files: name → content, and which pages of each are
/// allocated (the rest are holes: recovery tells a hole from written zeros).
#[derive(Debug, Clone, Default)]
pub struct Files {
    data: BTreeMap<String, Vec<u8>>,
    alloc: BTreeMap<String, BTreeSet<u64>>,
}

impl Files {
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The content of file `name`.
    pub fn get(&self, name: &str) -> Option<&Vec<u8>> {
        self.data.get(name)
    }

    fn write(&mut self, name: &str, start: u64, bytes: &[u8]) {
        let f = self.data.entry(name.to_owned()).or_default();
        let end = start + bytes.len() as u64;
        if (f.len() as u64) < end {
            f.resize(end as usize, 0);
        }
        f[start as usize..end as usize].copy_from_slice(bytes);
        let a = self.alloc.entry(name.to_owned()).or_default();
        a.extend(start / PAGE..end.div_ceil(PAGE));
    }

    fn punch(&mut self, name: &str, start: u64, end: u64) {
        let f = self.data.entry(name.to_owned()).or_default();
        let end = end.min(f.len() as u64);
        if start >= end {
            return;
        }
        f[start as usize..end as usize].fill(0);
        let a = self.alloc.entry(name.to_owned()).or_default();
        for p in start.div_ceil(PAGE)..end / PAGE {
            a.remove(&p);
        }
    }

    fn set_len(&mut self, name: &str, len: u64) {
        self.data
            .entry(name.to_owned())
            .or_default()
            .resize(len as usize, 0);
        let a = self.alloc.entry(name.to_owned()).or_default();
        a.retain(|&p| p * PAGE < len);
    }

    fn replace(&mut self, name: &str, bytes: &[u8]) {
        self.data.insert(name.to_owned(), bytes.to_vec());
        let pages = (bytes.len() as u64).div_ceil(PAGE);
        self.alloc.insert(name.to_owned(), (0..pages).collect());
    }

    fn remove(&mut self, name: &str) {
        self.data.remove(name);
        self.alloc.remove(name);
    }
}

const PAGE: u64 = 4096;

fn file_of(op: &FileOp) -> Option<&str> {
    match op {
        FileOp::Write { file, .. }
        | FileOp::Punch { file, .. }
        | FileOp::SetLen { file, .. }
        | FileOp::Sync { file }
        | FileOp::Replace { file, .. }
        | FileOp::Remove { file } => Some(file),
        FileOp::Event(_) => None,
    }
}

/// The pages an operation changes.
fn pages(op: &FileOp) -> std::ops::Range<u64> {
    match op {
        FileOp::Write { offset, data, .. } if !data.is_empty() => {
            offset / PAGE..(offset + data.len() as u64).div_ceil(PAGE)
        }
        FileOp::Punch { offset, len, .. } if *len > 0 => {
            offset / PAGE..(offset + len).div_ceil(PAGE)
        }
        _ => 0..0,
    }
}

/// Applies `op` to `files`; with `page`, only its part in that page.
fn apply(files: &mut Files, op: &FileOp, page: Option<u64>) {
    let clip = |start: u64, end: u64| match page {
        None => (start, end),
        Some(p) => (start.max(p * PAGE), end.min((p + 1) * PAGE)),
    };
    match op {
        FileOp::Write { file, offset, data } => {
            let (s, e) = clip(*offset, offset + data.len() as u64);
            if s < e {
                files.write(file, s, &data[(s - offset) as usize..(e - offset) as usize]);
            }
        }
        FileOp::Punch { file, offset, len } => {
            let (s, e) = clip(*offset, offset + len);
            files.punch(file, s, e);
        }
        FileOp::SetLen { file, len } => files.set_len(file, *len),
        FileOp::Replace { file, data } => files.replace(file, data),
        FileOp::Remove { file } => files.remove(file),
        FileOp::Sync { .. } | FileOp::Event(_) => {}
    }
}

/// The files after a crash of the process at the end of `ops`.
pub fn process_crash(base: &Files, ops: &[FileOp]) -> Files {
    let mut files = base.clone();
    for op in ops {
        apply(&mut files, op, None);
    }
    files
}

/// One state a crash of the host at the end of `ops` may leave; `rng`
/// makes the choices.
pub fn host_crash(base: &Files, ops: &[FileOp], rng: &mut impl FnMut() -> u64) -> Files {
    let mut last_sync: HashMap<&str, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let FileOp::Sync { file } = op {
            last_sync.insert(file, i);
        }
    }
    let durable = |i: usize, f: &str| last_sync.get(f).is_some_and(|&s| i < s);
    // Per (file, page): how many changes since the file's last sync, and
    // how many of them the crash keeps.
    let mut since: HashMap<(&str, u64), u64> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let Some(f) = file_of(op)
            && !durable(i, f)
        {
            for p in pages(op) {
                *since.entry((f, p)).or_default() += 1;
            }
        }
    }
    let mut keep: HashMap<(&str, u64), u64> = HashMap::new();
    for (&k, &n) in &since {
        // Mostly all or nothing (what writeback does to a page most of the
        // time), sometimes a point in between.
        let kept = match rng() % 4 {
            0 => 0,
            1 => n,
            _ => rng() % (n + 1),
        };
        keep.insert(k, kept);
    }
    let mut seen: HashMap<(&str, u64), u64> = HashMap::new();
    let mut files = base.clone();
    for (i, op) in ops.iter().enumerate() {
        let Some(f) = file_of(op) else { continue };
        match op {
            FileOp::Replace { .. } => apply(&mut files, op, None),
            FileOp::Remove { .. } | FileOp::SetLen { .. } => {
                if durable(i, f) || rng().is_multiple_of(2) {
                    apply(&mut files, op, None);
                }
            }
            FileOp::Sync { .. } => {}
            _ if durable(i, f) => apply(&mut files, op, None),
            _ => {
                for p in pages(op) {
                    let n = seen.entry((f, p)).or_default();
                    if *n < keep[&(f, p)] {
                        apply(&mut files, op, Some(p));
                    }
                    *n += 1;
                }
            }
        }
    }
    files
}

/// The files after a crash of the host at the end of `ops` in which, of
/// the changes since each file's last sync, those of the files `keep`
/// names all reached the disk and the others' none.
pub fn crash_keeping(base: &Files, ops: &[FileOp], keep: impl Fn(&str) -> bool) -> Files {
    let mut last_sync: HashMap<&str, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let FileOp::Sync { file } = op {
            last_sync.insert(file, i);
        }
    }
    let mut files = base.clone();
    for (i, op) in ops.iter().enumerate() {
        let Some(f) = file_of(op) else { continue };
        let durable = last_sync.get(f).is_some_and(|&s| i < s);
        if durable || keep(f) || matches!(op, FileOp::Replace { .. }) {
            apply(&mut files, op, None);
        }
    }
    files
}

/// Writes `files` into `dir` (which must not hold a cache yet), with
/// their holes.
pub fn materialize(files: &Files, dir: &Path) {
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    for (name, data) in &files.data {
        let f = std::fs::File::create(dir.join(name)).unwrap();
        f.set_len(data.len() as u64).unwrap();
        for &p in files.alloc.get(name).into_iter().flatten() {
            let s = (p * PAGE) as usize;
            let e = (s + PAGE as usize).min(data.len());
            if s < e {
                std::os::unix::fs::FileExt::write_all_at(&f, &data[s..e], s as u64).unwrap();
            }
        }
    }
}

/// The files of the cache in `dir` as they are now.
pub fn read_dir(dir: &Path) -> Files {
    let mut files = Files::default();
    let mut names: Vec<String> = ["image", "state", "trace", "synced"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Ok(rd) = std::fs::read_dir(dir.join("manifests")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.ends_with(".tmp") {
                names.push(format!("manifests/{n}"));
            }
        }
    }
    for name in names {
        let Ok(f) = std::fs::File::open(dir.join(&name)) else {
            continue;
        };
        let data = std::fs::read(dir.join(&name)).unwrap();
        let extents = fetcher::local::sparse::data_extents(&f, data.len() as u64).unwrap();
        files.set_len(&name, data.len() as u64);
        for r in extents {
            files.write(&name, r.start, &data[r.start as usize..r.end as usize]);
        }
    }
    files
}

#[test]
fn host_crash_keeps_what_was_synced_and_tears_the_rest_by_page() {
    let w = |off: u64, byte: u8, len: usize| FileOp::Write {
        file: "f".into(),
        offset: off,
        data: vec![byte; len],
    };
    let ops = vec![
        w(0, 1, 8192),
        FileOp::Sync { file: "f".into() },
        w(0, 2, 8192),
        w(4096, 3, 4096),
    ];
    let base = Files::default();
    assert_eq!(process_crash(&base, &ops).get("f").unwrap()[4096], 3);
    let mut seen = std::collections::BTreeSet::new();
    let mut x = 1u64;
    for _ in 0..200 {
        let s = host_crash(&base, &ops, &mut || {
            x = super::splitmix(x);
            x
        });
        let f = s.get("f").unwrap();
        assert!(
            f[0] == 1 || f[0] == 2,
            "page 0 holds the synced or the later write"
        );
        assert!([1, 2, 3].contains(&f[4096]));
        seen.insert((f[0], f[4096]));
    }
    // Every combination a page-wise writeback can leave, and only those.
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    );
}
