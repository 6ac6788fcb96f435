//! Batched decode (`runtime::batch::DecodeBatch`) against the transformers fixture: sessions
//! with different prompts, positions and context sizes stepped together give each its own
//! greedy ids, under the full model and under a skip plan; the batch equals each session's
//! own decode step; and sessions that cannot share a step are refused.

mod common;

use common::{cases, model};
use firstrt::generate::{GenerateOptions, SamplerConfig, TokenStream};
use firstrt::gpu::DType;
use firstrt::runtime::batch::DecodeBatch;
use firstrt::runtime::{LayerPlan, Session, SessionOptions};

/// Prefill each prompt in its own session, then decode `n` greedy tokens with every session in
/// one batched step per token; the generated ids of each.
fn batched_greedy(plan: &LayerPlan, prompts: &[Vec<u32>], n: usize, capacity: usize) -> Vec<Vec<u32>> {
    let model = model(DType::F32);
    let mut batch = DecodeBatch::new(&model.weights, capacity).unwrap();
    let options = GenerateOptions { max_tokens: n, sampler: SamplerConfig::greedy(), end_ids: vec![] };
    // Context sizes differ per session, as the server sizes them.
    let sessions: Vec<Session> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Session::new(&model.weights, SessionOptions { ctx_len: p.len() + n + 3 * i, candidates: 1 }, plan.clone()).unwrap())
        .collect();
    let mut streams: Vec<TokenStream<'_, Session>> =
        sessions.into_iter().zip(prompts).map(|(s, p)| TokenStream::start(s, p, &options, None).unwrap()).collect();
    // The first token comes from each prefill.
    for s in &mut streams {
        s.next().unwrap().unwrap();
    }
    loop {
        let mut taken = Vec::new();
        for (i, s) in streams.iter_mut().enumerate() {
            if let Some(id) = s.take_decode() {
                taken.push((i, id));
            }
        }
        if taken.is_empty() {
            break;
        }
        let ids: Vec<u32> = taken.iter().map(|&(_, id)| id).collect();
        let mut members: Vec<&mut Session> = Vec::new();
        for (i, s) in streams.iter_mut().enumerate() {
            if taken.iter().any(|&(j, _)| j == i) {
                members.push(s.session_mut());
            }
        }
        let outputs = batch.step(&mut members, &ids).unwrap();
        for (&(i, _), out) in taken.iter().zip(outputs) {
            streams[i].feed(out).unwrap();
            while streams[i].has_queued() {
                streams[i].next().unwrap().unwrap();
            }
        }
    }
    streams.into_iter().map(|s| s.into_generation().generated_ids).collect()
}

#[test]
fn batched_decode_gives_each_session_its_fixture_ids() {
    let all = cases();
    let pick = |name: &str| all.iter().find(|c| c.name == name).unwrap().clone();
    let full: Vec<_> = ["short8_raw", "chat_user_only", "one_token_raw"].iter().map(|n| pick(n)).collect();
    let prompts: Vec<Vec<u32>> = full.iter().map(|c| c.prompt_ids.clone()).collect();
    let got = batched_greedy(&LayerPlan::full(30), &prompts, 10, 4);
    for (case, ids) in full.iter().zip(&got) {
        assert_eq!(ids[..], case.greedy_ids[..10], "{} in a batch of 3", case.name);
    }
    // A skip plan, two sessions at different positions (the same prompt twice, once shortened).
    let skip = pick("long_story_skip_12_13_14");
    let plan = LayerPlan::skipping(30, &skip.skip_layers).unwrap();
    let prompts = vec![skip.prompt_ids.clone(), skip.prompt_ids.clone()];
    let got = batched_greedy(&plan, &prompts, 8, 2);
    for ids in &got {
        assert_eq!(ids[..], skip.greedy_ids[..8], "skip 12,13,14 in a batch of 2");
    }
}

/// The batch's candidates equal each session's own decode step's, to rounding.
#[test]
fn batched_step_equals_single_steps() {
    let model = model(DType::F32);
    let case = cases().into_iter().find(|c| c.name == "chat_user_only").unwrap();
    let make = || {
        let mut s = Session::new(&model.weights, SessionOptions { ctx_len: 64, candidates: 8 }, LayerPlan::full(30)).unwrap();
        s.prefill(&case.prompt_ids[..20]).unwrap();
        s
    };
    let (mut a, mut b, mut alone) = (make(), make(), make());
    b.prefill(&case.prompt_ids[20..25]).unwrap();
    let mut batch = DecodeBatch::new(&model.weights, 2).unwrap();
    let outs = batch.step(&mut [&mut a, &mut b], &[case.prompt_ids[20], case.prompt_ids[25]]).unwrap();
    let single = alone.decode(case.prompt_ids[20]).unwrap();
    assert_eq!(a.position(), 21);
    assert_eq!(b.position(), 26);
    let ids = |o: &firstrt::runtime::StepOutput| o.candidates.iter().map(|c| c.0).collect::<Vec<_>>();
    assert_eq!(ids(&outs[0]), ids(&single));
    for (x, y) in outs[0].candidates.iter().zip(&single.candidates) {
        assert!((x.1 - y.1).abs() < 2e-3, "logit {} batched vs {} alone", x.1, y.1);
    }
}

#[test]
fn sessions_that_cannot_share_a_step_are_refused() {
    let model = model(DType::F32);
    let mut batch = DecodeBatch::new(&model.weights, 2).unwrap();
    let mut full = Session::new(&model.weights, SessionOptions { ctx_len: 16, candidates: 1 }, LayerPlan::full(30)).unwrap();
    let mut skip =
        Session::new(&model.weights, SessionOptions { ctx_len: 16, candidates: 1 }, LayerPlan::skipping(30, &[3]).unwrap()).unwrap();
    assert!(!batch.same_step(&full, &skip));
    assert!(batch.step(&mut [&mut full, &mut skip], &[1, 2]).is_err());
    let mut third = Session::new(&model.weights, SessionOptions { ctx_len: 16, candidates: 1 }, LayerPlan::full(30)).unwrap();
    let mut fourth = Session::new(&model.weights, SessionOptions { ctx_len: 16, candidates: 1 }, LayerPlan::full(30)).unwrap();
    assert!(batch.step(&mut [&mut full, &mut third, &mut fourth], &[1, 2, 3]).is_err(), "over the capacity");
    assert!(batch.step(&mut [&mut full], &[99_999_999]).is_err(), "a token outside the vocabulary");
    assert_eq!(full.position(), 0);
}
