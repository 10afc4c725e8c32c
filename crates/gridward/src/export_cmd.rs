//! `gridward export`: stored readings for a third party (a researcher, a grid planner), and
//! `gridward export keygen`, the recipient's export key.
//!
//! Reads the store `serve` uses (through `--config` or `--db`), one meter at a time, and hands
//! the readings to `gridward-export`, which pseudonymises, coarsens, aggregates and writes; this
//! file is argument parsing, the store and the files only.

use std::io::{BufWriter, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use gridward_api::routes::export::meter_readings;
use gridward_core::MeterId;
use gridward_export::{
    Aggregation, DEFAULT_K, ExportKey, ExportSpec, Exporter, Groups, KEY_LEN, OutputFormat,
    Pseudonymiser, Resolution,
};
use gridward_store::{AlarmStore, Store};
use time::OffsetDateTime;

use crate::serve_cmd::{StoreArg, parse_time};

/// Meters from which on a progress line is shown on stderr.
const PROGRESS_FROM: usize = 100;

/// Readings for a third party: pseudonymised, coarsened, optionally aggregated.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "\
One row per meter and bucket: `kwh` is the energy consumed in the bucket (the increase of the \
cumulative register from the meter's last reading before the bucket to its last reading in it, \
so consumption between two readings counts in the bucket of the later one; rounded to 1 Wh). \
Buckets are [start, start + resolution) in UTC; --from and --to must be bucket boundaries. \
Without --pseudonymise the rows name the meter and carry its register (`register_kwh`).

--pseudonymise: meter ids become p-HEX, the first 16 bytes of HMAC-SHA-256(export key, \
\"gridward/export/v1\" || meter id); group names become g-HEX likewise; no register is \
exported (it would join exports). Give each recipient their own key (`gridward export keygen`): \
the same key gives the same pseudonyms in every export, another key unrelated ones, so two \
recipients cannot join their exports on pseudonyms. Whoever holds a key can check a guessed \
meter id against it: keys stay with the operators. Pseudonymised series can still be matched \
by their values; for recipients who must not single out a household, aggregate.

--group-by concentrator or --groups FILE: one row per group and bucket with the sum and the \
number of meters; an aggregate of fewer than --k distinct meters (default 5) is left out. \
Meters in no group are left out.

The export states what was done: CSV in `# name: value` lines before the header, JSON in its \
`metadata` object, Parquet in the file's key-value metadata `gridward.export` (pseudonymised or \
not and the scheme, never the key; resolution; aggregation and k; the range; meters; rows; \
suppressed aggregates and groups; when; the gridward version).

Examples:
  gridward export keygen --out recipient-a.key
  gridward export --from 2026-11-01T00:00:00Z --to 2026-12-01T00:00:00Z \\
      --pseudonymise --export-key recipient-a.key --resolution 1h --out november.csv
  gridward export --from 2026-11-01T00:00:00Z --to 2026-12-01T00:00:00Z --resolution 1d \\
      --pseudonymise --export-key recipient-a.key --group-by concentrator --k 10 \\
      --format parquet --out november.parquet
  gridward export --db gridward.db --from 2026-11-30T00:00:00Z --to 2026-12-01T00:00:00Z \\
      --meters m000001,m000002 --resolution 15m --format json"
)]
pub struct ExportArgs {
    #[command(subcommand)]
    command: Option<ExportCmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum ExportCmd {
    /// Create an export key for one recipient: 32 random bytes as 64 hex digits, in a new file
    /// of mode 0600 (never overwritten).
    Keygen(KeygenArgs),
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// The new key file (must not exist).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// The time buckets.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ResolutionArg {
    /// Quarter hours.
    #[value(name = "15m")]
    M15,
    /// Hours.
    #[value(name = "1h")]
    H1,
    /// UTC days.
    #[value(name = "1d")]
    D1,
}

impl From<ResolutionArg> for Resolution {
    fn from(r: ResolutionArg) -> Self {
        match r {
            ResolutionArg::M15 => Resolution::Minutes15,
            ResolutionArg::H1 => Resolution::Hour,
            ResolutionArg::D1 => Resolution::Day,
        }
    }
}

/// The output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// CSV: `#` metadata lines, a header row, the rows (CRLF).
    Csv,
    /// One JSON object: {"metadata": {...}, "rows": [...]}.
    Json,
    /// Apache Parquet (uncompressed; the metadata in the key-value metadata `gridward.export`).
    Parquet,
}

impl From<FormatArg> for OutputFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Csv => OutputFormat::Csv,
            FormatArg::Json => OutputFormat::Json,
            FormatArg::Parquet => OutputFormat::Parquet,
        }
    }
}

/// What to group meters by.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum GroupBy {
    /// The data concentrator each meter is registered behind (`gridward concentrator list`).
    Concentrator,
}

#[derive(Debug, Args)]
#[command(group = ArgGroup::new("grouping").args(["group_by", "groups"]).multiple(false))]
struct RunArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Start of the range, included (RFC 3339 on a bucket boundary, e.g. 2026-11-01T00:00:00Z).
    #[arg(long, value_name = "TIME", required = true)]
    from: Option<String>,
    /// End of the range, excluded (RFC 3339 on a bucket boundary).
    #[arg(long, value_name = "TIME", required = true)]
    to: Option<String>,
    /// Only these meters (comma-separated, or the option repeated) [default: every meter].
    #[arg(long, value_name = "ID", value_delimiter = ',')]
    meters: Vec<String>,
    /// Replace meter ids and group names by keyed pseudonyms (needs --export-key) and leave out
    /// the registers.
    #[arg(long, requires = "export_key")]
    pseudonymise: bool,
    /// The recipient's export key, from `gridward export keygen` (mode 0600, refused if others
    /// may read it).
    #[arg(long, value_name = "FILE", requires = "pseudonymise")]
    export_key: Option<PathBuf>,
    /// Bucket length.
    #[arg(long, value_enum, default_value_t = ResolutionArg::H1)]
    resolution: ResolutionArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Csv)]
    format: FormatArg,
    /// Sum per group instead of one row per meter.
    #[arg(long, value_enum)]
    group_by: Option<GroupBy>,
    /// Sum per group of this CSV file: one `meter_id,group` per line (a header line
    /// `meter_id,group`, blank lines and `#` comments are skipped).
    #[arg(long, value_name = "FILE")]
    groups: Option<PathBuf>,
    /// With --group-by or --groups: the fewest distinct meters an aggregate is shown for
    /// (at least 2) [default: 5].
    #[arg(long, value_name = "N", requires = "grouping")]
    k: Option<usize>,
    /// Write to this file (created with mode 0600; replaced if it exists) instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Runs `gridward export ...`.
pub fn run(args: ExportArgs) -> Result<()> {
    match args.command {
        Some(ExportCmd::Keygen(a)) => keygen(&a.out),
        None => export(&args.run),
    }
}

fn keygen(out: &Path) -> Result<()> {
    let mut bytes = [0u8; KEY_LEN];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the operating system gave no random bytes"))?;
    let key = ExportKey::from_bytes(bytes);
    bytes.fill(0);
    key.write_new(out)?;
    eprintln!(
        "wrote a new export key to {} (mode 0600). Use one key per recipient and keep it with \
         the operators: the same key gives the same pseudonyms every time.",
        out.display()
    );
    Ok(())
}

fn export(a: &RunArgs) -> Result<()> {
    let (Some(from), Some(to)) = (&a.from, &a.to) else {
        bail!("give --from and --to (RFC 3339 times on bucket boundaries)");
    };
    let from = parse_time(from, "--from")?;
    let to = parse_time(to, "--to")?;
    let format = OutputFormat::from(a.format);
    if matches!(format, OutputFormat::Parquet) && a.out.is_none() && std::io::stdout().is_terminal()
    {
        bail!("Parquet is binary: write it to a file with --out FILE (or redirect stdout)");
    }
    let mut spec = ExportSpec::new(from, to, a.resolution.into())?;
    // Everything that can be wrong with the files given is found before the store is read.
    if a.pseudonymise {
        let Some(path) = &a.export_key else {
            bail!(
                "--pseudonymise needs --export-key FILE (make one with `gridward export keygen`)"
            );
        };
        spec = spec.pseudonymise(Pseudonymiser::new(&ExportKey::load(path)?));
    }
    let k = a.k.unwrap_or(DEFAULT_K);
    let file_groups = match &a.groups {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the groups file {}", path.display()))?;
            let groups = Groups::parse_csv(&text)
                .with_context(|| format!("in the groups file {}", path.display()))?;
            Some(Aggregation::new(groups, k)?)
        }
        None => {
            if a.group_by.is_some() {
                // Checked before the store is opened; the topology is read below.
                Aggregation::new(Groups::from_topology(&[]), k)?;
            }
            None
        }
    };

    let store = a.store.open()?;
    let aggregation = match (file_groups, a.group_by) {
        (Some(agg), _) => Some(agg),
        (None, Some(GroupBy::Concentrator)) => {
            let topology = store
                .topology()
                .context("reading the concentrator topology")?;
            if topology.is_empty() {
                bail!(
                    "no meter is registered behind a concentrator (`gridward concentrator \
                     attach`): --group-by concentrator would export nothing"
                );
            }
            Some(Aggregation::new(Groups::from_topology(&topology), k)?)
        }
        (None, None) => None,
    };
    if let Some(agg) = aggregation {
        spec = spec.aggregate(agg);
    }
    let meters = meters_to_export(&store, &a.meters)?;
    if !a.pseudonymise {
        eprintln!(
            "note: not pseudonymised: the export names each meter and carries its register \
             (use --pseudonymise --export-key FILE for a third party)"
        );
    }

    let mut exporter = Exporter::new(spec);
    let total = meters.len();
    let progress = total >= PROGRESS_FROM;
    let step = (total / 20).max(1);
    let tty = std::io::stderr().is_terminal();
    let mut readings_read = 0usize;
    for (i, meter) in meters.iter().enumerate() {
        let readings = meter_readings(&store, meter, from, to)
            .with_context(|| format!("reading meter {meter}'s readings"))?;
        readings_read += readings.len();
        exporter.add_meter(meter, &readings)?;
        if progress && ((i + 1) % step == 0 || i + 1 == total) {
            let line = format!(
                "export: {}/{total} meters, {readings_read} readings read",
                i + 1
            );
            if tty {
                eprint!("\r{line}");
                if i + 1 == total {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
        }
    }
    let export = exporter.finish(OffsetDateTime::now_utc());
    let where_to = match &a.out {
        Some(path) => {
            let file = create_private(path)?;
            let mut w = BufWriter::new(file);
            gridward_export::write(&export, format, &mut w)
                .with_context(|| format!("writing {}", path.display()))?;
            w.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            path.display().to_string()
        }
        None => {
            // `Stdout`, not its lock: the Parquet writer wants a `Send` sink.
            gridward_export::write(&export, format, BufWriter::new(std::io::stdout()))?;
            "stdout".to_owned()
        }
    };
    let m = &export.metadata;
    eprintln!(
        "exported {} row(s) of {} meter(s) to {where_to} ({}, {}{})",
        m.rows,
        m.meters,
        if m.pseudonymised {
            "pseudonymised"
        } else {
            "not pseudonymised"
        },
        m.resolution,
        match m.k {
            Some(k) => format!(
                ", aggregated by {}, k = {k}: {} aggregate(s) of {} group(s) suppressed, {} meter(s) in no group",
                m.aggregation, m.suppressed_aggregates, m.suppressed_groups, m.ungrouped_meters
            ),
            None => String::new(),
        }
    );
    Ok(())
}

/// The meters named by `--meters` (each must be in the store), or every meter of the store.
fn meters_to_export(store: &impl Store, named: &[String]) -> Result<Vec<MeterId>> {
    let known: Vec<MeterId> = store
        .meters()
        .context("listing the meters")?
        .into_iter()
        .map(|r| r.meter_id)
        .collect();
    if named.is_empty() {
        return Ok(known);
    }
    let mut out = Vec::with_capacity(named.len());
    for raw in named {
        let id = MeterId::new(raw.trim())
            .with_context(|| format!("--meters: {raw:?} is not a meter id"))?;
        if !known.contains(&id) {
            bail!("--meters: meter {id} is not in the store (see `gridward meters`)");
        }
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// Creates (or truncates) `path`, readable and writable by its owner only when new: an export
/// is consumption data.
fn create_private(path: &Path) -> Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExportArgs,
    }

    fn parse(args: &[&str]) -> Result<ExportArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("export").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn the_arguments_parse_and_bad_combinations_are_refused() {
        let range = [
            "--from",
            "2026-11-01T00:00:00Z",
            "--to",
            "2026-12-01T00:00:00Z",
        ];
        let ok = |extra: &[&str]| {
            let mut all = range.to_vec();
            all.extend_from_slice(extra);
            parse(&all).unwrap_or_else(|e| panic!("{extra:?}: {e}"))
        };
        let bad = |extra: &[&str]| {
            let mut all = range.to_vec();
            all.extend_from_slice(extra);
            assert!(parse(&all).is_err(), "{extra:?} was accepted");
        };
        let a = ok(&["--pseudonymise", "--export-key", "k", "--resolution", "15m"]);
        assert!(a.run.pseudonymise && a.command.is_none());
        ok(&[
            "--group-by",
            "concentrator",
            "--k",
            "10",
            "--format",
            "parquet",
        ]);
        ok(&["--groups", "g.csv", "--meters", "a,b", "--meters", "c"]);
        ok(&["--db", "x.db", "--key-file", "x.key", "--out", "o.csv"]);
        bad(&["--pseudonymise"]);
        bad(&["--export-key", "k"]);
        bad(&["--k", "5"]);
        bad(&["--group-by", "concentrator", "--groups", "g.csv"]);
        bad(&["--resolution", "5m"]);
        bad(&["--format", "xml"]);
        assert!(
            parse(&["--from", "2026-11-01T00:00:00Z"]).is_err(),
            "--to is required"
        );
        let k = parse(&["keygen", "--out", "k"]).unwrap();
        assert!(matches!(k.command, Some(ExportCmd::Keygen(_))));
        assert!(parse(&["keygen"]).is_err());
    }
}
