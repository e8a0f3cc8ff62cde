//! Reading the dataplane's flow-event ring buffer: a task that wakes when
//! the kernel submits events and hands each, decoded, to the agent's main
//! task.

use aya::maps::{MapData, RingBuf};
use egress_common::events::FlowEvent;
use log::warn;
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};

use super::FlowRecord;

/// The event in a ring-buffer record, or `None` for a record of another
/// size (an object of another version).
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() != size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: exactly `size_of::<FlowEvent>()` readable bytes; FlowEvent is
    // plain integers (every bit pattern valid); read_unaligned because
    // ring-buffer records are only 8-byte aligned by the kernel's contract,
    // which the slice type does not tell the compiler.
    Some(unsafe { bytes.as_ptr().cast::<FlowEvent>().read_unaligned() })
}

/// Read `ring` until the agent stops, sending every decodable event to
/// `tx`. When the main task is slow the send waits, the ring buffer fills
/// and the dataplane counts what it could not submit (`flow_log_lost`).
pub fn spawn<T: From<FlowRecord> + Send + 'static>(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<T>,
) -> std::io::Result<JoinHandle<()>> {
    // SAFETY: the ring buffer owns its map's fd and keeps it open,
    // unchanged, for as long as the AsyncFd that now owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register(ring) }?;
    Ok(tokio::spawn(async move {
        let mut undecodable = 0u64;
        loop {
            let Ok(mut guard) = ring.readable_mut().await else {
                return;
            };
            // Drained in batches: records stay reserved in the ring buffer
            // until read, so read a few and hand them on.
            loop {
                let mut batch = Vec::with_capacity(64);
                while batch.len() < 64 {
                    let Some(item) = guard.get_inner_mut().next() else {
                        break;
                    };
                    match decode(&item).as_ref().and_then(FlowRecord::from_event) {
                        Some(record) => batch.push(record),
                        None => {
                            undecodable += 1;
                            if undecodable == 1 {
                                warn!(
                                    "flow log: a flow event of {} bytes this agent cannot read (a dataplane of another version?); such events are skipped",
                                    item.len()
                                );
                            }
                        }
                    }
                }
                let drained = batch.len() < 64;
                for record in batch {
                    if tx.send(record.into()).await.is_err() {
                        return;
                    }
                }
                if drained {
                    break;
                }
            }
            guard.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flowlog_decode_wrong_size_refused() {
        assert_eq!(decode(&[0u8; 16]), None);
        let ev = FlowEvent {
            time_ns: 42,
            kind: 1,
            ..FlowEvent::default()
        };
        // SAFETY: FlowEvent is plain integers; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<FlowEvent>())
        };
        assert_eq!(decode(bytes), Some(ev));
    }
}
