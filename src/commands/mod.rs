//! One module per subcommand.

pub mod compare;
pub mod export;
pub mod models;
pub mod preprocess;
pub mod serve;
pub mod synth;
pub mod train;
