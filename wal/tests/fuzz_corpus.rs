//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`) through the fuzz targets' checks
//! under `cargo test` (TESTING.md S4); `-- --ignored write_seeds` regenerates the seed files.
//!
//! The checks are the fuzz targets' own, included from `fuzz/src/wal_checks.rs` (this crate cannot
//! depend on the fuzz crate, which builds only under `cargo fuzz`).

include!("../../fuzz/src/wal_checks.rs");

#[cfg(test)]
mod corpus {
    use std::path::{Path, PathBuf};

    use super::*;

    type Check = fn(&[u8]);

    const TARGETS: [(&str, Check); 3] = [
        ("record_decode", check_record_decode),
        ("batch_roundtrip", check_batch_roundtrip),
        ("recover_image", check_recover_image),
    ];

    include!("../../fuzz/corpus_replay.rs");

    #[test]
    fn record_decode_corpus() {
        assert!(replay("corpus", "record_decode") >= 5);
    }

    #[test]
    fn batch_roundtrip_corpus() {
        assert!(replay("corpus", "batch_roundtrip") >= 5);
    }

    #[test]
    fn recover_image_corpus() {
        assert!(replay("corpus", "recover_image") >= 5);
    }

    /// Inputs of bugs found by fuzzing and not fixed yet (none today; fixed ones move into the
    /// corpus, prefixed `regression-`): run with `-- --ignored` to check a fix.
    #[test]
    #[ignore = "open bugs, if any: see fuzz/regressions/*/README.md"]
    fn open_regressions() {
        for (target, _) in TARGETS {
            replay("regressions", target);
        }
    }

    // ---- Seed corpus: `cargo test -p flotilla-wal --test fuzz_corpus -- --ignored write_seeds`

    fn sample_batch() -> WriteBatch {
        let mut batch = WriteBatch::new();
        batch
            .add_tagged_entries(
                GroupId(7),
                1,
                [(1, 1, Bytes::from_static(b"a")), (1, 0, Bytes::new())],
            )
            .set_hard_state(GroupId(7), HardState { term: 1, vote: 2, commit: 1 })
            .truncate_suffix(GroupId(9), 4)
            .compact(GroupId(7), 1, 1)
            .remove_group(GroupId(3));
        batch
    }

    fn record(segment_seq: u64, write_seq: u64, batch: &WriteBatch) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&mut out, segment_seq, write_seq, write_seq - 1, &batch.encode_body());
        out
    }

    fn record_decode_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let seeded = |seq: u64, rest: &[u8]| [&seq.to_le_bytes()[..], rest].concat();
        let mut entries = WriteBatch::new();
        entries.add_tagged_entries(
            GroupId(1),
            5,
            (0..4).map(|i| (2, i * 85, Bytes::from(vec![i; 40]))),
        );
        let mut two = record(5, 3, &entries);
        two.extend(record(5, 4, &sample_batch()));
        let header = SegmentHeader { seq: 7, size: 4096 }.encode();
        let workload = run_workload(1);
        let (name, segment) = workload
            .sealed
            .iter()
            .find(|(name, _)| parse_segment_file_name(name).is_some())
            .expect("a live segment");
        let seq = parse_segment_file_name(name).expect("a live segment");
        vec![
            ("record-all-items", seeded(1, &record(1, 2, &sample_batch()))),
            ("record-entries", seeded(42, &record(42, 9, &entries))),
            ("record-empty-body", seeded(2, &record(2, 1, &WriteBatch::new()))),
            ("two-records", seeded(5, &two)),
            (
                "segment-header-then-record",
                seeded(7, &[&header[..], &record(7, 1, &entries)].concat()),
            ),
            ("body-only", seeded(3, &sample_batch().encode_body())),
            ("segment-prefix", seeded(seq, &segment[..1024])),
        ]
    }

    /// Encodes a batch the way `read_batch` reads it (entries: at most 8, payloads < 256 bytes;
    /// each entry's term, tag, payload length and payload).
    fn encode_batch(batch: &WriteBatch) -> Vec<u8> {
        let mut out = Vec::new();
        for op in batch.ops() {
            let kind: u8 = match op {
                Op::Entries { .. } => 0,
                Op::HardState { .. } => 1,
                Op::Truncate { .. } => 2,
                Op::Compact { .. } => 3,
                Op::RemoveGroup { .. } => 4,
            };
            out.push(kind);
            out.extend(op.group().0.to_le_bytes());
            match op {
                Op::Entries { first_index, entries, .. } => {
                    out.push(u8::try_from(entries.len() - 1).expect("at most 8 entries"));
                    out.extend(first_index.to_le_bytes());
                    for (term, tag, payload) in entries {
                        out.extend(term.to_le_bytes());
                        out.push(*tag);
                        out.push(u8::try_from(payload.len()).expect("a short payload"));
                        out.extend_from_slice(payload);
                    }
                }
                Op::HardState { state, .. } => {
                    for field in [state.term, state.vote, state.commit] {
                        out.extend(field.to_le_bytes());
                    }
                }
                Op::Truncate { from, .. } => out.extend(from.to_le_bytes()),
                Op::Compact { index, term, .. } => {
                    out.extend(index.to_le_bytes());
                    out.extend(term.to_le_bytes());
                }
                Op::RemoveGroup { .. } => {}
            }
        }
        out
    }

    fn batch_input(seqs: [u64; 3], damage: u32, trailing: &[u8], batch: &WriteBatch) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in seqs {
            out.extend(seq.to_le_bytes());
        }
        out.extend(damage.to_le_bytes());
        out.push(u8::try_from(trailing.len()).expect("short trailing bytes"));
        out.extend_from_slice(trailing);
        let encoded = encode_batch(batch);
        assert_eq!(&read_batch(&mut Cursor::new(&encoded)), batch, "the seed encoder is wrong");
        out.extend(encoded);
        out
    }

    fn batch_roundtrip_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut big = WriteBatch::new();
        big.add_tagged_entries(
            GroupId(u64::MAX),
            u64::MAX - 8,
            (0..8).map(|i| (i, 255 - i as u8, Bytes::from(vec![i as u8; 200]))),
        );
        let mut entries = WriteBatch::new();
        entries.add_tagged_entries(GroupId(1), 1, [(1, 2, Bytes::from_static(b"hello"))]);
        let mut each = Vec::new();
        for op in sample_batch().ops() {
            let mut batch = WriteBatch::new();
            batch.push(op.clone());
            each.push(batch);
        }
        vec![
            ("all-items", batch_input([1, 2, 1], 77, b"", &sample_batch())),
            ("empty-batch", batch_input([9, 1, 0], 3, b"tail", &WriteBatch::new())),
            ("one-entry", batch_input([3, 10, 9], 12_345, b"\0\0\0\0\0\0\0\0", &entries)),
            ("eight-large-entries", batch_input([u64::MAX, u64::MAX, 5], u32::MAX, b"", &big)),
            ("only-hard-state", batch_input([4, 4, 3], 200, b"", &each[1])),
            ("only-truncate", batch_input([4, 5, 4], 201, b"", &each[2])),
            ("only-compact", batch_input([4, 6, 5], 202, b"", &each[3])),
            ("only-remove-group", batch_input([4, 7, 6], 203, b"", &each[4])),
        ]
    }

    fn recover_image_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let first_record_bit = ((SEGMENT_HEADER_LEN + 40) * 8) as u32;
        let flip = |file: u8, bit: u32| [&[1, file][..], &bit.to_le_bytes()].concat();
        let overwrite = |file: u8, at: u32, bytes: &[u8]| {
            let len = u8::try_from(bytes.len() - 1).expect("at most 32 bytes");
            [&[0, file][..], &at.to_le_bytes(), &[len], bytes].concat()
        };
        let zero = |file: u8, at: u32, eighths: u8| {
            [&[2, file][..], &at.to_le_bytes(), &[eighths]].concat()
        };
        let truncate = |file: u8, len: u32| [&[3, file][..], &len.to_le_bytes()].concat();
        let remove = |file: u8| vec![4, file];
        vec![
            ("clean-sealed", vec![0, 0]),
            ("clean-compacted-unsealed", vec![1, 1]),
            ("clean-truncate-mode", vec![6, 2]),
            ("flip-first-record", [&[2, 0][..], &flip(0, first_record_bit)].concat()),
            ("flip-last-segment-truncate-mode", [&[5, 3][..], &flip(255, 900 * 8 + 3)].concat()),
            ("overwrite-segment-magic", [&[3, 0][..], &overwrite(1, 0, b"NOTAWAL!")].concat()),
            ("zero-middle-unsealed", [&[4, 1][..], &zero(0, 1000, 64)].concat()),
            ("truncate-file", [&[7, 0][..], &truncate(0, 2000)].concat()),
            ("remove-first-file", [&[9, 0][..], &remove(0)].concat()),
            ("remove-last-file-unsealed", [&[8, 1][..], &remove(255)].concat()),
            (
                "several-damages-truncate-mode",
                [&[11, 2][..], &flip(1, 3000), &zero(2, 64, 4), &overwrite(0, 100, &[0xFF; 32])]
                    .concat(),
            ),
        ]
    }

    #[test]
    #[ignore = "writes the seed corpus into fuzz/corpus"]
    fn write_seeds() {
        let seeds = [
            ("record_decode", record_decode_seeds()),
            ("batch_roundtrip", batch_roundtrip_seeds()),
            ("recover_image", recover_image_seeds()),
        ];
        for (target, files) in seeds {
            let dir = fuzz_dir().join("corpus").join(target);
            std::fs::create_dir_all(&dir).expect("the corpus directory");
            for (name, data) in files {
                std::fs::write(dir.join(name), data).expect("a seed file");
            }
        }
    }
}
