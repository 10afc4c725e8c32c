//! `gridward attack`: every threat of the design run against a head-end while a genuine fleet
//! sends; a table on the terminal, JSON on request, exit code 1 if any case failed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use gridward_attack::{ApiTarget, InProcess, Options, Report, SinkTarget, Target, scenarios};

use crate::serve_cmd::BadConfig;

/// `gridward attack`
#[derive(Debug, Args)]
#[command(after_help = "\
Without --config the harness starts its own head-end and sink (in this process, with a PKI and \
20 genuine meters in --dir) and attacks them.
With --config it attacks a head-end running on this machine (`gridward serve --config FILE`): \
attack identities are issued in that head-end's PKI, its store is read for security events, and \
--pid lets the harness reload it (SIGHUP) for the revocation cases and read its memory. The \
target's PKI needs genuine meters g000001.. (`gridward pki issue meter --dir PKI --count 20 \
--prefix g`), and 127.0.0.1 in [mqtt] ban_exempt (the genuine fleet connects from there; \
attacks come from 127.1.x.y). The access scenario attacks the head-end's HTTPS API ([api] listen) \
and adds its users to the API's users database ([api] users), as `gridward user add` would. \
The commands and firmware scenarios deliver forged commands and bad images to victim meters of \
their own, as a compromised broker would, signing with the head-end's command key from the PKI \
(`gridward pki issue command-signer`); the firmware cases need the private key of a \
manufacturer in the head-end's [firmware] manufacturers (--manufacturer-key). The detection \
scenario demands each alarm in the head-end's store; it registers a PLC meter behind a \
concentrator of its own through the API as an operator, and expects the default [detection] \
thresholds (three takeovers make a clone, ten refusals from one source a burst).

Scenarios: eavesdropping, mitm, spoofing, replay, tampering, revocation, access, commands, \
firmware, detection, malformed, dos.

Examples:
  gridward attack                           # everything, against a head-end of its own
  gridward attack --only replay --only dos
  gridward attack --config gridward.toml --pid $(pidof gridward) --json attack.json")]
pub struct AttackArgs {
    /// Attack the head-end of this configuration instead of starting one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// With --config: the head-end's process id (reload with SIGHUP, memory).
    #[arg(long, value_name = "PID", requires = "config")]
    pid: Option<u32>,
    /// With --config: the sink it forwards to (ADDR) and the client certificate whose key the
    /// forwarder signs with (NAME), for the downstream replay case.
    #[arg(long, value_name = "ADDR", requires = "config")]
    sink: Option<std::net::SocketAddr>,
    /// With --config: the private key of a manufacturer the head-end trusts
    /// (`gridward firmware keygen`), for the firmware scenario.
    #[arg(long, value_name = "FILE", requires = "config")]
    manufacturer_key: Option<PathBuf>,
    /// With --sink: the forwarder's client certificate name in the PKI.
    #[arg(long, value_name = "NAME", default_value = "hes")]
    sink_client: String,
    /// Run only this scenario (repeatable).
    #[arg(long = "only", value_name = "SCENARIO")]
    only: Vec<String>,
    /// Genuine meters sending alongside.
    #[arg(long, default_value_t = 20, value_name = "N")]
    fleet: usize,
    /// Work directory (PKI of the own head-end, rogue CAs, meter state) [default: a
    /// temporary directory, removed at the end].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Runs `gridward attack`.
pub fn run(args: AttackArgs) -> Result<()> {
    let names: Vec<&str> = scenarios::ALL.iter().map(|s| s.name).collect();
    for o in &args.only {
        if !names.contains(&o.as_str()) {
            bail!(
                "--only {o:?}: not a scenario; the scenarios are {}",
                names.join(", ")
            );
        }
    }
    // Floods open many sockets in this process.
    crate::sys::check_nofile(crate::sys::raise_nofile(), 4096)?;
    let tmp;
    let work: PathBuf = match &args.dir {
        Some(d) => {
            if d.exists() && d.read_dir().map(|mut r| r.next().is_some()).unwrap_or(true) {
                bail!(
                    "{} exists and is not empty; give a new or empty --dir",
                    d.display()
                );
            }
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("gridward-attack-")
                .tempdir()
                .context("creating a temporary work directory")?;
            tmp.path().to_owned()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(attack(&args, &work))?;
    println!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if !report.passed() {
        bail!(
            "{} of {} cases failed: {}",
            report.failures().count(),
            report.checks.len(),
            report
                .failures()
                .map(|c| format!("{}: {}", c.scenario, c.case))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

async fn attack(args: &AttackArgs, work: &Path) -> Result<Report> {
    let opts = Options {
        only: args.only.clone(),
        fleet: args.fleet.max(1),
    };
    let progress = |name: &str| eprintln!("gridward attack: {name}");
    match &args.config {
        Some(config) => {
            let c = gridward_hes::config::Config::load(config).map_err(BadConfig)?;
            let mut target = Target::external(
                c.listen,
                c.server_name.clone(),
                c.pki_dir.clone(),
                c.store_path.clone(),
                args.pid,
            );
            target.store_keys = c.store_keys.source(false).map_err(anyhow::Error::msg)?;
            if let Some(api) = &c.api {
                target = target.with_api(ApiTarget {
                    addr: api.listen,
                    users: api.users_path.clone(),
                });
            }
            if let Some(key) = &args.manufacturer_key {
                target = target.with_manufacturer_key(key);
            }
            if let Some(addr) = args.sink {
                target = target.with_sink(SinkTarget {
                    addr,
                    client: args.sink_client.clone(),
                    stats: None,
                });
            }
            eprintln!(
                "gridward attack: head-end at {} (PKI {}, store {})",
                c.listen,
                c.pki_dir.display(),
                c.store_path.display()
            );
            Ok(gridward_attack::run(target, &work.join("attack"), &opts, &progress).await?)
        }
        None => {
            eprintln!(
                "gridward attack: starting a head-end and a sink of its own in {}",
                work.display()
            );
            let own = InProcess::start(work, opts.fleet).await?;
            eprintln!(
                "gridward attack: head-end on {} (API on {}), sink on {}",
                own.target.mqtt,
                own.target
                    .api
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |a| a.addr.to_string()),
                own.target
                    .sink
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |s| s.addr.to_string())
            );
            let result =
                gridward_attack::run(own.target.clone(), &work.join("attack"), &opts, &progress)
                    .await;
            own.shutdown().await;
            Ok(result?)
        }
    }
}
