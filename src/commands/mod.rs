//! One module per subcommand.

pub mod compare;
pub mod models;
pub mod train;
