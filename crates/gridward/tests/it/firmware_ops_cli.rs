//! `gridward firmware upload|campaign|status|list` beside a running `gridward serve`, with a
//! `gridward meter run` fleet that trusts the manufacturer's key: a tampered image is refused at
//! upload, the genuine one rolls out in two stages and every meter confirms it.

use std::process::Command;
use std::time::Duration;

use crate::headend::{FleetProcess, Headend, issue_meter, new_pki, show};
use crate::support::gridward_ok;

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gridward"))
        .args(args)
        .env("USER", "it-tester")
        .output()
        .expect("run the gridward binary")
}

#[test]
fn a_firmware_campaign_from_the_cli_is_installed_by_a_meter_run_fleet() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    let pki_s = pki.to_str().expect("utf-8");
    new_pki(&pki, "Gridward");
    for m in ["f-1", "f-2", "f-3"] {
        issue_meter(&pki, m);
    }
    gridward_ok(&["pki", "issue", "command-signer", "--dir", pki_s, "headend"]);
    let vendor = work.join("vendor");
    gridward_ok(&[
        "firmware",
        "keygen",
        "--out",
        vendor.to_str().expect("utf-8"),
    ]);
    let public = vendor.join("manufacturer.pub.pem");
    let image = work.join("fw.bin");
    let bytes: Vec<u8> = (0..40_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&image, &bytes).expect("image");
    let manifest = work.join("fw.manifest");
    gridward_ok(&[
        "firmware",
        "sign",
        "--key",
        vendor.join("manufacturer.key.pem").to_str().expect("utf-8"),
        "--image",
        image.to_str().expect("utf-8"),
        "--vendor",
        "gridward-sim",
        "--class",
        "sim-meter-1",
        "--version",
        "1.2.0",
        "--sequence",
        "4",
        "--out",
        manifest.to_str().expect("utf-8"),
    ]);
    let trusted = format!("manufacturers = [{:?}]", public.to_str().expect("utf-8"));
    let h = Headend::start(work, &pki, &[("manufacturers = []", trusted.as_str())]);
    let config = h.config.to_str().expect("utf-8").to_owned();
    let port = h.port.to_string();
    let fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            pki_s,
            "--port",
            &port,
            "--prefix",
            "f-",
            "--interval",
            "3600",
            "--duration",
            "90",
            "--drain",
            "1",
            "--manufacturer-key",
            public.to_str().expect("utf-8"),
        ],
    );
    for m in ["f-1", "f-2", "f-3"] {
        crate::headend::wait_for(
            Duration::from_secs(30),
            "the meters to connect",
            || h.is_connected(m).then_some(()),
            || h.log(),
        );
    }

    // A changed byte: the image no longer matches the signed manifest.
    let tampered = work.join("tampered.bin");
    let mut bad = bytes.clone();
    bad[20_000] ^= 1;
    std::fs::write(&tampered, &bad).expect("tampered image");
    let out = cli(&[
        "firmware",
        "upload",
        "--config",
        &config,
        "--manifest",
        manifest.to_str().expect("utf-8"),
        "--image",
        tampered.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("upload refused"),
        "{}",
        show(&out)
    );
    // ... and leaves its security event, as through the API.
    let events = cli(&["events", "--config", &config]);
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("firmware_refused"),
        "{}",
        show(&events)
    );

    let out = cli(&[
        "firmware",
        "upload",
        "--config",
        &config,
        "--manifest",
        manifest.to_str().expect("utf-8"),
        "--image",
        image.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let firmware_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let list = cli(&["firmware", "list", "--config", &config]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("gridward-sim/sim-meter-1 1.2.0"),
        "{}",
        show(&list)
    );
    let out = cli(&[
        "firmware",
        "campaign",
        "--config",
        &config,
        "--firmware",
        &firmware_id,
        "--meter",
        "f-1",
        "--meter",
        "f-2",
        "--meter",
        "f-3",
        "--first-stage",
        "1",
        "--success-threshold",
        "1",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let campaign = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let status = crate::headend::wait_for(
        Duration::from_secs(60),
        "the campaign to complete",
        || {
            let out = cli(&["firmware", "status", "--config", &config, &campaign]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("completed").then_some(text)
        },
        || h.log(),
    );
    assert_eq!(status.matches("acknowledged").count(), 3, "{status}");
    assert!(status.contains("stage 1  f-1"), "{status}");
    let summary = fleet.interrupt(Duration::from_secs(30));
    assert!(
        summary.text.contains("3 received, 3 executed, 0 refused"),
        "{}",
        summary.text
    );
}
