//! PaliGemma's detection and segmentation output text (MODELS.md §4.5): per object four
//! `<locNNNN>` tokens (`ymin, xmin, ymax, xmax`, each `round(v * 1023)` of a coordinate
//! normalised to [0, 1]), optionally sixteen `<segNNN>` codebook indices, then a label;
//! objects joined by `" ; "`. Decoding divides by 1023 as big_vision does.

/// One object of a detection / segmentation answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// `[ymin, xmin, ymax, xmax]`, normalised to [0, 1].
    pub bbox: [f32; 4],
    /// The sixteen VQ codebook indices of the 64x64 mask, when present.
    pub seg: Option<[u8; 16]>,
    pub label: String,
}

impl Detection {
    /// The box in pixels of a `width` x `height` image: `(x0, y0, x1, y1)`.
    pub fn pixels(&self, width: u32, height: u32) -> (f32, f32, f32, f32) {
        let [y0, x0, y1, x1] = self.bbox;
        (x0 * width as f32, y0 * height as f32, x1 * width as f32, y1 * height as f32)
    }
}

/// Reads `<{tag}NNN..>` (exactly `digits` digits) at the start of `s`: the value and the rest.
fn token<'a>(s: &'a str, tag: &str, digits: usize) -> Option<(u32, &'a str)> {
    let rest = s.strip_prefix('<')?.strip_prefix(tag)?;
    let num = rest.get(..digits)?;
    if !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rest = rest[digits..].strip_prefix('>')?;
    Some((num.parse().ok()?, rest))
}

/// Parses a detection or segmentation answer. Objects that are not four `<loc>` tokens in
/// 0..=1023 with `ymax > ymin` and `xmax > xmin` (then 0 or 16 `<seg>` tokens in 0..=127) are
/// skipped, as big_vision's evaluators skip invalid predictions.
pub fn parse(text: &str) -> Vec<Detection> {
    let mut out = Vec::new();
    for part in text.split(';') {
        let mut s = part.trim_start();
        let mut locs = [0u32; 4];
        let mut ok = true;
        for l in &mut locs {
            match token(s, "loc", 4) {
                Some((v, rest)) if v <= 1023 => {
                    *l = v;
                    s = rest;
                }
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok || locs[2] <= locs[0] || locs[3] <= locs[1] {
            continue;
        }
        let mut seg = [0u8; 16];
        let mut n_seg = 0;
        while let Some((v, rest)) = token(s, "seg", 3) {
            if v > 127 || n_seg == 16 {
                n_seg = usize::MAX;
                break;
            }
            seg[n_seg] = v as u8;
            n_seg += 1;
            s = rest;
        }
        if n_seg != 0 && n_seg != 16 {
            continue;
        }
        let bbox = locs.map(|v| v as f32 / 1023.0);
        out.push(Detection { bbox, seg: (n_seg == 16).then_some(seg), label: s.trim().to_string() });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detections_with_and_without_masks() {
        let segs: String = (0..16).map(|i| format!("<seg{:03}>", i * 8)).collect();
        let text = format!("<loc0100><loc0200><loc0500><loc1023> cat ; <loc0000><loc0000><loc1023><loc1023>{segs} big dog");
        let d = parse(&text);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].label, "cat");
        assert_eq!(d[0].bbox, [100.0 / 1023.0, 200.0 / 1023.0, 500.0 / 1023.0, 1.0]);
        assert!(d[0].seg.is_none());
        assert_eq!(d[1].label, "big dog");
        assert_eq!(d[1].seg.unwrap()[15], 120);
        let (x0, y0, x1, y1) = d[0].pixels(1023, 2046);
        for (got, want) in [(x0, 200.0), (y0, 200.0), (x1, 1023.0), (y1, 1000.0)] {
            assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        }
    }

    #[test]
    fn invalid_objects_are_skipped() {
        // Three locs, an empty box, a loc over 1023, a seg over 127, five segs.
        let bad = [
            "<loc0100><loc0200><loc0500> cat",
            "<loc0500><loc0200><loc0500><loc0300> cat",
            "<loc0100><loc0200><loc0500><loc1024> cat",
            "<loc0100><loc0200><loc0500><loc0600><seg128> cat",
            "<loc0100><loc0200><loc0500><loc0600><seg001><seg002><seg003><seg004><seg005> cat",
            "a caption with no boxes",
        ];
        for t in bad {
            assert!(parse(t).is_empty(), "{t}");
        }
        assert_eq!(parse(&format!("{} ; <loc0001><loc0002><loc0003><loc0004> x", bad[0])).len(), 1);
    }
}
