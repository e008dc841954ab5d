//! The family argument structs: the forward tile kernels take one `FmTileArgs` by value, the
//! gradient kernels one `FmGradArgs` (kernels/args.cuh), instead of 14 to 18 positional
//! parameters.
//!
//! The field lists are written once, as X-macros in kernels/args.cuh; build.rs turns each into
//! a Rust struct of [`Arg`]s named as the C fields ([`TileArgs`], [`GradArgs`]) and its
//! [`Layout`]. The plan builder fills the struct by name, so a launch's arguments come in the
//! layout's order without being counted by hand; [`check`] holds each argument to its field's
//! kind (a read buffer for a `const` pointer, ...), and [`pack`] lays the resolved values out with
//! C's rules (each field at the next multiple of its alignment), the size checked against the
//! one the kernels' static_asserts pin (geometry.cuh).
use super::params::FmParams;
use super::plan::Arg;
use crate::error::{Error, Result};

/// A field's C type class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// `const T*`: a buffer the kernel reads, or null.
    ConstPtr,
    /// `T*`: a buffer the kernel writes, or null.
    MutPtr,
    /// `FmParams` by value.
    Params,
    /// `i64` (`long long`).
    I64,
    /// `int`.
    I32,
    /// `float`.
    F32,
}

impl FieldKind {
    /// (size, alignment) in bytes, as the CUDA and host C++ compilers lay them out.
    fn size_align(self) -> (usize, usize) {
        match self {
            FieldKind::ConstPtr | FieldKind::MutPtr | FieldKind::I64 => (8, 8),
            FieldKind::Params => (
                std::mem::size_of::<FmParams>(),
                std::mem::align_of::<FmParams>(),
            ),
            FieldKind::I32 | FieldKind::F32 => (4, 4),
        }
    }

    fn accepts(self, a: &Arg) -> bool {
        matches!(
            (self, a),
            (FieldKind::ConstPtr, Arg::Read(_) | Arg::Null)
                | (FieldKind::MutPtr, Arg::Write(_) | Arg::Null)
                | (FieldKind::Params, Arg::Params(_))
                | (FieldKind::I64, Arg::I64(_))
                | (FieldKind::I32, Arg::I32(_))
                | (FieldKind::F32, Arg::F32(_))
        )
    }
}

/// One field of an argument struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Its C name.
    pub name: &'static str,
    /// Its type class.
    pub kind: FieldKind,
}

/// An argument struct's layout: its C name, fields in order, and `sizeof`.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// The C struct's name (`FmTileArgs`); the emulator checks it against the kernel's.
    pub name: &'static str,
    /// `sizeof` as geometry.cuh states it and the kernels' static_asserts hold it.
    pub bytes: usize,
    /// The fields in declaration order.
    pub fields: &'static [Field],
}

impl Layout {
    /// Each field's byte offset and the struct's size, by C's rules.
    pub fn offsets(&self) -> (Vec<usize>, usize) {
        let (mut at, mut align) = (0usize, 1usize);
        let mut offs = Vec::with_capacity(self.fields.len());
        for f in self.fields {
            let (size, a) = f.kind.size_align();
            at = at.next_multiple_of(a);
            offs.push(at);
            at += size;
            align = align.max(a);
        }
        (offs, at.next_multiple_of(align))
    }
}

/// A launch's arguments as one struct: the layout and the fields' arguments in its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The struct.
    pub layout: &'static Layout,
    /// One argument per field, in layout order.
    pub fields: Vec<Arg>,
}

include!(concat!(env!("OUT_DIR"), "/args.rs"));

/// Every layout, for the tests that hold them to the kernels.
pub static LAYOUTS: [&Layout; 2] = [&TILE_ARGS, &GRAD_ARGS];

fn plan_error(entry: &str, detail: String) -> Error {
    Error::InvalidArgument {
        what: "launch plan",
        detail: format!("{entry}: {detail}"),
    }
}

/// Holds a launch's arguments to the struct `l`: one per field, each of the field's kind, and the
/// layout's size equal to the kernels' `sizeof`.
pub fn check(entry: &str, l: &Layout, args: &[Arg]) -> Result<()> {
    if args.len() != l.fields.len() {
        return Err(plan_error(
            entry,
            format!(
                "{} arguments for {}'s {} fields",
                args.len(),
                l.name,
                l.fields.len()
            ),
        ));
    }
    for (f, a) in l.fields.iter().zip(args) {
        if !f.kind.accepts(a) {
            return Err(plan_error(
                entry,
                format!("{}.{} is {:?}, given {a:?}", l.name, f.name, f.kind),
            ));
        }
    }
    let (_, size) = l.offsets();
    if size != l.bytes {
        return Err(plan_error(
            entry,
            format!(
                "{} packs to {size} bytes, the kernels' struct has {}",
                l.name, l.bytes
            ),
        ));
    }
    Ok(())
}

/// A resolved argument value: a device address, or a scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A device address (0: null).
    Ptr(u64),
    /// `i64`.
    I64(i64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `FmParams`.
    Params(FmParams),
}

/// Room for any argument struct, aligned as the most aligned field. The driver copies the
/// kernel's own parameter size from it (the function's metadata), so the tail is never read.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub struct ArgBytes(pub [u8; 512]);

/// The resolved values of a launch's arguments laid out as the C struct `l`, once per launch.
/// The plan builder already held the arguments to the fields ([`check`], constness included);
/// here each value must still be of its field's kind and the layout the kernels' size. No
/// allocation: the bytes go straight into the block.
pub fn pack(entry: &str, l: &Layout, values: &[Value]) -> Result<ArgBytes> {
    let (offs, size) = l.offsets();
    let mut out = ArgBytes([0u8; 512]);
    if size != l.bytes || size > out.0.len() || values.len() != offs.len() {
        return Err(plan_error(
            entry,
            format!(
                "{} values for {}'s {} fields ({size} bytes, the kernels' struct has {})",
                values.len(),
                l.name,
                l.fields.len(),
                l.bytes
            ),
        ));
    }
    for ((f, v), at) in l.fields.iter().zip(values).zip(offs) {
        let mut put = |b: &[u8]| out.0[at..at + b.len()].copy_from_slice(b);
        match (f.kind, v) {
            (FieldKind::ConstPtr | FieldKind::MutPtr, Value::Ptr(a)) => put(&a.to_ne_bytes()),
            (FieldKind::I64, Value::I64(v)) => put(&v.to_ne_bytes()),
            (FieldKind::I32, Value::I32(v)) => put(&v.to_ne_bytes()),
            (FieldKind::F32, Value::F32(v)) => put(&v.to_ne_bytes()),
            (FieldKind::Params, Value::Params(v)) => put(bytemuck::bytes_of(v)),
            _ => {
                return Err(plan_error(
                    entry,
                    format!("{}.{} given the value {v:?}", l.name, f.name),
                ))
            }
        }
    }
    Ok(out)
}
