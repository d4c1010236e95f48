//! `dlrm synth`: synthetic data written as files, to exercise the real-data path (parsing,
//! preprocessing, training from a dataset) without licensed data.

use super::{ThreadArgs, choice, ensure_zipf_alpha};
use anyhow::{Context, Result};
use clap::Args;
use dlrm::cancel::{Cancel, note_removed, partial_path, remove_stale_partials};
use dlrm::config::KAGGLE_TABLE_SIZES;
use dlrm::data::Batch;
use dlrm::data::criteo::SyntheticTsv;
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData};
use dlrm::model::architecture::check_dims;
use dlrm::names::Field;
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// File formats `dlrm synth` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Criteo's tab-separated rows (label, I1-I13, C1-C26), as `dlrm preprocess` reads them.
    CriteoTsv,
}

/// Rows generated and written per step.
const ROWS_PER_BLOCK: usize = 1 << 16;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// The file format.
    #[arg(long, value_enum, default_value_t = Format::CriteoTsv)]
    format: Format,
    /// The file to write (it appears only when complete).
    #[arg(long, short)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Rows to write.
    #[arg(long)]
    rows: u64,
    /// Ids per categorical feature, 26 dash-separated sizes [default: the Kaggle table sizes]
    #[arg(long, value_delimiter = '-')]
    arch_embedding_size: Option<Vec<usize>>,
    /// How ids and labels are drawn (teacher: labels a model can learn).
    #[arg(long, value_parser = choice::<Generation>(), default_value_t = Generation::Teacher)]
    data_generation: Generation,
    /// Exponent of the Zipf distribution of ids.
    #[arg(long, default_value_t = 1.05)]
    zipf_alpha: f64,
    /// Seed of the data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Leave out the label column (as Kaggle's test.txt).
    #[arg(long)]
    no_label: bool,
    #[command(flatten)]
    threads: ThreadArgs,
}

pub fn run(a: SynthArgs, cancel: &Cancel) -> Result<()> {
    let Format::CriteoTsv = a.format;
    super::check_output(&a.out, &[], a.force)?;
    let table_sizes = match &a.arch_embedding_size {
        Some(sizes) => {
            check_dims(Field::TableSizes, sizes)?;
            sizes.clone()
        }
        None => KAGGLE_TABLE_SIZES.to_vec(),
    };
    ensure_zipf_alpha(a.zipf_alpha)?;
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: dlrm::data::criteo::NUM_DENSE,
        table_sizes,
        generation: a.data_generation,
        zipf_alpha: a.zipf_alpha,
        num_indices_per_lookup: 1,
        fixed_bag_size: true,
        seed: a.seed,
    });
    let tsv = SyntheticTsv::new(data).context("--arch-embedding-size")?;
    let (pool, _) = a.threads.pool()?;

    for stale in remove_stale_partials(&a.out) {
        log::warn!("removed {}, left by a run that was killed", stale.display());
    }
    let tmp = partial_path(&a.out)?;
    let bar = if super::show_progress() {
        let b = ProgressBar::new(a.rows);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows  {per_sec}",
            )
            .expect("valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let written = pool.install(|| -> Result<u64> {
        let mut file =
            File::create_new(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut batch = Batch::default();
        let mut buf = Vec::new();
        let mut bytes = 0;
        let mut first = 0;
        while first < a.rows {
            cancel.check()?;
            let count = (a.rows - first).min(ROWS_PER_BLOCK as u64) as usize;
            buf.clear();
            tsv.write_rows(first, count, !a.no_label, &mut batch, &mut buf);
            file.write_all(&buf)
                .with_context(|| format!("writing {}", tmp.display()))?;
            bytes += buf.len() as u64;
            first += count as u64;
            bar.inc(count as u64);
        }
        Ok(bytes)
    });
    bar.finish_and_clear();
    let written = match written {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(note_removed(e, &tmp));
        }
    };
    std::fs::rename(&tmp, &a.out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), a.out.display()))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {} rows, {:.1} MB, to {} in {secs:.1} s ({:.1} MB/s)",
        a.rows,
        written as f64 / 1e6,
        a.out.display(),
        written as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}
