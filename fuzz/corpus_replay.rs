// The corpus replay both `wal/tests/fuzz_corpus.rs` and `engine/tests/fuzz_corpus.rs` include in
// their `corpus` module: each defines `TARGETS` (target name → check) and imports `Path` and
// `PathBuf`.

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(listing) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = listing
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file() && path.extension().is_none_or(|ext| ext != "md"))
        .collect();
    files.sort();
    files
}

/// Runs every file of `fuzz/<kind>/<target>/` through the target's check; returns the count.
fn replay(kind: &str, target: &str) -> usize {
    let check = TARGETS.iter().find(|(name, _)| *name == target).expect("a known target").1;
    let files = files(&fuzz_dir().join(kind).join(target));
    for path in &files {
        let data = std::fs::read(path).expect("a readable corpus file");
        eprintln!("replaying {}", path.display());
        check(&data);
    }
    files.len()
}
