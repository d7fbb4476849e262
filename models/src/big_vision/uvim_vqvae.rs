//! UViM's stage I VQ-VAE, the "base model" (`models/proj/uvim/vit.py` `Model`; "UViM: A
//! Unified Modeling Approach for Vision with Learned Guiding Codes", arXiv 2205.10337), at
//! inference (ENCDEC.md §4), read from the released stage I npz layout (`params/...`,
//! `state/dictionary`, `state/counts`).
//!
//! Encode: each input `x/<name> [B, T, *shape]` through its `DenseGeneral`, summed, plus the
//! context image's patch embedding, plus `pos_embedding_encoder`, through a ViT encoder; then
//! the bottleneck (a `jax.image.resize(.., 'linear')` of the token grid to `l x l`, built here
//! as two constant interpolation matrices with jax's antialiasing triangle weights, or the
//! `bottleneck_downsample` einsum), `encoder_head`, `jax.nn.standardize`, and the nearest
//! codeword (`|z|^2 - 2 z.e + |e|^2`, the first minimum) of the normalised dictionary.
//! Decode: codewords (a code of -1 is the last, as JAX indexes), `decoder_stem`, the resize
//! back to the grid (or `bottleneck_upsample`), the context embedding, `pos_embedding_decoder`,
//! a ViT decoder, and a `DenseGeneral` head per output: `logits/<name> [B, T, *shape]`.

use super::vit::Posemb;
use super::{grid, pair, patch_embed, posemb_sincos_2d};
use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::Builder;
use crate::registry::{Family, Kind, SynthRecipe, SynthRow, WeightFormat};
use crate::{Built, Checkpoint, Profile};
use kiln_graph::{BinaryOp, DType, NodeId, Op, ReduceOp, UnaryOp};
use std::path::Path;

/// The VQ-VAE family (`model_name: proj.uvim.vit`).
pub static FAMILY: Family = Family {
    name: "uvim-vqvae",
    about: "UViM's stage I VQ-VAE (model_name proj.uvim.vit): x/<name> + ctx -> code, logits; codes + ctx -> logits",
    claims: |k| k == Kind::BigVision("proj.uvim.vit"),
    build,
    generation: None,
    synth: &[SynthRow {
        name: "uvim-vqvae-depth",
        about: "UViM's stage I VQ-VAE for NYU depth at 512 px: 6 + 12 blocks, 768 wide, 4096 codewords, 256 depth bins (big_vision's vqvae_nyu_depth)",
        recipe: |_| Ok(depth_recipe()),
    }],
    init: super::synth_init,
};

/// big_vision's `configs/proj/uvim/vqvae_nyu_depth.py` model at its default `res=512,
/// patch_size=16`.
fn depth_recipe() -> SynthRecipe {
    let model = serde_json::json!({
        "input_size": [512, 512], "patch_size": [16, 16], "code_len": 256, "width": 768, "enc_depth": 6, "dec_depth": 12,
        "mlp_dim": 3072, "num_heads": 12, "dict_size": 4096, "codeword_dim": 768, "dict_momentum": 0.995,
        "with_encoder_ctx": true, "with_decoder_ctx": true, "code_dropout": "random", "bottleneck_resize": true,
        "inputs": {"depth": [256, 256]}, "outputs": {"depth": [256, 256]}
    });
    let config = serde_json::json!({"model_name": "proj.uvim.vit", "model": model});
    SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Npz, roots: &[""], given: Vec::new(), batch: 1 }
}

/// The kwargs of `uvim.vit.Model`, all honoured or refused (training-only ones are read and
/// have no effect at inference).
#[derive(Clone, Debug, PartialEq)]
pub struct VqConfig {
    pub inputs: Vec<(String, Vec<usize>)>,
    pub outputs: Vec<(String, Vec<usize>)>,
    pub input_size: (usize, usize),
    pub patch: (usize, usize),
    pub code_len: usize,
    pub width: usize,
    pub enc_depth: usize,
    pub dec_depth: usize,
    pub mlp_dim: usize,
    pub heads: usize,
    pub posemb: Posemb,
    pub dict_size: usize,
    pub codeword_dim: usize,
    pub enc_ctx: bool,
    pub dec_ctx: bool,
    pub resize: bool,
    pub quantize: bool,
}

/// A `{name: [dims]}` object.
fn shapes(r: &mut ConfigReader, field: &str) -> Result<Vec<(String, Vec<usize>)>> {
    let bad = |r: &ConfigReader, msg: String| r.unsupported(field, msg);
    match r.value(field) {
        Some(serde_json::Value::Object(o)) if !o.is_empty() => o
            .iter()
            .map(|(k, v)| {
                let dims: Option<Vec<usize>> = v.as_array().and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
                dims.filter(|d| !d.is_empty() && d.iter().all(|&x| x > 0))
                    .map(|d| (k.clone(), d))
                    .ok_or_else(|| bad(r, format!("'{k}': expected a list of positive integers, found {v}")))
            })
            .collect(),
        Some(v) => Err(bad(r, format!("expected {{name: [dims]}}, found {v}"))),
        None => Err(bad(r, "missing".into())),
    }
}

impl VqConfig {
    pub fn read(mut r: ConfigReader) -> Result<Self> {
        let inputs = shapes(&mut r, "inputs")?;
        let outputs = shapes(&mut r, "outputs")?;
        let input_size = pair(&mut r, "input_size", (256, 256))?;
        let patch = pair(&mut r, "patch_size", (8, 8))?;
        let code_len = r.usize_or("code_len", Some(256))?;
        let width = r.usize_or("width", Some(768))?;
        let enc_depth = r.usize_or("enc_depth", Some(6))?;
        let dec_depth = r.usize_or("dec_depth", Some(6))?;
        let mlp_dim = if r.has("mlp_dim") { r.usize_or("mlp_dim", None)? } else { 4 * width };
        let heads = r.usize_or("num_heads", Some(12))?;
        let posemb = match r.str_or("posemb", Some("learn"))?.as_str() {
            "learn" => Posemb::Learn,
            "sincos2d" => Posemb::SinCos2d,
            other => return Err(r.unsupported("posemb", format!("'{other}' is not supported (learn, sincos2d)"))),
        };
        let dict_size = r.usize_or("dict_size", Some(512))?;
        let codeword_dim = if r.has("codeword_dim") { r.usize_or("codeword_dim", None)? } else { width };
        let enc_ctx = r.bool_or("with_encoder_ctx", false)?;
        let dec_ctx = r.bool_or("with_decoder_ctx", false)?;
        let resize = r.bool_or("bottleneck_resize", false)?;
        let quantize = r.bool_or("quantize", true)?;
        if r.bool_or("zero_decoder_seq", false)? {
            return Err(r.unsupported("zero_decoder_seq", "a decoder fed zeros instead of its codes is not supported"));
        }
        // Training only: dropouts, dictionary learning, initialisation.
        let _ = r.f64_or("dropout", Some(0.0))?;
        let _ = r.f64_or("dict_momentum", Some(0.995))?;
        let _ = r.f64_or("min_count", Some(0.1))?;
        let _ = r.bool_or("head_zeroinit", true)?;
        let _ = r.str_or("code_dropout", Some("none"))?;
        r.skip(&["statistics_axis_name", "reinit", "rep_size"]);
        let (gh, gw) = grid(input_size, patch)?;
        let l = (code_len as f64).sqrt().round() as usize;
        if resize && l * l != code_len {
            return Err(r.unsupported("code_len", format!("{code_len} is not a square (bottleneck_resize)")));
        }
        if heads == 0 || width % heads != 0 || gh * gw == 0 || dict_size == 0 {
            return Err(r.unsupported("num_heads", format!("width {width} in {heads} heads, a {gh}x{gw} grid, {dict_size} codewords")));
        }
        r.finish()?;
        Ok(VqConfig {
            inputs,
            outputs,
            input_size,
            patch,
            code_len,
            width,
            enc_depth,
            dec_depth,
            mlp_dim,
            heads,
            posemb,
            dict_size,
            codeword_dim,
            enc_ctx,
            dec_ctx,
            resize,
            quantize,
        })
    }

    fn grid(&self) -> (usize, usize) {
        (self.input_size.0 / self.patch.0, self.input_size.1 / self.patch.1)
    }
}

/// `jax.image.resize(.., method='linear')` along one axis as a matrix `[out, in]` (row-major):
/// jax's `compute_weight_mat` with the triangle kernel, antialiased (the kernel widened by
/// `in / out`) when shrinking, half-pixel centres, weights normalised per output.
pub fn jax_linear_resize(n_in: usize, n_out: usize) -> Vec<f64> {
    let scale = n_out as f64 / n_in as f64;
    let inv = 1.0 / scale;
    let kernel_scale = inv.max(1.0);
    let mut m = vec![0.0; n_out * n_in];
    for o in 0..n_out {
        let sample = (o as f64 + 0.5) * inv - 0.5;
        let w: Vec<f64> = (0..n_in).map(|i| (1.0 - (sample - i as f64).abs() / kernel_scale).max(0.0)).collect();
        let sum: f64 = w.iter().sum();
        if sum.abs() <= 1000.0 * f32::EPSILON as f64 || !(-0.5..=n_in as f64 - 0.5).contains(&sample) {
            continue;
        }
        for (i, wi) in w.into_iter().enumerate() {
            m[o * n_in + i] = wi / sum;
        }
    }
    m
}

/// Resizes a `[B, h, w, C]` grid to `[B, oh, ow, C]` with jax's linear weights.
fn resize(m: &mut Builder, x: NodeId, b: usize, (h, w): (usize, usize), (oh, ow): (usize, usize), c: usize) -> Result<NodeId> {
    let dt = m.dtype;
    let rh = m.g.constant(dt, &[1, oh, h], jax_linear_resize(h, oh))?;
    let x = m.g.reshape(x, &[b, h, w * c])?;
    let x = m.g.matmul(rh, x, false)?; // [B, oh, w*C]
    let rw = m.g.constant(dt, &[1, ow, w], jax_linear_resize(w, ow))?;
    let x = m.g.reshape(x, &[b * oh, w, c])?;
    let x = m.g.matmul(rw, x, false)?; // [B*oh, ow, C]
    Ok(m.g.reshape(x, &[b, oh, ow, c])?)
}

/// A Flax `DenseGeneral` over all axes but the first of `[N, *shape_in]`-shaped rows given as
/// `[N, prod(shape_in)]`, to `shape_out`: `[N, prod(shape_out)]`.
fn dense_general(m: &mut Builder, x: NodeId, p: &str, shape_in: &[usize], shape_out: &[usize]) -> Result<NodeId> {
    let (din, dout): (usize, usize) = (shape_in.iter().product(), shape_out.iter().product());
    let mut ks = shape_in.to_vec();
    ks.extend(shape_out);
    let k = m.weight(&format!("{p}/kernel"), &ks)?;
    let k = m.g.reshape(k, &[din, dout])?;
    let bias = m.weight(&format!("{p}/bias"), shape_out)?;
    let bias = m.g.reshape(bias, &[dout])?;
    let y = m.g.matmul(x, k, false)?;
    Ok(m.g.add(y, bias)?)
}

/// A ViT encoder (`{p}/encoderblock_i`, `{p}/encoder_norm`) on `[B*T, W]` rows.
fn vit_encoder(m: &mut Builder, cfg: &VqConfig, p: &str, x: NodeId, depth: usize, b: usize, t: usize) -> Result<NodeId> {
    let mut x = x;
    for i in 0..depth {
        let bp = format!("{p}/encoderblock_{i}");
        x = m.encoder_block(x, &bp, ("MultiHeadDotProductAttention_0", "MlpBlock_0"), b, t, cfg.width, cfg.heads, cfg.mlp_dim)?;
    }
    m.flax_layer_norm(x, &format!("{p}/encoder_norm"), cfg.width)
}

/// A position table `[1, T, W]`.
fn posemb(m: &mut Builder, cfg: &VqConfig, name: &str) -> Result<NodeId> {
    let (gh, gw) = cfg.grid();
    match cfg.posemb {
        Posemb::Learn => m.weight(&format!("params/{name}"), &[1, gh * gw, cfg.width]),
        Posemb::SinCos2d => Ok(m.g.constant(m.dtype, &[1, gh * gw, cfg.width], posemb_sincos_2d(gh, gw, cfg.width)?)?),
    }
}

/// The context image's patch embedding `[B*T, W]` (`params/{name}`).
fn ctx_tokens(m: &mut Builder, cfg: &VqConfig, ctx: Option<NodeId>, name: &str) -> Result<NodeId> {
    let ctx = ctx.ok_or_else(|| ModelError::Unsupported("the context embedding needs ctx".into()))?;
    patch_embed(m, ctx, &format!("params/{name}"), cfg.patch, cfg.width)
}

/// The normalised codewords `[K, Dc]`: `dictionary / counts`, L2-normalised per row.
fn codewords(m: &mut Builder, cfg: &VqConfig) -> Result<NodeId> {
    let (k, dc) = (cfg.dict_size, cfg.codeword_dim);
    let d = m.weight("state/dictionary", &[k, dc])?;
    let c = m.weight("state/counts", &[k])?;
    let c = m.g.reshape(c, &[k, 1])?;
    let e = m.g.binary(BinaryOp::Div, d, c)?;
    let sq = m.g.mul(e, e)?;
    let n = m.g.reduce(ReduceOp::Sum, sq, &[1], true)?;
    let n = m.g.unary(UnaryOp::Sqrt, n)?;
    Ok(m.g.binary(BinaryOp::Div, e, n)?)
}

/// Decodes codewords `x [B*L, Dc]` to each output's logits `[B, T, *shape]` (named
/// `logits/<name>`).
fn decode(m: &mut Builder, cfg: &VqConfig, x: NodeId, ctx: Option<NodeId>, b: usize) -> Result<Vec<(String, NodeId)>> {
    let (gh, gw) = cfg.grid();
    let (t, w, l) = (gh * gw, cfg.width, cfg.code_len);
    let x = m.dense(x, "params/decoder_stem", cfg.codeword_dim, w)?;
    let x = if cfg.resize {
        let s = (l as f64).sqrt().round() as usize;
        let x = m.g.reshape(x, &[b, s, s, w])?;
        let x = resize(m, x, b, (s, s), (gh, gw), w)?;
        m.g.reshape(x, &[b * t, w])?
    } else {
        // einsum('bnc,nt->btc'): [B, C, L] @ [L, T].
        let up = m.weight("params/bottleneck_upsample", &[l, t])?;
        let x = m.g.reshape(x, &[b, l, w])?;
        let x = m.g.permute(x, &[0, 2, 1])?;
        let x = m.g.matmul(x, up, false)?;
        let x = m.g.permute(x, &[0, 2, 1])?;
        m.g.reshape(x, &[b * t, w])?
    };
    let x = if cfg.dec_ctx {
        let c = ctx_tokens(m, cfg, ctx, "ctx_dec_embedding")?;
        m.add(x, c)?
    } else {
        x
    };
    let pos = posemb(m, cfg, "pos_embedding_decoder")?;
    let x = m.g.reshape(x, &[b, t, w])?;
    let x = m.add(x, pos)?;
    let x = m.g.reshape(x, &[b * t, w])?;
    let x = vit_encoder(m, cfg, "params/decoder", x, cfg.dec_depth, b, t)?;
    let mut outs = Vec::new();
    for (name, shape) in &cfg.outputs {
        let y = dense_general(m, x, &format!("params/head_{name}"), &[w], shape)?;
        let mut full = vec![b, t];
        full.extend(shape);
        outs.push((format!("logits/{name}"), m.g.reshape(y, &full)?));
    }
    Ok(outs)
}

/// Builds `forward` (`x/<name>` and `ctx` in; `stem/<name>`, `bottleneck`, `bottleneck_q`,
/// `code [B, L]` and `logits/<name>` out) and `decode` (`codes [B, L]` and `ctx` in,
/// `logits/<name>` out). The image size is the config's `input_size`.
pub fn build(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile) -> Result<Built> {
    let mut r = ConfigReader::open(cfg_path)?;
    let _ = r.str_or("model_name", None)?;
    let kwargs = r.object("model")?.ok_or_else(|| r.unsupported("model", "missing: the model's keyword arguments"))?;
    r.finish()?;
    let cfg = VqConfig::read(kwargs)?;
    if let Some(hw) = profile.image_hw.filter(|&hw| hw != cfg.input_size) {
        return Err(ModelError::Unsupported(format!("a {hw:?} context: the position tables are made for input_size {:?}", cfg.input_size)));
    }
    let (b, dt) = (profile.batch, profile.dtype);
    let (gh, gw) = cfg.grid();
    let (t, w, l, dc) = (gh * gw, cfg.width, cfg.code_len, cfg.codeword_dim);
    let (ih, iw) = cfg.input_size;
    let with_ctx = cfg.enc_ctx || cfg.dec_ctx;

    let mut m = Builder::new(&checkpoint, dt);
    let ctx = if with_ctx { Some(m.g.input("ctx", dt, &[b, ih, iw, 3])?) } else { None };
    let mut sum: Option<NodeId> = None;
    for (name, shape) in &cfg.inputs {
        let mut s = vec![b, t];
        s.extend(shape);
        let x = m.g.input(&format!("x/{name}"), dt, &s)?;
        let x = m.g.reshape(x, &[b * t, shape.iter().product()])?;
        let y = dense_general(&mut m, x, &format!("params/embedding_{name}"), shape, &[w])?;
        let out = m.g.reshape(y, &[b, t, w])?;
        m.g.output(format!("stem/{name}"), out);
        sum = Some(match sum {
            Some(acc) => m.add(acc, y)?,
            None => y,
        });
    }
    let mut x = sum.ok_or_else(|| ModelError::Unsupported("no inputs".into()))?;
    if cfg.enc_ctx {
        let c = ctx_tokens(&mut m, &cfg, ctx, "ctx_enc_embedding")?;
        x = m.add(x, c)?;
    }
    let pos = posemb(&mut m, &cfg, "pos_embedding_encoder")?;
    let x = m.g.reshape(x, &[b, t, w])?;
    let x = m.add(x, pos)?;
    let x = m.g.reshape(x, &[b * t, w])?;
    let x = vit_encoder(&mut m, &cfg, "params/encoder", x, cfg.enc_depth, b, t)?;
    let x = if cfg.resize {
        let s = (l as f64).sqrt().round() as usize;
        let x = m.g.reshape(x, &[b, gh, gw, w])?;
        let x = resize(&mut m, x, b, (gh, gw), (s, s), w)?;
        m.g.reshape(x, &[b * l, w])?
    } else {
        let down = m.weight("params/bottleneck_downsample", &[t, l])?;
        let x = m.g.reshape(x, &[b, t, w])?;
        let x = m.g.permute(x, &[0, 2, 1])?;
        let x = m.g.matmul(x, down, false)?;
        let x = m.g.permute(x, &[0, 2, 1])?;
        m.g.reshape(x, &[b * l, w])?
    };
    let z = m.dense(x, "params/encoder_head", w, dc)?;
    // jax.nn.standardize: mean 0, variance 1 over the last axis, eps 1e-6 inside the sqrt.
    let (one, zero) = (m.g.constant(dt, &[dc], vec![1.0; dc])?, m.g.constant(dt, &[dc], vec![0.0; dc])?);
    let z = m.g.layer_norm(z, one, zero, 1e-6)?;
    let bottleneck = m.g.reshape(z, &[b, l, dc])?;
    m.g.output("bottleneck", bottleneck);
    let e = codewords(&mut m, &cfg)?;
    // dist = |z|^2 - 2 z.e + |e|^2; the code is the first minimum (top-1 of -dist).
    let zz = m.g.mul(z, z)?;
    let zz = m.g.reduce(ReduceOp::Sum, zz, &[1], true)?;
    let ze = m.g.matmul(z, e, true)?;
    let two = m.g.scalar(dt, 2.0)?;
    let ze = m.g.mul(ze, two)?;
    let ee = m.g.mul(e, e)?;
    let ee = m.g.reduce(ReduceOp::Sum, ee, &[1], false)?;
    let ee = m.g.reshape(ee, &[1, cfg.dict_size])?;
    let dist = m.g.binary(BinaryOp::Sub, zz, ze)?;
    let dist = m.g.add(dist, ee)?;
    let neg = m.g.unary(UnaryOp::Neg, dist)?;
    let idx = m.g.push(Op::TopK { k: 1 }, &[neg])?;
    let code = m.g.reshape(idx, &[b, l])?;
    m.g.output("code", code);
    let xq = if cfg.quantize {
        let flat = m.g.reshape(idx, &[b * l])?;
        m.g.push(Op::Gather { axis: 0 }, &[e, flat])?
    } else {
        z
    };
    let q = m.g.reshape(xq, &[b, l, dc])?;
    m.g.output("bottleneck_q", q);
    for (name, y) in decode(&mut m, &cfg, xq, ctx, b)? {
        m.g.output(name, y);
    }
    let forward = m.g;

    // decode: codes in (-1 is the last codeword, as JAX's e[-1]).
    let mut m = Builder::new(&checkpoint, dt);
    let ctx = if with_ctx { Some(m.g.input("ctx", dt, &[b, ih, iw, 3])?) } else { None };
    let codes = m.g.input("codes", DType::I64, &[b, l])?;
    let e = codewords(&mut m, &cfg)?;
    let zero = m.g.scalar(DType::I64, 0.0)?;
    let k = m.g.scalar(DType::I64, cfg.dict_size as f64)?;
    let neg = m.g.binary(BinaryOp::Lt, codes, zero)?;
    let wrapped = m.g.add(codes, k)?;
    let codes = m.g.push(Op::Select, &[neg, wrapped, codes])?;
    let codes = m.g.reshape(codes, &[b * l])?;
    let x = m.g.push(Op::Gather { axis: 0 }, &[e, codes])?;
    for (name, y) in decode(&mut m, &cfg, x, ctx, b)? {
        m.g.output(name, y);
    }
    let description = format!(
        "UViM VQ-VAE: width {w}, encoder {} / decoder {} blocks, {} heads, patch {:?} on {:?}, {l} codes of {dc} from {}, batch {b}, {dt}",
        cfg.enc_depth, cfg.dec_depth, cfg.heads, cfg.patch, cfg.input_size, cfg.dict_size
    );
    Ok(Built { entries: vec![("forward".into(), forward), ("decode".into(), m.g)], description, checkpoint })
}
