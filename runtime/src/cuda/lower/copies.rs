//! A concat's copies as one launch (issue 16): a concat lowers to one strided copy per part,
//! and [`super::merge::merge_pairs`] runs two independent concats' copies part by part as
//! `_x2` launches (prefill's K and V cache writes: two launches for two parts each). The parts
//! of one concat write disjoint ranges of its output, so where no part reads the output, a
//! concat's two copies run as one `copy_b*_x2` launch, and a merged pair's two `_x2` launches as
//! one `copy_b*_x4` launch (half `blockIdx.y` of four runs one copy). Where the loaded modules
//! lack the entry (`has`), the launches stay as they are.

use super::merge::{joined, merged, Access, X2, X4};
use super::{Launch, Layout, Work};
use kiln_graph::program::Step;
use kiln_graph::Op;

/// Whether step `s` is a concat none of whose parts reads what it writes.
fn apart(s: &Step, l: &Layout) -> Result<bool, String> {
    let a = Access::of(s, l)?;
    Ok(matches!(s.op, Op::Concat { .. }) && !a.reads(a.write))
}

/// Two launches of one copy kernel, one-dimensional over halves of one count.
fn two_copies(work: &[Work]) -> Option<(&Launch, &Launch)> {
    let [Work::Kernel(a), Work::Kernel(b)] = work else { return None };
    let same = a.kernel == b.kernel && a.block == b.block && a.smem == b.smem && a.params.len() == b.params.len();
    (same && a.kernel.starts_with("copy_b") && a.grid.1 == b.grid.1 && a.grid.2 == 1 && b.grid.2 == 1).then_some((a, b))
}

/// Joins each concat's copies, and each merged pair of concats' `_x2` launches, where `has`
/// says the entry is loaded. `pairs` are [`super::merge::merge_pairs`]'s (earlier, later).
pub fn join_concat_copies(
    steps: &[Step],
    work: &mut [Vec<Work>],
    l: &Layout,
    has: &dyn Fn(&str) -> bool,
    pairs: &[(usize, usize)],
) -> Result<(), (usize, String)> {
    for j in 0..steps.len() {
        let Some((a, b)) = two_copies(&work[j]) else { continue };
        let partner = pairs.iter().find(|&&(_, later)| later == j).map(|&(i, _)| i);
        let joined = match (a.grid.1, a.kernel.strip_suffix(X2), partner) {
            // A merged pair of concats: both must keep their parts apart from their outputs.
            (2, Some(base), Some(i)) => {
                let ok = apart(&steps[i], l).map_err(|m| (i, m))? && apart(&steps[j], l).map_err(|m| (j, m))?;
                let name = format!("{base}{X4}");
                (ok && has(&name)).then(|| joined(a, b, name))
            }
            // One concat's two copies.
            (1, None, None) => {
                let ok = apart(&steps[j], l).map_err(|m| (j, m))?;
                (ok && has(&format!("{}{X2}", a.kernel))).then(|| merged(a, b))
            }
            _ => None,
        };
        if let Some(k) = joined {
            work[j] = vec![Work::Kernel(k)];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::merge::lower_entry;
    use super::super::merge::tests::concat;
    use super::*;

    fn kernels(w: &[Work]) -> Vec<(String, u32)> {
        w.iter().map(|w| if let Work::Kernel(k) = w { (k.kernel.clone(), k.grid.1) } else { panic!() }).collect()
    }

    /// The destination of each copy a launch holds (its halves, in order).
    fn dsts(w: &Work) -> Vec<u64> {
        let Work::Kernel(k) = w else { panic!() };
        let per = std::mem::size_of::<kiln_kernels::cuda::CopyParams>();
        (0..k.params.len() / per).map(|h| u64::from_le_bytes(k.params[h * per + 8..h * per + 16].try_into().unwrap())).collect()
    }

    #[test]
    fn two_concats_copies_are_one_launch_of_four() {
        let steps = [concat(0, 1024, 2048), concat(4096, 5120, 6144)];
        let l = Layout::default();
        let low = lower_entry(&steps, &l, &|_| true).unwrap();
        assert_eq!(low.pairs, [(0, 1)]);
        assert!(low.work[0].is_empty());
        assert_eq!(kernels(&low.work[1]), [("copy_b2_x4".to_string(), 4)]);
        // K's first part, V's first part, K's second, V's second.
        assert_eq!(dsts(&low.work[1][0]), [2048, 6144, 2048 + 32, 6144 + 32]);
        // Without the `_x4` entry, the pair's two `_x2` launches.
        let low = lower_entry(&steps, &l, &|k| !k.ends_with(X4)).unwrap();
        assert_eq!(kernels(&low.work[1]), [("copy_b2_x2".to_string(), 2), ("copy_b2_x2".to_string(), 2)]);
    }

    #[test]
    fn one_concats_copies_are_one_launch_unless_a_part_reads_the_output() {
        let l = Layout::default();
        let low = lower_entry(&[concat(0, 1024, 2048)], &l, &|_| true).unwrap();
        assert_eq!(kernels(&low.work[0]), [("copy_b2_x2".to_string(), 2)]);
        assert_eq!(dsts(&low.work[0][0]), [2048, 2048 + 32]);
        // The second part lies inside the output: its copy must follow the first's.
        let low = lower_entry(&[concat(0, 2048 + 32, 2048)], &l, &|_| true).unwrap();
        assert_eq!(kernels(&low.work[0]), [("copy_b2".to_string(), 1), ("copy_b2".to_string(), 1)]);
        // No `_x2` entry loaded.
        let low = lower_entry(&[concat(0, 1024, 2048)], &l, &|k| !k.ends_with(X2)).unwrap();
        assert_eq!(low.work[0].len(), 2);
    }
}
