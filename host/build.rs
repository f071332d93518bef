// `sqlx::migrate!` embeds `migrations/` at compile time, but on stable Rust
// it cannot tell cargo to watch that directory: a new migration file would
// otherwise go unnoticed until something else changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
