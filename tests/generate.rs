//! The library's generation API on the test model: the token stream's events, each finish
//! reason, and a conversation that outgrows its context.

mod common;

use firstrt::generate::{Conversation, Event, FinishReason, GenerateOptions, SamplerConfig, TextDecoder, TokenStream, generate};
use firstrt::gpu::{DType, GpuContext, GpuOptions};
use firstrt::model::chat::ChatMessage;
use firstrt::model::routers::{RouterFile, model_identity};
use firstrt::runtime::plan::PlanPolicy;
use firstrt::runtime::routed::{GpuRouters, Routing};
use firstrt::runtime::{LayerPlan, LoadedModel, Session, SessionOptions};
use std::sync::Arc;

fn session(model: &LoadedModel, ctx_len: usize) -> Session {
    let n = model.weights.config.n_layers;
    Session::new(&model.weights, SessionOptions { ctx_len, candidates: 1 }, LayerPlan::full(n)).unwrap()
}

fn greedy(max_tokens: usize, model: &LoadedModel) -> GenerateOptions {
    GenerateOptions { max_tokens, sampler: SamplerConfig::greedy(), end_ids: model.tokenizer.end_ids().to_vec() }
}

fn question(model: &LoadedModel) -> Vec<u32> {
    model.chat_ids(&[ChatMessage::user("What is the capital of France?")]).unwrap()
}

/// Pull every event; returns them with the record.
fn drain(mut stream: TokenStream<'_>) -> (Vec<Event>, firstrt::generate::Generation) {
    let events = (&mut stream).map(|e| e.unwrap()).collect();
    (events, stream.into_generation())
}

#[test]
fn events_are_the_tokens_the_text_and_the_finish() {
    let model = common::model(DType::F32);
    let prompt = question(&model);
    let options = greedy(24, &model);
    let mut s = session(&model, 128);
    let stream = TokenStream::start(&mut s, &prompt, &options, Some(TextDecoder::new(&model.tokenizer, &[] as &[&str]))).unwrap();
    let (events, g) = drain(stream);
    let tokens: Vec<u32> = events.iter().filter_map(|e| if let Event::Token(id) = e { Some(*id) } else { None }).collect();
    let text: String = events.iter().filter_map(|e| if let Event::Text(t) = e { Some(t.as_str()) } else { None }).collect();
    assert_eq!(tokens, g.generated_ids);
    assert_eq!(text, g.text);
    assert_eq!(text, model.tokenizer.decode(&g.generated_ids).unwrap());
    match events.last() {
        Some(Event::Finished { reason, timings }) => {
            assert_eq!(*reason, g.finish);
            assert_eq!(timings.prefill_tokens, prompt.len());
            assert!(timings.ttft_s > 0.0 && timings.ttft_s.is_finite());
        }
        other => panic!("the last event is Finished, got {other:?}"),
    }
    assert_eq!(g.finish, FinishReason::EndToken, "{}", g.text);
    assert!(g.text.contains("Paris"), "{}", g.text);
    assert_eq!(g.timings.decode_tokens, g.generated_ids.len(), "every generated token was fed back before the end token");
    // The same tokens without text.
    let mut s = session(&model, 128);
    assert_eq!(generate(&mut s, &prompt, &options).unwrap().generated_ids, g.generated_ids);
    // A smaller budget: the first token comes from prefill, the others from decode steps.
    let mut s = session(&model, 128);
    let short = generate(&mut s, &prompt, &greedy(4, &model)).unwrap();
    assert_eq!(short.finish, FinishReason::MaxTokens);
    assert_eq!(short.generated_ids, g.generated_ids[..4]);
    assert_eq!(short.timings.decode_tokens, 3);
}

#[test]
fn a_stop_string_ends_the_stream_before_it() {
    let model = common::model(DType::F32);
    let prompt = question(&model);
    let options = greedy(24, &model);
    let mut s = session(&model, 128);
    let stream = TokenStream::start(&mut s, &prompt, &options, Some(TextDecoder::new(&model.tokenizer, &["Paris"]))).unwrap();
    let (events, g) = drain(stream);
    assert_eq!(g.finish, FinishReason::StopString);
    assert!(!g.text.contains("Paris"), "{}", g.text);
    assert!(model.tokenizer.decode(&g.generated_ids).unwrap().contains("Paris"), "the ids run up to the stop string");
    let text: String = events.iter().filter_map(|e| if let Event::Text(t) = e { Some(t.as_str()) } else { None }).collect();
    assert_eq!(text, g.text);
}

#[test]
fn the_caller_and_the_context_end_the_stream() {
    let model = common::model(DType::F32);
    let prompt = question(&model);
    let options = greedy(100, &model);
    let mut s = session(&model, 128);
    let mut stream = TokenStream::start(&mut s, &prompt, &options, Some(TextDecoder::new(&model.tokenizer, &[] as &[&str]))).unwrap();
    let mut tokens = 0;
    let mut last = None;
    while let Some(event) = stream.next() {
        let event = event.unwrap();
        if matches!(event, Event::Token(_)) {
            tokens += 1;
            if tokens == 3 {
                stream.stop().unwrap();
            }
        }
        last = Some(event);
    }
    assert!(matches!(last, Some(Event::Finished { reason: FinishReason::Caller, .. })), "{last:?}");
    let g = stream.into_generation();
    assert_eq!(g.generated_ids.len(), 3);
    assert_eq!(g.text, model.tokenizer.decode(&g.generated_ids).unwrap());

    // Room for the prompt and two more rows: two decode steps, three tokens.
    let mut s = session(&model, prompt.len() + 2);
    let g = generate(&mut s, &prompt, &options).unwrap();
    assert_eq!(g.finish, FinishReason::ContextFull);
    assert_eq!(g.generated_ids.len(), 3);
    assert_eq!(s.position(), prompt.len() + 2);
}

/// `firstrt chat --ctx 64 --system "You are a pirate."` with a long second question: the oldest
/// exchange goes, the system prompt stays, and the question is answered.
#[test]
fn a_conversation_that_outgrows_the_context_keeps_the_system_prompt() {
    let model = common::model(DType::F32);
    let ctx_len = 64;
    let options = greedy(8, &model);
    let render = |m: &[ChatMessage]| model.chat_ids(m);
    let mut conv = Conversation::new(Some("You are a pirate.".into()));
    let mut s = session(&model, ctx_len);
    let questions = [
        "Hi!",
        "Tell me, in a few short words, where a clever old pirate would hide the golden treasure that he found on the small island last summer",
    ];
    for (i, q) in questions.iter().enumerate() {
        let turn = conv.ask(q, s.position(), ctx_len, render).unwrap();
        if i == 1 {
            assert_eq!(turn.dropped_exchanges, 1, "the first exchange no longer fits");
            assert!(turn.restart);
            let expected = model.chat_ids(&[ChatMessage::system("You are a pirate."), ChatMessage::user(*q)]).unwrap();
            assert_eq!(turn.ids, expected, "system prompt and question, nothing else");
        } else {
            assert!(!turn.restart && turn.dropped_exchanges == 0);
        }
        if turn.restart {
            s = session(&model, ctx_len);
        }
        let stream = TokenStream::start(&mut s, &turn.ids, &options, Some(TextDecoder::new(&model.tokenizer, &[] as &[&str]))).unwrap();
        let (_, g) = drain(stream);
        assert!(!g.generated_ids.is_empty(), "turn {i} is answered");
        conv.record(turn, g.text, &g.generated_ids, s.position());
    }
    let messages = conv.messages();
    assert_eq!(messages[0], ChatMessage::system("You are a pirate."));
    assert_eq!(messages.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["system", "user", "assistant"]);
    // Too long even alone: an error, and the conversation is unchanged.
    let huge = "arr ".repeat(80);
    assert!(conv.ask(&huge, s.position(), ctx_len, render).is_err());
    assert_eq!(conv.messages(), messages);
}

/// Issue 10 §5: the token stream prepares its steps itself (every pipeline it built was warmed,
/// and only the warm-up marks them), and once `Session::prepare_prefill` has run, the prefill
/// and decode steps that the stream times build no pipeline and run none that the warm-up has
/// not dispatched (which is when drivers such as lavapipe compile them), for prompts on both
/// sides of the attention kernel's split / rows threshold; the reported timings are there. A
/// private context, so that pipelines built by tests running alongside do not count.
#[test]
fn steps_are_prepared_before_they_are_timed() {
    let ctx = GpuContext::new(&GpuOptions::default()).unwrap();
    let model = firstrt::testdata::load_model(&ctx, DType::F16);
    let question = question(&model);
    let g = generate(&mut session(&model, 128), &question[..3], &common::greedy_options(2)).unwrap();
    assert_eq!(g.generated_ids.len(), 2);
    assert!(!ctx.pipelines.is_empty() && ctx.pipelines.cold_len() == 0, "the stream warmed what it built");
    // On lavapipe with two cores or more a second device compiled part of those pipelines (the
    // compile helper), and it could build and bind every one it took.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let helper_wanted = ctx.is_cpu()
        && ctx.info.backend == wgpu::Backend::Vulkan
        && cores >= 2
        && std::env::var_os("FIRSTRT_COMPILE_HELPER").is_none()
        && std::env::var_os("MESA_SHADER_CACHE_DISABLE").is_none();
    match ctx.compile_helper_counts() {
        Some(c) => assert!(c.compiled > 0 && c.failed == 0, "{c:?}"),
        None => assert!(!helper_wanted, "no compile helper on {:?}", ctx.info),
    }
    for prompt in [&question[..], &question[..2]] {
        let mut s = session(&model, 128);
        s.prepare_prefill(prompt.len()).unwrap();
        let built = ctx.pipelines.len();
        assert_eq!(ctx.pipelines.cold_len(), 0, "every pipeline built so far was warmed");
        let g = generate(&mut s, prompt, &common::greedy_options(4)).unwrap();
        assert_eq!(ctx.pipelines.len(), built, "a {}-token prompt: pipelines built during generation", prompt.len());
        assert_eq!(ctx.pipelines.cold_len(), 0);
        assert_eq!(g.timings.decode_tokens, 3);
        assert!(g.timings.prefill_s > 0.0 && g.timings.decode_s > 0.0, "{:?}", g.timings);
    }
}

/// `Session::prepare_prefills` (what `serve` prepares at start-up) compiles the decode step's
/// and several prefill lengths' pipelines in one warm-up: prefills of those lengths and the
/// decode steps after them then build no pipeline. A length past the context is left out.
#[test]
fn several_prefill_lengths_are_prepared_at_once() {
    let ctx = GpuContext::new(&GpuOptions::default()).unwrap();
    let model = firstrt::testdata::load_model(&ctx, DType::F16);
    let question = question(&model);
    let mut s = session(&model, 128);
    s.prepare_prefills(&[2, question.len(), 1000]).unwrap();
    let built = ctx.pipelines.len();
    assert!(built > 0 && ctx.pipelines.cold_len() == 0, "every pipeline built was warmed");
    for prompt in [&question[..2], &question[..]] {
        let g = generate(&mut session(&model, 128), prompt, &common::greedy_options(3)).unwrap();
        assert_eq!(g.generated_ids.len(), 3);
        assert_eq!(ctx.pipelines.len(), built, "a {}-token prompt built pipelines", prompt.len());
    }
}

/// The same for a routed session, whose plan is only decided inside its prefill:
/// `Session::prepare_prefill` warms the routed prefill's pipelines (the embedding, a router, a
/// layer and the tail: every layer runs the same ones), so the prefill the stream times builds
/// and runs none cold; the decode step is prepared once the plan is fixed, as the test above
/// checks.
#[test]
fn a_routed_prefill_is_prepared_before_it_is_timed() {
    let ctx = GpuContext::new(&GpuOptions::default()).unwrap();
    let model = firstrt::testdata::load_model(&ctx, DType::F16);
    let identity = model_identity(model.source.as_ref()).unwrap();
    let file = RouterFile::init(&identity, 4, 3.0, 1e-5, 0.5);
    let routing = Routing { routers: Arc::new(GpuRouters::upload(&ctx, &file).unwrap()), policy: PlanPolicy::from_routers(&file) };
    let question = question(&model);
    let mut s = Session::with_routers(&model.weights, SessionOptions { ctx_len: 128, candidates: 1 }, routing).unwrap();
    s.prepare_prefill(question.len()).unwrap();
    let built = ctx.pipelines.len();
    assert_eq!(ctx.pipelines.cold_len(), 0, "every pipeline built so far was warmed");
    s.prefill(&question).unwrap();
    assert_eq!(ctx.pipelines.len(), built, "pipelines built during the routed prefill");
    assert_eq!(ctx.pipelines.cold_len(), 0);
    assert!(s.router_probs().iter().any(Option::is_some), "the routers decided");
}
