//! [`Role`], [`Principal`], [`PrincipalId`]: who is asking.
//!
//! A principal is built only from a credential: a session ([`crate::Access::authenticate`])
//! or a verified client certificate ([`principal_for_certificate`]); never from a request.

use std::fmt;
use std::str::FromStr;

use gridward_core::MeterId;

/// What a principal may do; [`crate::authorize`] holds the rules.
///
/// Serialised as its lower-case name (`"consumer"`, ...).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A customer: sees only the meters bound to them.
    Consumer,
    /// Runs the fleet: meters, readings, meter and security events, outbox, metrics.
    Operator,
    /// Reads the audit log and security events, and meter metadata; changes nothing.
    Auditor,
    /// Manages users and roles; sees meter metadata, neither readings nor the audit log.
    Admin,
}

impl Role {
    /// Every role, in a fixed order (for tables and tests).
    pub const ALL: [Role; 4] = [Role::Consumer, Role::Operator, Role::Auditor, Role::Admin];

    /// The role's name as stored and shown: `consumer`, `operator`, `auditor`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Consumer => "consumer",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    /// Whether a user of this role must have a second factor (TOTP): every role but consumer.
    pub fn requires_totp(self) -> bool {
        !matches!(self, Role::Consumer)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Role`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}; expected consumer, operator, auditor or admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// The identity behind a principal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PrincipalId {
    /// A user who logged in with a password (and a second factor where required).
    User(String),
    /// A program holding a client certificate issued by the Gridward CA.
    Certificate {
        /// The certificate's subject (as `gridward_pki::identity_of` names it).
        subject: String,
        /// Its serial number (hex).
        serial: String,
    },
}

/// An authenticated principal: identity, role, and for consumers the bound meters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Who it is.
    pub id: PrincipalId,
    /// What it may do.
    pub role: Role,
    /// The meters a consumer is bound to (empty for other roles).
    pub meters: Vec<MeterId>,
}

impl Principal {
    /// The actor as the audit log writes it: `user:NAME` or `cert:SUBJECT`.
    pub fn actor_string(&self) -> String {
        match &self.id {
            PrincipalId::User(name) => format!("user:{name}"),
            PrincipalId::Certificate { subject, .. } => format!("cert:{subject}"),
        }
    }

    /// Whether this principal may see `meter` at all: a consumer only its bound meters, the
    /// other roles every meter (what they may see *of* it is [`crate::authorize`]'s decision).
    /// Handlers of [`crate::Action::ListMeters`] filter with this.
    pub fn sees_meter(&self, meter: &MeterId) -> bool {
        match self.role {
            Role::Consumer => self.meters.contains(meter),
            Role::Operator | Role::Auditor | Role::Admin => true,
        }
    }
}

/// The principal of a program that presented a verified client certificate, with the role the
/// head-end's configuration gives that certificate. It is bound to no meter.
pub fn principal_for_certificate(
    subject: impl Into<String>,
    serial: impl Into<String>,
    role: Role,
) -> Principal {
    Principal {
        id: PrincipalId::Certificate {
            subject: subject.into(),
            serial: serial.into(),
        },
        role,
        meters: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().is_err());
        assert!("Admin".parse::<Role>().is_err());
    }

    #[test]
    fn role_serialises_as_its_name() {
        assert_eq!(
            serde_json::to_string(&Role::Auditor).unwrap(),
            "\"auditor\""
        );
        assert_eq!(
            serde_json::from_str::<Role>("\"admin\"").unwrap(),
            Role::Admin
        );
    }

    #[test]
    fn actor_strings() {
        let u = Principal {
            id: PrincipalId::User("alice".into()),
            role: Role::Operator,
            meters: vec![],
        };
        assert_eq!(u.actor_string(), "user:alice");
        let c = principal_for_certificate("billing-client", "0a1b", Role::Operator);
        assert_eq!(c.actor_string(), "cert:billing-client");
        assert!(c.meters.is_empty());
    }

    #[test]
    fn consumers_see_only_their_meters() {
        let m1 = MeterId::new("m1").unwrap();
        let m2 = MeterId::new("m2").unwrap();
        let c = Principal {
            id: PrincipalId::User("carol".into()),
            role: Role::Consumer,
            meters: vec![m1.clone()],
        };
        assert!(c.sees_meter(&m1));
        assert!(!c.sees_meter(&m2));
        let o = Principal {
            role: Role::Operator,
            meters: vec![],
            ..c
        };
        assert!(o.sees_meter(&m2));
    }
}
