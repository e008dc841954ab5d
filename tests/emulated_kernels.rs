//! The fused plan's CUDA kernels, run on the CPU emulator of tests/emu, against the f64 CPU
//! reference with MATH.md's bars. This is how the kernels' indexing, fragment layouts (ldmatrix,
//! mma.sync), pipelines, class splits and edge handling are tested on machines without a GPU:
//! the emulator compiles kernels/all.cu as C++ with every PTX instruction replaced by a model of
//! its PTX ISA definition, and runs every thread of every block (tests/emu/fm_emu.hpp says what it
//! does and does not model). The GPU suite (gpu_vs_cpu.rs) remains the test of the hardware.
//!
//! Needs a C++20 compiler (`$CXX`, else `c++`/`g++`); without one every test prints why and
//! passes, and `FUSED_MARGIN_REQUIRE_EMU=1` (set by .ci/run) turns that into a failure.
use fused_margin::cuda::plan;
use fused_margin::{cpu, cuda, DType, Element, GradientMode, MarginLoss, OverflowPolicy};
use fused_margin::{ElasticKind, ElasticMargins, ElasticPlus, ElasticRng, LossState, RowInputs};
use fused_margin::{Reduction, Shape, Upstream};
use half::{bf16, f16};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

mod common;
mod property_cases;
use common::{bars, margin_inputs, margin_inputs_opts, non_finite_policy, rel, TF32_BARS};

/// The emulator driver for `dtype`, built once per test process; None (after printing why)
/// when no C++ compiler is found.
fn driver(dtype: DType) -> Option<PathBuf> {
    driver_of(dtype, false)
}

/// The driver with a deliberately broken tensor-core dw kernel (`FM_EMU_FAULT_TC_DW` in
/// kernels/grad_tc.cu: dw scaled by 1.1), for the self-check's fault-injection test.
fn faulty_driver(dtype: DType) -> Option<PathBuf> {
    driver_of(dtype, true)
}

/// Built drivers by (dtype, fault), once per test process.
type Drivers = Mutex<HashMap<(DType, bool), Option<PathBuf>>>;

fn driver_of(dtype: DType, fault: bool) -> Option<PathBuf> {
    static BUILT: OnceLock<Drivers> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    built
        .entry((dtype, fault))
        .or_insert_with(|| build_driver(dtype, fault))
        .clone()
}

/// Whether the emulator runs sanitized (`FM_EMU_SANITIZE=1`; `build_driver`).
fn sanitized() -> bool {
    std::env::var("FM_EMU_SANITIZE").as_deref() == Ok("1")
}

fn build_driver(dtype: DType, fault: bool) -> Option<PathBuf> {
    let required = std::env::var("FUSED_MARGIN_REQUIRE_EMU").as_deref() == Ok("1");
    let candidates: Vec<String> = std::env::var("CXX")
        .ok()
        .into_iter()
        .chain(["c++".to_string(), "g++".to_string()])
        .collect();
    let Some(cxx) = candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        assert!(
            !required,
            "FUSED_MARGIN_REQUIRE_EMU=1 but no C++ compiler ($CXX, c++, g++) was found"
        );
        eprintln!("skipped: no C++ compiler for the kernel emulator ($CXX, c++, g++)");
        return None;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("kernels/all.cu").exists() {
        // A test binary copied to another machine (the GPU bundle) without the sources.
        assert!(
            !required,
            "FUSED_MARGIN_REQUIRE_EMU=1 but the kernel sources are not at {}",
            root.display()
        );
        eprintln!("skipped: the kernel sources are not at {}", root.display());
        return None;
    }
    let define = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::F64 => unreachable!("the kernels take f32, f16, bf16"),
    };
    // FM_EMU_SANITIZE=1 (.ci/run, on a subset): the driver under AddressSanitizer and
    // UndefinedBehaviorSanitizer, so a kernel that reads or writes past a job buffer (each is
    // allocated at its length rounded up to whole 8-byte words) or does undefined arithmetic in
    // the kernels or the emulator fails the run: -fno-sanitize-recover makes UBSan reports fatal
    // and `try_job` sets the options that make every report end the driver with an exit code of
    // its own. (-fsanitize=undefined leaves out float division by zero and float-to-int overflow,
    // so the IEEE infinities and NaNs the kernels produce on purpose are not reports.) Its own
    // binary name, so a sanitized and a plain build never stand in for each other. -O1: -O2
    // doubles the sanitized build (bf16: about 90 s to 180 s on 2 cores) for at most a quarter
    // less run time.
    let sanitize = sanitized();
    let name = match (sanitize, fault) {
        (true, false) => "fm_emu_asan",
        (true, true) => "fm_emu_asan_fault",
        (false, false) => "fm_emu",
        (false, true) => "fm_emu_fault",
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}_{}", dtype.suffix()));
    let mut cmd = Command::new(&cxx);
    cmd.args(["-std=c++20", "-Wno-unknown-pragmas", "-DFM_EMU"]);
    if sanitize {
        cmd.args([
            "-O1",
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=undefined",
            // libstdc++'s std::vector marks its spare capacity for ASan (clang's libc++ does
            // by itself): the emulator reuses one vector for every launch's dynamic shared
            // memory, so a launch with less than an earlier one's would otherwise have room
            // past its end to overrun unseen.
            "-D_GLIBCXX_SANITIZE_VECTOR",
        ]);
    } else {
        cmd.arg("-O2");
    }
    if fault {
        cmd.arg("-DFM_EMU_FAULT_TC_DW");
    }
    let status = cmd
        .arg(format!("-DFM_DTYPE={define}"))
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-I")
        .arg(root.join("tests/emu"))
        .arg(root.join("tests/emu/driver.cpp"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {cxx}: {e}"));
    assert!(
        status.success(),
        "building the kernel emulator with {cxx} failed"
    );
    Some(out)
}

/// One emulated run: the spec, shape, dtype, which kernels, and how the class tiles are split.
#[derive(Clone, Copy)]
struct Case {
    spec: MarginLoss,
    shape: Shape,
    fwd_tc: bool,
    bwd_tc: bool,
    /// Class tiles per split in the forward (tiles of 128 classes with tensor cores, else 32).
    fwd_tps: i32,
    /// Class tiles per split of the dx backward (tiles of 64 with tensor cores, else 32).
    bwd_tps: i32,
    /// The naive plan (its plain kernels) instead of the fused one.
    naive: bool,
    /// The emulator's thread order and when asynchronous work lands (`FM_EMU_ORDER`, `FM_EMU_CP`;
    /// fm_emu.hpp).
    schedule: (&'static str, &'static str),
    /// Inputs with the suite's large outliers (tests/common: `margin_inputs`).
    outliers: bool,
    /// The wide tensor-core forward tiles (128 x 256) instead of the default 64 x 128.
    wide: bool,
    /// The wgmma forward (kernels/logits_wg.cu, 128 x 128 tiles; f16/bf16).
    wgmma: bool,
    /// Inputs with a zero feature row and a zero class row (tests/common: `zero_row_inputs`).
    zero_rows: bool,
    /// Inputs with a feature row and a class row of norm 0.7 eps (tests/common:
    /// `tiny_row_inputs`): the eps path with a nonzero direction.
    tiny_rows: bool,
    /// Counted rows labelled 0 and C - 1 alternately.
    labels_at_ends: bool,
    /// `LabelCheck::Device` (the default): the label status and the backward's upstream come
    /// from the device kernels (kernels/labels.cu) instead of the host.
    device_labels: bool,
    /// The workspaces of pooled (fused) plans carved from one arena buffer shared by the forward
    /// and the backward, as the handle's executor does (`LaunchPlan::arena_layout`), so the
    /// backward's workspaces start with the forward's stale values. Off under the sanitizer, which
    /// then bounds every workspace on its own.
    arena: bool,
    /// The device and choices to build the plans from, instead of those the flags above stand
    /// for on an H200 (`every_distinct_plan_the_builder_makes`).
    planned: Option<(plan::DeviceFacts, plan::Choices)>,
    /// Gradients in the 16-bit input dtype (`FusedMarginLoss::backward`'s default) instead of f32
    /// (`backward_f32`): the entry points without `_f32out`.
    grad16: bool,
    /// A wait or barrier of the tensor-core backward to leave out (`FM_EMU_FAULT`, read by
    /// kernels/grad_tc.cu's `FM_GT_KEEP` under the emulator only): the mutation tests.
    fault: Option<&'static str>,
    /// ElasticFace's generator (with an ElasticFace spec): the per-row margins the host draws and
    /// binds as [`plan::Buf::RowMargins`], as the handle does.
    elastic: Option<ElasticRng>,
    /// The loss's state in (AdaFace, CurricularFace), bound as [`plan::Buf::StateIn`].
    state: Option<LossState>,
    /// Feature rows rescaled to norms spread over 4..124 (MagFace's clamp 10..110 and AdaFace's
    /// statistics need norms of that size; either side of MagFace's clamp is covered).
    norm_spread: bool,
    seed: u64,
}

impl Case {
    /// The per-row inputs of the case: ElasticFace's seeded margins, the state in.
    fn row_inputs(&self) -> RowInputs<'static> {
        RowInputs {
            state: self.state,
            margins: self.elastic.map(ElasticMargins::Seeded),
        }
    }
}

struct Outputs {
    loss: f64,
    lse: Vec<f64>,
    row_loss: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    /// With `device_labels`: the forward's and the backward's status records (6 i64 each).
    status: Vec<i64>,
    /// Whether the forward's and the backward's main kernels were the tensor-core ones.
    tensor_cores: (bool, bool),
    /// Whether the forward ran on wgmma.
    wgmma: bool,
    /// The state out the forward wrote ([`plan::state_of`]), for the losses with state.
    state: Option<LossState>,
}

fn floats(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect()
}

/// The device the emulated plans are built for: an H200 (sm_90a module, 132 SMs, 227 KB), no
/// cuBLAS (the emulator runs kernels only).
const EMU_DEVICE: plan::DeviceFacts = plan::DeviceFacts {
    sm90a: true,
    ..plan::DeviceFacts::H100
};

/// The handle's choices a case stands for.
fn choices(case: &Case, dtype: DType) -> plan::Choices {
    let half = dtype != DType::F32;
    plan::Choices {
        plan: if case.naive {
            cuda::Plan::Naive
        } else {
            cuda::Plan::Fused
        },
        tensor_cores: !half || case.fwd_tc,
        tf32: !half && case.fwd_tc,
        wide_tiles: case.wide,
        wgmma: case.wgmma,
        tc_backward: case.bwd_tc,
        label_check: if case.device_labels {
            cuda::LabelCheck::Device
        } else {
            cuda::LabelCheck::Host
        },
        tiles_per_split: Some((case.fwd_tps as usize, case.bwd_tps as usize)),
    }
}

/// The forward and backward plans the crate builds for `case` (f32 gradients).
fn plans(
    case: &Case,
    dtype: DType,
    labels: &[i32],
    dev: &plan::DeviceFacts,
    ch: &plan::Choices,
) -> (plan::LaunchPlan, plan::LaunchPlan) {
    let params = cuda::params::FmParams::from_spec(&case.spec);
    let mean = case.spec.reduction == Reduction::Mean;
    let fwd = plan::forward(
        dev,
        ch,
        &plan::ForwardProblem {
            dtype,
            shape: case.shape,
            aligned: true,
            params,
            mean,
            row_margins: case.elastic.is_some(),
        },
    )
    .unwrap();
    let counted = labels.iter().filter(|&&l| l >= 0).count();
    // As FusedMarginLoss::backward: the host's per-row value of the scalar upstream 1 under
    // LabelCheck::Host, the scalar itself under Device (the kernels divide by the count).
    let device_labels = ch.label_check == cuda::LabelCheck::Device;
    let upstream = match (case.spec.reduction, device_labels) {
        (Reduction::None, _) => plan::PlanUpstream::PerRow,
        (_, true) => plan::PlanUpstream::Scalar(1.0),
        (Reduction::Mean, false) => plan::PlanUpstream::Scalar(if counted > 0 {
            1.0 / counted as f32
        } else {
            0.0
        }),
        (Reduction::Sum, false) => plan::PlanUpstream::Scalar(1.0),
    };
    let bwd = plan::backward(
        dev,
        ch,
        &plan::BackwardProblem {
            dtype,
            grad_dtype: if case.grad16 { dtype } else { DType::F32 },
            shape: case.shape,
            aligned: true,
            params,
            mean,
            upstream,
            fwd_tensor_cores: fwd.tensor_cores,
            row_margins: case.elastic.is_some(),
        },
    )
    .unwrap();
    (fwd, bwd)
}

/// A job for the emulator driver (tests/emu/driver.cpp): buffers, launches, outputs.
#[derive(Default)]
struct Job {
    bufs: Vec<u8>,
    nbuf: u32,
    launches: Vec<u8>,
    nlaunch: u32,
    next_id: u32,
    /// The arena buffer and the offsets (f32 elements) of the plan being added's pooled
    /// workspaces (`LaunchPlan::arena_layout`).
    arena: Option<(u32, Vec<(plan::Buf, usize)>)>,
}

impl Job {
    fn buffer(&mut self, elem: u32, len: usize, init: BufInit) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.nbuf += 1;
        self.bufs.extend(id.to_le_bytes());
        self.bufs.extend(elem.to_le_bytes());
        self.bufs.extend((len as u64).to_le_bytes());
        match init {
            BufInit::Data(d) => {
                assert_eq!(d.len(), elem as usize * len, "buffer data length");
                self.bufs.push(0);
                self.bufs.extend(d);
            }
            BufInit::Fill(p) => {
                self.bufs.push(1);
                self.bufs.extend(p);
            }
            BufInit::View { parent, offset } => {
                self.bufs.push(3);
                self.bufs.extend(parent.to_le_bytes());
                self.bufs.extend(offset.to_le_bytes());
            }
        }
        id
    }

    /// The plan's allocations (poisoned with NaN, as every GPU test poisons) and launches, with
    /// `ids` mapping roles to buffers already in the job.
    fn add_plan(&mut self, p: &plan::LaunchPlan, ids: &mut HashMap<plan::Buf, u32>) {
        self.add_plan_grad(p, ids, (4, f32::NAN.to_le_bytes().to_vec()));
    }

    /// `add_plan` with the gradients' element size and NaN pattern.
    fn add_plan_grad(
        &mut self,
        p: &plan::LaunchPlan,
        ids: &mut HashMap<plan::Buf, u32>,
        grad: (u32, Vec<u8>),
    ) {
        for spec in &p.buffers {
            let pooled = self.arena.as_ref().and_then(|(aid, offs)| {
                offs.iter()
                    .find(|(b, _)| *b == spec.buf)
                    .map(|&(_, off)| (*aid, off))
            });
            let plan::Init::Uninit = spec.init;
            let (elem, init) = match (pooled, spec.elem) {
                (Some((parent, off)), _) => (
                    4,
                    BufInit::View {
                        parent,
                        offset: 4 * off as u64,
                    },
                ),
                // Uninitialized on the GPU; 0x7f.. bytes here, which no status field holds.
                (None, plan::Elem::I64) => (8, BufInit::Fill(vec![0x7f; 8])),
                (None, plan::Elem::Grad) => (grad.0, BufInit::Fill(grad.1.clone())),
                (None, plan::Elem::F32) => (4, BufInit::Fill(f32::NAN.to_le_bytes().to_vec())),
            };
            let id = self.buffer(elem, spec.len.max(1), init);
            ids.insert(spec.buf, id);
        }
        for l in p.launches() {
            self.nlaunch += 1;
            let out = &mut self.launches;
            out.extend((l.entry.len() as u16).to_le_bytes());
            out.extend(l.entry.as_bytes());
            for g in l.grid {
                out.extend(g.to_le_bytes());
            }
            out.extend(l.block.to_le_bytes());
            out.extend(l.smem.to_le_bytes());
            // The argument struct's name (empty for positional parameters): the driver holds it
            // to the kernel's own.
            let packed = l.packed.map_or("", |p| p.name);
            out.extend((packed.len() as u16).to_le_bytes());
            out.extend(packed.as_bytes());
            out.extend((l.args.len() as u32).to_le_bytes());
            for a in &l.args {
                match *a {
                    plan::Arg::Read(b) | plan::Arg::Write(b) => {
                        out.push(if matches!(a, plan::Arg::Read(_)) {
                            0
                        } else {
                            1
                        });
                        let id = *ids
                            .get(&b)
                            .unwrap_or_else(|| panic!("{}: no buffer for {b:?}", l.entry));
                        out.extend(id.to_le_bytes());
                    }
                    plan::Arg::Null => out.push(2),
                    plan::Arg::I64(v) => {
                        out.push(3);
                        out.extend(v.to_le_bytes());
                    }
                    plan::Arg::I32(v) => {
                        out.push(4);
                        out.extend(v.to_le_bytes());
                    }
                    plan::Arg::F32(v) => {
                        out.push(5);
                        out.extend(v.to_le_bytes());
                    }
                    plan::Arg::Params(p) => {
                        out.push(6);
                        out.extend(bytemuck::bytes_of(&p));
                    }
                }
            }
        }
        assert!(
            p.steps.iter().all(|s| matches!(s, plan::Step::Kernel(_))),
            "the emulator runs kernels only (no cuBLAS)"
        );
    }

    fn bytes(&self, outputs: &[u32]) -> Vec<u8> {
        let mut v = b"FMJ1".to_vec();
        v.extend(self.nbuf.to_le_bytes());
        v.extend(&self.bufs);
        v.extend(self.nlaunch.to_le_bytes());
        v.extend(&self.launches);
        v.extend((outputs.len() as u32).to_le_bytes());
        for o in outputs {
            v.extend(o.to_le_bytes());
        }
        v
    }
}

enum BufInit {
    /// `len` elements at `offset` bytes into buffer `parent` (the arena).
    View {
        parent: u32,
        offset: u64,
    },
    Data(Vec<u8>),
    Fill(Vec<u8>),
}

/// Runs a job on the emulator driver; returns the output bytes.
fn run_job(
    exe: &Path,
    job: &Job,
    outputs: &[u32],
    tag: &str,
    schedule: (&str, &str),
    fault: Option<&str>,
) -> Vec<u8> {
    let (o, out) = try_job(exe, job, outputs, tag, schedule, fault);
    assert!(
        o.status.success(),
        "emulator failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out.expect("the emulator exited 0 without writing its output")
}

/// Exit codes of a sanitized driver's reports (`try_job`), told apart from the driver's own
/// failures (exit 2, abort).
const ASAN_EXIT: i32 = 23;
const UBSAN_EXIT: i32 = 24;

/// Runs a job on the emulator driver; returns how the driver exited and, when it wrote them, the
/// output bytes.
fn try_job(
    exe: &Path,
    job: &Job,
    outputs: &[u32],
    tag: &str,
    schedule: (&str, &str),
    fault: Option<&str>,
) -> (std::process::Output, Option<Vec<u8>>) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let tag = format!("{}_{tag}", std::process::id());
    let (inp, outp) = (
        dir.join(format!("in_{tag}")),
        dir.join(format!("out_{tag}")),
    );
    std::fs::write(&inp, job.bytes(outputs)).unwrap();
    let _ = std::fs::remove_file(&outp);
    // Read by a sanitized driver only (FM_EMU_SANITIZE=1), ignored by a plain one; the caller's
    // own ASAN_OPTIONS / UBSAN_OPTIONS come after these and win. Every report ends the run with
    // its own exit code (halt_on_error; abort_on_error=0 exits instead of raising SIGABRT).
    // detect_leaks=0: the driver never frees its buffers, by design.
    // detect_stack_use_after_return=0: the emulator runs a block's threads as ucontext fibers
    // (tests/emu/fm_emu.hpp) without ASan's fiber-switch annotations, and ASan's fake stack (the
    // use-after-return detector) is one per OS thread: frames of fibers that interleave on it are
    // released as if one stack had unwound, which can give false reports. (GCC's runtime leaves
    // it off by default; clang's turns it on.) ASan's swapcontext interceptor also clears the
    // shadow of the whole stack it switches to, so locals of a fiber's frames that live across a
    // barrier lose their redzones and overruns of them go unseen (globals, `__shared__` statics,
    // dynamic shared memory, the job's heap buffers and an overflow of a fiber's heap-allocated
    // stack are still seen), and it prints one warning that it "doesn't fully support
    // makecontext/swapcontext".
    let join = |ours: &str, var: &str| match std::env::var(var) {
        Ok(theirs) if !theirs.is_empty() => format!("{ours}:{theirs}"),
        _ => ours.to_string(),
    };
    let o = Command::new(exe)
        .arg(&inp)
        .arg(&outp)
        .env("FM_EMU_ORDER", schedule.0)
        .env("FM_EMU_CP", schedule.1)
        .env("FM_EMU_FAULT", fault.unwrap_or(""))
        .env(
            "ASAN_OPTIONS",
            join(
                &format!(
                    "halt_on_error=1:abort_on_error=0:exitcode={ASAN_EXIT}:detect_leaks=0:\
                     detect_stack_use_after_return=0"
                ),
                "ASAN_OPTIONS",
            ),
        )
        .env(
            "UBSAN_OPTIONS",
            join(
                &format!(
                    "halt_on_error=1:abort_on_error=0:exitcode={UBSAN_EXIT}:print_stacktrace=1"
                ),
                "UBSAN_OPTIONS",
            ),
        )
        .output()
        .unwrap();
    let out = std::fs::read(&outp).ok();
    let _ = std::fs::remove_file(&inp);
    let _ = std::fs::remove_file(&outp);
    (o, out)
}

/// One emulated forward and backward of `case`: the plans the crate builds for it run on the
/// emulator, every allocated buffer poisoned. `bwd_labels` are the labels the backward is
/// called with (the forward's, unless a test feeds it others).
fn run<T: Element + Bits>(
    exe: &Path,
    case: &Case,
    x: &[T],
    w: &[T],
    labels: &[i32],
    bwd_labels: &[i32],
    up: &[f32],
) -> Outputs {
    let Shape { b, d, c } = case.shape;
    let c = c * case.spec.variant.centers(); // the rows of w (C K with sub-centers)
    let (dev, ch) = case
        .planned
        .unwrap_or_else(|| (EMU_DEVICE, choices(case, T::DTYPE)));
    let (fwd, bwd) = plans(case, T::DTYPE, labels, &dev, &ch);
    let esize = std::mem::size_of::<T>() as u32;
    let bits = |v: &[T]| v.iter().flat_map(|e| e.to_le_bits()).collect::<Vec<u8>>();
    let i32s = |v: &[i32]| v.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
    let mut job = Job::default();
    use plan::Buf;
    let xid = job.buffer(esize, b * d, BufInit::Data(bits(x)));
    let wid = job.buffer(esize, c * d, BufInit::Data(bits(w)));
    let lid = job.buffer(4, b, BufInit::Data(i32s(labels)));
    let gid = job.buffer(
        4,
        b,
        BufInit::Data(up.iter().flat_map(|g| g.to_le_bytes()).collect()),
    );
    let mut fids = HashMap::from([
        (Buf::X, xid),
        (Buf::W, wid),
        (Buf::Labels, lid),
        (Buf::GRows, gid),
    ]);
    // The per-row margins, drawn on the host by the handle's own function.
    let rmid = plan::row_margins(&case.spec, &case.row_inputs(), b)
        .unwrap()
        .map(|m| {
            job.buffer(
                4,
                2 * b,
                BufInit::Data(m.iter().flat_map(|v| v.to_le_bytes()).collect()),
            )
        });
    if let Some(id) = rmid {
        fids.insert(Buf::RowMargins, id);
    }
    // The state in, as the handle copies it (f64 bit patterns in i64).
    if let Some(st) = plan::state_in(&case.spec, &case.row_inputs(), b).unwrap() {
        let id = job.buffer(
            8,
            st.len(),
            BufInit::Data(st.iter().flat_map(|v| v.to_le_bytes()).collect()),
        );
        fids.insert(Buf::StateIn, id);
    }
    // One arena for both plans, as large as the larger needs, poisoned once (as a handle's is
    // when it poisons): the backward's workspaces reuse the forward's memory.
    let (fl, fo) = fwd.arena_layout(&plan::FORWARD_OUTPUTS);
    let (bl, bo) = bwd.arena_layout(&plan::BACKWARD_OUTPUTS);
    let aid = (case.arena && !sanitized() && fl.max(bl) > 0).then(|| {
        job.buffer(
            4,
            fl.max(bl),
            BufInit::Fill(f32::NAN.to_le_bytes().to_vec()),
        )
    });
    job.arena = aid.map(|a| (a, fo));
    job.add_plan(&fwd, &mut fids);
    job.arena = aid.map(|a| (a, bo));
    let blid = job.buffer(4, b, BufInit::Data(i32s(bwd_labels)));
    let mut bids = HashMap::from([
        (Buf::X, xid),
        (Buf::W, wid),
        (Buf::Labels, blid),
        (Buf::GRows, gid),
    ]);
    for r in [Buf::XNorm, Buf::WNorm, Buf::Lse] {
        bids.insert(r, fids[&r]);
    }
    if let Some(id) = rmid {
        bids.insert(Buf::RowMargins, id);
    }
    // The device's margins (AdaFace, ElasticFace+), which the naive backward reads again.
    if let Some(&m) = fids.get(&Buf::DevMargins) {
        bids.insert(Buf::DevMargins, m);
    }
    // The fused forward's target record, which its backward reads (the naive plan has none).
    if let Some(&t) = fids.get(&Buf::Target) {
        bids.insert(Buf::Target, t);
    }
    if let Some(&s) = fids.get(&Buf::Status) {
        bids.insert(Buf::PrevStatus, s);
    }
    let grad = if case.grad16 {
        (esize, T::nan_bits())
    } else {
        (4, f32::NAN.to_le_bytes().to_vec())
    };
    job.add_plan_grad(&bwd, &mut bids, grad);
    let mut outs = vec![
        fids[&Buf::Loss],
        fids[&Buf::Lse],
        fids[&Buf::RowLoss],
        bids[&Buf::Dx],
        bids[&Buf::Dw],
    ];
    if case.device_labels {
        outs.extend([fids[&Buf::Status], bids[&Buf::Status]]);
    }
    let state_len = fwd.spec_of(Buf::StateOut).map_or(0, |s| s.len);
    if state_len > 0 {
        outs.push(fids[&Buf::StateOut]);
    }
    let tag = format!("{}_{}", case.seed, T::DTYPE.suffix());
    let out = run_job(exe, &job, &outs, &tag, case.schedule, case.fault);
    let gsize = if case.grad16 { esize as usize } else { 4 };
    let n = 1 + 2 * b;
    let ng = b * d + c * d;
    let status_len = if case.device_labels { 12 } else { 0 };
    assert_eq!(
        out.len(),
        4 * n + gsize * ng + 8 * (status_len + state_len),
        "emulator output size"
    );
    let f = floats(&out[..4 * n]);
    let gr: Vec<f64> = if case.grad16 {
        out[4 * n..4 * n + gsize * ng]
            .chunks_exact(gsize)
            .map(T::from_le_bits)
            .collect()
    } else {
        floats(&out[4 * n..4 * n + 4 * ng])
    };
    let tail: Vec<i64> = out[4 * n + gsize * ng..]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (status, state_bits) = tail.split_at(status_len);
    Outputs {
        status: status.to_vec(),
        state: plan::state_of(&case.spec, state_bits),
        tensor_cores: (fwd.tensor_cores, bwd.tensor_cores),
        wgmma: fwd.wgmma,
        loss: f[0],
        lse: f[1..1 + b].to_vec(),
        row_loss: f[1 + b..1 + 2 * b].to_vec(),
        dx: gr[..b * d].to_vec(),
        dw: gr[b * d..].to_vec(),
    }
}

/// The plan the crate built ran the kernels the case asked for wherever the shape allows them
/// (16-byte chunks: D % 8 == 0 for 16-bit inputs, D % 4 == 0 for f32; the tensor-core backward
/// only after a tensor-core forward's choice of tensor cores), and the fallbacks elsewhere.
fn assert_ran_as_asked<T: Element>(case: &Case, out: &Outputs) {
    if case.planned.is_some() {
        return; // the flags do not describe the choices then
    }
    let half = T::DTYPE != DType::F32;
    let eligible = case.shape.d % if half { 8 } else { 4 } == 0;
    let fwd_tc = !case.naive && case.fwd_tc && eligible;
    let what = format!("{:?} {:?}", T::DTYPE, case.shape);
    assert_eq!(out.tensor_cores.0, fwd_tc, "{what}: tensor-core forward");
    assert_eq!(out.wgmma, fwd_tc && half && case.wgmma, "{what}: wgmma");
    // Sub-centers: the SIMT backward whatever was asked (the tensor-core one has no winners).
    let sub = case.spec.variant.centers() > 1;
    assert_eq!(
        out.tensor_cores.1,
        fwd_tc && half && case.bwd_tc && !sub,
        "{what}: tensor-core backward"
    );
}

/// Little-endian bits of an element, as the kernels read and write them.
trait Bits {
    fn to_le_bits(&self) -> Vec<u8>;
    /// The value of one element's little-endian bytes.
    fn from_le_bits(b: &[u8]) -> f64;
    /// A NaN's bytes (the poison of a fresh buffer).
    fn nan_bits() -> Vec<u8>;
}
impl Bits for f32 {
    fn to_le_bits(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
    fn from_le_bits(b: &[u8]) -> f64 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64
    }
    fn nan_bits() -> Vec<u8> {
        f32::NAN.to_le_bytes().to_vec()
    }
}
impl Bits for f16 {
    fn to_le_bits(&self) -> Vec<u8> {
        self.to_bits().to_le_bytes().to_vec()
    }
    fn from_le_bits(b: &[u8]) -> f64 {
        f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64()
    }
    fn nan_bits() -> Vec<u8> {
        f16::NAN.to_bits().to_le_bytes().to_vec()
    }
}
impl Bits for bf16 {
    fn to_le_bits(&self) -> Vec<u8> {
        self.to_bits().to_le_bytes().to_vec()
    }
    fn from_le_bits(b: &[u8]) -> f64 {
        bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64()
    }
    fn nan_bits() -> Vec<u8> {
        bf16::NAN.to_bits().to_le_bytes().to_vec()
    }
}

/// The CPU reference of `case` on the rounded inputs: the upstream as the kernels take it (f32),
/// the forward, the gradients (scalar upstream 1 unless the reduction is none) and the per-row
/// upstream those used.
fn reference_of<T: Element>(
    case: &Case,
    x: &[T],
    w: &[T],
    inp: &common::Inputs,
) -> (Vec<f32>, cpu::Forward, cpu::Gradients, Vec<f64>) {
    let up32: Vec<f32> = inp.upstream.iter().map(|&v| v as f32).collect();
    let up64: Vec<f64> = up32.iter().map(|&v| v as f64).collect();
    let reference = cpu::forward_with(
        &case.spec,
        x,
        w,
        &inp.labels,
        case.shape,
        &case.row_inputs(),
    )
    .unwrap();
    let cpu_up = match case.spec.reduction {
        Reduction::None => Upstream::PerRow(&up64),
        _ => Upstream::Scalar(1.0),
    };
    let rg = cpu::backward(
        &case.spec,
        &reference,
        x,
        w,
        &inp.labels,
        case.shape,
        cpu_up,
    )
    .unwrap();
    let g_rows = cpu_up.per_row(case.spec.reduction, &inp.labels).unwrap();
    (up32, reference, rg, g_rows)
}

/// Runs `case` on the emulator and checks every output against the CPU reference on the same
/// rounded inputs. Unwritten outputs are NaN (the driver poisons them) and fail the checks.
fn check<T: Element + Bits>(case: &Case) {
    let Some(exe) = driver(T::DTYPE) else { return };
    let what = format!(
        "{:?} {:?} naive={} fwd_tc={} wide={} wgmma={} bwd_tc={} tps=({}, {}) {:?}",
        T::DTYPE,
        case.shape,
        case.naive,
        case.fwd_tc,
        case.wide,
        case.wgmma,
        case.bwd_tc,
        case.fwd_tps,
        case.bwd_tps,
        case.spec
    );
    let k = case.spec.variant.centers();
    let mut inp = if case.zero_rows {
        common::zero_row_inputs(case.shape, case.seed)
    } else if case.tiny_rows {
        common::tiny_row_inputs(case.shape, case.seed)
    } else if k > 1 {
        // Sub-centers: C K rows of w (class-major), labels folded into 0..C.
        let Shape { b, d, c } = case.shape;
        let mut inp = margin_inputs_opts(Shape::new(b, d, c * k), case.seed, case.outliers);
        inp.labels
            .iter_mut()
            .filter(|l| **l >= 0)
            .for_each(|l| *l /= k as i32);
        inp
    } else {
        margin_inputs_opts(case.shape, case.seed, case.outliers)
    };
    if !case.spec.normalize_weights {
        inp.w.iter_mut().for_each(|v| *v *= 0.25); // moderate raw logits, as gpu_vs_cpu does
    }
    if case.norm_spread {
        spread_norms(&mut inp.x, case.shape);
    }
    if case.labels_at_ends {
        for (i, l) in inp.labels.iter_mut().enumerate() {
            if *l >= 0 {
                *l = if i % 2 == 0 {
                    0
                } else {
                    case.shape.c as i32 - 1
                };
            }
        }
    }
    let x: Vec<T> = inp.x.iter().map(|&v| T::from_f64(v)).collect();
    let w: Vec<T> = inp.w.iter().map(|&v| T::from_f64(v)).collect();
    let (up32, reference, rg, g_rows) = reference_of(case, &x, &w, &inp);
    assert!(reference.loss.is_finite(), "{what}: reference not finite");

    let out = run(&exe, case, &x, &w, &inp.labels, &inp.labels, &up32);
    assert_ran_as_asked::<T>(case, &out);
    if case.device_labels {
        let counted = inp.labels.iter().filter(|&&l| l >= 0).count() as i64;
        // Forward status: counted, no bad row; backward: same fingerprint, no mismatch.
        assert_eq!(
            &out.status[..3],
            &[counted, -1, 0],
            "{what}: forward label status"
        );
        assert_eq!(
            out.status[6..9],
            out.status[..3],
            "{what}: backward label status"
        );
        assert_eq!(out.status[9], out.status[3], "{what}: fingerprints differ");
        assert_eq!(&out.status[10..], &[0, counted], "{what}: mismatch flag");
    }
    let tf32 = T::DTYPE == DType::F32 && out.tensor_cores.0; // what ran
    let (lbar, gbar) = if tf32 { TF32_BARS } else { bars(T::DTYPE) };
    // MATH.md's conditioning clause: where a target sits within ~1 degree of the angle clamp, the
    // bars apply to the spread of the reference over target cosines moved by this path's
    // rounding of a cosine; everywhere else the allowance is 0.
    let (x64, w64): (Vec<f64>, Vec<f64>) = (
        x.iter().map(|v| v.to_f64()).collect(),
        w.iter().map(|v| v.to_f64()).collect(),
    );
    let (a_rows, a_dx, a_dw) = common::conditioning_allowance(
        &case.spec,
        &x64,
        &w64,
        &inp.labels,
        case.shape,
        &g_rows,
        common::cosine_rounding(case.shape.d, tf32),
    );
    let e_rows = rel(&out.row_loss, &reference.row_loss);
    let e_lse = rel(&out.lse, &reference.lse);
    assert!(
        e_rows <= lbar + a_rows && e_lse <= lbar + a_rows,
        "{what}: row loss rel {e_rows:e}, lse rel {e_lse:e} (allowance {a_rows:e})"
    );
    if case.spec.reduction != Reduction::None {
        let e = (out.loss - reference.loss).abs() / reference.loss.abs().max(1e-30);
        assert!(
            e <= lbar + a_rows || reference.loss == 0.0 && out.loss == 0.0,
            "{what}: loss {} vs {}",
            out.loss,
            reference.loss
        );
    }
    assert!(
        out.dx.iter().chain(&out.dw).all(|v| v.is_finite()),
        "{what}: non-finite or unwritten gradient"
    );
    let (ex, ew) = (rel(&out.dx, &rg.dx), rel(&out.dw, &rg.dw));
    assert!(
        ex <= gbar + a_dx && ew <= gbar + a_dw,
        "{what}: dx rel {ex:e}, dw rel {ew:e} (bar {gbar:e}, allowances {a_dx:e}, {a_dw:e})"
    );
    // The state out: the reference's, to the loss bar (f32 norms and cosines summed in f64).
    let pairs = match (out.state, reference.state) {
        (None, None) => vec![],
        (Some(LossState::AdaFace { mean, std }), Some(LossState::AdaFace { mean: m, std: s })) => {
            vec![(mean, m), (std, s)]
        }
        (Some(LossState::CurricularFace { t }), Some(LossState::CurricularFace { t: r })) => {
            vec![(t, r)]
        }
        (o, r) => panic!("{what}: state out {o:?}, reference {r:?}"),
    };
    for (o, r) in pairs {
        assert!(
            (o - r).abs() <= lbar * r.abs().max(1e-3),
            "{what}: state out {o} vs {r}"
        );
    }
}

/// Rescales feature row i to norm 4 + 120 ((7 i) mod B) / B: norms from 4 to 124 in a scrambled
/// order, so MagFace's clamp (10..110) is crossed on both sides and AdaFace's z spreads.
fn spread_norms(x: &mut [f64], shape: Shape) {
    let (b, d) = (shape.b, shape.d);
    for i in 0..b {
        let row = &mut x[i * d..(i + 1) * d];
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if n > 0.0 {
            let target = 4.0 + 120.0 * ((7 * i) % b) as f64 / b as f64;
            row.iter_mut().for_each(|v| *v *= target / n);
        }
    }
}

fn case(
    spec: MarginLoss,
    shape: (usize, usize, usize),
    tc: bool,
    tps: (i32, i32),
    seed: u64,
) -> Case {
    Case {
        spec,
        shape: Shape::new(shape.0, shape.1, shape.2),
        fwd_tc: tc,
        bwd_tc: tc,
        fwd_tps: tps.0,
        bwd_tps: tps.1,
        naive: false,
        schedule: ("forward", "eager"),
        outliers: true,
        wide: false,
        wgmma: false,
        zero_rows: false,
        tiny_rows: false,
        labels_at_ends: false,
        device_labels: true,
        arena: true,
        planned: None,
        grad16: false,
        fault: None,
        elastic: None,
        state: None,
        norm_spread: false,
        seed,
    }
}

/// Every option that changes the maths, on the tensor-core path.
fn tc_specs() -> Vec<MarginLoss> {
    vec![
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35),
        MarginLoss::nsl(16.0).reduction(Reduction::Sum),
        MarginLoss::sphereface(4.0).lambda(5.0),
        MarginLoss::combined(1.0, 0.3, 0.2).reduction(Reduction::None),
        MarginLoss::arcface(0.5)
            .policy(OverflowPolicy::Easy)
            .gradient(GradientMode::Detached),
        MarginLoss::cosface(0.35)
            .normalize_features(false)
            .scale(1.0),
        MarginLoss::arcface(0.5)
            .normalize_weights(false)
            .reduction(Reduction::None),
    ]
}

#[test]
fn tensor_core_forward_and_backward_bf16() {
    for (k, spec) in tc_specs().into_iter().enumerate() {
        check::<bf16>(&case(spec, (45, 136, 300), true, (1, 2), 100 + k as u64));
    }
}

/// D > 256: the backward's FmGt<32> tiles (32 own rows x 512 columns, fm_grad_*_tc_d512), for
/// every option, with B and C off the tile multiples, D = 512 exactly and a partial chunk.
#[test]
fn tensor_core_backward_d512_tiles() {
    for (k, spec) in tc_specs().into_iter().enumerate() {
        check::<bf16>(&case(spec, (45, 296, 230), true, (1, 2), 150 + k as u64));
        check::<f16>(&case(spec, (33, 512, 97), true, (2, 1), 160 + k as u64));
    }
}

#[test]
fn tensor_core_forward_and_backward_f16() {
    for (k, spec) in tc_specs().into_iter().enumerate() {
        check::<f16>(&case(spec, (70, 40, 131), true, (2, 1), 200 + k as u64));
    }
}

/// ElasticFace: per-row margins the host draws (the handle's `plan::row_margins`), bound as an
/// input and read where each row's target is formed (fm_target_rows, naive_logits), so every
/// tile kernel runs unchanged. Arc and Cos on every kind of plan: SIMT (f32), tensor cores
/// forward and backward (bf16, f16), wgmma (bf16), naive (f32).
#[test]
fn elastic_face_per_row_margins_on_every_path() {
    let rng = ElasticRng {
        seed: 5,
        step: 77,
        row_offset: 11,
    };
    let arc = MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None);
    let cos =
        MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::None).reduction(Reduction::None);
    // Fallback past pi - m_i (the inputs' rows near -w_y cross it): the per-row shift
    // m2_i sin m2_i that fm_row_margin_given takes in double.
    let fallback = arc.policy(OverflowPolicy::Fallback);
    for (k, spec) in [arc, cos, fallback].into_iter().enumerate() {
        let seed = 2400 + 10 * k as u64;
        let c = |tc, shape| Case {
            elastic: Some(rng),
            ..case(spec, shape, tc, (1, 2), seed)
        };
        if spec.effective_policy() == OverflowPolicy::Fallback && spec.has_angular_margin() {
            // Some counted row must pass pi - m_i, or the per-row shift goes unchecked.
            let shape = Shape::new(37, 20, 70);
            let inp = margin_inputs(shape, seed);
            let m = plan::row_margins(
                &spec,
                &RowInputs::with_margins(ElasticMargins::Seeded(rng)),
                37,
            )
            .unwrap()
            .unwrap();
            let d = shape.d;
            let unit = |v: &[f64]| {
                let n = v.iter().map(|e| e * e).sum::<f64>().sqrt();
                v.iter().map(|e| e / n).collect::<Vec<f64>>()
            };
            let crossing = (0..shape.b).filter(|&i| inp.labels[i] >= 0).any(|i| {
                let y = inp.labels[i] as usize;
                let (xh, wh) = (
                    unit(&inp.x[i * d..(i + 1) * d]),
                    unit(&inp.w[y * d..(y + 1) * d]),
                );
                let c: f64 = xh.iter().zip(&wh).map(|(a, b)| a * b).sum();
                c.acos() + m[2 * i] as f64 > std::f64::consts::PI
            });
            assert!(crossing, "no row passes pi - m_i");
        }
        check::<f32>(&c(false, (37, 20, 70)));
        check::<bf16>(&c(true, (45, 40, 131)));
        check::<f16>(&c(true, (33, 48, 97)));
        check::<bf16>(&Case {
            wgmma: true,
            ..c(true, (40, 64, 200))
        });
        check::<f32>(&Case {
            naive: true,
            ..c(false, (21, 12, 30))
        });
    }
}

/// The losses whose rows' margins, thresholds or state the device computes (docs/MATH.md
/// "Losses with per-row or batch state"): AdaFace (batch norm statistics, its margins and the
/// Clip policy), CurricularFace (t from the target cosines, hard negatives in every tile
/// epilogue and in the backward), MagFace (margins from the norm, the regularizer and the norm
/// gradient), ElasticFace+ (Rank and Published: the drawn margins reordered by target cosine).
/// Each on SIMT (f32), tensor cores forward and backward (bf16, f16), wgmma (bf16) and the naive
/// plan (f32), with the state out checked against the reference's.
#[test]
fn losses_with_state_on_every_path() {
    let rng = ElasticRng {
        seed: 9,
        step: 3,
        row_offset: 40,
    };
    let cases: [(MarginLoss, Option<LossState>, bool); 6] = [
        (
            MarginLoss::adaface(),
            Some(LossState::AdaFace {
                mean: 40.0,
                std: 30.0,
            }),
            false,
        ),
        // Fallback and the full gradient of the sum: AdaFace's true clamp past pi - m2_i.
        (
            MarginLoss::adaface()
                .policy(OverflowPolicy::Fallback)
                .reduction(Reduction::Sum),
            Some(LossState::ADAFACE_INIT),
            false,
        ),
        (
            MarginLoss::curricularface(),
            Some(LossState::CurricularFace { t: 0.3 }),
            false,
        ),
        (
            MarginLoss::magface().reduction(Reduction::None),
            None,
            false,
        ),
        (
            MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank),
            None,
            true,
        ),
        (
            MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::Published),
            None,
            true,
        ),
    ];
    for (k, (spec, state, elastic)) in cases.into_iter().enumerate() {
        let seed = 2600 + 10 * k as u64;
        let c = |tc, shape| Case {
            elastic: elastic.then_some(rng),
            state,
            norm_spread: true,
            ..case(spec, shape, tc, (1, 2), seed)
        };
        if let fused_margin::Variant::CurricularFace(_) = spec.variant {
            // Hard negatives must occur, or the tiles' modulation goes unchecked.
            let shape = Shape::new(37, 20, 70);
            let mut inp = margin_inputs(shape, seed);
            spread_norms(&mut inp.x, shape);
            let f = cpu::forward_with(
                &spec,
                &inp.x,
                &inp.w,
                &inp.labels,
                shape,
                &c(false, (37, 20, 70)).row_inputs(),
            )
            .unwrap();
            assert!(f.rows.hard.iter().sum::<usize>() > 0, "no hard negative");
        }
        check::<f32>(&c(false, (37, 20, 70)));
        check::<bf16>(&c(true, (45, 40, 131)));
        check::<f16>(&c(true, (33, 48, 97)));
        check::<bf16>(&Case {
            wgmma: true,
            ..c(true, (40, 64, 200))
        });
        check::<f32>(&Case {
            naive: true,
            ..c(false, (21, 12, 30))
        });
    }
}

/// Sub-center ArcFace on every plan and dtype: K dot tiles per class tile with their maximum in
/// the epilogue, the winners recomputed in the backward and dW to them alone (the other rows of
/// w get exact zeros from the reference, so a gradient sent to a loser fails the dw bar).
#[test]
fn subcenter_on_every_path() {
    let cases = [
        MarginLoss::subcenter(3),
        // CosFace's margin, the insightface policy (Raw) and the sum; weights unnormalized.
        MarginLoss::subcenter(2)
            .margins(1.0, 0.0, 0.35)
            .policy(OverflowPolicy::Raw)
            .reduction(Reduction::Sum),
        MarginLoss::subcenter(4).normalize_weights(false).scale(8.0),
    ];
    for (n, spec) in cases.into_iter().enumerate() {
        let seed = 2700 + 10 * n as u64;
        let c = |tc, shape| case(spec, shape, tc, (1, 2), seed);
        check::<f32>(&c(false, (37, 20, 23)));
        check::<bf16>(&c(false, (19, 24, 41)));
        check::<f16>(&c(false, (17, 16, 35)));
        // TF32 (f32 with tensor cores), then the 16-bit tiles; asking for the wide tiles gets
        // the narrow sub-center ones (a tensor-core forward all the same).
        check::<f32>(&c(true, (29, 36, 45)));
        check::<bf16>(&c(true, (45, 40, 67)));
        check::<f16>(&Case {
            wide: true,
            ..c(true, (33, 48, 50))
        });
        check::<bf16>(&Case {
            wgmma: true,
            ..c(true, (40, 64, 70))
        });
        check::<f32>(&Case {
            naive: true,
            ..c(false, (21, 12, 13))
        });
    }
}

/// Shapes at the tile edges: B and C of 1, one class, D of 8 (one chunk), D past 256 (the
/// backward's FmGt<32> tiles of 512 columns) and past 512 (two of its chunks), every class in one
/// split and one class tile per split.
#[test]
fn tensor_core_edge_shapes() {
    let spec = MarginLoss::arcface(0.5);
    for (k, (shape, tps)) in [
        ((1, 8, 1), (1, 1)),
        ((1, 16, 2), (1, 1)),
        ((65, 8, 129), (1, 1)),
        ((64, 264, 64), (1, 1)),
        ((3, 520, 70), (4, 4)),
        ((130, 24, 257), (3, 5)),
    ]
    .into_iter()
    .enumerate()
    {
        check::<bf16>(&case(spec, shape, true, tps, 300 + k as u64));
    }
}

/// `case` planned for `dev` (an sm_80/86 part, or an H100 at a width past the two-buffer limit)
/// with the choices its flags stand for; returns it with the number of partner buffers the
/// tensor-core backward got there (the last field of its FmGradArgs).
fn on_device(c: Case, dev: plan::DeviceFacts, dtype: DType) -> (Case, i32) {
    let ch = choices(&c, dtype);
    let c = Case {
        planned: Some((dev, ch)),
        ..c
    };
    let labels = margin_inputs(c.shape, c.seed).labels;
    let (_, bwd) = plans(&c, dtype, &labels, &dev, &ch);
    assert!(
        bwd.tensor_cores,
        "{:?} on {dev:?}: tensor-core backward",
        c.shape
    );
    let stages = bwd
        .launches()
        .filter(|l| l.entry.starts_with("fm_grad_x_tc") || l.entry.starts_with("fm_grad_w_tc"))
        .map(|l| match l.args.last() {
            Some(plan::Arg::I32(n)) => *n,
            other => panic!("{}: last field {other:?}", l.entry),
        })
        .reduce(|a, b| {
            assert_eq!(a, b, "both kernels get the same buffers");
            a
        })
        .expect("the tensor-core gradient kernels");
    (c, stages)
}

/// The tensor-core backward with one partner buffer, where two do not fit the device's shared
/// memory: D = 520 on an A100 (163 KB; two chunks of FmGt<32>), D = 384 and 480 on a 99 KB
/// sm_86 part (FmGt<32>, one chunk), D = 1,024 on an H100 (two chunks), bf16 and f16 (the
/// tile scaled in place); each dx block walks 2 or 3 class tiles and B > 64 gives the dw blocks
/// 2 row tiles, so tiles are reloaded into the one buffer after a product.
#[test]
fn tensor_core_backward_one_partner_buffer() {
    let spec = MarginLoss::arcface(0.5);
    let runs = [
        (DType::BF16, (70, 520, 150), plan::DeviceFacts::A100, (2, 2)),
        (DType::F16, (33, 520, 197), plan::DeviceFacts::A100, (1, 2)),
        (DType::F16, (70, 384, 140), plan::DeviceFacts::SM86, (1, 2)),
        (DType::BF16, (20, 480, 130), plan::DeviceFacts::SM86, (1, 3)),
        (DType::BF16, (20, 1024, 70), plan::DeviceFacts::H100, (1, 2)),
    ];
    for (k, (dt, shape, dev, tps)) in runs.into_iter().enumerate() {
        let (c, stages) = on_device(case(spec, shape, true, tps, 170 + k as u64), dev, dt);
        assert_eq!(stages, 1, "{shape:?} on {dev:?}");
        match dt {
            DType::BF16 => check::<bf16>(&c),
            _ => check::<f16>(&c),
        }
    }
    // On an H100 the same widths get two buffers (D = 520) or stay at one (D = 1,024).
    let c = case(spec, (45, 520, 150), true, (2, 1), 170);
    assert_eq!(on_device(c, plan::DeviceFacts::H100, DType::BF16).1, 2);
}

/// Mutation tests of the tensor-core backward's pipeline: each of its waits and barriers left
/// out in turn (`FM_EMU_FAULT`, emulator only) changes the outputs under a schedule that lets the
/// race show (copies landing only at their wait, a warp running ahead), for both dtypes (f16 has
/// the extra barriers around the in-place scale) and both buffer counts. So the schedules of
/// `no_races_under_other_schedules` would catch a kernel edit that lost one.
#[test]
fn a_missing_wait_or_barrier_in_the_tensor_core_backward_is_caught() {
    let spec = MarginLoss::arcface(0.5).reduction(Reduction::None);
    let bits =
        |o: &Outputs| -> Vec<u64> { o.dx.iter().chain(&o.dw).map(|v| v.to_bits()).collect() };
    // (hook, schedule, f16 only, one buffer only)
    let faults: [(&str, (&'static str, &'static str), bool, bool); 6] = [
        ("gt_wait", ("forward", "deferred"), false, false),
        ("gt_sync", ("greedy", "eager"), false, false),
        ("gt_es_sync", ("greedy-reverse", "eager"), false, false),
        ("gt_scale_sync", ("greedy-reverse", "eager"), true, false),
        ("gt_product_sync", ("greedy", "eager"), false, false),
        ("gt_reload_sync", ("greedy", "eager"), false, true),
    ];
    for dt in [DType::BF16, DType::F16] {
        let Some(exe) = driver(dt) else { return };
        let two = case(spec, (70, 40, 200), true, (2, 2), 820);
        let (one, stages) = on_device(
            case(spec, (70, 384, 150), true, (2, 2), 821),
            plan::DeviceFacts::SM86,
            dt,
        );
        assert_eq!(stages, 1);
        for (base, one_buffer) in [(two, false), (one, true)] {
            let mut good_of = HashMap::new();
            for (hook, sched, f16_only, one_only) in faults {
                if (f16_only && dt != DType::F16) || (one_only && !one_buffer) {
                    continue;
                }
                let c = Case {
                    schedule: sched,
                    ..base
                };
                let broken = Case {
                    fault: Some(hook),
                    ..c
                };
                let run_bits = |c: &Case| {
                    let inp = margin_inputs(c.shape, c.seed);
                    let up: Vec<f32> = inp.upstream.iter().map(|&v| v as f32).collect();
                    match dt {
                        DType::BF16 => {
                            let x: Vec<bf16> = inp.x.iter().map(|&v| bf16::from_f64(v)).collect();
                            let w: Vec<bf16> = inp.w.iter().map(|&v| bf16::from_f64(v)).collect();
                            bits(&run(&exe, c, &x, &w, &inp.labels, &inp.labels, &up))
                        }
                        _ => {
                            let x: Vec<f16> = inp.x.iter().map(|&v| f16::from_f64(v)).collect();
                            let w: Vec<f16> = inp.w.iter().map(|&v| f16::from_f64(v)).collect();
                            bits(&run(&exe, c, &x, &w, &inp.labels, &inp.labels, &up))
                        }
                    }
                };
                let good = good_of.entry(sched).or_insert_with(|| run_bits(&c));
                // Caught: other outputs, or the emulator's own report (a thread that exits with
                // copies in flight, a read of a stage whose copies have not landed).
                let bad =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_bits(&broken)));
                match bad {
                    Ok(bad) => {
                        let diff = good.iter().zip(&bad).filter(|(a, b)| a != b).count();
                        assert!(
                            diff > 0,
                            "{dt:?} {:?}: leaving out {hook} changed nothing under {sched:?}",
                            base.shape
                        );
                    }
                    Err(e) => {
                        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
                        assert!(
                            msg.contains("emulator failed"),
                            "{dt:?} {hook}: not an emulator report: {msg}"
                        );
                    }
                }
            }
        }
    }
}

/// The SIMT kernels (f32 and the half types off the tensor-core path) under the same checks:
/// they were verified on the H200, so this also checks the emulator against the hardware.
#[test]
fn simt_kernels() {
    for (k, spec) in [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35).reduction(Reduction::None),
    ]
    .into_iter()
    .enumerate()
    {
        check::<f32>(&case(spec, (37, 77, 101), false, (2, 2), 400 + k as u64));
        check::<bf16>(&case(spec, (37, 40, 101), false, (1, 3), 410 + k as u64));
    }
}

/// The non-finite policy through the kernels (tests/common: `non_finite_policy`).
fn non_finite_case<T: Element + Bits>(tc: bool, naive: bool, spec: MarginLoss, seed: u64) {
    let Some(exe) = driver(T::DTYPE) else { return };
    let what = format!("emulated, tensor cores {tc}, naive {naive}");
    non_finite_policy::<T>(
        spec,
        seed,
        bars(T::DTYPE),
        &what,
        &mut |shape, x, w, labels, up| {
            let mut case = case(
                spec.reduction(Reduction::None),
                (shape.b, shape.d, shape.c),
                tc,
                (1, 1),
                seed,
            );
            case.naive = naive;
            let out = run(&exe, &case, x, w, labels, labels, up);
            (out.row_loss, out.dx, out.dw)
        },
    );
}

#[test]
fn non_finite_inputs_propagate_through_the_kernels() {
    for (k, spec) in [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35),
        MarginLoss::sphereface(4.0).lambda(5.0),
    ]
    .into_iter()
    .enumerate()
    {
        non_finite_case::<bf16>(true, false, spec, 500 + k as u64);
        non_finite_case::<f32>(false, false, spec, 510 + k as u64);
        non_finite_case::<f32>(false, true, spec, 520 + k as u64);
    }
}

/// A class row with -Inf (or +Inf) among raw weights at the first, last and tile- and
/// split-boundary positions, through every forward kernel's online logsumexp and merge (SIMT,
/// tensor-core 64 x 128 and 128 x 256 tiles, wgmma, naive) and the backwards after them
/// (tests/common: `infinite_class_policy`; the f64 reference of the problem without that class).
#[test]
fn an_infinite_class_at_any_position_through_the_kernels() {
    let shape = Shape::new(6, 16, 140);
    // First, first of a SIMT tile (32), first of the second tensor-core tile (128), last.
    let positions = [0, 32, 128, 139];
    for (k, spec) in [MarginLoss::arcface(0.5), MarginLoss::cosface(0.35)]
        .into_iter()
        .enumerate()
    {
        let spec = spec.normalize_weights(false);
        let seed = 1400 + k as u64;
        // (dtype, tensor cores, wide tiles, wgmma, naive), class tiles split one per block so
        // the partial (max, sum) pairs also meet in the combine.
        for (bf, tc, wide, wgmma, naive) in [
            (true, true, false, false, false),
            (true, true, true, false, false),
            (true, true, false, true, false),
            (false, false, false, false, false),
            (false, false, false, false, true),
        ] {
            if k > 0 && (wide || wgmma || naive) {
                continue; // the second spec only changes the target: two paths suffice
            }
            let what = format!("emulated tc {tc} wide {wide} wgmma {wgmma} naive {naive}");
            let go = |x: &[f64], w: &[f64], labels: &[i32], up: &[f32], exe: &Path| {
                let mut c = case(
                    spec.reduction(Reduction::None),
                    (shape.b, shape.d, shape.c),
                    tc,
                    (1, 1),
                    seed,
                );
                (c.wide, c.wgmma, c.naive) = (wide, wgmma, naive);
                let out = if bf {
                    let cv = |v: &[f64]| v.iter().map(|&e| bf16::from_f64(e)).collect::<Vec<_>>();
                    run(exe, &c, &cv(x), &cv(w), labels, labels, up)
                } else {
                    let cv = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<_>>();
                    run(exe, &c, &cv(x), &cv(w), labels, labels, up)
                };
                (out.row_loss, out.dx, out.dw)
            };
            if bf {
                let Some(exe) = driver(DType::BF16) else {
                    return;
                };
                common::infinite_class_policy::<bf16>(
                    spec,
                    shape,
                    &positions,
                    seed,
                    bars(DType::BF16),
                    &what,
                    &mut |_, x, w, labels, up| {
                        let f = |v: &[bf16]| v.iter().map(|e| e.to_f64()).collect::<Vec<_>>();
                        go(&f(x), &f(w), labels, up, &exe)
                    },
                );
            } else {
                let Some(exe) = driver(DType::F32) else {
                    return;
                };
                common::infinite_class_policy::<f32>(
                    spec,
                    shape,
                    &positions,
                    seed,
                    bars(DType::F32),
                    &what,
                    &mut |_, x, w, labels, up| {
                        let f = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<_>>();
                        go(&f(x), &f(w), labels, up, &exe)
                    },
                );
            }
        }
    }
}

/// The naive plan's plain kernels (its fallback without cuBLAS; with cuBLAS only the three
/// products differ) on every option that changes the maths.
#[test]
fn naive_plain_kernels() {
    let mut specs = tc_specs();
    specs.push(MarginLoss::arcface(0.5).policy(OverflowPolicy::Raw));
    for (k, spec) in specs.into_iter().enumerate() {
        for (dt, shape) in [(DType::F32, (37, 77, 101)), (DType::BF16, (45, 40, 131))] {
            let mut c = case(spec, shape, false, (1, 1), 600 + k as u64);
            c.naive = true;
            match dt {
                DType::F32 => check::<f32>(&c),
                _ => check::<bf16>(&c),
            }
        }
    }
}

/// A race check: the kernels' results do not depend on the order in which a block's threads run
/// between barriers, nor on when cp.async copies and wgmma complete (at issue, or only at the wait
/// that retires them), unless a barrier or a wait is missing. Every schedule must give the default schedule's
/// outputs bit for bit (the kernels are deterministic by design: fixed reduction orders).
#[test]
fn no_races_under_other_schedules() {
    let schedules = [
        ("reverse", "eager"),
        ("forward", "deferred"),
        ("reverse", "deferred"),
        ("shuffle:1", "deferred"),
        ("shuffle:2", "eager"),
        ("greedy", "deferred"),
        ("greedy-reverse", "eager"),
        ("forward", "wgmma"),
        ("greedy", "wgmma"),
        ("reverse", "copies"),
    ];
    let bits = |o: &Outputs| -> Vec<u64> {
        std::iter::once(o.loss)
            .chain(o.lse.iter().copied())
            .chain(o.row_loss.iter().copied())
            .chain(o.dx.iter().copied())
            .chain(o.dw.iter().copied())
            .map(f64::to_bits)
            .collect()
    };
    fn inputs<T: Element>(c: &Case) -> (Vec<T>, Vec<T>, Vec<i32>, Vec<f32>) {
        let inp = margin_inputs(c.shape, c.seed);
        (
            inp.x.iter().map(|&v| T::from_f64(v)).collect(),
            inp.w.iter().map(|&v| T::from_f64(v)).collect(),
            inp.labels,
            inp.upstream.iter().map(|&v| v as f32).collect(),
        )
    }
    let spec = MarginLoss::arcface(0.5).reduction(Reduction::None);
    // Tensor-core forward and backward (bf16, both backward tile shapes), the SIMT kernels (f32)
    // and the naive plan.
    let mut cases = vec![
        (DType::BF16, case(spec, (70, 40, 200), true, (1, 2), 800)),
        // D > 256: the backward's 32 x 512 tiles (fm_grad_*_tc_d512).
        (DType::BF16, case(spec, (40, 264, 150), true, (1, 2), 803)),
        // f16: the partner tile scaled in place between S and the product (its own barriers).
        (DType::F16, case(spec, (70, 40, 200), true, (2, 2), 805)),
        // One partner buffer (D = 520 on an A100), reloaded after each product.
        (
            DType::BF16,
            on_device(
                case(spec, (70, 520, 150), true, (2, 2), 806),
                plan::DeviceFacts::A100,
                DType::BF16,
            )
            .0,
        ),
        // The wgmma forward, 9 pipeline iterations per block (3 class tiles x 3 k steps), so
        // stages are refilled: deferred copies and wgmma catch a missing wait or barrier.
        (
            DType::BF16,
            Case {
                wgmma: true,
                ..case(spec, (70, 136, 300), true, (3, 2), 804)
            },
        ),
        (DType::F32, case(spec, (40, 36, 70), false, (1, 1), 801)),
    ];
    let mut naive = case(spec, (20, 24, 40), false, (1, 1), 802);
    naive.naive = true;
    cases.push((DType::F32, naive));
    for (dt, mut c) in cases {
        let Some(exe) = driver(dt) else { return };
        let run_bits = |c: &Case| match dt {
            DType::BF16 => {
                let (x, w, l, u) = inputs::<bf16>(c);
                bits(&run(&exe, c, &x, &w, &l, &l, &u))
            }
            DType::F16 => {
                let (x, w, l, u) = inputs::<f16>(c);
                bits(&run(&exe, c, &x, &w, &l, &l, &u))
            }
            _ => {
                let (x, w, l, u) = inputs::<f32>(c);
                bits(&run(&exe, c, &x, &w, &l, &l, &u))
            }
        };
        let reference = run_bits(&c);
        for sched in schedules {
            c.schedule = sched;
            let got = run_bits(&c);
            let diff = got.iter().zip(&reference).filter(|(a, b)| a != b).count();
            assert_eq!(
                diff, 0,
                "{dt:?} naive={} tc={}: {diff} outputs differ under schedule {sched:?}",
                c.naive, c.fwd_tc
            );
        }
    }
}

/// Random specs (the property tests' generator, tests/property_cases) on random shapes with
/// D % 8 == 0, random class splits, through the tensor-core kernels (bf16, f16; a third of them
/// with the wide tiles, a third with the wgmma forward), the SIMT kernels (f32) and the TF32
/// forward. `FUSED_MARGIN_EMU_CASES` sets the number of cases (default 24).
#[test]
fn random_specs_and_shapes() {
    use property_cases::{random_spec, Preset};
    use rand::Rng;
    let n: u64 = std::env::var("FUSED_MARGIN_EMU_CASES")
        .ok()
        .map(|v| {
            v.parse()
                .expect("FUSED_MARGIN_EMU_CASES must be an integer")
        })
        .unwrap_or(24);
    let presets = [
        Preset::Nsl,
        Preset::CosFace,
        Preset::ArcFace,
        Preset::SphereFace,
        Preset::Combined,
    ];
    for seed in 0..n {
        let mut r = common::rng(9_000 + seed);
        let spec = random_spec(&mut r, presets[seed as usize % presets.len()]);
        let shape = (
            r.random_range(1..=90),
            8 * r.random_range(1..=36),
            r.random_range(1..=400),
        );
        let tps = (r.random_range(1..=3), r.random_range(1..=4));
        let mut c = case(spec, shape, true, tps, 9_000 + seed);
        let tiles = r.random_range(0..3);
        c.wide = tiles == 0;
        match seed % 4 {
            0 => check::<bf16>(&Case {
                wgmma: tiles == 1,
                ..c
            }),
            1 => check::<f16>(&Case {
                wgmma: tiles == 1,
                ..c
            }),
            2 => check::<f32>(&Case {
                fwd_tc: false,
                bwd_tc: false,
                ..c
            }),
            _ => check::<f32>(&Case {
                bwd_tc: false, // TF32 forward, SIMT backward on TF32 operands
                outliers: false,
                ..c
            }),
        }
    }
}

/// f32 inputs through the TF32 tensor-core forward (opt-in), every option that changes the maths,
/// with MATH.md's TF32 bars; the backward stays exact f32 (SIMT). Inputs without the suite's
/// large outliers: TF32 keeps 10 mantissa bits, so an outlier-dominated cosine carries ~5e-4
/// of error, and s = 64 turns that into logit errors the TF32 bars do not allow for (README).
#[test]
fn tf32_forward() {
    for (k, spec) in tc_specs().into_iter().enumerate() {
        for (shape, tps) in [
            ((45, 136, 300), (1, 2)),
            ((70, 36, 131), (2, 1)),
            ((1, 4, 1), (1, 1)),
        ] {
            let mut c = case(spec, shape, true, tps, 1000 + k as u64);
            c.bwd_tc = false;
            c.outliers = false;
            check::<f32>(&c);
        }
    }
}

/// The wide tensor-core forward tiles (128 rows x 256 classes, warps of 64 x 64): bf16, f16 and
/// TF32, every option, and shapes at the edges of the larger tiles.
#[test]
fn wide_forward_tiles() {
    for (k, spec) in tc_specs().into_iter().enumerate() {
        let mut c = case(spec, (130, 136, 300), true, (1, 2), 1100 + k as u64);
        c.wide = true;
        match k % 3 {
            0 => check::<bf16>(&c),
            1 => check::<f16>(&c),
            _ => {
                c.bwd_tc = false;
                c.outliers = false;
                check::<f32>(&c);
            }
        }
    }
    for (k, (shape, tps)) in [
        ((1, 8, 1), (1, 1)),
        ((129, 24, 513), (1, 1)),
        ((64, 40, 257), (2, 1)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = case(MarginLoss::arcface(0.5), shape, true, tps, 1200 + k as u64);
        c.wide = true;
        check::<bf16>(&c);
    }
}

/// The wgmma forward (kernels/logits_wg.cu: 128 x 128 tiles, both operands from shared memory
/// through 128-byte swizzled descriptors) for every option, f16 and bf16, with the tensor-core
/// backward after it; then edge shapes: one row and class, B and C one past a tile, D of 8 (a
/// partial 64-wide k step), D past 64 with a partial last step, several splits, and long
/// pipelines (20 and 27 iterations per block) that refill every stage several times.
#[test]
fn wgmma_forward() {
    for (k, spec) in tc_specs().into_iter().enumerate() {
        let mut c = case(spec, (130, 136, 300), true, (1, 2), 1_400 + k as u64);
        c.wgmma = true;
        if k % 2 == 0 {
            check::<bf16>(&c);
        } else {
            check::<f16>(&c);
        }
    }
    for (k, (shape, tps)) in [
        ((1, 8, 1), (1, 1)),
        ((129, 8, 129), (1, 1)),
        ((64, 72, 257), (2, 1)),
        ((30, 200, 600), (5, 1)),
        ((20, 520, 300), (3, 1)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = case(MarginLoss::arcface(0.5), shape, true, tps, 1_450 + k as u64);
        c.wgmma = true;
        check::<bf16>(&c);
    }
}

/// A zero feature row and a zero class row (MATH.md's eps path: 1 / max(0, eps) = 1e12 scales
/// the zero row's dx) through every kernel path, against the reference with the usual bars.
#[test]
fn zero_norm_rows() {
    for (k, spec) in common::zero_row_specs().into_iter().enumerate() {
        let seed = 1300 + k as u64;
        let mut tc = case(spec, (40, 16, 70), true, (1, 1), seed);
        tc.zero_rows = true;
        check::<bf16>(&tc);
        check::<f32>(&Case {
            fwd_tc: false,
            bwd_tc: false,
            ..tc
        });
        check::<f32>(&Case {
            naive: true,
            fwd_tc: false,
            bwd_tc: false,
            ..tc
        });
    }
}

/// Rows of norm 0.7 eps (below the floor, direction kept): the normalization backward there is
/// the derivative of the forward, dv = dvh / eps, with no projection term, in every finishing
/// kernel (fm_x_finish, fm_grad_w, the tensor-core dw, naive_norm_backward).
#[test]
fn rows_below_eps() {
    for (k, spec) in common::zero_row_specs().into_iter().enumerate() {
        let seed = 1350 + k as u64;
        let mut tc = case(spec, (40, 16, 70), true, (1, 1), seed);
        tc.tiny_rows = true;
        check::<f32>(&Case {
            fwd_tc: false,
            bwd_tc: false,
            ..tc
        });
        check::<f32>(&Case {
            naive: true,
            fwd_tc: false,
            bwd_tc: false,
            ..tc
        });
        check::<bf16>(&tc);
    }
}

/// Margins at validate()'s limits and s = 1000 (tests/common: `limit_specs`) through the
/// tensor-core and SIMT kernels, against the reference with the bars; where a target lies within
/// ~1 degree of the angle clamp (at m1 = 16 the target's slope reaches 16 / sin(theta) there),
/// with MATH.md's conditioning allowance, computed per case (`check`).
#[test]
fn margins_at_their_limits() {
    for (k, spec) in common::limit_specs().into_iter().enumerate() {
        let mut c = case(spec, (24, 16, 40), true, (1, 1), 1400 + k as u64);
        c.outliers = false;
        check::<bf16>(&c);
        check::<f32>(&Case {
            fwd_tc: false,
            bwd_tc: false,
            ..c
        });
    }
}

/// The bounds of the accepted range through the kernels: s = 1e6 (`S_MAX`) and per-row
/// upstreams of 1e12 (`UPSTREAM_MAX`) with both normalizations, a zero feature row and a zero
/// class row (dv = dvh / eps), margins at their limits: the f32 logits, lse, losses and f32
/// gradients stay finite (README "Guarantees" states the bound this rests on).
#[test]
fn scale_and_upstream_at_their_bounds() {
    use fused_margin::spec::{S_MAX, UPSTREAM_MAX};
    for (k, spec) in [
        MarginLoss::arcface(0.5),
        MarginLoss::combined(16.0, 0.5, 2.0).lambda(5.0),
        MarginLoss::cosface(0.35),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = spec.scale(S_MAX).reduction(Reduction::None);
        for (dt, tc) in [(DType::BF16, true), (DType::F32, false)] {
            let Some(exe) = driver(dt) else { return };
            let c = case(spec, (24, 16, 40), tc, (1, 1), 1500 + k as u64);
            let inp = common::zero_row_inputs(c.shape, c.seed);
            let up: Vec<f32> = (0..24)
                .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } * UPSTREAM_MAX as f32)
                .collect();
            let o = match dt {
                DType::BF16 => {
                    let cv = |v: &[f64]| v.iter().map(|&e| bf16::from_f64(e)).collect::<Vec<_>>();
                    run(
                        &exe,
                        &c,
                        &cv(&inp.x),
                        &cv(&inp.w),
                        &inp.labels,
                        &inp.labels,
                        &up,
                    )
                }
                _ => {
                    let cv = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<_>>();
                    run(
                        &exe,
                        &c,
                        &cv(&inp.x),
                        &cv(&inp.w),
                        &inp.labels,
                        &inp.labels,
                        &up,
                    )
                }
            };
            let what = format!("{dt:?} tc={tc} {spec:?}");
            assert!(
                o.lse.iter().chain(&o.row_loss).all(|v| v.is_finite()),
                "{what}: forward"
            );
            assert!(
                o.dx.iter().chain(&o.dw).all(|v| v.is_finite()),
                "{what}: gradients"
            );
        }
    }
}

/// Labels at 0 and C - 1 only, with C one class past a tile (129 and 257), through the
/// tensor-core (default and wide) and SIMT kernels.
#[test]
fn labels_at_both_ends() {
    for (k, shape) in [(33, 16, 129), (65, 40, 257)].into_iter().enumerate() {
        let mut c = case(
            MarginLoss::arcface(0.5),
            shape,
            true,
            (1, 2),
            1500 + k as u64,
        );
        c.labels_at_ends = true;
        check::<bf16>(&c);
        check::<bf16>(&Case { wide: true, ..c });
        check::<f32>(&Case {
            fwd_tc: false,
            bwd_tc: false,
            ..c
        });
    }
}

/// `LabelCheck::Device` (the default) and `LabelCheck::Host`: the label status and the per-row
/// upstream computed on the device (kernels/labels.cu) give the host path's results for every reduction, on the tensor-core, SIMT
/// and naive kernels, and the status records the counted rows and no error (checked in `check`).
#[test]
fn device_label_check_matches_the_host_check() {
    let specs = [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35).reduction(Reduction::Sum),
        MarginLoss::sphereface(4.0).reduction(Reduction::None),
    ];
    for (k, spec) in specs.into_iter().enumerate() {
        let seed = 1_200 + 10 * k as u64;
        // Both modes: the device check is every other case's default.
        for device_labels in [false, true] {
            let mut c = case(spec, (45, 40, 150), true, (1, 2), seed);
            c.device_labels = device_labels;
            check::<bf16>(&c);
            let mut c = case(spec, (38, 36, 90), false, (2, 1), seed + 1);
            c.device_labels = device_labels;
            check::<f32>(&c);
            c.naive = true;
            check::<f32>(&c);
        }
    }
}

/// `LabelCheck::Device` with bad labels: the first out-of-range row and its label are in the
/// status, that row's loss and the reduced loss are NaN and every counted row's gradients are NaN
/// (nothing plausible), and the kernels never index with the bad label (the run completes,
/// every other row's loss is right). Backward labels that are not the forward's (another order, or
/// another count) set the mismatch flag and poison the gradients the same way.
#[test]
fn device_label_check_reports_bad_labels() {
    fn one<T: Element + Bits>(tc: bool, naive: bool, seed: u64) {
        let Some(exe) = driver(T::DTYPE) else { return };
        let spec = MarginLoss::arcface(0.5);
        let mut c = case(spec, (33, 24, 70), tc, (1, 1), seed);
        c.device_labels = true;
        c.naive = naive;
        let what = format!("{:?} tensor cores {tc} naive {naive}", T::DTYPE);
        let (b, d) = (c.shape.b, c.shape.d);
        let inp = margin_inputs(c.shape, seed);
        let x: Vec<T> = inp.x.iter().map(|&v| T::from_f64(v)).collect();
        let w: Vec<T> = inp.w.iter().map(|&v| T::from_f64(v)).collect();
        let up: Vec<f32> = inp.upstream.iter().map(|&v| v as f32).collect();
        let good = inp.labels.clone();
        let counted = good.iter().filter(|&&l| l >= 0).count() as i64;
        let counted_rows: Vec<usize> = (0..b).filter(|&i| good[i] >= 0).collect();
        let nan_rows = |dx: &[f64]| {
            counted_rows
                .iter()
                .all(|&i| dx[i * d..(i + 1) * d].iter().all(|v| v.is_nan()))
        };

        // Rows 4 and 20 count (margin_inputs ignores rows 3 and 5 mod 7): both out of range.
        let mut bad = good.clone();
        bad[4] = 70 + 2;
        bad[20] = 70;
        let out = run(&exe, &c, &x, &w, &bad, &bad, &up);
        assert_eq!(
            &out.status[..3],
            &[counted, 4, 72],
            "{what}: forward status"
        );
        assert_eq!(
            &out.status[6..9],
            &[counted, 4, 72],
            "{what}: backward status"
        );
        assert_eq!(out.status[10], 0, "{what}: same labels are no mismatch");
        assert!(out.loss.is_nan(), "{what}: loss {}", out.loss);
        assert!(
            out.row_loss[4].is_nan() && out.row_loss[20].is_nan(),
            "{what}"
        );
        let mut fixed = bad.clone();
        fixed[4] = -1;
        fixed[20] = -1;
        let reference = cpu::forward(&spec, &x, &w, &fixed, c.shape).unwrap();
        for i in (0..b).filter(|&i| fixed[i] >= 0) {
            let e = (out.row_loss[i] - reference.row_loss[i]).abs()
                / reference.row_loss[i].abs().max(1.0);
            assert!(
                e < 1e-2,
                "{what}: row {i} loss {} vs {}",
                out.row_loss[i],
                reference.row_loss[i]
            );
        }
        assert!(nan_rows(&out.dx), "{what}: dx of counted rows not NaN");
        assert!(out.dw.iter().all(|v| v.is_nan()), "{what}: dw not NaN");

        // Valid labels, but the backward's are another order or another count.
        let mut swapped = good.clone();
        let (i, j) = (
            counted_rows[0],
            *counted_rows
                .iter()
                .find(|&&j| good[j] != good[counted_rows[0]])
                .unwrap(),
        );
        swapped.swap(i, j);
        let mut fewer = good.clone();
        fewer[counted_rows[1]] = -1;
        for (bwd, bwd_counted) in [(swapped, counted), (fewer, counted - 1)] {
            let out = run(&exe, &c, &x, &w, &good, &bwd, &up);
            assert_eq!(
                &out.status[..3],
                &[counted, -1, 0],
                "{what}: forward status"
            );
            assert_eq!(
                &out.status[6..9],
                &[bwd_counted, -1, 0],
                "{what}: backward status"
            );
            assert_eq!(
                &out.status[10..],
                &[1, counted],
                "{what}: mismatch not flagged"
            );
            assert!(out.loss.is_finite(), "{what}: the forward is valid");
            let rows_ok = counted_rows
                .iter()
                .all(|&r| bwd[r] < 0 || out.dx[r * d..(r + 1) * d].iter().all(|v| v.is_nan()));
            assert!(rows_ok, "{what}: dx not NaN after a label mismatch");
        }
    }
    one::<bf16>(true, false, 1_300);
    one::<f32>(false, false, 1_301);
    one::<f32>(false, true, 1_302);
}

/// Gradients in the 16-bit input dtype (the default `backward`), so the entry points without
/// `_f32out` run: the SIMT, tensor-core (both tile shapes) and naive backward, bf16 and f16.
#[test]
fn sixteen_bit_gradients() {
    let spec = MarginLoss::arcface(0.5).reduction(Reduction::None);
    for (k, (shape, tc, naive)) in [
        ((40, 64, 150), true, false),
        ((33, 264, 97), true, false),
        ((40, 36, 70), false, false),
        ((20, 24, 40), false, true),
    ]
    .into_iter()
    .enumerate()
    {
        let c = Case {
            grad16: true,
            naive,
            ..case(spec, shape, tc, (1, 2), 2_000 + k as u64)
        };
        check::<bf16>(&c);
        check::<f16>(&Case {
            seed: c.seed + 10,
            ..c
        });
    }
}

/// Every distinct launch sequence the plan builder makes, for the device kinds of
/// `plan_selection.rs` and every combination of the handle's choices, on a few shapes (tensor-core
/// eligible, D % 8 != 0, D > 256 for the backward's 32 x 512 tiles), each run once on the
/// emulator against the reference. Prints how many distinct plans ran.
#[test]
fn every_distinct_plan_the_builder_makes() {
    let devices = [
        plan::DeviceFacts::A100,
        plan::DeviceFacts::SM86,
        plan::DeviceFacts::H100_PCIE,
        EMU_DEVICE,
    ];
    let spec = MarginLoss::arcface(0.5);
    let mut seen = std::collections::HashSet::new();
    let mut ran = 0;
    for (dtype, shape) in [
        (DType::BF16, (20, 16, 40)),
        (DType::F16, (20, 16, 40)),
        (DType::BF16, (12, 264, 20)),
        (DType::F16, (20, 12, 40)),
        (DType::F32, (20, 16, 40)),
        (DType::F32, (20, 14, 40)),
    ] {
        if driver(dtype).is_none() {
            return;
        }
        for bits in 0..128u32 {
            let on = |k: u32| bits & (1 << k) != 0;
            for dev in devices {
                let ch = plan::Choices {
                    plan: if on(0) {
                        cuda::Plan::Naive
                    } else {
                        cuda::Plan::Fused
                    },
                    tensor_cores: on(1),
                    tf32: on(2),
                    wide_tiles: on(3),
                    wgmma: on(4),
                    tc_backward: on(5),
                    label_check: if on(6) {
                        cuda::LabelCheck::Device
                    } else {
                        cuda::LabelCheck::Host
                    },
                    tiles_per_split: None,
                };
                let c = Case {
                    planned: Some((dev, ch)),
                    outliers: false,
                    device_labels: on(6),
                    ..case(spec, shape, false, (1, 1), 1_900 + bits as u64)
                };
                let inp = margin_inputs_opts(c.shape, c.seed, false);
                let (f, b) = plans(&c, dtype, &inp.labels, &dev, &ch);
                if !seen.insert((dtype, shape, f.signature(), b.signature())) {
                    continue;
                }
                ran += 1;
                match dtype {
                    DType::BF16 => check::<bf16>(&c),
                    DType::F16 => check::<f16>(&c),
                    _ => check::<f32>(&c),
                }
            }
        }
    }
    eprintln!("every_distinct_plan_the_builder_makes: {ran} distinct plans ran");
    println!("{ran} distinct plans ran on the emulator");
    assert!(
        ran >= 20,
        "only {ran} distinct plans: the enumeration lost its choices"
    );
}

/// `check` on inputs the caller built: the emulated run against the reference on the same rounded
/// inputs, losses within the loss bar; returns the normwise (dx, dw) errors for the caller to hold
/// to the gradient bar (so a test can report every case's numbers before it fails).
fn check_given<T: Element + Bits>(case: &Case, inp: &common::Inputs) -> Option<(f64, f64)> {
    let exe = driver(T::DTYPE)?;
    let x: Vec<T> = inp.x.iter().map(|&v| T::from_f64(v)).collect();
    let w: Vec<T> = inp.w.iter().map(|&v| T::from_f64(v)).collect();
    let (up32, reference, rg, _) = reference_of(case, &x, &w, inp);
    let out = run(&exe, case, &x, &w, &inp.labels, &inp.labels, &up32);
    assert_ran_as_asked::<T>(case, &out);
    let (lbar, _) = bars(T::DTYPE);
    let e_rows = rel(&out.row_loss, &reference.row_loss);
    assert!(
        e_rows <= lbar,
        "{:?} {:?} {:?}: row loss rel {e_rows:e}",
        T::DTYPE,
        case.shape,
        case.spec
    );
    let finite = out.dx.iter().chain(&out.dw).all(|v| v.is_finite());
    Some(if finite {
        (rel(&out.dx, &rg.dx), rel(&out.dw, &rg.dw))
    } else {
        (f64::INFINITY, f64::INFINITY)
    })
}

/// Runs `check_given` for bf16 and f16 and both backward tile shapes (FmGt<64> for D <= 256,
/// FmGt<32> above), printing every case's errors, then fails listing those over the bar.
fn tc_backward_cases(
    name: &str,
    specs: &[MarginLoss],
    shapes: &[(usize, usize, usize)],
    inputs: &dyn Fn(Shape, u64) -> common::Inputs,
    seed0: u64,
) {
    let mut failed = Vec::new();
    for (k, spec) in specs.iter().enumerate() {
        for (n, &shape) in shapes.iter().enumerate() {
            let seed = seed0 + 10 * k as u64 + n as u64;
            let c = case(*spec, shape, true, (1, 2), seed);
            let inp = inputs(c.shape, seed);
            for dt in [DType::BF16, DType::F16] {
                let got = match dt {
                    DType::BF16 => check_given::<bf16>(&c, &inp),
                    _ => check_given::<f16>(&c, &inp),
                };
                let Some((ex, ew)) = got else { return };
                let bar = bars(dt).1;
                let tiles = if shape.1 > 256 { 32 } else { 64 };
                let line = format!(
                    "{name}: {dt:?} FmGt<{tiles}> {shape:?} {spec:?}: dx rel {ex:.3e}, dw rel {ew:.3e} (bar {bar:e})"
                );
                eprintln!("{line}");
                if !(ex <= bar && ew <= bar) {
                    failed.push(line);
                }
            }
        }
    }
    assert!(failed.is_empty(), "over the bar:\n{}", failed.join("\n"));
}

/// A well-classified batch: each x_i is its class row plus a little noise (cosine ~0.99 to the
/// target, ~N(0, 1/D) to the others), so at s = 64 (ArcFace) and s = 30 (CosFace) the row losses
/// l_i = -log p_iy are 1e-14 to 1e-5, far below f32's resolution of lse_i ~ 30-60. The loss then
/// comes from the non-target logsumexp (fm_combine_rows: l_i = softplus(lnt - z_iy), no
/// cancellation) and the target's gradient entry from expm1(-l_i); `expf(z - lse) - 1` and
/// `lse - z` gave 0 there. f16's dx needs its per-row scale (all of e lies below f16's range).
/// Every backward: SIMT (f32, bf16), the tensor-core ones (bf16, f16, both tile shapes).
fn converged_inputs(shape: Shape, seed: u64) -> common::Inputs {
    let Shape { b, d, c } = shape;
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5DEE_CE66;
    let mut unif = move || {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut v = z;
        v = (v ^ (v >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        v = (v ^ (v >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((v ^ (v >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut normal = move || {
        let (u1, u2) = (unif().max(1e-300), unif());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    let w: Vec<f64> = (0..c * d).map(|_| normal()).collect();
    let labels: Vec<i32> = (0..b).map(|i| ((i * 7 + 3) % c) as i32).collect();
    let x: Vec<f64> = (0..b * d)
        .map(|e| w[labels[e / d] as usize * d + e % d] + 0.1 * normal())
        .collect();
    common::Inputs {
        x,
        w,
        labels,
        upstream: (0..b).map(|i| 0.5 + (i % 3) as f64 * 0.25).collect(),
    }
}

#[test]
fn converged_rows_keep_their_loss_and_gradients() {
    let specs = [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35)
            .scale(30.0)
            .reduction(Reduction::None),
    ];
    let shapes = [(40, 64, 300), (33, 512, 200)];
    tc_backward_cases("converged", &specs, &shapes, &converged_inputs, 1300);
    // The SIMT kernels: f32, and bf16 off the tensor cores. CosFace at s = 30 only (l_i ~ 1e-5,
    // where `lse - z` in f32 was off by ~10%): at l_i ~ 1e-14 (ArcFace, s = 64) the row loss is
    // ill-conditioned in f32 whatever the arithmetic, its relative error being the logits'
    // absolute one (|z| ~ 50 times 2^-24), ~2e-5, past the f32 loss bar.
    for (k, spec) in specs.iter().enumerate().skip(1) {
        let c = case(*spec, (40, 64, 300), false, (2, 3), 1350 + k as u64);
        let inp = converged_inputs(c.shape, c.seed);
        for dt in [DType::F32, DType::BF16] {
            let got = match dt {
                DType::F32 => check_given::<f32>(&c, &inp),
                _ => check_given::<bf16>(&c, &inp),
            };
            let Some((ex, ew)) = got else { return };
            let bar = bars(dt).1;
            assert!(
                ex <= bar && ew <= bar,
                "SIMT {dt:?} {spec:?}: dx rel {ex:e}, dw rel {ew:e} (bar {bar:e})"
            );
        }
    }
}

/// A zero-norm class row (5) that no row has as its target, at s = 64: its dw = dwh / eps is made
/// only of probabilities far below f16's normal range (2^-14), and it dominates dw's norm, so a
/// tensor-core backward that rounds e to f16 unscaled flushes it. Every 16-bit backward, both tile
/// shapes.
#[test]
fn tensor_core_backward_tiny_probabilities() {
    tc_backward_cases(
        "tiny probabilities",
        &common::zero_row_specs(),
        &[(40, 16, 70), (40, 136, 300), (40, 264, 150), (33, 296, 97)],
        &common::untargeted_zero_class_inputs,
        1_600,
    );
}

/// Targets near the angle clamp with a steep target slope: Raw and Monotonic policies with m2 > 0
/// (the slope's 1 / sin(theta) is not cancelled there), every 16-bit backward, both tile shapes.
/// The target's entry of e (tens to hundreds) and the projection that cancels most of it must
/// agree to f32, not to the 16-bit rounding of e and of the partner operand.
#[test]
fn tensor_core_backward_targets_near_the_clamp() {
    tc_backward_cases(
        "near the clamp",
        &[
            MarginLoss::arcface(0.5).policy(OverflowPolicy::Raw),
            MarginLoss::arcface(0.5).policy(OverflowPolicy::Monotonic),
            MarginLoss::combined(2.0, 0.3, 0.0),
        ],
        &[(40, 136, 150), (40, 264, 150), (33, 296, 97)],
        &common::near_clamp_inputs,
        1_700,
    );
}

/// The sanitizer configuration (`FM_EMU_SANITIZE=1`, `build_driver`) catches a kernel writing
/// past a job buffer: the forward of a small f32 shape with the per-row loss buffer one row short
/// makes the sanitized driver fail with an AddressSanitizer report, and the same job at the right
/// length runs clean. Without FM_EMU_SANITIZE=1 it prints why and passes (the plain driver has no
/// bounds checks).
#[test]
fn sanitizer_catches_an_overrun() {
    if !sanitized() {
        eprintln!("skipped: FM_EMU_SANITIZE is not 1, the plain driver does not check bounds");
        return;
    }
    let Some(exe) = driver(DType::F32) else {
        return;
    };
    // B odd: the driver rounds each buffer up to whole 8-byte words, so an f32 buffer one short of
    // an even length would keep the last element's 4 bytes as padding and the overrun would land
    // in it unseen; B - 1 = 8 rows are 32 bytes exactly, and row 8 lies past them.
    let c = case(MarginLoss::arcface(0.5), (9, 16, 40), false, (1, 1), 1_950);
    let (b, d, cl) = (c.shape.b, c.shape.d, c.shape.c);
    let inp = margin_inputs(c.shape, c.seed);
    let (fwd, _) = plans(
        &c,
        DType::F32,
        &inp.labels,
        &EMU_DEVICE,
        &choices(&c, DType::F32),
    );
    let f32s = |v: &[f64]| v.iter().flat_map(|&e| (e as f32).to_le_bytes()).collect();
    let run_short = |short: usize| {
        let mut p = fwd.clone();
        let spec = p
            .buffers
            .iter_mut()
            .find(|s| s.buf == plan::Buf::RowLoss)
            .expect("the forward allocates the per-row loss");
        assert_eq!(spec.len, b, "the per-row loss is B f32");
        spec.len -= short;
        let mut job = Job::default();
        let mut ids = HashMap::from([
            (
                plan::Buf::X,
                job.buffer(4, b * d, BufInit::Data(f32s(&inp.x))),
            ),
            (
                plan::Buf::W,
                job.buffer(4, cl * d, BufInit::Data(f32s(&inp.w))),
            ),
            (
                plan::Buf::Labels,
                job.buffer(
                    4,
                    b,
                    BufInit::Data(inp.labels.iter().flat_map(|l| l.to_le_bytes()).collect()),
                ),
            ),
        ]);
        job.add_plan(&p, &mut ids);
        let tag = format!("overrun_{short}");
        let outs = [ids[&plan::Buf::RowLoss]];
        try_job(&exe, &job, &outs, &tag, ("forward", "eager"), None)
    };

    let (ok, out) = run_short(0);
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(
        ok.status.success(),
        "the job at the right length failed: {stderr}"
    );
    let row_loss = floats(&out.expect("the driver's output"));
    assert!(
        row_loss.len() == b && row_loss.iter().all(|v| v.is_finite()),
        "row losses {row_loss:?}"
    );

    let (bad, _) = run_short(1);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(
        bad.status.code(),
        Some(ASAN_EXIT),
        "a write one row past the per-row loss did not fail the sanitized driver with \
         AddressSanitizer's exit code: {:?}\n{stderr}",
        bad.status
    );
    assert!(
        stderr.contains("AddressSanitizer") && stderr.contains("heap-buffer-overflow"),
        "no AddressSanitizer heap-buffer-overflow report: {stderr}"
    );
    eprintln!(
        "sanitizer_catches_an_overrun: {}",
        stderr
            .lines()
            .find(|l| l.starts_with("SUMMARY: AddressSanitizer"))
            .unwrap_or("")
    );
}

/// The device self-check (src/cuda/selfcheck.rs) on the emulator, with the crate's own problem,
/// plans, comparison and fallback rule: the fast path (tensor-core forward and backward) agrees
/// with the SIMT kernels and is kept; with the tensor-core dw kernel broken (`faulty_driver`) the
/// comparison names dw and the rule falls back to the SIMT kernels, whose results the fault does
/// not touch.
fn self_check_case<T: Element + Bits>() {
    use cuda::selfcheck::{self, CheckOutputs, Outcome};
    let (Some(good), Some(bad)) = (driver(T::DTYPE), faulty_driver(T::DTYPE)) else {
        return;
    };
    let pr = selfcheck::problem(72);
    let fast = plan::Choices {
        tc_backward: true,
        ..plan::Choices::default()
    };
    let simt = selfcheck::reference_choices(&fast);
    let Shape { b, d, c } = pr.shape;
    let x: Vec<T> = pr.x.iter().map(|&v| T::from_f64(v)).collect();
    let w: Vec<T> = pr.w.iter().map(|&v| T::from_f64(v)).collect();
    let run_with = |exe: &Path, ch: plan::Choices| {
        let mut cs = case(pr.spec, (b, d, c), false, (1, 1), 7_700);
        cs.planned = Some((EMU_DEVICE, ch));
        let out = run::<T>(exe, &cs, &x, &w, &pr.labels, &pr.labels, &vec![0.0; b]);
        let tc = out.tensor_cores;
        (
            CheckOutputs {
                loss: out.loss,
                lse: out.lse,
                dx: out.dx,
                dw: out.dw,
            },
            tc,
        )
    };
    let what = format!("{:?}", T::DTYPE);
    let (f, tc) = run_with(&good, fast);
    assert_eq!(
        tc,
        (true, true),
        "{what}: the fast path is the tensor-core one"
    );
    let (s, tc) = run_with(&good, simt);
    assert_eq!(
        tc,
        (false, false),
        "{what}: the reference is the SIMT kernels"
    );
    selfcheck::compare(T::DTYPE, false, &f, &s)
        .unwrap_or_else(|e| panic!("{what}: a correct fast path failed the self-check: {e}"));
    assert_eq!(selfcheck::choices_after(&Outcome::Passed, &fast), fast);

    let (fb, _) = run_with(&bad, fast);
    let (sb, _) = run_with(&bad, simt);
    assert_eq!(
        sb, s,
        "{what}: the fault is in the tensor-core dw kernel only"
    );
    let why = selfcheck::compare(T::DTYPE, false, &fb, &sb)
        .expect_err("the broken tensor-core dw kernel passed the self-check");
    assert!(why.starts_with("dw"), "{what}: {why}");
    let after = selfcheck::choices_after(&Outcome::Failed(why), &fast);
    assert_eq!(after, simt, "{what}: falls back to the SIMT kernels");
    let (fallback, tc) = run_with(&bad, after);
    assert_eq!(tc, (false, false));
    assert_eq!(fallback, s, "{what}: the fallback gives the SIMT results");
}

#[test]
fn self_check_keeps_a_correct_fast_path_and_drops_a_broken_one() {
    self_check_case::<bf16>();
    self_check_case::<f16>();
}

/// A class-sharded emulated run ([`plan::shard_forward`]): the global problem, the ranks'
/// slices, the kernels, and which rank's records (if any) to leave out of the gathered data (the
/// mutation test).
struct ShardRun {
    spec: MarginLoss,
    shape: Shape,
    slices: Vec<(usize, usize)>,
    tc: bool,
    state: Option<LossState>,
    elastic: Option<ElasticRng>,
    drop_rank: Option<usize>,
    /// Partial FC's rate: each rank samples its classes (seeded) and the kernels read them
    /// through the index; the reference is then the unsharded loss over the sampled classes.
    rate: Option<f64>,
    seed: u64,
}

/// The emulated sharded step on every rank against the unsharded CPU reference: each rank's
/// forward plan runs up to its exchange (job 1: its records), the records of every rank are
/// concatenated rank-major (what the all-gather gives), and job 2 runs the same plan with the
/// gathered records bound in place of the exchange, then the backward plan on this rank's
/// classes. Every rank's loss, row losses and lse must be the same bits; dx (the ranks' partials
/// summed), dw (the slices concatenated), the loss and the state out within MATH.md's bars of
/// the reference. Returns what failed instead of panicking (the mutation test expects a failure).
fn sharded_check<T: Element + Bits>(r: &ShardRun) -> Result<(), String> {
    let Some(exe) = driver(T::DTYPE) else {
        return Ok(());
    };
    let Shape { b, d, c } = r.shape;
    let k = r.spec.variant.centers();
    let mut inp = margin_inputs(Shape::new(b, d, c * k), r.seed);
    // Targets in the lower third of the classes: the ranks holding the upper ones have none.
    inp.labels
        .iter_mut()
        .filter(|l| **l >= 0)
        .for_each(|l| *l = (*l / k as i32) % (c as i32 / 3).max(1));
    if r.state.is_some() || matches!(r.spec.variant, fused_margin::Variant::MagFace(_)) {
        spread_norms(&mut inp.x, r.shape);
    }
    let x: Vec<T> = inp.x.iter().map(|&v| T::from_f64(v)).collect();
    let w: Vec<T> = inp.w.iter().map(|&v| T::from_f64(v)).collect();
    let inputs = RowInputs {
        state: r.state,
        margins: r.elastic.map(ElasticMargins::Seeded),
    };
    let up32: Vec<f32> = inp.upstream.iter().map(|&v| v as f32).collect();
    let up64: Vec<f64> = up32.iter().map(|&v| v as f64).collect();
    let cpu_up = match r.spec.reduction {
        Reduction::None => Upstream::PerRow(&up64),
        _ => Upstream::Scalar(1.0),
    };
    // Partial FC: each rank's sampled classes, and the reference over them (their rows of w in
    // global order, the labels as their positions).
    let shards: Vec<fused_margin::shard::ClassShard> = r
        .slices
        .iter()
        .map(|&(start, n)| fused_margin::shard::ClassShard::new(start, n, c).unwrap())
        .collect();
    let sampled: Option<Vec<fused_margin::shard::Sampled>> = r.rate.map(|rate| {
        let pfc = fused_margin::shard::PartialFc::new(rate, r.seed).unwrap();
        shards
            .iter()
            .map(|sh| pfc.sample(sh, &inp.labels, 3).unwrap())
            .collect()
    });
    let (ref_w, ref_labels, ref_shape) = match &sampled {
        None => (w.clone(), inp.labels.clone(), r.shape),
        Some(sm) => {
            let (rw, rl, n) = common::sampled_reference(&w, &inp.labels, k * d, sm);
            (rw, rl, Shape::new(b, d, n))
        }
    };
    let reference =
        cpu::forward_with(&r.spec, &x, &ref_w, &ref_labels, ref_shape, &inputs).unwrap();
    let rg = cpu::backward(
        &r.spec,
        &reference,
        &x,
        &ref_w,
        &ref_labels,
        ref_shape,
        cpu_up,
    )
    .unwrap();
    let counted = inp.labels.iter().filter(|&&l| l >= 0).count();
    let world = r.slices.len();
    let params = cuda::params::FmParams::from_spec(&r.spec);
    let mean = r.spec.reduction == Reduction::Mean;
    let half = T::DTYPE != DType::F32;
    let ch = plan::Choices {
        plan: cuda::Plan::Fused,
        tensor_cores: !half || r.tc,
        tf32: !half && r.tc,
        wide_tiles: false,
        wgmma: false,
        tc_backward: r.tc,
        label_check: cuda::LabelCheck::Host,
        tiles_per_split: Some((1, 1)),
    };
    let esize = std::mem::size_of::<T>() as u32;
    let bits = |v: &[T]| v.iter().flat_map(|e| e.to_le_bits()).collect::<Vec<u8>>();
    let i32s = |v: &[i32]| v.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
    let f32s = |v: &[f32]| v.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
    let margins = plan::row_margins(&r.spec, &inputs, b).unwrap();
    let state_in = plan::state_in(&r.spec, &inputs, b).unwrap();
    use plan::Buf;
    // The inputs every job of a rank starts from.
    let inputs_of = |job: &mut Job, rank: usize, labels: &[i32]| {
        let (start, n) = r.slices[rank];
        let wr = &w[start * k * d..(start + n) * k * d];
        let mut ids = HashMap::from([
            (Buf::X, job.buffer(esize, b * d, BufInit::Data(bits(&x)))),
            (
                Buf::W,
                job.buffer(esize, n * k * d, BufInit::Data(bits(wr))),
            ),
            (Buf::Labels, job.buffer(4, b, BufInit::Data(i32s(labels)))),
            (Buf::GRows, job.buffer(4, b, BufInit::Data(f32s(&up32)))),
        ]);
        if let Some(m) = &margins {
            ids.insert(
                Buf::RowMargins,
                job.buffer(4, 2 * b, BufInit::Data(f32s(m))),
            );
        }
        if let Some(st) = &state_in {
            let data = st.iter().flat_map(|v| v.to_le_bytes()).collect();
            ids.insert(Buf::StateIn, job.buffer(8, st.len(), BufInit::Data(data)));
        }
        if let Some(sm) = &sampled {
            let idx: Vec<i32> = sm[rank].index.iter().map(|&j| j as i32).collect();
            ids.insert(
                Buf::WIdx,
                job.buffer(4, idx.len(), BufInit::Data(i32s(&idx))),
            );
        }
        ids
    };
    let mut plans = Vec::new();
    for (rank, shard) in shards.iter().enumerate() {
        let sm = sampled.as_ref().map(|s| &s[rank]);
        let labels = fused_margin::shard::column_labels(&inp.labels, shard, sm).unwrap();
        let local = Shape::new(b, d, sm.map_or(shard.num_local, |s| s.index.len()));
        let fwd = plan::shard_forward(
            &EMU_DEVICE,
            &ch,
            &plan::ForwardProblem {
                dtype: T::DTYPE,
                shape: local,
                aligned: true,
                params,
                mean,
                row_margins: margins.is_some(),
            },
            world,
            sm.is_some(),
        )
        .unwrap();
        let upstream = match r.spec.reduction {
            Reduction::None => plan::PlanUpstream::PerRow,
            Reduction::Mean => plan::PlanUpstream::Scalar(1.0 / counted.max(1) as f32),
            Reduction::Sum => plan::PlanUpstream::Scalar(1.0),
        };
        let bwd = plan::shard_backward(
            &EMU_DEVICE,
            &ch,
            &plan::BackwardProblem {
                dtype: T::DTYPE,
                grad_dtype: DType::F32,
                shape: local,
                aligned: true,
                params,
                mean,
                upstream,
                fwd_tensor_cores: fwd.tensor_cores,
                row_margins: margins.is_some(),
            },
            sm.is_some(),
        )
        .unwrap();
        plans.push((labels, fwd, bwd));
    }
    // The plan's exchanges, in order (the target cosines of CurricularFace and ElasticFace+,
    // then the records), each run as a job per rank up to it, its send buffers concatenated
    // rank-major (the all-gather) and given to the next jobs in its place.
    let exchanges: Vec<(usize, Buf, Buf)> = plans[0]
        .1
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, st)| match st {
            plan::Step::Exchange { send, recv, .. } => Some((i, *send, *recv)),
            _ => None,
        })
        .collect();
    assert!(
        !exchanges.is_empty(),
        "a sharded forward exchanges its records"
    );
    // The forward with the exchanges before `upto` given (their step and allocation removed),
    // cut at exchange `upto` (or whole).
    let staged = |fwd: &plan::LaunchPlan, upto: usize| {
        let mut p = fwd.clone();
        if upto < exchanges.len() {
            p.steps.truncate(exchanges[upto].0);
        }
        let given: Vec<Buf> = exchanges[..upto.min(exchanges.len())]
            .iter()
            .map(|e| e.2)
            .collect();
        p.steps
            .retain(|st| !matches!(st, plan::Step::Exchange { .. }));
        p.buffers.retain(|sp| !given.contains(&sp.buf));
        p
    };
    let mut gathered: Vec<(Buf, usize, Vec<u8>)> = Vec::new();
    for (e, &(_, send, recv)) in exchanges.iter().enumerate() {
        let mut parts = Vec::new();
        for (rank, (labels, fwd, _)) in plans.iter().enumerate() {
            let mut job = Job::default();
            let mut ids = inputs_of(&mut job, rank, labels);
            for (buf, n, data) in &gathered {
                ids.insert(*buf, job.buffer(4, *n, BufInit::Data(data.clone())));
            }
            job.add_plan(&staged(fwd, e), &mut ids);
            let out = run_job(
                &exe,
                &job,
                &[ids[&send]],
                &format!("shard{e}_{}_{rank}", r.seed),
                ("forward", "eager"),
                None,
            );
            parts.push(out);
        }
        if let (Some(q), Buf::ShardAll) = (r.drop_rank, recv) {
            // The mutation: rank q's records as if it held no class (max -inf, sum 0, not
            // owned).
            let empty: Vec<f32> = (0..b)
                .flat_map(|_| [f32::NEG_INFINITY, 0.0, 0.0, 0.0, 0.0])
                .collect();
            parts[q] = f32s(&empty);
        }
        let data = parts.concat();
        gathered.push((recv, data.len() / 4, data));
    }
    let mut results = Vec::new();
    for (rank, (labels, fwd, bwd)) in plans.iter().enumerate() {
        // The last job: the forward with every exchange's gathered data in its place, then the
        // backward, as one stream of kernels.
        let mut job = Job::default();
        let mut fids = inputs_of(&mut job, rank, labels);
        for (buf, n, data) in &gathered {
            fids.insert(*buf, job.buffer(4, *n, BufInit::Data(data.clone())));
        }
        job.add_plan(&staged(fwd, exchanges.len()), &mut fids);
        let mut bids: HashMap<Buf, u32> = [Buf::X, Buf::W, Buf::Labels, Buf::GRows]
            .into_iter()
            .map(|q| (q, fids[&q]))
            .collect();
        if let Some(&id) = fids.get(&Buf::WIdx) {
            bids.insert(Buf::WIdx, id);
        }
        for q in [
            Buf::XNorm,
            Buf::WNorm,
            Buf::Lse,
            Buf::Target,
            Buf::RowMargins,
            Buf::DevMargins,
        ] {
            if let Some(&id) = fids.get(&q) {
                bids.insert(q, id);
            }
        }
        job.add_plan(bwd, &mut bids);
        let mut outs = vec![
            fids[&Buf::Loss],
            fids[&Buf::Lse],
            fids[&Buf::RowLoss],
            bids[&Buf::Dx],
            bids[&Buf::Dw],
        ];
        let state_len = fwd.spec_of(Buf::StateOut).map_or(0, |s| s.len);
        if state_len > 0 {
            outs.push(fids[&Buf::StateOut]);
        }
        let out = run_job(
            &exe,
            &job,
            &outs,
            &format!("shard2_{}_{rank}", r.seed),
            ("forward", "eager"),
            None,
        );
        let n = sampled
            .as_ref()
            .map_or(r.slices[rank].1, |s| s[rank].index.len());
        let nf = 1 + 2 * b + b * d + n * k * d;
        assert_eq!(out.len(), 4 * nf + 8 * state_len, "emulator output size");
        let f = floats(&out[..4 * nf]);
        let st: Vec<i64> = out[4 * nf..]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        results.push((f, plan::state_of(&r.spec, &st)));
    }
    let what = format!(
        "{:?} {:?} {world} ranks {:?} tc={} rate {:?} {:?}",
        T::DTYPE,
        r.shape,
        r.slices,
        r.tc,
        r.rate,
        r.spec
    );
    // Every rank: the same forward bits (the records merged in rank order everywhere).
    for (rank, (f, st)) in results.iter().enumerate() {
        let n = 1 + 2 * b;
        let (f0, st0) = &results[0];
        if f[..n]
            .iter()
            .map(|v| v.to_bits())
            .ne(f0[..n].iter().map(|v| v.to_bits()))
        {
            return Err(format!(
                "{what}: rank {rank}'s forward differs from rank 0's"
            ));
        }
        if st != st0 {
            return Err(format!("{what}: rank {rank}'s state out differs"));
        }
    }
    let f0 = &results[0].0;
    let (loss, lse, row_loss) = (f0[0], &f0[1..1 + b], &f0[1 + b..1 + 2 * b]);
    let dx: Vec<f64> = (0..b * d)
        .map(|e| results.iter().map(|(f, _)| f[1 + 2 * b + e]).sum())
        .collect();
    let dw: Vec<f64> = results
        .iter()
        .flat_map(|(f, _)| f[1 + 2 * b + b * d..].iter().copied())
        .collect();
    let tf32 = T::DTYPE == DType::F32 && r.tc;
    let (lbar, gbar) = if tf32 { TF32_BARS } else { bars(T::DTYPE) };
    let (e_rows, e_lse) = (rel(row_loss, &reference.row_loss), rel(lse, &reference.lse));
    if !(e_rows <= lbar && e_lse <= lbar) {
        return Err(format!(
            "{what}: row loss rel {e_rows:e}, lse rel {e_lse:e}"
        ));
    }
    if r.spec.reduction != Reduction::None {
        let e = (loss - reference.loss).abs() / reference.loss.abs().max(1e-30);
        if e > lbar {
            return Err(format!("{what}: loss {loss} vs {}", reference.loss));
        }
    }
    if !dx.iter().chain(&dw).all(|v| v.is_finite()) {
        return Err(format!("{what}: non-finite or unwritten gradient"));
    }
    let (ex, ew) = (rel(&dx, &rg.dx), rel(&dw, &rg.dw));
    if !(ex <= gbar && ew <= gbar) {
        return Err(format!(
            "{what}: dx rel {ex:e}, dw rel {ew:e} (bar {gbar:e})"
        ));
    }
    match (results[0].1, reference.state) {
        (None, None) => {}
        (Some(LossState::AdaFace { mean, std }), Some(LossState::AdaFace { mean: m, std: s })) => {
            if (mean - m).abs() > lbar * m.abs() || (std - s).abs() > lbar * s.abs() {
                return Err(format!("{what}: state ({mean}, {std}) vs ({m}, {s})"));
            }
        }
        (Some(LossState::CurricularFace { t }), Some(LossState::CurricularFace { t: t0 })) => {
            if (t - t0).abs() > lbar * t0.abs().max(1e-3) {
                return Err(format!("{what}: t {t} vs {t0}"));
            }
        }
        (o, q) => return Err(format!("{what}: state out {o:?}, reference {q:?}")),
    }
    Ok(())
}

/// Uneven slices of `c` classes over `world` ranks, from cut points drawn by `seed`.
fn shard_slices(c: usize, world: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut cuts: Vec<usize> = Vec::new();
    let mut h = seed;
    while cuts.len() + 1 < world {
        h = fused_margin::variant::splitmix(h);
        let v = 1 + (h % (c as u64 - 1)) as usize;
        if !cuts.contains(&v) {
            cuts.push(v);
        }
    }
    cuts.sort_unstable();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(c);
    bounds.windows(2).map(|p| (p[0], p[1] - p[0])).collect()
}

/// The class-sharded plans (`plan::shard_forward`, the backward on each rank's classes) on 1 to
/// 8 emulated ranks with uneven slices, ranks without any row's target and ignored rows: SIMT
/// f32 and tensor-core bf16/f16 forward and backward, every kind of loss (the fixed margins,
/// sub-centers, AdaFace, MagFace, ElasticFace, CurricularFace and ElasticFace+ with their
/// exchange of target cosines), against the unsharded reference.
#[test]
fn sharded_plans_on_the_emulator() {
    let seeded = ElasticRng {
        seed: 3,
        step: 1,
        row_offset: 0,
    };
    let cases: Vec<(MarginLoss, Option<LossState>, Option<ElasticRng>)> = vec![
        (MarginLoss::arcface(0.5), None, None),
        (
            MarginLoss::cosface(0.35).reduction(Reduction::Sum),
            None,
            None,
        ),
        (
            MarginLoss::subcenter(2).reduction(Reduction::None),
            None,
            None,
        ),
        (MarginLoss::adaface(), Some(LossState::ADAFACE_INIT), None),
        (MarginLoss::magface(), None, None),
        (
            MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None),
            None,
            Some(seeded),
        ),
        // The target cosines exchanged before the state: t and the thresholds of rows whose
        // target another rank holds, ElasticFace+'s order over every counted row.
        (
            MarginLoss::curricularface(),
            Some(LossState::CurricularFace { t: 0.3 }),
            None,
        ),
        (
            MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::Rank),
            None,
            Some(seeded),
        ),
    ];
    for (i, (spec, state, elastic)) in cases.into_iter().enumerate() {
        let seed = 4100 + i as u64;
        // 8 ranks for the first loss (SIMT f32 and tensor cores), up to 5 for the others.
        let worlds: &[(usize, bool)] = if i == 0 {
            &[
                (1, false),
                (8, false),
                (8, true),
                (3, false),
                (5, true),
                (2, true),
            ]
        } else {
            &[(1, false), (3, false), (5, true), (2, true)]
        };
        for &(world, tc) in worlds {
            let c = 150;
            let run = ShardRun {
                spec,
                shape: Shape::new(29, 24, c),
                slices: shard_slices(c, world, seed + world as u64),
                tc,
                state,
                elastic,
                drop_rank: None,
                rate: None,
                seed,
            };
            let res = if tc && i % 2 == 0 {
                sharded_check::<bf16>(&run)
            } else if tc {
                sharded_check::<f16>(&run)
            } else {
                sharded_check::<f32>(&run)
            };
            res.unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // The exchange matters: without one rank's records the loss is wrong.
    let broken = ShardRun {
        spec: MarginLoss::arcface(0.5),
        shape: Shape::new(29, 24, 150),
        slices: shard_slices(150, 3, 9),
        tc: false,
        state: None,
        elastic: None,
        drop_rank: Some(2),
        rate: None,
        seed: 4200,
    };
    if driver(DType::F32).is_some() {
        assert!(
            sharded_check::<f32>(&broken).is_err(),
            "a rank's records left out must fail the check"
        );
    }
}

/// Partial FC on the emulated kernels: each rank samples its classes (rate 0.3, every positive
/// kept) and every kernel reads them through the index (`widx`: the SIMT and tensor-core
/// forward and backward, the target pass, the norms), against the unsharded reference over the
/// sampled classes; then `plan::full_dw` scatters a rank's sampled dw rows into its full slice.
#[test]
fn partial_fc_on_the_emulator() {
    let cases: [(MarginLoss, usize, bool); 4] = [
        (MarginLoss::arcface(0.5), 1, false),
        (MarginLoss::arcface(0.5), 3, true),
        (MarginLoss::subcenter(3), 1, false),
        (MarginLoss::cosface(0.35), 4, true),
    ];
    for (i, (spec, world, tc)) in cases.into_iter().enumerate() {
        let seed = 4300 + i as u64;
        let run = ShardRun {
            spec,
            shape: Shape::new(27, 32, 230),
            slices: shard_slices(230, world, seed),
            tc,
            state: None,
            elastic: None,
            drop_rank: None,
            rate: Some(0.3),
            seed,
        };
        let res = if tc {
            sharded_check::<bf16>(&run)
        } else {
            sharded_check::<f32>(&run)
        };
        res.unwrap_or_else(|e| panic!("{e}"));
    }
    // The full layout: rows of the sampled classes from their columns, zeros elsewhere.
    let Some(exe) = driver(DType::F32) else {
        return;
    };
    let (n, k, d) = (11usize, 2usize, 5usize);
    let index = [1usize, 4, 5, 9];
    let compact: Vec<f32> = (0..index.len() * k * d).map(|v| v as f32 + 0.5).collect();
    let mut inv = vec![-1i32; n];
    for (col, &j) in index.iter().enumerate() {
        inv[j] = col as i32;
    }
    let lp = plan::full_dw(n, k, d).unwrap();
    let mut job = Job::default();
    let mut ids = HashMap::from([
        (
            plan::Buf::Dw,
            job.buffer(
                4,
                compact.len(),
                BufInit::Data(compact.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ),
        ),
        (
            plan::Buf::WInv,
            job.buffer(
                4,
                n,
                BufInit::Data(inv.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ),
        ),
    ]);
    job.add_plan(&lp, &mut ids);
    let out = floats(&run_job(
        &exe,
        &job,
        &[ids[&plan::Buf::DwFull]],
        "fulldw",
        ("forward", "eager"),
        None,
    ));
    let per = k * d;
    for j in 0..n {
        let row = &out[j * per..(j + 1) * per];
        match index.iter().position(|&q| q == j) {
            Some(col) => assert!(row
                .iter()
                .zip(&compact[col * per..])
                .all(|(a, &b)| *a == b as f64)),
            None => assert!(row.iter().all(|&v| v == 0.0), "class {j}: {row:?}"),
        }
    }
}
