//! Programmatic, sequence-level scorers: a number for a finished text, higher is better. Used by
//! the search decoders (best-of-N, DeAL) and to rank preference pairs.

use std::sync::Arc;

use regex::Regex;

pub trait Scorer: Send + Sync {
    fn score(&self, text: &str) -> f32;

    /// The least and the most any text can score, where known: a search may then skip rolling
    /// out a candidate that cannot win (DeAL's pruning).
    fn bounds(&self) -> Option<(f32, f32)> {
        None
    }
}

/// A scorer every server has, by name.
pub struct Builtin {
    pub name: &'static str,
    pub description: &'static str,
    pub scorer: Arc<dyn Scorer>,
}

pub fn builtin() -> Vec<Builtin> {
    vec![
        Builtin {
            name: "sentiment",
            description: "lexicon sentiment of the answer: (positive − negative words) / √words",
            scorer: Arc::new(Sentiment),
        },
        Builtin {
            name: "readability",
            description: "Flesch reading ease of the answer: shorter sentences and words of fewer \
                          syllables score higher (about 60–80 for plain English)",
            scorer: Arc::new(Readability),
        },
    ]
}

/// How many words `text` has, as the scorers count them.
pub fn word_count(text: &str) -> usize {
    words(text).count()
}

/// The share of the text's whitespace-separated pieces that hold a letter (1 for a text without
/// any): runs of digits and symbols lower it, prose keeps it near 1.
pub fn letter_share(text: &str) -> f32 {
    let (mut pieces, mut lettered) = (0usize, 0usize);
    for piece in text.split_whitespace() {
        pieces += 1;
        lettered += usize::from(piece.chars().any(char::is_alphabetic));
    }
    if pieces == 0 {
        return 1.0;
    }
    lettered as f32 / pieces as f32
}

/// Lowercase words (letters, digits and inner apostrophes).
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
}

/// The fraction of keywords the text contains as whole words or phrases (case-insensitive).
pub struct Keywords {
    keywords: Vec<String>,
}

impl Keywords {
    pub fn new(keywords: &[impl AsRef<str>]) -> Self {
        Self {
            keywords: keywords
                .iter()
                .map(|k| words(k.as_ref()).collect::<Vec<_>>().join(" "))
                .filter(|k| !k.is_empty())
                .collect(),
        }
    }
}

impl Keywords {
    /// The keywords, lowercase, their words separated by single spaces.
    pub fn keywords(&self) -> &[String] {
        &self.keywords
    }

    /// Whether the text contains each keyword, in order.
    pub fn present(&self, text: &str) -> Vec<bool> {
        // Padded with spaces so that `contains` matches whole words only.
        let text = format!(" {} ", words(text).collect::<Vec<_>>().join(" "));
        self.keywords
            .iter()
            .map(|k| text.contains(&format!(" {k} ")))
            .collect()
    }
}

impl Scorer for Keywords {
    fn score(&self, text: &str) -> f32 {
        if self.keywords.is_empty() {
            return 1.0;
        }
        let hits = self.present(text).into_iter().filter(|&p| p).count();
        hits as f32 / self.keywords.len() as f32
    }

    fn bounds(&self) -> Option<(f32, f32)> {
        Some((0.0, 1.0))
    }
}

/// How far the word count is from a target, relative to it: 0 on target, −1 at twice (or none).
pub struct Length {
    words: usize,
    /// Only longer texts lose (a word budget, like `max_words`).
    at_most: bool,
}

impl Length {
    pub fn target(words: usize) -> Self {
        Self {
            words: words.max(1),
            at_most: false,
        }
    }

    pub fn at_most(words: usize) -> Self {
        Self {
            words: words.max(1),
            at_most: true,
        }
    }
}

impl Scorer for Length {
    fn score(&self, text: &str) -> f32 {
        let n = words(text).count() as f32;
        let target = self.words as f32;
        let off = if self.at_most {
            (n - target).max(0.0)
        } else {
            (n - target).abs()
        };
        // 0 − x rather than −x, so that a text on budget scores 0, not −0.
        0.0 - off / target
    }

    fn bounds(&self) -> Option<(f32, f32)> {
        Some((f32::NEG_INFINITY, 0.0))
    }
}

/// 1 when the pattern matches somewhere in the text, else 0.
pub struct RegexMatch {
    re: Regex,
}

impl RegexMatch {
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        Ok(Self {
            re: Regex::new(pattern)?,
        })
    }
}

impl Scorer for RegexMatch {
    fn score(&self, text: &str) -> f32 {
        if self.re.is_match(text) {
            1.0
        } else {
            0.0
        }
    }

    fn bounds(&self) -> Option<(f32, f32)> {
        Some((0.0, 1.0))
    }
}

const POSITIVE: &[&str] = &[
    "good",
    "great",
    "excellent",
    "wonderful",
    "amazing",
    "love",
    "lovely",
    "happy",
    "joy",
    "joyful",
    "beautiful",
    "best",
    "brilliant",
    "delightful",
    "enjoy",
    "fantastic",
    "glad",
    "kind",
    "nice",
    "perfect",
    "pleasant",
    "positive",
    "success",
    "successful",
    "superb",
    "thank",
    "thanks",
    "warm",
    "win",
    "bright",
    "hope",
    "hopeful",
    "exciting",
    "excited",
    "awesome",
    "fun",
    "calm",
    "peaceful",
    "cheerful",
    "grateful",
    "helpful",
    "inspiring",
];

const NEGATIVE: &[&str] = &[
    "bad",
    "terrible",
    "awful",
    "horrible",
    "hate",
    "sad",
    "angry",
    "ugly",
    "worst",
    "poor",
    "fail",
    "failure",
    "failed",
    "wrong",
    "pain",
    "painful",
    "boring",
    "disappointing",
    "disappointed",
    "fear",
    "afraid",
    "unhappy",
    "miserable",
    "negative",
    "annoying",
    "dark",
    "lose",
    "lost",
    "broken",
    "cruel",
    "dull",
    "gloomy",
    "hurt",
    "nasty",
    "problem",
    "sorry",
    "tragic",
    "upset",
    "worse",
    "worried",
    "lonely",
    "dreadful",
];

/// Words that flip the sentiment of the word right after them ("not good").
const NEGATIONS: &[&str] = &["not", "no", "never", "isn't", "wasn't", "don't", "doesn't"];

/// Lexicon sentiment: (positive − negative words) / √words, so longer answers do not win by
/// volume alone.
pub struct Sentiment;

impl Scorer for Sentiment {
    fn score(&self, text: &str) -> f32 {
        let (mut total, mut n, mut negated) = (0i32, 0usize, false);
        for w in words(text) {
            n += 1;
            let polarity = if POSITIVE.contains(&w.as_str()) {
                1
            } else if NEGATIVE.contains(&w.as_str()) {
                -1
            } else {
                0
            };
            total += if negated { -polarity } else { polarity };
            negated = NEGATIONS.contains(&w.as_str());
        }
        if n == 0 {
            return 0.0;
        }
        total as f32 / (n as f32).sqrt()
    }
}

/// Flesch reading ease, 206.835 − 1.015 · words per sentence − 84.6 · syllables per word: plain
/// English scores 60–80, dense prose below 30. Syllables are a word's vowel groups (a final
/// silent "e" dropped, at least one); a digit is a syllable of its own, so runs of numbers read
/// as hard, not as short words. Sentences end at `.`, `!`, `?`, `;`, `:` or a line break; a text
/// without words scores 0.
pub struct Readability;

impl Readability {
    fn syllables(word: &str) -> usize {
        let (mut groups, mut digits, mut in_vowel) = (0, 0, false);
        for c in word.chars() {
            digits += usize::from(c.is_ascii_digit());
            let vowel = matches!(c, 'a' | 'e' | 'i' | 'o' | 'u' | 'y');
            groups += usize::from(vowel && !in_vowel);
            in_vowel = vowel;
        }
        let silent_e = word.len() > 2 && word.ends_with('e') && !word.ends_with("le");
        (groups - usize::from(silent_e && groups > 1) + digits).max(1)
    }
}

impl Scorer for Readability {
    fn score(&self, text: &str) -> f32 {
        let (mut words_n, mut syllables, mut sentences) = (0usize, 0usize, 0usize);
        for sentence in text.split(['.', '!', '?', ';', ':', '\n']) {
            let before = words_n;
            for w in words(sentence) {
                words_n += 1;
                syllables += Self::syllables(&w);
            }
            sentences += usize::from(words_n > before);
        }
        if words_n == 0 {
            return 0.0;
        }
        let (w, s) = (words_n as f32, syllables as f32);
        206.835 - 1.015 * w / sentences as f32 - 84.6 * s / w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_count_whole_words_and_phrases() {
        let k = Keywords::new(&["Paris", "the Seine", "cat"]);
        assert_eq!(k.score("I love paris, and the seine!"), 2.0 / 3.0);
        // "cats" is not "cat", "Parisian" is not "Paris".
        assert_eq!(k.score("Parisian cats"), 0.0);
        assert_eq!(Keywords::new(&[] as &[&str]).score("anything"), 1.0);
    }

    #[test]
    fn length_is_zero_on_target_and_falls_off_either_side() {
        let t = Length::target(4);
        assert_eq!(t.score("one two three four"), 0.0);
        assert_eq!(t.score("one two"), -0.5);
        assert_eq!(t.score("a b c d e f g h"), -1.0);
        let m = Length::at_most(4);
        assert_eq!(m.score("one two"), 0.0);
        // Reports show it: 0, not −0.
        assert!(m.score("one two").is_sign_positive());
        assert_eq!(m.score("a b c d e f"), -0.5);
    }

    #[test]
    fn regex_matches_anywhere() {
        let r = RegexMatch::new(r"\d{3}-\d{4}").unwrap();
        assert_eq!(r.score("call 555-1234 now"), 1.0);
        assert_eq!(r.score("call me"), 0.0);
        assert!(RegexMatch::new("(").is_err());
    }

    #[test]
    fn sentiment_orders_texts_and_handles_negation() {
        let s = Sentiment;
        let happy = s.score("What a wonderful, happy day. I love it!");
        let flat = s.score("The meeting is at noon on Tuesday.");
        let sad = s.score("A terrible, sad day. I hate it.");
        assert!(happy > flat && flat > sad, "{happy} {flat} {sad}");
        assert_eq!(flat, 0.0);
        assert!(s.score("not good") < 0.0);
        assert!(s.score("not bad") > 0.0);
        assert_eq!(s.score(""), 0.0);
    }

    #[test]
    fn readability_prefers_short_sentences_of_short_words() {
        let s = Readability;
        let plain = s.score("The cat sat on the mat. It was warm. We had tea.");
        let dense = s.score(
            "Contemporary administrative considerations necessitate comprehensive \
             organisational restructuring initiatives throughout institutional hierarchies.",
        );
        let numbers = s.score("11:11 12:11 1234 5678 2024 1999 3141");
        assert!(plain > 90.0 && dense < 0.0, "{plain} {dense}");
        assert!(numbers < plain, "{numbers}");
        assert_eq!(s.score(""), 0.0);
        assert_eq!(s.score("*** --- ###"), 0.0);
        assert_eq!(Readability::syllables("cake"), 1);
        assert_eq!(Readability::syllables("table"), 2);
        assert_eq!(Readability::syllables("beautiful"), 3);
        assert_eq!(Readability::syllables("2024"), 4);
    }

    #[test]
    fn letter_share_counts_pieces_with_a_letter() {
        assert_eq!(letter_share("a plain answer."), 1.0);
        assert_eq!(letter_share("11:11 12:11 ok ##"), 0.25);
        assert_eq!(letter_share(""), 1.0);
    }

    #[test]
    fn the_builtin_registry_names_sentiment() {
        let b = builtin();
        let s = b.iter().find(|b| b.name == "sentiment").unwrap();
        assert!(s.scorer.score("great") > 0.0);
    }
}
