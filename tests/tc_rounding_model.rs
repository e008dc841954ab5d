//! A CPU model of the rounding that the f16 tensor-core backward (`kernels/grad_tc.cu`) applies,
//! at realistic face-recognition logits: s = 64, C = 200,000 classes, target cosines of a
//! mid-training batch, non-target cosines ~ N(0, 0.05^2). Most softmax values then lie far below
//! f16's smallest normal (6.1e-5), many below its smallest subnormal (6e-8). The question is
//! whether dx and dw still meet docs/MATH.md's f16 bar (normwise 5e-3) and how each dW row fares.
//!
//! What the model copies from the kernels (grad_tc.cu line numbers):
//! - the unit gradient e_ij = (softmax - onehot) dtarget/dc in f32 from the saved lse
//!   (`fm_grad_elem`, tile.cuh 129-139), with z = r t, t = c off the target;
//! - dx (`fm_grad_x_tc`): e rounded to f16 with no scale (416); the partner tile scaled in place
//!   to wh_j = f16(w_j * (1/|w_j|)) (422, `fm_gt_scale_partner` 253-254); the target entry e_iy
//!   kept in f32 and added as fmaf(e_iy, w_yd / |w_y|, out) before the tile's product (425-449);
//!   f32 accumulation over the class split (451), partials times r_i g_i (460-475); proj_i =
//!   sum e c in f32 from the unrounded e (408, 484); `fm_x_finish` (normalize.cu 70-79) sums the
//!   splits in split order and applies the normalization backward in f32;
//! - dw (`fm_grad_w_tc`): K = the power of two from `fm_grad_scale` (129-131: frexp, so K > max
//!   |r g|); the partner tile scaled in place to f16(x_i * (1/|x_i|) r_i g_i / K) (632, 253-254);
//!   per class row a running power of two 2^k_j, k_j = min over row tiles of `fm_gt_exp_for`(max
//!   |e| of the tile, target included) (647, 307-313), accumulators rescaled when k_j drops
//!   (664-673); es = f16(e 2^k_j) (653); the target entry in f32 as fmaf(e_iy pscale_i 2^k_j,
//!   x_id, out) before the product (677-709); dwh = K (out 2^-k_j), then the normalization
//!   backward with proj_j from the unrounded e in f32 (609, 720-753).
//!
//! (The bf16 kernels instead fold the partner factor into e before rounding it and leave the tile
//! as given; this model is of the f16 kernels, whose rounding the resident-tile rewrite kept.)
//!
//! What it does not model: the cosines come from a generator, not from the vectors (S is f32 on
//! the tensor cores; its error is shared with the SIMT path and far below f16's), the vectors
//! used in the products are random f16 directions in D = 16 (independent of the cosines, which
//! is how real embeddings in D = 512 look to a non-target class; `w_mean` adds a common
//! direction as a stress case), and the tensor cores' internal f32 accumulation order (modelled
//! as sequential f32 adds; the product of two f16 is exact in f32). The forward's lse is the f64
//! value rounded to f32; the loss is ArcFace (m 0.5, s 64) under the mean reduction.
//!
//! Variants besides the kernel as written (`DX_VARIANTS`, `DW_VARIANTS`): for dx a per-row
//! running power of two on e (the dw kernel's rule with the roles swapped, per class split; and
//! one whose maximum leaves out the target entry, which is added in f32 anyway), bf16 operands
//! (e and the wh chunk both bf16: mma.sync takes one type), f32 operands (no 16-bit rounding: the
//! model's floor, and what the SIMT kernels share), and an accurate target entry
//! expm1(-l_i) dtarget/dc with l_i = log1p(S_nt / e^z_iy) computed without cancellation, alone
//! and with the row scale; for dw the kernel without its class scale, f32 operands, and the
//! accurate target entry.
//!
//! Findings (each test states its numbers): at the realistic mid-training logits every bar holds
//! with a wide margin, for dx and dw. dx's e has no row scale, so half of its entries flush to 0,
//! which costs little while the lost mass points in random directions, grows with C when the
//! class weights share a direction, and breaks the bar in a converged batch (p_iy ~ 1) together
//! with the f32 target entry expf(z - lse) - 1, which cannot resolve 1 - p_iy below ~1e-4 and
//! breaks dw there too (the `#[ignore]`d tests record those failures).
//!
//! Run with `cargo test --release --test tc_rounding_model -- --nocapture` to see the numbers.

use fused_margin::math::{self, RowMargin};
use fused_margin::MarginLoss;
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::HashSet;
use std::f64::consts::PI;
use std::sync::OnceLock;

/// Partner rows per tile (FM_G_GT_PN, kernels/geometry.cuh): classes per dx tile, rows per dw tile.
const PN: usize = 64;
/// FM_GT_KMAX (grad_tc.cu 307).
const KMAX: i32 = 125;
/// docs/MATH.md's f16 bar for dx and dw (normwise relative error).
const F16_BAR: f64 = 5e-3;

// ---- seeded, counter-based randomness (so the cosines need no B x C buffer) -------------------

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in (0, 1).
fn uniform(key: u64, idx: u64) -> f64 {
    ((mix(key ^ idx) >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal number `idx` of stream `key` (Box-Muller).
fn normal(key: u64, idx: u64) -> f64 {
    let u1 = uniform(key, 2 * idx);
    let u2 = uniform(key, 2 * idx + 1);
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

// ---- the kernels' scalar operations ----------------------------------------------------------

/// cvt.rn.f16.f32 (round to nearest even, subnormals kept, below 2^-25 to zero).
fn h16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// cvt.rn.bf16.f32.
fn b16(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// `fm_gt_pow2`: 2^k, k in [-126, 127].
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// `fm_gt_exp_for`: the k with m 2^k < 1 (and >= 1/2), clamped to [-126, KMAX].
fn exp_for(m: f32) -> i32 {
    let e = ((m.to_bits() >> 23) & 0xff) as i32;
    if e == 0xff {
        return KMAX;
    }
    (126 - e.max(1)).clamp(-126, KMAX)
}

// ---- the problem ------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Scenario {
    b: usize,
    c: usize,
    d: usize,
    /// Class splits of the dx kernel (the plan's choice on an H200 for these shapes: 64).
    nsplit: usize,
    /// Target cosines uniform in [tgt_lo, tgt_hi].
    tgt_lo: f64,
    tgt_hi: f64,
    /// Non-target cosines ~ N(0, sigma^2).
    sigma: f64,
    /// Added to the first entry of every class row (entries ~ N(0, 1)): a common direction of the
    /// class weights, so that what the f16 operand flushes (always positive mass) adds up
    /// coherently instead of in random directions.
    w_mean: f64,
    seed: u64,
}

struct Problem {
    sc: Scenario,
    s: f64,
    labels: Vec<usize>,
    tgt_c: Vec<f32>,
    tt32: Vec<f32>,
    tdt32: Vec<f32>,
    tt64: Vec<f64>,
    tdt64: Vec<f64>,
    /// x as f16 values, B x D, and its norms.
    x: Vec<f32>,
    xnorm64: Vec<f64>,
    inv_x32: Vec<f32>,
    lse64: Vec<f64>,
    lse32: Vec<f32>,
    /// 1 - p_iy in f64 (from the non-target sum: no cancellation).
    q64: Vec<f64>,
    /// The target entry from an accurate row loss: expm1(-f32(l_i)) dt, l_i = log1p(S_nt / e^z_y).
    e_acc32: Vec<f32>,
    coef32: f32,
    coef64: f64,
    k_scale: f32,
    /// dw's chunk factor pscale_i = (1/|x_i|) r_i g_i / K, and the chunk x_id pscale_i (f32;
    /// the kernel rounds it to f16).
    pscale: Vec<f32>,
    xchunk32: Vec<f32>,
    xchunk16: Vec<f32>,
    key_c: u64,
    key_w: u64,
}

impl Problem {
    fn new(sc: Scenario) -> Self {
        let spec = MarginLoss::arcface(0.5).scale(64.0);
        let rm = RowMargin::uniform(&spec);
        let (b, c, d) = (sc.b, sc.c, sc.d);
        let key_c = mix(sc.seed ^ 0xC0);
        let key_w = mix(sc.seed ^ 0x77);
        let key_x = mix(sc.seed ^ 0x55);
        let key_l = mix(sc.seed ^ 0x1A);
        // Distinct labels.
        let mut seen = HashSet::new();
        let mut labels = Vec::with_capacity(b);
        for i in 0..b {
            let mut y = (mix(key_l ^ i as u64) % c as u64) as usize;
            while !seen.insert(y) {
                y = (y + 1) % c;
            }
            labels.push(y);
        }
        let tgt_c: Vec<f32> = (0..b)
            .map(|i| {
                let u = uniform(key_l, (1 << 40) | i as u64);
                (sc.tgt_lo + (sc.tgt_hi - sc.tgt_lo) * u) as f32
            })
            .collect();
        let (mut tt32, mut tdt32, mut tt64, mut tdt64) = (vec![], vec![], vec![], vec![]);
        for &cy in &tgt_c {
            // fm_target_rows: the target and its slope in double, stored as f32.
            let t = math::target(&spec, &rm, cy as f64);
            tt64.push(t.value);
            tdt64.push(t.deriv);
            tt32.push(t.value as f32);
            tdt32.push(t.deriv as f32);
        }
        let x: Vec<f32> = (0..b * d)
            .map(|k| h16(normal(key_x, k as u64) as f32))
            .collect();
        let xnorm64: Vec<f64> = x.chunks(d).map(norm64).collect();
        let inv_x32: Vec<f32> = xnorm64.iter().map(|&n| 1.0 / n as f32).collect();
        let mut p = Problem {
            sc,
            s: spec.s,
            labels,
            tgt_c,
            tt32,
            tdt32,
            tt64,
            tdt64,
            x,
            xnorm64,
            inv_x32,
            lse64: vec![],
            lse32: vec![],
            q64: vec![],
            e_acc32: vec![],
            coef32: 0.0,
            coef64: 0.0,
            k_scale: 0.0,
            pscale: vec![],
            xchunk32: vec![],
            xchunk16: vec![],
            key_c,
            key_w,
        };
        let s_nt = p.non_target_sums();
        for (i, &sn) in s_nt.iter().enumerate() {
            let ey = (p.s * p.tt64[i]).exp();
            p.lse64.push((sn + ey).ln());
            p.q64.push(sn / (sn + ey));
            let l = (sn / ey).ln_1p() as f32;
            p.e_acc32.push((-l).exp_m1() * p.tdt32[i]);
        }
        p.lse32 = p.lse64.iter().map(|&v| v as f32).collect();
        // Mean reduction, unit upstream: g_i = 1/B; r_i = s (normalized features).
        let g32 = 1.0f32 / b as f32;
        p.coef32 = p.s as f32 * g32;
        p.coef64 = p.s / b as f64;
        // fm_grad_scale: frexp(max |r g|) = f 2^e with f in [0.5, 1), K = 2^e.
        let e = ((p.coef32.to_bits() >> 23) & 0xff) as i32 - 126;
        p.k_scale = pow2(e);
        let inv_k = 1.0 / p.k_scale;
        p.pscale = p.inv_x32.iter().map(|&ix| ix * p.coef32 * inv_k).collect();
        p.xchunk32 = (0..b * d).map(|k| p.x[k] * p.pscale[k / d]).collect();
        p.xchunk16 = p.xchunk32.iter().map(|&v| h16(v)).collect();
        p
    }

    /// The cosine c_ij as the kernel holds it (f32).
    fn cos(&self, i: usize, j: usize) -> f32 {
        if j == self.labels[i] {
            self.tgt_c[i]
        } else {
            let v = self.sc.sigma * normal(self.key_c, (j * self.sc.b + i) as u64);
            v.clamp(-1.0, 1.0) as f32
        }
    }

    /// Class row w_j as f16 values.
    fn w_row(&self, j: usize, out: &mut [f32]) {
        let d = self.sc.d;
        for (k, o) in out.iter_mut().enumerate() {
            let shift = if k == 0 { self.sc.w_mean } else { 0.0 };
            *o = h16((normal(self.key_w, (j * d + k) as u64) + shift) as f32);
        }
    }

    /// Per row, sum over the non-target classes of exp(z_ij), in f64.
    fn non_target_sums(&self) -> Vec<f64> {
        let (b, c) = (self.sc.b, self.sc.c);
        let chunk = 4096;
        let parts: Vec<Vec<f64>> = (0..c.div_ceil(chunk))
            .into_par_iter()
            .map(|q| {
                let mut acc = vec![0.0f64; b];
                for j in q * chunk..((q + 1) * chunk).min(c) {
                    for (i, a) in acc.iter_mut().enumerate() {
                        if j != self.labels[i] {
                            *a += (self.s * self.cos(i, j) as f64).exp();
                        }
                    }
                }
                acc
            })
            .collect();
        (0..b).map(|i| parts.iter().map(|p| p[i]).sum()).collect()
    }

    /// e_ij in the kernel's f32 (`fm_grad_elem`) and in f64, with c_ij.
    fn elem(&self, i: usize, j: usize) -> (f32, f64, f32) {
        let c = self.cos(i, j);
        if j == self.labels[i] {
            let z32 = self.s as f32 * self.tt32[i];
            let e32 = ((z32 - self.lse32[i]).exp() - 1.0) * self.tdt32[i];
            (e32, -self.q64[i] * self.tdt64[i], c)
        } else {
            let e32 = (self.s as f32 * c - self.lse32[i]).exp();
            (e32, (self.s * c as f64 - self.lse64[i]).exp(), c)
        }
    }
}

fn norm64(v: &[f32]) -> f64 {
    v.iter()
        .map(|&a| (a as f64) * (a as f64))
        .sum::<f64>()
        .sqrt()
}

// ---- the variants -----------------------------------------------------------------------------

/// The 16-bit (or not) operand type of a product.
#[derive(Clone, Copy, PartialEq)]
enum Op {
    F16,
    Bf16,
    F32,
}

fn round_op(op: Op, v: f32) -> f32 {
    match op {
        Op::F16 => h16(v),
        Op::Bf16 => b16(v),
        Op::F32 => v,
    }
}

/// The power-of-two scale of a row of e before rounding.
#[derive(Clone, Copy, PartialEq)]
enum Scale {
    /// None (dx as written; dw in bf16).
    One,
    /// Running, from the max |e| of each tile with the target entry included (dw as written).
    WithTarget,
    /// Running, from the max |e| of the non-target entries only (the target is added in f32 and
    /// needs no headroom), capped at 2^64 |e_iy| so the f32 target term cannot overflow.
    NonTarget,
}

struct Variant {
    name: &'static str,
    op: Op,
    scale: Scale,
    /// The target entry from an accurate row loss instead of expf(z - lse) - 1.
    acc_target: bool,
}

const DX_VARIANTS: [Variant; 7] = [
    Variant {
        name: "kernel (f16 e, no scale)",
        op: Op::F16,
        scale: Scale::One,
        acc_target: false,
    },
    Variant {
        name: "row scale, target in max (dw's rule)",
        op: Op::F16,
        scale: Scale::WithTarget,
        acc_target: false,
    },
    Variant {
        name: "row scale, non-target max",
        op: Op::F16,
        scale: Scale::NonTarget,
        acc_target: false,
    },
    Variant {
        name: "bf16 e and wh",
        op: Op::Bf16,
        scale: Scale::One,
        acc_target: false,
    },
    Variant {
        name: "f32 operands (16-bit rounding off)",
        op: Op::F32,
        scale: Scale::One,
        acc_target: false,
    },
    Variant {
        name: "kernel + accurate target entry",
        op: Op::F16,
        scale: Scale::One,
        acc_target: true,
    },
    Variant {
        name: "row scale (non-target) + accurate target",
        op: Op::F16,
        scale: Scale::NonTarget,
        acc_target: true,
    },
];
const DX_KERNEL: usize = 0;
const DX_ROWSCALE: usize = 2;
const DX_BF16: usize = 3;
const DX_F32OPS: usize = 4;
const DX_ACC: usize = 5;
const DX_BEST: usize = 6;

const DW_VARIANTS: [Variant; 4] = [
    Variant {
        name: "kernel (f16 e 2^k_j)",
        op: Op::F16,
        scale: Scale::WithTarget,
        acc_target: false,
    },
    Variant {
        name: "no class scale",
        op: Op::F16,
        scale: Scale::One,
        acc_target: false,
    },
    Variant {
        name: "f32 operands (16-bit rounding off)",
        op: Op::F32,
        scale: Scale::One,
        acc_target: false,
    },
    Variant {
        name: "kernel + accurate target entry",
        op: Op::F16,
        scale: Scale::WithTarget,
        acc_target: true,
    },
];
const DW_KERNEL: usize = 0;
const DW_NOSCALE: usize = 1;
const DW_F32OPS: usize = 2;
const DW_ACC: usize = 3;
/// dw outputs measured: each variant in f32 (`backward_f32`), then the kernel's in f16, then the
/// f64 reference itself rounded to f16 (what an f16 output cannot avoid).
const DW_OUTS: usize = DW_VARIANTS.len() + 2;
const DW_KERNEL_F16OUT: usize = DW_VARIANTS.len();
const DW_REF_F16: usize = DW_VARIANTS.len() + 1;

// ---- one class split: dx partials of every variant, dw rows of its classes --------------------

struct DwStats {
    /// Per output: each class's relative error of dW_j; squared error sums.
    rel: Vec<Vec<f64>>,
    err2: Vec<f64>,
    ref2: f64,
    /// Per variant: classes where some nonzero e_ij became 0 in the 16-bit operand, and where
    /// every nonzero non-target e_ij did.
    any_flushed: Vec<usize>,
    all_flushed: Vec<usize>,
}

struct SplitOut {
    /// Per variant, B x D partial dxh (times r g, unscaled) and B partial proj, f32.
    dxh: Vec<Vec<f32>>,
    proj: Vec<Vec<f32>>,
    dxh64: Vec<f64>,
    proj64: Vec<f64>,
    /// Per variant and row: nonzero non-target e_ij flushed to 0 by the 16-bit operand and their
    /// f64 mass; per row the f64 mass of all non-target e.
    flushed: Vec<Vec<usize>>,
    lost: Vec<Vec<f64>>,
    mass: Vec<f64>,
    dw: DwStats,
}

/// The k a row starts from: KMAX, or for Scale::NonTarget the cap 2^64 |e_iy|.
fn k_start(scale: Scale, e_target: f32) -> i32 {
    match scale {
        Scale::One => 0,
        Scale::WithTarget => KMAX,
        Scale::NonTarget => KMAX.min(exp_for(e_target.abs()) + 64),
    }
}

/// Lowers the running exponent `k` to the tile's `kt`, rescaling the accumulators (568-585).
fn lower_k(k: &mut i32, kt: i32, acc: &mut [f32]) {
    if kt < *k {
        let f = pow2((kt - *k).max(-126));
        acc.iter_mut().for_each(|v| *v *= f);
        *k = kt;
    }
}

fn run_split(p: &Problem, split: usize, tiles_per_split: usize) -> SplitOut {
    let (b, c, d) = (p.sc.b, p.sc.c, p.sc.d);
    let nx = DX_VARIANTS.len();
    let nw = DW_VARIANTS.len();
    let ntiles = c.div_ceil(PN);
    let t_begin = split * tiles_per_split;
    let t_end = (t_begin + tiles_per_split).min(ntiles);
    let tval =
        |v: &Variant, i: usize, kernel_e: f32| if v.acc_target { p.e_acc32[i] } else { kernel_e };
    // The target entries as each variant computes them (needed before the loop for the cap).
    let e_target: Vec<f32> = (0..b).map(|i| p.elem(i, p.labels[i]).0).collect();

    let mut out: Vec<Vec<f32>> = vec![vec![0.0f32; b * d]; nx];
    let mut krow: Vec<Vec<i32>> = DX_VARIANTS
        .iter()
        .map(|v| {
            (0..b)
                .map(|i| k_start(v.scale, tval(v, i, e_target[i])))
                .collect()
        })
        .collect();
    let mut ec = vec![vec![0.0f32; b]; nx];
    let mut out64 = vec![0.0f64; b * d];
    let mut ec64 = vec![0.0f64; b];
    let mut flushed = vec![vec![0usize; b]; nx];
    let mut lost = vec![vec![0.0f64; b]; nx];
    let mut mass = vec![0.0f64; b];
    let mut dw = DwStats {
        rel: vec![Vec::new(); DW_OUTS],
        err2: vec![0.0; DW_OUTS],
        ref2: 0.0,
        any_flushed: vec![0; nw],
        all_flushed: vec![0; nw],
    };

    let mut e32 = vec![0.0f32; b * PN];
    let mut e64 = vec![0.0f64; b * PN];
    let mut cc = vec![0.0f32; b * PN];
    let mut wrow = vec![0.0f32; PN * d];
    // The dx chunk per operand type (f16, bf16, f32), and the exact wh.
    let mut wh = [
        vec![0.0f32; PN * d],
        vec![0.0f32; PN * d],
        vec![0.0f32; PN * d],
    ];
    let mut wh64 = vec![0.0f64; PN * d];
    let mut inv_w32 = vec![0.0f32; PN];
    let mut wnorm64 = vec![0.0f64; PN];
    let op_index = |op: Op| match op {
        Op::F16 => 0,
        Op::Bf16 => 1,
        Op::F32 => 2,
    };

    for tile in t_begin..t_end {
        let j0 = tile * PN;
        let nj = PN.min(c - j0);
        for jj in 0..nj {
            let wr = &mut wrow[jj * d..(jj + 1) * d];
            p.w_row(j0 + jj, wr);
            let n64 = norm64(wr);
            wnorm64[jj] = n64;
            inv_w32[jj] = 1.0 / n64 as f32;
            for k in 0..d {
                let v = wr[k] * inv_w32[jj];
                wh[0][jj * d + k] = h16(v);
                wh[1][jj * d + k] = b16(v);
                wh[2][jj * d + k] = v;
                wh64[jj * d + k] = wr[k] as f64 / n64;
            }
        }
        for i in 0..b {
            for jj in 0..nj {
                let (a, r, cv) = p.elem(i, j0 + jj);
                e32[i * PN + jj] = a;
                e64[i * PN + jj] = r;
                cc[i * PN + jj] = cv;
            }
        }

        // dx (fm_grad_x_tc): each own row i against the tile's classes.
        for i in 0..b {
            let y = p.labels[i];
            let ty = if y >= j0 && y < j0 + nj {
                Some(y - j0)
            } else {
                None
            };
            let row = i * d..(i + 1) * d;
            let er = &e32[i * PN..i * PN + nj];
            let er64 = &e64[i * PN..i * PN + nj];
            let cr = &cc[i * PN..i * PN + nj];
            for jj in 0..nj {
                ec64[i] += er64[jj] * cr[jj] as f64;
                for (o, w) in out64[row.clone()]
                    .iter_mut()
                    .zip(&wh64[jj * d..(jj + 1) * d])
                {
                    *o += er64[jj] * w;
                }
                if Some(jj) != ty {
                    mass[i] += er64[jj];
                }
            }
            let m_nt = er
                .iter()
                .enumerate()
                .filter(|&(jj, _)| Some(jj) != ty)
                .fold(0.0f32, |m, (_, &v)| m.max(v.abs()));
            for (v, var) in DX_VARIANTS.iter().enumerate() {
                let et = tval(var, i, e_target[i]);
                // proj_i = sum e c in f32 from the unrounded e (369).
                for jj in 0..nj {
                    let e = if Some(jj) == ty { et } else { er[jj] };
                    ec[v][i] = e.mul_add(cr[jj], ec[v][i]);
                }
                let k = &mut krow[v][i];
                match var.scale {
                    Scale::One => {}
                    Scale::WithTarget => {
                        let m = if ty.is_some() {
                            m_nt.max(et.abs())
                        } else {
                            m_nt
                        };
                        lower_k(k, exp_for(m), &mut out[v][row.clone()]);
                    }
                    Scale::NonTarget => lower_k(k, exp_for(m_nt), &mut out[v][row.clone()]),
                }
                let fk = pow2(*k);
                // The target in f32 before the tile's product (389-404).
                if let Some(jj) = ty {
                    let f = et * fk;
                    for (o, &wv) in out[v][row.clone()]
                        .iter_mut()
                        .zip(&wrow[jj * d..(jj + 1) * d])
                    {
                        *o = f.mul_add(wv * inv_w32[jj], *o);
                    }
                }
                let chunk = &wh[op_index(var.op)];
                for jj in 0..nj {
                    if Some(jj) == ty {
                        continue;
                    }
                    let a = round_op(var.op, er[jj] * fk);
                    if a == 0.0 {
                        if er[jj] != 0.0 {
                            flushed[v][i] += 1;
                            lost[v][i] += er64[jj];
                        }
                        continue;
                    }
                    for (o, w) in out[v][row.clone()]
                        .iter_mut()
                        .zip(&chunk[jj * d..(jj + 1) * d])
                    {
                        *o += a * w;
                    }
                }
            }
        }

        // dw (fm_grad_w_tc): each class row of the tile against every row of x, in row tiles.
        let mut acc = vec![vec![0.0f32; d]; nw];
        let mut acc64 = vec![0.0f64; d];
        for jj in 0..nj {
            let j = j0 + jj;
            acc.iter_mut()
                .for_each(|a| a.iter_mut().for_each(|v| *v = 0.0));
            acc64.iter_mut().for_each(|v| *v = 0.0);
            let mut kj: Vec<i32> = DW_VARIANTS.iter().map(|v| k_start(v.scale, 0.0)).collect();
            let mut pj = vec![0.0f32; nw];
            let mut pj64 = 0.0f64;
            let mut nonzero = 0usize;
            let mut fl = vec![0usize; nw];
            for r0 in (0..b).step_by(PN) {
                let r1 = (r0 + PN).min(b);
                for i in r0..r1 {
                    let e = e64[i * PN + jj];
                    pj64 += p.coef64 * e * cc[i * PN + jj] as f64;
                    let xh = 1.0 / p.xnorm64[i];
                    for (o, &xv) in acc64.iter_mut().zip(&p.x[i * d..(i + 1) * d]) {
                        *o += p.coef64 * e * xv as f64 * xh;
                    }
                    if p.labels[i] != j && e32[i * PN + jj] != 0.0 {
                        nonzero += 1;
                    }
                }
                for (v, var) in DW_VARIANTS.iter().enumerate() {
                    let ev = |i: usize| {
                        let e = e32[i * PN + jj];
                        if p.labels[i] == j {
                            tval(var, i, e)
                        } else {
                            e
                        }
                    };
                    let mut m = 0.0f32;
                    for i in r0..r1 {
                        pj[v] = (p.coef32 * ev(i)).mul_add(cc[i * PN + jj], pj[v]);
                        m = m.max(ev(i).abs());
                    }
                    if var.scale == Scale::WithTarget {
                        lower_k(&mut kj[v], exp_for(m), &mut acc[v]);
                    }
                    let fk = pow2(kj[v]);
                    // Targets in f32 before the tile's product (589-614).
                    for i in r0..r1 {
                        if p.labels[i] != j {
                            continue;
                        }
                        let f = ev(i) * p.pscale[i] * fk;
                        for (o, &xv) in acc[v].iter_mut().zip(&p.x[i * d..(i + 1) * d]) {
                            *o = f.mul_add(xv, *o);
                        }
                    }
                    let chunk = if var.op == Op::F32 {
                        &p.xchunk32
                    } else {
                        &p.xchunk16
                    };
                    for i in r0..r1 {
                        if p.labels[i] == j {
                            continue;
                        }
                        let e = e32[i * PN + jj];
                        let a = round_op(var.op, e * fk);
                        if a == 0.0 {
                            if e != 0.0 {
                                fl[v] += 1;
                            }
                            continue;
                        }
                        for (o, w) in acc[v].iter_mut().zip(&chunk[i * d..(i + 1) * d]) {
                            *o += a * w;
                        }
                    }
                }
            }
            for (v, &f) in fl.iter().enumerate() {
                if f > 0 {
                    dw.any_flushed[v] += 1;
                }
                if nonzero > 0 && f == nonzero {
                    dw.all_flushed[v] += 1;
                }
            }
            // dwh = K (out 2^-k), dw = (dwh - wh proj) / |w| (620-649).
            let iw = inv_w32[jj];
            let iw64 = 1.0 / wnorm64[jj];
            let mut e2 = [0.0f64; DW_OUTS];
            let mut r2 = 0.0f64;
            for k in 0..d {
                let whv = wrow[jj * d + k] * iw;
                let reference = (acc64[k] - wh64[jj * d + k] * pj64) * iw64;
                let mut outs = [0.0f64; DW_OUTS];
                for v in 0..nw {
                    let g = (p.k_scale * (acc[v][k] * pow2(-kj[v])) - whv * pj[v]) * iw;
                    outs[v] = g as f64;
                    if v == DW_KERNEL {
                        outs[DW_KERNEL_F16OUT] = h16(g) as f64;
                    }
                }
                outs[DW_REF_F16] = h16(reference as f32) as f64;
                for (e, o) in e2.iter_mut().zip(outs) {
                    *e += (o - reference).powi(2);
                }
                r2 += reference * reference;
            }
            for (v, &e) in e2.iter().enumerate() {
                dw.rel[v].push((e / r2).sqrt());
                dw.err2[v] += e;
            }
            dw.ref2 += r2;
        }
    }

    // The split's partials: r g out, with out 2^-k for the scaled variants (418-425).
    for (v, o) in out.iter_mut().enumerate() {
        for i in 0..b {
            let un = pow2(-krow[v][i]);
            for a in &mut o[i * d..(i + 1) * d] {
                *a = p.coef32 * (*a * un);
            }
        }
    }
    out64.iter_mut().for_each(|v| *v *= p.coef64);
    SplitOut {
        dxh: out,
        proj: ec
            .iter()
            .map(|r| r.iter().map(|&v| p.coef32 * v).collect())
            .collect(),
        dxh64: out64,
        proj64: ec64.iter().map(|&v| p.coef64 * v).collect(),
        flushed,
        lost,
        mass,
        dw,
    }
}

// ---- the whole backward and its report --------------------------------------------------------

#[derive(Debug)]
struct Dist {
    max: f64,
    p99: f64,
    median: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
        Dist {
            max: q(1.0),
            p99: q(0.99),
            median: q(0.5),
        }
    }
}

struct Report {
    /// Mean p_iy of the batch.
    mean_p_target: f64,
    /// dx per variant (f32 out): normwise error and per-row relative errors; the kernel with f16
    /// out; per variant the flushed share of nonzero non-target e and the lost mass per row
    /// (fraction of the row's non-target mass): max and mean.
    dx_norm: Vec<f64>,
    dx_rows: Vec<Dist>,
    dx_norm_kernel_f16out: f64,
    dx_flushed_share: Vec<f64>,
    dx_lost_max: Vec<f64>,
    dx_lost_mean: Vec<f64>,
    /// dw per output (DW_OUTS): normwise and per-class distribution; per variant the classes with
    /// any / every nonzero entry flushed.
    dw_norm: Vec<f64>,
    dw_class: Vec<Dist>,
    dw_any_flushed: Vec<usize>,
    dw_all_flushed: Vec<usize>,
}

fn run(sc: Scenario) -> Report {
    let p = Problem::new(sc);
    let (b, c, d) = (sc.b, sc.c, sc.d);
    let nx = DX_VARIANTS.len();
    let ntiles = c.div_ceil(PN);
    let tps = ntiles.div_ceil(sc.nsplit);
    let nsplit = ntiles.div_ceil(tps);
    let parts: Vec<SplitOut> = (0..nsplit)
        .into_par_iter()
        .map(|s| run_split(&p, s, tps))
        .collect();

    // fm_x_finish (normalize.cu 70-79): splits summed in order in f32, normalization backward.
    let mut rows = vec![Vec::with_capacity(b); nx];
    let mut err2 = vec![0.0f64; nx];
    let (mut ref2_all, mut err2_f16) = (0.0f64, 0.0f64);
    for i in 0..b {
        let proj64: f64 = parts.iter().map(|s| s.proj64[i]).sum();
        let n64 = p.xnorm64[i];
        let inv = p.inv_x32[i];
        let mut reference = vec![0.0f64; d];
        for (k, r) in reference.iter_mut().enumerate() {
            let dxh64: f64 = parts.iter().map(|s| s.dxh64[i * d + k]).sum();
            *r = (dxh64 - p.x[i * d + k] as f64 / n64 * proj64) / n64;
        }
        let r2: f64 = reference.iter().map(|r| r * r).sum();
        ref2_all += r2;
        for v in 0..nx {
            let proj = parts.iter().fold(0.0f32, |a, s| a + s.proj[v][i]);
            let mut e2 = 0.0f64;
            for (k, &r) in reference.iter().enumerate() {
                let dxh = parts.iter().fold(0.0f32, |a, s| a + s.dxh[v][i * d + k]);
                let xv = p.x[i * d + k];
                let g = (dxh - xv * inv * proj) * inv;
                e2 += (g as f64 - r).powi(2);
                if v == DX_KERNEL {
                    err2_f16 += (h16(g) as f64 - r).powi(2);
                }
            }
            err2[v] += e2;
            rows[v].push((e2 / r2).sqrt());
        }
    }
    let mass: Vec<f64> = (0..b)
        .map(|i| parts.iter().map(|s| s.mass[i]).sum())
        .collect();
    let mut dx_lost_max = Vec::new();
    let mut dx_lost_mean = Vec::new();
    let mut dx_flushed_share = Vec::new();
    for v in 0..nx {
        let lost: Vec<f64> = (0..b)
            .map(|i| parts.iter().map(|s| s.lost[v][i]).sum::<f64>() / mass[i])
            .collect();
        dx_lost_max.push(lost.iter().copied().fold(0.0, f64::max));
        dx_lost_mean.push(lost.iter().sum::<f64>() / b as f64);
        let fl: usize = parts
            .iter()
            .map(|s| s.flushed[v].iter().sum::<usize>())
            .sum();
        dx_flushed_share.push(fl as f64 / (b * (c - 1)) as f64);
    }

    let ref2: f64 = parts.iter().map(|s| s.dw.ref2).sum();
    let dw_norm = (0..DW_OUTS)
        .map(|v| (parts.iter().map(|s| s.dw.err2[v]).sum::<f64>() / ref2).sqrt())
        .collect();
    let dw_class = (0..DW_OUTS)
        .map(|v| {
            Dist::of(
                parts
                    .iter()
                    .flat_map(|s| s.dw.rel[v].iter().copied())
                    .collect(),
            )
        })
        .collect();
    let nw = DW_VARIANTS.len();
    let dw_any_flushed = (0..nw)
        .map(|v| parts.iter().map(|s| s.dw.any_flushed[v]).sum())
        .collect();
    let dw_all_flushed = (0..nw)
        .map(|v| parts.iter().map(|s| s.dw.all_flushed[v]).sum())
        .collect();
    Report {
        mean_p_target: p.q64.iter().map(|q| 1.0 - q).sum::<f64>() / b as f64,
        dx_norm: err2.iter().map(|e| (e / ref2_all).sqrt()).collect(),
        dx_rows: rows.into_iter().map(Dist::of).collect(),
        dx_norm_kernel_f16out: (err2_f16 / ref2_all).sqrt(),
        dx_flushed_share,
        dx_lost_max,
        dx_lost_mean,
        dw_norm,
        dw_class,
        dw_any_flushed,
        dw_all_flushed,
    }
}

fn print(name: &str, sc: &Scenario, r: &Report) {
    println!(
        "{name}: B {} C {} D {}, {} class splits, target cos U({}, {}), non-target N(0, {}^2), w mean {}; mean p_target {:.3e}",
        sc.b, sc.c, sc.d, sc.nsplit, sc.tgt_lo, sc.tgt_hi, sc.sigma, sc.w_mean, r.mean_p_target
    );
    println!("  dx (f32 out)                                normwise   row max    row p99    row median flushed  lost mass max / mean");
    for (v, var) in DX_VARIANTS.iter().enumerate() {
        let rw = &r.dx_rows[v];
        println!(
            "    {:<42} {:.3e}  {:.3e}  {:.3e}  {:.3e}  {:5.1}%   {:.2e} / {:.2e}",
            var.name,
            r.dx_norm[v],
            rw.max,
            rw.p99,
            rw.median,
            100.0 * r.dx_flushed_share[v],
            r.dx_lost_max[v],
            r.dx_lost_mean[v]
        );
    }
    println!(
        "    kernel with f16 out: normwise {:.3e}",
        r.dx_norm_kernel_f16out
    );
    println!("  dw                                          normwise   class max  class p99  class median  classes with a flushed entry / all flushed");
    // DW_KERNEL_F16OUT, then DW_REF_F16, after the variants.
    let names = DW_VARIANTS
        .iter()
        .map(|v| v.name)
        .chain(["kernel, f16 out", "f64 reference rounded to f16 (floor)"]);
    for (v, name) in names.enumerate() {
        let cl = &r.dw_class[v];
        let flush = if v < DW_VARIANTS.len() {
            format!("{} / {}", r.dw_any_flushed[v], r.dw_all_flushed[v])
        } else {
            String::new()
        };
        println!(
            "    {:<42} {:.3e}  {:.3e}  {:.3e}  {:.3e}     {}",
            name, r.dw_norm[v], cl.max, cl.p99, cl.median, flush
        );
    }
}

// ---- the scenarios and what holds in them -------------------------------------------------------

/// The brief's realistic case: a mid-training batch (target cosine 0.4-0.7, ArcFace m 0.5,
/// s 64), C = 200,000, class directions independent.
const MID: Scenario = Scenario {
    b: 64,
    c: 200_000,
    d: 16,
    nsplit: 64,
    tgt_lo: 0.4,
    tgt_hi: 0.7,
    sigma: 0.05,
    w_mean: 0.0,
    seed: 7,
};

/// A stress case for dx's flush: C = 1,000,000 and a common direction in the class weights
/// (w_mean 3 on entries ~ N(0, 1) in D = 16: every wh_j has cosine ~0.6 with it), so what the
/// f16 operand flushes (always positive mass) adds up along one direction.
const COHERENT_1M: Scenario = Scenario {
    c: 1_000_000,
    w_mean: 3.0,
    ..MID
};

/// A converged batch (target cosine 0.8-0.9: p_iy > 1 - 1e-4, loss ~1e-5 per row), with the same
/// common class direction, C = 200,000.
const CONVERGED: Scenario = Scenario {
    tgt_lo: 0.8,
    tgt_hi: 0.9,
    w_mean: 3.0,
    ..MID
};

fn report(cell: &'static OnceLock<Report>, name: &str, sc: Scenario) -> &'static Report {
    cell.get_or_init(|| {
        let r = run(sc);
        print(name, &sc, &r);
        r
    })
}

static MID_REPORT: OnceLock<Report> = OnceLock::new();
static COHERENT_1M_REPORT: OnceLock<Report> = OnceLock::new();
static CONVERGED_REPORT: OnceLock<Report> = OnceLock::new();

fn mid() -> &'static Report {
    report(&MID_REPORT, "mid_training", MID)
}
fn coherent_1m() -> &'static Report {
    report(&COHERENT_1M_REPORT, "coherent_class_mean_1m", COHERENT_1M)
}
fn converged() -> &'static Report {
    report(&CONVERGED_REPORT, "converged_batch", CONVERGED)
}

fn below(what: &str, value: f64, bound: f64) {
    assert!(value < bound, "{what}: {value:.3e}, bound {bound:.1e}");
}

/// Measured (seed 7): dx normwise 3.8e-5 (f16 out 2.0e-4), per row at most 1.8e-4; half of the
/// nonzero non-target e flush to 0 in dx's operand, but they carry 0.07% of a row's non-target
/// mass (at most 0.11%). dw normwise 3.1e-5 (f16 out 2.0e-4); per class (f32 out) max 1.1e-3,
/// p99 5.5e-4; 34,242 of the 200,000 classes lose some entry (each more than 2^25 below its
/// class's largest) and none all. With f16 out, per class max 0.40, p99 5.7e-2: exactly what
/// rounding the f64 result to f16 gives (cold classes' dW entries are f16 subnormals).
#[test]
fn realistic_mid_training_meets_f16_bars() {
    let r = mid();
    // The model's floor without 16-bit operands: what is measured below is their rounding.
    below("dx, f32 operands", r.dx_norm[DX_F32OPS], 1e-5);
    below("dw, f32 operands", r.dw_norm[DW_F32OPS], 1e-5);
    below("dx normwise, kernel", r.dx_norm[DX_KERNEL], F16_BAR);
    below(
        "dx normwise, kernel, f16 out",
        r.dx_norm_kernel_f16out,
        F16_BAR,
    );
    below("dx worst row, kernel", r.dx_rows[DX_KERNEL].max, F16_BAR);
    below("dw normwise, kernel", r.dw_norm[DW_KERNEL], F16_BAR);
    below(
        "dw normwise, kernel, f16 out",
        r.dw_norm[DW_KERNEL_F16OUT],
        F16_BAR,
    );
    below("dw worst class, kernel", r.dw_class[DW_KERNEL].max, F16_BAR);
    assert_eq!(r.dw_all_flushed[DW_KERNEL], 0, "a class lost every entry");
    // With f16 out, a class's error is the output's own rounding.
    let (k, floor) = (&r.dw_class[DW_KERNEL_F16OUT], &r.dw_class[DW_REF_F16]);
    below(
        "dw per class p99, f16 out, above the f16 output's own",
        k.p99 - floor.p99,
        1e-3,
    );
    // The class scale is what keeps dW rows bounded: without it the worst class is off by >10%.
    assert!(
        r.dw_class[DW_NOSCALE].max > 0.05,
        "{:?}",
        r.dw_class[DW_NOSCALE]
    );
    // The dx remedies stay within the bar too.
    below("dx normwise, row scale", r.dx_norm[DX_ROWSCALE], F16_BAR);
    below("dx normwise, bf16 operands", r.dx_norm[DX_BF16], F16_BAR);
}

/// Measured (seed 7): dx normwise 1.41e-3 with the kernel (5x the 2.8e-4 of the same batch at
/// C = 200,000: the flushed share of a row's non-target mass grows with C, 3.5e-3 here), 4.3e-5
/// with the per-row scale; dw normwise 1.9e-5, per class max 1.0e-3.
#[test]
fn coherent_class_mean_at_one_million_classes_meets_f16_bars() {
    let r = coherent_1m();
    below("dx normwise, kernel", r.dx_norm[DX_KERNEL], F16_BAR);
    below(
        "dx normwise, kernel, f16 out",
        r.dx_norm_kernel_f16out,
        F16_BAR,
    );
    below("dw normwise, kernel", r.dw_norm[DW_KERNEL], F16_BAR);
    below("dw worst class, kernel", r.dw_class[DW_KERNEL].max, F16_BAR);
    // The error is dx's flush: the per-row scale removes nearly all of it.
    below("dx normwise, row scale", r.dx_norm[DX_ROWSCALE], 2e-4);
    assert!(r.dx_norm[DX_KERNEL] > 10.0 * r.dx_norm[DX_ROWSCALE]);
}

/// The remedies in the converged batch: dx with the per-row scale and an accurate target entry
/// 1.0e-4 (worst row 1.2e-4), dw with an accurate target entry 3.6e-5 (worst class 9.2e-4).
#[test]
fn converged_batch_meets_f16_bars_with_row_scale_and_accurate_target() {
    let r = converged();
    below(
        "dx normwise, row scale + accurate target",
        r.dx_norm[DX_BEST],
        F16_BAR,
    );
    below(
        "dx worst row, row scale + accurate target",
        r.dx_rows[DX_BEST].max,
        F16_BAR,
    );
    below(
        "dw normwise, kernel + accurate target",
        r.dw_norm[DW_ACC],
        F16_BAR,
    );
    below(
        "dw worst class, kernel + accurate target",
        r.dw_class[DW_ACC].max,
        F16_BAR,
    );
}

/// FAILS in the model (seed 7): dx normwise 7.0e-2 with the kernel as written, 14x the f16 bar.
/// Two causes, each enough alone: dx's f16 operand has no row scale, so every non-target e of
/// these rows flushes (100% of them; 78% of a row's non-target mass on average), and the target
/// entry expf(z - lse) - 1 in f32 cannot resolve 1 - p_iy < 1e-4 (lse ~ 30-40 in f32). Fixing
/// only the target entry leaves 6.7e-2; only the row scale, 1.6e-2; both, 1.0e-4. Without the
/// common class direction (w_mean 0) the kernel gives 1.6e-2 and the accurate target alone 2.2e-3.
#[test]
#[ignore = "finding: converged batch, kernel dx normwise 7.0e-2 > 5e-3"]
fn converged_batch_kernel_dx_exceeds_f16_bar() {
    below(
        "dx normwise, kernel",
        converged().dx_norm[DX_KERNEL],
        F16_BAR,
    );
}

/// FAILS in the model (seed 7): dx normwise 6.7e-2 with an accurate target entry but no row scale:
/// dx's flush alone breaks the bar here (the per-row scale brings it to 1.0e-4).
#[test]
#[ignore = "finding: converged batch, dx without a row scale 6.7e-2 > 5e-3 even with an accurate target"]
fn converged_batch_dx_without_row_scale_exceeds_f16_bar() {
    below(
        "dx normwise, accurate target",
        converged().dx_norm[DX_ACC],
        F16_BAR,
    );
}

/// FAILS in the model (seed 7): dw normwise 1.5e-2 with the kernel, the same with f32 operands:
/// not the 16-bit rounding (the class scale does its job, p99 per class 5.3e-4) but the f32
/// target entry expf(z - lse) - 1 (`fm_grad_elem`, tile.cuh 133, shared with the SIMT kernels):
/// the target classes' dW rows are off by up to 44x. An accurate target entry gives 3.6e-5.
#[test]
#[ignore = "finding: converged batch, kernel dw normwise 1.5e-2 > 5e-3 (f32 target entry)"]
fn converged_batch_kernel_dw_exceeds_f16_bar() {
    below(
        "dw normwise, kernel",
        converged().dw_norm[DW_KERNEL],
        F16_BAR,
    );
}

/// FAILS in the model (seed 7): dx normwise 1.6e-2 with f32 operands and the kernels' f32 target
/// entry, i.e. what the SIMT backward (grad.cu, same `fm_grad_elem`) would give here, 16-bit
/// rounding aside.
#[test]
#[ignore = "finding: converged batch, f32 target entry alone gives dx 1.6e-2 > 5e-3"]
fn converged_batch_f32_target_entry_exceeds_f16_bar() {
    below(
        "dx normwise, f32 operands",
        converged().dx_norm[DX_F32OPS],
        F16_BAR,
    );
}
