//! TensorBoard scalar event files, written without TensorFlow: a TFRecord file of `Event`
//! protocol buffers.
//!
//! Framing (tensorflow/core/lib/io/record_writer.cc): each record is the data's length as a
//! little-endian u64, the masked CRC-32C of those 8 bytes, the data, and the masked CRC-32C of
//! the data. The data is an `Event` (tensorflow/core/util/event.proto): `wall_time` (field 1,
//! double), `step` (2, int64), and either `file_version` (3, string; the first record,
//! "brain.Event:2") or `summary` (5, a `Summary` of repeated `Value` (1) each with `tag` (1,
//! string) and `simple_value` (2, float); tensorflow/core/framework/summary.proto).

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// An open event file that scalars are appended to, each record flushed as it is written (a
/// run that stops early leaves every record so far readable).
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `events.out.tfevents.<seconds>.<host>` in `dir` (the name TensorBoard looks
    /// for) with its file-version record.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        let now = wall_time();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".to_string());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter {
            file: BufWriter::new(file),
            path,
        };
        let mut event = event_header(now, 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.append(&event)?;
        Ok(w)
    }

    /// Appends the scalar `value` of series `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f32) -> Result<()> {
        let mut value_msg = Vec::new();
        put_bytes(&mut value_msg, 1, tag.as_bytes());
        put_key(&mut value_msg, 2, WIRE_FIXED32);
        value_msg.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &value_msg);
        let mut event = event_header(wall_time(), step);
        put_bytes(&mut event, 5, &summary);
        self.append(&event)
    }

    fn append(&mut self, data: &[u8]) -> Result<()> {
        let write = |f: &mut BufWriter<File>| -> std::io::Result<()> {
            f.write_all(&frame(data))?;
            f.flush()
        };
        write(&mut self.file).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Seconds since the Unix epoch.
fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_BYTES: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u8, wire: u8) {
    put_varint(out, u64::from(field << 3 | wire));
}

/// A length-delimited field (string, bytes or embedded message).
fn put_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    put_key(out, field, WIRE_BYTES);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event`'s `wall_time` and `step` fields.
fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut event = Vec::new();
    put_key(&mut event, 1, WIRE_FIXED64);
    event.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut event, 2, WIRE_VARINT);
    put_varint(&mut event, step);
    event
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The CRC as TFRecord stores it: rotated right by 15 bits plus a constant, so that a CRC of
/// data that holds CRCs stays well distributed (tensorflow/core/lib/hash/crc32c.h, `Mask`).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bytewise with a 256-entry table.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, &b| {
        TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // The check value of CRC-32C (RFC 3720, B.4) and the empty string's.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // 32 zero bytes: RFC 3720's first test vector.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn varints_use_seven_bits_per_byte() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
