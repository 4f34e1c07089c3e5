//! Several router nodes on the real RabbitMQ: presence, requests and events across
//! nodes, a device moving between nodes with a request in flight, duplicate
//! deliveries, a node killed with -9.
//!
//! Each test runs in its own RabbitMQ vhost (created with `rabbitmqctl`, deleted at
//! the end, also when the test fails), so exchanges, queues and presence traffic of
//! one test never reach another or anyone else using the broker.

#[path = "../common/mod.rs"]
mod common;

mod across_nodes;
mod forged;
mod links;
mod membership;
mod nodes;
mod revocation;
mod tenants;
