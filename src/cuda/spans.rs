//! Device address ranges of the buffers a call is given, and the check that no output overlaps
//! another buffer: shared by the handle's `*_into` calls (views the caller made) and the raw entry
//! (pointers the caller passed), so both report an overlap the same way.

use crate::error::{Error, Result};

/// A buffer as an address range: its name, first byte, length in elements and element size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    /// The argument's name (`"x"`, `"dx"`, ...), as errors report it.
    pub what: &'static str,
    /// The device address of the first element.
    pub ptr: u64,
    /// Elements.
    pub len: usize,
    /// Bytes per element.
    pub elem: usize,
}

impl Span {
    /// The byte range `[start, end)`, or the error naming a range past the end of the address
    /// space (a made-up pointer; cudarc's own views never give one).
    pub fn bytes(&self) -> Result<(u64, u64)> {
        let n = (self.len as u64).checked_mul(self.elem as u64);
        match n.and_then(|n| self.ptr.checked_add(n)) {
            Some(end) => Ok((self.ptr, end)),
            None => Err(Error::InvalidArgument {
                what: self.what,
                detail: format!(
                    "{:#x} + {} elements of {} bytes overflows the address space",
                    self.ptr, self.len, self.elem
                ),
            }),
        }
    }
}

/// Checks that no output overlaps an input or another output (ranges that only touch are
/// fine). The error names the output, both ranges and both lengths.
pub(crate) fn check_disjoint(inputs: &[Span], outputs: &[Span]) -> Result<()> {
    for (k, o) in outputs.iter().enumerate() {
        let (o0, o1) = o.bytes()?;
        for other in inputs.iter().chain(&outputs[k + 1..]) {
            let (a0, a1) = other.bytes()?;
            if o0 < a1 && a0 < o1 {
                return Err(Error::InvalidArgument {
                    what: o.what,
                    detail: format!(
                        "output [{o0:#x}, {o1:#x}) ({} elements) overlaps {} [{a0:#x}, {a1:#x}) \
                         ({} elements)",
                        o.len, other.what, other.len
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(what: &'static str, ptr: u64, len: usize) -> Span {
        Span {
            what,
            ptr,
            len,
            elem: 4,
        }
    }

    #[test]
    fn touching_ranges_pass_and_one_shared_byte_fails() {
        let x = span("x", 0x1000, 16); // [0x1000, 0x1040)
        let dx = span("dx", 0x1040, 16);
        let dw = span("dw", 0x1080, 8);
        check_disjoint(&[x], &[dx, dw]).unwrap();
        let e = check_disjoint(&[x], &[span("dx", 0x103c, 16), dw]).unwrap_err();
        let Error::InvalidArgument { what, detail } = e else {
            panic!("expected InvalidArgument, got {e:?}");
        };
        assert_eq!(what, "dx");
        assert!(
            detail.contains("overlaps x") && detail.contains("(16 elements)"),
            "{detail}"
        );
    }

    #[test]
    fn outputs_are_checked_against_each_other() {
        let dx = span("dx", 0x2000, 16);
        let dw = span("dw", 0x2000 + 60, 4);
        let e = check_disjoint(&[], &[dx, dw]).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument { what: "dx", detail } if detail.contains("overlaps dw")),
            "{e:?}"
        );
        // A view inside another one is an overlap too.
        let inner = span("loss", 0x2000 + 8, 1);
        assert!(check_disjoint(&[dx], &[inner]).is_err());
    }

    #[test]
    fn a_range_past_the_address_space_is_reported() {
        let e = check_disjoint(&[], &[span("dw", u64::MAX - 3, 2)]).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument { what: "dw", detail } if detail.contains("overflows")),
            "{e:?}"
        );
    }
}
