//! Rating files in the MovieLens layout (GroupLens' ml-100k `u.data`, `u1.base`, `u1.test`,
//! ...): one rating per line, `user item rating timestamp`, tab-separated (any whitespace is
//! accepted; the timestamp is optional and unused). User and item ids are row numbers of the
//! user and item tables as they stand (MovieLens numbers both from 1, so row 0 stays unused);
//! the tables have as many rows as the largest id of either file, plus one.
//!
//! A data set is a training and a test file. Its batches have no dense features, two tables of
//! one id per sample (the user, then the item) and the ratings as labels, as matrix
//! factorization ([`crate::model::mf`]) reads them. The training ratings are shuffled once, at
//! load, with the seed: the files are sorted by user, and batches of one user's ratings would
//! make poor gradient steps.

use super::Batch;
use super::DataSource;
use crate::rng::{SplitMix64, derive_key};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// The ratings of one file, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ratings {
    pub users: Vec<u32>,
    pub items: Vec<u32>,
    pub ratings: Vec<f32>,
}

impl Ratings {
    /// Parses rating lines; `name` (the file) and the line number are named in every error.
    pub fn parse(text: &str, name: &str) -> Result<Ratings> {
        let mut r = Ratings::default();
        for (n, line) in text.lines().enumerate() {
            let mut fields = line.split_whitespace();
            let Some(user) = fields.next() else {
                continue; // a blank line
            };
            let at = || format!("{name}:{}", n + 1);
            let (Some(item), Some(rating)) = (fields.next(), fields.next()) else {
                bail!(
                    "{}: expected 'user item rating [timestamp]', got '{line}'",
                    at()
                );
            };
            let id = |what: &str, s: &str| {
                s.parse::<u32>().with_context(|| {
                    format!("{}: {what} id '{s}' is not a whole number below 2^32", at())
                })
            };
            r.users.push(id("user", user)?);
            r.items.push(id("item", item)?);
            let value: f32 = rating
                .parse()
                .ok()
                .filter(|v: &f32| v.is_finite())
                .with_context(|| format!("{}: rating '{rating}' is not a number", at()))?;
            r.ratings.push(value);
        }
        if r.ratings.is_empty() {
            bail!("{name}: no ratings");
        }
        Ok(r)
    }

    /// Reads and parses a rating file.
    pub fn read(path: &Path) -> Result<Ratings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading ratings from {}", path.display()))?;
        Ratings::parse(&text, &path.display().to_string())
    }

    pub fn len(&self) -> usize {
        self.ratings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ratings.is_empty()
    }

    /// The ratings `order[0]`, `order[1]`, ... as one batch (one-hot tables: one user and one
    /// item per rating, no offsets).
    fn batch(&self, order: impl Iterator<Item = usize>) -> Batch {
        let mut b = Batch::new(0, 2);
        for i in order {
            b.indices[0].push(self.users[i]);
            b.indices[1].push(self.items[i]);
            b.labels.push(self.ratings[i]);
        }
        b
    }
}

/// A training and a test set of ratings, held in memory.
pub struct MovieLensSource {
    train: Batch,
    test: Batch,
    /// Rows of the user table: the largest user id of either file, plus one.
    pub users: usize,
    /// Rows of the item table.
    pub items: usize,
    /// Mean training rating.
    pub mean_rating: f32,
}

impl MovieLensSource {
    /// Reads `train` and `test` (training ratings shuffled with `seed`).
    pub fn load(train: &Path, test: &Path, seed: u64) -> Result<MovieLensSource> {
        MovieLensSource::load_within(train, test, seed, u64::MAX)
    }

    /// Reads `train` and `test` as [`MovieLensSource::load`] does, refusing any id that would
    /// make a table of more than `max_rows` rows (what fits in memory), by file, line and id.
    pub fn load_within(
        train: &Path,
        test: &Path,
        seed: u64,
        max_rows: u64,
    ) -> Result<MovieLensSource> {
        let read = |path: &Path| -> Result<Ratings> {
            let r = Ratings::read(path)?;
            let largest = r.users.iter().chain(&r.items).copied().max().unwrap_or(0);
            if u64::from(largest) >= max_rows {
                bail!("{}", locate_id_above(path, max_rows)?);
            }
            Ok(r)
        };
        Ok(MovieLensSource::new(&read(train)?, &read(test)?, seed))
    }

    /// The data set of two rating lists (training ratings shuffled with `seed`).
    pub fn new(train: &Ratings, test: &Ratings, seed: u64) -> MovieLensSource {
        let rows = |ids: [&[u32]; 2]| {
            ids.iter()
                .flat_map(|v| v.iter())
                .max()
                .map_or(1, |&m| m as usize + 1)
        };
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = SplitMix64::new(derive_key(seed, &[0x4d4c_5348]));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let sum: f64 = train.ratings.iter().map(|&r| f64::from(r)).sum();
        MovieLensSource {
            train: train.batch(order.into_iter()),
            test: test.batch(0..test.len()),
            users: rows([&train.users, &test.users]),
            items: rows([&train.items, &test.items]),
            mean_rating: (sum / train.len().max(1) as f64) as f32,
        }
    }
}

/// The error for the first line of `path` whose user or item id is `max_rows` or more (the
/// file has such a line): file, line, field and id. The file is read again: this runs only
/// on the way to the error, and the parsed ratings do not keep line numbers.
fn locate_id_above(path: &Path, max_rows: u64) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading ratings from {}", path.display()))?;
    for (n, line) in text.lines().enumerate() {
        for (field, what) in line.split_whitespace().zip(["user", "item"]) {
            if let Ok(id) = field.parse::<u64>()
                && id >= max_rows
            {
                return Ok(format!(
                    "{}:{}: {what} id {id} would make a table of {} rows, more than the {max_rows} rows that fit in the available memory",
                    path.display(),
                    n + 1,
                    id + 1
                ));
            }
        }
    }
    bail!("{}: changed while it was read", path.display())
}

impl DataSource for MovieLensSource {
    fn train_len(&self) -> u64 {
        self.train.size() as u64
    }
    fn test_len(&self) -> u64 {
        self.test.size() as u64
    }
    fn fill_train(&self, first: u64, size: usize, batch: &mut Batch) -> Result<()> {
        batch.copy_samples(&self.train, first as usize, size);
        Ok(())
    }
    fn fill_test(&self, first: u64, size: usize, batch: &mut Batch) -> Result<()> {
        batch.copy_samples(&self.test, first as usize, size);
        Ok(())
    }
    fn shuffle(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grouplens_lines() {
        let r = Ratings::parse(
            "196\t242\t3\t881250949\n186\t302\t3.5\t891717742\n\n22 377 1\n",
            "u.data",
        )
        .unwrap();
        assert_eq!(r.users, [196, 186, 22]);
        assert_eq!(r.items, [242, 302, 377]);
        assert_eq!(r.ratings, [3.0, 3.5, 1.0]);
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let e = |text: &str| Ratings::parse(text, "u1.base").unwrap_err().to_string();
        assert!(e("1\t2\t3\t4\n5\t6\n").contains("u1.base:2"));
        assert!(e("1\t2\t3\nx\t2\t3\n").contains("u1.base:2: user id 'x'"));
        assert!(e("1\t-2\t3\n").contains("item id '-2'"));
        assert!(e("1\t2\tgood\n").contains("rating 'good'"));
        assert!(e("1\t2\tNaN\n").contains("rating 'NaN'"));
        assert!(e("\n\n").contains("no ratings"));
    }

    #[test]
    fn source_sizes_tables_from_both_files_and_shuffles_training() {
        let train = Ratings {
            users: (1..=100).collect(),
            items: vec![7; 100],
            ratings: (1..=100).map(|i| (i % 5 + 1) as f32).collect(),
        };
        let test = Ratings {
            users: vec![120],
            items: vec![9],
            ratings: vec![4.0],
        };
        let src = MovieLensSource::new(&train, &test, 1);
        assert_eq!((src.users, src.items), (121, 10));
        assert_eq!((src.train_len(), src.test_len()), (100, 1));
        assert!((src.mean_rating - 3.0).abs() < 1e-6);
        let mut b = Batch::default();
        src.fill_train(0, 100, &mut b).unwrap();
        let mut users = b.indices[0].clone();
        assert_ne!(users, train.users, "training order is shuffled");
        users.sort_unstable();
        assert_eq!(users, train.users);
        assert!(b.offsets.iter().all(Vec::is_empty), "one-hot: no offsets");
        // Each rating stays with its user.
        for (u, r) in b.indices[0].iter().zip(&b.labels) {
            assert_eq!(*r, (u % 5 + 1) as f32);
        }
    }
}
