//! One module per subcommand.

pub mod preprocess;
pub mod synth;
pub mod train;
