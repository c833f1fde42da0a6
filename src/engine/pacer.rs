//! How much prompt a step may prefill while other requests decode. A step that also prefills
//! makes every stream wait for it; the pacer sizes that prefill from what steps have cost
//! lately, so that such a step takes at most `stretch` times a decode-only step: a long prompt
//! arriving among streams slows them by a bounded factor instead of stalling them.

use std::time::Duration;

/// Weight of the newest step in the running averages.
const NEW: f64 = 0.2;
/// Prompt tokens of the first step that prefills while something decodes, before a prompt
/// token's cost is known: a small one, to learn it without stalling the streams.
const PROBE: usize = 8;

#[derive(Debug, Clone)]
pub struct Pacer {
    stretch: f64,
    most: usize,
    /// Seconds of a step that only decodes, and of each prompt token a step adds.
    decode_step: Option<f64>,
    per_token: Option<f64>,
}

impl Pacer {
    /// At most `most` prompt tokens a step, and steps that prefill at most `stretch` (≥ 1) times
    /// a decode-only one.
    pub fn new(stretch: f64, most: usize) -> Self {
        Self {
            stretch: stretch.max(1.0),
            most: most.max(1),
            decode_step: None,
            per_token: None,
        }
    }

    /// Prompt tokens the next step may prefill while something decodes (at least one, so a
    /// prompt always advances).
    pub fn budget(&self) -> usize {
        match (self.decode_step, self.per_token) {
            (Some(step), Some(token)) if token > 0.0 => {
                let room = (self.stretch - 1.0) * step / token;
                (room.floor() as usize).clamp(1, self.most)
            }
            (Some(_), None) => PROBE.min(self.most),
            _ => self.most,
        }
    }

    /// A step that decoded something took `took` and prefilled `prompt_tokens` besides.
    pub fn record(&mut self, took: Duration, prompt_tokens: usize) {
        let secs = took.as_secs_f64();
        let mix = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + NEW * (new - o)));
        if prompt_tokens == 0 {
            self.decode_step = mix(self.decode_step, secs);
        } else if let Some(step) = self.decode_step {
            let extra = (secs - step).max(0.0) / prompt_tokens as f64;
            self.per_token = mix(self.per_token, extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    #[test]
    fn prefill_fills_what_the_stretch_leaves_of_a_decode_step() {
        let mut pacer = Pacer::new(3.0, 64);
        assert_eq!(pacer.budget(), 64, "nothing measured yet");
        for _ in 0..30 {
            pacer.record(ms(10.0), 0);
        }
        assert_eq!(
            pacer.budget(),
            PROBE,
            "no prefill measured yet: a small first one"
        );
        // Each prompt token costs 1 ms: a 3× step has room for 20.
        for _ in 0..30 {
            pacer.record(ms(10.0 + pacer.budget() as f64), pacer.budget());
        }
        assert_eq!(pacer.budget(), 20);
        // Prompt tokens that cost more (a long context) get a smaller share.
        for _ in 0..60 {
            pacer.record(ms(10.0 + 4.0 * pacer.budget() as f64), pacer.budget());
        }
        assert_eq!(pacer.budget(), 5);
    }

    #[test]
    fn the_budget_stays_within_one_and_the_most() {
        let mut pacer = Pacer::new(3.0, 16);
        pacer.record(ms(10.0), 0);
        pacer.record(ms(10.0), 8); // free prompt tokens
        assert_eq!(pacer.budget(), 16);
        let mut slow = Pacer::new(1.0, 16);
        slow.record(ms(10.0), 0);
        slow.record(ms(500.0), 8);
        assert_eq!(slow.budget(), 1);
    }
}
