//! Integration tests of the `gridward` binary against real peers: OpenSSL, Java keytool,
//! Mosquitto's MQTT clients and Eclipse Paho, and crash tests of the head-end.
//!
//! One test binary (`it`), one module per peer.

mod bench;
mod cli;
mod crash;
mod downstream;
mod headend;
mod keytool;
mod mqtt_peers;
mod openssl;
mod support;
mod testssl;
