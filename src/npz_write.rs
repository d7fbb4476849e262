//! Writes `.npz` files as `np.savez` does: an uncompressed zip whose entries are `{key}.npy`
//! arrays (format 1.0, little-endian float32, C order). big_vision's `utils.load_params`,
//! numpy and kiln's own npz index all read the result. Arrays are streamed one at a time;
//! files past 4 GiB (which would need ZIP64) are refused.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// CRC-32 (IEEE) lookup table.
const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC: [u32; 256] = crc_table();

/// Continues a CRC-32 (start from 0).
pub fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in bytes {
        c = CRC[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// The `.npy` 1.0 header of a float32 array, padded so the data starts 64-byte aligned.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend((dict.len() as u16).to_le_bytes());
    h.extend(dict.as_bytes());
    h
}

/// A streaming `.npz` writer.
pub struct NpzWriter {
    out: BufWriter<File>,
    at: u64,
    central: Vec<u8>,
    count: u16,
}

fn too_big() -> io::Error {
    io::Error::other("the npz file would pass 4 GiB (ZIP64 is not written)")
}

impl NpzWriter {
    /// Creates (or replaces) `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(NpzWriter { out: BufWriter::with_capacity(1 << 20, File::create(path)?), at: 0, central: vec![], count: 0 })
    }

    /// Appends array `key` (stored as `{key}.npy`).
    pub fn add(&mut self, key: &str, shape: &[usize], data: &[f32]) -> io::Result<()> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(io::Error::other(format!("{key}: {} values for shape {shape:?}", data.len())));
        }
        let header = npy_header(shape);
        let body: &[u8] = bytemuck::cast_slice(data);
        let size = u32::try_from(header.len() + body.len()).map_err(|_| too_big())?;
        let offset = u32::try_from(self.at).map_err(|_| too_big())?;
        let crc = crc32(crc32(0, &header), body);
        let name = format!("{key}.npy");
        // Fields shared by the local header and the central directory entry: version needed,
        // flags, method (0 = stored), time, date, crc, sizes, name length.
        let mut common = Vec::with_capacity(26);
        common.extend(20u16.to_le_bytes());
        common.extend([0u8; 4]);
        common.extend(0u16.to_le_bytes());
        common.extend(0x21u16.to_le_bytes());
        common.extend(crc.to_le_bytes());
        common.extend(size.to_le_bytes());
        common.extend(size.to_le_bytes());
        common.extend((name.len() as u16).to_le_bytes());
        // np.savez leaves the data wherever it falls; a padding extra field (which readers
        // skip) puts it on a 64-byte boundary so a memory map can use it in place.
        let unpadded = self.at + 30 + name.len() as u64 + header.len() as u64;
        let mut pad = (unpadded.next_multiple_of(64) - unpadded) as usize;
        if pad > 0 && pad < 4 {
            pad += 64;
        }
        let mut extra = Vec::with_capacity(pad);
        if pad > 0 {
            extra.extend(0x4b4cu16.to_le_bytes());
            extra.extend(((pad - 4) as u16).to_le_bytes());
            extra.resize(pad, 0);
        }
        self.out.write_all(&0x0403_4b50u32.to_le_bytes())?;
        self.out.write_all(&common)?;
        self.out.write_all(&(pad as u16).to_le_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&extra)?;
        self.out.write_all(&header)?;
        self.out.write_all(body)?;
        self.at += 30 + name.len() as u64 + pad as u64 + size as u64;
        self.central.extend(0x0201_4b50u32.to_le_bytes());
        self.central.extend(20u16.to_le_bytes()); // version made by
        self.central.extend(&common);
        // Extra and comment lengths, disk, internal and external attributes.
        self.central.extend([0u8; 12]);
        self.central.extend(offset.to_le_bytes());
        self.central.extend(name.as_bytes());
        self.count = self.count.checked_add(1).ok_or_else(|| io::Error::other("more than 65535 arrays"))?;
        Ok(())
    }

    /// Writes the central directory and closes the file.
    pub fn finish(mut self) -> io::Result<()> {
        let offset = u32::try_from(self.at).map_err(|_| too_big())?;
        self.out.write_all(&self.central)?;
        let mut end = 0x0605_4b50u32.to_le_bytes().to_vec();
        end.extend([0u8; 4]);
        end.extend(self.count.to_le_bytes());
        end.extend(self.count.to_le_bytes());
        end.extend((self.central.len() as u32).to_le_bytes());
        end.extend(offset.to_le_bytes());
        end.extend(0u16.to_le_bytes());
        self.out.write_all(&end)?;
        self.out.flush()
    }
}

/// Writes `(key, shape, values)` arrays to `path` in the order given.
pub fn write(path: &Path, arrays: &[(String, Vec<usize>, Vec<f32>)]) -> io::Result<()> {
    let mut w = NpzWriter::create(path)?;
    for (k, s, v) in arrays {
        w.add(k, s, v)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_kilns_index() {
        let path = std::env::temp_dir().join(format!("kiln-npz-{}.npz", std::process::id()));
        let a: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        write(&path, &[("a/kernel".into(), vec![2, 3, 4], a.clone()), ("b".into(), vec![5], vec![1.0; 5])]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let idx = kiln_graph::npz::parse_index(&bytes).unwrap();
        assert_eq!(idx.len(), 2);
        let e = idx.iter().find(|e| e.name == "a/kernel").unwrap();
        assert_eq!(e.ty.shape, [2, 3, 4]);
        assert_eq!(e.start % 64, 0, "npy data is 64-byte aligned in the file");
        assert_eq!(&bytes[e.start..e.end], bytemuck::cast_slice::<f32, u8>(&a));
        assert_eq!(crc32(0, b"123456789"), 0xCBF4_3926);
        let _ = std::fs::remove_file(&path);
    }
}
