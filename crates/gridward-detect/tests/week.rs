//! A simulated week of 1,000 meters with known ground truth, through the detectors.

use gridward_detect::sim::{IncidentKind, SimConfig, run};
use gridward_detect::{AlarmType, DetectionConfig};

#[test]
fn week_of_1000_meters_detects_every_incident_without_false_alarms() {
    let cfg = SimConfig::default();
    let detection = DetectionConfig::default();
    let started = std::time::Instant::now();
    let report = run(&cfg, &detection);
    println!("{report}");
    println!("(wall time {:.1} s)", started.elapsed().as_secs_f64());

    assert_eq!(report.meters, 1000);
    // Every meter every 15 min, minus the slots while meters were without supply.
    assert!(report.readings > 660_000 && report.readings < 1000 * 7 * 96);
    for row in &report.rows {
        assert!(row.injected > 0, "{:?} injected none", row.kind);
        assert_eq!(row.missed, 0, "{:?} missed: {:?}", row.kind, report.misses);
    }
    assert!(report.misses.is_empty(), "{:?}", report.misses);
    for t in [
        AlarmType::TheftSuspected,
        AlarmType::Outage,
        AlarmType::ClonedMeter,
        AlarmType::Tamper,
        AlarmType::RegisterStalled,
        AlarmType::RefusalBurst,
        AlarmType::RefusalBurstFleet,
    ] {
        assert_eq!(
            report.false_alarms_of(t),
            0,
            "false {t}: {:?}",
            report.false_alarm_keys
        );
    }
    let row = |k| report.row(k).unwrap();
    assert_eq!(row(IncidentKind::Tamper).latency_max, Some(0));
    assert!(row(IncidentKind::Outage).latency_max.unwrap() <= detection.outage.window_secs as i64);
    assert!(
        row(IncidentKind::Theft).latency_max.unwrap() <= detection.theft.observe_secs as i64 + 3600
    );
    assert!(
        row(IncidentKind::ClonedMeter).latency_max.unwrap()
            <= detection.intrusion.clone_window_secs as i64
    );
    assert!(
        row(IncidentKind::BruteForce).latency_max.unwrap()
            <= detection.intrusion.window_secs as i64
    );
    assert!(
        row(IncidentKind::StalledRegister).latency_max.unwrap()
            <= detection.theft.stall_secs as i64 + 2 * 900 + 900
    );
}

#[test]
fn same_seed_same_report() {
    let cfg = SimConfig {
        meters: 1000,
        days: 2,
        thieves: 1,
        benign_tampers: 1,
        stalled_registers: 0,
        power_blips: 3,
        ..SimConfig::default()
    };
    let a = run(&cfg, &DetectionConfig::default());
    let b = run(&cfg, &DetectionConfig::default());
    assert_eq!(a, b);
}

#[test]
fn other_seeds_detect_everything_without_false_alarms() {
    for seed in [1, 2, 3] {
        let r = run(
            &SimConfig {
                seed,
                ..SimConfig::default()
            },
            &DetectionConfig::default(),
        );
        assert!(r.misses.is_empty(), "seed {seed}: {:?}", r.misses);
        assert!(
            r.false_alarm_keys.is_empty(),
            "seed {seed}: {:?}",
            r.false_alarm_keys
        );
    }
}
