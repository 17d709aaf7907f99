//! The bounds of the queues between the network, the node or relay thread,
//! and subscribers, and the one blocking wait the state machine threads
//! use on them.
//!
//! Every queue that what others send can fill is bounded. A full queue
//! makes its writer wait (the task reading a peer's connection stops
//! reading it, and QUIC's flow control slows the peer down; an API caller
//! waits for its answer), or, where waiting would hold up others, the
//! writer is told and the work goes back where it came from (a frame for
//! a relay whose queue is full fails back to the node, whose engine keeps
//! the message in its outbox).

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use smol::channel;
use smol::future::FutureExt;

/// Messages waiting for a node's or a relay's thread: frames from peers,
/// API requests. About one transaction's worth of work (a batch is at most
/// 256 steps) times a few, so the thread always has its next batch ready.
pub const STATE_MACHINE_QUEUE: usize = 1_024;

/// Work the node has asked of its network thread and that it has not
/// taken yet; when full the node thread waits before taking more input.
pub const NETWORK_QUEUE: usize = 1_024;

/// Bytes of frames waiting to be written to one relay. A relay that leaves
/// this much unread is congested: further frames fail back to the node
/// rather than pile up.
pub const RELAY_WRITE_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// Events a subscriber may leave unread before it is dropped (its
/// receiver then reports the channel closed), so a subscriber that stopped
/// reading cannot hold the node's memory.
pub const SUBSCRIBER_BUFFER: usize = 65_536;

/// The next message from `first` (taken before `second`'s) or `second`,
/// waiting at most `wait` (forever with `None`): the blocking receive of a
/// thread that runs a state machine over queues the network fills.
pub fn recv_either<T>(
    first: &channel::Receiver<T>,
    second: &channel::Receiver<T>,
    wait: Option<Duration>,
) -> Result<T, RecvTimeoutError> {
    if let Ok(msg) = first.try_recv() {
        return Ok(msg);
    }
    if let Ok(msg) = second.try_recv() {
        return Ok(msg);
    }
    let next = async {
        let either = first.recv().or(second.recv()).await;
        either.map_err(|_| RecvTimeoutError::Disconnected)
    };
    match wait {
        None => smol::block_on(next),
        Some(wait) => smol::block_on(next.or(async {
            smol::Timer::after(wait).await;
            Err(RecvTimeoutError::Timeout)
        })),
    }
}

/// [`recv_either`] over one queue.
pub fn recv_within<T>(rx: &channel::Receiver<T>, wait: Option<Duration>) -> Result<T, RecvTimeoutError> {
    recv_either(rx, rx, wait)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_first_queue_is_taken_before_the_second_and_an_empty_wait_times_out() {
        let (data_tx, data) = channel::bounded::<u32>(2);
        let (control_tx, control) = channel::unbounded::<u32>();
        data_tx.try_send(1).unwrap();
        control_tx.try_send(2).unwrap();
        assert_eq!(recv_either(&control, &data, None), Ok(2));
        assert_eq!(recv_either(&control, &data, None), Ok(1));
        let started = std::time::Instant::now();
        assert_eq!(recv_either(&control, &data, Some(Duration::from_millis(30))), Err(RecvTimeoutError::Timeout));
        assert!(started.elapsed() >= Duration::from_millis(30));
        // A message that arrives during the wait ends it.
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            data_tx.send_blocking(3).unwrap();
            data_tx
        });
        assert_eq!(recv_either(&control, &data, None), Ok(3));
        drop(sender.join().unwrap());
        drop(control_tx);
        assert_eq!(recv_within(&data, None), Err(RecvTimeoutError::Disconnected));
    }
}
