// The ConvCRF kernels of cuda/*.cu built for the CPU through cuda_shim.h, as a shared library
// with a cuLaunchKernel-like entry point for ctypes (see launcher.py).
#include <cstring>

#include "cuda_shim.h"
#include "features.cu"
#include "fullres.cu"
#include "message.cu"
#include "fused.cu"

extern "C" {

int shim_class_block() { return CONVCRF_CLASS_BLOCK; }

std::size_t shim_shared_capacity() { return sizeof(convcrf_smem); }

void shim_set_reverse_blocks(int reverse) { shim_reverse_blocks = reverse != 0; }

// Returns 0, -1 for an unknown kernel name, -2 when shared_bytes exceeds the capacity, -3 when
// the threads of a block reached different numbers of __syncthreads().
int shim_launch(const char* name, const unsigned* grid, const unsigned* block,
                std::size_t shared_bytes, void** args) {
    const dim3 g{grid[0], grid[1], grid[2]};
    const dim3 b{block[0], block[1], block[2]};
    if (!std::strcmp(name, "convcrf_pool_features"))
        return shim_launch_kernel(convcrf_pool_features, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_init"))
        return shim_launch_kernel(convcrf_init, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_message"))
        return shim_launch_kernel(convcrf_message, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_message_split"))
        return shim_launch_kernel(convcrf_message_split, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_message_tiled"))
        return shim_launch_kernel(convcrf_message_tiled, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_step"))
        return shim_launch_kernel(convcrf_step, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_final"))
        return shim_launch_kernel(convcrf_final, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_step_fused"))
        return shim_launch_kernel(convcrf_step_fused, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_window_sum"))
        return shim_launch_kernel(convcrf_window_sum, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_window_products"))
        return shim_launch_kernel(convcrf_window_products, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_upsample_adjoint"))
        return shim_launch_kernel(convcrf_upsample_adjoint, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_softmax_adjoint"))
        return shim_launch_kernel(convcrf_softmax_adjoint, g, b, shared_bytes, args);
    if (!std::strcmp(name, "convcrf_unary_adjoint"))
        return shim_launch_kernel(convcrf_unary_adjoint, g, b, shared_bytes, args);
    return -1;
}
}
