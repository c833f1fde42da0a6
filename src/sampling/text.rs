//! Incremental detokenization with stop strings: bytes in, UTF-8 text out, holding back only the
//! tail that could still begin a stop string (so a stop split across tokens is still caught).

#[derive(Debug, Default)]
pub struct TextStream {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 character.
    pending: Vec<u8>,
    /// Decoded text not yet released because it may start a stop string.
    held: String,
}

/// What one push releases.
#[derive(Debug, Default, PartialEq)]
pub struct Released {
    pub text: String,
    /// A stop string matched: `text` ends right before it and the stream is over.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            ..Self::default()
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> Released {
        self.pending.extend_from_slice(bytes);
        let decoded = take_utf8(&mut self.pending);
        self.held.push_str(&decoded);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..at].to_string();
            self.held.clear();
            self.pending.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = self.stop_prefix_len();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// Everything still held (the stream ended without a stop string).
    pub fn finish(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        if !self.pending.is_empty() {
            text.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
        text
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn stop_prefix_len(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if tail.len() > best && s.starts_with(tail) {
                    best = tail.len();
                    break;
                }
            }
        }
        best
    }
}

/// Decode the longest valid prefix, replacing invalid bytes, keeping an incomplete trailing character.
fn take_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (ok, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        rest = &bad[n..];
                    }
                    None => {
                        rest = bad;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.to_vec();
    *buf = keep;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_split_across_pushes() {
        let mut s = TextStream::new(vec!["END".into()]);
        assert_eq!(s.push(b"hello E").text, "hello ");
        let r = s.push(b"ND more");
        assert_eq!(
            r,
            Released {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn false_prefix_is_released() {
        let mut s = TextStream::new(vec!["END".into()]);
        assert_eq!(s.push(b"E").text, "");
        assert_eq!(s.push(b"x").text, "Ex");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut s = TextStream::new(vec!["c".into(), "ab".into()]);
        let r = s.push(b"xxabc");
        assert_eq!(
            r,
            Released {
                text: "xx".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn utf8_split_over_tokens() {
        let mut s = TextStream::new(vec![]);
        let bytes = "é".as_bytes();
        assert_eq!(s.push(&bytes[..1]).text, "");
        assert_eq!(s.push(&bytes[1..]).text, "é");
        assert_eq!(s.push(&[0xff, b'a']).text, "\u{FFFD}a");
        s.push(&[0xe2]);
        assert_eq!(s.finish(), "\u{FFFD}");
    }
}
