//! The project's prompt set for preference data and steering evaluation: every template crossed
//! with every everyday topic (500 prompts), written here so that it is deterministic and needs no
//! download. A stable hash of each prompt's text puts about a tenth of them in the held-out
//! `eval` split, so `tilt eval steer` can measure ARMs on prompts they were never trained on.
//! A larger set for training only crosses other templates with other topics (1,464 prompts, none
//! sharing a topic or a template with the first): the `eval` split stays the same 500's tenth.

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

/// Templates and topics of the training-only prompts: asks of other kinds, about other things.
const MORE_TEMPLATES: &[&str] = &[
    "Write a paragraph about {}.",
    "What was it like, {}?",
    "Describe your experience with {}.",
    "Write a diary entry about {}.",
    "How do you feel about {}?",
    "Write a message to a colleague about {}.",
    "Summarise what people say about {}.",
    "Write a postcard about {}.",
    "Describe {} in a few words.",
    "What is the best and worst part of {}?",
    "Write a short blog post about {}.",
    "Tell a friend what happened with {}.",
];

const MORE_TOPICS: &[&str] = &[
    "a broken umbrella",
    "a late train",
    "a new haircut",
    "a dog park",
    "a farmers market",
    "a noisy neighbour",
    "a software update",
    "a road trip",
    "a first date",
    "a cooking class",
    "a flat tyre",
    "a yoga class",
    "a science fair",
    "a garage sale",
    "a thunderstorm",
    "a lost wallet",
    "a family reunion",
    "a piano recital",
    "a charity run",
    "a coffee shop",
    "a new bicycle",
    "a bookshop",
    "a long queue",
    "a holiday market",
    "a power nap",
    "a missed flight",
    "a picnic",
    "a house party",
    "a spelling bee",
    "a bus strike",
    "a theme park",
    "a cold shower",
    "a new sofa",
    "a fishing trip",
    "a hospital visit",
    "a school play",
    "a heatwave",
    "a dinner party",
    "a yard sale",
    "a pottery class",
    "a bike ride",
    "a rainy afternoon",
    "a zoo visit",
    "a foggy morning",
    "a kitchen remodel",
    "a late-night snack",
    "a group project",
    "a sunset walk",
    "an office party",
    "a tax return",
    "a job offer",
    "a phone call from an old friend",
    "a parking ticket",
    "a boat trip",
    "a new recipe",
    "a quiz night",
    "a ski holiday",
    "a city marathon",
    "a noisy café",
    "a long weekend",
    "a street festival",
    "a surprise party",
    "a delayed package",
    "a dentist appointment",
    "a rooftop garden",
    "a karaoke night",
    "a farm visit",
    "a laptop that will not start",
    "a spring morning",
    "a road closure",
    "a chess club",
    "a night shift",
    "a neighbourhood cat",
    "a vintage shop",
    "a camping stove",
    "a lake swim",
    "a volunteer day",
    "a science museum",
    "a night bus",
    "a wet dog",
    "a library card",
    "a new job",
    "a cancelled concert",
    "a sunny Sunday",
    "a cooking disaster",
    "a pop quiz",
    "an empty fridge",
    "a hot bath",
    "a long meeting",
    "a clean kitchen",
    "a tidy desk",
    "a ferry crossing",
    "a school reunion",
    "a flower show",
    "a leaking roof",
    "a quiet village",
    "a busy airport",
    "a football practice",
    "a mountain view",
    "a cold winter night",
    "a home-made cake",
    "a new phone case",
    "a crowded beach",
    "a lazy afternoon",
    "a swimming lesson",
    "a broken washing machine",
    "a street musician",
    "a gift from a friend",
    "a rainy picnic",
    "a power cut during dinner",
    "a lost key",
    "a sports day",
    "a late-night movie",
    "a new coworker",
    "a canal walk",
    "a bakery queue",
    "a birthday card",
    "a wild storm",
    "a fresh loaf of bread",
    "a garden party",
    "an early alarm",
    "a slow internet connection",
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
    cross(TEMPLATES, TOPICS)
        .filter(|p| split.holds(p))
        .collect()
}

/// `builtin(split)`, then (outside the `eval` split) the training-only prompts.
pub fn builtin_more(split: Split) -> Vec<String> {
    let mut prompts = builtin(split);
    if split != Split::Eval {
        prompts.extend(cross(MORE_TEMPLATES, MORE_TOPICS));
    }
    prompts
}

fn cross<'a>(templates: &'a [&str], topics: &'a [&str]) -> impl Iterator<Item = String> + 'a {
    (templates.iter()).flat_map(move |t| topics.iter().map(move |topic| t.replace("{}", topic)))
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
        // The larger set adds training prompts only, none of them already among the first.
        let more = builtin_more(Split::Train);
        assert_eq!(
            more.len(),
            train.len() + MORE_TEMPLATES.len() * MORE_TOPICS.len()
        );
        assert_eq!(builtin_more(Split::Eval), eval);
        let mut distinct = builtin_more(Split::All);
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            all.len() + MORE_TEMPLATES.len() * MORE_TOPICS.len()
        );
    }
}
