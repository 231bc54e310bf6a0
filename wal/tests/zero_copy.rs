//! T6 on the read path: reading 10,000 entries back allocates no payload bytes (every payload is
//! a slice of the segment's memory map). A counting allocator measures it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use flotilla_wal::{Backend, Config, GroupId, Wal, WriteBatch, block_on};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn reading_ten_thousand_entries_allocates_no_payload_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        segment_bytes: 16 << 20,
        batch_bytes_max: 1 << 20,
        backend: Backend::Portable,
        ..Config::default()
    };
    let (wal, _) = Wal::open(dir.path(), config).unwrap();
    let group = GroupId(3);
    let count = 10_000u64;
    let payload_len = 1024usize;
    for chunk in 0..count / 500 {
        let mut batch = WriteBatch::new();
        let first = chunk * 500 + 1;
        batch.add_entries(
            group,
            first,
            (0..500).map(|i| (1, Bytes::from(vec![((first + i) % 256) as u8; payload_len]))),
        );
        block_on(wal.append(batch)).unwrap();
    }
    let mut out = Vec::with_capacity(count as usize);
    let before = ALLOCATED.load(Ordering::Relaxed);
    wal.entries_into(group, 1..count + 1, &mut out).unwrap();
    let allocated = ALLOCATED.load(Ordering::Relaxed) - before;
    let payload_bytes = count as usize * payload_len;
    assert_eq!(out.len(), count as usize);
    for entry in &out {
        assert_eq!(entry.payload.len(), payload_len);
        assert_eq!(entry.payload[0], (entry.index % 256) as u8);
    }
    assert!(
        allocated < payload_bytes / 100,
        "reading {payload_bytes} payload bytes allocated {allocated} bytes"
    );
    eprintln!("reading {payload_bytes} payload bytes allocated {allocated} bytes");
}
