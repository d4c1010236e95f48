//! Strided row views: the argument type of every kernel that reads or writes a matrix.
//!
//! A view is a slice with its shape (rows, columns) and strides; its constructor checks once
//! that the slice holds the shape, so kernels take shapes from views instead of re-checking
//! loose (slice, rows, stride, width) tuples.

/// An immutable strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

fn required_len(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// All of `data` as contiguous rows of `cols` floats (an embedding table). Panics unless
    /// `data` is a whole number of rows, or if `cols` is 0.
    pub fn from_rows(data: &'a [f32], cols: usize) -> Self {
        assert!(cols > 0, "matrix view of rows of 0 columns");
        assert!(
            data.len().is_multiple_of(cols),
            "matrix view: {} floats are not a whole number of {cols}-wide rows",
            data.len()
        );
        Self::new(data, data.len() / cols, cols)
    }

    /// A row-major matrix whose rows are `row_stride` floats apart.
    pub fn with_row_stride(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self::strided(data, rows, cols, row_stride, 1)
    }

    /// A general strided view. Panics if `data` is too short.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let need = required_len(rows, cols, rs, cs);
        assert!(
            data.len() >= need,
            "matrix view {rows}x{cols} (strides {rs}, {cs}) needs {need} floats, slice has {}",
            data.len()
        );
        MatRef {
            data: &data[..need],
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn row_stride(&self) -> usize {
        self.rs
    }
    pub fn col_stride(&self) -> usize {
        self.cs
    }

    /// Element (i, j).
    pub fn get(&self, i: usize, j: usize) -> f32 {
        assert!(i < self.rows && j < self.cols);
        self.data[i * self.rs + j * self.cs]
    }

    /// The `rows x cols` sub-matrix starting at (i0, j0).
    pub fn sub(&self, i0: usize, j0: usize, rows: usize, cols: usize) -> MatRef<'a> {
        assert!(i0 + rows <= self.rows && j0 + cols <= self.cols);
        if rows == 0 || cols == 0 {
            return MatRef::strided(&[], rows, cols, self.rs, self.cs);
        }
        MatRef::strided(
            &self.data[i0 * self.rs + j0 * self.cs..],
            rows,
            cols,
            self.rs,
            self.cs,
        )
    }

    /// The elements of row i, in column order.
    pub fn row_iter(&self, i: usize) -> impl Iterator<Item = f32> + 'a {
        let data: &'a [f32] = self.data;
        data[i * self.rs..]
            .iter()
            .step_by(self.cs.max(1))
            .take(self.cols)
            .copied()
    }

    /// The elements of column j, in row order.
    pub fn col_iter(&self, j: usize) -> impl Iterator<Item = f32> + 'a {
        let data: &'a [f32] = self.data;
        data[j * self.cs..]
            .iter()
            .step_by(self.rs.max(1))
            .take(self.rows)
            .copied()
    }

    /// `len` contiguous elements of row i from column j0 (requires a unit column stride).
    pub fn row_slice(&self, i: usize, j0: usize, len: usize) -> &'a [f32] {
        assert!(self.cs == 1 && j0 + len <= self.cols);
        let start = i * self.rs + j0;
        &self.data[start..start + len]
    }

    /// The elements the view spans, from (0, 0) to (rows - 1, cols - 1) inclusive.
    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }

    /// Pointer to element (0, 0), for handing the view to foreign code.
    pub fn as_ptr(&self) -> *const f32 {
        self.data.as_ptr()
    }

    pub(crate) fn ptr_at(&self, i: usize, j: usize) -> *const f32 {
        self.data.as_ptr().wrapping_add(i * self.rs + j * self.cs)
    }
}

/// A mutable row-major view: element (i, j) is `data[i * rs + j]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    pub(crate) data: &'a mut [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
}

impl<'a> MatMut<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::with_row_stride(data, rows, cols, cols)
    }

    /// All of `data` as contiguous rows of `cols` floats (an embedding table). Panics unless
    /// `data` is a whole number of rows, or if `cols` is 0.
    pub fn from_rows(data: &'a mut [f32], cols: usize) -> Self {
        assert!(cols > 0, "matrix view of rows of 0 columns");
        assert!(
            data.len().is_multiple_of(cols),
            "matrix view: {} floats are not a whole number of {cols}-wide rows",
            data.len()
        );
        let rows = data.len() / cols;
        Self::new(data, rows, cols)
    }

    /// A row-major matrix whose rows are `row_stride >= cols` floats apart.
    pub fn with_row_stride(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(rs >= cols || rows <= 1, "row stride {rs} < {cols} columns");
        let need = required_len(rows, cols, rs, 1);
        assert!(
            data.len() >= need,
            "matrix {rows}x{cols} (row stride {rs}) needs {need} floats, slice has {}",
            data.len()
        );
        MatMut {
            data: &mut data[..need],
            rows,
            cols,
            rs,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn row_stride(&self) -> usize {
        self.rs
    }

    /// Element (i, j).
    pub fn get(&self, i: usize, j: usize) -> f32 {
        assert!(i < self.rows && j < self.cols);
        self.data[i * self.rs + j]
    }

    /// Row i as a slice.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows);
        let start = i * self.rs;
        &mut self.data[start..start + self.cols]
    }

    /// A read-only view of the same matrix.
    pub fn as_ref(&self) -> MatRef<'_> {
        MatRef::strided(self.data, self.rows, self.cols, self.rs, 1)
    }

    /// The elements the view spans, from (0, 0) to (rows - 1, cols - 1) inclusive, given up
    /// to a kernel that splits the rows itself.
    pub fn into_slice(self) -> &'a mut [f32] {
        self.data
    }

    /// The columns `j0 .. j0 + cols` of every row, as a view of their own (a slot of the rows).
    pub fn into_cols(self, j0: usize, cols: usize) -> MatMut<'a> {
        assert!(
            j0 + cols <= self.cols,
            "columns {j0}..{} of a matrix of {} columns",
            j0 + cols,
            self.cols
        );
        let (rows, rs) = (self.rows, self.rs);
        if rows == 0 || cols == 0 {
            return MatMut::with_row_stride(&mut [], 0, cols, rs.max(cols));
        }
        MatMut::with_row_stride(&mut self.data[j0..], rows, cols, rs)
    }

    /// A shorter-lived mutable view (to pass on without giving this one up).
    pub fn rb_mut(&mut self) -> MatMut<'_> {
        MatMut {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            rs: self.rs,
        }
    }
}

/// Rows of a `dim`-wide row-major table (panics on a ragged table or dim = 0).
pub(crate) fn table_rows(table: &[f32], dim: usize, who: &str) -> usize {
    assert!(dim > 0, "{who}: dim is 0");
    assert!(
        table.len().is_multiple_of(dim),
        "{who}: table of {} floats is not a whole number of {dim}-wide rows",
        table.len()
    );
    table.len() / dim
}

/// Checks that the view `what` is `n` rows of `dim` floats with contiguous columns.
pub(crate) fn check_view(view: MatRef, n: usize, dim: usize, what: &str, who: &str) {
    assert!(
        view.rows() == n && view.cols() == dim && view.col_stride() == 1,
        "{who}: {what} is {}x{} (column stride {}), needs {n}x{dim} with contiguous rows",
        view.rows(),
        view.cols(),
        view.col_stride()
    );
}

/// The floats of `table`, a view of rows of `dim` contiguous floats one after the other (an
/// embedding table): panics unless it is one.
pub(crate) fn table_slice<'a>(table: MatRef<'a>, dim: usize, who: &str) -> &'a [f32] {
    assert!(
        table.cols() == dim
            && table.col_stride() == 1
            && (table.row_stride() == dim || table.rows() <= 1),
        "{who}: table is {}x{} (strides {}, {}), needs contiguous rows of {dim}",
        table.rows(),
        table.cols(),
        table.row_stride(),
        table.col_stride()
    );
    table.as_slice()
}
