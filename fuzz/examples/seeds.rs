//! Writes the seed corpora of both targets: `cargo run --release --example seeds -- corpus`
//! (in `fuzz/`) creates `corpus/parse` and `corpus/route`.

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    image_replicator_fuzz::write_seeds(std::path::Path::new(&dir)).expect("write the seeds");
}
