//! Keyword constraints as lexical guidance, in the spirit of NeuroLogic A*esque decoding (Lu et
//! al., NAACL 2022): a keyword the base would never say on its own is a sparse reward that no
//! sampled candidate or greedy lookahead reaches. So each step, for every keyword the answer
//! lacks, the tokens that start it (spelled for where the answer stands: after a space or not,
//! capitalised at a sentence's start) or continue it (the answer ends with the first tokens of
//! one of its spellings) are *pulled*:
//! - search decoders (`args`, `deal`) add them to their candidates, and `deal`'s rollouts finish
//!   a keyword in progress, so the lookahead sees it;
//! - the search decoders shape their scores by the answer's *standing*: ½ `keyword_boost` per
//!   token of a keyword written (present, or in progress), less `keyword_boost` × the share of
//!   the token budget spent per missing keyword (all of it once the answer ends). Abandoning a
//!   keyword in progress gives back what its tokens gained, and a keyword left out costs more
//!   the less room is left; the shaping telescopes, however the answer got there;
//! - the sampling decoders add `keyword_boost` to the logits of a token that starts a keyword
//!   (and per token written, plus one, to one that continues it) and take it per missing
//!   keyword from the tokens that end the answer.
//!
//! A search's heuristic credits a keyword present with 1, one in progress with the share of its
//! spelling written, and, once the answer has ended, a missing one with −1: an answer that ends
//! without its keywords scores below one that continues.

use std::collections::HashSet;

use crate::model::Vocab;
use crate::reward::scorers::Keywords;

/// `constraints.keyword_boost` when the request does not say.
pub const DEFAULT_BOOST: f32 = 10.0;

/// The share of `keyword_boost` a keyword token gains when written.
const WRITTEN: f32 = 0.5;

/// One way of writing a keyword in tokens.
struct Spelling {
    tokens: Vec<u32>,
    /// Written after a space (" dog") rather than at a word's start ("dog").
    spaced: bool,
    capital: bool,
}

/// The keywords of a request in the base's tokens, and how hard they pull.
pub struct Lexicon {
    scorer: Keywords,
    spellings: Vec<Vec<Spelling>>,
    /// Per keyword, the tokens of its shortest spelling: what a present one counts.
    lengths: Vec<usize>,
    boost: f32,
}

/// Where an answer stands with its keywords.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub present: Vec<bool>,
    /// Per keyword, the share of a spelling the answer ends with (0 for one present).
    pub progress: Vec<f32>,
    /// Per keyword, the tokens of it in progress at the answer's end (0 for one present).
    pub written: Vec<usize>,
    /// Tokens that continue a missing keyword in progress, with how many of its tokens are
    /// written; the furthest along first.
    pub continues: Vec<(u32, usize)>,
    /// Tokens that start a missing keyword.
    pub starts: Vec<u32>,
}

impl State {
    pub fn missing(&self) -> usize {
        self.present.iter().filter(|&&p| !p).count()
    }

    /// The token that continues the keyword furthest along, if one is in progress.
    pub fn continuation(&self) -> Option<u32> {
        self.continues.first().map(|&(t, _)| t)
    }

    /// Every pulled token, continuations first, each once.
    pub fn pulled(&self) -> Vec<u32> {
        let mut seen = HashSet::new();
        (self
            .continues
            .iter()
            .map(|&(t, _)| t)
            .chain(self.starts.iter().copied()))
        .filter(|t| seen.insert(*t))
        .collect()
    }
}

impl Lexicon {
    /// `keywords` spelled in `vocab`'s tokens: lowercase and capitalised, with a leading space
    /// and without; a spelling whose tokens do not write the keyword back is left out.
    pub fn new(vocab: &Vocab, keywords: &[String], boost: f32) -> Self {
        let scorer = Keywords::new(keywords);
        let spellings: Vec<Vec<Spelling>> = scorer
            .keywords()
            .iter()
            .map(|k| {
                let mut out: Vec<Spelling> = Vec::new();
                let capital: String = k
                    .chars()
                    .take(1)
                    .flat_map(char::to_uppercase)
                    .chain(k.chars().skip(1))
                    .collect();
                for (word, capital) in [(k.clone(), false), (capital, true)] {
                    for spaced in [true, false] {
                        let text = if spaced {
                            format!(" {word}")
                        } else {
                            word.clone()
                        };
                        let Ok(tokens) = vocab.encode(&text, false) else {
                            continue;
                        };
                        let writes_back = !tokens.is_empty() && vocab.decode(&tokens) == text;
                        if writes_back && !out.iter().any(|s| s.tokens == tokens) {
                            out.push(Spelling {
                                tokens,
                                spaced,
                                capital,
                            });
                        }
                    }
                }
                out
            })
            .collect();
        let lengths = spellings
            .iter()
            .map(|s: &Vec<Spelling>| s.iter().map(|s| s.tokens.len()).min().unwrap_or(1))
            .collect();
        Self {
            scorer,
            spellings,
            lengths,
            boost,
        }
    }

    /// Where the answer of `tokens`, which reads `text`, stands.
    pub fn state(&self, vocab: &Vocab, tokens: &[u32], text: &str) -> State {
        let present = self.scorer.present(text);
        let mut progress = vec![0.0f32; present.len()];
        let mut written = vec![0usize; present.len()];
        let mut continues: Vec<(f32, u32, usize)> = Vec::new();
        let mut starts = Vec::new();
        let trimmed = text.trim_end();
        let after_space = trimmed.is_empty() || trimmed.len() < text.len();
        let sentence_start = trimmed.is_empty() || trimmed.ends_with(['.', '!', '?', '\n']);
        // Whether the text before the last `n` tokens ends a word.
        let boundary_before = |n: usize| {
            let before = &tokens[..tokens.len() - n];
            before.is_empty()
                || before
                    .iter()
                    .rev()
                    .find_map(|&t| vocab.bytes(t).last())
                    .is_none_or(|b| b.is_ascii_whitespace() || b.is_ascii_punctuation())
        };
        for (k, spellings) in self.spellings.iter().enumerate() {
            if present[k] {
                continue;
            }
            for s in spellings {
                for j in (1..s.tokens.len()).rev() {
                    if tokens.ends_with(&s.tokens[..j]) && (s.spaced || boundary_before(j)) {
                        let share = j as f32 / s.tokens.len() as f32;
                        progress[k] = progress[k].max(share);
                        written[k] = written[k].max(j);
                        continues.push((share, s.tokens[j], j));
                        break;
                    }
                }
            }
            // The spellings that fit here; any, where the vocabulary has none of those.
            let fits = |s: &&Spelling| s.spaced != after_space && s.capital == sentence_start;
            let fitting: Vec<&Spelling> = spellings.iter().filter(fits).collect();
            let chosen = if fitting.is_empty() {
                spellings.iter().collect()
            } else {
                fitting
            };
            starts.extend(chosen.iter().map(|s| s.tokens[0]));
        }
        continues.sort_by(|a, b| b.0.total_cmp(&a.0));
        State {
            present,
            progress,
            written,
            continues: continues.into_iter().map(|(_, t, j)| (t, j)).collect(),
            starts,
        }
    }

    /// A search's heuristic for the keywords, in [−1, 1]: present 1, in progress its share, and
    /// missing 0 while the answer goes on, −1 once it has `ended`; over the keyword count.
    pub fn credit(&self, state: &State, ended: bool) -> f32 {
        if state.present.is_empty() {
            return 1.0;
        }
        let sum: f32 = (state.present.iter().zip(&state.progress))
            .map(|(&present, &p)| match (present, ended) {
                (true, _) => 1.0,
                (false, true) => -1.0,
                (false, false) => p,
            })
            .sum();
        sum / state.present.len() as f32
    }

    /// What an answer standing at `state` has gained: `boost` per token of its keywords, those
    /// present and those in progress, less `boost`·`elapsed` per missing keyword, where
    /// `elapsed` is the share of the token budget spent (1 once the answer has ended): a
    /// keyword left out costs more the less room is left for it.
    pub fn standing(&self, state: &State, elapsed: f32) -> f32 {
        let tokens: usize = (state.present.iter().zip(&state.written).zip(&self.lengths))
            .map(|((&present, &w), &len)| if present { len } else { w })
            .sum();
        self.boost * (WRITTEN * tokens as f32 - elapsed.clamp(0.0, 1.0) * state.missing() as f32)
    }

    /// `logits` shaped by the standing each token would reach, as a sampler sees it (less the
    /// shared part, which sampling ignores): `boost` on a token that starts a keyword, `boost`
    /// per token written plus one on a token that continues one in progress, and −`boost` per
    /// missing keyword on the tokens that end the answer (`ending`).
    pub fn nudge(&self, state: &State, logits: &mut [f32], ending: &HashSet<u32>) {
        if self.boost == 0.0 {
            return;
        }
        let mut gains: Vec<(u32, f32)> = state.starts.iter().map(|&t| (t, self.boost)).collect();
        gains.extend((state.continues.iter()).map(|&(t, j)| (t, self.boost * (j as f32 + 1.0))));
        gains.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        gains.dedup_by_key(|g| g.0);
        for (t, gain) in gains {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += gain;
            }
        }
        let missing = state.missing() as f32;
        for &t in ending {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= self.boost * missing;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake::{self, id};

    fn kw(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn missing_keywords_pull_their_first_token_and_present_ones_none() {
        let vocab = fake::vocab();
        let lex = Lexicon::new(&vocab, &kw(&["sea", "park"]), 2.0);
        let tokens = [id("the"), id("sea")];
        let state = lex.state(&vocab, &tokens, &vocab.decode(&tokens));
        assert_eq!(state.present, [true, false]);
        assert_eq!(state.starts, [id("park")]);
        assert!(state.continues.is_empty());
        assert_eq!(lex.credit(&state, false), 0.5);
        assert_eq!(lex.credit(&state, true), 0.0);
        // Half the boost for the one token of `sea`, less a whole one for `park` once ended.
        assert_eq!(lex.standing(&state, 0.0), 1.0);
        assert_eq!(lex.standing(&state, 1.0), -1.0);
        let mut logits = vec![0.0; fake::WORDS.len()];
        lex.nudge(&state, &mut logits, &HashSet::from([fake::EOS]));
        assert_eq!(logits[id("park") as usize], 2.0);
        assert_eq!(logits[fake::EOS as usize], -2.0);
        assert_eq!(logits[id("cat") as usize], 0.0);
    }

    #[test]
    fn a_phrase_in_progress_pulls_its_next_token() {
        let vocab = fake::vocab();
        let lex = Lexicon::new(&vocab, &kw(&["big red dog"]), 1.0);
        let tokens = [id("the"), id("big"), id("red")];
        let state = lex.state(&vocab, &tokens, &vocab.decode(&tokens));
        assert_eq!(state.continues, [(id("dog"), 2)]);
        assert_eq!(state.pulled(), [id("dog"), id("big")]);
        assert!((state.progress[0] - 2.0 / 3.0).abs() < 1e-6);
        // Two tokens written: abandoning them gives back their half boosts.
        assert_eq!(lex.standing(&state, 0.0), 1.0);
        let mut logits = vec![0.0; fake::WORDS.len()];
        lex.nudge(&state, &mut logits, &HashSet::new());
        assert_eq!(logits[id("dog") as usize], 3.0);
        let done = [id("big"), id("red"), id("dog")];
        let state = lex.state(&vocab, &done, &vocab.decode(&done));
        assert_eq!(state.present, [true]);
        assert_eq!(lex.standing(&state, 1.0), 1.5);
        assert!(state.pulled().is_empty());
        let mut logits = vec![0.0; fake::WORDS.len()];
        lex.nudge(&state, &mut logits, &HashSet::from([fake::EOS]));
        assert!(logits.iter().all(|&l| l == 0.0));
    }
}
