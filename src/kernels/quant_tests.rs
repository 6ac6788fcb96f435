//! The linear kernels and the embedding lookup on quantised weights
//! ([`crate::gpu::WeightKind::Quant`]) against the CPU dequantiser (`model::dequant`, checked
//! against gguf-py) times an f64 product: every block type, both products, every variant.

use crate::gpu::{DType, Dispatch, GpuContext, GpuMatrix, GpuOptions, GpuTensor, MatrixPart, test_context};
use crate::kernels::embedding::{embedding, embedding_ref};
use crate::kernels::linear::LinearOp;
use crate::kernels::matmul::{MatmulVariant, XBCAST_QUANT_MAX_ROWS, matmul, matmul_ref, xbcast_window};
use crate::kernels::matvec::{MatvecVariant, matvec, matvec_ref};
use crate::kernels::testing::{assert_close, random_blocks, random_vec};
use crate::model::QuantType;

/// Reduction lengths per type: multiples of the block size, including ones that are not a
/// multiple of the workgroup width (64) or of 8 units.
fn ks(q: QuantType) -> &'static [usize] {
    if q.block_elems() == 256 { &[256, 768] } else { &[32, 96, 576] }
}

fn run(ctx: &GpuContext, ds: &[Dispatch]) {
    ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
}

/// Which product a check runs.
#[derive(Debug, Clone, Copy)]
enum Product {
    Matvec(MatvecVariant),
    Matmul(MatmulVariant),
}

/// One product of `t` rows of x with a random `[n, k]` matrix of `q` blocks (with a bias, added
/// into y from column 3 when `accumulate`), compared with the dequantised f64 reference.
fn check(ctx: &GpuContext, q: QuantType, t: usize, n: usize, k: usize, accumulate: bool, product: Product) {
    let seed = (n * 131 + k * 7 + t) as u64;
    let blocks = random_blocks(q, n, k, seed);
    let wv = blocks.dequantize().unwrap();
    let w = GpuMatrix::upload_parts(ctx, "w", k, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
    assert_eq!(w.format(), q.name());
    let x = random_vec(t * k, seed + 1);
    let b = random_vec(n, seed + 2);
    let col0 = if accumulate { 3 } else { 0 };
    let stride = col0 + n + 1;
    let y0 = random_vec(t * stride, seed + 3);
    let gx = GpuTensor::from_f32(ctx, "x", &[t * k], &x).unwrap();
    let gb = GpuTensor::from_f32(ctx, "b", &[n], &b).unwrap();
    let gy = GpuTensor::from_f32(ctx, "y", &[y0.len()], &y0).unwrap();
    let op = LinearOp::new(&gx, t, &w, &gy).bias(Some(&gb)).y_col0(col0).y_stride(stride).accumulate(accumulate);
    let what = match product {
        Product::Matvec(v) => {
            run(ctx, &matvec(ctx, "mv", &op, v).unwrap());
            format!("matvec {v:?} {q} n={n} k={k}")
        }
        Product::Matmul(v) => {
            if v == MatmulVariant::XBcast {
                // The quantised XBcast body runs where rows of x are aligned uniform windows,
                // up to XBCAST_QUANT_MAX_ROWS rows; RegBlock runs instead otherwise.
                let kind = op.check(ctx, "mm").unwrap();
                let aligned = (4 * k).is_multiple_of(ctx.limits.min_uniform_buffer_offset_alignment as usize);
                let applies = aligned && t <= XBCAST_QUANT_MAX_ROWS;
                assert_eq!(xbcast_window(ctx, &op, kind).is_some(), applies, "xbcast {q} t={t} k={k}");
            }
            run(ctx, &matmul(ctx, "mm", &op, v).unwrap());
            format!("matmul {v:?} {q} t={t} n={n} k={k}")
        }
    };
    let r = matmul_ref(&x, t, &wv, n, k, Some(&b));
    let mut want = y0.clone();
    for row in 0..t {
        for j in 0..n {
            let i = row * stride + col0 + j;
            want[i] = if accumulate { want[i] + r[row * n + j] } else { r[row * n + j] };
        }
    }
    let scale = wv.iter().fold(0f32, |a, v| a.max(v.abs()));
    let atol = 2e-5 * (k as f32).sqrt() * scale * 4.0;
    assert_close(&gy.read_f32(ctx).unwrap(), &want, atol, 1e-5, &what);
}

#[test]
fn quant_matvec_matches_dequantised_reference() {
    let ctx = test_context();
    for q in QuantType::ALL {
        for &k in ks(q) {
            for n in [1, 7, 257, 1757] {
                for v in MatvecVariant::available(&ctx) {
                    check(&ctx, q, 1, n, k, n == 7, Product::Matvec(v));
                }
            }
        }
    }
}

#[test]
fn quant_matmul_matches_dequantised_reference() {
    let ctx = test_context();
    for q in QuantType::ALL {
        for &k in ks(q) {
            for (t, n) in [(1, 7), (3, 257), (9, 1757), (17, 1), (40, 33)] {
                check(&ctx, q, t, n, k, t == 3, Product::Matmul(MatmulVariant::RegBlock));
            }
        }
        let k = ks(q)[1];
        for v in MatmulVariant::available(&ctx).into_iter().filter(|&v| v != MatmulVariant::RegBlock) {
            for (t, n) in [(5, 7), (70, 257)] {
                check(&ctx, q, t, n, k, t == 5, Product::Matmul(v));
            }
        }
        // The quantised XBcast body itself (windows of 8 rows, several per dispatch where the
        // uniform limit allows, the last overlapping), on a K whose rows of x are aligned windows,
        // and RegBlock past XBCAST_QUANT_MAX_ROWS.
        let k = *ks(q).last().unwrap();
        for (t, n) in [(37, 257), (XBCAST_QUANT_MAX_ROWS + 1, 9)] {
            check(&ctx, q, t, n, k, t == 37, Product::Matmul(MatmulVariant::XBcast));
        }
    }
}

/// A stack of parts of different types (Q4_K q and k with Q6_K v and an f16 part), split into
/// several chunks by a small binding limit, read chunk by chunk by both products and the
/// embedding lookup.
#[test]
fn mixed_stack_is_read_chunk_by_chunk() {
    let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
    let k = 256;
    let a = random_blocks(QuantType::Q4_K, 40, k, 1);
    let b = random_blocks(QuantType::Q6_K, 24, k, 2);
    let c = random_vec(9 * k, 3);
    let w = GpuMatrix::upload_parts(
        &ctx,
        "w",
        k,
        &[MatrixPart::Blocks(&a), MatrixPart::Blocks(&b), MatrixPart::Dense { rows: 9, data: &c }],
        DType::F16,
    )
    .unwrap();
    assert!(w.chunks.len() > 3, "{} chunks", w.chunks.len());
    assert_eq!((w.rows, w.format().as_str()), (73, "q4_k+q6_k+f16"));
    let mut wv = a.dequantize().unwrap();
    wv.extend(b.dequantize().unwrap());
    wv.extend(crate::kernels::testing::round_f16(&c));
    for t in [1usize, 3] {
        let x = random_vec(t * k, 4);
        let gx = GpuTensor::from_f32(&ctx, "x", &[t * k], &x).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[t * 73]).unwrap();
        let op = LinearOp::new(&gx, t, &w, &gy);
        let ds = if t == 1 {
            matvec(&ctx, "mv", &op, MatvecVariant::Rows).unwrap()
        } else {
            matmul(&ctx, "mm", &op, MatmulVariant::RegBlock).unwrap()
        };
        run(&ctx, &ds);
        let want = if t == 1 { matvec_ref(&x, &wv, 73, k, None) } else { matmul_ref(&x, t, &wv, 73, k, None) };
        assert_close(&gy.read_f32(&ctx).unwrap(), &want, 1e-3, 1e-4, &format!("mixed stack t={t}"));
    }
    for ids in [[0u32, 39, 40], [63, 64, 72]] {
        let gids = GpuTensor::from_u32(&ctx, "ids", &[ids.len()], &ids).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[ids.len() * k]).unwrap();
        run(&ctx, &embedding(&ctx, "emb", &gids, ids.len(), &w, &out).unwrap());
        let want = embedding_ref(&ids, &wv, k, &vec![0.0; ids.len() * k]);
        assert_eq!(out.read_f32(&ctx).unwrap(), want, "embedding rows {ids:?} of a mixed stack");
    }
}

#[test]
fn quant_embedding_reads_blocks() {
    let ctx = test_context();
    for q in QuantType::ALL {
        let (vocab, d) = (37, ks(q)[0]);
        let blocks = random_blocks(q, vocab, d, 9);
        let table = GpuMatrix::upload_parts(&ctx, "table", d, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
        let ids = [3u32, 0, 36, 3, 99];
        let gids = GpuTensor::from_u32(&ctx, "ids", &[ids.len()], &ids).unwrap();
        let before = random_vec(ids.len() * d, 10);
        let out = GpuTensor::from_f32(&ctx, "out", &[before.len()], &before).unwrap();
        run(&ctx, &embedding(&ctx, "emb", &gids, ids.len(), &table, &out).unwrap());
        let want = embedding_ref(&ids, &blocks.dequantize().unwrap(), d, &before);
        assert_close(&out.read_f32(&ctx).unwrap(), &want, 1e-6, 1e-6, &format!("embedding {q}"));
    }
}

#[test]
fn quant_weights_report_their_bytes() {
    let ctx = test_context();
    for q in QuantType::ALL {
        let k = ks(q)[1];
        let blocks = random_blocks(q, 10, k, 1);
        let w = GpuMatrix::upload_parts(&ctx, "w", k, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
        assert_eq!(w.byte_len(), (q.gpu_words_len(10 * k / q.block_elems()) * 4) as u64);
        assert!(w.byte_len() as f64 <= blocks.data.len() as f64 * 1.1, "{q}: {} vs {}", w.byte_len(), blocks.data.len());
    }
}
