//! The `.npz` index: big_vision saves a parameter tree as an uncompressed zip of `.npy`
//! arrays (`np.savez`, keys are the `/`-joined tree paths). Stored entries keep each array's
//! bytes contiguous in the file, so, like safetensors, the checkpoint index (models) and the
//! weight store (runtime) read only this index and map the data in place.
//!
//! Only what `np.savez` writes is accepted: stored (not deflated) entries, ZIP64 or not,
//! little-endian C-order arrays of a dtype kiln has. Anything else is an error naming the key.

use crate::dtype::{DType, TensorType};
use crate::safetensors::HeaderEntry;

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or_else(|| format!("truncated zip structure at byte {at}"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]])).ok_or_else(|| format!("truncated zip structure at byte {at}"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("truncated zip structure at byte {at}"))
}

/// The end-of-central-directory record: (entry count, directory offset).
fn central_directory(b: &[u8]) -> Result<(u64, u64), String> {
    // The record is 22 bytes plus a comment of at most 64 KiB; search backwards for it.
    let lowest = b.len().saturating_sub(22 + 65_535);
    let eocd = (lowest..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| u32_at(b, i) == Ok(EOCD_SIG))
        .ok_or("no end-of-central-directory record (not a zip file, or truncated)")?;
    let mut count = u16_at(b, eocd + 10)? as u64;
    let mut offset = u32_at(b, eocd + 16)? as u64;
    if (count == 0xFFFF || offset == 0xFFFF_FFFF) && eocd >= 20 && u32_at(b, eocd - 20)? == EOCD64_LOCATOR_SIG {
        let at = u64_at(b, eocd - 20 + 8)? as usize;
        if u32_at(b, at)? != EOCD64_SIG {
            return Err("ZIP64 locator points at no ZIP64 end record".into());
        }
        count = u64_at(b, at + 32)?;
        offset = u64_at(b, at + 48)?;
    }
    Ok((count, offset))
}

/// Sizes and local-header offset, with the ZIP64 extra field applied where the 32-bit fields
/// are saturated.
fn zip64_fields(extra: &[u8], mut usize_: u64, mut csize: u64, mut local: u64) -> Result<(u64, u64, u64), String> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = u16_at(extra, at)?;
        let len = u16_at(extra, at + 2)? as usize;
        if id == 0x0001 {
            let mut p = at + 4;
            for field in [&mut usize_, &mut csize, &mut local] {
                if *field == 0xFFFF_FFFF {
                    *field = u64_at(extra, p)?;
                    p += 8;
                }
            }
        }
        at += 4 + len;
    }
    Ok((usize_, csize, local))
}

/// Parses the header of one `.npy` array: dtype, shape, and the header's length in bytes.
pub fn parse_npy_header(b: &[u8]) -> Result<(TensorType, usize), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (bad magic)".into());
    }
    let (len, start) = match b[6] {
        1 => (u16_at(b, 8)? as usize, 10),
        2 | 3 => (u32_at(b, 8)? as usize, 12),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let text = b.get(start..start + len).ok_or(".npy header is truncated")?;
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
        d => return Err(format!("dtype {d} is not supported (kiln reads little-endian f4, f2, i4, i8, u1, b1)")),
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
    Ok((TensorType::new(dtype, shape), start + len))
}

/// Indexes an `.npz` file held in memory (or mapped): one entry per array, named by its key
/// without the `.npy` suffix, with the byte range of its data within `b`.
pub fn parse_index(b: &[u8]) -> Result<Vec<HeaderEntry>, String> {
    let (count, offset) = central_directory(b)?;
    let mut at = offset as usize;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if u32_at(b, at)? != CENTRAL_SIG {
            return Err(format!("bad central directory entry at byte {at}"));
        }
        let method = u16_at(b, at + 10)?;
        let csize = u32_at(b, at + 20)? as u64;
        let usize_ = u32_at(b, at + 24)? as u64;
        let name_len = u16_at(b, at + 28)? as usize;
        let extra_len = u16_at(b, at + 30)? as usize;
        let comment_len = u16_at(b, at + 32)? as usize;
        let local = u32_at(b, at + 42)? as u64;
        let name = b.get(at + 46..at + 46 + name_len).ok_or("truncated central directory")?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = b.get(at + 46 + name_len..at + 46 + name_len + extra_len).ok_or("truncated central directory")?;
        let (usize_, csize, local) = zip64_fields(extra, usize_, csize, local)?;
        at += 46 + name_len + extra_len + comment_len;

        let key = name.strip_suffix(".npy").ok_or_else(|| format!("'{name}' is not a .npy array"))?.to_string();
        if method != 0 || csize != usize_ {
            return Err(format!("'{key}' is compressed (np.savez_compressed); kiln reads uncompressed np.savez files"));
        }
        let local = local as usize;
        if u32_at(b, local)? != LOCAL_SIG {
            return Err(format!("'{key}': bad local header at byte {local}"));
        }
        let data = local + 30 + u16_at(b, local + 26)? as usize + u16_at(b, local + 28)? as usize;
        let end = data
            .checked_add(usize_ as usize)
            .filter(|&e| e <= b.len())
            .ok_or_else(|| format!("'{key}' runs past the end of the file (truncated)"))?;
        let (ty, head) = parse_npy_header(&b[data..end]).map_err(|e| format!("'{key}': {e}"))?;
        if head + ty.bytes() != end - data {
            return Err(format!("'{key}': {ty} needs {} bytes but the array holds {}", ty.bytes(), end - data - head));
        }
        out.push(HeaderEntry { name: key, ty, start: data + head, end });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A stored zip, written the plain (non-ZIP64) way.
    fn zip(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![];
        let mut central = vec![];
        for (name, data) in files {
            let local = out.len() as u32;
            let mut h = vec![];
            h.extend(LOCAL_SIG.to_le_bytes());
            h.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes());
            out.extend(&h);
            out.extend(name.as_bytes());
            out.extend(data);
            let mut c = vec![];
            c.extend(CENTRAL_SIG.to_le_bytes());
            c.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            c.extend((data.len() as u32).to_le_bytes());
            c.extend((data.len() as u32).to_le_bytes());
            c.extend((name.len() as u16).to_le_bytes());
            c.extend([0u8; 12]);
            c.extend(local.to_le_bytes());
            c.extend(name.as_bytes());
            central.extend(c);
        }
        let off = out.len() as u32;
        out.extend(&central);
        out.extend(EOCD_SIG.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(off.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    #[test]
    fn reads_arrays_in_place() {
        let a: Vec<u8> = [1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let z = zip(&[("block/kernel.npy", npy("<f4", "(2, 3)", &a)), ("n.npy", npy("<i8", "()", &7i64.to_le_bytes()))]);
        let idx = parse_index(&z).unwrap();
        assert_eq!(idx[0].name, "block/kernel");
        assert_eq!(idx[0].ty, TensorType::new(DType::F32, vec![2, 3]));
        assert_eq!(&z[idx[0].start..idx[0].end], &a[..]);
        assert_eq!(idx[1].ty, TensorType::new(DType::I64, vec![]));
        assert_eq!(&z[idx[1].start..idx[1].end], &7i64.to_le_bytes());
    }

    #[test]
    fn refuses_what_it_cannot_map() {
        let a = 1.0f64.to_le_bytes();
        let e = parse_index(&zip(&[("x.npy", npy("<f8", "(1,)", &a))])).unwrap_err();
        assert!(e.contains("'x'") && e.contains("<f8"), "{e}");
        let e = parse_index(&zip(&[("x.npy", npy("<f4", "(3,)", &[0; 8]))])).unwrap_err();
        assert!(e.contains("needs 12 bytes"), "{e}");
        let good = zip(&[("x.npy", npy("<f4", "(1,)", &[0; 4]))]);
        assert!(parse_index(&good[..good.len() - 5]).unwrap_err().contains("end-of-central-directory"));
        assert!(parse_index(b"not a zip at all, just some bytes here").is_err());
    }
}
