//! Helpers: run the `gridward` binary and external tools, with clear failure messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `gridward ARGS`, returning its output; panics with stderr unless `expect_ok` matches.
pub fn gridward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gridward"))
        .args(args)
        .output()
        .expect("run the gridward binary")
}

/// Runs `gridward ARGS` and requires success.
pub fn gridward_ok(args: &[&str]) -> String {
    let out = gridward(args);
    assert!(
        out.status.success(),
        "gridward {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs an external tool; panics with an install hint if it is missing.
pub fn tool(program: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(program).args(args).current_dir(cwd).output().unwrap_or_else(|e| {
        panic!("cannot run `{program}` ({e}); install it (Debian: openssl, default-jdk-headless) or run `bash .ci/run`")
    })
}

/// Runs an external tool and requires success.
pub fn tool_ok(program: &str, args: &[&str], cwd: &Path) -> Output {
    let out = tool(program, args, cwd);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A temporary directory with an initialised PKI in `pki/`.
pub struct TempPki {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl TempPki {
    pub fn new(extra_init_args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let dir_s = dir.to_str().expect("utf-8 path").to_owned();
        let mut args = vec!["pki", "init", "--dir", &dir_s];
        args.extend_from_slice(extra_init_args);
        gridward_ok(&args);
        Self { tmp, dir }
    }

    pub fn dir(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }

    pub fn path(&self, rel: &str) -> String {
        self.dir.join(rel).to_str().expect("utf-8 path").to_owned()
    }

    pub fn work(&self) -> &Path {
        self.tmp.path()
    }
}

/// A free loopback port for a server that must come back on the same port after a restart (a
/// sink through an outage, a head-end after a power cut): one below the kernel's ephemeral range,
/// so that while the server is down no other test's `127.0.0.1:0` can be handed the port.
pub fn restartable_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(ephemeral_low.saturating_sub(1000));
    for _ in 0..200 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), low..ephemeral_low);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{ephemeral_low} on 127.0.0.1");
}
