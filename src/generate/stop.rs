//! Stop strings with hold-back, and the streaming detokeniser in front of them.
//!
//! Generated text is released as soon as it is known not to be part of a stop string: a tail
//! that could be the start of one is held back until the next pieces show whether it is. Once
//! a stop string appears, the text before it is released and the rest (the stop string
//! included) never is. The same rule as `stop` in llama.cpp's server and vLLM's
//! `include_stop_str_in_output = false`.

use crate::model::tokenizer::{ModelTokenizer, StreamDecoder, TokenizerError};

/// Matches stop strings in text that arrives in pieces, holding back any tail that could start
/// one.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    /// The stop strings, empty ones left out.
    stops: Vec<String>,
    /// All text pushed, cut before the stop string once one has appeared.
    text: String,
    /// Bytes of `text` already released (always a char boundary).
    released: usize,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored; none: every piece is released at once).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> StopMatcher {
        let stops = stops.iter().map(|s| s.as_ref()).filter(|s| !s.is_empty()).map(str::to_string).collect();
        StopMatcher { stops, ..StopMatcher::default() }
    }

    /// Add a piece of text; returns the text that became final (possibly empty). After a stop
    /// string has appeared, returns the text before it that was still held back, and then only
    /// empty strings.
    pub fn push(&mut self, piece: &str) -> &str {
        if self.stopped {
            return "";
        }
        let from = self.released;
        self.text.push_str(piece);
        // A stop string cannot start inside released text: that text was released because no
        // stop string could start there.
        let found = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str())).min();
        let end = match found {
            Some(at) => {
                self.stopped = true;
                self.text.truncate(from + at);
                from + at
            }
            None => self.text.len() - self.held_back(),
        };
        self.released = end.max(from);
        &self.text[from..self.released]
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string (the longest
    /// such tail).
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            for k in (hold + 1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        hold.min(self.text.len() - self.released)
    }

    /// The end of the text (no more pieces): release what was held back, unless a stop string
    /// appeared.
    pub fn finish(&mut self) -> &str {
        let from = self.released;
        self.released = self.text.len();
        &self.text[from..]
    }

    /// True once a stop string has appeared.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All the text pushed so far, cut before the first stop string once one has appeared
    /// (released or held back).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Token ids to final text: the streaming detokeniser ([`StreamDecoder`], which never emits
/// an incomplete UTF-8 character) followed by a [`StopMatcher`].
pub struct TextDecoder<'t> {
    decoder: StreamDecoder<'t>,
    matcher: StopMatcher,
}

impl<'t> TextDecoder<'t> {
    /// Decode with `tokenizer`, stopping at any of `stops` (empty: no stop strings).
    pub fn new<S: AsRef<str>>(tokenizer: &'t ModelTokenizer, stops: &[S]) -> TextDecoder<'t> {
        TextDecoder { decoder: StreamDecoder::new(tokenizer), matcher: StopMatcher::new(stops) }
    }

    /// Add a generated token id; returns the text that became final (possibly empty).
    ///
    /// Errors: [`TokenizerError::UnknownTokenId`] for an id outside the vocabulary, or a
    /// decoding error of the tokenizer.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        if self.matcher.stopped() {
            return Ok(String::new());
        }
        Ok(match self.decoder.push(id)? {
            Some(piece) => self.matcher.push(&piece).to_string(),
            None => String::new(),
        })
    }

    /// No more tokens: the rest of the text (an incomplete trailing character becomes U+FFFD),
    /// empty once a stop string has appeared. Errors: a decoding error of the tokenizer.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        if !self.matcher.stopped() {
            let rest = self.decoder.finish()?;
            self.matcher.push(&rest);
        }
        Ok(self.matcher.finish().to_string())
    }

    /// True once a stop string has appeared.
    pub fn stopped(&self) -> bool {
        self.matcher.stopped()
    }

    /// The text so far, cut before the stop string once one has appeared.
    pub fn text(&self) -> &str {
        self.matcher.text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Push `pieces` (as tokens would bring them); returns each push's release, the finish's
    /// release and whether a stop string appeared.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let mut m = StopMatcher::new(stops);
        let released: Vec<String> = pieces.iter().map(|p| m.push(p).to_string()).collect();
        let stopped = m.stopped();
        let rest = m.finish().to_string();
        assert_eq!(m.text(), released.concat() + &rest, "everything released, in order");
        (released, rest, stopped)
    }

    #[test]
    fn stop_string_split_across_tokens() {
        let (released, rest, stopped) = run(&["</end>"], &["Hello", " wor", "ld</", "en", "d> more"]);
        assert_eq!(released, ["Hello", " wor", "ld", "", ""]);
        assert!(stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn partial_match_that_is_not_a_stop_string_is_released() {
        let (released, rest, stopped) = run(&["STOP"], &["a ST", "OR", "Y ST"]);
        assert_eq!(released, ["a ", "STOR", "Y "]);
        assert!(!stopped);
        assert_eq!(rest, "ST", "the held-back tail comes out at the end");
    }

    #[test]
    fn several_stop_strings_the_earliest_wins() {
        let mut m = StopMatcher::new(&["\nUser:", "###", ""]);
        assert_eq!(m.push("one ##"), "one ");
        assert_eq!(m.push("x\nUs"), "##x");
        assert_eq!(m.push("er: ### more"), "");
        assert!(m.stopped());
        assert_eq!(m.text(), "one ##x");
        assert_eq!(m.push("ignored"), "");
        // Both stop strings complete in one piece: the text ends before the earlier one.
        let mut m = StopMatcher::new(&["BB", "A"]);
        assert_eq!(m.push("xxBB A"), "xx");
        assert_eq!(m.text(), "xx");
        // One stop string a prefix of another: the hold-back covers the longer one.
        let mut m = StopMatcher::new(&["ab", "abcd"]);
        assert_eq!(m.push("xa"), "x");
        assert_eq!(m.push("b"), "");
        assert!(m.stopped());
    }

    #[test]
    fn stop_string_at_the_very_start() {
        let (released, rest, stopped) = run(&["Paris"], &["Par", "is is the capital"]);
        assert_eq!(released, ["", ""]);
        assert!(stopped);
        assert_eq!(rest, "");
        let mut m = StopMatcher::new(&["<|im_end|>"]);
        assert_eq!(m.push("<|im_end|>"), "");
        assert_eq!(m.text(), "");
    }

    #[test]
    fn no_stop_strings_release_everything_and_multibyte_prefixes_hold() {
        let (released, rest, _) = run(&[], &["a", "é", ""]);
        assert_eq!(released, ["a", "é", ""]);
        assert_eq!(rest, "");
        // "éa" is held whole while it could start "éab"; released on the mismatch.
        let mut m = StopMatcher::new(&["éab"]);
        assert_eq!(m.push("xé"), "x");
        assert_eq!(m.push("a"), "");
        assert_eq!(m.push("c"), "éac");
    }

    #[test]
    fn text_decoder_stops_on_text_split_over_real_tokens() {
        let tok = crate::runtime::load_tokenizer(&crate::testdata::model_path()).unwrap();
        let text = "The capital of France is Paris, a city on the Seine.";
        let ids = tok.encode_with_bos(text, false).unwrap();
        // "apital" straddles tokens here: check the stop string spans more than one token.
        let mut d = TextDecoder::new(&tok, &["apital of Fr"]);
        let mut out = String::new();
        let mut pushed = 0;
        for &id in &ids {
            out.push_str(&d.push(id).unwrap());
            pushed += 1;
            if d.stopped() {
                break;
            }
        }
        assert!(pushed >= 3, "the stop string was completed by a later token");
        out.push_str(&d.finish().unwrap());
        assert_eq!(out, "The c");
        assert_eq!(d.text(), "The c");
        // No stop string: the whole text, the same as one decode.
        let mut d = TextDecoder::new(&tok, &[] as &[&str]);
        let mut out: String = ids.iter().map(|&id| d.push(id).unwrap()).collect();
        out.push_str(&d.finish().unwrap());
        assert_eq!(out, tok.decode(&ids).unwrap());
        // Several multi-byte characters split into byte tokens never come out broken.
        let ids = tok.encode_with_bos("日本語 ok", false).unwrap();
        let mut d = TextDecoder::new(&tok, &["本語 o"]);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&d.push(id).unwrap());
        }
        out.push_str(&d.finish().unwrap());
        assert_eq!(out, "日");
        assert!(d.push(ids[0]).unwrap().is_empty());
    }
}
