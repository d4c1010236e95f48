//! The flags of the models of `dlrm train --model` and `dlrm compare` beyond the DLRM
//! architecture flags (which give every model its tables, embedding width and dense feature
//! count); the library builds the models ([`dlrm::spec`]).

use anyhow::Result;
use clap::Args;
use dlrm::model::architecture::check_dims;
use dlrm::names::Field;
use dlrm::spec::ModelOptions;

/// The deep network of DCN and DCN-v2 without --arch-mlp-deep (`dlrm train`).
const DEFAULT_DEEP: [usize; 2] = [512, 256];

/// Flags of the models other than DLRM.
#[derive(Args, Clone, Debug)]
pub struct ModelFlags {
    /// DCN, DCN-v2: number of cross layers.
    #[arg(long, default_value_t = 6)]
    pub cross_layers: usize,
    /// DCN, DCN-v2: widths of the deep network's layers, dash-separated (its input is the dense
    /// features and the embeddings side by side) [default: 512-256; `dlrm compare`: the hidden
    /// widths of DLRM's top MLP, 64 with the tiny preset]
    #[arg(long, value_delimiter = '-')]
    pub arch_mlp_deep: Option<Vec<usize>>,
    /// FM, MF: L2 regularisation of the embedding rows each step looks up (added to their
    /// gradient times this factor, inside the fused sparse update) [default: 0; 0.001 for
    /// `dlrm train --model mf`]
    #[arg(long)]
    pub weight_decay: Option<f32>,
}

impl ModelFlags {
    /// The options the flags give, with `default_weight_decay` where --weight-decay is not
    /// given.
    pub fn options(&self, default_weight_decay: f32) -> Result<ModelOptions> {
        Ok(ModelOptions {
            cross_layers: self.cross_layers,
            deep: match &self.arch_mlp_deep {
                Some(deep) => {
                    check_dims(Field::Named("--arch-mlp-deep"), deep)?;
                    deep.clone()
                }
                None => DEFAULT_DEEP.to_vec(),
            },
            weight_decay: self.weight_decay.unwrap_or(default_weight_decay),
        })
    }
}
