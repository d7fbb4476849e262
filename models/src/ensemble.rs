//! Ensembles of pretrained classifiers as one graph: "Deep Ensembles for Low-Data Transfer
//! Learning" (Mustafa et al., arXiv 2010.06866; the seed paper "Transfer learning with
//! pre-trained ensembles") averages its members' softmax probabilities. Every member runs on the
//! same `images [B, H, W, 3]` batch, resized inside the graph to the member's own resolution
//! where it differs; the graph outputs `probs`, the weighted mean of the members' softmax
//! probabilities, and each member's `logits_<i>`. The members' weights are named under the
//! prefix `m<i>/`, so one program reads every member's checkpoint as one weight set.

use crate::error::{ModelError, Result};
use crate::Profile;
use kiln_graph::compose::inline;
use kiln_graph::{Graph, NodeId};
use std::path::PathBuf;

/// One member: its folder, its resolution when not the checkpoint's, and its weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub dir: PathBuf,
    pub image_hw: Option<(usize, usize)>,
    /// Its share of `probs` (the weights are normalised to sum 1).
    pub weight: f64,
    /// The index in the member list as given (names `logits_<index>` and the prefix).
    pub index: usize,
}

/// An ensemble's graph and what the program needs to find its weights.
pub struct Ensemble {
    /// The `forward` graph.
    pub graph: Graph,
    pub description: String,
    /// Per member: the weight-name prefix and the member's folder.
    pub weight_sets: Vec<(String, PathBuf)>,
    /// Per member: its resolution and its normalised weight.
    pub members: Vec<((usize, usize), f64)>,
    /// The input resolution.
    pub image_hw: (usize, usize),
}

/// How a member's input is resampled from the ensemble's, for `--help` and messages.
pub const MEMBER_RESIZE: &str = "PyTorch interpolate(mode=\"bilinear\", align_corners=False, antialias=False), as two matrix products";

/// Builds the ensemble of `members` for `profile` (its batch and dtype; its `image_hw` is the
/// input resolution, by default the largest member's). A member that is not a classifier (no
/// `logits [B, C]` output), that takes other inputs than big_vision's `images`, or whose class
/// count differs from the first member's is refused by name.
pub fn build(members: &[Member], profile: &Profile) -> Result<Ensemble> {
    if members.is_empty() {
        return Err(ModelError::Unsupported("an ensemble needs at least one member".into()));
    }
    let total: f64 = members.iter().map(|m| m.weight).sum();
    if members.iter().any(|m| !(m.weight.is_finite() && m.weight >= 0.0)) || total <= 0.0 {
        let w: Vec<f64> = members.iter().map(|m| m.weight).collect();
        return Err(ModelError::Unsupported(format!("ensemble weights {w:?}: expected finite values >= 0, not all zero")));
    }
    let mut built = Vec::with_capacity(members.len());
    for m in members {
        let p = Profile { image_hw: m.image_hw, ..profile.clone() };
        let b = crate::build(&m.dir, &p)?;
        let graph = b.graph("forward").cloned().ok_or_else(|| not_member(m, "it has no forward entry"))?;
        let (hw, classes) = classifier(m, &graph)?;
        built.push((graph, hw, classes, b.description));
    }
    let classes = built[0].2;
    if let Some((m, b)) = members.iter().zip(&built).find(|(_, b)| b.2 != classes) {
        return Err(not_member(m, &format!("it has {} classes, member 0 has {classes}", b.2)));
    }
    let image_hw = profile
        .image_hw
        .unwrap_or_else(|| built.iter().map(|b| b.1).fold((0, 0), |best, hw| if hw.0 * hw.1 > best.0 * best.1 { hw } else { best }));
    let (batch, dtype) = (profile.batch, profile.dtype);
    let mut g = Graph::new();
    let images = g.input("images", dtype, &[batch, image_hw.0, image_hw.1, 3])?;
    let mut probs: Option<NodeId> = None;
    let mut parts = Vec::new();
    for (m, (graph, hw, _, description)) in members.iter().zip(&built) {
        let x = if *hw == image_hw { images } else { resize(&mut g, images, *hw)? };
        let prefix = format!("m{}/", m.index);
        let outs = inline(&mut g, graph, &|name| (name == "images").then_some(x), &prefix)?;
        let logits = outs.iter().find(|(n, _)| n == "logits").map(|(_, id)| *id).ok_or_else(|| not_member(m, "no logits"))?;
        g.output(format!("logits_{}", m.index), logits);
        let p = g.softmax(logits, 1)?;
        let p = g.mul_scalar(p, m.weight / total)?;
        probs = Some(match probs {
            Some(acc) => g.add(acc, p)?,
            None => p,
        });
        parts.push(format!("[{}] {description}", m.index));
    }
    let probs = probs.ok_or_else(|| ModelError::Unsupported("an ensemble needs at least one member".into()))?;
    g.outputs.insert(0, ("probs".to_string(), probs));
    let description = format!("ensemble of {} at {}x{}, batch {batch}: {}", members.len(), image_hw.0, image_hw.1, parts.join("; "));
    Ok(Ensemble {
        graph: g,
        description,
        weight_sets: members.iter().map(|m| (format!("m{}/", m.index), m.dir.clone())).collect(),
        members: members.iter().zip(&built).map(|(m, b)| (b.1, m.weight / total)).collect(),
        image_hw,
    })
}

/// `images [B, H, W, 3]` resampled to `hw` ([`MEMBER_RESIZE`]). Bilinear resampling is
/// separable and linear: rows `Ry [h, H] x images [B, H, W*3]`, then columns `Rx [w, W] x
/// [B*h, W, 3]`, both matrix products broadcast over the leading axis, so the full-size image is
/// read in place (no channels-first copy of it stays live while the other members run).
fn resize(g: &mut Graph, images: NodeId, hw: (usize, usize)) -> Result<NodeId> {
    let s = g.shape(images).to_vec();
    let (b, h0, w0, c) = (s[0], s[1], s[2], s[3]);
    let dtype = g.ty(images).dtype;
    let ry = g.constant(dtype, &[hw.0, h0], bilinear_matrix(h0, hw.0))?;
    let x = g.reshape(images, &[b, h0, w0 * c])?;
    let x = g.matmul(ry, x, false)?;
    let rx = g.constant(dtype, &[hw.1, w0], bilinear_matrix(w0, hw.1))?;
    let x = g.reshape(x, &[b * hw.0, w0, c])?;
    let x = g.matmul(rx, x, false)?;
    Ok(g.reshape(x, &[b, hw.0, hw.1, c])?)
}

/// The `[out, in]` matrix of PyTorch's bilinear `interpolate` along one axis
/// (`align_corners=False`, no antialiasing): output `o` reads `src = max((o + 0.5) in/out - 0.5,
/// 0)` from its floor and the next index (clamped), weighted `1 - t` and `t`.
pub fn bilinear_matrix(input: usize, output: usize) -> Vec<f64> {
    let mut m = vec![0.0; output * input];
    let scale = input as f64 / output as f64;
    for o in 0..output {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let t = src - src.floor();
        m[o * input + i0] += 1.0 - t;
        m[o * input + (i0 + 1).min(input - 1)] += t;
    }
    m
}

/// A member's input resolution and class count, or why it cannot be a member.
fn classifier(m: &Member, g: &Graph) -> Result<((usize, usize), usize)> {
    let outputs: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    let Some((_, logits)) = g.outputs.iter().find(|(n, _)| n == "logits") else {
        return Err(not_member(m, &format!("it is not a classifier: no logits output (its outputs: {})", outputs.join(", "))));
    };
    let ls = g.shape(*logits).to_vec();
    let inputs: Vec<(&str, Vec<usize>)> = g.inputs().map(|(_, n, t)| (n, t.shape.to_vec())).collect();
    let [(name, s)] = &inputs[..] else {
        let names: Vec<&str> = inputs.iter().map(|i| i.0).collect();
        return Err(not_member(m, &format!("it takes inputs {}; a member takes images alone", names.join(", "))));
    };
    if *name != "images" || s.len() != 4 || s[3] != 3 {
        return Err(not_member(m, &format!("it takes {name} {s:?}; a member takes big_vision's images [B, H, W, 3]")));
    }
    if ls.len() != 2 {
        return Err(not_member(m, &format!("its logits are {ls:?}, expected [batch, classes]")));
    }
    Ok(((s[1], s[2]), ls[1]))
}

fn not_member(m: &Member, why: &str) -> ModelError {
    ModelError::Unsupported(format!("ensemble member {} ({}) cannot be a member: {why}", m.index, m.dir.display()))
}

#[cfg(test)]
mod tests {
    use super::bilinear_matrix;
    use kiln_graph::interp::{eval_op, Value};
    use kiln_graph::{DType, Op, ResizeMode, TensorType};

    /// The matrices equal the interpreter's `Op::Resize` (PyTorch's bilinear) on every basis
    /// vector (to f32, the rounding `eval_op` applies), shrinking and growing (where the source
    /// index clamps at 0 and at the end).
    #[test]
    fn bilinear_matrix_is_the_resize_op() {
        for (input, output) in [(32, 24), (224, 64), (7, 3), (5, 11), (4, 4), (1, 3)] {
            // Plane p holds the basis vector e_p along the resized axis.
            let basis: Vec<f64> = (0..input * input).map(|k| f64::from(u8::from(k / input == k % input))).collect();
            let x = Value::new(TensorType::new(DType::F32, [input, input, 1]), basis).unwrap();
            let out = TensorType::new(DType::F32, [input, output, 1]);
            let y = eval_op(&Op::Resize { size: [output, 1], mode: ResizeMode::Bilinear }, &[&x], &out).unwrap();
            let m = bilinear_matrix(input, output);
            for p in 0..input {
                for o in 0..output {
                    let (got, want) = (m[o * input + p], y.data[p * output + o]);
                    assert!((got - want).abs() < 1e-7, "{input}->{output}: R[{o}][{p}] = {got}, Resize gives {want}");
                }
            }
        }
    }
}
