// Runs unmodified CUDA kernels on the CPU: each block as one std::thread per CUDA thread,
// __syncthreads() as a std::barrier. Blocks run one after another, so `extern __shared__`
// arrays resolve to one process-wide buffer (CUDA gives no ordering between blocks either).
// A launch fails (status -3) where the threads of a block reach different numbers of barriers.
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

inline thread_local unsigned shim_barriers_reached = 0;

inline void __syncthreads() {
    ++shim_barriers_reached;
    shim_block_barrier->arrive_and_wait();
}

// Blocks run in reverse order when set (shim_set_reverse_blocks): a kernel whose blocks read
// what other blocks of the same launch write gives other numbers then.
inline bool shim_reverse_blocks = false;
using std::max;
using std::min;

// The dynamic shared memory of the running block (kernels declare `extern float convcrf_smem[]`).
constexpr std::size_t kShimSharedFloats = 1 << 18;
float convcrf_smem[kShimSharedFloats];

// Built with AddressSanitizer, the shared memory past what a launch asked for is poisoned, so
// an access beyond the block's dynamic shared memory is reported like one beyond an array.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define SHIM_POISON(address, bytes) ASAN_POISON_MEMORY_REGION(address, bytes)
#define SHIM_UNPOISON(address, bytes) ASAN_UNPOISON_MEMORY_REGION(address, bytes)
#else
#define SHIM_POISON(address, bytes)
#define SHIM_UNPOISON(address, bytes)
#endif

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
    const std::size_t blocks = std::size_t(grid.x) * grid.y * grid.z;
    int status = 0;
    SHIM_POISON(reinterpret_cast<char*>(convcrf_smem) + shared_bytes,
                sizeof(convcrf_smem) - shared_bytes);
    for (std::size_t b = 0; b < blocks; ++b) {
        const std::size_t index = shim_reverse_blocks ? blocks - 1 - b : b;
        std::fill(convcrf_smem, convcrf_smem + shared_bytes / sizeof(float), NAN);
        blockIdx = dim3{unsigned(index % grid.x), unsigned(index / grid.x % grid.y),
                        unsigned(index / (std::size_t(grid.x) * grid.y))};
        std::barrier<> barrier(threads);
        shim_block_barrier = &barrier;
        std::vector<std::thread> pool;
        std::vector<unsigned> barriers(threads);  // __syncthreads() each thread reached
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([=, reached = barriers.data()] {
                threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                shim_barriers_reached = 0;
                shim_call(kernel, args, std::index_sequence_for<Args...>{});
                reached[t] = shim_barriers_reached;
                // A thread that has finished no longer takes part in barriers.
                shim_block_barrier->arrive_and_drop();
            });
        }
        for (auto& thread : pool) thread.join();
        // A barrier some threads of the block skip is undefined on a GPU (the shim would go on).
        if (std::count(barriers.begin(), barriers.end(), barriers[0]) != long(threads)) status = -3;
    }
    SHIM_UNPOISON(convcrf_smem, sizeof(convcrf_smem));
    return status;
}
