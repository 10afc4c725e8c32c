//! [`authorize`]: the one function that decides every request. Deny by default.
//!
//! | action              | none | consumer        | operator | auditor | admin |
//! | ------------------- | ---- | --------------- | -------- | ------- | ----- |
//! | `Health`            | ✔    | ✔               | ✔        | ✔       | ✔     |
//! | `ListMeters`        | 401  | ✔ (own, filter) | ✔        | ✔       | ✔     |
//! | `ReadMeter`         | 401  | own ✔, else 404 | ✔        | ✔       | ✔     |
//! | `ReadReadings`      | 401  | own ✔, else 404 | ✔        | 403     | 403   |
//! | `ReadMeterEvents`   | 401  | own ✔, else 404 | ✔        | 403     | 403   |
//! | `ReadSecurityEvents`| 401  | 403             | ✔        | ✔       | 403   |
//! | `ReadOutbox`        | 401  | 403             | ✔        | 403     | 403   |
//! | `ReadMetrics`       | 401  | 403             | ✔        | 403     | 403   |
//! | `ListUsers`         | 401  | 403             | 403      | 403     | ✔     |
//! | `ManageUsers`       | 401  | 403             | 403      | 403     | ✔     |
//! | `ReadAudit`         | 401  | 403             | 403      | ✔       | 403   |
//! | `ReadSelf`          | 401  | ✔               | ✔        | ✔       | ✔     |
//! | `Logout`            | 401  | ✔               | ✔        | ✔       | ✔     |
//! | `SendCommand`       | 401  | 403             | ✔        | 403     | 403   |
//! | `ReadCommands`      | 401  | 403             | ✔        | ✔       | 403   |
//! | `ApproveCommands`   | 401  | 403             | ✔        | 403     | 403   |
//! | `ManageFirmware`    | 401  | 403             | ✔        | 403     | 403   |
//! | `ReadFirmware`      | 401  | 403             | ✔        | ✔       | 403   |
//! | `ReadAlarms`        | 401  | 403             | ✔        | ✔       | 403   |
//! | `AcknowledgeAlarms` | 401  | 403             | ✔        | 403     | 403   |
//! | `ReadTopology`      | 401  | 403             | ✔        | ✔       | 403   |
//! | `ManageTopology`    | 401  | 403             | ✔        | 403     | 403   |
//! | `ExportOwnReadings` | 401  | ✔ (own only)    | 403      | 403     | 403   |
//!
//! Operators are always TOTP-verified: [`Role::requires_totp`] holds for every role but consumer,
//! so an operator session exists only after a second factor; an operator certificate is the other
//! credential that may command.
//!
//! Alarms and the concentrator topology follow the same split: auditors read, operators act.
//! Consumers get 403 on both (their own meter's events are `ReadMeterEvents`), administrators
//! too (they manage people, not the grid).
//!
//! `ExportOwnReadings` is a consumer taking out their own data (all the meters bound to them,
//! not pseudonymised): the other roles have no own meters, and an operator's exports for third
//! parties go through `gridward export`, pseudonymised.
//!
//! A consumer asking for a meter that is not theirs gets `404`, as if it did not exist
//! ([`Decision::is_probe`]: the caller records a security event).
//! The test `role_action_matrix` holds this table cell by cell.

use gridward_core::MeterId;

use crate::principal::{Principal, Role};

/// What a request wants to do. The API maps each route onto one action.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Liveness probe; needs no credential.
    Health,
    /// List meters (a consumer's list is filtered to its own by the handler, with
    /// [`Principal::sees_meter`]).
    ListMeters,
    /// Read one meter's metadata (identity, certificate, last counter, last seen).
    ReadMeter(MeterId),
    /// Read one meter's readings (personal data).
    ReadReadings(MeterId),
    /// Read one meter's own events (tamper, outage, ...).
    ReadMeterEvents(MeterId),
    /// Read the head-end's security events (refusals, bans, login failures).
    ReadSecurityEvents,
    /// Read the downstream outbox (pending, failed, dead letters).
    ReadOutbox,
    /// Read the service metrics.
    ReadMetrics,
    /// List users and their roles.
    ListUsers,
    /// Create, change, disable users; reset passwords; enrol second factors.
    ManageUsers,
    /// Read the audit log.
    ReadAudit,
    /// Read one's own identity and sessions (`whoami`).
    ReadSelf,
    /// End one's own session.
    Logout,
    /// Send a command to meters, or propose a critical bulk command (dual authorisation).
    SendCommand,
    /// Read commands, their lifecycle, and proposals.
    ReadCommands,
    /// Approve or reject another operator's proposal (four eyes; the rule that the proposer
    /// never approves is checked by `gridward-command`, where the proposal is known).
    ApproveCommands,
    /// Upload firmware, create, pause, resume and cancel campaigns.
    ManageFirmware,
    /// Read firmware images and campaigns.
    ReadFirmware,
    /// Read alarms (tamper, outage, theft suspicion, intrusion, ...) with their evidence.
    ReadAlarms,
    /// Acknowledge or clear an alarm (who and when are audited).
    AcknowledgeAlarms,
    /// Read the concentrator topology: which meters are registered behind which concentrator.
    ReadTopology,
    /// Attach meters to a concentrator or detach them (a concentrator relays only for the
    /// meters registered behind it).
    ManageTopology,
    /// Export one's own readings (a consumer's bound meters, not pseudonymised).
    ExportOwnReadings,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No (valid) credential was presented: HTTP 401.
    Unauthenticated,
    /// The principal's role may not do this: HTTP 403.
    Forbidden,
    /// A consumer asked for a meter that is not theirs: HTTP 404, so that meter ids cannot
    /// be enumerated; the caller records a security event.
    NotFound,
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use]
pub enum Decision {
    /// The request may proceed.
    Allow,
    /// The request is refused.
    Deny(DenyReason),
}

impl Decision {
    /// Whether the request may proceed.
    pub fn is_allowed(self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// Whether this refusal is a consumer probing for another's meter (answered 404): the
    /// caller records a security event for it.
    pub fn is_probe(self) -> bool {
        matches!(self, Decision::Deny(DenyReason::NotFound))
    }

    /// The HTTP status of a refusal (401, 403, 404); 200 for [`Decision::Allow`].
    pub fn http_status(self) -> u16 {
        match self {
            Decision::Allow => 200,
            Decision::Deny(DenyReason::Unauthenticated) => 401,
            Decision::Deny(DenyReason::Forbidden) => 403,
            Decision::Deny(DenyReason::NotFound) => 404,
        }
    }
}

const FORBIDDEN: Decision = Decision::Deny(DenyReason::Forbidden);

/// Decides whether `principal` may perform `action`. Deny by default: every allowed pair is
/// named below; everything else is refused.
pub fn authorize(principal: Option<&Principal>, action: Action) -> Decision {
    use Action as A;
    if matches!(action, A::Health) {
        return Decision::Allow;
    }
    let Some(p) = principal else {
        return Decision::Deny(DenyReason::Unauthenticated);
    };
    match (p.role, action) {
        (_, A::Health | A::ReadSelf | A::Logout) => Decision::Allow,

        (Role::Consumer, A::ListMeters | A::ExportOwnReadings) => Decision::Allow,
        (Role::Consumer, A::ReadMeter(m) | A::ReadReadings(m) | A::ReadMeterEvents(m)) => {
            if p.meters.contains(&m) {
                Decision::Allow
            } else {
                Decision::Deny(DenyReason::NotFound)
            }
        }

        (
            Role::Operator,
            A::ListMeters
            | A::ReadMeter(_)
            | A::ReadReadings(_)
            | A::ReadMeterEvents(_)
            | A::ReadSecurityEvents
            | A::ReadOutbox
            | A::ReadMetrics
            | A::SendCommand
            | A::ReadCommands
            | A::ApproveCommands
            | A::ManageFirmware
            | A::ReadFirmware
            | A::ReadAlarms
            | A::AcknowledgeAlarms
            | A::ReadTopology
            | A::ManageTopology,
        ) => Decision::Allow,

        (
            Role::Auditor,
            A::ReadAudit
            | A::ReadSecurityEvents
            | A::ListMeters
            | A::ReadMeter(_)
            | A::ReadCommands
            | A::ReadFirmware
            | A::ReadAlarms
            | A::ReadTopology,
        ) => Decision::Allow,

        (Role::Admin, A::ListUsers | A::ManageUsers | A::ListMeters | A::ReadMeter(_)) => {
            Decision::Allow
        }

        _ => FORBIDDEN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::PrincipalId;

    fn meter(s: &str) -> MeterId {
        MeterId::new(s).unwrap()
    }

    fn principal(role: Role) -> Principal {
        Principal {
            id: PrincipalId::User(role.as_str().into()),
            role,
            meters: if role == Role::Consumer {
                vec![meter("own-1"), meter("own-2")]
            } else {
                vec![]
            },
        }
    }

    /// Cell values: Y allow, U 401, F 403, N 404.
    #[test]
    fn role_action_matrix() {
        let own = meter("own-2");
        let other = meter("other");
        #[rustfmt::skip]
        let table: Vec<(Action, [char; 5])> = vec![
            //                                          none  cons  oper  audi  admin
            (Action::Health,                          ['Y', 'Y', 'Y', 'Y', 'Y']),
            (Action::ListMeters,                      ['U', 'Y', 'Y', 'Y', 'Y']),
            (Action::ReadMeter(own.clone()),          ['U', 'Y', 'Y', 'Y', 'Y']),
            (Action::ReadMeter(other.clone()),        ['U', 'N', 'Y', 'Y', 'Y']),
            (Action::ReadReadings(own.clone()),       ['U', 'Y', 'Y', 'F', 'F']),
            (Action::ReadReadings(other.clone()),     ['U', 'N', 'Y', 'F', 'F']),
            (Action::ReadMeterEvents(own.clone()),    ['U', 'Y', 'Y', 'F', 'F']),
            (Action::ReadMeterEvents(other.clone()),  ['U', 'N', 'Y', 'F', 'F']),
            (Action::ReadSecurityEvents,              ['U', 'F', 'Y', 'Y', 'F']),
            (Action::ReadOutbox,                      ['U', 'F', 'Y', 'F', 'F']),
            (Action::ReadMetrics,                     ['U', 'F', 'Y', 'F', 'F']),
            (Action::ListUsers,                       ['U', 'F', 'F', 'F', 'Y']),
            (Action::ManageUsers,                     ['U', 'F', 'F', 'F', 'Y']),
            (Action::ReadAudit,                       ['U', 'F', 'F', 'Y', 'F']),
            (Action::ReadSelf,                        ['U', 'Y', 'Y', 'Y', 'Y']),
            (Action::Logout,                          ['U', 'Y', 'Y', 'Y', 'Y']),
            (Action::SendCommand,                     ['U', 'F', 'Y', 'F', 'F']),
            (Action::ReadCommands,                    ['U', 'F', 'Y', 'Y', 'F']),
            (Action::ApproveCommands,                 ['U', 'F', 'Y', 'F', 'F']),
            (Action::ManageFirmware,                  ['U', 'F', 'Y', 'F', 'F']),
            (Action::ReadFirmware,                    ['U', 'F', 'Y', 'Y', 'F']),
            (Action::ReadAlarms,                      ['U', 'F', 'Y', 'Y', 'F']),
            (Action::AcknowledgeAlarms,               ['U', 'F', 'Y', 'F', 'F']),
            (Action::ReadTopology,                    ['U', 'F', 'Y', 'Y', 'F']),
            (Action::ManageTopology,                  ['U', 'F', 'Y', 'F', 'F']),
            (Action::ExportOwnReadings,               ['U', 'Y', 'F', 'F', 'F']),
        ];
        let principals: Vec<Option<Principal>> = std::iter::once(None)
            .chain(Role::ALL.into_iter().map(|r| Some(principal(r))))
            .collect();
        for (action, row) in &table {
            for (p, want) in principals.iter().zip(row) {
                let want = match want {
                    'Y' => Decision::Allow,
                    'U' => Decision::Deny(DenyReason::Unauthenticated),
                    'F' => Decision::Deny(DenyReason::Forbidden),
                    'N' => Decision::Deny(DenyReason::NotFound),
                    c => panic!("bad cell {c}"),
                };
                let got = authorize(p.as_ref(), action.clone());
                assert_eq!(got, want, "{action:?} by {:?}", p.as_ref().map(|p| p.role));
            }
        }
        // The table names every action variant (a new variant must be added to it).
        let covered = |a: &Action| {
            table
                .iter()
                .any(|(t, _)| std::mem::discriminant(t) == std::mem::discriminant(a))
        };
        for a in [
            Action::Health,
            Action::ListMeters,
            Action::ReadMeter(own.clone()),
            Action::ReadReadings(own.clone()),
            Action::ReadMeterEvents(own.clone()),
            Action::ReadSecurityEvents,
            Action::ReadOutbox,
            Action::ReadMetrics,
            Action::ListUsers,
            Action::ManageUsers,
            Action::ReadAudit,
            Action::ReadSelf,
            Action::Logout,
            Action::SendCommand,
            Action::ReadCommands,
            Action::ApproveCommands,
            Action::ManageFirmware,
            Action::ReadFirmware,
            Action::ReadAlarms,
            Action::AcknowledgeAlarms,
            Action::ReadTopology,
            Action::ManageTopology,
            Action::ExportOwnReadings,
        ] {
            // Exhaustive match: adding a variant without adding it here fails to compile.
            match a {
                Action::Health
                | Action::ListMeters
                | Action::ReadMeter(_)
                | Action::ReadReadings(_)
                | Action::ReadMeterEvents(_)
                | Action::ReadSecurityEvents
                | Action::ReadOutbox
                | Action::ReadMetrics
                | Action::ListUsers
                | Action::ManageUsers
                | Action::ReadAudit
                | Action::ReadSelf
                | Action::Logout
                | Action::SendCommand
                | Action::ReadCommands
                | Action::ApproveCommands
                | Action::ManageFirmware
                | Action::ReadFirmware
                | Action::ReadAlarms
                | Action::AcknowledgeAlarms
                | Action::ReadTopology
                | Action::ManageTopology
                | Action::ExportOwnReadings => assert!(covered(&a), "{a:?}"),
            }
        }
    }

    proptest::proptest! {
        /// Whatever meters a consumer holds, any other meter is a 404, never an Allow.
        #[test]
        fn consumer_never_reads_a_foreign_meter(
            own in proptest::collection::vec("[a-z0-9]{1,8}", 0..5),
            other in "[A-Z]{1,8}",
        ) {
            let p = Principal {
                id: PrincipalId::User("c".into()),
                role: Role::Consumer,
                meters: own.iter().map(|m| meter(m)).collect(),
            };
            let other = meter(&other);
            for a in [Action::ReadMeter(other.clone()), Action::ReadReadings(other.clone()), Action::ReadMeterEvents(other)] {
                proptest::prop_assert_eq!(authorize(Some(&p), a), Decision::Deny(DenyReason::NotFound));
            }
        }
    }

    #[test]
    fn decisions_map_to_statuses() {
        assert_eq!(Decision::Allow.http_status(), 200);
        assert_eq!(
            Decision::Deny(DenyReason::Unauthenticated).http_status(),
            401
        );
        assert_eq!(Decision::Deny(DenyReason::Forbidden).http_status(), 403);
        assert_eq!(Decision::Deny(DenyReason::NotFound).http_status(), 404);
        assert!(Decision::Deny(DenyReason::NotFound).is_probe());
        assert!(!Decision::Deny(DenyReason::Forbidden).is_probe());
        assert!(Decision::Allow.is_allowed());
    }

    #[test]
    fn certificate_consumer_sees_no_meter() {
        let p = crate::principal_for_certificate("x", "01", Role::Consumer);
        assert_eq!(
            authorize(Some(&p), Action::ReadReadings(meter("m"))),
            Decision::Deny(DenyReason::NotFound)
        );
    }
}
