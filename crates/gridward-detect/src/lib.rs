//! # gridward-detect
//!
//! SKELETON (issue 11): the detection helper fills this crate in (see /work/helpers/ISSUE11.md).

#![forbid(unsafe_code)]
