//! WGSL accessors for quantised weights ([`crate::gpu::WeightKind::Quant`]): the common part and
//! one section per block type, both in `shaders/quant.wgsl`.

use crate::model::quant::QuantType;

const SOURCE: &str = include_str!("../../shaders/quant.wgsl");

/// WGSL declaring read-only storage `var_name: array<vec4<u32>>` at `binding` holding blocks of `q` in
/// the GPU layout of [`crate::model::quant`], with the accessors `{v}_4(i) -> vec4<f32>` (values
/// 4i .. 4i+3), `{v}_1(i) -> f32`, `{v}_dot32(b, x0, .., x7) -> f32` (unit b against eight vec4
/// of x, scales applied once per half) and the pieces the prefill body uses, `{v}_scales(b)`,
/// `{v}_words(b)` and `{v}_pair_of(words, i)` (`shaders/quant.wgsl`). Shapes: a chunk of `[rows, K]` values,
/// K a multiple of the block size, unit b = values `32 b .. 32 b + 32` row-major.
pub fn declare(q: QuantType, binding: u32, var_name: &str) -> String {
    let mut parts = SOURCE.split("\n//== ");
    let common = parts.next().unwrap_or_default();
    let section = parts
        .find_map(|p| p.split_once('\n').filter(|(name, _)| name.trim() == q.name()).map(|(_, body)| body))
        .expect("every QuantType has a section in shaders/quant.wgsl");
    let min = matches!(q, QuantType::Q4_1 | QuantType::Q4_K);
    common
        .replace("%FORMAT%", section)
        .replace("%BINDING%", &binding.to_string())
        .replace("%MIN%", if min { "true" } else { "false" })
        .replace("VAR", var_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_declares_its_own_section() {
        for q in QuantType::ALL {
            let s = declare(q, 2, "w");
            assert!(s.contains("var<storage, read> w: array<vec4<u32>>"), "{q}");
            assert_eq!(s.matches("fn w_scales").count(), 1, "{q}");
            assert!(!["VAR", "%FORMAT%", "%MIN%", "%BINDING%", "//=="].iter().any(|p| s.contains(p)), "{q}");
        }
        assert!(declare(QuantType::Q6_K, 2, "w").contains("14u"));
        assert!(declare(QuantType::Q4_1, 2, "w").contains("const w_MIN: bool = true;"));
    }
}
