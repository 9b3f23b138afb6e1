//! The dashboard page served at `/`, embedded in the binary.

pub const INDEX_HTML: &str = include_str!("dashboard/index.html");
