//! The project's prompt set for preference data and steering evaluation: every template crossed
//! with every everyday topic (500 prompts), written here so that it is deterministic and needs no
//! download. A stable hash of each prompt's text puts about a tenth of them in the held-out
//! `eval` split, so `tilt eval steer` can measure ARMs on prompts they were never trained on.

use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

const TEMPLATES: &[&str] = &[
    "Describe {}.",
    "Write a short review of {}.",
    "What do you think about {}?",
    "Tell me about {}.",
    "Write a few sentences about {}.",
    "How would you explain {} to a friend?",
    "Give me your honest opinion of {}.",
    "Share a short story about {}.",
    "What should I know about {}?",
    "Write a short note to a friend about {}.",
];

const TOPICS: &[&str] = &[
    "a rainy Monday morning",
    "the city bus",
    "a new smartphone",
    "the local library",
    "a cup of coffee",
    "learning to cook",
    "a long flight",
    "a trip to the dentist",
    "the weekend",
    "a crowded supermarket",
    "a walk in the park",
    "a summer holiday",
    "moving to a new city",
    "a job interview",
    "an old movie",
    "a board game night",
    "the first day of school",
    "a traffic jam",
    "a birthday party",
    "a small bakery",
    "a hiking trip",
    "a snowy winter",
    "a team meeting",
    "learning a new language",
    "a used car",
    "a pet cat",
    "a visit to a museum",
    "a live concert",
    "working from home",
    "a hotel room",
    "a cheap restaurant",
    "a new neighbour",
    "online shopping",
    "a football match",
    "a family dinner",
    "the morning commute",
    "a vegetable garden",
    "a power outage",
    "a call to customer service",
    "a novel you read recently",
    "a camping trip",
    "a gym membership",
    "a day at the beach",
    "a school exam",
    "a wedding",
    "a music lesson",
    "a train station",
    "a home repair",
    "a video game",
    "a rainy holiday",
];

/// Which prompts to use: those for training ARMs, the held-out ones, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Eval,
    All,
}

impl Split {
    fn holds(self, prompt: &str) -> bool {
        let eval = stable_hash(prompt).is_multiple_of(10);
        match self {
            Self::Train => !eval,
            Self::Eval => eval,
            Self::All => true,
        }
    }
}

/// A hash of `text` that no Rust or platform version changes (unlike `DefaultHasher`).
pub fn stable_hash(text: &str) -> u64 {
    let digest = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has 8 bytes"),
    )
}

/// The built-in prompts of `split`, in a fixed order.
pub fn builtin(split: Split) -> Vec<String> {
    TEMPLATES
        .iter()
        .flat_map(|t| TOPICS.iter().map(move |topic| t.replace("{}", topic)))
        .filter(|p| split.holds(p))
        .collect()
}

/// The prompts of `split` from a JSONL file of `{"prompt": …}` objects (blank lines skipped).
pub fn read(path: &Path, split: Split) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Line {
        prompt: String,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: expected {{\"prompt\": string}}",
                path.display(),
                i + 1
            )
        })?;
        prompts.push(line.prompt);
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts.into_iter().filter(|p| split.holds(p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_splits_partition_several_hundred_distinct_prompts() {
        let all = builtin(Split::All);
        assert_eq!(all.len(), TEMPLATES.len() * TOPICS.len());
        let mut distinct = all.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), all.len());
        let (train, eval) = (builtin(Split::Train), builtin(Split::Eval));
        assert_eq!(train.len() + eval.len(), all.len());
        assert!(eval.iter().all(|p| !train.contains(p)));
        // About a tenth held out.
        assert!((30..=70).contains(&eval.len()), "{}", eval.len());
    }
}
