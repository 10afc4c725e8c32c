//! What one attack case showed, and the report of a whole run: a table for the terminal and
//! JSON for machines.
//!
//! A case passes only if the defence held **and** left its trace: a refusal the head-end did
//! not record as a security event is a failure, however well the connection was refused.

use std::fmt::Write as _;

use serde::Serialize;

/// The verdict on one attack case.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// The threat (the scenario's name), e.g. `replay`.
    pub scenario: &'static str,
    /// What was tried, e.g. `the same envelope again`.
    pub case: String,
    /// What the defence must do, e.g. `refused, event replay`.
    pub expected: String,
    /// What happened.
    pub observed: String,
    /// Whether the defence held and left its trace.
    pub pass: bool,
    /// The security event the refusal produced (head-end store id), if any.
    pub event_id: Option<i64>,
    /// The alarm the case raised (head-end store id), if it is an alarm condition.
    pub alarm_id: Option<i64>,
}

impl Check {
    /// A case of `scenario`; fill in with the builder methods.
    pub fn new(
        scenario: &'static str,
        case: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Self {
            scenario,
            case: case.into(),
            expected: expected.into(),
            observed: String::new(),
            pass: false,
            event_id: None,
            alarm_id: None,
        }
    }

    /// Records what happened.
    pub fn observed(mut self, observed: impl Into<String>) -> Self {
        self.observed = observed.into();
        self
    }

    /// Sets the verdict.
    pub fn pass(mut self, pass: bool) -> Self {
        self.pass = pass;
        self
    }

    /// Records the security event.
    pub fn event(mut self, id: Option<i64>) -> Self {
        self.event_id = id;
        self
    }

    /// Records the alarm.
    pub fn alarm(mut self, id: Option<i64>) -> Self {
        self.alarm_id = id;
        self
    }

    /// A case that could not be run (set-up failed): a failure that says why.
    pub fn broken(
        scenario: &'static str,
        case: impl Into<String>,
        why: impl std::fmt::Display,
    ) -> Self {
        Self::new(scenario, case, "the case runs").observed(format!("could not run: {why}"))
    }
}

/// How the genuine fleet fared while the attacks ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FleetSummary {
    /// Genuine meters sending.
    pub meters: usize,
    /// Their acknowledged readings per second before the first attack.
    pub rate_before: f64,
    /// Acknowledged readings over the whole run.
    pub acked: u64,
    /// Genuine readings refused (must be 0).
    pub refused: u64,
    /// Genuine readings the fleet still waited for at the end.
    pub unacknowledged: u64,
}

/// A whole run: every case, and the genuine fleet alongside.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Every case, in the order they ran.
    pub checks: Vec<Check>,
    /// The genuine fleet.
    pub fleet: FleetSummary,
    /// Wall time of the run, seconds.
    pub seconds: f64,
}

impl Report {
    /// Whether every case passed (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.pass)
    }

    /// Cases that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.pass)
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        // Plain data with derived Serialize: cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The table shown on the terminal: scenario · case · expected · observed · verdict · event
    /// · alarm.
    pub fn table(&self) -> String {
        let header = [
            "SCENARIO", "CASE", "EXPECTED", "OBSERVED", "RESULT", "EVENT", "ALARM",
        ];
        let rows: Vec<[String; 7]> = self
            .checks
            .iter()
            .map(|c| {
                [
                    c.scenario.to_owned(),
                    c.case.clone(),
                    c.expected.clone(),
                    c.observed.clone(),
                    if c.pass { "PASS" } else { "FAIL" }.to_owned(),
                    c.event_id
                        .map_or_else(|| "-".to_owned(), |id| format!("#{id}")),
                    c.alarm_id
                        .map_or_else(|| "-".to_owned(), |id| format!("#{id}")),
                ]
            })
            .collect();
        // Long texts are cut so a row fits a wide terminal; the JSON report has them whole.
        let limits = [12, 44, 34, 60, 6, 8, 6];
        let cell = |s: &str, max: usize| -> String {
            if s.chars().count() <= max {
                s.to_owned()
            } else {
                let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
                t.push('…');
                t
            }
        };
        let mut widths = header.map(str::len);
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(cell(c, limits[i]).chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: [&str; 7]| {
            for (i, c) in cells.iter().enumerate() {
                let c = cell(c, limits[i]);
                let pad = widths[i].saturating_sub(c.chars().count());
                let _ = write!(out, "{c}{}", " ".repeat(pad));
                out.push_str(if i + 1 < cells.len() { "  " } else { "\n" });
            }
        };
        line(&mut out, header);
        for r in &rows {
            line(&mut out, [&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]]);
        }
        let passed = self.checks.iter().filter(|c| c.pass).count();
        let _ = writeln!(
            out,
            "\n{passed}/{} cases passed in {:.0} s; genuine fleet: {} meters, {} readings acknowledged ({:.0}/s before the attacks), {} refused, {} unacknowledged",
            self.checks.len(),
            self.seconds,
            self.fleet.meters,
            self.fleet.acked,
            self.fleet.rate_before,
            self.fleet.refused,
            self.fleet.unacknowledged
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_passes_only_if_every_case_passes() {
        let ok = Check::new("replay", "again", "refused")
            .observed("refused")
            .pass(true);
        let mut r = Report::default();
        assert!(!r.passed(), "an empty run proves nothing");
        r.checks.push(ok.clone());
        assert!(r.passed());
        r.checks.push(Check::broken("dos", "flood", "no socket"));
        assert!(!r.passed());
        assert_eq!(r.failures().count(), 1);
        let t = r.table();
        assert!(
            t.contains("PASS") && t.contains("FAIL") && t.contains("1/2 cases passed"),
            "{t}"
        );
        let j = r.to_json();
        assert_eq!(j["checks"][1]["pass"], false);
        assert_eq!(j["checks"][0]["scenario"], "replay");
    }

    #[test]
    fn long_cells_are_cut_in_the_table_only() {
        let long = "x".repeat(200);
        let r = Report {
            checks: vec![Check::new("tampering", long.clone(), "refused").pass(true)],
            ..Report::default()
        };
        assert!(r.table().contains('…'));
        assert_eq!(r.to_json()["checks"][0]["case"], long);
    }
}
