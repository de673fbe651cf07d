//! Prefill over a batch of variable-length sequences in one call, in flash-attention's
//! "varlen" form: the sequences' queries, keys and values are packed along the token
//! axis (`[total_q, H_q, d]`, `[total_k, H_kv, d]`, `[total_k, H_kv, d_v]`) and
//! sequence `b` owns query rows `cu_seqlens_q[b] .. cu_seqlens_q[b + 1]` and key rows
//! `cu_seqlens_k[b] .. cu_seqlens_k[b + 1]`. Positions are per token (`q_pos` has
//! `total_q` entries, `k_pos` `total_k`), so each sequence may start anywhere (chunked
//! prefill against a prefix) and use any position map the [`Attention`] describes.
//!
//! Sequence `b`'s output rows are exactly what a call of the same kernel on that
//! sequence alone returns, bit for bit: each sequence runs the single-sequence kernel
//! on sub-views of the packed inputs (no copy) and writes its own output rows. Work is
//! parallel over sequences and, inside each, over query blocks (tiled kernel) or heads
//! (two-pass), with rayon's work stealing balancing long and short sequences.
//! Sequences never see each other's keys.

use ndarray::{Array3, Axis};

use super::{Attention, Kernel, check_output};
use crate::error::{Result, RopeError};
use crate::tensor::{Element, View3, View3Mut};

/// The layout of a packed batch: cumulative sequence offsets of queries and keys and
/// every token's position (see the [module docs](self)).
///
/// `cu_seqlens_q` and `cu_seqlens_k` have one entry more than the batch has sequences,
/// start at 0 and never decrease; their last entries are the packed token counts, which
/// must equal `q_pos.len()` and `k_pos.len()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VarLen<'s> {
    cu_seqlens_q: &'s [usize],
    cu_seqlens_k: &'s [usize],
    q_pos: &'s [usize],
    k_pos: &'s [usize],
}

/// Checks one offsets list against its token count.
fn check_offsets(what: &'static str, cu: &[usize], total: usize) -> Result<()> {
    match cu.first() {
        None => {
            return Err(RopeError::shape(
                what,
                "batch + 1 offsets (at least [0])",
                "an empty list",
            ));
        }
        Some(&first) if first != 0 => {
            return Err(RopeError::invalid(
                format!("{what}[0]"),
                first,
                "offsets start at 0",
            ));
        }
        _ => {}
    }
    if let Some(b) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(RopeError::invalid(
            format!("{what}[{}]", b + 1),
            cu[b + 1],
            format!("offsets never decrease (the previous one is {})", cu[b]),
        ));
    }
    let last = cu[cu.len() - 1];
    if last != total {
        return Err(RopeError::shape(
            what,
            format!("a last offset equal to the {total} packed tokens"),
            if last > total {
                format!("{last}, past the data")
            } else {
                format!("{last}, leaving tokens unused")
            },
        ));
    }
    Ok(())
}

impl<'s> VarLen<'s> {
    /// Checks the offsets (start at 0, non-decreasing, as many query as key sequences,
    /// last offsets = the numbers of positions) and returns the layout.
    pub fn new(
        cu_seqlens_q: &'s [usize],
        cu_seqlens_k: &'s [usize],
        q_pos: &'s [usize],
        k_pos: &'s [usize],
    ) -> Result<Self> {
        check_offsets("cu_seqlens_q", cu_seqlens_q, q_pos.len())?;
        check_offsets("cu_seqlens_k", cu_seqlens_k, k_pos.len())?;
        if cu_seqlens_q.len() != cu_seqlens_k.len() {
            return Err(RopeError::shape(
                "cu_seqlens_k",
                format!(
                    "{} offsets, one per sequence of cu_seqlens_q plus one",
                    cu_seqlens_q.len()
                ),
                cu_seqlens_k.len(),
            ));
        }
        Ok(VarLen {
            cu_seqlens_q,
            cu_seqlens_k,
            q_pos,
            k_pos,
        })
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.cu_seqlens_q.len() - 1
    }

    /// Packed query tokens.
    pub fn total_q(&self) -> usize {
        self.q_pos.len()
    }

    /// Packed key tokens.
    pub fn total_k(&self) -> usize {
        self.k_pos.len()
    }

    /// Query rows and key rows of sequence `b`.
    fn rows(&self, b: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        (
            self.cu_seqlens_q[b]..self.cu_seqlens_q[b + 1],
            self.cu_seqlens_k[b]..self.cu_seqlens_k[b + 1],
        )
    }
}

/// One sequence of a batch: its q, k, v views and its query and key rows.
type Seq<'a, T> = (
    View3<'a, T>,
    View3<'a, T>,
    View3<'a, T>,
    std::ops::Range<usize>,
    std::ops::Range<usize>,
);

/// Checks that the packed view `x` has `total` tokens.
fn check_tokens<T>(what: &'static str, x: &View3<T>, total: usize) -> Result<()> {
    let n = x.dims()[0];
    if n != total {
        return Err(RopeError::shape(
            what,
            format!("{total} packed tokens (the last cu_seqlens offset)"),
            n,
        ));
    }
    Ok(())
}

impl Attention {
    /// `kernel` over every sequence of a packed batch (see the [module docs](self)):
    /// returns the packed output `[total_q, H_q, d_v]`. Allocates it and calls
    /// [`Attention::varlen_into`].
    ///
    /// ```
    /// # #[cfg(feature = "half")] {
    /// use half::bf16;
    /// use ropex::attention::{Attention, Kernel, VarLen};
    /// use ropex::tensor::View3;
    /// use ropex::{Layout, PositionMap, RopeConfig};
    /// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
    /// let att = Attention::new(freqs, Layout::Half, PositionMap::rerope(4)?);
    /// // two prompts of 3 and 5 tokens, 2 query heads, 1 kv head, d = 8, in bf16
    /// let (h_q, d) = (2, 8);
    /// let q: Vec<bf16> = (0..8 * h_q * d).map(|i| bf16::from_f32((i % 5) as f32 * 0.2)).collect();
    /// let kv: Vec<bf16> = (0..8 * d).map(|i| bf16::from_f32((i % 3) as f32 * 0.3)).collect();
    /// let cu = [0, 3, 8];
    /// let pos = [0, 1, 2, 0, 1, 2, 3, 4]; // each prompt from position 0
    /// let batch = VarLen::new(&cu, &cu, &pos, &pos)?;
    /// let q = View3::tokens_heads_dim(&q, 8, h_q, d)?;
    /// let kv = View3::tokens_heads_dim(&kv, 8, 1, d)?;
    /// let out = att.varlen(Kernel::default(), q, kv, kv, &batch)?;
    /// assert_eq!(out.dim(), (8, h_q, d));
    /// // the second prompt alone gives the same rows
    /// let alone = att.tiled(q.tokens(3..8)?, kv.tokens(3..8)?, kv.tokens(3..8)?, &pos[3..], &pos[3..])?;
    /// assert_eq!(out.slice(ndarray::s![3.., .., ..]), alone);
    /// # }
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    pub fn varlen<'a, T: Element>(
        &self,
        kernel: Kernel,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        batch: &VarLen,
    ) -> Result<Array3<T>> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let [_, heads_q, _] = q.dims();
        let value_dim = v.dims()[2];
        let mut out = super::zeros3(batch.total_q(), heads_q, value_dim)?;
        self.varlen_into(kernel, q, k, v, batch, &mut out)?;
        Ok(out)
    }

    /// [`Attention::varlen`] writing into `out` (`[total_q, H_q, d_v]`, any strides).
    /// Every input is checked before anything is computed; on an error `out` is left
    /// untouched.
    pub fn varlen_into<'a, 'o, T: Element>(
        &self,
        kernel: Kernel,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        batch: &VarLen,
        out: impl Into<View3Mut<'o, T>>,
    ) -> Result<()> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let mut out = out.into();
        check_tokens("q", &q, batch.total_q())?;
        check_tokens("k", &k, batch.total_k())?;
        check_tokens("v", &v, batch.total_k())?;
        // Whole-batch shapes (heads, dims, every position) once, then each sequence's.
        let dims = self.validate(&q, &k, &v, batch.q_pos, batch.k_pos)?;
        check_output(&dims, &out)?;
        if let Kernel::Tiled(tiles) = kernel {
            tiles.validate()?;
        }
        let mut parts = Vec::with_capacity(batch.batch());
        for b in 0..batch.batch() {
            let (qr, kr) = batch.rows(b);
            let (qs, ks, vs) = (
                q.tokens(qr.clone())?,
                k.tokens(kr.clone())?,
                v.tokens(kr.clone())?,
            );
            self.validate(
                &qs,
                &ks,
                &vs,
                &batch.q_pos[qr.clone()],
                &batch.k_pos[kr.clone()],
            )?;
            parts.push((qs, ks, vs, qr, kr));
        }
        // Disjoint output rows per sequence.
        let mut rest = out.as_ndarray();
        let mut work = Vec::with_capacity(parts.len());
        for part in parts {
            let (head, tail) = rest.split_at(Axis(0), part.3.len());
            work.push((part, View3Mut::from(head)));
            rest = tail;
        }
        let run = |((qs, ks, vs, qr, kr), out): (Seq<T>, View3Mut<T>)| {
            self.run_into(kernel, qs, ks, vs, &batch.q_pos[qr], &batch.k_pos[kr], out)
                .map(|_| ())
        };
        self.par_run(work, run).into_iter().collect()
    }
}
