// Fisher optimal segmentation: O(L^2 p) segment costs by prefix sums, O(k_max L^2) DP, backtracking.
// Mirrors sglp_fast/_segment_ref.py operation by operation (see fisher.hpp); keep the two in step.
// Bit-identity with numpy also needs every a*b+c rounded twice: setup.py compiles with -std=c++17 (ISO mode,
// so GCC defaults to -ffp-contract=off) and neither the baseline nor the avx2 clone enables FMA. Do not build
// this file with -march=native plus -std=gnu++17 or -ffast-math.
#include "fisher.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>

namespace sglp {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::int64_t kTile = 4;  // prefix indices per panel: tiles of 4 segment starts x 4 segment ends
constexpr std::int64_t kDPBlockPerThread = 32;  // DP ends per wavefront block and thread (rows stay in L2)
constexpr std::int64_t kMinRowsForThreads = 192;

// Run fn(job) for job in [0, num_jobs) on num_threads threads, handing out jobs from an atomic counter.
// Which thread runs a job never changes its result: each job writes its own outputs in a fixed order.
template <class Fn>
void parallel_jobs(std::int64_t num_jobs, int num_threads, Fn&& fn) {
    if (num_threads <= 1 || num_jobs <= 1) {
        for (std::int64_t job = 0; job < num_jobs; ++job) fn(job);
        return;
    }
    std::atomic<std::int64_t> next{0};
    auto worker = [&]() {
        for (std::int64_t job = next.fetch_add(1); job < num_jobs; job = next.fetch_add(1)) fn(job);
    };
    const int extra = static_cast<int>(std::min<std::int64_t>(num_threads, num_jobs)) - 1;
    std::vector<std::thread> pool;
    pool.reserve(extra);
    for (int t = 0; t < extra; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
}

// acc[e][lane] = sum_c (B[c][e] - A[c][lane])^2 for one panel of 4 starts A and one of 4 ends B (p x 4 each).
// Vectorized across the 16 pairs, sequential over c: the same per-pair operation order as the numpy spec,
// so the AVX2 clone, the baseline clone and numpy agree bit for bit (no FMA: neither clone enables it).
typedef double Vec4 __attribute__((vector_size(32)));
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
void scatter_tile(const double* A, const double* B, std::int64_t p, double (*acc)[kTile]) {
    Vec4 acc0 = {0.0, 0.0, 0.0, 0.0}, acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (std::int64_t c = 0; c < p; ++c) {
        Vec4 a;
        std::memcpy(&a, A + c * kTile, sizeof(a));
        const double* b = B + c * kTile;
        const Vec4 d0 = b[0] - a, d1 = b[1] - a, d2 = b[2] - a, d3 = b[3] - a;
        acc0 += d0 * d0;
        acc1 += d1 * d1;
        acc2 += d2 * d2;
        acc3 += d3 * d3;
    }
    std::memcpy(acc[0], &acc0, sizeof(acc0));
    std::memcpy(acc[1], &acc1, sizeof(acc1));
    std::memcpy(acc[2], &acc2, sizeof(acc2));
    std::memcpy(acc[3], &acc3, sizeof(acc3));
}

// First minimum of prev[i-1] + row[i] over i in [lo, hi] (hi >= lo >= 1): returns its value, sets *arg.
// Four lanes keep their own first minimum (strict <); the lane reduction prefers the smaller index on equal
// values. That is exactly the scalar "strict < in increasing i" scan (and np.argmin): same value, same i.
typedef std::int64_t Idx4 __attribute__((vector_size(32)));
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
double first_min(const double* prev, const double* row, std::int64_t lo, std::int64_t hi, std::int64_t* arg) {
    double best = std::numeric_limits<double>::infinity();
    std::int64_t best_i = -1;
    std::int64_t i = lo;
    if (hi - lo + 1 >= 8) {
        Vec4 lane_best = {best, best, best, best};
        Idx4 lane_i = {-1, -1, -1, -1};
        Idx4 cur = {i, i + 1, i + 2, i + 3};
        const Idx4 step = {4, 4, 4, 4};
        for (; i + 3 <= hi; i += 4) {
            Vec4 a, b;
            std::memcpy(&a, prev + i - 1, sizeof(a));
            std::memcpy(&b, row + i, sizeof(b));
            const Vec4 v = a + b;
            const Idx4 lt = v < lane_best;
            lane_best = lt ? v : lane_best;
            lane_i = lt ? cur : lane_i;
            cur += step;
        }
        for (int lane = 0; lane < 4; ++lane) {
            const double v = lane_best[lane];
            if (lane_i[lane] >= 0 && (v < best || (v == best && lane_i[lane] < best_i))) {
                best = v;
                best_i = lane_i[lane];
            }
        }
    }
    for (; i <= hi; ++i) {  // tail (and short ranges): continues the scan, so strict < keeps order
        const double v = prev[i - 1] + row[i];
        if (v < best) {
            best = v;
            best_i = i;
        }
    }
    *arg = best_i;
    return best;
}

// Reusable barrier for a fixed team: spins briefly (steps are short), then sleeps on a condition variable.
// The mutex hand-off plus the release/acquire generation counter order each step's writes before the next.
class Barrier {
   public:
    explicit Barrier(int count) : count_(count) {}
    void wait() {
        if (count_ <= 1) return;
        const std::int64_t gen = generation_.load(std::memory_order_acquire);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (++waiting_ == count_) {
                waiting_ = 0;
                generation_.fetch_add(1, std::memory_order_acq_rel);
                cv_.notify_all();
                return;
            }
        }
        for (int spin = 0; spin < 20000; ++spin)
            if (generation_.load(std::memory_order_acquire) != gen) return;
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != gen; });
    }

   private:
    const int count_;
    int waiting_ = 0;
    std::atomic<std::int64_t> generation_{0};
    std::mutex mutex_;
    std::condition_variable cv_;
};

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace

int resolve_threads(int requested, std::int64_t num_rows) {
    require(requested >= 0, "threads: expected >= 0 (0 = all cores), got " + std::to_string(requested));
    if (num_rows < kMinRowsForThreads) return 1;  // thread start-up costs more than the work
    if (requested == 0) {
        const unsigned hw = std::thread::hardware_concurrency();
        requested = hw == 0 ? 1 : static_cast<int>(hw);
    }
    return std::max(1, requested);
}

std::vector<double> segment_costs_by_end(const double* x, std::int64_t num_rows, std::int64_t num_cols,
                                         int num_threads) {
    require(num_rows >= 1, "profiles: expected at least 1 row, got " + std::to_string(num_rows));
    require(num_cols >= 1, "profiles: expected at least 1 column, got " + std::to_string(num_cols));
    const std::int64_t L = num_rows, p = num_cols, N = num_rows + 1;
    for (std::int64_t q = 0; q < L * p; ++q) {
        if (!std::isfinite(x[q]))  // message built only on failure: this loop is hot
            throw std::invalid_argument("profiles: expected finite values, found " + std::to_string(x[q]) +
                                        " at row " + std::to_string(q / p) + ", column " +
                                        std::to_string(q % p));
    }
    const int threads = resolve_threads(num_threads, L);

    // 1. mean of all rows (sequential over rows); 2. prefix sums S of the centred rows, stored in panels
    // of 4 consecutive prefix indices: panels[(g * p + c) * 4 + r] = S[4g + r][c] (zero padding at the end).
    std::vector<double> mean(x, x + p);
    for (std::int64_t t = 1; t < L; ++t)
        for (std::int64_t c = 0; c < p; ++c) mean[c] += x[t * p + c];
    for (std::int64_t c = 0; c < p; ++c) mean[c] /= static_cast<double>(L);
    const std::int64_t num_groups = (N + kTile - 1) / kTile;
    std::vector<double> panels(static_cast<size_t>(num_groups * p * kTile), 0.0);
    auto S = [&](std::int64_t t, std::int64_t c) -> double& {
        return panels[static_cast<size_t>(((t / kTile) * p + c) * kTile + t % kTile)];
    };
    std::vector<double> row_sq(static_cast<size_t>(L), 0.0);
    for (std::int64_t t = 0; t < L; ++t) {
        double sq = 0.0;
        for (std::int64_t c = 0; c < p; ++c) {
            const double v = x[t * p + c] - mean[c];
            S(t + 1, c) = (t == 0) ? v : S(t, c) + v;
            sq += v * v;
        }
        row_sq[t] = sq;
    }
    std::vector<double> sq_prefix(static_cast<size_t>(N), 0.0);
    for (std::int64_t t = 0; t < L; ++t) sq_prefix[t + 1] = (t == 0) ? row_sq[0] : sq_prefix[t] + row_sq[t];

    // 3./4. one job per group of 4 prefix ends b = j + 1; tiles against every group of 4 starts i < j.
    std::vector<double> out(static_cast<size_t>(L * L), 0.0);
    parallel_jobs(num_groups, threads, [&](std::int64_t job) {
        const std::int64_t gb = num_groups - 1 - job;  // biggest (latest ends) first
        double acc[kTile][kTile];
        for (std::int64_t gi = 0; gi <= gb; ++gi) {
            scatter_tile(&panels[static_cast<size_t>(gi * p * kTile)], &panels[static_cast<size_t>(gb * p * kTile)],
                         p, acc);
            for (std::int64_t e = 0; e < kTile; ++e) {
                const std::int64_t j = gb * kTile + e - 1;
                if (j < 1 || j >= L) continue;
                double* dst = &out[static_cast<size_t>(j * L)];
                for (std::int64_t lane = 0; lane < kTile; ++lane) {
                    const std::int64_t i = gi * kTile + lane;
                    if (i >= j) break;
                    const double count = static_cast<double>(j - i + 1);
                    const double v = (sq_prefix[j + 1] - sq_prefix[i]) - acc[e][lane] / count;
                    dst[i] = v > 0.0 ? v : 0.0;
                }
            }
        }
    });
    return out;
}

std::vector<double> costs_by_end_from_matrix(const double* costs, std::int64_t num_rows) {
    require(num_rows >= 1, "costs: expected an L x L matrix with L >= 1, got L = " + std::to_string(num_rows));
    const std::int64_t L = num_rows;
    std::vector<double> out(static_cast<size_t>(L * L), 0.0);
    for (std::int64_t i = 0; i < L; ++i) {
        for (std::int64_t j = i; j < L; ++j) {
            const double v = costs[i * L + j];
            if (!std::isfinite(v))
                throw std::invalid_argument("costs: expected finite values on and above the diagonal, found " +
                                            std::to_string(v) + " at (" + std::to_string(i) + ", " +
                                            std::to_string(j) + ")");
            out[static_cast<size_t>(j * L + i)] = v;
        }
    }
    return out;
}

DPResult fisher_dp(const std::vector<double>& cost_by_end, std::int64_t num_rows, std::int64_t k_max,
                   std::int64_t min_size, int num_threads) {
    const std::int64_t L = num_rows, m = min_size;
    require(L >= 1, "costs: expected L >= 1 rows, got " + std::to_string(L));
    require(static_cast<std::int64_t>(cost_by_end.size()) == L * L, "costs: expected L*L entries");
    require(m >= 1, "min_size: expected an integer >= 1, got " + std::to_string(m));
    require(k_max >= 1, "k_max: expected an integer >= 1, got " + std::to_string(k_max));
    require(k_max <= L / m, "k_max: k_max * min_size must be <= L = " + std::to_string(L) + ", got k_max = " +
                                std::to_string(k_max) + ", min_size = " + std::to_string(m));
    const int threads = resolve_threads(num_threads, L);

    DPResult res;
    res.num_rows = L;
    res.k_max = k_max;
    std::vector<double> best(static_cast<size_t>(k_max * L), kInf);
    res.parent.assign(static_cast<size_t>(k_max * L), -1);

    // Blocked wavefront: e(k, j) needs e(k-1, t) for t < j only, so a block of ends [jb, je) can run all
    // k = 1..k_max while its cost rows stay in cache (instead of streaming the whole L x L triangle from
    // memory once per k). Threads split each block's ends; a barrier separates the (block, k) steps.
    const std::int64_t block = kDPBlockPerThread * threads;
    Barrier barrier(threads);
    auto body = [&](int tid) {
        for (std::int64_t jb = 0; jb < L; jb += block) {
            const std::int64_t je = std::min(L, jb + block);
            for (std::int64_t k = 1; k <= k_max; ++k) {
                const std::int64_t lo = (k - 1) * m;
                double* cur = &best[static_cast<size_t>((k - 1) * L)];
                std::int64_t* par = &res.parent[static_cast<size_t>((k - 1) * L)];
                for (std::int64_t j = std::max(jb, k * m - 1) + tid; j < je; j += threads) {
                    const double* row = &cost_by_end[static_cast<size_t>(j * L)];
                    if (k == 1) {
                        cur[j] = row[0];
                        par[j] = 0;
                    } else {
                        std::int64_t arg = -1;  // smallest i among equal minima
                        cur[j] = first_min(&best[static_cast<size_t>((k - 2) * L)], row, lo, j - m + 1, &arg);
                        par[j] = arg;
                    }
                }
                barrier.wait();
            }
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads - 1));
    for (int t = 1; t < threads; ++t) pool.emplace_back(body, t);
    body(0);
    for (auto& th : pool) th.join();
    res.objective_by_k.resize(static_cast<size_t>(k_max));
    for (std::int64_t k = 1; k <= k_max; ++k) {
        const double v = best[static_cast<size_t>((k - 1) * L + (L - 1))];
        require(std::isfinite(v), "costs: the optimal objective overflowed to inf at k = " + std::to_string(k) +
                                      "; rescale the inputs");
        res.objective_by_k[static_cast<size_t>(k - 1)] = v;
    }
    return res;
}

std::vector<std::pair<std::int64_t, std::int64_t>> backtrack(const DPResult& dp, std::int64_t k) {
    require(k >= 1 && k <= dp.k_max,
            "k: expected 1 <= k <= k_max = " + std::to_string(dp.k_max) + ", got " + std::to_string(k));
    std::vector<std::pair<std::int64_t, std::int64_t>> segments(static_cast<size_t>(k));
    std::int64_t end = dp.num_rows - 1;
    for (std::int64_t kk = k; kk >= 1; --kk) {
        const std::int64_t begin = dp.parent[static_cast<size_t>((kk - 1) * dp.num_rows + end)];
        if (begin < 0 || begin > end) throw std::logic_error("fisher backtrack: infeasible parent entry");
        segments[static_cast<size_t>(kk - 1)] = {begin, end};
        end = begin - 1;
    }
    if (end != -1) throw std::logic_error("fisher backtrack: did not reach row 0");
    return segments;
}

}  // namespace sglp
