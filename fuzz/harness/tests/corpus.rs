//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! harness on stable, so every input the fuzzer kept, including the reproducer
//! of each bug it found, runs in the normal `cargo test`.

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target)
}

#[test]
fn every_corpus_input_passes_its_target() {
    let mut failures = Vec::new();
    for (target, run) in overlay_fuzz_harness::TARGETS {
        let dir = corpus_dir(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus of {target} at {}: {e}", dir.display()));
        let mut inputs = 0;
        for entry in entries {
            let path = entry.expect("corpus directory entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            inputs += 1;
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                failures.push(path.display().to_string());
            }
        }
        assert!(inputs > 0, "the corpus of {target} is empty");
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for (target, _) in overlay_fuzz_harness::TARGETS {
        let file = fuzz.join("fuzz_targets").join(format!("{target}.rs"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains(&format!("overlay_fuzz_harness::{target}(")),
            "{} does not call the harness",
            file.display()
        );
    }
}
