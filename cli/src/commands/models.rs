//! The flags of the models of `dlrm train --model` and `dlrm compare` beyond the DLRM
//! architecture flags (which give every model its tables, embedding width and dense feature
//! count); the library builds the models ([`dlrm::spec`]).

use anyhow::Result;
use clap::Args;
use dlrm::model::architecture::check_dims;
use dlrm::names::Field;
use dlrm::spec::ModelOptions;

/// Flags of the models other than DLRM.
#[derive(Args, Clone, Debug)]
pub struct ModelFlags {
    /// DCN, DCN-v2: number of cross layers.
    #[arg(long, default_value_t = 6)]
    pub cross_layers: usize,
    /// DCN, DCN-v2: widths of the deep network's layers, dash-separated (its input is the dense
    /// features and the embeddings side by side).
    #[arg(long, value_delimiter = '-', default_value = "512-256")]
    pub arch_mlp_deep: Vec<usize>,
    /// FM, MF: L2 regularisation of the embedding rows each step looks up (added to their
    /// gradient times this factor, inside the fused sparse update).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
}

impl ModelFlags {
    /// The options the flags give.
    pub fn options(&self) -> Result<ModelOptions> {
        Ok(ModelOptions {
            cross_layers: self.cross_layers,
            deep: {
                check_dims(Field::Named("--arch-mlp-deep"), &self.arch_mlp_deep)?;
                self.arch_mlp_deep.clone()
            },
            weight_decay: self.weight_decay,
        })
    }
}
