//! The binary itself, built by cargo for this test (and so for the
//! end-to-end tests in `tests/`, which run the same file).

use std::process::Command;

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_qflow"))
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("the qflow binary runs: {e}"));
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["run", "plan", "watch", "plugins", "build"] {
        assert!(text.contains(&format!("  {command} ")), "{command} is missing from:\n{text}");
    }
}
