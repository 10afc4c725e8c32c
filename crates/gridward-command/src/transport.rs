//! [`Transport`]: how commands reach meters. The head-end implements it over its MQTT endpoint;
//! this crate never sees a socket.

use bytes::Bytes;
use gridward_core::MeterId;
use tokio::sync::oneshot;

/// What became of one publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The meter acknowledged receipt (MQTT PUBACK): it has the bytes.
    Acked,
    /// The connection ended before the meter acknowledged: it may or may not have the bytes.
    Lost,
}

/// The meter has no live session subscribed to the topic; nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the meter is not reachable now; the message stays queued until it connects")]
pub struct NotReachable;

/// The link to meters, as the dispatcher needs it.
///
/// A dropped [`oneshot::Sender`] counts as [`Delivery::Lost`].
pub trait Transport: Send + Sync + 'static {
    /// Whether `meter` has a session that would receive a publication now.
    fn is_reachable(&self, meter: &MeterId) -> bool;

    /// Publishes `payload` on `topic` to `meter` (QoS 1); the receiver resolves once the meter
    /// acknowledged it or the connection ended.
    ///
    /// # Errors
    ///
    /// [`NotReachable`] if the meter has no session now.
    fn send(
        &self,
        meter: &MeterId,
        topic: String,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<Delivery>, NotReachable>;
}
