//! The git commit loadgen is built from, for its reports (`LOADGEN_GIT_COMMIT`):
//! `git rev-parse HEAD`, "unknown" outside a git checkout (a source tarball, a vendored
//! crate) or without git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LOADGEN_GIT_COMMIT={commit}");
    // Rebuilt when HEAD moves: HEAD itself (a checkout), the branch it points at (a
    // commit) and packed refs. `--git-path` finds them in a worktree too.
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &branch]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
