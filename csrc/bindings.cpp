// sglp_fast._fisher: numpy in/out around the pure C++ core in fisher.hpp.
// Converts and shape-checks the arrays, then releases the GIL for all the numeric work.
// std::invalid_argument from the core reaches Python as ValueError (pybind11's standard translation).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "fisher.hpp"

namespace py = pybind11;
using Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

namespace {

std::string shape_of(const Array& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

void check_matrix(const Array& a, const char* name, bool square) {
    if (a.ndim() != 2)
        throw std::invalid_argument(std::string(name) + ": expected a 2-D array, got shape " + shape_of(a));
    if (a.shape(0) < 1 || a.shape(1) < 1)
        throw std::invalid_argument(std::string(name) + ": expected a non-empty array, got shape " + shape_of(a));
    if (square && a.shape(0) != a.shape(1))
        throw std::invalid_argument(std::string(name) + ": expected a square L x L matrix, got shape " +
                                    shape_of(a));
}

py::tuple dp_to_python(sglp::DPResult&& dp) {
    py::array_t<double> objective(dp.k_max);
    std::copy(dp.objective_by_k.begin(), dp.objective_by_k.end(), objective.mutable_data());
    py::array_t<std::int64_t> parent({dp.k_max, dp.num_rows});
    std::copy(dp.parent.begin(), dp.parent.end(), parent.mutable_data());
    return py::make_tuple(objective, parent);
}

}  // namespace

PYBIND11_MODULE(_fisher, m) {
    m.doc() = "Fisher optimal segmentation core (C++17). Spec: sglp_fast/_segment_ref.py; API: sglp_fast.segment.";

    m.def(
        "segment_costs",
        [](const Array& profiles, int threads) {
            check_matrix(profiles, "profiles", false);
            const std::int64_t L = profiles.shape(0), p = profiles.shape(1);
            std::vector<double> by_end;
            {
                py::gil_scoped_release release;
                by_end = sglp::segment_costs_by_end(profiles.data(), L, p, threads);
            }
            py::array_t<double> out({L, L});
            double* dst = out.mutable_data();
            for (std::int64_t i = 0; i < L; ++i)
                for (std::int64_t j = 0; j < L; ++j) dst[i * L + j] = j >= i ? by_end[j * L + i] : 0.0;
            return out;
        },
        py::arg("profiles"), py::arg("threads") = 0,
        "L x L matrix of D(i, j) (upper triangle; zeros below) for L x p profiles.");

    m.def(
        "fisher_dp_profiles",
        [](const Array& profiles, std::int64_t k_max, std::int64_t min_size, int threads) {
            check_matrix(profiles, "profiles", false);
            const std::int64_t L = profiles.shape(0), p = profiles.shape(1);
            sglp::DPResult dp;
            {
                py::gil_scoped_release release;
                const auto by_end = sglp::segment_costs_by_end(profiles.data(), L, p, threads);
                dp = sglp::fisher_dp(by_end, L, k_max, min_size, threads);
            }
            return dp_to_python(std::move(dp));
        },
        py::arg("profiles"), py::arg("k_max"), py::arg("min_size") = 1, py::arg("threads") = 0,
        "(objective_by_k[k_max], parent[k_max, L]) for L x p profiles.");

    m.def(
        "fisher_dp_costs",
        [](const Array& costs, std::int64_t k_max, std::int64_t min_size, int threads) {
            check_matrix(costs, "costs", true);
            const std::int64_t L = costs.shape(0);
            sglp::DPResult dp;
            {
                py::gil_scoped_release release;
                const auto by_end = sglp::costs_by_end_from_matrix(costs.data(), L);
                dp = sglp::fisher_dp(by_end, L, k_max, min_size, threads);
            }
            return dp_to_python(std::move(dp));
        },
        py::arg("costs"), py::arg("k_max"), py::arg("min_size") = 1, py::arg("threads") = 0,
        "(objective_by_k[k_max], parent[k_max, L]) for an L x L cost matrix (upper triangle used).");

    m.def(
        "backtrack",
        [](py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> parent, std::int64_t k) {
            if (parent.ndim() != 2 || parent.shape(0) < 1 || parent.shape(1) < 1)
                throw std::invalid_argument("parent: expected a non-empty 2-D array [k_max, L]");
            sglp::DPResult dp;
            dp.k_max = parent.shape(0);
            dp.num_rows = parent.shape(1);
            dp.parent.assign(parent.data(), parent.data() + dp.k_max * dp.num_rows);
            return sglp::backtrack(dp, k);
        },
        py::arg("parent"), py::arg("k"), "Inclusive (first, last) segments of the optimal k-segmentation.");

    m.def("resolve_threads", &sglp::resolve_threads, py::arg("requested"), py::arg("num_rows"),
          "Threads the core uses for L rows (0 = all cores; small L runs single-threaded).");
}
