//! The Criteo click-log text format (the Kaggle Display Advertising Challenge's train.txt and
//! test.txt, the Terabyte day files): a parser that says which field of a line is wrong and
//! why, a writer, and synthetic rows in the same format (`dlrm synth --format criteo-tsv`).
//!
//! One sample per line, tab-separated: the label (`0` or `1`; absent in Kaggle's test.txt),
//! 13 integer features I1-I13 (decimal, possibly negative, possibly empty) and 26 categorical
//! features C1-C26 (32-bit values written as hexadecimal, 8 digits in Criteo's files, possibly
//! empty). Lines end in LF or CRLF; the last one may lack its line end.

use super::Batch;
use super::synthetic::{Split, SyntheticData};
use rayon::prelude::*;
use std::fmt;
use std::sync::LazyLock;
use thiserror::Error;

/// Integer features per row (I1-I13).
pub const NUM_DENSE: usize = 13;
/// Categorical features per row (C1-C26), one embedding table each.
pub const NUM_CATEGORICAL: usize = 26;

/// Fields of a line: the label, then the integer and the categorical features.
pub const fn num_fields(labelled: bool) -> usize {
    labelled as usize + NUM_DENSE + NUM_CATEGORICAL
}

/// One row as the file holds it (`None`: an empty field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRow {
    /// The click (`1`) or not (`0`); false for files without labels.
    pub label: bool,
    pub dense: [Option<i64>; NUM_DENSE],
    pub categorical: [Option<u32>; NUM_CATEGORICAL],
}

/// A field of a line, named as Criteo's documentation names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Label,
    /// Integer feature `I{n + 1}`.
    Integer(usize),
    /// Categorical feature `C{n + 1}`.
    Categorical(usize),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Label => write!(f, "label"),
            Field::Integer(i) => write!(f, "I{}", i + 1),
            Field::Categorical(i) => write!(f, "C{}", i + 1),
        }
    }
}

/// Longest excerpt of a bad field quoted in an error.
const QUOTE_LEN: usize = 40;

/// What is wrong with a line.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{got} tab-separated fields, expected {expected}{hint}")]
    FieldCount {
        got: usize,
        expected: usize,
        hint: &'static str,
    },
    #[error("field {column} ({field}): {text:?} {why}")]
    BadField {
        /// 1-based position of the field in the line.
        column: usize,
        field: Field,
        /// The field (its first 40 bytes, invalid UTF-8 replaced).
        text: String,
        why: &'static str,
    },
}

/// Value of each byte as a hexadecimal digit, 0xff for a byte that is none.
static HEX_DIGIT: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// A categorical value: 1 to 8 hexadecimal digits (either case), so every 32-bit value and
/// nothing larger.
pub fn parse_hex(field: &[u8]) -> Option<u32> {
    if field.is_empty() || field.len() > 8 {
        return None;
    }
    field.iter().try_fold(0u32, |v, &b| {
        let d = HEX_DIGIT[b as usize];
        (d != 0xff).then_some(v << 4 | d as u32)
    })
}

/// A decimal integer with an optional leading `-`, within i64.
fn parse_int(field: &[u8]) -> Option<i64> {
    let (negative, digits) = match field.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, field),
    };
    if digits.is_empty() {
        return None;
    }
    // Accumulated negatively, so that i64::MIN parses too.
    let v = digits.iter().try_fold(0i64, |v, &b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v.checked_mul(10)?.checked_sub(d as i64)
    })?;
    if negative { Some(v) } else { v.checked_neg() }
}

/// Splits a line at tabs, keeping count of the fields taken.
struct Fields<'a> {
    rest: Option<&'a [u8]>,
    column: usize,
}

impl<'a> Fields<'a> {
    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.rest?;
        self.column += 1;
        match memchr::memchr(b'\t', rest) {
            Some(i) => {
                self.rest = Some(&rest[i + 1..]);
                Some(&rest[..i])
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

/// Parses one line (without its `\n`; a trailing `\r` is ignored) into `row`. A line with the
/// wrong number of fields is reported as that, before any of its values.
///
/// Good lines take a single pass over their bytes; a line that pass does not
/// accept is parsed again, field by field, to say what is wrong with it.
pub fn parse_line(line: &[u8], labelled: bool, row: &mut RawRow) -> Result<(), ParseError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match parse_fast(line, labelled, row) {
        Some(()) => Ok(()),
        None => parse_checked(line, labelled, row),
    }
}

/// One pass over a line (without `\r`): digits and hexadecimal digits are accumulated as the
/// fields are scanned, without looking for the tabs first. Returns None for anything it does
/// not accept, including every bad line and integers of more than 18 digits (which
/// [`parse_checked`] parses or rejects).
fn parse_fast(line: &[u8], labelled: bool, row: &mut RawRow) -> Option<()> {
    let n = line.len();
    let mut p = 0;
    if labelled {
        if n < 2 || line[1] != b'\t' {
            return None;
        }
        row.label = match line[0] {
            b'0' => false,
            b'1' => true,
            _ => return None,
        };
        p = 2;
    } else {
        row.label = false;
    }
    for v in &mut row.dense {
        let negative = line.get(p) == Some(&b'-');
        let start = p + negative as usize;
        p = start;
        let mut x = 0i64;
        while p < n && line[p] != b'\t' {
            let d = line[p].wrapping_sub(b'0');
            if d > 9 || p - start >= 18 {
                return None;
            }
            x = 10 * x + d as i64;
            p += 1;
        }
        // Categories follow: a tab must end every integer field.
        if p >= n || (negative && p == start) {
            return None;
        }
        *v = (p > start).then_some(if negative { -x } else { x });
        p += 1;
    }
    for (i, v) in row.categorical.iter_mut().enumerate() {
        let start = p;
        let mut x = 0u32;
        // Criteo's categories are 8 digits: decoded without a branch per digit (anything
        // else goes through the loop below).
        if let Some(digits) = line.get(p..p + 8)
            && line.get(p + 8).is_none_or(|&b| b == b'\t')
        {
            let mut invalid = 0;
            for &b in digits {
                let d = HEX_DIGIT[b as usize];
                invalid |= d;
                x = x << 4 | (d & 0xf) as u32;
            }
            if invalid <= 0xf {
                p += 8;
            } else {
                x = 0;
            }
        }
        while p < n && line[p] != b'\t' {
            let d = HEX_DIGIT[line[p] as usize];
            if d == 0xff || p - start >= 8 {
                return None;
            }
            x = x << 4 | d as u32;
            p += 1;
        }
        *v = (p > start).then_some(x);
        if i + 1 < NUM_CATEGORICAL {
            if p >= n {
                return None;
            }
            p += 1;
        }
    }
    // A tab left over means too many fields.
    (p == n).then_some(())
}

/// Parses a line (without `\r`) field by field, checking each, for the exact error.
fn parse_checked(line: &[u8], labelled: bool, row: &mut RawRow) -> Result<(), ParseError> {
    let expected = num_fields(labelled);
    let field_count = || {
        let got = memchr::memchr_iter(b'\t', line).count() + 1;
        (got != expected).then(|| ParseError::FieldCount {
            got,
            expected,
            hint: if labelled && got + 1 == expected {
                " (for a file without the label column, use --no-label)"
            } else if !labelled && got == expected + 1 {
                " (this file seems to have a label column: drop --no-label)"
            } else {
                ""
            },
        })
    };
    let mut fields = Fields {
        rest: Some(line),
        column: 0,
    };
    let bad = |fields: &Fields, field: Field, text: &[u8], why| {
        field_count().unwrap_or_else(|| ParseError::BadField {
            column: fields.column,
            field,
            text: String::from_utf8_lossy(&text[..text.len().min(QUOTE_LEN)]).into_owned(),
            why,
        })
    };
    let missing = || field_count().expect("a line that runs out of fields has too few");
    if labelled {
        let f = fields.next().ok_or_else(missing)?;
        row.label = match f {
            b"0" => false,
            b"1" => true,
            _ => return Err(bad(&fields, Field::Label, f, "is not 0 or 1")),
        };
    } else {
        row.label = false;
    }
    for (i, v) in row.dense.iter_mut().enumerate() {
        let f = fields.next().ok_or_else(missing)?;
        *v = if f.is_empty() {
            None
        } else {
            let x = parse_int(f);
            if x.is_none() {
                return Err(bad(
                    &fields,
                    Field::Integer(i),
                    f,
                    "is not an integer (decimal digits, optionally after '-', within 64 bits)",
                ));
            }
            x
        };
    }
    for (i, v) in row.categorical.iter_mut().enumerate() {
        let f = fields.next().ok_or_else(missing)?;
        *v = if f.is_empty() {
            None
        } else {
            let x = parse_hex(f);
            if x.is_none() {
                return Err(bad(
                    &fields,
                    Field::Categorical(i),
                    f,
                    "is not a category (1 to 8 hexadecimal digits)",
                ));
            }
            x
        };
    }
    match fields.rest {
        None => Ok(()),
        Some(_) => Err(missing()),
    }
}

/// Integers below this get their log transform from a table (nearly all of Criteo's do).
const LOG_TABLE_LEN: usize = 4096;

static LOG_TABLE: LazyLock<Vec<f32>> =
    LazyLock::new(|| (0..LOG_TABLE_LEN).map(|x| log1p_f32(x as i64)).collect());

/// ln(1 + x) in f32 arithmetic, as the reference computes it (`np.log(x + 1)` on float32).
fn log1p_f32(x: i64) -> f32 {
    (x as f32 + 1.0).ln()
}

/// The dense feature the model sees for an integer field, as the reference transforms it:
/// `ln(1 + max(x, 0))`, and 0 for an empty field.
#[inline]
pub fn dense_feature(x: Option<i64>) -> f32 {
    match x {
        None => 0.0,
        Some(x) if x <= 0 => 0.0,
        Some(x) if (x as u64) < LOG_TABLE_LEN as u64 => LOG_TABLE[x as usize],
        Some(x) => log1p_f32(x),
    }
}

/// Appends `row` as one line (with its `\n`) to `out`: integers in decimal, categories as 8
/// lowercase hexadecimal digits, as in Criteo's files; empty fields stay empty.
pub fn write_row(row: &RawRow, labelled: bool, out: &mut Vec<u8>) {
    use std::io::Write;
    let mut first = true;
    let mut sep = |out: &mut Vec<u8>| {
        if !std::mem::take(&mut first) {
            out.push(b'\t');
        }
    };
    if labelled {
        sep(out);
        out.push(if row.label { b'1' } else { b'0' });
    }
    for x in &row.dense {
        sep(out);
        if let Some(x) = x {
            write!(out, "{x}").expect("writing to a Vec cannot fail");
        }
    }
    for c in &row.categorical {
        sep(out);
        if let Some(c) = c {
            write!(out, "{c:08x}").expect("writing to a Vec cannot fail");
        }
    }
    out.push(b'\n');
}

/// Synthetic dense values in [0, 1) become integers n = round(e^(SCALE * x) - 1), in
/// 0..=1096, so that the model's input ln(1 + n) is close to SCALE * x: preprocessing undoes
/// the mapping up to rounding, and what the generator's labels depend on stays learnable.
pub const SYNTHETIC_DENSE_SCALE: f32 = 7.0;

/// A bijection of u32 (the "lowbias32" mixer of C. Wellons' hash-prospector: xor-shifts and
/// odd multiplications, each invertible), keyed per table.
fn scramble(key: u32, id: u32) -> u32 {
    let mut x = id ^ key;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Rows formatted per parallel task.
const ROWS_PER_TASK: usize = 1024;

/// The synthetic data set of [`SyntheticData`] (e.g. teacher-labelled) as Criteo rows.
///
/// The mapping: dense value x -> round(e^(7x) - 1) ([`SYNTHETIC_DENSE_SCALE`]); the id of table
/// t -> a per-table keyed bijection of u32, written as 8 hexadecimal digits (so distinct ids
/// stay distinct and look like Criteo's hashed values, and a dictionary built by
/// preprocessing recovers the ids up to a renumbering); labels as they are. Row `i` of the
/// file is training sample `i` of the generator: the file is the same for any thread count.
pub struct SyntheticTsv {
    data: SyntheticData,
    keys: [u32; NUM_CATEGORICAL],
}

impl SyntheticTsv {
    /// Errors unless the generator has Criteo's shape: 13 dense features, 26 tables, one id
    /// per bag.
    pub fn new(data: SyntheticData) -> anyhow::Result<SyntheticTsv> {
        let cfg = data.config();
        anyhow::ensure!(
            cfg.num_dense == NUM_DENSE && cfg.table_sizes.len() == NUM_CATEGORICAL,
            "Criteo rows have {NUM_DENSE} integer and {NUM_CATEGORICAL} categorical features; the generator has {} and {}",
            cfg.num_dense,
            cfg.table_sizes.len()
        );
        anyhow::ensure!(
            cfg.num_indices_per_lookup == 1,
            "Criteo rows have one value per categorical feature; the generator draws {} ids per bag",
            cfg.num_indices_per_lookup
        );
        anyhow::ensure!(
            cfg.table_sizes.iter().all(|&n| n as u64 <= 1 << 32),
            "table sizes must fit 32-bit categories"
        );
        let keys = std::array::from_fn(|t| {
            crate::rng::derive_key(cfg.seed, &[0x00c4_17e0, t as u64]) as u32
        });
        Ok(SyntheticTsv { data, keys })
    }

    /// The raw row of sample `i` of a filled batch.
    pub fn row(&self, batch: &Batch, i: usize) -> RawRow {
        RawRow {
            label: batch.labels[i] > 0.5,
            dense: std::array::from_fn(|j| {
                let x = batch.dense_row(i)[j];
                Some((SYNTHETIC_DENSE_SCALE * x).exp_m1().round() as i64)
            }),
            categorical: std::array::from_fn(|t| Some(scramble(self.keys[t], batch.bag(t, i)[0]))),
        }
    }

    /// Appends the lines of samples `first .. first + count` to `out`, formatted in parallel
    /// (`batch` is the generator's reused buffer).
    pub fn write_rows(
        &self,
        first: u64,
        count: usize,
        labelled: bool,
        batch: &mut Batch,
        out: &mut Vec<u8>,
    ) {
        self.data.fill_batch(Split::Train, first, count, batch);
        let batch = &*batch;
        let parts: Vec<Vec<u8>> = (0..count.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|task| {
                let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(count);
                let mut buf = Vec::with_capacity(rows.len() * 256);
                for i in rows {
                    write_row(&self.row(batch, i), labelled, &mut buf);
                }
                buf
            })
            .collect();
        for p in parts {
            out.extend_from_slice(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(line: &str, labelled: bool) -> Result<RawRow, ParseError> {
        let mut row = RawRow::default();
        parse_line(line.as_bytes(), labelled, &mut row).map(|()| row)
    }

    /// A line of `fields` joined by tabs.
    fn line(fields: &[&str]) -> String {
        fields.join("\t")
    }

    fn valid_fields() -> Vec<String> {
        let mut f = vec!["1".to_string()];
        f.extend((0..NUM_DENSE).map(|i| (i as i64 * 7 - 3).to_string()));
        f.extend((0..NUM_CATEGORICAL).map(|i| format!("{:08x}", 0x68fd_1e64u32 ^ i as u32)));
        f
    }

    fn with(field: usize, value: &str) -> String {
        let mut f = valid_fields();
        f[field] = value.to_string();
        line(&f.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn parses_every_field_kind() {
        let f = valid_fields();
        let row = parse(
            &line(&f.iter().map(String::as_str).collect::<Vec<_>>()),
            true,
        )
        .unwrap();
        assert!(row.label);
        for i in 0..NUM_DENSE {
            assert_eq!(row.dense[i], Some(i as i64 * 7 - 3));
        }
        for i in 0..NUM_CATEGORICAL {
            assert_eq!(row.categorical[i], Some(0x68fd_1e64 ^ i as u32));
        }
        let unlabelled = line(&f[1..].iter().map(String::as_str).collect::<Vec<_>>());
        let row = parse(&unlabelled, false).unwrap();
        assert!(!row.label);
        assert_eq!(row.dense[0], Some(-3));
        assert!(!parse(&with(0, "0"), true).unwrap().label);
    }

    #[test]
    fn empty_fields_trailing_empties_negatives_and_line_ends() {
        // A real Kaggle row: empty integers, and empty categories at the end (trailing tabs).
        let real = "0\t1\t1\t5\t0\t1382\t4\t15\t2\t181\t1\t2\t\t2\t68fd1e64\t80e26c9b\tfb936136\t7b4723c4\t25c83c98\t7e0ccccf\tde7995b8\t1f89b562\ta73ee510\ta8cd5504\tb2cb9c98\t37c9c164\t2824a5f6\t1adce6ef\t8ba8b39a\t891b62e7\te5ba7672\tf54016b9\t21ddcdc9\tb1252a9d\t07b5194c\t\t3a171ecb\tc5c50484\te8b83407\t9727dd16";
        let row = parse(real, true).unwrap();
        assert!(!row.label);
        assert_eq!(row.dense[11], None);
        assert_eq!(row.dense[12], Some(2));
        assert_eq!(row.categorical[0], Some(0x68fd_1e64));
        assert_eq!(row.categorical[21], None);
        assert_eq!(row.categorical[25], Some(0x9727_dd16));

        let mut f = vec!["0"];
        f.extend(["-1", "", "-2"]);
        f.extend([""; NUM_DENSE - 3]);
        f.extend([""; NUM_CATEGORICAL]);
        let all_empty = line(&f);
        assert!(all_empty.ends_with("\t\t\t"));
        let row = parse(&all_empty, true).unwrap();
        assert_eq!(row.dense[..3], [Some(-1), None, Some(-2)]);
        assert!(row.categorical.iter().all(Option::is_none));
        let crlf = format!("{all_empty}\r");
        assert_eq!(parse(&crlf, true).unwrap(), row);
        // Upper case and short hex are 32-bit values too.
        let upper = with(14, "ABCDEF01");
        assert_eq!(
            parse(&upper, true).unwrap().categorical[0],
            Some(0xabcd_ef01)
        );
        assert_eq!(parse(&with(14, "7"), true).unwrap().categorical[0], Some(7));
        let big = with(1, &i64::MIN.to_string());
        assert_eq!(parse(&big, true).unwrap().dense[0], Some(i64::MIN));
    }

    #[test]
    fn every_bad_input_names_its_field() {
        let bad_field = |text: &str, labelled| match parse(text, labelled).unwrap_err() {
            ParseError::BadField { column, field, .. } => (column, field),
            e => panic!("{e}"),
        };
        assert_eq!(bad_field(&with(0, "2"), true), (1, Field::Label));
        assert_eq!(bad_field(&with(0, ""), true), (1, Field::Label));
        assert_eq!(bad_field(&with(3, "12a"), true), (4, Field::Integer(2)));
        assert_eq!(bad_field(&with(3, "-"), true), (4, Field::Integer(2)));
        assert_eq!(bad_field(&with(3, "1.5"), true), (4, Field::Integer(2)));
        assert_eq!(bad_field(&with(3, " 1"), true), (4, Field::Integer(2)));
        let huge = "9".repeat(20);
        assert_eq!(bad_field(&with(13, &huge), true), (14, Field::Integer(12)));
        assert_eq!(
            bad_field(&with(14, "68fd1e6g"), true),
            (15, Field::Categorical(0))
        );
        assert_eq!(
            bad_field(&with(39, "123456789"), true),
            (40, Field::Categorical(25))
        );
        let msg = parse(&with(20, "xyz"), true).unwrap_err().to_string();
        assert!(
            msg.contains("field 21 (C7)") && msg.contains("\"xyz\""),
            "{msg}"
        );
        let msg = parse(&with(5, "1e3"), true).unwrap_err().to_string();
        assert!(
            msg.contains("field 6 (I5)") && msg.contains("integer"),
            "{msg}"
        );
        let msg = parse(&with(0, "yes"), true).unwrap_err().to_string();
        assert!(msg.contains("label") && msg.contains("0 or 1"), "{msg}");

        let count = |text: &str, labelled| match parse(text, labelled).unwrap_err() {
            ParseError::FieldCount { got, expected, .. } => (got, expected),
            e => panic!("{e}"),
        };
        let f = valid_fields();
        let short = line(&f[..20].iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(count(&short, true), (20, 40));
        assert_eq!(count(&format!("{}\t", with(1, "3")), true), (41, 40));
        assert_eq!(count("", true), (1, 40));
        // A missing label column is reported as such, not as a bad label value.
        let unlabelled = line(&f[1..].iter().map(String::as_str).collect::<Vec<_>>());
        let msg = parse(&unlabelled, true).unwrap_err().to_string();
        assert!(msg.contains("39 tab-separated fields") && msg.contains("--no-label"));
        assert_eq!(count(&with(1, "5"), false), (40, 39));
    }

    #[test]
    fn dense_transform_matches_the_reference() {
        assert_eq!(dense_feature(None), 0.0);
        assert_eq!(dense_feature(Some(-2)), 0.0);
        assert_eq!(dense_feature(Some(0)), 0.0);
        for x in [1i64, 2, 100, 4095, 4096, 65535, 1_618_112] {
            let want = ((x as f32) + 1.0).ln();
            assert_eq!(dense_feature(Some(x)), want, "{x}");
            assert!((want as f64 - (x as f64).ln_1p()).abs() < 1e-6 * want as f64);
        }
    }

    #[test]
    fn scramble_is_a_bijection_on_a_range() {
        let mut seen: Vec<u32> = (0..100_000).map(|id| scramble(0xdead_beef, id)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 100_000);
    }

    fn raw_row() -> impl Strategy<Value = RawRow> {
        let int = prop_oneof![
            Just(None),
            (-3i64..5000).prop_map(Some),
            any::<i64>().prop_map(Some),
        ];
        let cat = prop_oneof![Just(None), any::<u32>().prop_map(Some)];
        (
            any::<bool>(),
            proptest::array::uniform13(int),
            proptest::collection::vec(cat, NUM_CATEGORICAL),
        )
            .prop_map(|(label, dense, cats)| RawRow {
                label,
                dense,
                categorical: cats.try_into().expect("26 categories"),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Lines with a byte replaced by one that matters to the parser: whatever the fast
        /// pass accepts, the checked pass accepts with the same values.
        #[test]
        fn fast_and_checked_parsers_agree(
            row in raw_row(),
            labelled in any::<bool>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), prop::sample::select(b"\t-0917afAFgx \r".to_vec())), 0..3),
        ) {
            let mut buf = Vec::new();
            write_row(&row, labelled, &mut buf);
            buf.pop();
            for (at, b) in &edits {
                if !buf.is_empty() {
                    let i = at.index(buf.len());
                    buf[i] = *b;
                }
            }
            let (mut fast, mut checked) = (RawRow::default(), RawRow::default());
            let f = parse_fast(&buf, labelled, &mut fast);
            let c = parse_checked(&buf, labelled, &mut checked);
            if f.is_some() {
                prop_assert_eq!(&c, &Ok(()));
                prop_assert_eq!(fast, checked);
            }
            if edits.is_empty() && row.dense.iter().flatten().all(|x| x.unsigned_abs() < 10u64.pow(18)) {
                prop_assert!(f.is_some(), "a written row takes the fast path");
            }
        }

        #[test]
        fn written_rows_parse_back(row in raw_row(), labelled in any::<bool>(), crlf in any::<bool>()) {
            let mut buf = Vec::new();
            write_row(&row, labelled, &mut buf);
            prop_assert_eq!(buf.pop(), Some(b'\n'));
            prop_assert!(!buf.contains(&b'\n'));
            if crlf {
                buf.push(b'\r');
            }
            let mut back = RawRow::default();
            parse_line(&buf, labelled, &mut back).unwrap();
            let want = RawRow { label: row.label && labelled, ..row };
            prop_assert_eq!(back, want);
        }
    }
}
