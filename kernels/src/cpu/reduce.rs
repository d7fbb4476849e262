//! Reductions over trailing axes: each row of a `rows x n` buffer becomes one value. Sums
//! accumulate in f64, as the reference interpreter does, so long rows (a flow's logdet over
//! every token and value) round once.

/// Which reduction a row gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowReduce {
    /// The sum of the row.
    Sum,
    /// The sum over the row's length.
    Mean,
    /// The largest value (NaN ignored).
    Max,
    /// The smallest value (NaN ignored).
    Min,
}

/// `out[r] = op(x[r*n .. (r+1)*n])` for each of `rows` rows; `n >= 1`.
pub fn reduce_rows(x: &[f32], rows: usize, n: usize, op: RowReduce, out: &mut [f32]) {
    debug_assert!(x.len() >= rows * n && out.len() >= rows && n >= 1);
    for (row, o) in x.chunks_exact(n).zip(out.iter_mut()).take(rows) {
        *o = match op {
            RowReduce::Sum => row.iter().map(|&v| v as f64).sum::<f64>() as f32,
            RowReduce::Mean => (row.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32,
            RowReduce::Max => row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
            RowReduce::Min => row.iter().fold(f32::INFINITY, |m, &v| m.min(v)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_reduce_independently() {
        let x = [1.0, 2.0, 3.0, -4.0, 0.5, 6.0];
        let mut out = [0.0; 2];
        for (op, want) in
            [(RowReduce::Sum, [6.0, 2.5]), (RowReduce::Mean, [2.0, 2.5 / 3.0]), (RowReduce::Max, [3.0, 6.0]), (RowReduce::Min, [1.0, -4.0])]
        {
            reduce_rows(&x, 2, 3, op, &mut out);
            assert_eq!(out, want, "{op:?}");
        }
    }
}
