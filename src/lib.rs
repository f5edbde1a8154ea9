//! kura backs up PostgreSQL and CouchDB to IBM Cloud Object Storage (S3) or a local directory
//! and restores them. The binary (`src/main.rs`) is a thin shell around [`cli::run`].

pub mod calendar;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod jobs;
pub mod logging;
pub mod observe;
pub mod ops;
pub mod pipeline;
pub mod process;
pub mod progress;
pub mod retention;
pub mod retry;
pub mod storage;
pub mod tls;

pub use error::{Error, ErrorKind, Result};
