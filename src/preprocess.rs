//! Image files to `pixel_values` as a folder's `preprocessor_config.json` says
//! (transformers' `SiglipImageProcessor`): convert to RGB, resize with PIL's filter, rescale,
//! normalise, channels first.
//!
//! The resize reproduces Pillow's `Image.resize` for 8-bit images (`libImaging/Resample.c`):
//! a separable convolution whose filter support widens by the downscale factor (antialiasing),
//! coefficients normalised to sum 1 and then rounded to 22-bit fixed point, two passes in
//! Pillow 13's order (see [`resize`]), each rounding and clipping to uint8: bit-exact.

use crate::{Error, Result};
use kiln_runtime::Tensor;
use std::path::{Path, PathBuf};

/// Pillow's resampling filters, by their `Image.Resampling` code.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Filter {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// The filter for a PIL code; NEAREST (0) takes another path in Pillow and is not offered.
    pub fn from_pil(code: i64) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The kernels of `Resample.c`, same branches and constants.
    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                return 1.0;
            }
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Filter::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index, the tap count, and the fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    k: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole input range.
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; the clamp makes the sign moot.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(xmax) {
            *wx = filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for x in 0..xmax {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 { (f - 0.5) as i32 } else { (f + 0.5) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { bounds, ksize, k }
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes an interleaved 8-bit image (`channels` per pixel, `w` x `h`) to `ow` x `oh` as
/// Pillow's `Image.resize(size, filter)` does, pass order included: Pillow 13 runs the
/// vertical pass first when the height shrinks by more than twice as many pixels as the width
/// does (`h - oh > 2 (w - ow)`, read off the machine code of its `ImagingResample`;
/// `scripts/gen_resize_fixtures.py` checks it against Pillow on 2000 random shapes before it
/// writes the test cases), the horizontal pass first otherwise. Each pass rounds to uint8, so
/// the order changes the result by a few levels.
pub fn resize(px: &[u8], w: usize, h: usize, channels: usize, ow: usize, oh: usize, filter: Filter) -> Vec<u8> {
    let vertical_first = oh < h && (h - oh) as i64 > 2 * (w as i64 - ow as i64);
    if vertical_first {
        let tmp = resize_vertical(px, w, h, channels, oh, filter);
        resize_horizontal(&tmp, w, oh, channels, ow, filter)
    } else {
        let tmp = resize_horizontal(px, w, h, channels, ow, filter);
        resize_vertical(&tmp, ow, h, channels, oh, filter)
    }
}

/// One horizontal pass, `w` to `ow` columns (a copy when they are equal).
fn resize_horizontal(px: &[u8], w: usize, h: usize, c: usize, ow: usize, filter: Filter) -> Vec<u8> {
    if ow == w {
        return px.to_vec();
    }
    let co = coeffs(w, ow, filter);
    let mut out = vec![0u8; ow * h * c];
    for y in 0..h {
        let row = &px[y * w * c..(y + 1) * w * c];
        for (xx, &(xmin, n)) in co.bounds.iter().enumerate() {
            let k = &co.k[xx * co.ksize..xx * co.ksize + n];
            for ch in 0..c {
                let mut ss = 1i32 << (PRECISION_BITS - 1);
                for (x, &kx) in k.iter().enumerate() {
                    ss = ss.wrapping_add(row[(xmin + x) * c + ch] as i32 * kx);
                }
                out[(y * ow + xx) * c + ch] = clip8(ss);
            }
        }
    }
    out
}

/// One vertical pass, `h` to `oh` rows (a copy when they are equal).
fn resize_vertical(px: &[u8], w: usize, h: usize, c: usize, oh: usize, filter: Filter) -> Vec<u8> {
    if oh == h {
        return px.to_vec();
    }
    let co = coeffs(h, oh, filter);
    let mut out = vec![0u8; w * oh * c];
    for (yy, &(ymin, n)) in co.bounds.iter().enumerate() {
        let k = &co.k[yy * co.ksize..yy * co.ksize + n];
        for i in 0..w * c {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss = ss.wrapping_add(px[(ymin + y) * w * c + i] as i32 * ky);
            }
            out[yy * w * c + i] = clip8(ss);
        }
    }
    out
}

/// An 8-bit RGB image, row-major, interleaved.
#[derive(Clone, Debug)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Decodes a JPEG or PNG file. Transparency is composited onto white, as transformers'
/// `convert_to_rgb` does; other modes (grey, palette, 16-bit) convert as Pillow's
/// `convert("RGB")`, 16-bit samples as Pillow reads them ([`pillow_8bit`]). `convert_rgb = false`
/// refuses anything that is not already RGB.
pub fn load_image(path: &Path, convert_rgb: bool) -> Result<Rgb> {
    let bytes = std::fs::read(path).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("cannot open image: {e}") })?;
    decode_image(&bytes, path, convert_rgb)
}

/// [`load_image`] of a file held in memory (`path` names it in errors).
pub fn decode_image(bytes: &[u8], path: &Path, convert_rgb: bool) -> Result<Rgb> {
    let bad = |msg: String| Error::File { path: path.to_path_buf(), msg };
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes));
    let reader = reader.with_guessed_format().map_err(|e| bad(format!("cannot read image: {e}")))?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_complete(bytes) {
        // The decoder would fill the missing rows in grey; Pillow (transformers' loader)
        // refuses the file, and so does kiln.
        return Err(bad("image file is truncated: the JPEG data ends before its end-of-image marker".into()));
    }
    let img = reader.decode().map_err(|e| bad(format!("cannot decode image (JPEG and PNG are supported): {e}")))?;
    let img = pillow_8bit(img);
    let (width, height) = (img.width() as usize, img.height() as usize);
    let color = img.color();
    if !convert_rgb && color != image::ColorType::Rgb8 {
        return Err(bad(format!(
            "the image is {color:?} and preprocessor_config.json has do_convert_rgb off (transformers would refuse it too)"
        )));
    }
    let pixels = if color.has_alpha() {
        let rgba = img.to_rgba8();
        rgba.pixels()
            .flat_map(|p| {
                // Pillow's `alpha_composite` over opaque white, its fixed-point rounding included.
                let a = p[3] as u32;
                [0, 1, 2].map(|i| {
                    let t = 128 * (p[i] as u32 * a + 255 * (255 - a)) + (0x80 << 7);
                    ((((t >> 8) + t) >> 8) >> 7) as u8
                })
            })
            .collect()
    } else {
        img.to_rgb8().into_raw()
    };
    Ok(Rgb { width, height, pixels })
}

/// 16-bit samples as Pillow reads them: RGB, RGBA and grey+alpha keep each sample's high byte;
/// grey ("I;16") is clipped at 255 when Pillow converts it to RGB. (The `image` crate would
/// scale by 1/257 instead, which gives other pixels.)
fn pillow_8bit(img: image::DynamicImage) -> image::DynamicImage {
    use image::{DynamicImage as D, ImageBuffer, Luma, Rgb, Rgba};
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        D::ImageLuma16(b) => D::ImageLuma8(ImageBuffer::from_fn(b.width(), b.height(), |x, y| Luma([b.get_pixel(x, y)[0].min(255) as u8]))),
        D::ImageLumaA16(b) => D::ImageRgba8(ImageBuffer::from_fn(b.width(), b.height(), |x, y| {
            let p = b.get_pixel(x, y);
            Rgba([hi(p[0]), hi(p[0]), hi(p[0]), hi(p[1])])
        })),
        D::ImageRgb16(b) => D::ImageRgb8(ImageBuffer::from_fn(b.width(), b.height(), |x, y| Rgb(b.get_pixel(x, y).0.map(hi)))),
        D::ImageRgba16(b) => D::ImageRgba8(ImageBuffer::from_fn(b.width(), b.height(), |x, y| Rgba(b.get_pixel(x, y).0.map(hi)))),
        other => other,
    }
}

/// Whether a JPEG's entropy-coded data is followed by its end-of-image marker (`FF D9` after
/// the first start-of-scan `FF DA`): a file cut short has none.
fn jpeg_complete(b: &[u8]) -> bool {
    let Some(sos) = b.windows(2).position(|w| w == [0xFF, 0xDA]) else { return false };
    b[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// The `preprocessor_config.json` fields kiln honours (SigLIP's image processor).
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessor {
    pub convert_rgb: bool,
    /// `(height, width)` when resizing.
    pub resize: Option<(usize, usize)>,
    pub filter: Filter,
    pub rescale: Option<f64>,
    pub normalize: Option<([f64; 3], [f64; 3])>,
    /// Image tokens per image (PaliGemma's processor), when given.
    pub image_seq_length: Option<usize>,
    pub path: PathBuf,
}

impl Preprocessor {
    /// Reads `dir/preprocessor_config.json` strictly: an unknown field or value is an error.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let bad = |msg: String| Error::File { path: path.clone(), msg };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read: {e} (image models need it)")))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        for key in obj.keys() {
            let known = matches!(
                key.as_str(),
                "do_convert_rgb"
                    | "do_resize"
                    | "size"
                    | "resample"
                    | "do_rescale"
                    | "rescale_factor"
                    | "do_normalize"
                    | "image_mean"
                    | "image_std"
                    | "image_seq_length"
                    | "image_processor_type"
                    | "processor_class"
                    | "_valid_processor_keys"
            );
            if !known {
                return Err(bad(format!("field '{key}' is not supported")));
            }
        }
        // `null` (as PaliGemma's files have) leaves the processor's attribute None: off.
        let flag = |k: &str, default: bool| match obj.get(k) {
            None => Ok(default),
            Some(serde_json::Value::Null) => Ok(false),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(other) => Err(bad(format!("'{k}' is {other}, expected true, false or null"))),
        };
        let num = |k: &str| obj.get(k).and_then(|x| x.as_f64()).ok_or_else(|| bad(format!("'{k}' is missing or not a number")));
        let triple = |k: &str| -> Result<[f64; 3]> {
            let a = obj.get(k).and_then(|x| x.as_array()).ok_or_else(|| bad(format!("'{k}' is missing or not a list")))?;
            let vals: Vec<f64> = a.iter().filter_map(|x| x.as_f64()).collect();
            <[f64; 3]>::try_from(vals).map_err(|_| bad(format!("'{k}' must hold three numbers (R, G, B)")))
        };
        match obj.get("image_processor_type").and_then(|x| x.as_str()) {
            None | Some("SiglipImageProcessor") | Some("SiglipImageProcessorFast") | Some("SiglipImageProcessorPil") => {}
            Some(other) => return Err(bad(format!("image_processor_type {other} is not supported (SiglipImageProcessor is)"))),
        }
        let resize = if flag("do_resize", true)? {
            let size = obj.get("size").and_then(|x| x.as_object()).ok_or_else(|| bad("'size' is missing".into()))?;
            if let Some(k) = size.keys().find(|k| *k != "height" && *k != "width") {
                return Err(bad(format!("size.{k} is not supported (give height and width)")));
            }
            let dim = |k: &str| {
                size.get(k)
                    .and_then(|x| x.as_u64())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(format!("size.{k} is missing or not a positive integer")))
            };
            Some((dim("height")? as usize, dim("width")? as usize))
        } else {
            None
        };
        let code = obj
            .get("resample")
            .map(|x| x.as_i64().ok_or_else(|| bad(format!("resample is {x}, expected a PIL filter code"))))
            .transpose()?;
        let filter = match code {
            None => Filter::Bicubic,
            Some(c) => Filter::from_pil(c)
                .ok_or_else(|| bad(format!("resample {c} is not supported (1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)")))?,
        };
        let rescale = if flag("do_rescale", true)? { Some(num("rescale_factor")?) } else { None };
        let normalize = if flag("do_normalize", true)? { Some((triple("image_mean")?, triple("image_std")?)) } else { None };
        if let Some((_, std)) = normalize {
            if std.contains(&0.0) {
                return Err(bad("image_std holds a zero".into()));
            }
        }
        let image_seq_length = obj.get("image_seq_length").and_then(|x| x.as_u64()).map(|n| n as usize);
        Ok(Preprocessor { convert_rgb: flag("do_convert_rgb", true)?, resize, filter, rescale, normalize, image_seq_length, path })
    }

    /// `pixel_values [1, 3, H, W]` (float32) of an image file.
    pub fn pixel_values(&self, image: &Path) -> Result<(Tensor, Rgb)> {
        let img = load_image(image, self.convert_rgb)?;
        let (h, w) = self.resize.unwrap_or((img.height, img.width));
        let px = if (h, w) == (img.height, img.width) {
            img.pixels.clone()
        } else {
            resize(&img.pixels, img.width, img.height, 3, w, h, self.filter)
        };
        Ok((Tensor::from_f32(&[1, 3, h, w], &self.normalise(&px, h, w)), img))
    }

    /// Rescale (in f64, then f32, as transformers' numpy `rescale`) and normalise (f32), HWC to CHW.
    pub fn normalise(&self, px: &[u8], h: usize, w: usize) -> Vec<f32> {
        let mut out = vec![0f32; 3 * h * w];
        for (i, p) in px.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = match self.rescale {
                    Some(s) => (p[c] as f64 * s) as f32,
                    None => p[c] as f32,
                };
                if let Some((mean, std)) = self.normalize {
                    v = (v - mean[c] as f32) / std[c] as f32;
                }
                out[c * h * w + i] = v;
            }
        }
        out
    }
}
