//! Jet: "Jet: A Modern Transformer-Based Normalizing Flow" (Kolesnikov et al., arXiv
//! 2412.15129). Matches big_vision's `big_vision/models/proj/jet/jet.py` (`Model.forward`,
//! `Model.inverse`): patchify, `depth` affine couplings (channel-wise or spatial, each with a
//! frozen permutation matrix and a ViT coupling network), unpatchify. The log-determinant is
//! summed over couplings, tokens and dimensions.
//!
//! A model has two entries sharing one weight table: `forward` (`images -> z, logdet`) and
//! `inverse` (`z -> images, logdet`, the couplings in reverse, the logdet negated).

use crate::checkpoint::Checkpoint;
use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::Builder;
use crate::registry::{flax_fan_in, Family, Given, Init, SynthRecipe, SynthRow, WeightFormat};
use crate::{Built, Profile};
use kiln_graph::{DType, Graph, NodeId, ReduceOp, UnaryOp};
use std::path::Path;

/// The frozen channel permutations, `(depth, d, d)`; zero for spatial couplings.
pub const CHANNEL_MASKS: &str = "channel_coupling_masks-FREEZE_ME";
/// The frozen token permutations, `(depth, n, n)`; zero for channel couplings.
pub const SPATIAL_MASKS: &str = "spatial_coupling_masks-FREEZE_ME";
/// Flax's `nn.LayerNorm` default.
const LN_EPS: f32 = 1e-6;

/// Which half of the state a coupling keeps as the network's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Split the `d` values of every token (after a random channel permutation).
    Channels,
    /// Split the `n` tokens into two groups of a spatial pattern.
    Spatial,
}

/// A spatial token partition: the group that comes first, then the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Row + column even first.
    Checkerboard,
    /// Even columns (even token index) first.
    VStripes,
    /// Even rows first.
    HStripes,
}

/// One spatial projection kind: a pattern, and whether its two groups are swapped (`-inv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpatialProj {
    pub pattern: Pattern,
    pub inverted: bool,
}

impl SpatialProj {
    /// Parses `checkerboard`, `vstripes`, `hstripes`, each optionally with `-inv`.
    pub fn parse(s: &str) -> Option<Self> {
        let (base, inverted) = match s.strip_suffix("-inv") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let pattern = match base {
            "checkerboard" => Pattern::Checkerboard,
            "vstripes" => Pattern::VStripes,
            "hstripes" => Pattern::HStripes,
            _ => return None,
        };
        Some(SpatialProj { pattern, inverted })
    }

    /// The two token groups of an `nh x nw` grid (ascending), first group first: the token
    /// order a spatial coupling's permutation produces (`get_spatial_coupling_init`).
    pub fn groups(&self, nh: usize, nw: usize) -> (Vec<usize>, Vec<usize>) {
        let first = |t: usize| match self.pattern {
            Pattern::Checkerboard => (t / nw + t % nw).is_multiple_of(2),
            Pattern::VStripes => t.is_multiple_of(2),
            Pattern::HStripes => (t / nw).is_multiple_of(2),
        };
        let (a, b): (Vec<usize>, Vec<usize>) = (0..nh * nw).partition(|&t| first(t));
        if self.inverted {
            (b, a)
        } else {
            (a, b)
        }
    }
}

/// One coupling of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coupling {
    /// A channel coupling with a random permutation (the only channel projection jet.py has).
    Channels,
    Spatial(SpatialProj),
}

/// The keyword arguments of big_vision's Jet `Model`, all honoured (`context` is not: kiln
/// builds the unconditional flow).
#[derive(Clone, Debug, PartialEq)]
pub struct JetConfig {
    pub depth: usize,
    pub block_depth: usize,
    pub emb_dim: usize,
    pub num_heads: usize,
    pub scale_factor: f64,
    pub ps: usize,
    pub kinds: Vec<Kind>,
    pub spatial_coupling_projs: Vec<SpatialProj>,
}

impl JetConfig {
    /// Reads the `model` kwargs object strictly: an unknown kwarg or value is an error.
    pub fn read(mut r: ConfigReader) -> Result<Self> {
        let kinds = r
            .str_list_or("kinds", &["channels", "channels", "spatial"])?
            .iter()
            .map(|k| match k.as_str() {
                "channels" => Ok(Kind::Channels),
                "spatial" => Ok(Kind::Spatial),
                other => Err(r.unsupported("kinds", format!("unknown coupling kind '{other}' (expected 'channels' or 'spatial')"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let cprojs = r.str_list_or("channels_coupling_projs", &["random"])?;
        if cprojs.is_empty() || cprojs.iter().any(|p| p != "random") {
            return Err(r.unsupported("channels_coupling_projs", format!("{cprojs:?}: jet.py knows only 'random'")));
        }
        let spatial_coupling_projs = r
            .str_list_or("spatial_coupling_projs", &["checkerboard", "checkerboard-inv"])?
            .iter()
            .map(|p| {
                SpatialProj::parse(p).ok_or_else(|| {
                    r.unsupported(
                        "spatial_coupling_projs",
                        format!("unknown projection '{p}' (checkerboard, vstripes, hstripes, optionally -inv)"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let c = JetConfig {
            depth: r.usize_or("depth", Some(2))?,
            block_depth: r.usize_or("block_depth", Some(1))?,
            emb_dim: r.usize_or("emb_dim", Some(256))?,
            num_heads: r.usize_or("num_heads", Some(4))?,
            scale_factor: r.f64_or("scale_factor", Some(2.0))?,
            ps: r.usize_or("ps", Some(4))?,
            kinds,
            spatial_coupling_projs,
        };
        if c.kinds.is_empty() {
            return Err(r.unsupported("kinds", "empty"));
        }
        if c.kinds.contains(&Kind::Spatial) && c.spatial_coupling_projs.is_empty() {
            return Err(r.unsupported("spatial_coupling_projs", "empty, but 'kinds' has spatial couplings"));
        }
        if c.depth == 0 || c.ps == 0 || c.num_heads == 0 || !c.emb_dim.is_multiple_of(c.num_heads) {
            return Err(
                r.unsupported("num_heads", format!("depth {}, ps {}, emb_dim {} in {} heads", c.depth, c.ps, c.emb_dim, c.num_heads))
            );
        }
        if c.scale_factor <= 0.0 {
            return Err(r.unsupported("scale_factor", format!("{} is not positive", c.scale_factor)));
        }
        r.finish()?;
        Ok(c)
    }

    /// Reads a big_vision folder's `config.json` (`{"model_name": "proj.jet.jet", "model": {..}}`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut r = ConfigReader::open(path)?;
        let name = r.str_or("model_name", None)?;
        if name != "proj.jet.jet" {
            return Err(r.unsupported("model_name", format!("'{name}' is not 'proj.jet.jet'")));
        }
        let kwargs = r.object("model")?.ok_or_else(|| r.unsupported("model", "missing (the Jet Model's keyword arguments)"))?;
        let cfg = JetConfig::read(kwargs)?;
        r.finish()?;
        Ok(cfg)
    }

    /// The couplings in order: `kinds` cycled, each kind drawing the next projection of its
    /// own cycle (`Model.compact_setup._interleave_couplings`).
    pub fn schedule(&self) -> Vec<Coupling> {
        let mut spatial = self.spatial_coupling_projs.iter().cycle();
        self.kinds
            .iter()
            .cycle()
            .take(self.depth)
            .map(|k| match k {
                Kind::Channels => Coupling::Channels,
                Kind::Spatial => Coupling::Spatial(*spatial.next().expect("checked non-empty when read")),
            })
            .collect()
    }
}

/// Sizes fixed by the profile and the checkpoint: batch, grid, tokens `n`, values per token `d`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ps: usize,
    n: usize,
    d: usize,
}

/// Builds a big_vision Jet folder: both entries, for `profile`.
pub fn build_folder(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile) -> Result<Built> {
    let cfg = JetConfig::from_file(cfg_path)?;
    let entries = build(&cfg, &checkpoint, profile)?;
    let (h, w) = image_hw(&cfg, &checkpoint, profile)?;
    let description = format!(
        "Jet flow: {} couplings (block depth {}, width {}, {} heads), patch {} at {h}x{w}, batch {}, {}",
        cfg.depth, cfg.block_depth, cfg.emb_dim, cfg.num_heads, cfg.ps, profile.batch, profile.dtype
    );
    Ok(Built { entries, description, checkpoint })
}

/// The image size: the profile's, or the one the checkpoint's token count implies (square).
fn image_hw(cfg: &JetConfig, ck: &Checkpoint, profile: &Profile) -> Result<(usize, usize)> {
    if let Some(hw) = profile.image_hw {
        return Ok(hw);
    }
    let n = stacked_dim(ck, SPATIAL_MASKS, cfg.depth)?;
    let side = (n as f64).sqrt().round() as usize;
    if side * side != n {
        return Err(ModelError::Unsupported(format!("{}: {SPATIAL_MASKS} has {n} tokens, not a square grid", ck.dir.display())));
    }
    Ok((side * cfg.ps, side * cfg.ps))
}

/// The size of a stacked `(depth, k, k)` mask.
fn stacked_dim(ck: &Checkpoint, name: &str, depth: usize) -> Result<usize> {
    let t = ck.tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
        dir: ck.dir.clone(),
        name: name.into(),
        hint: format!("expected shape [{depth}, k, k]"),
    })?;
    match t.ty.shape[..] {
        [l, a, b] if l == depth && a == b => Ok(a),
        _ => Err(ModelError::TensorType {
            path: t.file.clone(),
            name: name.into(),
            expected: format!("shape [{depth}, k, k]"),
            found: t.ty.to_string(),
        }),
    }
}

/// Builds the `forward` and `inverse` graphs for `profile`.
pub fn build(cfg: &JetConfig, ck: &Checkpoint, profile: &Profile) -> Result<Vec<(String, Graph)>> {
    let (h, w) = image_hw(cfg, ck, profile)?;
    let ps = cfg.ps;
    if h % ps != 0 || w % ps != 0 || h == 0 || w == 0 {
        return Err(ModelError::Unsupported(format!("resolution {h}x{w} is not a multiple of the patch size {ps}")));
    }
    let d = stacked_dim(ck, CHANNEL_MASKS, cfg.depth)?;
    if !d.is_multiple_of(ps * ps) || !d.is_multiple_of(2) {
        return Err(ModelError::Unsupported(format!("{CHANNEL_MASKS}: {d} values per token is not ps*ps*channels (ps {ps}) or not even")));
    }
    let n = (h / ps) * (w / ps);
    if !n.is_multiple_of(2) {
        return Err(ModelError::Unsupported(format!("{h}x{w} at patch {ps} gives {n} tokens; spatial couplings need an even count")));
    }
    if !profile.dtype.is_float() {
        return Err(ModelError::Unsupported(format!("compute dtype {} is not a float type", profile.dtype)));
    }
    let dims = Dims { b: profile.batch, h, w, c: d / (ps * ps), ps, n, d };
    let schedule = cfg.schedule();
    let forward = flow(cfg, ck, profile.dtype, dims, &schedule, Direction::Forward)?;
    let inverse = flow(cfg, ck, profile.dtype, dims, &schedule, Direction::Inverse)?;
    Ok(vec![("forward".into(), forward), ("inverse".into(), inverse)])
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    Inverse,
}

/// One direction of the flow: patchify, the couplings (reversed for the inverse), unpatchify.
fn flow(cfg: &JetConfig, ck: &Checkpoint, dtype: DType, dm: Dims, schedule: &[Coupling], dir: Direction) -> Result<Graph> {
    let mut m = Builder::new(ck, dtype);
    let (input, output) = if dir == Direction::Forward { ("images", "z") } else { ("z", "images") };
    let x = m.g.input(input, dtype, &[dm.b, dm.h, dm.w, dm.c])?;
    let (x, logdet) = run(&mut m, cfg, dm, schedule, x, dir)?;
    m.g.output(output, x);
    m.g.output("logdet", logdet);
    Ok(m.g)
}

/// The flow on `x [B, H, W, C]` inside another model's graph (JetFormer's adaptor, its weights
/// under the builder's prefix): the output `[B, H, W, C]` and the logdet `[B]` (negated for the
/// inverse).
pub fn apply(m: &mut Builder, cfg: &JetConfig, x: NodeId, inverse: bool) -> Result<(NodeId, NodeId)> {
    let s = m.g.shape(x).to_vec();
    let ps = cfg.ps;
    let [b, h, w, c] = s[..] else {
        return Err(ModelError::Unsupported(format!("Jet takes [B, H, W, C], not {s:?}")));
    };
    if h % ps != 0 || w % ps != 0 || h == 0 || w == 0 {
        return Err(ModelError::Unsupported(format!("a {h}x{w} grid is not a multiple of Jet's patch size {ps}")));
    }
    let (n, d) = ((h / ps) * (w / ps), ps * ps * c);
    if !n.is_multiple_of(2) || !d.is_multiple_of(2) {
        return Err(ModelError::Unsupported(format!("Jet splits tokens and values in halves: {n} tokens of {d} values")));
    }
    let dm = Dims { b, h, w, c, ps, n, d };
    let dir = if inverse { Direction::Inverse } else { Direction::Forward };
    run(m, cfg, dm, &cfg.schedule(), x, dir)
}

/// Patchify, the couplings (reversed for the inverse), unpatchify; the summed logdet.
fn run(m: &mut Builder, cfg: &JetConfig, dm: Dims, schedule: &[Coupling], x: NodeId, dir: Direction) -> Result<(NodeId, NodeId)> {
    let mut x = patchify(m, x, dm)?;
    let order: Vec<usize> = match dir {
        Direction::Forward => (0..schedule.len()).collect(),
        Direction::Inverse => (0..schedule.len()).rev().collect(),
    };
    // Per-coupling logdets are stacked and summed once, as the scan's outputs are in jet.py
    // (a chain of adds would become one elementwise region reading every coupling's value).
    let mut logdets = Vec::with_capacity(order.len());
    for i in order {
        let (y, ld) = coupling(m, cfg, dm, i, schedule[i], x, dir)?;
        x = y;
        logdets.push(m.g.reshape(ld, &[dm.b, 1])?);
    }
    let x = unpatchify(m, x, dm)?;
    let stacked = m.g.concat(&logdets, 1)?;
    let logdet = m.g.reduce(ReduceOp::Sum, stacked, &[1], false)?;
    let logdet = if dir == Direction::Inverse { m.g.unary(UnaryOp::Neg, logdet)? } else { logdet };
    Ok((x, logdet))
}

/// `b (h hp) (w wp) c -> b (h w) (hp wp c)`.
fn patchify(m: &mut Builder, x: NodeId, dm: Dims) -> Result<NodeId> {
    let (gh, gw) = (dm.h / dm.ps, dm.w / dm.ps);
    let x = m.g.reshape(x, &[dm.b, gh, dm.ps, gw, dm.ps, dm.c])?;
    let x = m.g.permute(x, &[0, 1, 3, 2, 4, 5])?;
    Ok(m.g.reshape(x, &[dm.b, dm.n, dm.d])?)
}

/// `b (h w) (hp wp c) -> b (h hp) (w wp) c`.
fn unpatchify(m: &mut Builder, x: NodeId, dm: Dims) -> Result<NodeId> {
    let (gh, gw) = (dm.h / dm.ps, dm.w / dm.ps);
    let x = m.g.reshape(x, &[dm.b, gh, gw, dm.ps, dm.ps, dm.c])?;
    let x = m.g.permute(x, &[0, 1, 3, 2, 4, 5])?;
    Ok(m.g.reshape(x, &[dm.b, dm.h, dm.w, dm.c])?)
}

/// Layer `i` of a scanned parameter `couplings/{name}`.
fn layer(name: &str, i: usize) -> String {
    format!("couplings/{name}[{i}]")
}

/// One affine coupling on `x [B, n, d]`: returns the new state and its logdet `[B]`
/// (negated for the inverse).
fn coupling(m: &mut Builder, cfg: &JetConfig, dm: Dims, i: usize, kind: Coupling, x: NodeId, dir: Direction) -> Result<(NodeId, NodeId)> {
    let (b, n, d, half) = (dm.b, dm.n, dm.d, dm.d / 2);
    // Split: permute, then halve. A spatial split halves the tokens, and each half's token t
    // becomes two rows of d/2 values (`cut`), so both kinds feed the network [B, n, d/2].
    let (x1, x2, proj) = match kind {
        Coupling::Channels => {
            let p = m.weight(&format!("{CHANNEL_MASKS}[{i}]"), &[d, d])?;
            let xp = m.g.matmul(x, p, false)?;
            (m.g.slice(xp, 2, 0, half)?, m.g.slice(xp, 2, half, d)?, p)
        }
        Coupling::Spatial(_) => {
            let s = m.weight(&format!("{SPATIAL_MASKS}[{i}]"), &[n, n])?;
            let st = m.g.permute(s, &[1, 0])?;
            let xp = m.g.matmul(st, x, false)?;
            let a = m.g.slice(xp, 1, 0, n / 2)?;
            let c = m.g.slice(xp, 1, n / 2, n)?;
            (m.g.reshape(a, &[b, n, half])?, m.g.reshape(c, &[b, n, half])?, s)
        }
    };

    let (bias, raw) = coupling_net(m, cfg, dm, i, x1)?;
    // scale = sigmoid(raw) * scale_factor, so log scale = log_sigmoid(raw) + log(scale_factor).
    let sig = m.g.unary(UnaryOp::Sigmoid, raw)?;
    let scale = m.g.mul_scalar(sig, cfg.scale_factor)?;
    let y2 = match dir {
        Direction::Forward => {
            let t = m.add(x2, bias)?;
            m.g.mul(t, scale)?
        }
        Direction::Inverse => {
            let t = m.g.binary(kiln_graph::BinaryOp::Div, x2, scale)?;
            m.g.binary(kiln_graph::BinaryOp::Sub, t, bias)?
        }
    };
    let neg = m.g.unary(UnaryOp::Neg, raw)?;
    let sp = m.g.unary(UnaryOp::Softplus, neg)?;
    let log_sig = m.g.unary(UnaryOp::Neg, sp)?;
    let log_sf = m.g.scalar(m.dtype, cfg.scale_factor.ln())?;
    let per_dim = m.add(log_sig, log_sf)?;
    let logdet = m.g.reduce(ReduceOp::Sum, per_dim, &[1, 2], false)?;

    // Merge: concatenate the halves and undo the permutation (a permutation's inverse is its
    // transpose).
    let y = match kind {
        Coupling::Channels => {
            let y = m.g.concat(&[x1, y2], 2)?;
            m.g.matmul(y, proj, true)?
        }
        Coupling::Spatial(_) => {
            let a = m.g.reshape(x1, &[b, n / 2, d])?;
            let c = m.g.reshape(y2, &[b, n / 2, d])?;
            let y = m.g.concat(&[a, c], 1)?;
            m.g.matmul(proj, y, false)?
        }
    };
    Ok((y, logdet))
}

/// The coupling network (`DNN`): `init_proj` + position embedding, a big_vision ViT encoder
/// (pre-LN blocks, final `encoder_norm`), `final_proj` split into `(bias, raw_scale)`.
fn coupling_net(m: &mut Builder, cfg: &JetConfig, dm: Dims, i: usize, x1: NodeId) -> Result<(NodeId, NodeId)> {
    let (b, n, half, e) = (dm.b, dm.n, dm.d / 2, cfg.emb_dim);
    let x = m.g.reshape(x1, &[b * n, half])?;
    let x = dense(m, x, "dnn/init_proj", i, half, e)?;
    let x = m.g.reshape(x, &[b, n, e])?;
    let pos = m.weight(&layer("dnn/posemb", i), &[1, n, e])?;
    let x = m.add(x, pos)?;
    let mut x = m.g.reshape(x, &[b * n, e])?;
    for blk in 0..cfg.block_depth {
        x = encoder_block(m, cfg, dm, &format!("dnn/vit/encoderblock_{blk}"), i, x)?;
    }
    let x = layer_norm(m, x, "dnn/vit/encoder_norm", i, e)?;
    let out = dense(m, x, "dnn/final_proj", i, e, 2 * half)?;
    let bias = m.g.slice(out, 1, 0, half)?;
    let raw = m.g.slice(out, 1, half, 2 * half)?;
    Ok((m.g.reshape(bias, &[b, n, half])?, m.g.reshape(raw, &[b, n, half])?))
}

/// A big_vision `Encoder1DBlock` on `[B*n, E]` rows: `x + MHSA(LN_0(x))`, then `x + MLP(LN_1(x))`.
fn encoder_block(m: &mut Builder, cfg: &JetConfig, dm: Dims, p: &str, i: usize, x: NodeId) -> Result<NodeId> {
    let (e, heads) = (cfg.emb_dim, cfg.num_heads);
    let hd = e / heads;
    let y = layer_norm(m, x, &format!("{p}/LayerNorm_0"), i, e)?;
    let att = format!("{p}/MultiHeadDotProductAttention_0");
    // Flax DenseGeneral kernels (E, H, hd) and (H, hd, E) are (E, H*hd) and (H*hd, E) views.
    let mut qkv = [y; 3];
    for (slot, name) in qkv.iter_mut().zip(["query", "key", "value"]) {
        let w = m.weight(&layer(&format!("{att}/{name}/kernel"), i), &[e, heads, hd])?;
        let w = m.g.reshape(w, &[e, e])?;
        let bias = m.weight(&layer(&format!("{att}/{name}/bias"), i), &[heads, hd])?;
        let bias = m.g.reshape(bias, &[e])?;
        let t = m.g.matmul(y, w, false)?;
        *slot = m.add(t, bias)?;
    }
    let a = m.mha(qkv[0], qkv[1], qkv[2], dm.b, dm.n, dm.n, heads, hd)?;
    let wo = m.weight(&layer(&format!("{att}/out/kernel"), i), &[heads, hd, e])?;
    let wo = m.g.reshape(wo, &[e, e])?;
    let bo = m.weight(&layer(&format!("{att}/out/bias"), i), &[e])?;
    let a = m.g.matmul(a, wo, false)?;
    let a = m.add(a, bo)?;
    let x = m.add(x, a)?;
    let y = layer_norm(m, x, &format!("{p}/LayerNorm_1"), i, e)?;
    let y = dense(m, y, &format!("{p}/MlpBlock_0/Dense_0"), i, e, 4 * e)?;
    let y = m.g.unary(UnaryOp::GeluTanh, y)?;
    let y = dense(m, y, &format!("{p}/MlpBlock_0/Dense_1"), i, 4 * e, e)?;
    m.add(x, y)
}

/// Flax `Dense`: `x @ kernel + bias`, kernel stored `(in, out)`.
fn dense(m: &mut Builder, x: NodeId, p: &str, i: usize, d_in: usize, d_out: usize) -> Result<NodeId> {
    let w = m.weight(&layer(&format!("{p}/kernel"), i), &[d_in, d_out])?;
    let b = m.weight(&layer(&format!("{p}/bias"), i), &[d_out])?;
    let y = m.g.matmul(x, w, false)?;
    m.add(y, b)
}

/// Flax `LayerNorm` (scale and bias, eps 1e-6) over the last axis.
fn layer_norm(m: &mut Builder, x: NodeId, p: &str, i: usize, d: usize) -> Result<NodeId> {
    let s = m.weight(&layer(&format!("{p}/scale"), i), &[d])?;
    let b = m.weight(&layer(&format!("{p}/bias"), i), &[d])?;
    Ok(m.g.layer_norm(x, s, b, LN_EPS)?)
}

/// Bits per dimension of one image as big_vision's Jet trainer reports it (`_bits_per_dim`,
/// without dequantisation noise): the Gaussian NLL of `z` minus the logdet, per sub-pixel,
/// plus `log 127.5` for the `[-1, 1]` pixel scale, in bits.
pub fn bits_per_dim(z: &[f32], logdet: f64) -> f64 {
    let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    let nll: f64 = z.iter().map(|&v| 0.5 * (v as f64) * (v as f64) + half_log_2pi + 127.5f64.ln()).sum::<f64>() - logdet;
    nll / (std::f64::consts::LN_2 * z.len() as f64)
}

/// The Jet family (`model_name: proj.jet.jet`): `forward` and `inverse`.
pub static FAMILY: Family = Family {
    name: "jet",
    about: "big_vision Jet normalizing flows (model_name proj.jet.jet; params.npz): forward and inverse",
    claims: |k| k == crate::registry::Kind::BigVision("proj.jet.jet"),
    build: build_folder,
    generation: None,
    synth: &[
        SynthRow {
            name: "jet-imagenet64",
            about: "Jet, ImageNet 64x64 (32 couplings, block depth 2, width 512, 8 heads, ps 4; ~207M params)",
            recipe: |seed| {
                let kwargs = synth_kwargs(
                    32,
                    2,
                    512,
                    8,
                    4,
                    &["channels", "channels", "channels", "channels", "spatial"],
                    &["checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes", "hstripes-inv"],
                );
                synth_recipe(kwargs, 64, 3, seed)
            },
        },
        SynthRow {
            name: "jet-jetformer-256",
            about: "JetFormer-350M's Jet, 256x256 (32 channel couplings, block depth 4, width 512, 8 heads, 16x16 patches; ~427M params)",
            recipe: |seed| synth_recipe(synth_kwargs(32, 4, 512, 8, 16, &["channels"], &["checkerboard"]), 256, 3, seed),
        },
    ],
    init: synth_init,
};

/// The `model` kwargs of a Jet (scale factor 2, random channel projections).
pub fn synth_kwargs(
    depth: usize,
    block_depth: usize,
    emb_dim: usize,
    heads: usize,
    ps: usize,
    kinds: &[&str],
    spatial: &[&str],
) -> serde_json::Value {
    serde_json::json!({
        "depth": depth,
        "block_depth": block_depth,
        "emb_dim": emb_dim,
        "num_heads": heads,
        "scale_factor": 2.0,
        "ps": ps,
        "kinds": kinds,
        "channels_coupling_projs": ["random"],
        "spatial_coupling_projs": spatial,
    })
}

/// A Jet folder for `image_size` px images of `channels` channels: the config and the frozen
/// permutation stacks (random channel permutations, the spatial patterns of the schedule), so
/// the flow stays invertible.
pub fn synth_recipe(kwargs: serde_json::Value, image_size: usize, channels: usize, seed: u64) -> Result<SynthRecipe> {
    let config = serde_json::json!({"model_name": "proj.jet.jet", "model": kwargs.clone()});
    let cfg = JetConfig::read(ConfigReader::from_value(Path::new("(kiln synth)"), kwargs)?)?;
    if image_size == 0 || !image_size.is_multiple_of(cfg.ps) {
        return Err(ModelError::Unsupported(format!("image size {image_size} is not a multiple of the patch size {}", cfg.ps)));
    }
    let g = image_size / cfg.ps;
    let (n, d) = (g * g, cfg.ps * cfg.ps * channels);
    let mut ch = vec![0f32; cfg.depth * d * d];
    let mut sp = vec![0f32; cfg.depth * n * n];
    let mut state = seed ^ 0x4A45_5400;
    for (i, c) in cfg.schedule().iter().enumerate() {
        match c {
            Coupling::Channels => {
                // W[p[j], j] = 1 for a random permutation p (Fisher-Yates, splitmix64).
                let mut p: Vec<usize> = (0..d).collect();
                for j in (1..d).rev() {
                    state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    p.swap(j, ((z ^ (z >> 31)) % (j as u64 + 1)) as usize);
                }
                for (j, &r) in p.iter().enumerate() {
                    ch[i * d * d + r * d + j] = 1.0;
                }
            }
            Coupling::Spatial(proj) => {
                let (a, b) = proj.groups(g, g);
                for (col, &t) in a.iter().chain(&b).enumerate() {
                    sp[i * n * n + t * n + col] = 1.0;
                }
            }
        }
    }
    let given = vec![
        Given { name: CHANNEL_MASKS.into(), shape: vec![cfg.depth, d, d], values: ch },
        Given { name: SPATIAL_MASKS.into(), shape: vec![cfg.depth, n, n], values: sp },
    ];
    Ok(SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Npz, roots: &[""], given, batch: 1 })
}

/// Synthetic Jet weights (per coupling): kernels N(0, 1/fan_in), biases N(0, 0.02²), layer norm
/// scales 1 + N(0, 0.05²), position embeddings N(0, 1/width). big_vision zero-initialises
/// `final_proj` (an identity flow); small random values N(0, 0.01/width) keep every coupling
/// doing real work while scales stay near 1.
pub fn synth_init(name: &str, shape: &[usize]) -> Init {
    let leaf = name.rsplit('/').next().unwrap_or(name);
    let layer = name.rsplit('/').nth(1).unwrap_or("");
    match leaf {
        "bias" => Init::BIAS,
        "scale" => Init::LN_WEIGHT,
        "posemb" => Init::fan_in(shape.last().copied().unwrap_or(1)),
        "kernel" if layer == "final_proj" => Init::Normal { mean: 0.0, std: 0.1 / (shape[0] as f32).sqrt() },
        "kernel" if matches!(layer, "query" | "key" | "value") => Init::fan_in(shape[0]),
        _ => Init::fan_in(flax_fan_in(shape)),
    }
}
