//! The router kernel against the CPU definition of a router ([`RouterLayer::probability`]).
//! They meet here: kernels do not depend on model files, nor model files on kernels.

use super::*;
use crate::gpu::{DType, test_context};
use crate::kernels::router::{BLOCK_ROWS, router_gate};
use crate::kernels::router_backward::{RouterF64, router_probability_f64};
use crate::kernels::testing::{random_vec, to_f64};
use crate::model::routers::tests::{random_file, values};

/// Hidden states `h [rows, d]` and a router of rank `r` with non-trivial weights.
fn case(rows: usize, d: usize, r: usize, seed: u64) -> (Vec<f32>, RouterLayer) {
    let nh = r.max(1);
    // A per-column offset so that the mean is not just noise.
    let offset = random_vec(d, seed);
    let h: Vec<f32> = random_vec(rows * d, seed + 1).iter().enumerate().map(|(i, v)| v + offset[i % d]).collect();
    let norm: Vec<f32> = random_vec(d, seed + 2).iter().map(|v| 1.0 + 0.5 * v).collect();
    let s1 = 2.0 / (d as f32).sqrt();
    let w1: Vec<f32> = random_vec(nh * d, seed + 3).iter().map(|v| v * s1).collect();
    let b1 = random_vec(nh, seed + 4);
    let s2 = 2.0 / (nh as f32).sqrt();
    let w2: Vec<f32> = random_vec(nh, seed + 5).iter().map(|v| v * s2).collect();
    let b2 = random_vec(1, seed + 6)[0];
    let layer = RouterLayer { norm, w1, b1, w2: (r > 0).then_some(w2), b2: (r > 0).then_some(b2) };
    (h, layer)
}

#[test]
fn router_matches_reference() {
    let ctx = test_context();
    let shapes =
        [(1, 7, 0), (1, 7, 3), (7, 257, 5), (64, 33, 1), (65, 33, 9), (257, 64, 16), (1757, 33, 0), (1757, 13, 7), (3000, 576, 64)];
    let mut probs_seen = Vec::new();
    for (i, &(rows, d, r)) in shapes.iter().enumerate() {
        let (h, layer) = case(rows, d, r, 1000 + 10 * i as u64);
        let w = upload_router(&ctx, "router", &layer, r, d, 1e-5).unwrap();
        let gh = GpuTensor::from_f32(&ctx, "h", &[rows, d], &h).unwrap();
        let probs = GpuTensor::from_f32(&ctx, "probs", &[4], &[-1.0; 4]).unwrap();
        let ds = router_gate(&ctx, "router", &gh, rows, &w, &probs, 2).unwrap();
        assert_eq!(ds.len(), if rows > BLOCK_ROWS { 2 } else { 1 });
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let got = probs.read_f32(&ctx).unwrap();
        let want = layer.probability(&h, rows, d, r, 1e-5);
        assert!((got[2] - want).abs() < 2e-5, "router T={rows} d={d} r={r}: got {}, want {want}", got[2]);
        assert_eq!([got[0], got[1], got[3]], [-1.0; 3], "other slots written: {got:?}");
        probs_seen.push(want);
    }
    // The cases must exercise the sigmoid away from its saturated ends.
    assert!(probs_seen.iter().filter(|p| **p > 0.05 && **p < 0.95).count() >= shapes.len() / 2, "{probs_seen:?}");
}

/// The f64 forward that the router backward's CPU reference differentiates is the router's CPU
/// definition.
#[test]
fn router_f64_reference_matches_probability() {
    for (i, &(rows, d, r)) in [(1, 7, 0), (3, 37, 5), (130, 37, 0), (70, 33, 9)].iter().enumerate() {
        let (h, layer) = case(rows, d, r, 500 + 10 * i as u64);
        let router = RouterF64 {
            norm: to_f64(&layer.norm),
            w1: to_f64(&layer.w1),
            b1: to_f64(&layer.b1),
            w2: layer.w2.as_deref().map_or(vec![], to_f64),
            b2: layer.b2.map_or(vec![], |b| vec![b as f64]),
        };
        let eps = 1e-5f32;
        let want = layer.probability(&h, rows, d, r, eps);
        let got = router_probability_f64(&router, eps as f64, &to_f64(&h), rows);
        assert!((got - want as f64).abs() < 1e-7, "T={rows} d={d} r={r}: {got} vs {want}");
    }
}

#[test]
fn router_rejects_bad_arguments() {
    let ctx = test_context();
    let (rows, d, r) = (3, 8, 2);
    let (h, layer) = case(rows, d, r, 5);
    let w = upload_router(&ctx, "router", &layer, r, d, 1e-5).unwrap();
    let gh = GpuTensor::from_f32(&ctx, "h", &[rows, d], &h).unwrap();
    let probs = GpuTensor::zeros(&ctx, "probs", DType::F32, &[2]).unwrap();
    assert!(router_gate(&ctx, "router", &gh, rows, &w, &probs, 2).is_err(), "slot out of range");
    assert!(router_gate(&ctx, "router", &gh, rows + 1, &w, &probs, 0).is_err(), "h too short");
    assert!(router_gate(&ctx, "router", &gh, 0, &w, &probs, 0).is_err(), "no rows");
    let no_w2 = RouterWeights { w2: None, ..w.clone() };
    assert!(router_gate(&ctx, "router", &gh, rows, &no_w2, &probs, 0).is_err(), "r > 0 without w2");
    assert!(router_gate(&ctx, "router", &gh, rows, &w, &probs, 1).is_ok());
}

/// The GPU router on uploaded file weights agrees with `probability_ref`.
#[test]
fn upload_matches_probability_ref() {
    let ctx = test_context();
    for rank in [0, 3] {
        let f = random_file(rank);
        let rows = 70; // > BLOCK_ROWS: both dispatches
        let h = values(rows * 8, 77);
        let gh = GpuTensor::from_f32(&ctx, "h", &[rows, 8], &h).unwrap();
        let probs = GpuTensor::from_f32(&ctx, "probs", &[5], &[-1.0; 5]).unwrap();
        for l in 0..5 {
            let Some(w) = GpuRouters::upload_layer(&ctx, &f, l).unwrap() else {
                assert_eq!(l, 2);
                continue;
            };
            let ds = router_gate(&ctx, "router", &gh, rows, &w, &probs, l).unwrap();
            ctx.run("router", &ds.iter().collect::<Vec<_>>()).unwrap();
        }
        let got = probs.read_f32(&ctx).unwrap();
        for (l, &g) in got.iter().enumerate() {
            match f.probability_ref(l, &h, rows).unwrap() {
                None => assert_eq!(g, -1.0),
                Some(want) => assert!((g - want).abs() < 2e-5, "rank {rank} layer {l}: {g} vs {want}"),
            }
        }
    }
    let f = random_file(3);
    assert!(GpuRouters::upload_layer(&ctx, &f, 5).is_err(), "layer out of range");
    let mut broken = f.clone();
    broken.layers[0].as_mut().unwrap().norm.pop();
    assert!(GpuRouters::upload_layer(&ctx, &broken, 0).is_err(), "short norm");
}
