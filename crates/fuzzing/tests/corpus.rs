//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/*`, seeds and the inputs that
//! once crashed a target included) through every target's body, and the seeds built by
//! `fuzzing::seeds`. A regression of a fixed crash fails here, on stable, in
//! `cargo test --workspace`.

use std::path::{Path, PathBuf};
use std::time::Instant;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_target_replays_its_corpus() {
    let root = corpus_root();
    let mut total = 0;
    for (name, _, body) in fuzzing::TARGETS {
        let dir = root.join(name);
        let inputs = files(&dir);
        assert!(!inputs.is_empty(), "{}: no corpus (run the ignored test write_seeds)", dir.display());
        let start = Instant::now();
        for p in &inputs {
            let data = std::fs::read(p).unwrap();
            // A panic names the input that caused it.
            let r = std::panic::catch_unwind(|| body(&data));
            assert!(r.is_ok(), "{name}: {} panicked", p.display());
        }
        total += inputs.len();
        eprintln!("{name}: {} inputs in {:.2?}", inputs.len(), start.elapsed());
    }
    eprintln!("{total} corpus inputs replayed");
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/fuzz_targets");
    for (name, path, _) in fuzzing::TARGETS {
        let f = dir.join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(text.contains(&format!("fuzzing::{path}(data)")), "{} does not run fuzzing::{path}", f.display());
        let listed = std::fs::read_to_string(dir.join("../Cargo.toml")).unwrap();
        assert!(listed.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has no [[bin]] {name}");
    }
}

#[test]
fn seeds_run() {
    for (target, name, data) in fuzzing::seeds::all() {
        let body = fuzzing::target(target).unwrap_or_else(|| panic!("seed {name}: no target {target}"));
        body(&data);
    }
}

/// Writes the seeds into the corpus folders (run after changing an input layout, then
/// minimise the corpus with `cargo fuzz cmin`).
#[test]
#[ignore]
fn write_seeds() {
    for (target, name, data) in fuzzing::seeds::all() {
        let dir = corpus_root().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}
