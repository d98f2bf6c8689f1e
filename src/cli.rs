//! Command-line syntax.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Internet Suspend/Resume for virtual-machine disks.
#[derive(Debug, Parser)]
#[command(name = "isr", version, about, after_help = crate::output::EXIT_STATUS_HELP)]
pub struct Cli {
    /// No progress bars and no informational notes on stderr: only
    /// warnings and errors (results still go to stdout).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new secret key file (32 random bytes, mode 0600).
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        keyfile: PathBuf,
        /// Print one JSON object ({"key_file": PATH}) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Import a disk image (raw; qcow2, vmdk, vhdx via qemu-img; a regular
    /// file or a block device) as the next version of a parcel.
    Import(ImportArgs),
    /// Write a version of a parcel's disk to a new file (sparse), or with
    /// --force over an existing file or a block device.
    Export(ExportArgs),
    /// Check that every chunk of a version exists and decodes.
    Verify(VerifyArgs),
    /// List a parcel's versions.
    Log(LogArgs),
    /// Fetch every chunk of a parcel into the local cache (to work offline).
    Hoard(HoardArgs),
    /// Verify a parcel's local cache against its manifest (every cached
    /// chunk re-hashed, the map and the image's size checked); damaged
    /// chunks are dropped, to be fetched again. Exits 1 if it found damage.
    Check(HoardArgs),
    /// Publish a parcel's local cache (its base version and local changes)
    /// as version 1 of a new parcel, and move the cache to it: keeps the
    /// work of a session that was fenced (its lease was stolen) or is in
    /// conflict.
    Fork(ForkArgs),
    /// Present a parcel's disk as a block device (/dev/ublkbN) on this host.
    Resume(ResumeArgs),
    /// Resume a parcel and start its VM in QEMU on the device, restoring the
    /// version's memory image when it has one (else a cold boot).
    Run(RunArgs),
    /// Drain, flush, publish the new version, release the parcel and remove
    /// its block device. A VM started by `isr run` is stopped, its memory
    /// saved and published with the disk, and QEMU quit first.
    Suspend(SuspendArgs),
    /// Upload a resumed parcel's dirty chunks while its device keeps
    /// serving, without publishing a version: the next suspend then uploads
    /// only what changed since.
    Sync(SyncArgs),
    /// Publish the work of a parcel suspended with `--offline` (or whose
    /// suspend could not reach the store): its local changes become the
    /// next version, and its lease is released.
    Checkin(CheckinArgs),
    /// Show a resumed parcel's device, cache, rates, lease and VM; without
    /// a name, every parcel resumed on this host.
    Status(StatusArgs),
    /// Reattach a resumed parcel's device after its daemon died.
    Recover(NameArgs),
    /// List every parcel of a store: HEAD, versions, disk size, memory
    /// image, and who holds its lease (sizes and memory images need the key).
    Ls(LsArgs),
    /// Publish an older version's content (disk, memory image, settings)
    /// as the parcel's next version.
    Rollback(RollbackArgs),
    /// Drop this host's unpublished changes to a parcel: its cache goes
    /// back to the version it is based on, and the lease it holds is
    /// released.
    Discard(DiscardArgs),
    /// Remove each parcel's versions older than its last N, and every chunk
    /// that no kept version names (see the README for the safety rules).
    Gc(GcArgs),
}

impl Command {
    /// Whether the command was asked for JSON output (`--json`).
    pub fn json(&self) -> bool {
        match self {
            Command::Keygen { json, .. } => *json,
            Command::Import(a) => a.json,
            Command::Export(a) => a.json,
            Command::Verify(a) => a.json,
            Command::Log(a) => a.json,
            Command::Hoard(a) | Command::Check(a) => a.json,
            Command::Fork(a) => a.cache.json,
            Command::Resume(a) => a.json,
            Command::Run(a) => a.json,
            Command::Suspend(a) => a.json,
            Command::Sync(a) => a.json,
            Command::Checkin(a) => a.json,
            Command::Status(a) => a.json,
            Command::Recover(a) => a.json,
            Command::Ls(a) => a.json,
            Command::Rollback(a) => a.json,
            Command::Discard(a) => a.json,
            Command::Gc(a) => a.json,
        }
    }
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Stay attached (serve the device from this process) instead of
    /// returning once the device is up.
    #[arg(long)]
    pub foreground: bool,
    /// Also fetch the version's memory image (every chunk verified) into
    /// this file before returning, for a hypervisor to restore; a version
    /// without one is reported and no file is written.
    #[arg(long, value_name = "FILE")]
    pub memory_out: Option<PathBuf>,
    /// Also serve the guest's RAM, of this many MiB, as a second device:
    /// the version's RAM image, fetched as it is read (zeros where the
    /// version has none), for a hypervisor to map as the VM's memory; a
    /// suspend publishes what the VM changed in it (`isr run` does this).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    pub ram_mib: Option<u32>,
    /// (internal) the RAM device starts as zeros (a cold boot).
    #[arg(long, hide = true)]
    pub ram_zero: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// (internal) report readiness on stdout for the launching process.
    #[arg(long, hide = true)]
    pub daemon: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Boot afresh even if the version has a memory image.
    #[arg(long)]
    pub cold: bool,
    /// Guest RAM in MiB (default: the version's recorded setting, else 1024).
    #[arg(long)]
    pub memory_mib: Option<u32>,
    /// Virtual CPUs (default: the version's recorded setting, else 1).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// The QEMU binary.
    #[arg(long, env = "ISR_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Keep the VM's RAM in QEMU (anonymous memory), saved whole as a
    /// migration stream at suspend and loaded whole at the next run,
    /// instead of on a RAM device of the parcel (fetched as the VM touches
    /// it; a suspend sends what changed). Versions saved this way restore
    /// this way.
    #[arg(long)]
    pub stream_memory: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// QEMU's further arguments (the machine, devices; default: the
    /// version's recorded ones, else `-machine pc`); isr adds the disk,
    /// memory, CPUs, a QMP socket, and (unless given) the accelerator, no
    /// display and the serial console to a file.
    #[arg(last = true, value_name = "QEMU-ARGS")]
    pub qemu_args: Vec<String>,
}

/// How a resumed parcel's device and cache behave.
#[derive(Debug, Args, Clone)]
pub struct DeviceArgs {
    /// Root of the local caches (default: /var/lib/isr as root, else
    /// $XDG_CACHE_HOME/isr).
    #[arg(long, env = "ISR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Break another holder's lease on the parcel.
    #[arg(long)]
    pub steal: bool,
    /// Seconds a read of a chunk not yet fetched waits for the store.
    #[arg(long, default_value_t = 600)]
    pub miss_timeout: u64,
    /// Do not prefetch in the background (fetch on demand only).
    #[arg(long)]
    pub no_prefetch: bool,
    /// Work from the local cache without contacting the store (after `isr
    /// hoard`, or a suspend with --offline). Without it, a store that cannot
    /// be reached while a cache exists also means working offline; the
    /// daemon reconnects by itself when the store is back.
    #[arg(long)]
    pub offline: bool,
    /// Upload dirty chunks in the background (as `isr sync` does) whenever
    /// the device has been idle for this many seconds.
    #[arg(long, value_name = "SECS")]
    pub trickle: Option<u64>,
    /// Cap the daemon's chunk transfers (fetch, prefetch, trickle,
    /// suspend), each way: 10M = 10 MB/s; K, M, G (powers of 1000) or
    /// KiB, MiB, GiB.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
}

#[derive(Debug, Args)]
pub struct SuspendArgs {
    /// The parcel's name.
    pub parcel: String,
    /// Publish this saved VM state file (from any hypervisor: QEMU's
    /// `migrate` to a file, `virsh save`) as the version's memory image.
    /// Without it, a VM started by `isr run` is saved through QMP.
    #[arg(long, value_name = "FILE")]
    pub memory: Option<PathBuf>,
    /// Flush and remove the device but publish nothing and keep the lease
    /// and every local change, without the network (`isr checkin` publishes
    /// later; `isr resume` works on from the cache).
    #[arg(long)]
    pub offline: bool,
    /// Cap the upload at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The parcel's name.
    pub parcel: String,
    /// Cap the upload at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckinArgs {
    /// The parcel's name.
    pub parcel: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The secret key file (see `isr keygen`).
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: PathBuf,
    /// Root of the local caches (default: /var/lib/isr as root, else
    /// $XDG_CACHE_HOME/isr).
    #[arg(long, env = "ISR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Cap the upload at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Take the parcel's lease over from a live holder instead of refusing
    /// (see `import --steal`): the check-in's own publish fences it.
    #[arg(long)]
    pub steal: bool,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The parcel's name.
    pub parcel: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The parcel's name (default: every parcel resumed on this host).
    pub parcel: Option<String>,
    /// Print one JSON object (without a name: an array) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where the parcel is and how to open it.
#[derive(Debug, Args)]
pub struct ParcelArgs {
    /// Store URL: file:///path, s3://bucket/prefix, http(s)://mirror, memory://.
    #[arg(long, env = "ISR_STORE")]
    pub store: String,
    /// S3 endpoint (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// Parcel name.
    #[arg(long)]
    pub parcel: String,
    /// The secret key file (see `isr keygen`).
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: PathBuf,
    /// Seconds to keep retrying a store that fails transiently (timeouts,
    /// 5xx, refused connections), with exponential backoff.
    #[arg(long, env = "ISR_RETRY_TIMEOUT", default_value_t = 60)]
    pub retry_timeout: u64,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    fetcher::parse_rate(s)
}

/// Where the store is (for the commands on a whole store, or on a parcel
/// named by an argument).
#[derive(Debug, Args, Clone)]
pub struct StoreArgs {
    /// Store URL: file:///path, s3://bucket/prefix, http(s)://mirror, memory://.
    #[arg(long, env = "ISR_STORE")]
    pub store: String,
    /// S3 endpoint (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// Seconds to keep retrying a store that fails transiently (timeouts,
    /// 5xx, refused connections), with exponential backoff.
    #[arg(long, env = "ISR_RETRY_TIMEOUT", default_value_t = 60)]
    pub retry_timeout: u64,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The secret key file; without it, what needs no key is shown (HEAD,
    /// versions, leases), not disk sizes or memory images.
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The parcel's name.
    pub parcel: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The secret key file (see `isr keygen`).
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: PathBuf,
    /// The version whose content becomes the next version.
    #[arg(long, value_name = "N")]
    pub to: u64,
    /// Take the parcel's lease over from a live holder instead of refusing
    /// (see `import --steal`).
    #[arg(long)]
    pub steal: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// The parcel's name.
    pub parcel: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Root of the local caches (default: /var/lib/isr as root, else
    /// $XDG_CACHE_HOME/isr).
    #[arg(long, env = "ISR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Do not ask (needed when there is no terminal to ask on).
    #[arg(long)]
    pub yes: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The secret key file: it must open every parcel of the store.
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: PathBuf,
    /// Versions to keep per parcel (HEAD and the N-1 before it).
    #[arg(long, value_name = "N")]
    pub keep: u64,
    /// Seconds: an unreferenced chunk younger than this is kept (it may
    /// belong to a publish under way). Must exceed the chunk refresh age
    /// (6 h, or ISR_CHUNK_REFRESH_SECS).
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub grace: u64,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The image to import.
    pub image: PathBuf,
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Chunk size of a new parcel (64K to 4M, a power of two).
    #[arg(long, value_parser = parse_chunk_size)]
    pub chunk_size: Option<u32>,
    /// Allow the new version's disk size to differ from HEAD's (without it,
    /// an image of another size is refused).
    #[arg(long)]
    pub resize: bool,
    /// Take the parcel's lease over from a live holder (elsewhere, or a
    /// process on this host) instead of refusing; its session's next
    /// publish then fails and its changes stay in its cache. A holder that
    /// died on this host having left nothing behind (an import, a
    /// rollback) is taken over without it.
    #[arg(long)]
    pub steal: bool,
    /// Cap the upload at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Version to export (default: HEAD).
    #[arg(long)]
    pub version: Option<u64>,
    /// Output file or block device. A symbolic link is followed to the file
    /// it names; a character device, FIFO, socket or directory is refused.
    pub out: PathBuf,
    /// Replace an existing file, or write over a block device (which must
    /// be at least as large as the disk). Without it, export writes only a
    /// new file.
    #[arg(long)]
    pub force: bool,
    /// Cap the transfer at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Version to verify (default: HEAD).
    #[arg(long)]
    pub version: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Print a JSON array instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HoardArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Root of the local caches (default: /var/lib/isr as root, else
    /// $XDG_CACHE_HOME/isr).
    #[arg(long, env = "ISR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Cap the transfer at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    #[command(flatten)]
    pub cache: HoardArgs,
    /// Name of the new parcel (it must not exist).
    #[arg(long)]
    pub to: String,
}

/// Parses `262144`, `256K`, `256k`, `1M`, `4MiB`.
/// A chunk size: a size that is a power of two from 64 KiB to 4 MiB.
fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    format::Geometry::new(0, n)
        .map(|_| n)
        .map_err(|e| e.to_string().replace("invalid geometry: ", ""))
}

fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K or M)")),
    };
    n.checked_mul(mult)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_say_what_is_wrong() {
        assert_eq!(parse_chunk_size("256K"), Ok(256 * 1024));
        let big = parse_chunk_size("8M").unwrap_err();
        assert!(big.contains("outside 64 KiB to 4 MiB"), "{big}");
        assert!(!big.contains("power of two"), "{big}");
        let odd = parse_chunk_size("100K").unwrap_err();
        assert!(odd.contains("not a power of two"), "{odd}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256K"), Ok(256 * 1024));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("1G").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999M").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
