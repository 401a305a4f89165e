//! Random weights for a model graph, as transformers initialises a MiniMax model: every matrix and embedding
//! drawn from `N(0, initializer_range²)`, every norm weight 1. Deterministic in the seed, for benchmarks and
//! tests that need a model without a checkpoint.

use fulgur_ir::{Buffer, Graph, Op, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;

/// A small deterministic generator (SplitMix64) with normal draws by Box–Muller.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Elements per independently seeded stream of a parameter's values.
const CHUNK: usize = 1 << 16;

/// Weights for every parameter of `g`: norm weights (names containing `norm`) are ones, the others
/// `N(0, std²)`, rounded to the parameter's dtype. Parameters must have constant shapes.
pub fn random_weights(g: &Graph, std: f64, seed: u64) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for id in g.params() {
        let Op::Param { name, ty } = &g.node(id).op else {
            continue;
        };
        let shape = ty.shape.as_consts().unwrap_or_default();
        let n: usize = shape.iter().product();
        // one stream per parameter, so a weight does not change when another is added
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let data: Vec<f64> = if name.contains("norm") {
            vec![1.0; n]
        } else {
            // chunks of their own streams, drawn in parallel: the same values on any number of threads
            let mut data = vec![0.0; n];
            data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, part)| {
                let mut rng = Rng(seed ^ h ^ (c as u64).wrapping_mul(0xd134_2543_de82_ef95));
                for x in part.iter_mut() {
                    *x = fulgur_ir::tensor::round_to(ty.dtype, rng.normal() * std);
                }
            });
            data
        };
        out.insert(
            name.clone(),
            Tensor {
                dtype: ty.dtype,
                shape,
                data: Buffer::F(data),
            },
        );
    }
    out
}

/// Random token ids in `[0, vocab)`, `[batch, seq]` i64.
pub fn random_tokens(batch: usize, seq: usize, vocab: usize, seed: u64) -> Tensor {
    let mut rng = Rng(seed ^ 0x7365_7175_656e_6365);
    let ids = (0..batch * seq)
        .map(|_| (rng.next_u64() % vocab.max(1) as u64) as i64)
        .collect();
    Tensor::from_i64(fulgur_ir::DType::I64, vec![batch, seq], ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulgur_ir::{DType, Dim};

    #[test]
    fn weights_follow_the_init() {
        let mut g = Graph::new("g");
        let w = g
            .param("layer.weight", DType::F32, vec![Dim::from(700), Dim::from(300)])
            .unwrap();
        let n = g
            .param("input_layernorm.weight", DType::F32, vec![Dim::from(300)])
            .unwrap();
        let y = g.mul(w, n).unwrap();
        g.add_output("y", y).unwrap();
        let ws = random_weights(&g, 0.02, 7);
        let v = ws["layer.weight"].to_f64();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((sd - 0.02).abs() < 1e-3, "{sd}");
        assert!(ws["input_layernorm.weight"].to_f64().iter().all(|&x| x == 1.0));
        assert_eq!(random_weights(&g, 0.02, 7)["layer.weight"].to_f64(), v);
        // the same values whatever the number of threads drawing them
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(one.install(|| random_weights(&g, 0.02, 7))["layer.weight"].to_f64(), v);
        let t = random_tokens(2, 5, 10, 1);
        assert_eq!(t.shape, vec![2, 5]);
        assert!(t.to_i64().iter().all(|&x| (0..10).contains(&x)));
    }
}
