//! Prompts that fit the context: a multi-turn conversation rendered through the model's chat
//! template, reusing the KV cache across turns, and the truncation of a single prompt.

use crate::model::chat::ChatMessage;
use crate::runtime::RuntimeError;

use super::GenerateError;

/// A conversation: an optional system prompt and the exchanges so far (a user question and the
/// assistant's reply each), plus the token ids that the session's KV cache holds for it, so that
/// each turn prefills only what is new (what `firstrt chat` does).
///
/// When the context cannot hold the conversation and a new question, the oldest exchanges are
/// dropped; the system prompt is always kept, and the question is answered whenever the system
/// prompt and the question fit.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    system: Option<String>,
    /// Completed exchanges, oldest first: (question, reply).
    exchanges: Vec<(String, String)>,
    /// Token ids in the session's KV cache for this conversation, in order.
    cached: Vec<u32>,
}

/// One turn's prompt, from [`Conversation::ask`]: prefill `ids`, generate, then hand it back
/// with the reply to [`Conversation::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    question: String,
    /// Ids to prefill after what the session holds (all of the rendering when `restart`).
    pub ids: Vec<u32>,
    /// The session's KV cache holds tokens this prompt does not extend: prefill `ids` into a
    /// session with an empty cache (a new [`Session`](crate::runtime::Session)).
    pub restart: bool,
    /// Oldest exchanges dropped to make room (0: none).
    pub dropped_exchanges: usize,
}

impl Conversation {
    /// An empty conversation with an optional system prompt.
    pub fn new(system: Option<String>) -> Conversation {
        Conversation { system, ..Conversation::default() }
    }

    /// The system prompt.
    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// The messages so far: the system prompt, then each exchange's question and reply.
    pub fn messages(&self) -> Vec<ChatMessage> {
        self.messages_with(0, None)
    }

    /// System prompt, the exchanges from `first` on, and `question` as the last user message.
    fn messages_with(&self, first: usize, question: Option<&str>) -> Vec<ChatMessage> {
        let mut messages: Vec<ChatMessage> = self.system.iter().map(ChatMessage::system).collect();
        for (q, a) in &self.exchanges[first..] {
            messages.push(ChatMessage::user(q.as_str()));
            messages.push(ChatMessage::assistant(a.as_str()));
        }
        messages.extend(question.map(ChatMessage::user));
        messages
    }

    /// The prompt for `question`, given a session that holds `position` tokens in a context of
    /// `ctx_len` (see [`Session::position`](crate::runtime::Session::position) and
    /// [`Session::ctx_len`](crate::runtime::Session::ctx_len)). `render` turns messages into
    /// token ids with the generation prompt (e.g. [`LoadedModel::chat_ids`]).
    ///
    /// When the rendering extends what the cache holds, only the new ids are returned. When the
    /// rendering does not leave room for one generated token, the oldest exchanges are dropped
    /// (for good) until it does, the system prompt kept.
    ///
    /// Errors: [`GenerateError::PromptTooLong`] when the system prompt and the question alone
    /// leave no room (the conversation is left unchanged); `render`'s error.
    ///
    /// [`LoadedModel::chat_ids`]: crate::runtime::LoadedModel::chat_ids
    pub fn ask<R>(&mut self, question: &str, position: usize, ctx_len: usize, render: R) -> Result<Turn, GenerateError>
    where
        R: Fn(&[ChatMessage]) -> Result<Vec<u32>, RuntimeError>,
    {
        let mut dropped = 0;
        let ids = loop {
            let ids = render(&self.messages_with(dropped, Some(question)))?;
            if ids.len() < ctx_len {
                break ids;
            }
            if dropped == self.exchanges.len() {
                return Err(GenerateError::PromptTooLong { tokens: ids.len(), ctx_len });
            }
            dropped += 1;
        };
        self.exchanges.drain(..dropped);
        let reuse = dropped == 0 && position == self.cached.len() && ids.starts_with(&self.cached);
        let (ids, restart) = if reuse {
            (ids[self.cached.len()..].to_vec(), false)
        } else {
            self.cached.clear();
            (ids, position > 0)
        };
        Ok(Turn { question: question.to_string(), ids, restart, dropped_exchanges: dropped })
    }

    /// Record the reply to `turn`: `generated_ids` as generated, `reply` its text (cut before a
    /// stop string), `position` the session's position afterwards. The cache then holds the
    /// turn's ids and the generated tokens fed back (all of them when an end token stopped
    /// generation, all but the last otherwise); the next turn's rendering re-feeds the rest as
    /// the template writes it.
    pub fn record(&mut self, turn: Turn, reply: String, generated_ids: &[u32], position: usize) {
        self.cached.extend_from_slice(&turn.ids);
        let fed = position.saturating_sub(self.cached.len()).min(generated_ids.len());
        self.cached.extend_from_slice(&generated_ids[..fed]);
        self.exchanges.push((turn.question, reply));
    }
}

/// A prompt that fits a context of `ctx_len` tokens with room for at least one generated
/// token: unchanged when it fits; else, with `truncate`, its last
/// `max(1, ctx_len - min(max_tokens, ctx_len / 2))` tokens (room for up to `max_tokens`
/// generated ones, at most half the context).
///
/// Returns the ids and the number of tokens cut from the front (0 when it fits).
/// Errors: [`GenerateError::PromptTooLong`] when it does not fit and `truncate` is false.
pub fn fit_prompt(ids: &[u32], ctx_len: usize, max_tokens: usize, truncate: bool) -> Result<(&[u32], usize), GenerateError> {
    if ids.len() < ctx_len {
        return Ok((ids, 0));
    }
    if !truncate {
        return Err(GenerateError::PromptTooLong { tokens: ids.len(), ctx_len });
    }
    let keep = ctx_len.saturating_sub(max_tokens.min(ctx_len / 2)).max(1);
    let cut = ids.len() - keep;
    Ok((&ids[cut..], cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in chat template: a role id (system 1, user 2, assistant 3), one id per character
    /// of the content and an end id 0 per message; the generation prompt is the assistant's role
    /// id, as in ChatML.
    fn render(messages: &[ChatMessage]) -> Result<Vec<u32>, RuntimeError> {
        let mut ids = Vec::new();
        for m in messages {
            ids.push(match m.role.as_str() {
                "system" => 1,
                "user" => 2,
                _ => 3,
            });
            ids.extend(m.content.chars().map(u32::from));
            ids.push(0);
        }
        ids.push(3);
        Ok(ids)
    }

    /// Answer a turn as a session would: prefill, generate `reply` and feed back all but the last
    /// token; returns the session's position afterwards.
    fn answer(conv: &mut Conversation, turn: Turn, position: usize, reply: &str) -> usize {
        let position = if turn.restart { 0 } else { position } + turn.ids.len();
        let generated: Vec<u32> = reply.chars().map(|c| c as u32).collect();
        let position = position + generated.len() - 1;
        conv.record(turn, reply.to_string(), &generated, position);
        position
    }

    #[test]
    fn later_turns_prefill_only_what_is_new() {
        let mut conv = Conversation::new(Some("S".into()));
        let turn = conv.ask("ab", 0, 100, render).unwrap();
        assert_eq!(turn.ids, render(&[ChatMessage::system("S"), ChatMessage::user("ab")]).unwrap());
        assert!(!turn.restart);
        let pos = answer(&mut conv, turn, 0, "xy");
        let turn = conv.ask("c", pos, 100, render).unwrap();
        // The cache holds [1 S 0 2 a b 0 3 x]: the rest of the rendering is new.
        assert_eq!(turn.ids, [u32::from('y'), 0, 2, u32::from('c'), 0, 3]);
        assert!(!turn.restart && turn.dropped_exchanges == 0);
        // A session that does not hold what the conversation thinks: start over.
        let turn = conv.ask("c", pos + 1, 100, render).unwrap();
        assert!(turn.restart);
        assert_eq!(turn.ids, render(&conv.messages_with(0, Some("c"))).unwrap());
        // A fresh session (position 0, e.g. after a LoRA switch): the whole rendering, no restart.
        let turn = conv.ask("c", 0, 100, render).unwrap();
        assert!(!turn.restart && turn.ids[..2] == [1, u32::from('S')]);
    }

    #[test]
    fn a_full_context_drops_the_oldest_exchanges_and_keeps_the_system_prompt() {
        let mut conv = Conversation::new(Some("You are a pirate.".into()));
        let ctx_len = 64;
        let mut pos = 0;
        for q in ["first question", "second one"] {
            let turn = conv.ask(q, pos, ctx_len, render).unwrap();
            pos = answer(&mut conv, turn, pos, "arr");
        }
        let long = "a long third question";
        let turn = conv.ask(long, pos, ctx_len, render).unwrap();
        assert_eq!(turn.dropped_exchanges, 1);
        assert!(turn.restart, "the cache held the dropped exchanges");
        assert!(turn.ids.len() < ctx_len);
        let messages = conv.messages_with(0, Some(long));
        assert_eq!(messages[0], ChatMessage::system("You are a pirate."));
        assert_eq!(messages[1], ChatMessage::user("second one"));
        assert_eq!(messages.last(), Some(&ChatMessage::user(long)));
        assert_eq!(turn.ids, render(&messages).unwrap());
        // Roles alternate after the system prompt: no two user messages in a row.
        assert!(messages[1..].windows(2).all(|w| w[0].role != w[1].role), "{messages:?}");
        let pos = answer(&mut conv, turn, pos, "arr");
        assert_eq!(conv.messages().last(), Some(&ChatMessage::assistant("arr")));
        assert!(pos < ctx_len);
    }

    #[test]
    fn a_question_that_cannot_fit_is_an_error_and_changes_nothing() {
        let mut conv = Conversation::new(Some("system".into()));
        let turn = conv.ask("hi", 0, 32, render).unwrap();
        let pos = answer(&mut conv, turn, 0, "ok");
        let before = conv.messages();
        let question = "x".repeat(40);
        match conv.ask(&question, pos, 32, render) {
            Err(GenerateError::PromptTooLong { tokens, ctx_len: 32 }) => assert_eq!(tokens, (1 + 6 + 1) + (1 + 40 + 1) + 1),
            other => panic!("expected PromptTooLong, got {other:?}"),
        }
        assert_eq!(conv.messages(), before);
        // The cache is intact: a short question still extends it.
        assert!(!conv.ask("yo", pos, 32, render).unwrap().restart);
    }

    #[test]
    fn fit_prompt_keeps_the_end_or_refuses() {
        let ids: Vec<u32> = (0..40).collect();
        assert_eq!(fit_prompt(&ids, 41, 8, false).unwrap(), (&ids[..], 0));
        match fit_prompt(&ids, 40, 8, false) {
            Err(GenerateError::PromptTooLong { tokens: 40, ctx_len: 40 }) => {}
            other => panic!("{other:?}"),
        }
        // Room for max_tokens = 8: keep 32 - 8 = 24.
        assert_eq!(fit_prompt(&ids, 32, 8, true).unwrap(), (&ids[16..], 16));
        // At most half the context goes to generation.
        assert_eq!(fit_prompt(&ids, 16, 100, true).unwrap(), (&ids[32..], 32));
        assert_eq!(fit_prompt(&ids, 1, 100, true).unwrap(), (&ids[39..], 39));
    }
}
