// Runs unmodified CUDA kernels on the CPU: each block as one std::thread per CUDA thread,
// __syncthreads() as a std::barrier. Blocks run one after another, so `extern __shared__`
// arrays resolve to one process-wide buffer (CUDA gives no ordering between blocks either).
#pragma once
#include <math.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __shared__
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;
inline std::barrier<>* shim_block_barrier = nullptr;

inline void __syncthreads() { shim_block_barrier->arrive_and_wait(); }
using std::max;
using std::min;

// The dynamic shared memory of the running block (kernels declare `extern float convcrf_smem[]`).
constexpr std::size_t kShimSharedFloats = 1 << 18;
float convcrf_smem[kShimSharedFloats];

// Launch `kernel` over `grid` x `block` with arguments given as cuLaunchKernel does: args[i]
// points at the value of parameter i. Shared memory is poisoned with NaN before each block.
template <typename... Args, std::size_t... I>
void shim_call(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<Args*>(args[I])...);
}

template <typename... Args>
int shim_launch_kernel(void (*kernel)(Args...), dim3 grid, dim3 block, std::size_t shared_bytes,
                       void** args) {
    if (shared_bytes > sizeof(convcrf_smem)) return -2;
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::fill(convcrf_smem, convcrf_smem + shared_bytes / sizeof(float), NAN);
                blockIdx = dim3{x, y, z};
                std::barrier<> barrier(threads);
                shim_block_barrier = &barrier;
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t) {
                    pool.emplace_back([=] {
                        threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        shim_call(kernel, args, std::index_sequence_for<Args...>{});
                        // A thread that has finished no longer takes part in barriers.
                        shim_block_barrier->arrive_and_drop();
                    });
                }
                for (auto& thread : pool) thread.join();
            }
    return 0;
}
