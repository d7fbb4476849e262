//! A minimal PNG writer: 8-bit grey or RGB, one IDAT of stored (uncompressed) deflate blocks.
//! Enough for sample grids; any viewer reads it.

use std::io::Write;

/// CRC-32 (IEEE, reflected), as PNG chunks use.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for b in parts.iter().flat_map(|p| p.iter()) {
        c ^= *b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Adler-32, the zlib stream's checksum.
fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(kind);
    out.extend(data);
    out.extend(crc32(&[kind, data]).to_be_bytes());
}

/// Encodes `pixels` (row-major, `channels` bytes per pixel: 1 grey, 3 RGB) as a PNG file.
pub fn encode(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Result<Vec<u8>, String> {
    let color = match channels {
        1 => 0u8,
        3 => 2u8,
        c => return Err(format!("a PNG image needs 1 or 3 channels, not {c}")),
    };
    if pixels.len() != width * height * channels || width == 0 || height == 0 {
        return Err(format!("{} bytes for a {width}x{height}x{channels} image", pixels.len()));
    }
    // Each row starts with filter type 0 (none).
    let row = width * channels;
    let mut raw = Vec::with_capacity(height * (row + 1));
    for r in pixels.chunks(row) {
        raw.push(0);
        raw.extend(r);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend((b.len() as u16).to_le_bytes());
        z.extend((!(b.len() as u16)).to_le_bytes());
        z.extend(*b);
    }
    z.extend(adler32(&raw).to_be_bytes());

    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend((width as u32).to_be_bytes());
    ihdr.extend((height as u32).to_be_bytes());
    ihdr.extend([8, color, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

/// Writes a PNG file.
pub fn write(path: &std::path::Path, width: usize, height: usize, channels: usize, pixels: &[u8]) -> std::io::Result<()> {
    let bytes = encode(width, height, channels, pixels).map_err(std::io::Error::other)?;
    std::fs::File::create(path)?.write_all(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(&[b"IEND"]), 0xAE42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn encodes_header_and_blocks() {
        let png = encode(300, 300, 3, &vec![7; 300 * 300 * 3]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
        assert!(encode(2, 2, 4, &[0; 16]).is_err());
    }
}
