//! PNG files through the `image` crate's encoder: 8-bit grey, RGB or RGBA, zlib at its default
//! level with adaptive per-row filters (what sample grids, depth maps and `--draw` write).

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

/// Encodes `pixels` (row-major, `channels` bytes per pixel: 1 grey, 3 RGB, 4 RGBA) as a PNG file.
pub fn encode(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Result<Vec<u8>, String> {
    let color = match channels {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        4 => ExtendedColorType::Rgba8,
        c => return Err(format!("a PNG image needs 1, 3 or 4 channels, not {c}")),
    };
    if pixels.len() != width * height * channels || width == 0 || height == 0 {
        return Err(format!("{} bytes for a {width}x{height}x{channels} image", pixels.len()));
    }
    let dims = (u32::try_from(width), u32::try_from(height));
    let (Ok(w), Ok(h)) = dims else {
        return Err(format!("a {width}x{height} image is too large for PNG"));
    };
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Default, FilterType::Adaptive)
        .write_image(pixels, w, h, color)
        .map_err(|e| format!("cannot encode a {width}x{height}x{channels} PNG: {e}"))?;
    Ok(out)
}

/// Writes a PNG file.
pub fn write(path: &std::path::Path, width: usize, height: usize, channels: usize, pixels: &[u8]) -> std::io::Result<()> {
    let bytes = encode(width, height, channels, pixels).map_err(std::io::Error::other)?;
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The size of the file kiln's earlier writer made: signature, IHDR, one IDAT of stored
    /// deflate blocks (a filter byte per row, 5 bytes per 65,535-byte block, zlib header and
    /// Adler-32) and IEND.
    fn stored_size(w: usize, h: usize, c: usize) -> usize {
        let raw = h * (w * c + 1);
        8 + (12 + 13) + (12 + 2 + 5 * raw.div_ceil(65_535) + raw + 4) + 12
    }

    /// Decodes with the `image` crate: (width, height, channels, pixels).
    fn decode(png: &[u8]) -> (usize, usize, usize, Vec<u8>) {
        let img = image::load_from_memory_with_format(png, image::ImageFormat::Png).unwrap();
        let c = img.color().channel_count() as usize;
        (img.width() as usize, img.height() as usize, c, img.into_bytes())
    }

    /// A deterministic photo-like picture: smooth shading, mild sensor-like noise, flat boxes
    /// with one-pixel outlines (what `--draw` adds), channel `k` phase-shifted.
    fn picture(w: usize, h: usize, c: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_u32;
        let mut noise = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 7) as f64 - 3.0
        };
        let mut px = Vec::with_capacity(w * h * c);
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    let (xf, yf, kf) = (x as f64, y as f64, k as f64);
                    let mut v = 128.0 + 70.0 * (xf / 23.0 + kf).sin() * (yf / 31.0 - kf).cos() + 30.0 * ((xf + yf) / 57.0).sin();
                    if (w / 4..w / 2).contains(&x) && (h / 3..2 * h / 3).contains(&y) {
                        v = 40.0 + 60.0 * kf;
                    }
                    let outline = (x == w / 8 || x == 7 * w / 8) && (h / 8..7 * h / 8).contains(&y);
                    v = if outline { 255.0 * (k % 2) as f64 } else { v + noise() };
                    px.push(if k == 3 { 255 } else { v.clamp(0.0, 255.0) as u8 });
                }
            }
        }
        px
    }

    #[test]
    fn pixels_survive_a_round_trip() {
        for (w, h, c) in [(1, 1, 1), (37, 53, 1), (37, 53, 3), (64, 48, 4), (300, 300, 3), (1, 70_000, 1)] {
            let px = picture(w, h, c);
            let png = encode(w, h, c, &px).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            assert_eq!(decode(&png), (w, h, c, px), "{w}x{h}x{c}");
        }
        let path = std::env::temp_dir().join(format!("kiln-png-{}.png", std::process::id()));
        let px = picture(20, 10, 3);
        write(&path, 20, 10, 3, &px).unwrap();
        let back = decode(&std::fs::read(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        assert_eq!(back, (20, 10, 3, px));
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(encode(2, 2, 2, &[0; 8]).unwrap_err().contains("1, 3 or 4 channels, not 2"));
        assert!(encode(2, 2, 3, &[0; 11]).unwrap_err().contains("11 bytes for a 2x2x3 image"));
        assert!(encode(0, 2, 1, &[]).is_err());
    }

    /// Smaller than the stored encoder: on a photo-like picture (its mild noise is most of what is
    /// left), a smooth depth map, and the noisiest fixture image (Gaussian noise of 20 levels);
    /// the sizes are printed. Bounds sit a little above what was measured.
    #[test]
    fn compressed_files_are_smaller_than_stored_ones() {
        let depth: Vec<u8> = (0..224 * 224).map(|i| ((i % 224 + i / 224) * 255 / 446) as u8).collect();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/images/rgb_37x53.png");
        let (fw, fh, fc, noisy) = decode(&std::fs::read(fixture).unwrap());
        let cases = [
            ("photo-like 224x224 RGB", 224, 224, 3, picture(224, 224, 3), 0.6),
            ("depth map 224x224 grey", 224, 224, 1, depth, 0.1),
            ("noisy fixture 37x53 RGB", fw, fh, fc, noisy, 1.0),
        ];
        for (name, w, h, c, px, bound) in cases {
            let (new, old) = (encode(w, h, c, &px).unwrap().len(), stored_size(w, h, c));
            let ratio = new as f64 / old as f64;
            eprintln!("{name}: {new} bytes, stored {old} bytes ({:.1}%)", 100.0 * ratio);
            assert!(ratio < bound, "{name}: {new} bytes against the stored {old}, over {bound}");
        }
    }
}
