//! Integration tests of the `gridward` binary against real peers: OpenSSL, Java keytool,
//! Mosquitto's MQTT clients and Eclipse Paho, crash tests of the head-end, and the firmware CLI.
//!
//! One test binary (`it`), one module per peer.

mod alarms_cli;
mod at_rest;
mod bench;
mod cli;
mod command_cli;
mod command_signer_cli;
mod crash;
mod downstream;
mod export_cli;
mod firmware_cli;
mod firmware_ops_cli;
mod headend;
mod keytool;
mod mqtt_peers;
mod openssl;
mod support;
mod testssl;
