//! The image-replicator appliance as a library: `main.rs` is a thin command-line front end.
//! The modules are laid out one concern each; README.md has the map.

pub mod admin;
pub mod auth;
pub mod backup;
pub mod cache;
pub mod cli;
pub mod copy;
pub mod demo;
pub mod direct;
pub mod disk;
pub mod error;
pub mod formats;
pub mod glance;
pub mod http;
pub mod keystone;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod net;
pub mod peer;
pub mod regions;
pub mod remote;
pub mod reuse;
pub mod server;
pub mod service;
pub mod store;
pub mod text;
pub mod worker;
