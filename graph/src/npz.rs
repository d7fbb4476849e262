//! The `.npz` index: big_vision saves a parameter tree as a zip of `.npy` arrays (`np.savez`,
//! keys are the `/`-joined tree paths). Stored entries keep each array's bytes contiguous in
//! the file, so, like safetensors, the checkpoint index (models) and the weight store (runtime)
//! read only the zip directory and map the data in place. Deflated entries
//! (`np.savez_compressed`) are inflated once into memory by the weight store; the checkpoint
//! index reads only their `.npy` headers.
//!
//! The zip directory (ZIP64 or not) is read by the `zip` crate. Arrays are little-endian
//! C-order of a dtype kiln has; big_vision's bfloat16 arrays are 2-byte voids (`|V2`, numpy
//! has no bfloat16). Anything else is an error naming the key.

use crate::dtype::{DType, TensorType};
use crate::safetensors::HeaderEntry;
use std::io::{Cursor, Read};

/// The arrays of one `.npz` file.
#[derive(Debug, Default)]
pub struct NpzIndex {
    /// Stored entries: byte ranges within the file.
    pub in_file: Vec<HeaderEntry>,
    /// Deflated entries: byte ranges within [`NpzIndex::inflated`] (all `0..0` when the index
    /// was read without inflating).
    pub in_buffer: Vec<HeaderEntry>,
    /// The deflated arrays' data, one after another, each starting 64-byte aligned.
    pub inflated: Vec<u8>,
}

fn zip_err(e: zip::result::ZipError) -> String {
    match e {
        zip::result::ZipError::InvalidArchive(m) => format!("not a valid zip file (truncated, or not an npz): {m}"),
        e => format!("not a valid zip file: {e}"),
    }
}

/// Reads the index of an `.npz` file held in memory (or mapped). Stored arrays are located in
/// place; deflated ones have their `.npy` headers read and, with `inflate`, their data
/// decompressed into [`NpzIndex::inflated`].
pub fn read_index(b: &[u8], inflate: bool) -> Result<NpzIndex, String> {
    let mut z = zip::ZipArchive::new(Cursor::new(b)).map_err(zip_err)?;
    let mut out = NpzIndex::default();
    for i in 0..z.len() {
        let f = z.by_index_raw(i).map_err(zip_err)?;
        let name = f.name().to_string();
        let key = name.strip_suffix(".npy").ok_or_else(|| format!("'{name}' is not a .npy array"))?.to_string();
        let (method, size, csize, data) = (f.compression(), f.size(), f.compressed_size(), f.data_start() as usize);
        drop(f);
        match method {
            zip::CompressionMethod::Stored => {
                let end = data
                    .checked_add(size as usize)
                    .filter(|&e| e <= b.len() && size == csize)
                    .ok_or_else(|| format!("'{key}' runs past the end of the file (truncated)"))?;
                let (ty, head) = parse_npy_header(&b[data..end]).map_err(|e| format!("'{key}': {e}"))?;
                check_len(&key, &ty, end - data - head)?;
                out.in_file.push(HeaderEntry { name: key, ty, start: data + head, end });
            }
            zip::CompressionMethod::Deflated => {
                let mut r = z.by_index(i).map_err(|e| format!("'{key}': {}", zip_err(e)))?;
                let mut head = vec![0u8; 12];
                r.read_exact(&mut head).map_err(|e| format!("'{key}': cannot inflate the .npy header: {e}"))?;
                let n = npy_header_len(&head).map_err(|e| format!("'{key}': {e}"))?;
                if n < head.len() || n as u64 > size {
                    return Err(format!("'{key}': a .npy header of {n} bytes in an entry of {size} (corrupt)"));
                }
                head.resize(n, 0);
                r.read_exact(&mut head[12..]).map_err(|e| format!("'{key}': cannot inflate the .npy header: {e}"))?;
                let (ty, hl) = parse_npy_header(&head).map_err(|e| format!("'{key}': {e}"))?;
                check_len(&key, &ty, (size as usize).saturating_sub(hl))?;
                let (mut start, mut end) = (0, 0);
                if inflate {
                    start = out.inflated.len().next_multiple_of(64);
                    out.inflated.resize(start, 0);
                    let got = r.take(ty.bytes() as u64 + 1).read_to_end(&mut out.inflated);
                    end = out.inflated.len();
                    match got {
                        Ok(_) if end - start == ty.bytes() => {}
                        Ok(_) => return Err(format!("'{key}': inflated to {} bytes, {ty} needs {}", end - start, ty.bytes())),
                        Err(e) => return Err(format!("'{key}': cannot inflate (corrupt or truncated): {e}")),
                    }
                }
                out.in_buffer.push(HeaderEntry { name: key, ty, start, end });
            }
            m => {
                return Err(format!(
                    "'{key}' is compressed with {m}; kiln reads stored and deflated npz entries (np.savez, np.savez_compressed)"
                ))
            }
        }
    }
    Ok(out)
}

/// Indexes an `.npz` file of stored arrays only (what `np.savez` writes): one entry per array,
/// named by its key without the `.npy` suffix, with the byte range of its data within `b`.
pub fn parse_index(b: &[u8]) -> Result<Vec<HeaderEntry>, String> {
    let idx = read_index(b, false)?;
    if let Some(e) = idx.in_buffer.first() {
        return Err(format!("'{}' is deflated (np.savez_compressed): read it with npz::read_index", e.name));
    }
    Ok(idx.in_file)
}

fn check_len(key: &str, ty: &TensorType, held: usize) -> Result<(), String> {
    if ty.bytes() != held {
        return Err(format!("'{key}': {ty} needs {} bytes but the array holds {held}", ty.bytes()));
    }
    Ok(())
}

/// The whole `.npy` header's length (magic, version, length field and text) from its first
/// 12 bytes.
fn npy_header_len(b: &[u8]) -> Result<usize, String> {
    if b.len() < 12 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (bad magic)".into());
    }
    match b[6] {
        1 => Ok(10 + u16::from_le_bytes([b[8], b[9]]) as usize),
        2 | 3 => Ok(12 + u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize),
        v => Err(format!(".npy format version {v} is not supported")),
    }
}

/// Parses the header of one `.npy` array: dtype, shape, and the header's length in bytes.
pub fn parse_npy_header(b: &[u8]) -> Result<(TensorType, usize), String> {
    let mut first = [0u8; 12];
    let n = b.len().min(12);
    first[..n].copy_from_slice(&b[..n]);
    if b.len() < 10 {
        return Err("not a .npy array (too short)".into());
    }
    let end = npy_header_len(&first)?;
    let start = if b[6] == 1 { 10 } else { 12 };
    let text = b.get(start..end).ok_or(".npy header is truncated")?;
    let text = std::str::from_utf8(text).map_err(|_| ".npy header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let k = format!("'{key}':");
        let at = text.find(&k).ok_or_else(|| format!(".npy header has no '{key}'"))? + k.len();
        Ok(text[at..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).ok_or(".npy descr is not a string")?;
    let dtype = match descr {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<i4" => DType::I32,
        "<i8" => DType::I64,
        "|u1" => DType::U8,
        "|b1" => DType::Bool,
        // big_vision writes bfloat16 as 2-byte voids (`utils.py` `recover_dtype`).
        "|V2" => DType::BF16,
        d => return Err(format!("dtype {d} is not supported (kiln reads little-endian f4, f2, i4, i8, u1, b1, and |V2 as bfloat16)")),
    };
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape = field("shape")?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or(".npy shape is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!(".npy shape has a bad dimension '{s}'")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((TensorType::new(dtype, shape), end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend((h.len() as u16).to_le_bytes());
        v.extend(h.as_bytes());
        v.extend(data);
        v
    }

    /// A zip of the files, stored or deflated as `np.savez` / `np.savez_compressed` write them.
    fn zip(files: &[(&str, Vec<u8>)], deflate: bool) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, data) in files {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn arrays() -> (Vec<u8>, Vec<(&'static str, Vec<u8>)>) {
        let a: Vec<u8> = [1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let bf: Vec<u8> = [0x3f80u16, 0xc000].iter().flat_map(|x| x.to_le_bytes()).collect();
        let files = vec![
            ("block/kernel.npy", npy("<f4", "(2, 3)", &a)),
            ("n.npy", npy("<i8", "()", &7i64.to_le_bytes())),
            ("bf.npy", npy("|V2", "(2,)", &bf)),
        ];
        (a, files)
    }

    #[test]
    fn reads_arrays_in_place() {
        let (a, files) = arrays();
        let z = zip(&files, false);
        let idx = parse_index(&z).unwrap();
        assert_eq!(idx[0].name, "block/kernel");
        assert_eq!(idx[0].ty, TensorType::new(DType::F32, vec![2, 3]));
        assert_eq!(&z[idx[0].start..idx[0].end], &a[..]);
        assert_eq!(idx[1].ty, TensorType::new(DType::I64, vec![]));
        assert_eq!(&z[idx[1].start..idx[1].end], &7i64.to_le_bytes());
        assert_eq!(idx[2].ty, TensorType::new(DType::BF16, vec![2]));
        assert_eq!(&z[idx[2].start..idx[2].end], &[0x80, 0x3f, 0x00, 0xc0]);
    }

    #[test]
    fn inflates_compressed_arrays_to_the_stored_bytes() {
        let (_, files) = arrays();
        let (stored, deflated) = (zip(&files, false), zip(&files, true));
        assert!(parse_index(&deflated).unwrap_err().contains("np.savez_compressed"));
        let plain = parse_index(&stored).unwrap();
        let headers = read_index(&deflated, false).unwrap();
        assert!(headers.in_file.is_empty() && headers.inflated.is_empty());
        let full = read_index(&deflated, true).unwrap();
        assert_eq!(full.in_buffer.len(), plain.len());
        for ((p, h), f) in plain.iter().zip(&headers.in_buffer).zip(&full.in_buffer) {
            assert_eq!((&p.name, &p.ty), (&h.name, &h.ty));
            assert_eq!((&p.name, &p.ty), (&f.name, &f.ty));
            assert_eq!(&stored[p.start..p.end], &full.inflated[f.start..f.end], "{}", p.name);
            assert_eq!(f.start % 64, 0);
        }
    }

    #[test]
    fn refuses_what_it_cannot_map() {
        let a = 1.0f64.to_le_bytes();
        let e = parse_index(&zip(&[("x.npy", npy("<f8", "(1,)", &a))], false)).unwrap_err();
        assert!(e.contains("'x'") && e.contains("<f8"), "{e}");
        let e = parse_index(&zip(&[("x.npy", npy("<f4", "(3,)", &[0; 8]))], false)).unwrap_err();
        assert!(e.contains("needs 12 bytes"), "{e}");
        let e = read_index(&zip(&[("x.npy", npy("<f4", "(3,)", &[0; 8]))], true), true).unwrap_err();
        assert!(e.contains("needs 12 bytes"), "{e}");
        let good = zip(&[("x.npy", npy("<f4", "(1,)", &[0; 4]))], false);
        assert!(parse_index(&good[..good.len() - 5]).unwrap_err().contains("not a valid zip"));
        assert!(parse_index(b"not a zip at all, just some bytes here").is_err());
        // A deflated stream cut short inside the array's data.
        let big = npy("<f4", "(4096,)", &(0..4096u32).flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes()).collect::<Vec<u8>>());
        let mut z = zip(&[("x.npy", big)], true);
        let n = z.len();
        z[n / 2..n / 2 + 64].fill(0xAA);
        assert!(read_index(&z, true).is_err());
    }
}
