//! An `.npz` writer in `np.savez`'s layout: an uncompressed (stored) zip of `<key>.npy`
//! files, each a version-1.0 `.npy` header and little-endian C-order data. Each array's data
//! starts on a 64-byte file offset (the `.npy` header is padded, which numpy accepts), so
//! the weight store can map it in place. No ZIP64: entries and the archive stay under 4 GiB.

use std::io::{self, Write};

/// CRC-32 (IEEE, as zip uses), table-driven.
pub struct Crc32 {
    table: [u32; 256],
    value: u32,
}

impl Default for Crc32 {
    fn default() -> Self {
        let mut table = [0u32; 256];
        for (i, t) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *t = c;
        }
        Crc32 { table, value: 0xFFFF_FFFF }
    }
}

impl Crc32 {
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.value = self.table[((self.value ^ b as u32) & 0xFF) as usize] ^ (self.value >> 8);
        }
    }

    /// The checksum of everything added.
    pub fn finish(&self) -> u32 {
        self.value ^ 0xFFFF_FFFF
    }
}

/// Streams arrays into an npz archive; call [`NpzWriter::finish`] at the end.
pub struct NpzWriter<W: Write> {
    out: W,
    at: u64,
    central: Vec<u8>,
    count: u16,
}

fn too_big() -> io::Error {
    io::Error::other("npz archive over 4 GiB (ZIP64 is not written)")
}

impl<W: Write> NpzWriter<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        NpzWriter { out, at: 0, central: Vec::new(), count: 0 }
    }

    /// Adds one f32 array named `key` (stored as `key.npy`).
    pub fn add_f32(&mut self, key: &str, shape: &[usize], data: &[f32]) -> io::Result<()> {
        let name = format!("{key}.npy");
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let shape_txt = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(", ")),
        };
        let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
        // Data starts at: local header (30) + name + magic/version/len (10) + dict + pad + '\n'.
        let before = self.at as usize + 30 + name.len() + 10 + dict.len() + 1;
        let pad = (64 - before % 64) % 64;
        let mut npy = Vec::with_capacity(10 + dict.len() + pad + 1 + data.len() * 4);
        npy.extend_from_slice(b"\x93NUMPY\x01\x00");
        npy.extend_from_slice(&((dict.len() + pad + 1) as u16).to_le_bytes());
        npy.extend_from_slice(dict.as_bytes());
        npy.extend(std::iter::repeat_n(b' ', pad));
        npy.push(b'\n');
        for v in data {
            npy.extend_from_slice(&v.to_le_bytes());
        }
        let mut crc = Crc32::default();
        crc.update(&npy);
        let (crc, size) = (crc.finish(), u32::try_from(npy.len()).map_err(|_| too_big())?);
        let offset = u32::try_from(self.at).map_err(|_| too_big())?;
        let mut local = Vec::with_capacity(30 + name.len());
        local.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        local.extend_from_slice(&20u16.to_le_bytes()); // version needed
        local.extend_from_slice(&0u16.to_le_bytes()); // flags
        local.extend_from_slice(&0u16.to_le_bytes()); // stored
        local.extend_from_slice(&0u16.to_le_bytes()); // time
        local.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
        local.extend_from_slice(&crc.to_le_bytes());
        local.extend_from_slice(&size.to_le_bytes());
        local.extend_from_slice(&size.to_le_bytes());
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes());
        local.extend_from_slice(name.as_bytes());
        self.out.write_all(&local)?;
        self.out.write_all(&npy)?;
        self.at += (local.len() + npy.len()) as u64;
        let c = &mut self.central;
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        c.extend_from_slice(&20u16.to_le_bytes()); // made by
        c.extend_from_slice(&local[4..30]); // version needed .. extra length, as in the local header
        c.extend_from_slice(&0u16.to_le_bytes()); // comment length
        c.extend_from_slice(&0u16.to_le_bytes()); // disk
        c.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        c.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.count = self.count.checked_add(1).ok_or_else(|| io::Error::other("more than 65535 arrays in one npz"))?;
        Ok(())
    }

    /// Writes the central directory; returns the archive's size in bytes.
    pub fn finish(mut self) -> io::Result<u64> {
        let dir_at = u32::try_from(self.at).map_err(|_| too_big())?;
        let dir_len = u32::try_from(self.central.len()).map_err(|_| too_big())?;
        self.out.write_all(&self.central)?;
        let mut end = Vec::with_capacity(22);
        end.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&self.count.to_le_bytes());
        end.extend_from_slice(&self.count.to_le_bytes());
        end.extend_from_slice(&dir_len.to_le_bytes());
        end.extend_from_slice(&dir_at.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.out.write_all(&end)?;
        self.out.flush()?;
        Ok(self.at + dir_len as u64 + 22)
    }
}

impl NpzWriter<io::BufWriter<std::fs::File>> {
    /// A writer that creates (or replaces) the file at `path`.
    pub fn create(path: &std::path::Path) -> io::Result<Self> {
        Ok(NpzWriter::new(io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?)))
    }
}

/// Writes `(key, shape, values)` arrays to `path` in the order given.
pub fn write(path: &std::path::Path, arrays: &[(String, Vec<usize>, Vec<f32>)]) -> io::Result<()> {
    let mut w = NpzWriter::create(path)?;
    for (k, s, v) in arrays {
        w.add_f32(k, s, v)?;
    }
    w.finish().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        let mut c = Crc32::default();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
    }

    #[test]
    fn kiln_reads_back_what_it_writes() {
        let mut buf = Vec::new();
        let mut w = NpzWriter::new(&mut buf);
        w.add_f32("a/kernel", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        w.add_f32("b", &[1], &[7.5]).unwrap();
        w.finish().unwrap();
        let idx = kiln_graph::npz::parse_index(&buf).unwrap();
        assert_eq!(idx.len(), 2);
        let a = idx.iter().find(|e| e.name == "a/kernel").unwrap();
        assert_eq!(a.ty.shape, vec![2, 3]);
        assert_eq!(a.start % 64, 0);
        let vals: Vec<f32> = buf[a.start..a.end].chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(vals, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
