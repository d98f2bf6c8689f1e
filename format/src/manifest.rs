//! The manifest: one immutable, encrypted, authenticated object per parcel
//! version. It is the *continuation*: everything needed to resume anywhere.
//!
//! # Layout (format version 1), integers little-endian
//!
//! ```text
//! clear header (36 bytes, authenticated as associated data):
//!    0  4  magic "ISRm"
//!    4  2  format version (1)
//!    6  2  flags (0)
//!    8 16  key fingerprint (tells a wrong key from a corrupt object)
//!   24 12  nonce = keyed_hash(manifest key, version ‖ parcel ‖ body)[..12]
//! then AES-256-GCM(body) and its 16-byte tag. The associated data is the
//! header, the version number and the parcel name, so a manifest cannot be
//! replayed as another version or another parcel.
//!
//! body:
//!   disk size u64, chunk size u32, parent version u64 (0: none),
//!   created (Unix seconds) i64, host (u16 length + UTF-8, ≤ 255 bytes)
//!   disk chunk table          (runs, below)
//!   memory-image size u64, memory chunk table (runs)
//!   access trace: varint count, then zigzag varint deltas of chunk indices
//!   extensions: varint count, then (varint tag, varint length, bytes);
//!     tag 2: the 16-byte id of the cache that published the version
//!     tag 4: the VM's settings (see [`VmSettings`]): varint memory MiB,
//!            varint vCPUs, varint save format (0 a QEMU migration stream,
//!            1 QEMU mapped-ram, 2 RAM served from a device: see tag 5),
//!            varint argument count, then each argument as varint length +
//!            UTF-8
//!     tag 5: the guest's RAM as an image of its own (see [`RamImage`];
//!            odd: the memory image is then only the device state, which
//!            an older reader must not take for a whole save): size u64,
//!            chunk table (runs), access trace (as the disk's), writer id
//!            (u8 0, or 1 and 16 bytes)
//!     tag 7: the memory image cut by content (see [`crate::cdc`]; odd: an
//!            older reader would take its chunks for fixed ones): varint
//!            chunk count n, n varint chunk lengths (1 to the chunk size
//!            each), the memory chunk table (runs over n entries); the
//!            body's memory-image size is then 0 and its table empty
//!
//! a chunk table is a sequence of runs covering exactly ⌈size / chunk size⌉
//! entries; a run is a varint h with n = h >> 1 ≥ 1 entries:
//!   h & 1 == 0: n all-zero chunks (nothing stored)
//!   h & 1 == 1: n chunks, each followed by its 32-byte key
//! ```
//!
//! A sparse 64 GiB disk of zeros is one run: the whole manifest is ~70 bytes.
//!
//! # Compatibility policy
//!
//! * A reader decodes every format version up to its own and refuses a newer
//!   one with [`Error::UnsupportedVersion`] — never a guess.
//! * New information goes into extensions first. An extension with an even
//!   tag is optional: an older reader skips it. An odd tag changes the meaning
//!   of what is there: an older reader refuses the manifest with
//!   [`Error::UnsupportedFeature`]. Only a change that cannot be an extension
//!   bumps the format version.
//! * A writer writes the newest version it knows; a newer reader keeps
//!   decoding every older version (tests keep a version-1 object to prove it).

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};

use crate::wire::{Reader, Writer};
use crate::{ChunkKey, Error, Geometry, Layout, MAX_CHUNKS, Secret};

const MAGIC: &[u8; 4] = b"ISRm";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 36;
const TAG_LEN: usize = 16;
const WHAT: &str = "manifest";
/// Extension: the 16-byte id of the cache that wrote the version (optional).
const EXT_WRITER: u64 = 2;
/// Extension: the VM's settings (optional: an older reader still has the disk).
const EXT_VM: u64 = 4;
/// Extension: the guest's RAM image (must be understood: without it the
/// memory image is not a whole save).
const EXT_RAM: u64 = 5;
/// Extension: the memory image's chunks cut by content (must be
/// understood: an older reader would misplace every chunk).
const EXT_MEMORY_CUT: u64 = 7;
/// Most hypervisor arguments a manifest records, and the longest one.
pub const MAX_VM_ARGS: usize = 512;
/// Longest hypervisor argument a manifest records.
pub const MAX_VM_ARG_LEN: usize = 4096;
/// Longest host name a manifest records.
pub const MAX_HOST_LEN: usize = 255;
/// Largest manifest object a reader accepts: the largest chunk table
/// (32 bytes per chunk) plus the largest access trace, with room to spare.
pub const MAX_MANIFEST_BYTES: u64 = 2 * 40 * MAX_CHUNKS + (1 << 20);

/// One chunk of the disk or memory image, as a version records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkEntry {
    /// All zeros; not stored.
    Zero,
    /// Stored under this key's object name.
    Data(ChunkKey),
}

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Size of the disk in bytes.
    pub disk_size: u64,
    /// Chunk size of the parcel.
    pub chunk_size: u32,
    /// One entry per chunk of the disk.
    pub chunks: Vec<ChunkEntry>,
    /// Size of the memory image in bytes (0: none).
    pub memory_size: u64,
    /// One entry per chunk of the memory image.
    pub memory_chunks: Vec<ChunkEntry>,
    /// The length of each chunk of the memory image when it was cut by
    /// content (extension 7); empty: fixed chunks of `chunk_size`.
    pub memory_lengths: Vec<u32>,
    /// The version this one was made from.
    pub parent: Option<u64>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: i64,
    /// Host that created this version.
    pub host: String,
    /// Disk chunk indices in the order the writing session first touched them.
    pub access_trace: Vec<u64>,
    /// The cache that published this version (extension 2, optional): lets
    /// that cache recognise its own publish after a crash.
    pub writer: Option<[u8; 16]>,
    /// How to rebuild the VM on another host (extension 4, optional).
    pub vm: Option<VmSettings>,
    /// The guest's RAM, an image of its own that a device serves to the
    /// hypervisor lazily (extension 5); the memory image then holds the
    /// device state only.
    pub ram: Option<RamImage>,
}

/// The guest's RAM as a version records it: chunked like the disk, over
/// the same chunk size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamImage {
    /// Size in bytes (the VM's memory).
    pub size: u64,
    /// One entry per chunk.
    pub chunks: Vec<ChunkEntry>,
    /// Chunk indices in the order the session that wrote the version first
    /// touched them (the working set a restored VM needs first).
    pub access_trace: Vec<u64>,
    /// The RAM cache that published the version.
    pub writer: Option<[u8; 16]>,
}

/// How the VM that uses the disk (and memory image) is run: enough for the
/// next host to rebuild the same virtual hardware, which restoring a memory
/// image needs. Host paths (the disk's device, sockets) are not recorded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmSettings {
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Layout of the memory image.
    pub save_format: SaveFormat,
    /// The hypervisor's further arguments (QEMU's, beyond the disk, the
    /// memory and the CPUs), as given.
    pub args: Vec<String>,
}

/// Layout of a memory image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveFormat {
    /// A QEMU migration stream (`migrate` to `exec:`/`file:`), or any
    /// hypervisor's own state file.
    #[default]
    Stream,
    /// QEMU's mapped-ram layout (QEMU 9+): each RAM page at a fixed offset.
    MappedRam,
    /// The guest's RAM is [`Manifest::ram`], mapped by the hypervisor from
    /// a block device; the memory image is a migration stream of the
    /// device state alone (QEMU's `x-ignore-shared`).
    SharedRam,
}

impl Manifest {
    /// A manifest for a disk of `disk_size` bytes whose chunks are all zero.
    pub fn empty(geometry: Geometry) -> Self {
        Manifest {
            disk_size: geometry.disk_size(),
            chunk_size: geometry.chunk_size(),
            chunks: vec![ChunkEntry::Zero; geometry.chunk_count() as usize],
            memory_size: 0,
            memory_chunks: Vec::new(),
            memory_lengths: Vec::new(),
            parent: None,
            created_unix: 0,
            host: String::new(),
            access_trace: Vec::new(),
            writer: None,
            vm: None,
            ram: None,
        }
    }

    /// The version as the engine of its RAM sees it: the RAM image of
    /// `size` bytes in the place of the disk (its table, trace and writer),
    /// and no memory image. A version without a RAM image of that size
    /// gives RAM of zeros.
    pub fn ram_view(&self, size: u64) -> Result<Manifest, Error> {
        let g = Geometry::new(size, self.chunk_size)?;
        let (chunks, access_trace, writer) = match &self.ram {
            Some(r) if r.size == size => (r.chunks.clone(), r.access_trace.clone(), r.writer),
            _ => (
                vec![ChunkEntry::Zero; g.chunk_count() as usize],
                Vec::new(),
                None,
            ),
        };
        Ok(Manifest {
            disk_size: size,
            chunk_size: self.chunk_size,
            chunks,
            memory_size: 0,
            memory_chunks: Vec::new(),
            memory_lengths: Vec::new(),
            parent: self.parent,
            created_unix: self.created_unix,
            host: self.host.clone(),
            access_trace,
            writer,
            vm: self.vm.clone(),
            ram: None,
        })
    }

    /// Where each chunk of the memory image lies (size 0: none).
    pub fn memory_layout(&self) -> Layout {
        if self.memory_lengths.is_empty() {
            Layout::Fixed(
                Geometry::new(self.memory_size, self.chunk_size)
                    .expect("validated when built or decoded"),
            )
        } else {
            Layout::cut(&self.memory_lengths, self.chunk_size)
                .expect("validated when built or decoded")
        }
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.disk_size, self.chunk_size).expect("validated when built or decoded")
    }

    /// Encrypts the manifest as version `version` of `parcel`.
    pub fn encode(&self, secret: &Secret, parcel: &str, version: u64) -> Result<Vec<u8>, Error> {
        self.validate()?;
        let mut body = self.encode_body();

        let key = secret.manifest_key();
        let mut hasher = blake3::Hasher::new_keyed(key);
        hasher.update(&version.to_le_bytes());
        hasher.update(parcel.as_bytes());
        hasher.update(&body);
        let nonce: [u8; 12] = hasher.finalize().as_bytes()[..12]
            .try_into()
            .expect("12 of 32 bytes");

        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(MAGIC);
        header[4..6].copy_from_slice(&VERSION.to_le_bytes());
        header[8..24].copy_from_slice(secret.fingerprint());
        header[24..36].copy_from_slice(&nonce);
        let aad = associated_data(&header, parcel, version);
        let tag = cipher(key)
            .encrypt_inout_detached(&Nonce::from(nonce), &aad, body.as_mut_slice().into())
            .expect("AES-GCM encrypts any manifest-sized message");
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Authenticates and decodes version `version` of `parcel`.
    pub fn decode(
        object: &[u8],
        secret: &Secret,
        parcel: &str,
        version: u64,
    ) -> Result<Manifest, Error> {
        if object.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::TooLarge {
                what: WHAT,
                size: object.len() as u64,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        if object.len() < HEADER_LEN + TAG_LEN {
            return Err(Error::Truncated {
                what: WHAT,
                need: (HEADER_LEN + TAG_LEN) as u64,
                have: object.len() as u64,
            });
        }
        let (header, rest) = object.split_at(HEADER_LEN);
        if &header[0..4] != MAGIC {
            return Err(Error::BadMagic { what: WHAT });
        }
        let format_version = u16::from_le_bytes([header[4], header[5]]);
        if format_version != VERSION {
            return Err(Error::UnsupportedVersion {
                what: WHAT,
                found: format_version as u32,
                supported: VERSION as u32,
            });
        }
        if header[6..8] != [0, 0] {
            return Err(Error::UnsupportedFeature {
                what: WHAT,
                feature: u16::from_le_bytes([header[6], header[7]]) as u64,
            });
        }
        // A fingerprint mismatch means another key; a match with a bad tag
        // means the object was damaged. (A flipped fingerprint bit reads as a
        // wrong key; either way nothing unauthenticated is used.)
        if header[8..24] != secret.fingerprint()[..] {
            return Err(Error::WrongKey { what: WHAT });
        }
        let nonce: [u8; 12] = header[24..36].try_into().expect("12 bytes");
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut body = ciphertext.to_vec();
        cipher(secret.manifest_key())
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                &associated_data(header, parcel, version),
                body.as_mut_slice().into(),
                &Tag::try_from(tag).expect("16-byte tag"),
            )
            .map_err(|_| Error::AuthFailed { what: WHAT })?;
        decode_body(&body)
    }

    fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64 + 33 * self.chunks.len()));
        w.u64(self.disk_size);
        w.u32(self.chunk_size);
        w.u64(self.parent.unwrap_or(0));
        w.i64(self.created_unix);
        w.u16(self.host.len() as u16);
        w.bytes(self.host.as_bytes());
        write_table(&mut w, &self.chunks);
        let cut = !self.memory_lengths.is_empty();
        w.u64(if cut { 0 } else { self.memory_size });
        write_table(&mut w, if cut { &[] } else { &self.memory_chunks });
        write_trace(&mut w, &self.access_trace);
        let mut extensions: Vec<(u64, Vec<u8>)> = Vec::new();
        if cut {
            let mut v = Writer(Vec::with_capacity(36 * self.memory_lengths.len()));
            v.varint(self.memory_lengths.len() as u64);
            for &l in &self.memory_lengths {
                v.varint(l.into());
            }
            write_table(&mut v, &self.memory_chunks);
            extensions.push((EXT_MEMORY_CUT, v.0));
        }
        if let Some(id) = &self.writer {
            extensions.push((EXT_WRITER, id.to_vec()));
        }
        if let Some(vm) = &self.vm {
            let mut v = Writer(Vec::new());
            v.varint(vm.memory_mib.into());
            v.varint(vm.cpus.into());
            v.varint(match vm.save_format {
                SaveFormat::Stream => 0,
                SaveFormat::MappedRam => 1,
                SaveFormat::SharedRam => 2,
            });
            v.varint(vm.args.len() as u64);
            for a in &vm.args {
                v.varint(a.len() as u64);
                v.bytes(a.as_bytes());
            }
            extensions.push((EXT_VM, v.0));
        }
        if let Some(ram) = &self.ram {
            let mut v = Writer(Vec::with_capacity(32 + 33 * ram.chunks.len()));
            v.u64(ram.size);
            write_table(&mut v, &ram.chunks);
            write_trace(&mut v, &ram.access_trace);
            match &ram.writer {
                Some(id) => {
                    v.bytes(&[1]);
                    v.bytes(id);
                }
                None => v.bytes(&[0]),
            }
            extensions.push((EXT_RAM, v.0));
        }
        w.varint(extensions.len() as u64);
        for (tag, value) in extensions {
            w.varint(tag);
            w.varint(value.len() as u64);
            w.bytes(&value);
        }
        w.0
    }

    fn validate(&self) -> Result<(), Error> {
        let g = check_table("disk", &self.chunks, self.disk_size, self.chunk_size)?;
        if self.memory_lengths.is_empty() {
            check_table(
                "memory image",
                &self.memory_chunks,
                self.memory_size,
                self.chunk_size,
            )?;
        } else {
            let layout = Layout::cut(&self.memory_lengths, self.chunk_size)?;
            if layout.size() != self.memory_size
                || layout.chunk_count() != self.memory_chunks.len() as u64
            {
                return Err(Error::malformed(
                    WHAT,
                    format!(
                        "{} memory chunk entries of {} bytes for {} lengths of {} bytes",
                        self.memory_chunks.len(),
                        self.memory_size,
                        self.memory_lengths.len(),
                        layout.size()
                    ),
                ));
            }
        }
        if self.host.len() > MAX_HOST_LEN {
            return Err(Error::TooLarge {
                what: "host name",
                size: self.host.len() as u64,
                limit: MAX_HOST_LEN as u64,
            });
        }
        if self.access_trace.len() as u64 > g.chunk_count() {
            return Err(Error::malformed(WHAT, "access trace longer than the disk"));
        }
        if let Some(&bad) = self.access_trace.iter().find(|&&c| c >= g.chunk_count()) {
            return Err(Error::malformed(
                WHAT,
                format!("access trace names chunk {bad} past the end of the disk"),
            ));
        }
        if self.parent == Some(0) {
            return Err(Error::malformed(WHAT, "parent version 0 does not exist"));
        }
        if let Some(vm) = &self.vm {
            check_vm_args(vm.args.len(), vm.args.iter().map(String::len))?;
        }
        if let Some(ram) = &self.ram {
            let g = check_table("RAM image", &ram.chunks, ram.size, self.chunk_size)?;
            if ram.access_trace.len() as u64 > g.chunk_count()
                || ram.access_trace.iter().any(|&c| c >= g.chunk_count())
            {
                return Err(Error::malformed(WHAT, "RAM access trace outside the RAM"));
            }
        }
        Ok(())
    }
}

/// The geometry of an image of `size` bytes, whose chunk table `entries`
/// must cover it exactly.
fn check_table(
    what: &str,
    entries: &[ChunkEntry],
    size: u64,
    chunk_size: u32,
) -> Result<Geometry, Error> {
    let g = Geometry::new(size, chunk_size)?;
    if entries.len() as u64 != g.chunk_count() {
        return Err(Error::malformed(
            WHAT,
            format!(
                "{} chunk entries for a {what} of {} chunks",
                entries.len(),
                g.chunk_count()
            ),
        ));
    }
    Ok(g)
}

fn associated_data(header: &[u8], parcel: &str, version: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 8 + parcel.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(&version.to_le_bytes());
    aad.extend_from_slice(parcel.as_bytes());
    aad
}

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key))
}

fn write_table(w: &mut Writer, entries: &[ChunkEntry]) {
    let mut i = 0;
    while i < entries.len() {
        let zero = entries[i] == ChunkEntry::Zero;
        let run = entries[i..]
            .iter()
            .take_while(|e| (**e == ChunkEntry::Zero) == zero)
            .count();
        w.varint(((run as u64) << 1) | u64::from(!zero));
        for e in &entries[i..i + run] {
            if let ChunkEntry::Data(key) = e {
                w.bytes(&key.0);
            }
        }
        i += run;
    }
}

fn write_trace(w: &mut Writer, trace: &[u64]) {
    w.varint(trace.len() as u64);
    let mut prev = 0i64;
    for &chunk in trace {
        let delta = chunk as i64 - prev;
        w.varint(((delta << 1) ^ (delta >> 63)) as u64);
        prev = chunk as i64;
    }
}

/// An access trace of an image of `count` chunks.
fn read_trace(r: &mut Reader, count: u64) -> Result<Vec<u64>, Error> {
    let trace_len = r.varint()?;
    if trace_len > count || trace_len > r.remaining() as u64 {
        return Err(Error::malformed(
            WHAT,
            format!("access trace of {trace_len} entries"),
        ));
    }
    let mut trace = Vec::with_capacity(trace_len as usize);
    let mut prev = 0i64;
    for _ in 0..trace_len {
        let z = r.varint()?;
        let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
        let chunk = prev.wrapping_add(delta);
        if chunk < 0 || chunk as u64 >= count {
            return Err(Error::malformed(
                WHAT,
                format!("access trace names chunk {chunk}, outside its image"),
            ));
        }
        trace.push(chunk as u64);
        prev = chunk;
    }
    Ok(trace)
}

fn read_table(r: &mut Reader, count: u64) -> Result<Vec<ChunkEntry>, Error> {
    // `count` is bounded by MAX_CHUNKS through Geometry::new.
    let mut entries = Vec::with_capacity(count.min(1 << 16) as usize);
    while (entries.len() as u64) < count {
        let h = r.varint()?;
        let run = h >> 1;
        if run == 0 || run > count - entries.len() as u64 {
            return Err(Error::malformed(
                WHAT,
                format!("chunk run of {run} at entry {} of {count}", entries.len()),
            ));
        }
        if h & 1 == 0 {
            entries.resize(entries.len() + run as usize, ChunkEntry::Zero);
        } else {
            if (r.remaining() as u64) < run * 32 {
                return Err(Error::malformed(WHAT, "chunk keys cut short"));
            }
            for _ in 0..run {
                entries.push(ChunkEntry::Data(ChunkKey(r.array()?)));
            }
        }
    }
    Ok(entries)
}

fn decode_body(body: &[u8]) -> Result<Manifest, Error> {
    let mut r = Reader::new(body, WHAT);
    let disk_size = r.u64()?;
    let chunk_size = r.u32()?;
    let geometry = Geometry::new(disk_size, chunk_size)?;
    let parent = match r.u64()? {
        0 => None,
        p => Some(p),
    };
    let created_unix = r.i64()?;
    let host_len = r.u16()? as usize;
    if host_len > MAX_HOST_LEN {
        return Err(Error::TooLarge {
            what: "host name",
            size: host_len as u64,
            limit: MAX_HOST_LEN as u64,
        });
    }
    let host = std::str::from_utf8(r.take(host_len)?)
        .map_err(|_| Error::malformed(WHAT, "host name is not UTF-8"))?
        .to_owned();
    let chunks = read_table(&mut r, geometry.chunk_count())?;
    let memory_size = r.u64()?;
    let memory = Geometry::new(memory_size, chunk_size)?;
    let memory_chunks = read_table(&mut r, memory.chunk_count())?;

    let access_trace = read_trace(&mut r, geometry.chunk_count())?;

    let extensions = r.varint()?;
    let mut writer = None;
    let mut vm = None;
    let mut ram = None;
    let mut memory_cut = None;
    for _ in 0..extensions {
        let tag = r.varint()?;
        let len = r.varint()?;
        let len = usize::try_from(len).map_err(|_| Error::malformed(WHAT, "extension length"))?;
        let value = r.take(len)?;
        match tag {
            EXT_WRITER => {
                writer =
                    Some(value.try_into().map_err(|_| {
                        Error::malformed(WHAT, format!("writer id of {len} bytes"))
                    })?);
            }
            EXT_VM => vm = Some(decode_vm(value)?),
            EXT_RAM => ram = Some(decode_ram(value, chunk_size)?),
            EXT_MEMORY_CUT if memory_size == 0 => {
                memory_cut = Some(decode_memory_cut(value, chunk_size)?);
            }
            EXT_MEMORY_CUT => {
                return Err(Error::malformed(
                    WHAT,
                    "a memory image both fixed and cut by content",
                ));
            }
            t if t & 1 == 1 => {
                return Err(Error::UnsupportedFeature {
                    what: WHAT,
                    feature: tag,
                });
            }
            _ => {} // optional, unknown to this reader: skipped
        }
    }
    if r.remaining() != 0 {
        return Err(Error::malformed(
            WHAT,
            format!("{} unexpected bytes after the end", r.remaining()),
        ));
    }
    let (memory_size, memory_chunks, memory_lengths) = match memory_cut {
        Some((size, table, lengths)) => (size, table, lengths),
        None => (memory_size, memory_chunks, Vec::new()),
    };
    Ok(Manifest {
        disk_size,
        chunk_size,
        chunks,
        memory_size,
        memory_chunks,
        memory_lengths,
        parent,
        created_unix,
        host,
        access_trace,
        writer,
        vm,
        ram,
    })
}

/// Extension 7: the memory image's size, chunk table and chunk lengths.
fn decode_memory_cut(
    value: &[u8],
    chunk_size: u32,
) -> Result<(u64, Vec<ChunkEntry>, Vec<u32>), Error> {
    let mut r = Reader::new(value, WHAT);
    let count = r.varint()?;
    // every length takes a byte at least: bounds the allocation
    if count > MAX_CHUNKS || count > r.remaining() as u64 {
        return Err(Error::malformed(
            WHAT,
            format!("{count} memory chunk lengths"),
        ));
    }
    let lengths = (0..count)
        .map(|_| {
            let l = r.varint()?;
            u32::try_from(l)
                .map_err(|_| Error::malformed(WHAT, format!("memory chunk of {l} bytes")))
        })
        .collect::<Result<Vec<u32>, Error>>()?;
    let size = Layout::cut(&lengths, chunk_size)?.size();
    let table = read_table(&mut r, count)?;
    if r.remaining() != 0 {
        return Err(Error::malformed(
            WHAT,
            "unexpected bytes after the memory chunk table",
        ));
    }
    Ok((size, table, lengths))
}

fn decode_ram(value: &[u8], chunk_size: u32) -> Result<RamImage, Error> {
    let mut r = Reader::new(value, WHAT);
    let size = r.u64()?;
    let g = Geometry::new(size, chunk_size)?;
    let chunks = read_table(&mut r, g.chunk_count())?;
    let access_trace = read_trace(&mut r, g.chunk_count())?;
    let writer = match r.take(1)?[0] {
        0 => None,
        1 => Some(r.array()?),
        b => return Err(Error::malformed(WHAT, format!("RAM writer flag {b}"))),
    };
    if r.remaining() != 0 {
        return Err(Error::malformed(
            WHAT,
            "unexpected bytes after the RAM image",
        ));
    }
    Ok(RamImage {
        size,
        chunks,
        access_trace,
        writer,
    })
}

fn check_vm_args(count: usize, mut lens: impl Iterator<Item = usize>) -> Result<(), Error> {
    if count > MAX_VM_ARGS {
        return Err(Error::TooLarge {
            what: "VM argument list",
            size: count as u64,
            limit: MAX_VM_ARGS as u64,
        });
    }
    if let Some(len) = lens.find(|&l| l > MAX_VM_ARG_LEN) {
        return Err(Error::TooLarge {
            what: "VM argument",
            size: len as u64,
            limit: MAX_VM_ARG_LEN as u64,
        });
    }
    Ok(())
}

fn decode_vm(value: &[u8]) -> Result<VmSettings, Error> {
    let mut r = Reader::new(value, WHAT);
    let small = |v: u64, what: &str| {
        u32::try_from(v).map_err(|_| Error::malformed(WHAT, format!("VM {what} {v}")))
    };
    let memory_mib = small(r.varint()?, "memory")?;
    let cpus = small(r.varint()?, "CPU count")?;
    let save_format = match r.varint()? {
        0 => SaveFormat::Stream,
        1 => SaveFormat::MappedRam,
        2 => SaveFormat::SharedRam,
        f => return Err(Error::malformed(WHAT, format!("memory image format {f}"))),
    };
    let count = r.varint()?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    check_vm_args(count, std::iter::empty())?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
        check_vm_args(0, std::iter::once(len))?;
        let arg = std::str::from_utf8(r.take(len)?)
            .map_err(|_| Error::malformed(WHAT, "VM argument is not UTF-8"))?;
        args.push(arg.to_owned());
    }
    if r.remaining() != 0 {
        return Err(Error::malformed(
            WHAT,
            "unexpected bytes after the VM settings",
        ));
    }
    Ok(VmSettings {
        memory_mib,
        cpus,
        save_format,
        args,
    })
}

#[cfg(test)]
mod tests;
