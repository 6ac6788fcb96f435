use std::collections::BTreeMap;

use super::*;
use crate::model::config::ModelConfig;
use crate::model::weights::HostTensor;
use crate::testdata::TempDir;

fn identity(n_layers: usize, d: usize) -> ModelIdentity {
    ModelIdentity { arch: "llama".into(), n_layers, d_model: d, vocab_size: 100, weight_hash: "0123456789abcdef".into() }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Deterministic values in [-1, 1).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n).map(|_| 2.0 * unit_random(&mut state) - 1.0).collect()
}

/// A file with non-trivial weights everywhere and no router on layer 2.
pub(crate) fn random_file(rank: usize) -> RouterFile {
    let mut f = RouterFile::init(&identity(5, 8), rank, 1.0, 1e-5, 0.6);
    for (l, layer) in f.layers.iter_mut().enumerate() {
        let layer = layer.as_mut().unwrap();
        let s = 100 * l as u64;
        layer.norm = values(layer.norm.len(), s + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
        layer.w1 = values(layer.w1.len(), s + 2);
        layer.b1 = values(layer.b1.len(), s + 3);
        if let Some(w2) = &mut layer.w2 {
            *w2 = values(w2.len(), s + 4);
            layer.b2 = Some(values(1, s + 5)[0]);
        }
    }
    f.layers[2] = None;
    f.skip_first_last = true;
    f
}

/// (metadata, name -> (dtype, shape, bytes)) of a saved file, for hand-made broken variants.
type Raw = (HashMap<String, String>, BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>);

fn raw(file: &RouterFile, dir: &TempDir) -> Raw {
    let path = dir.path.join("raw-src.safetensors");
    file.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st.tensors().into_iter().map(|(name, v)| (name, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    (header.metadata().clone().unwrap(), tensors)
}

fn write_raw(path: &Path, (meta, tensors): &Raw) {
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (dt, shape, bytes))| (n.as_str(), safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta.clone())).unwrap()).unwrap();
}

/// Writes `raw` after `edit` and loads it for `identity(5, 8)`.
fn load_edited(dir: &TempDir, base: &Raw, edit: impl FnOnce(&mut Raw)) -> Result<RouterFile, RouterError> {
    let mut r = base.clone();
    edit(&mut r);
    let path = dir.path.join("edited.safetensors");
    write_raw(&path, &r);
    RouterFile::load(&path, &identity(5, 8))
}

#[test]
fn save_load_round_trip() {
    let dir = TempDir::new("routers-rt");
    for rank in [0, 3] {
        let f = random_file(rank);
        let path = dir.path.join(format!("r{rank}.safetensors"));
        f.save(&path).unwrap();
        let back = RouterFile::load(&path, &f.identity).unwrap();
        assert_eq!(back, f, "rank {rank}");
        assert_eq!(back.has_router(), vec![true, true, false, true, true]);
    }
}

#[test]
fn init_gives_sigmoid_of_bias() {
    let id = identity(3, 16);
    let h = values(5 * 16, 42);
    for rank in [0, 1, 4] {
        for bias in [2.0f32, -1.5, 0.0] {
            let f = RouterFile::init(&id, rank, bias, 1e-5, 0.5);
            assert_eq!(f.layers.len(), 3);
            assert!(!f.skip_first_last);
            for l in 0..3 {
                let p = f.probability_ref(l, &h, 5).unwrap().unwrap();
                assert!((p - sigmoid(bias)).abs() < 1e-6, "rank {rank} bias {bias} layer {l}: p = {p}");
            }
        }
        // Deterministic, and fc1 is not all zero for r > 0 (so training can start).
        let a = RouterFile::init(&id, rank, 1.0, 1e-5, 0.5);
        assert_eq!(a, RouterFile::init(&id, rank, 1.0, 1e-5, 0.5));
        let w1 = &a.layers[1].as_ref().unwrap().w1;
        assert_eq!(w1.iter().any(|v| *v != 0.0), rank > 0, "rank {rank}");
        assert!(w1.iter().all(|v| v.abs() <= 0.25), "|fc1| <= 1/sqrt(16)");
    }
}

#[test]
fn probability_ref_matches_the_formula_and_rejects_bad_input() {
    let f = random_file(3);
    let (rows, d) = (4, 8);
    let h = values(rows * d, 9);
    let r = f.layers[1].as_ref().unwrap();
    // by hand: mean, rmsnorm, silu MLP, sigmoid
    let mean: Vec<f32> = (0..d).map(|c| (0..rows).map(|t| h[t * d + c]).sum::<f32>() / rows as f32).collect();
    let rms = (mean.iter().map(|m| m * m).sum::<f32>() / d as f32 + f.eps).sqrt();
    let x: Vec<f32> = (0..d).map(|c| mean[c] / rms * r.norm[c]).collect();
    let mut z = r.b2.unwrap();
    for j in 0..3 {
        let a = r.b1[j] + (0..d).map(|c| r.w1[j * d + c] * x[c]).sum::<f32>();
        z += r.w2.as_ref().unwrap()[j] * a * sigmoid(a);
    }
    let p = f.probability_ref(1, &h, rows).unwrap().unwrap();
    assert!((p - sigmoid(z)).abs() < 1e-5, "{p} vs {}", sigmoid(z));
    assert!(p > 0.02 && p < 0.98, "not saturated: {p}");
    assert_eq!(f.probability_ref(2, &h, rows).unwrap(), None, "no router on layer 2");
    assert!(f.probability_ref(5, &h, rows).is_err(), "layer out of range");
    assert!(f.probability_ref(1, &h, rows + 1).is_err(), "h too short");
    assert!(f.probability_ref(1, &h[..0], 0).is_err(), "no rows");
    let mut broken = f.clone();
    broken.layers[1].as_mut().unwrap().w2 = None;
    assert!(broken.probability_ref(1, &h, rows).is_err(), "r > 0 without w2");
}

#[test]
fn file_for_another_model_is_rejected_naming_the_field() {
    let dir = TempDir::new("routers-model");
    let f = RouterFile::init(&identity(4, 8), 2, 1.0, 1e-5, 0.5);
    let path = dir.path.join("r.safetensors");
    f.save(&path).unwrap();
    type Change = Box<dyn Fn(&mut ModelIdentity)>;
    let cases: [(&str, Change, &str, &str); 5] = [
        ("model_layers", Box::new(|m| m.n_layers = 30), "4", "30"),
        ("model_hidden", Box::new(|m| m.d_model = 576), "8", "576"),
        ("model_vocab", Box::new(|m| m.vocab_size = 49152), "100", "49152"),
        ("model_arch", Box::new(|m| m.arch = "qwen2".into()), "llama", "qwen2"),
        ("model_weight_hash", Box::new(|m| m.weight_hash = "fedcba9876543210".into()), "0123456789abcdef", "fedcba9876543210"),
    ];
    for (field, change, file_value, model_value) in cases {
        let mut model = identity(4, 8);
        change(&mut model);
        let err = RouterFile::load(&path, &model).unwrap_err();
        match &err {
            RouterError::WrongModel { field: f, file_value: fv, model_value: mv, .. } => {
                assert!(f.starts_with(field), "{err}");
                assert_eq!((fv.as_str(), mv.as_str()), (file_value, model_value));
            }
            other => panic!("{field}: expected WrongModel, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(field) && msg.contains(file_value) && msg.contains(model_value), "{msg}");
        assert!(msg.contains("r.safetensors"), "{msg}");
    }
    assert!(RouterFile::load(&path, &identity(4, 8)).is_ok());
}

#[test]
fn broken_files_are_rejected() {
    let dir = TempDir::new("routers-broken");
    let base = raw(&random_file(3), &dir);
    assert!(load_edited(&dir, &base, |_| {}).is_ok(), "the unedited copy loads");

    // wrong shape
    let err = load_edited(&dir, &base, |(_, t)| {
        let e = t.get_mut("layers.1.fc1.weight").unwrap();
        e.1 = vec![4, 6]; // same number of values, wrong shape
    })
    .unwrap_err();
    assert!(
        matches!(&err, RouterError::Shape { tensor, expected, found, .. }
            if tensor == "layers.1.fc1.weight" && expected == &[3, 8] && found == &[4, 6]),
        "{err}"
    );
    // missing tensor of a layer that has the others
    let err = load_edited(&dir, &base, |(_, t)| {
        t.remove("layers.3.fc2.bias");
    })
    .unwrap_err();
    assert!(matches!(&err, RouterError::MissingTensor { tensor, .. } if tensor == "layers.3.fc2.bias"), "{err}");
    // tensors that are not part of the format
    for (name, why) in [("layers.5.norm.weight", "5 layers"), ("layers.0.fc.weight", "rank 3"), ("extra", "layers.")] {
        let err = load_edited(&dir, &base, |(_, t)| {
            t.insert(name.into(), (Dtype::F32, vec![1], vec![0; 4]));
        })
        .unwrap_err();
        assert!(matches!(&err, RouterError::UnexpectedTensor { tensor, .. } if tensor == name), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
    // unsupported dtype and non-finite values
    let err = load_edited(&dir, &base, |(_, t)| {
        t.insert("layers.0.fc2.bias".into(), (Dtype::I32, vec![1], vec![0; 4]));
    })
    .unwrap_err();
    assert!(matches!(&err, RouterError::Dtype { tensor, .. } if tensor == "layers.0.fc2.bias"), "{err}");
    let err = load_edited(&dir, &base, |(_, t)| {
        t.get_mut("layers.4.norm.weight").unwrap().2[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    })
    .unwrap_err();
    assert!(matches!(&err, RouterError::NonFinite { tensor, index: 2, .. } if tensor == "layers.4.norm.weight"), "{err}");

    // metadata
    let bad_values = [
        ("format", "safetensors"),
        ("version", "2"),
        ("hidden_size", "eight"),
        ("hidden_size", "9"),
        ("num_layers", "-5"),
        ("router_rank", "3.0"),
        ("pooling", "max"),
        ("norm", "layernorm"),
        ("norm_eps", "0"),
        ("norm_eps", "abc"),
        ("threshold", "1.5"),
        ("threshold", "NaN"),
        ("skip_first_last", "yes"),
        ("model_layers", "many"),
        ("model_weight_hash", "0123456789ABCDEF"),
    ];
    for (key, value) in bad_values {
        let err = load_edited(&dir, &base, |(m, _)| {
            m.insert(key.into(), value.into());
        })
        .unwrap_err();
        assert!(matches!(&err, RouterError::BadValue { key: k, .. } if k == key), "{key} = {value}: {err}");
        assert!(err.to_string().contains(key) && err.to_string().contains(value), "{err}");
    }
    let err = load_edited(&dir, &base, |(m, _)| {
        m.insert("router_rank".into(), (MAX_RANK + 1).to_string());
    })
    .unwrap_err();
    assert!(matches!(&err, RouterError::Limit { .. }), "{err}");
    for key in ["format", "threshold", "skip_first_last", "model_weight_hash", "norm_eps"] {
        let err = load_edited(&dir, &base, |(m, _)| {
            m.remove(key);
        })
        .unwrap_err();
        assert!(matches!(&err, RouterError::MissingKey { key: k, .. } if k == key), "{key}: {err}");
    }
    // unknown metadata keys are allowed
    assert!(
        load_edited(&dir, &base, |(m, _)| {
            m.insert("trained_on".into(), "alpaca".into());
        })
        .is_ok()
    );

    // not a safetensors file, no file at all, no metadata
    let junk = dir.path.join("junk.safetensors");
    std::fs::write(&junk, b"hello").unwrap();
    assert!(matches!(RouterFile::load(&junk, &identity(5, 8)), Err(RouterError::SafeTensors { .. })));
    assert!(matches!(RouterFile::load(&dir.path.join("none"), &identity(5, 8)), Err(RouterError::Io { .. })));
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = Vec::new();
    std::fs::write(&junk, safetensors::serialize(views, None).unwrap()).unwrap();
    assert!(matches!(RouterFile::load(&junk, &identity(5, 8)), Err(RouterError::Format { .. })));
}

#[test]
fn half_precision_tensors_are_converted() {
    let dir = TempDir::new("routers-f16");
    let f = random_file(3);
    let mut base = raw(&f, &dir);
    for (i, (_, (dt, _, bytes))) in base.1.iter_mut().enumerate() {
        let v: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if i % 2 == 0 {
            *dt = Dtype::F16;
            *bytes = v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
        } else {
            *dt = Dtype::BF16;
            *bytes = v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
        }
    }
    let back = load_edited(&dir, &base, |_| {}).unwrap();
    for (a, b) in back.layers.iter().zip(&f.layers) {
        let (Some(a), Some(b)) = (a, b) else {
            assert_eq!(a.is_none(), b.is_none());
            continue;
        };
        for (x, y) in a.w1.iter().zip(&b.w1).chain(a.norm.iter().zip(&b.norm)) {
            assert!((x - y).abs() <= 1e-2 * (1.0 + y.abs()), "{x} vs {y}");
        }
        assert_ne!(a.w1, b.w1, "values went through half precision");
    }
}

#[test]
fn save_rejects_inconsistent_files() {
    let dir = TempDir::new("routers-save");
    let path = dir.path.join("r.safetensors");
    let good = random_file(2);
    type Change = Box<dyn Fn(&mut RouterFile)>;
    let cases: [(&str, Change); 7] = [
        (
            "slots",
            Box::new(|f| {
                f.layers.pop();
            }),
        ),
        ("hidden", Box::new(|f| f.hidden = 7)),
        ("threshold", Box::new(|f| f.threshold = 2.0)),
        ("eps", Box::new(|f| f.eps = f32::NAN)),
        ("values", Box::new(|f| f.layers[0].as_mut().unwrap().b1.push(0.0))),
        ("layers.1.fc2.weight", Box::new(|f| f.layers[1].as_mut().unwrap().w2 = None)),
        ("weight hash", Box::new(|f| f.identity.weight_hash = "xyz".into())),
    ];
    for (what, change) in cases {
        let mut f = good.clone();
        change(&mut f);
        let err = f.save(&path).unwrap_err();
        assert!(matches!(err, RouterError::Invalid { .. }) && err.to_string().contains(what), "{what}: {err}");
        assert!(!path.exists(), "nothing written");
    }
}

#[test]
fn fnv1a_matches_the_reference_values() {
    assert_eq!(fnv1a64_f32(&[]), 0xcbf2_9ce4_8422_2325);
    // Bytes "abcdefgh" as two little-endian f32 bit patterns; FNV-1a 64 of "abcdefgh".
    let v = [f32::from_bits(u32::from_le_bytes(*b"abcd")), f32::from_bits(u32::from_le_bytes(*b"efgh"))];
    assert_eq!(fnv1a64_f32(&v), 0x25da_8c18_36a8_d66d);
    assert_eq!(fnv1a64_f32(&[1.0, -2.5]), 0x09e6_29ee_2dfd_b3f8);
}

/// A two-tensor weight source for `model_identity`.
struct FakeSource {
    config: ModelConfig,
    norm: Vec<f32>,
    embed: Vec<f32>,
}

impl WeightSource for FakeSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn get(&self, name: &str) -> Result<HostTensor, ModelError> {
        let (shape, data) = match name {
            "model.norm.weight" => (vec![self.norm.len()], self.norm.clone()),
            "model.embed_tokens.weight" => (vec![self.embed.len() / self.config.d_model, self.config.d_model], self.embed.clone()),
            _ => return Err(ModelError::MissingTensor { path: "fake".into(), tensor: name.into() }),
        };
        Ok(HostTensor { name: name.into(), shape, data })
    }
    fn has(&self, name: &str) -> bool {
        self.get(name).is_ok()
    }
    fn describe_dtypes(&self) -> String {
        "F32 x2".into()
    }
    fn total_param_bytes(&self) -> u64 {
        0
    }
}

fn fake(d: usize, vocab: usize) -> FakeSource {
    let config = ModelConfig {
        arch: Arch::Qwen2,
        n_layers: 3,
        d_model: d,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: d,
        d_ff: 2 * d,
        vocab_size: vocab,
        rms_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position: 64,
        tied_embeddings: true,
        qkv_bias: true,
        name: "fake".into(),
    };
    FakeSource { config, norm: vec![1.0, -2.5], embed: (0..d * vocab).map(|i| i as f32).collect() }
}

#[test]
fn model_identity_hashes_norm_then_first_embedding_row() {
    let src = fake(2, 5);
    let id = model_identity(&src).unwrap();
    let want = fnv1a64_f32(&[1.0, -2.5, 0.0, 1.0]);
    assert_eq!(id, ModelIdentity { arch: "qwen2".into(), n_layers: 3, d_model: 2, vocab_size: 5, weight_hash: format!("{want:016x}") });
    // other embedding rows do not matter; the first row does
    let mut other = fake(2, 5);
    other.embed[9] = 42.0;
    assert_eq!(model_identity(&other).unwrap(), id);
    other.embed[1] = 42.0;
    assert_ne!(model_identity(&other).unwrap().weight_hash, id.weight_hash);
    // a norm of the wrong length is an error, not a panic
    let mut bad = fake(2, 5);
    bad.norm.push(0.0);
    assert!(matches!(model_identity(&bad), Err(ModelError::BadTensor { .. })));
}

/// SmolLM2-135M-Instruct Q4_1: 30 layers of 576, vocabulary 49152.
#[test]
fn real_model_identity_is_stable_and_init_round_trips() {
    let source = crate::model::open_model(&crate::testdata::model_path()).unwrap();
    let id = model_identity(source.as_ref()).unwrap();
    assert_eq!((id.arch.as_str(), id.n_layers, id.d_model, id.vocab_size), ("llama", 30, 576, 49152));
    assert!(is_weight_hash(&id.weight_hash), "{}", id.weight_hash);
    assert_eq!(model_identity(source.as_ref()).unwrap(), id, "same value twice");
    assert_eq!(id.weight_hash, REAL_MODEL_HASH, "the identity of the test model changed");

    let dir = TempDir::new("routers-real");
    let path = dir.path.join("smollm2.safetensors");
    let f = RouterFile::init(&id, 32, 3.0, 1e-5, 0.5);
    f.save(&path).unwrap();
    assert_eq!(RouterFile::load(&path, &id).unwrap(), f);
}

/// `model_weight_hash` of the test model (pinned: a change means router files made for it stop
/// loading). Checked independently with gguf-py: `GGUFReader` + `quants.dequantize` of
/// `output_norm.weight` and row 0 of `token_embd.weight`, FNV-1a over the little-endian f32 bytes.
const REAL_MODEL_HASH: &str = "9fd26cb913e67e54";

#[test]
fn static_plan_file_round_trips_and_fixes_every_decision() {
    let dir = TempDir::new("routers-static");
    let id = identity(5, 8);
    let h = values(3 * 8, 7);
    for (skip, first_last) in [(vec![], false), (vec![3, 1], false), (vec![0, 2, 4], true), (vec![4], true)] {
        let f = RouterFile::static_plan(&id, &skip).unwrap();
        let mut sorted = skip.clone();
        sorted.sort_unstable();
        assert_eq!(f.static_skip.as_deref(), Some(&sorted[..]));
        assert_eq!((f.rank, f.threshold, f.skip_first_last), (0, 0.5, first_last), "{skip:?}");
        for l in 0..5 {
            let p = f.probability_ref(l, &h, 3).unwrap().unwrap();
            assert_eq!(p < 0.5, sorted.contains(&l), "{skip:?} layer {l}: p = {p}");
        }
        let path = dir.path.join("static.safetensors");
        f.save(&path).unwrap();
        assert_eq!(RouterFile::load(&path, &id).unwrap(), f);
    }
    assert_eq!(RouterFile::static_plan(&id, &[2, 2]).unwrap().static_skip, Some(vec![2]));
    let err = RouterFile::static_plan(&id, &[5]).unwrap_err().to_string();
    assert!(err.contains("layer 5") && err.contains("5 layers"), "{err}");
    // a routed file has no static_skip key
    let path = dir.path.join("routed.safetensors");
    random_file(0).save(&path).unwrap();
    let (meta, _) = raw(&random_file(0), &dir);
    assert!(!meta.contains_key("static_skip"));
    assert_eq!(RouterFile::load(&path, &id).unwrap().static_skip, None);
}

#[test]
fn static_plan_file_that_disagrees_with_its_routers_is_refused() {
    let dir = TempDir::new("routers-static-bad");
    let base = raw(&RouterFile::static_plan(&identity(5, 8), &[1, 3]).unwrap(), &dir);
    let set = |key: &'static str, value: &'static str| move |r: &mut Raw| drop(r.0.insert(key.into(), value.into()));
    let tensor = |name: &'static str, values: Vec<f32>| {
        move |r: &mut Raw| {
            r.1.get_mut(name).unwrap().2 = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
    };
    type Edit = Box<dyn FnOnce(&mut Raw)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(set("static_skip", "1,5")), "below num_layers = 5"),
        (Box::new(set("static_skip", "3,1")), "increasing"),
        (Box::new(set("static_skip", "1,,3")), "comma-separated"),
        (Box::new(set("static_skip", " 1")), "comma-separated"),
        (Box::new(set("static_skip", "1")), "does not list layer 3"),
        (Box::new(set("static_skip", "1,2,3")), "lists layer 2"),
        (Box::new(set("static_skip", "0,1,3")), "skip_first_last is false"),
        (Box::new(set("threshold", "1")), "does not list layer 0"),
        (Box::new(tensor("layers.3.fc.bias", vec![2.0])), "layers.3.fc.bias = 2"),
        (Box::new(tensor("layers.2.fc.weight", vec![0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])), "layers.2.fc.weight is not all zero"),
        (
            Box::new(|r: &mut Raw| {
                r.1.retain(|name, _| !name.starts_with("layers.4."));
            }),
            "layer 4 has none",
        ),
    ];
    for (edit, want) in cases {
        let err = load_edited(&dir, &base, edit).unwrap_err().to_string();
        assert!(err.contains("edited.safetensors") && err.contains("static_skip") && err.contains(want), "want {want:?}: {err}");
    }
    // the empty list is a plan of no skipped layer: every router must keep its layer
    let none = raw(&RouterFile::static_plan(&identity(5, 8), &[]).unwrap(), &dir);
    assert_eq!(load_edited(&dir, &none, |_| {}).unwrap().static_skip, Some(vec![]));
    let err = load_edited(&dir, &none, tensor("layers.2.fc.bias", vec![-1.0])).unwrap_err().to_string();
    assert!(err.contains("does not list layer 2"), "{err}");
    // a static plan needs linear routers
    let mut ranked = random_file(2);
    ranked.static_skip = Some(vec![]);
    let err = ranked.save(&dir.path.join("ranked.safetensors")).unwrap_err().to_string();
    assert!(err.contains("router_rank 0"), "{err}");
}
