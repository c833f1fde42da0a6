//! A sentiment judge that is neither the lexicon the `positive` ARM was trained on nor a reward
//! model: the base model reads each text twice, after a glad framing and after a gloomy one, and
//! the score is how much likelier per token the glad framing makes it (the "channel" reading of
//! a language model as a classifier). Asked outright ("positive or negative?"), a 135M model
//! answers near chance; read this way it orders plainly glad and sad texts correctly.

use anyhow::Result;

use crate::model::Model;

const GLAD: &str = "The following text is cheerful and positive.\n\n";
const GLOOMY: &str = "The following text is gloomy and negative.\n\n";

pub struct SentimentJudge<'a> {
    model: &'a Model,
    glad: Vec<u32>,
    gloomy: Vec<u32>,
}

impl<'a> SentimentJudge<'a> {
    pub fn new(model: &'a Model) -> Result<Self> {
        Ok(Self {
            model,
            glad: model.vocab.encode(GLAD, false)?,
            gloomy: model.vocab.encode(GLOOMY, false)?,
        })
    }

    /// Each text's mean log-likelihood per token after the glad framing minus after the gloomy
    /// one, in nats: above 0 reads as positive. An empty text scores 0.
    pub fn score(&self, texts: &[&str]) -> Result<Vec<f64>> {
        let bodies: Vec<Vec<u32>> = (texts.iter())
            .map(|t| self.model.vocab.encode(t.trim(), false))
            .collect::<Result<_>>()?;
        let after = |frame: &[u32]| -> Result<Vec<(f64, usize)>> {
            let items: Vec<(&[u32], &[u32])> =
                bodies.iter().map(|b| (frame, b.as_slice())).collect();
            super::response_nll(self.model, &items)
        };
        let (glad, gloomy) = (after(&self.glad)?, after(&self.gloomy)?);
        Ok((glad.iter().zip(&gloomy))
            .map(|(g, s)| (s.0 - g.0) / g.1.max(1) as f64)
            .collect())
    }
}
