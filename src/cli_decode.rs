//! `kiln generate`'s decoding strategy options for the Hugging Face decoders: several samples
//! per input, or beam search with transformers' options.

use kiln::beam::{BeamOptions, EarlyStopping};
use kiln::{Error, Result};

/// Beam search options of `kiln generate --inputs` (Gemma, Gemma 2, PaliGemma).
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct BeamArgs {
    /// Beam search with this many beams per input, as transformers' generate(num_beams=K);
    /// writes `sequences` and `sequences_scores`. 1: no beam search.
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Hypotheses returned per input with --num-beams (best first; at most --num-beams).
    #[arg(long, default_value_t = 1)]
    num_return_sequences: usize,
    /// Beam scores are divided by (new tokens)^length_penalty (transformers' default 1.0).
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f64,
    /// true: stop an input once --num-beams hypotheses finished; false (default): once the
    /// best running beam cannot beat them (transformers' heuristic); never.
    #[arg(long, default_value = "false")]
    early_stopping: String,
    /// No EOS before this many new tokens (transformers' min_new_tokens).
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
}

/// How `kiln generate --inputs` decodes a Hugging Face model.
pub(crate) enum Strategy {
    /// Greedy or sampled, this many rows per input.
    Rows(usize),
    Beams(BeamOptions),
}

impl BeamArgs {
    /// The strategy these options and `--num-samples` ask for, refusing mixtures.
    pub(crate) fn strategy(&self, num_samples: usize, sampling: &kiln::sampling::HfSampling) -> Result<Strategy> {
        if num_samples == 0 {
            return Err(Error::Usage("--num-samples must be at least 1".into()));
        }
        if self.num_beams == 0 {
            return Err(Error::Usage("--num-beams must be at least 1".into()));
        }
        if self.num_beams == 1 {
            if self.num_return_sequences != 1 {
                return Err(Error::Usage("--num-return-sequences needs --num-beams".into()));
            }
            return Ok(Strategy::Rows(num_samples));
        }
        if num_samples != 1 || sampling.temperature > 0.0 {
            return Err(Error::Usage("--num-beams is deterministic beam search: no --num-samples or --temperature with it".into()));
        }
        let o = BeamOptions {
            num_beams: self.num_beams,
            num_return_sequences: self.num_return_sequences,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping.parse::<EarlyStopping>()?,
            min_new_tokens: self.min_new_tokens,
        };
        Ok(Strategy::Beams(o))
    }
}
