//! An `.npz` writer in `np.savez`'s layout: an uncompressed (stored) zip of `<key>.npy`
//! files, each a version-1.0 `.npy` header and little-endian C-order data, written through the
//! `zip` crate. Each array's data starts on a 64-byte file offset (the entry is aligned and the
//! `.npy` header padded to 64 bytes, as numpy pads it), so the weight store can map it in place.
//! Entries over 4 GiB are written as ZIP64.

use std::io::{self, Seek, Write};
use zip::write::SimpleFileOptions;

/// Streams arrays into an npz archive; call [`NpzWriter::finish`] at the end.
pub struct NpzWriter<W: Write + Seek> {
    zip: zip::ZipWriter<W>,
}

fn zip_io(e: zip::result::ZipError) -> io::Error {
    match e {
        zip::result::ZipError::Io(e) => e,
        e => io::Error::other(e.to_string()),
    }
}

impl<W: Write + Seek> NpzWriter<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        NpzWriter { zip: zip::ZipWriter::new(out) }
    }

    /// Adds one f32 array named `key` (stored as `key.npy`).
    pub fn add_f32(&mut self, key: &str, shape: &[usize], data: &[f32]) -> io::Result<()> {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let shape_txt = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(", ")),
        };
        let mut head = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
        // magic/version/length (10) + text + '\n' to a multiple of 64, as numpy pads it.
        while (10 + head.len() + 1) % 64 != 0 {
            head.push(' ');
        }
        head.push('\n');
        let bytes = 10 + head.len() as u64 + 4 * data.len() as u64;
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(bytes >= u32::MAX as u64);
        self.zip.start_file(format!("{key}.npy"), opts).map_err(zip_io)?;
        let mut npy = Vec::with_capacity(10 + head.len());
        npy.extend_from_slice(b"\x93NUMPY\x01\x00");
        npy.extend_from_slice(&(head.len() as u16).to_le_bytes());
        npy.extend_from_slice(head.as_bytes());
        self.zip.write_all(&npy)?;
        for chunk in data.chunks(1 << 16) {
            let b: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.zip.write_all(&b)?;
        }
        Ok(())
    }

    /// Writes the central directory; returns the archive's size in bytes.
    pub fn finish(self) -> io::Result<u64> {
        let mut out = self.zip.finish().map_err(zip_io)?;
        out.flush()?;
        out.stream_position()
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
    fn kiln_reads_back_what_it_writes() {
        let mut buf = Vec::new();
        let mut w = NpzWriter::new(std::io::Cursor::new(&mut buf));
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
