//! docs/configuration.md names every flag of `router serve` with its environment
//! variable, and `router serve --help` documents every flag.

use clap::{Args, Command};

#[test]
fn every_flag_and_variable_is_documented() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .unwrap();
    let cmd = router::config::ServeConfig::augment_args(Command::new("serve"));
    let mut missing = Vec::new();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if !doc.contains(&format!("`--{long}`")) {
            missing.push(format!("--{long}"));
        }
        if let Some(env) = arg.get_env() {
            let env = env.to_string_lossy();
            if !doc.contains(&format!("`{env}`")) {
                missing.push(env.into_owned());
            }
        }
        if arg
            .get_help()
            .is_none_or(|h| h.to_string().trim().is_empty())
        {
            missing.push(format!("--{long} has no help text"));
        }
    }
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
}
