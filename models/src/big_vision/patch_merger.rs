//! PatchMerger: "Learning to Merge Tokens in Vision Transformers" (arXiv 2202.12015). Between
//! two encoder blocks, `M` learned queries score the (layer-normed) tokens; a softmax over
//! the `N` input tokens turns each score column into weights, and every output token is that
//! convex combination of the inputs: `Y = softmax_N(W^T LN(X)^T) LN(X)`, `[M, D]`. No
//! official code exists (MODELS.md §6); kiln reads it as an extension of the ViT kwargs,
//! `"patch_merger": {"num_tokens": M, "blocks_before": L}`, with parameters
//! `Transformer/PatchMerger/{LayerNorm/scale, LayerNorm/bias, kernel [D, M]}`.

use crate::config::ConfigReader;
use crate::error::Result;
use crate::layers::Builder;
use kiln_graph::NodeId;

/// Where the merger sits and how many tokens it keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchMergerConfig {
    /// Output tokens M.
    pub num_tokens: usize,
    /// Encoder blocks run before the merge (the rest run on M tokens).
    pub blocks_before: usize,
}

impl PatchMergerConfig {
    /// Reads the `patch_merger` object strictly.
    pub fn read(mut r: ConfigReader) -> Result<Self> {
        let c = PatchMergerConfig { num_tokens: r.usize_or("num_tokens", None)?, blocks_before: r.usize_or("blocks_before", None)? };
        if c.num_tokens == 0 {
            return Err(r.unsupported("num_tokens", "must be at least 1"));
        }
        r.finish()?;
        Ok(c)
    }
}

/// Merges `[B*n, D]` rows into `[B*M, D]` rows.
pub fn merge(m: &mut Builder, cfg: &PatchMergerConfig, p: &str, x: NodeId, b: usize, n: usize, d: usize) -> Result<NodeId> {
    let mt = cfg.num_tokens;
    let xn = m.flax_layer_norm(x, &format!("{p}/LayerNorm"), d)?;
    let w = m.weight(&format!("{p}/kernel"), &[d, mt])?;
    let scores = m.g.matmul(xn, w, false)?; // [B*n, M]
    let scores = m.g.reshape(scores, &[b, n, mt])?;
    let scores = m.g.permute(scores, &[0, 2, 1])?; // [B, M, n]
    let weights = m.g.softmax(scores, 2)?;
    let xn = m.g.reshape(xn, &[b, n, d])?;
    let y = m.g.matmul(weights, xn, false)?; // [B, M, D]
    Ok(m.g.reshape(y, &[b * mt, d])?)
}
