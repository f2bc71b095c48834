// Fisher optimal segmentation of ordered rows into contiguous segments (pure C++17, no Python).
//
// The numpy module sglp_fast/_segment_ref.py is the spec: every floating-point operation here happens in
// the same order, so costs, objectives and breakpoints are bit-identical to it (and to any thread count:
// each output element is computed by exactly one thread in a fixed order).
// Bad input throws std::invalid_argument (pybind11 turns it into ValueError).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace sglp {

// Segment costs by segment end: cost_by_end[j * L + i] = D(i, j) for i <= j (0 above the diagonal), where
// D(i, j) = sum_{t=i..j} ||x_t - mean(x_i..x_j)||^2 for the row-major profiles x (L x p).
// O(L^2 p) time through prefix sums of mean-centred rows; O(L^2) memory.
std::vector<double> segment_costs_by_end(const double* profiles, std::int64_t num_rows, std::int64_t num_cols,
                                         int num_threads);

// Convert a row-major L x L matrix of D(i, j) (upper triangle used, lower ignored) to the by-end layout.
std::vector<double> costs_by_end_from_matrix(const double* costs, std::int64_t num_rows);

struct DPResult {
    std::int64_t num_rows = 0;
    std::int64_t k_max = 0;
    std::vector<double> objective_by_k;  // [k_max]: e(k, L-1)
    std::vector<std::int64_t> parent;    // [k_max * L]: start of the last segment of rows 0..j, -1 if infeasible
};

// e(1, j) = D(0, j); e(k, j) = min_i e(k-1, i-1) + D(i, j) with every segment >= min_size rows.
// Ties go to the smallest i. O(k_max * L^2) time, threads over j.
DPResult fisher_dp(const std::vector<double>& cost_by_end, std::int64_t num_rows, std::int64_t k_max,
                   std::int64_t min_size, int num_threads);

// Inclusive (first, last) ranges of the optimal k-segmentation, in order.
std::vector<std::pair<std::int64_t, std::int64_t>> backtrack(const DPResult& dp, std::int64_t k);

// Threads actually used for a problem of this size (0 = hardware concurrency).
int resolve_threads(int requested, std::int64_t num_rows);

}  // namespace sglp
