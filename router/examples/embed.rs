//! The router inside your own program: started on the embedded bus with ephemeral ports,
//! a token minted for one device, the addresses printed; Enter drains and stops it.
//! `cargo run -p router --example embed`
use std::io::BufRead;

fn main() -> anyhow::Result<()> {
    let secret = "example-secret-0123456789abcdef0123456789";
    let config = router::config::ServeConfig::for_tests(secret);
    let handle = router::start(config)?;
    let (device, account) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let token = router::auth::mint(secret, device, account, 3600);
    println!(
        "device {device}: ws://{}/ws with `Authorization: Bearer {token}`",
        handle.ws_addr
    );
    println!(
        "its requests: POST http://{}/v1/devices/{device}/requests",
        handle.api_addr
    );
    println!("every event:  GET http://{}/v1/events", handle.api_addr);
    println!("Enter stops the router.");
    std::io::stdin().lock().lines().next();
    handle.drain();
    Ok(())
}
