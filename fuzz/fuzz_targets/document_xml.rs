//! Fuzzes the strict XML document parser: it must never panic, and whatever it accepts must
//! re-encode to a document that parses back to itself, in both formats.
#![no_main]

use gridward_core::document::{self, Format, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = document::parse(data, Format::Xml, &Limits::default()) {
        for f in [Format::Xml, Format::Json] {
            let again = document::parse(doc.encode(f).as_bytes(), f, &Limits::default());
            assert_eq!(again.as_ref(), Ok(&doc), "re-encoded as {f:?}");
        }
    }
});
