//! A model version as the server holds it: one model per inference thread over the same mapped
//! tables, and the encoding of raw rows it was trained with.

use crate::commands::score::{encoder, load_version};
use anyhow::Result;
use dlrm::checkpoint::{self, Meta};
use dlrm::data::preprocess::Encoder;
use dlrm::kernels::parallel::Par;
use dlrm::model::Model;
use dlrm::names::Field;
use dlrm::train::reserve_checked;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A loaded checkpoint version.
pub struct Served {
    /// The version folder, and its name (the checkpoint version reported).
    pub version: PathBuf,
    pub name: String,
    pub meta: Meta,
    pub encoder: Encoder,
    /// One per inference thread (each runs its forward passes on its own buffers); their
    /// tables are the same files, mapped copy-on-write and never written, so they share the
    /// page cache with each other and with any other process serving the checkpoint.
    models: Vec<Mutex<Box<dyn Model>>>,
}

impl Served {
    /// Loads the version `checkpoint` names (its LATEST, or itself) once per inference thread,
    /// each model's buffers sized for `max_batch_rows` rows.
    pub fn load(
        checkpoint: &Path,
        threads: usize,
        max_batch_rows: usize,
        allow_non_finite: bool,
    ) -> Result<Served> {
        let version = checkpoint::resolve(checkpoint)?;
        let meta = checkpoint::read_meta(&version)?;
        let encoder = encoder(&version)?;
        let models = (0..threads)
            .map(|i| {
                // The first load checks every value; the others map the same files again.
                let opts = checkpoint::LoadOptions {
                    allow_non_finite: allow_non_finite || i > 0,
                };
                let mut model = load_version(&version, opts)?;
                // Each thread runs its own passes: the kernels stay on it.
                model.set_parallelism(Par::Seq);
                let flag = Field::Named("--max-batch-rows");
                reserve_checked(model.as_mut(), max_batch_rows, false, flag)?;
                Ok(Mutex::new(model))
            })
            .collect::<Result<_>>()?;
        let name = version
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        Ok(Served {
            version,
            name,
            meta,
            encoder,
            models,
        })
    }

    /// The model of inference thread `index`.
    pub fn model(&self, index: usize) -> MutexGuard<'_, Box<dyn Model>> {
        self.models[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What `/v1/model` answers.
    pub fn describe(&self) -> serde_json::Value {
        let model = self.model(0);
        serde_json::json!({
            "model": self.meta.model,
            "version": self.name,
            "path": self.version.display().to_string(),
            "step": self.meta.train_state.step,
            "architecture": model.config(),
            "encoding": self.encoder.encoding(),
            "encoding_fingerprint": self.meta.encoding_fingerprint,
            "tables": self.encoder.table_sizes(),
        })
    }
}
