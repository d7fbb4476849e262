//! `kiln synth jet-*`: full-size random-weight big_vision Jet folders (`config.json` with
//! `model_name: proj.jet.jet` + `params.npz` in `np.savez` layout), for benchmarks.
//!
//! The scanned parameters are stacked `(depth, ...)` as big_vision stores them; the frozen
//! permutation matrices are real permutations (random channel permutations, the spatial
//! patterns of the schedule), so the flow stays invertible. Random values follow
//! [`TensorSpec::values`], deterministic in the seed.

use crate::npz_write::NpzWriter;
use crate::synth::{Init, SynthError, SynthReport, TensorSpec};
use kiln_models::jet::{Coupling, JetConfig, Kind, SpatialProj, CHANNEL_MASKS, SPATIAL_MASKS};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// A Jet model's kwargs and the image size it is made for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JetSynthConfig {
    pub depth: usize,
    pub block_depth: usize,
    pub emb_dim: usize,
    pub num_heads: usize,
    pub ps: usize,
    pub image_size: usize,
    pub channels: usize,
    pub kinds: &'static [&'static str],
    pub spatial_coupling_projs: &'static [&'static str],
}

impl JetSynthConfig {
    /// Tokens and values per token.
    pub fn dims(&self) -> (usize, usize) {
        let g = self.image_size / self.ps.max(1);
        (g * g, self.ps * self.ps * self.channels)
    }

    /// The model config kiln reads, as big_vision would write it.
    pub fn config_json(&self) -> Value {
        json!({
            "model_name": "proj.jet.jet",
            "model": {
                "depth": self.depth,
                "block_depth": self.block_depth,
                "emb_dim": self.emb_dim,
                "num_heads": self.num_heads,
                "scale_factor": 2.0,
                "ps": self.ps,
                "kinds": self.kinds,
                "channels_coupling_projs": ["random"],
                "spatial_coupling_projs": self.spatial_coupling_projs,
            }
        })
    }

    /// The same config as kiln's model reader parses it (for the schedule).
    pub fn model_config(&self) -> Result<JetConfig, SynthError> {
        let bad = |m: String| SynthError::InvalidConfig(m);
        let kinds = self
            .kinds
            .iter()
            .map(|k| match *k {
                "channels" => Ok(Kind::Channels),
                "spatial" => Ok(Kind::Spatial),
                other => Err(bad(format!("unknown coupling kind {other}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spatial_coupling_projs = self
            .spatial_coupling_projs
            .iter()
            .map(|p| SpatialProj::parse(p).ok_or_else(|| bad(format!("unknown spatial projection {p}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let (n, d) = self.dims();
        if self.depth == 0 || kinds.is_empty() || self.num_heads == 0 || !self.emb_dim.is_multiple_of(self.num_heads) {
            return Err(bad(format!("{self:?}: depth, kinds and heads must be non-empty and divide the width")));
        }
        if self.ps == 0 || !self.image_size.is_multiple_of(self.ps) || !n.is_multiple_of(2) || !d.is_multiple_of(2) {
            return Err(bad(format!("{self:?}: image size, patch size and channels give {n} tokens of {d}")));
        }
        if kinds.contains(&Kind::Spatial) && spatial_coupling_projs.is_empty() {
            return Err(bad("spatial couplings without spatial_coupling_projs".into()));
        }
        Ok(JetConfig {
            depth: self.depth,
            block_depth: self.block_depth,
            emb_dim: self.emb_dim,
            num_heads: self.num_heads,
            scale_factor: 2.0,
            ps: self.ps,
            kinds,
            spatial_coupling_projs,
        })
    }

    /// The random parameters, stacked over couplings, with big_vision's names.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (l, e, (n, d)) = (self.depth, self.emb_dim, self.dims());
        let (half, heads) = (d / 2, self.num_heads);
        let hd = e / heads.max(1);
        let mut t = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, init: Init| {
            let mut s = vec![l];
            s.extend(shape);
            t.push(TensorSpec::f32(format!("couplings/dnn/{name}"), s, init));
        };
        let ln = |push: &mut dyn FnMut(String, Vec<usize>, Init), p: &str| {
            push(format!("{p}/scale"), vec![e], Init::LN_WEIGHT);
            push(format!("{p}/bias"), vec![e], Init::BIAS);
        };
        push("init_proj/kernel".into(), vec![half, e], Init::fan_in(half));
        push("init_proj/bias".into(), vec![e], Init::BIAS);
        push("posemb".into(), vec![1, n, e], Init::fan_in(e));
        for b in 0..self.block_depth {
            let p = format!("vit/encoderblock_{b}");
            ln(&mut push, &format!("{p}/LayerNorm_0"));
            ln(&mut push, &format!("{p}/LayerNorm_1"));
            let a = format!("{p}/MultiHeadDotProductAttention_0");
            for q in ["query", "key", "value"] {
                push(format!("{a}/{q}/kernel"), vec![e, heads, hd], Init::fan_in(e));
                push(format!("{a}/{q}/bias"), vec![heads, hd], Init::BIAS);
            }
            push(format!("{a}/out/kernel"), vec![heads, hd, e], Init::fan_in(e));
            push(format!("{a}/out/bias"), vec![e], Init::BIAS);
            push(format!("{p}/MlpBlock_0/Dense_0/kernel"), vec![e, 4 * e], Init::fan_in(e));
            push(format!("{p}/MlpBlock_0/Dense_0/bias"), vec![4 * e], Init::BIAS);
            push(format!("{p}/MlpBlock_0/Dense_1/kernel"), vec![4 * e, e], Init::fan_in(4 * e));
            push(format!("{p}/MlpBlock_0/Dense_1/bias"), vec![e], Init::BIAS);
        }
        ln(&mut push, "vit/encoder_norm");
        // big_vision zero-initialises final_proj (an identity flow); small random values keep
        // every coupling doing real work while scales stay near 1.
        push("final_proj/kernel".into(), vec![e, d], Init::Normal { mean: 0.0, std: 0.1 / (e as f32).sqrt() });
        push("final_proj/bias".into(), vec![d], Init::BIAS);
        t
    }

    /// The frozen `(depth, d, d)` channel and `(depth, n, n)` spatial permutation stacks.
    pub fn masks(&self, seed: u64) -> Result<(Vec<f32>, Vec<f32>), SynthError> {
        let cfg = self.model_config()?;
        let ((n, d), g) = (self.dims(), self.image_size / self.ps);
        let mut ch = vec![0f32; self.depth * d * d];
        let mut sp = vec![0f32; self.depth * n * n];
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
        Ok((ch, sp))
    }
}

/// Writes a Jet folder: `config.json` and `params.npz` (keys sorted, as `np.savez` of a
/// flattened big_vision tree).
pub fn synth_jet(cfg: &JetSynthConfig, out: &Path, seed: u64) -> Result<SynthReport, SynthError> {
    let start = Instant::now();
    let (ch, sp) = cfg.masks(seed)?;
    let (n, d) = cfg.dims();
    std::fs::create_dir_all(out).map_err(|e| SynthError::Io { path: out.into(), source: e })?;
    let config_path = out.join("config.json");
    let text = serde_json::to_string_pretty(&cfg.config_json()).expect("config serializes") + "\n";
    std::fs::write(&config_path, text).map_err(|e| SynthError::Io { path: config_path.clone(), source: e })?;
    let weights_path = out.join("params.npz");
    let io = |e| SynthError::Io { path: weights_path.clone(), source: e };
    let mut specs = cfg.tensors();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut w = NpzWriter::create(&weights_path).map_err(io)?;
    // The two mask names sort around `couplings/...`: channel_ < couplings/ < spatial_.
    w.add_f32(CHANNEL_MASKS, &[cfg.depth, d, d], &ch).map_err(io)?;
    let mut num_params = (ch.len() + sp.len()) as u64;
    for s in &specs {
        w.add_f32(&s.name, &s.shape, &s.values(seed)).map_err(io)?;
        num_params += s.numel() as u64;
    }
    w.add_f32(SPATIAL_MASKS, &[cfg.depth, n, n], &sp).map_err(io)?;
    w.finish().map_err(io)?;
    let bytes = std::fs::metadata(&weights_path).map_err(io)?.len();
    Ok(SynthReport {
        name: "custom".into(),
        dir: out.into(),
        config_path,
        weights_path,
        num_tensors: specs.len() + 2,
        num_params,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
