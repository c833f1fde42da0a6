//! Judges that are neither the programmatic scorers the ARMs were trained on nor reward models:
//! the base model reads each text twice, after a framing that names the quality and after one
//! that names its opposite, and the score is how much likelier per token the first framing makes
//! it (the "channel" reading of a language model as a classifier). Asked outright ("positive or
//! negative?"), a 135M model answers near chance; read this way it orders plainly glad and sad
//! texts, and plain and dense ones, correctly (tests/eval.rs).

use anyhow::Result;

use crate::model::Model;

pub struct Judge<'a> {
    model: &'a Model,
    /// The framing that names the quality, and the one that names its opposite.
    quality: Vec<u32>,
    opposite: Vec<u32>,
}

impl<'a> Judge<'a> {
    /// Sentiment (`positive`, the lexicon `sentiment`): above 0 reads as glad.
    pub fn sentiment(model: &'a Model) -> Result<Self> {
        Self::new(
            model,
            "The following text is cheerful and positive.",
            "The following text is gloomy and negative.",
        )
    }

    /// Plainness (`simple`, the scorer `readability`): above 0 reads as plain.
    pub fn plainness(model: &'a Model) -> Result<Self> {
        Self::new(
            model,
            "The following text is written in short, simple words that a child can read.",
            "The following text is written in long, formal, academic language.",
        )
    }

    fn new(model: &'a Model, quality: &str, opposite: &str) -> Result<Self> {
        let frame = |text: &str| model.vocab.encode(&format!("{text}\n\n"), false);
        Ok(Self {
            model,
            quality: frame(quality)?,
            opposite: frame(opposite)?,
        })
    }

    /// Each text's mean log-likelihood per token after the quality's framing minus after its
    /// opposite's, in nats. An empty text scores 0.
    pub fn score(&self, texts: &[&str]) -> Result<Vec<f64>> {
        let bodies: Vec<Vec<u32>> = (texts.iter())
            .map(|t| self.model.vocab.encode(t.trim(), false))
            .collect::<Result<_>>()?;
        let after = |frame: &[u32]| -> Result<Vec<(f64, usize)>> {
            let items: Vec<(&[u32], &[u32])> =
                bodies.iter().map(|b| (frame, b.as_slice())).collect();
            super::response_nll(self.model, &items)
        };
        let (quality, opposite) = (after(&self.quality)?, after(&self.opposite)?);
        Ok((quality.iter().zip(&opposite))
            .map(|(q, o)| (o.0 - q.0) / q.1.max(1) as f64)
            .collect())
    }
}
