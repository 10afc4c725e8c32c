//! Integration tests of the `gridward` binary against real peers: OpenSSL, Java keytool.
//!
//! One test binary (`it`), one module per peer.

mod cli;
mod keytool;
mod openssl;
mod support;
