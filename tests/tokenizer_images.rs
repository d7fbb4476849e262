//! Text and images in, text out, against transformers (fixtures from
//! `scripts/gen_tokenizer_fixtures.py`): tokenizer ids and decoded text, Pillow's resize,
//! `pixel_values`, the prompt layout of `PaliGemmaProcessor`, greedy generation through the
//! `kiln generate --prompt` binary, and the errors for bad text and image input.

use kiln::preprocess::{self, Filter, Preprocessor};
use kiln::tokenizer::{StreamDecoder, TextTokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn reference(name: &str) -> kiln_runtime::Tensor {
    let all = kiln::io::read(&fixtures().join("images_reference.safetensors")).unwrap();
    all.into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
}

/// A scratch copy of a fixture model folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn of(model: &str, tag: &str) -> Scratch {
        let dst = std::env::temp_dir().join(format!("kiln-tok-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(fixtures().join(model)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
        Scratch(dst)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the kiln binary: (exit success, stdout, stderr).
fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn kiln_err(args: &[&str]) -> String {
    let (ok, stdout, stderr) = kiln(args);
    assert!(!ok, "kiln {args:?} succeeded: {stdout}");
    assert!(!stderr.contains("panicked"), "kiln {args:?} panicked: {stderr}");
    stderr
}

#[test]
fn tokenizer_ids_and_text_match_transformers() {
    let tok = TextTokenizer::open(&fixtures().join("paligemma")).unwrap();
    let meta = json("tokenizer_cases.json");
    assert_eq!(tok.vocab_size() as i64, meta["vocab"].as_i64().unwrap());
    assert_eq!(tok.id("<image>").unwrap(), meta["image_token_id"].as_i64().unwrap());
    assert_eq!(tok.id("<loc0000>").unwrap(), meta["loc0000"].as_i64().unwrap());
    assert_eq!(tok.id("<seg000>").unwrap(), meta["seg000"].as_i64().unwrap());
    assert_eq!((tok.id("<pad>").unwrap(), tok.id("<eos>").unwrap(), tok.id("<bos>").unwrap()), (0, 1, 2));
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), c["decoded"].as_str().unwrap(), "decode of {text:?}");
        assert_eq!(tok.decode(&want, true).unwrap(), c["decoded_skip_special"].as_str().unwrap(), "decode(skip) of {text:?}");
    }
    // Byte fallback was exercised: the emoji case holds byte pieces (ids 5..=260).
    let emoji = cases.iter().find(|c| c["text"].as_str().unwrap().contains('🦀')).unwrap();
    assert!(ids_of(&emoji["ids"]).iter().any(|&i| (5..=260).contains(&i)));
}

#[test]
fn streaming_holds_back_partial_characters() {
    let tok = TextTokenizer::open(&fixtures().join("paligemma")).unwrap();
    let text = "emoji 🦀🔥👍🏽 and 日本語 <loc0100> cat";
    let ids = tok.encode(text).unwrap();
    let mut s = StreamDecoder::default();
    let mut pieces = Vec::new();
    for &i in &ids {
        pieces.push(s.push(&tok, i).unwrap());
    }
    pieces.push(s.finish(&tok).unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(pieces.iter().filter(|p| p.is_empty()).count() > 3, "byte pieces were held back: {pieces:?}");
    assert_eq!(pieces.concat(), text);
}

/// Max |a - b| over two byte buffers.
fn max_byte_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

/// Pillow's `Image.resize(.., BICUBIC)` on the same decoded pixels: bit-exact on the PNGs
/// (rgb_37x53 takes Pillow 13's vertical-first order, gray_20x24 the horizontal-first one). On
/// the JPEG, zune-jpeg against libjpeg-turbo adds decoder differences (measured: max 3 levels,
/// mean 0.40).
#[test]
fn resize_matches_pillow() {
    for (stem, file, bound, mean_bound) in
        [("rgb_37x53", "rgb_37x53.png", 0, 0.0), ("gray_20x24", "gray_20x24.png", 0, 0.0), ("photo_61x45", "photo_61x45.jpg", 4, 0.5)]
    {
        let img = preprocess::load_image(&fixtures().join("images").join(file), true).unwrap();
        let got = preprocess::resize(&img.pixels, img.width, img.height, 3, 32, 32, Filter::Bicubic);
        let want: Vec<u8> = reference(&format!("{stem}/resized")).to_f64().iter().map(|&x| x as u8).collect();
        let d = max_byte_diff(&got, &want);
        let mean = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / got.len() as f64;
        eprintln!("{stem}: resize max |diff| {d} levels, mean {mean:.4}");
        assert!(
            d <= bound && mean <= mean_bound,
            "{stem}: resize differs from Pillow by {d} levels, mean {mean} (bounds {bound}, {mean_bound})"
        );
    }
}

/// Pillow's resize on random images (`scripts/gen_resize_fixtures.py`): every filter, grey and
/// RGB, up and down on each axis, both of Pillow 13's pass orders and the boundary between
/// them; every byte equal.
#[test]
fn resize_matches_pillow_every_shape() {
    let all = kiln::io::read(&fixtures().join("resize_cases.safetensors")).unwrap();
    let get = |name: String| all.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no {name}")).1.clone();
    let mut cases = 0;
    while all.iter().any(|(n, _)| *n == format!("{cases}/in")) {
        let input = get(format!("{cases}/in"));
        let want: Vec<u8> = get(format!("{cases}/out")).to_f64().iter().map(|&x| x as u8).collect();
        let spec: Vec<usize> = get(format!("{cases}/spec")).to_f64().iter().map(|&x| x as usize).collect();
        let (h, w, c) = (input.ty.shape[0], input.ty.shape[1], input.ty.shape[2]);
        let px: Vec<u8> = input.to_f64().iter().map(|&x| x as u8).collect();
        let filter = Filter::from_pil(spec[2] as i64).unwrap();
        let got = preprocess::resize(&px, w, h, c, spec[0], spec[1], filter);
        assert_eq!(got.len(), want.len(), "case {cases}");
        let d = max_byte_diff(&got, &want);
        assert_eq!(d, 0, "case {cases}: {w}x{h}x{c} -> {}x{} with {filter:?} differs from Pillow by {d} levels", spec[0], spec[1]);
        cases += 1;
    }
    assert_eq!(cases, 36, "the fixture holds 36 cases");
}

/// `pixel_values` against transformers' image processor (SiglipImageProcessorPil here, as no
/// torchvision is installed): exact on the PNGs (the resize is bit-exact, and rescale and
/// normalise add no error); on the JPEG the decoder differences times 2/255.
#[test]
fn pixel_values_match_transformers() {
    let pre = Preprocessor::open(&fixtures().join("paligemma")).unwrap();
    assert_eq!((pre.resize, pre.filter, pre.convert_rgb), (Some((32, 32)), Filter::Bicubic, true));
    for (stem, file, bound) in [
        ("rgb_37x53", "rgb_37x53.png", 0.0),
        ("gray_20x24", "gray_20x24.png", 0.0),
        ("photo_61x45", "photo_61x45.jpg", 4.0 * 2.0 / 255.0 + 1e-6),
    ] {
        let (px, _) = pre.pixel_values(&fixtures().join("images").join(file)).unwrap();
        assert_eq!(px.ty.shape, vec![1, 3, 32, 32]);
        for name in ["pixel_values", "pixel_values_pil"] {
            let want = reference(&format!("{stem}/{name}")).to_f32();
            let got = px.to_f32();
            let e = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("{stem} {name}: max |error| {e:.3e}");
            assert!((e as f64) <= bound, "{stem} {name}: max |error| {e:.3e} over bound {bound:.3e}");
        }
    }
}

#[test]
fn prompt_layout_matches_the_processor() {
    let cases = json("generate_cases.json");
    for (model, image) in [("paligemma", true), ("gemma", false)] {
        let dir = fixtures().join(model);
        let tok = TextTokenizer::open(&dir).unwrap();
        for c in cases[model].as_array().unwrap() {
            let img = image.then(|| fixtures().join(c["image"].as_str().unwrap()));
            let p = kiln::prompt::prepare(&dir, &tok, c["prompt"].as_str().unwrap(), img.as_deref()).unwrap();
            assert_eq!(p.input_ids, ids_of(&c["input_ids"]), "{model}: {}", c["prompt"]);
            assert_eq!(p.pixel_values.is_some(), image);
        }
    }
}

/// `kiln generate --prompt` (the binary) against transformers' `generate(do_sample=False)`:
/// the same new ids, and stdout's answer equal to `decode(new_ids, skip_special_tokens=True)`.
#[test]
fn generate_prompt_matches_transformers() {
    let cases = json("generate_cases.json");
    for model in ["paligemma", "gemma"] {
        for c in cases[model].as_array().unwrap() {
            let dir = fixtures().join(model);
            let n = c["max_new_tokens"].as_i64().unwrap().to_string();
            let mut args = vec!["generate", dir.to_str().unwrap(), "--prompt", c["prompt"].as_str().unwrap(), "--max-new-tokens", &n];
            let img = c["image"].as_str().map(|i| fixtures().join(i));
            if let Some(i) = &img {
                args.extend(["--image", i.to_str().unwrap()]);
            }
            let (ok, stdout, stderr) = kiln(&args);
            assert!(ok, "kiln {args:?}: {stderr}");
            let stats: Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap_or_else(|e| panic!("{e}: {stderr}"));
            assert_eq!(ids_of(&stats["new_ids"]), ids_of(&c["new_ids"]), "{model} {}", c["prompt"]);
            let answer = stdout.split('\n').next().unwrap();
            assert_eq!(answer, c["text"].as_str().unwrap(), "{model} {}: stdout {stdout}", c["prompt"]);
        }
    }
}

/// `--breakdown` profiles after generating: the answer is unchanged, and both tables are
/// printed, the prefill (SigLIP tower, projector and Gemma over the prompt) with more steps than
/// the one-token decode.
#[test]
fn generate_prompt_breakdown_times_prefill_and_decode() {
    let c = &json("generate_cases.json")["paligemma"][0];
    let dir = fixtures().join("paligemma");
    let img = fixtures().join(c["image"].as_str().unwrap());
    let n = c["max_new_tokens"].as_i64().unwrap().max(2).to_string();
    let args = [
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        &n,
        "--image",
        img.to_str().unwrap(),
    ];
    let (_, plain, _) = kiln(&args);
    let mut with = args.to_vec();
    with.push("--breakdown");
    let (ok, stdout, stderr) = kiln(&with);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.split('\n').next(), plain.split('\n').next(), "the answer changed with --breakdown");
    let steps_after = |title: &str| -> usize {
        let rest = stdout.split(title).nth(1).unwrap_or_else(|| panic!("no '{title}' in\n{stdout}"));
        let total = rest.lines().find(|l| l.starts_with("total (one run)")).unwrap();
        total.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    let (prefill, decode) = (steps_after("prefill, kernel by kernel"), steps_after("decode, kernel by kernel"));
    assert!(prefill > decode && decode > 0, "prefill {prefill} steps, decode {decode}\n{stdout}");
}

#[test]
fn draw_writes_the_image_with_boxes() {
    let out = std::env::temp_dir().join(format!("kiln-tok-draw-{}.png", std::process::id()));
    let dir = fixtures().join("paligemma");
    let img = fixtures().join("images/rgb_37x53.png");
    let (ok, stdout, stderr) = kiln(&[
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        "detect cat",
        "--image",
        img.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--draw",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("drew ") && stdout.contains(out.to_str().unwrap()), "{stdout}");
    let drawn = preprocess::load_image(&out, false).unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!((drawn.width, drawn.height), (37, 53));
}

#[test]
fn missing_tokenizer_is_named() {
    let s = Scratch::of("paligemma", "notok");
    std::fs::remove_file(s.0.join("tokenizer.json")).unwrap();
    let img = fixtures().join("images/rgb_37x53.png");
    let e = kiln_err(&["generate", s.0.to_str().unwrap(), "--prompt", "caption en", "--image", img.to_str().unwrap()]);
    assert!(e.contains("tokenizer.json") && e.contains("no tokenizer.json"), "{e}");
}

#[test]
fn broken_tokenizer_is_named() {
    let s = Scratch::of("gemma", "badtok");
    std::fs::write(s.0.join("tokenizer.json"), "{\"model\": {\"type\": \"BPE\", \"vocab\": 5").unwrap();
    let e = kiln_err(&["generate", s.0.to_str().unwrap(), "--prompt", "hello"]);
    assert!(e.contains("tokenizer.json") && e.contains("not a valid tokenizer.json"), "{e}");
    let e = TextTokenizer::open(&s.0).err().unwrap().to_string();
    assert!(e.contains(s.0.join("tokenizer.json").to_str().unwrap()), "{e}");
}

#[test]
fn unreadable_image_is_named() {
    let dir = fixtures().join("paligemma");
    let bogus = std::env::temp_dir().join(format!("kiln-tok-bogus-{}.png", std::process::id()));
    std::fs::write(&bogus, b"this is not an image").unwrap();
    let e = kiln_err(&["generate", dir.to_str().unwrap(), "--prompt", "caption en", "--image", bogus.to_str().unwrap()]);
    let _ = std::fs::remove_file(&bogus);
    assert!(e.contains(bogus.to_str().unwrap()) && e.contains("cannot decode image"), "{e}");
    let e = kiln_err(&["generate", dir.to_str().unwrap(), "--prompt", "caption en", "--image", "/nonexistent/photo.jpg"]);
    assert!(e.contains("/nonexistent/photo.jpg") && e.contains("cannot open image"), "{e}");
    // A JPEG cut short decodes without complaint in the image crate; Pillow says "image file is
    // truncated", and kiln refuses it too. The whole file still loads.
    let jpg = std::fs::read(fixtures().join("images/photo_61x45.jpg")).unwrap();
    let cut = std::env::temp_dir().join(format!("kiln-tok-cut-{}.jpg", std::process::id()));
    std::fs::write(&cut, &jpg[..jpg.len() * 2 / 3]).unwrap();
    let e = kiln_err(&["generate", dir.to_str().unwrap(), "--prompt", "caption en", "--image", cut.to_str().unwrap()]);
    let _ = std::fs::remove_file(&cut);
    assert!(e.contains("image file is truncated") && e.contains("kiln-tok-cut"), "{e}");
    assert!(kiln::preprocess::load_image(&fixtures().join("images/photo_61x45.jpg"), true).is_ok());
}

#[test]
fn paligemma_without_image_and_gemma_with_one() {
    let dir = fixtures().join("paligemma");
    let e = kiln_err(&["generate", dir.to_str().unwrap(), "--prompt", "caption en"]);
    assert!(e.contains("PaliGemma checkpoint") && e.contains("--image"), "{e}");
    let dir = fixtures().join("gemma");
    let img = fixtures().join("images/rgb_37x53.png");
    let e = kiln_err(&["generate", dir.to_str().unwrap(), "--prompt", "hello", "--image", img.to_str().unwrap()]);
    assert!(e.contains("takes no --image"), "{e}");
}

#[test]
fn prompt_longer_than_capacity() {
    let dir = fixtures().join("gemma");
    let e = kiln_err(&["generate", dir.to_str().unwrap(), "--prompt", "the quick brown fox jumps over the lazy dog", "--bucket", "4"]);
    assert!(e.contains("compiled prompt capacity (--bucket) is 4") && e.contains("the prompt is"), "{e}");
}

#[test]
fn preprocessor_config_is_read_strictly() {
    let s = Scratch::of("paligemma", "prep");
    let path = s.0.join("preprocessor_config.json");
    let orig: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = orig.clone();
        f(v.as_object_mut().unwrap());
        std::fs::write(&path, v.to_string()).unwrap();
        Preprocessor::open(&s.0).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let e = edit(&|o| {
        o.insert("do_center_crop".into(), true.into());
    });
    assert!(e.contains("preprocessor_config.json") && e.contains("'do_center_crop' is not supported"), "{e}");
    let e = edit(&|o| {
        o.insert("resample".into(), 0.into());
    });
    assert!(e.contains("resample 0 is not supported"), "{e}");
    let e = edit(&|o| {
        o.insert("size".into(), serde_json::json!({"shortest_edge": 32}));
    });
    assert!(e.contains("size.shortest_edge is not supported"), "{e}");
    let e = edit(&|o| {
        o.insert("image_mean".into(), serde_json::json!([0.5, 0.5]));
    });
    assert!(e.contains("'image_mean' must hold three numbers"), "{e}");
    // do_convert_rgb null (as PaliGemma's own files have) keeps transformers' behaviour: a grey
    // image is refused rather than silently converted.
    edit(&|o| {
        o.insert("do_convert_rgb".into(), Value::Null);
    });
    let pre = Preprocessor::open(&s.0).unwrap();
    let e = pre.pixel_values(&fixtures().join("images/gray_20x24.png")).err().unwrap().to_string();
    assert!(e.contains("gray_20x24.png") && e.contains("do_convert_rgb off"), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = Preprocessor::open(&s.0).err().unwrap().to_string();
    assert!(e.contains("preprocessor_config.json") && e.contains("cannot read"), "{e}");
}

/// 16-bit PNGs read as Pillow reads them (the high byte of RGB, RGBA and grey+alpha samples,
/// 16-bit grey clipped at 255), then composited onto white as transformers' `convert_to_rgb`
/// does: equal to what `scripts/gen_png16_fixtures.py` recorded from Pillow 13.
#[test]
fn sixteen_bit_pngs_read_as_pillow_reads_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/png16");
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("png16.json")).unwrap()).unwrap();
    for (name, pixels) in want.as_object().unwrap() {
        let want: Vec<u8> =
            pixels.as_array().unwrap().iter().flat_map(|p| p.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8)).collect();
        let got = kiln::preprocess::load_image(&dir.join(name), true).unwrap();
        assert_eq!(got.pixels, want, "{name}");
    }
}
