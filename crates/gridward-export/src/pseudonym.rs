//! Keyed pseudonyms: [`Pseudonymiser`].
//!
//! A meter's pseudonym is `p-` and the lower-case hex of the first 16 bytes of
//! HMAC-SHA-256(export key, `gridward/export/v1` ‖ meter id); a group's (a concentrator id or a
//! name from a groups file) is `g-` and the same over `gridward/export/v1/group:` ‖ name. Meter
//! ids never contain `/`, so the two inputs can never coincide, and a concentrator (which is
//! also in the meters table) gets unrelated pseudonyms as a meter and as a group.
//!
//! 128 bits: no two meters of a fleet share a pseudonym in practice, and without the key a
//! pseudonym says nothing about the id (HMAC is a PRF). With the key, a guessed id can be
//! checked, so the key stays with the operators.

use aws_lc_rs::hmac;
use gridward_core::MeterId;

use crate::key::ExportKey;

/// What a meter's pseudonym is computed over, before the meter id.
pub const METER_LABEL: &[u8] = b"gridward/export/v1";
/// What a group's pseudonym is computed over, before the group name.
pub const GROUP_LABEL: &[u8] = b"gridward/export/v1/group:";
/// Prefix of a meter's pseudonym.
pub const METER_PREFIX: &str = "p-";
/// Prefix of a group's pseudonym.
pub const GROUP_PREFIX: &str = "g-";
/// Bytes of the HMAC kept.
pub const PSEUDONYM_BYTES: usize = 16;

/// The scheme, as the export's metadata states it (never the key).
pub const SCHEME: &str = "meters: p- then hex(first 16 bytes of HMAC-SHA-256(export key, \
    \"gridward/export/v1\" || meter id)); groups: g- then the same over \
    \"gridward/export/v1/group:\" || group name; one key per recipient";

/// Turns meter ids and group names into pseudonyms under one export key.
pub struct Pseudonymiser {
    key: hmac::Key,
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymiser(..)")
    }
}

impl Pseudonymiser {
    /// A pseudonymiser under `key`.
    pub fn new(key: &ExportKey) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key.bytes()),
        }
    }

    fn tag(&self, prefix: &str, label: &[u8], name: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(label);
        ctx.update(name.as_bytes());
        let tag = ctx.sign();
        let mut out = String::with_capacity(prefix.len() + 2 * PSEUDONYM_BYTES);
        out.push_str(prefix);
        out.push_str(&hex::encode(&tag.as_ref()[..PSEUDONYM_BYTES]));
        out
    }

    /// The pseudonym of `meter`: `p-` and 32 hex digits.
    pub fn meter(&self, meter: &MeterId) -> String {
        self.tag(METER_PREFIX, METER_LABEL, meter.as_str())
    }

    /// The pseudonym of the group `name`: `g-` and 32 hex digits.
    pub fn group(&self, name: &str) -> String {
        self.tag(GROUP_PREFIX, GROUP_LABEL, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn m(s: &str) -> MeterId {
        MeterId::new(s).unwrap()
    }

    #[test]
    fn the_pseudonym_is_the_documented_hmac() {
        let key = ExportKey::from_bytes([0x42; 32]);
        let p = Pseudonymiser::new(&key);
        let mut data = METER_LABEL.to_vec();
        data.extend_from_slice(b"GW000001");
        let want = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &[0x42; 32]), &data);
        assert_eq!(
            p.meter(&m("GW000001")),
            format!("p-{}", hex::encode(&want.as_ref()[..16]))
        );
        assert_eq!(p.meter(&m("GW000001")).len(), 2 + 32);
    }

    #[test]
    fn stable_under_one_key_unrelated_under_another() {
        let a = Pseudonymiser::new(&ExportKey::from_bytes([1; 32]));
        let a_again = Pseudonymiser::new(&ExportKey::from_bytes([1; 32]));
        let b = Pseudonymiser::new(&ExportKey::from_bytes([2; 32]));
        let ids: Vec<MeterId> = (0..500).map(|i| m(&format!("GW{i:06}"))).collect();
        let pa: Vec<String> = ids.iter().map(|i| a.meter(i)).collect();
        let pa2: Vec<String> = ids.iter().map(|i| a_again.meter(i)).collect();
        let pb: HashSet<String> = ids.iter().map(|i| b.meter(i)).collect();
        assert_eq!(pa, pa2, "the same key gives the same pseudonyms");
        let set_a: HashSet<&String> = pa.iter().collect();
        assert_eq!(set_a.len(), ids.len(), "no two meters share a pseudonym");
        assert!(
            pa.iter().all(|p| !pb.contains(p)),
            "another key gives a disjoint set"
        );
    }

    #[test]
    fn a_concentrator_as_group_and_as_meter_gets_unrelated_pseudonyms() {
        let p = Pseudonymiser::new(&ExportKey::from_bytes([3; 32]));
        let as_meter = p.meter(&m("dc-1"));
        let as_group = p.group("dc-1");
        assert!(as_group.starts_with("g-") && as_meter.starts_with("p-"));
        assert_ne!(as_meter[2..], as_group[2..]);
    }

    #[test]
    fn debug_prints_nothing_of_the_key() {
        let p = Pseudonymiser::new(&ExportKey::from_bytes([3; 32]));
        assert_eq!(format!("{p:?}"), "Pseudonymiser(..)");
    }
}
