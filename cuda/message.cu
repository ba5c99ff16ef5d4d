// The ConvCRF message on the coarse grid (steps 3-4 of README's "The algorithm", before
// upsampling):
//   M[c,x,y] = sum_{a,b} K[a,b,x,y] * Pad0(P)[c, x+a-s, y+b-s],
//   K = pos_compat * exp(-0.5 |(fp(nb) - fp(x)) / pos_sdims|^2)
//     + col_compat * exp(-0.5 |(fc(nb) - fc(x)) / col_schan|^2),
// with the unscaled pooled positions fp and colours fc of features.cu (the differences, not the
// features, are scaled: inv_pos_sdims = 1 / pos_sdims, inv_col_schan = 1 / col_schan).
//
// Each block stages the features and CONVCRF_CLASS_BLOCK classes of P for its tile of cells plus
// a halo of s = k/2 cells in shared memory (zero outside the grid, so neighbours outside
// contribute nothing, as Pad0 requires); blockIdx.z = image * num_chunks + class chunk. The
// threads compute the Gaussian weights on the fly, once per chunk, and apply each weight to all
// classes of the chunk held in registers. The k^2*h*w kernel is never stored: at blur 1 it
// would be more bytes per iteration than P itself. Three kernels share this scheme and add
// the same products (split: in another order):
//
//   convcrf_message        one thread per cell;
//   convcrf_message_split  the window rows of a cell split over threadIdx.z (small grids, where
//                          one thread per cell leaves the device short of threads);
//   convcrf_message_tiled  each thread 4 cells of a row (large grids: fewer shared loads).
//
// All take (feat [N,2+F,h,w], pooled [N,C,h,w], message [N,C,h,w] float32, num_classes,
// num_features, coarse_h, coarse_w, filter_size, num_chunks, pos_compat, col_compat,
// inv_pos_sdims, inv_col_schan).

#ifndef CONVCRF_MESSAGE_CU
#define CONVCRF_MESSAGE_CU

#ifndef CONVCRF_CLASS_BLOCK
#define CONVCRF_CLASS_BLOCK 8
#endif

#ifndef CONVCRF_LOAD_GROUP
#define CONVCRF_LOAD_GROUP 1  // values a thread loads before it stores any (as in fullres.cu)
#endif

// Stage channels 0..num_feat-1 of the features and `class_channels` classes c0.. of P (zero
// past num_classes or outside the grid) for the tile_h x tile_w cells from (origin_y,
// origin_x) into `tile`, channel-major, area = tile_h * tile_w floats per channel. quarter 0:
// row-major; else each row de-interleaved, tile column t at (t % 4) * quarter + t / 4
// (tile_w = 4 * quarter).
// Each thread loads CONVCRF_LOAD_GROUP values (num_threads apart, so a warp's loads stay
// coalesced) before it stores any: a store between two loads would make each wait for the one
// before, one memory latency per value.
__device__ inline void stage_message_tile(float* tile, const float* feat_n, const float* pooled_n,
                                          int num_feat, int c0, int class_channels,
                                          int num_classes, int coarse_h, int coarse_w,
                                          int origin_y, int origin_x, int tile_h, int tile_w,
                                          int quarter, int tid, int num_threads) {
    const long long plane = (long long)coarse_h * coarse_w;
    const int area = tile_h * tile_w;
    const int staged = (num_feat + class_channels) * area;
    for (int first = tid; first < staged; first += CONVCRF_LOAD_GROUP * num_threads) {
        float value[CONVCRF_LOAD_GROUP];
        int target[CONVCRF_LOAD_GROUP];
#pragma unroll
        for (int g = 0; g < CONVCRF_LOAD_GROUP; ++g) {
            const int i = first + g * num_threads;
            value[g] = 0.0f;
            target[g] = -1;
            if (i >= staged) continue;
            const int channel = i / area;
            const int rest = i - channel * area;
            const int ty = rest / tile_w;
            const int col = rest - ty * tile_w;
            const int gy = origin_y + ty;
            const int gx = origin_x + col;
            if (gy >= 0 && gy < coarse_h && gx >= 0 && gx < coarse_w) {
                const long long cell = (long long)gy * coarse_w + gx;
                if (channel < num_feat) {
                    value[g] = feat_n[channel * plane + cell];
                } else if (c0 + channel - num_feat < num_classes) {
                    value[g] = pooled_n[(c0 + channel - num_feat) * plane + cell];
                }
            }
            const int column = quarter ? (col & 3) * quarter + (col >> 2) : col;
            target[g] = channel * area + ty * tile_w + column;
        }
#pragma unroll
        for (int g = 0; g < CONVCRF_LOAD_GROUP; ++g) {
            if (target[g] >= 0) tile[target[g]] = value[g];
        }
    }
}

// acc[cc] += sum over window rows a = a0, a0 + a_step, ... < k and columns b of the weight of
// neighbour (a, b) of the cell at (tx, ty) of a row-major tile (tile_w wide, area floats per
// channel: the features from `tile`, CONVCRF_CLASS_BLOCK classes from `tile_q`) times its class
// values.
__device__ inline void add_window_rows(const float* tile, const float* tile_q, int area,
                                       int tile_w, int num_feat, int tx, int ty, int filter_size,
                                       int a0, int a_step, float pos_compat, float col_compat,
                                       float inv_pos_sdims, float inv_col_schan,
                                       float (&acc)[CONVCRF_CLASS_BLOCK]) {
    const int s = filter_size / 2;
    const int centre = (ty + s) * tile_w + tx + s;
    for (int a = a0; a < filter_size; a += a_step) {
        const int row = (ty + a) * tile_w + tx;
        for (int b = 0; b < filter_size; ++b) {
            const int nb = row + b;
            float dist_pos = 0.0f;
            for (int f = 0; f < 2; ++f) {
                const float d = (tile[f * area + nb] - tile[f * area + centre]) * inv_pos_sdims;
                dist_pos += d * d;
            }
            float dist_col = 0.0f;
            for (int f = 2; f < num_feat; ++f) {
                const float d = (tile[f * area + nb] - tile[f * area + centre]) * inv_col_schan;
                dist_col += d * d;
            }
            const float weight =
                pos_compat * expf(-0.5f * dist_pos) + col_compat * expf(-0.5f * dist_col);
#pragma unroll
            for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) {
                acc[cc] += weight * tile_q[cc * area + nb];
            }
        }
    }
}

// The class chunk of a block of convcrf_message or convcrf_message_split and its row-major
// tile of blockDim.x x blockDim.y cells with the halo, staged in shared memory by
// stage_cell_tile (threads tid of num_threads take part; the caller then synchronises).
struct CellTile {
    int tile_w, area, num_feat, n, c0;
    long long plane;
};

__device__ inline CellTile stage_cell_tile(float* tile, const float* feat, const float* pooled,
                                           int num_classes, int num_features, int coarse_h,
                                           int coarse_w, int filter_size, int num_chunks,
                                           int tid, int num_threads) {
    const int s = filter_size / 2;
    CellTile t;
    t.tile_w = blockDim.x + 2 * s;
    t.area = t.tile_w * (blockDim.y + 2 * s);
    t.num_feat = 2 + num_features;
    t.n = blockIdx.z / num_chunks;
    t.c0 = (blockIdx.z % num_chunks) * CONVCRF_CLASS_BLOCK;
    t.plane = (long long)coarse_h * coarse_w;
    stage_message_tile(tile, feat + (long long)t.n * t.num_feat * t.plane,
                       pooled + (long long)t.n * num_classes * t.plane, t.num_feat, t.c0,
                       CONVCRF_CLASS_BLOCK, num_classes, coarse_h, coarse_w,
                       blockIdx.y * blockDim.y - s, blockIdx.x * blockDim.x - s,
                       blockDim.y + 2 * s, t.tile_w, 0, tid, num_threads);
    return t;
}

// One thread per coarse cell, blocks of blockDim.x x blockDim.y cells.
// Dynamic shared memory: (2 + F + CONVCRF_CLASS_BLOCK) * (blockDim.y+2s) * (blockDim.x+2s) floats.
extern "C" __global__ void convcrf_message(const float* __restrict__ feat,
                                           const float* __restrict__ pooled,
                                           float* __restrict__ message, int num_classes,
                                           int num_features, int coarse_h, int coarse_w,
                                           int filter_size, int num_chunks, float pos_compat,
                                           float col_compat, float inv_pos_sdims,
                                           float inv_col_schan) {
    extern __shared__ float convcrf_smem[];
    const CellTile block =
        stage_cell_tile(convcrf_smem, feat, pooled, num_classes, num_features, coarse_h, coarse_w,
                        filter_size, num_chunks, threadIdx.y * blockDim.x + threadIdx.x,
                        blockDim.x * blockDim.y);
    __syncthreads();

    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= coarse_w || y >= coarse_h) return;
    float acc[CONVCRF_CLASS_BLOCK];
#pragma unroll
    for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) acc[cc] = 0.0f;
    const float* tile_q = convcrf_smem + block.num_feat * block.area;
    add_window_rows(convcrf_smem, tile_q, block.area, block.tile_w, block.num_feat, threadIdx.x,
                    threadIdx.y, filter_size, 0, 1, pos_compat, col_compat, inv_pos_sdims,
                    inv_col_schan, acc);

    float* out = message + (long long)block.n * num_classes * block.plane;
    out += (long long)y * coarse_w + x;
#pragma unroll
    for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) {
        if (block.c0 + cc < num_classes) out[(block.c0 + cc) * block.plane] = acc[cc];
    }
}

// Window rows split over threadIdx.z: thread (x, y, z) sums the rows a = z, z + blockDim.z, ...
// of the window of cell (x, y) of the block's blockDim.x x blockDim.y cells; the block then adds
// each cell's blockDim.z partial sums, in order of z, in shared memory.
// Dynamic shared memory: (2 + F + CONVCRF_CLASS_BLOCK) * (blockDim.y+2s) * (blockDim.x+2s)
// + blockDim.z * CONVCRF_CLASS_BLOCK * blockDim.x * blockDim.y floats.
// Blocks of up to 1024 threads (k >= 16 at 8x8 cells): the bound caps the registers at 64 so
// that such a block still launches.
extern "C" __global__ void __launch_bounds__(1024)
    convcrf_message_split(const float* __restrict__ feat, const float* __restrict__ pooled,
                          float* __restrict__ message, int num_classes, int num_features,
                          int coarse_h, int coarse_w, int filter_size, int num_chunks,
                          float pos_compat, float col_compat, float inv_pos_sdims,
                          float inv_col_schan) {
    extern __shared__ float convcrf_smem[];
    const int cells = blockDim.x * blockDim.y;
    const int cell = threadIdx.y * blockDim.x + threadIdx.x;
    const int tid = threadIdx.z * cells + cell;
    const int num_threads = cells * blockDim.z;
    const CellTile block =
        stage_cell_tile(convcrf_smem, feat, pooled, num_classes, num_features, coarse_h, coarse_w,
                        filter_size, num_chunks, tid, num_threads);
    __syncthreads();

    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    float acc[CONVCRF_CLASS_BLOCK];
#pragma unroll
    for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) acc[cc] = 0.0f;
    if (x < coarse_w && y < coarse_h) {  // no return: every thread reaches the barrier below
        const float* tile_q = convcrf_smem + block.num_feat * block.area;
        add_window_rows(convcrf_smem, tile_q, block.area, block.tile_w, block.num_feat,
                        threadIdx.x, threadIdx.y, filter_size, threadIdx.z, blockDim.z,
                        pos_compat, col_compat, inv_pos_sdims, inv_col_schan, acc);
    }
    // the partial sums [z][cc][cell], after the staged tile
    float* partial = convcrf_smem + (block.num_feat + CONVCRF_CLASS_BLOCK) * block.area;
#pragma unroll
    for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) {
        partial[(threadIdx.z * CONVCRF_CLASS_BLOCK + cc) * cells + cell] = acc[cc];
    }
    __syncthreads();

    float* out_n = message + (long long)block.n * num_classes * block.plane;
    for (int t = tid; t < CONVCRF_CLASS_BLOCK * cells; t += num_threads) {
        const int cc = t / cells;
        const int c = t - cc * cells;
        const int ox = blockIdx.x * blockDim.x + c % blockDim.x;
        const int oy = blockIdx.y * blockDim.y + c / blockDim.x;
        if (ox >= coarse_w || oy >= coarse_h || block.c0 + cc >= num_classes) continue;
        float sum = 0.0f;
        for (int z = 0; z < (int)blockDim.z; ++z) {
            sum += partial[(z * CONVCRF_CLASS_BLOCK + cc) * cells + c];
        }
        out_n[(block.c0 + cc) * block.plane + (long long)oy * coarse_w + ox] = sum;
    }
}

// Register tiling, for grids large enough to fill the device: each thread computes
// CONVCRF_TILE_CELLS consecutive cells of a row, so that the features and class values of a
// neighbour, loaded once from shared memory, serve every cell of the thread whose window holds
// it: per window row a thread reads CONVCRF_TILE_CELLS + 2s neighbours instead of
// CONVCRF_TILE_CELLS * k (about 3x fewer shared-memory loads at k = 7), and the centre features
// sit in registers. Same sums in the same order as convcrf_message.
//
// A block covers (CONVCRF_TILE_CELLS * blockDim.x) x blockDim.y cells; blockDim.x must be 4, 8,
// 16 or 32. A row of the shared tile holds 4 * row_quarter tile columns, de-interleaved (see
// stage_message_tile), so that the threads of a warp, reading the neighbour at offset j of
// their cells (tile column 4 * threadIdx.x + j), read consecutive words. row_quarter (an extra,
// last argument) >= blockDim.x + (3 + 2s) / 4, chosen by the caller so that the rows of one
// warp fall in different banks. Needs 2 + num_features <= CONVCRF_MAX_FEATURES.
//
// Dynamic shared memory: (2 + F + CONVCRF_CLASS_BLOCK) * (blockDim.y + 2s) * 4 * row_quarter
// floats.

#define CONVCRF_TILE_CELLS 4
#ifndef CONVCRF_MAX_FEATURES
#define CONVCRF_MAX_FEATURES 6
#endif

extern "C" __global__ void convcrf_message_tiled(const float* __restrict__ feat,
                                                 const float* __restrict__ pooled,
                                                 float* __restrict__ message, int num_classes,
                                                 int num_features, int coarse_h, int coarse_w,
                                                 int filter_size, int num_chunks,
                                                 float pos_compat, float col_compat,
                                                 float inv_pos_sdims, float inv_col_schan,
                                                 int row_quarter) {
    extern __shared__ float convcrf_smem[];
    const int s = filter_size / 2;
    const int row_words = 4 * row_quarter;
    const int area = row_words * (blockDim.y + 2 * s);
    const int num_feat = 2 + num_features;
    const int n = blockIdx.z / num_chunks;
    const int c0 = (blockIdx.z % num_chunks) * CONVCRF_CLASS_BLOCK;
    const long long plane = (long long)coarse_h * coarse_w;
    stage_message_tile(convcrf_smem, feat + (long long)n * num_feat * plane,
                       pooled + (long long)n * num_classes * plane, num_feat, c0,
                       CONVCRF_CLASS_BLOCK, num_classes,
                       coarse_h, coarse_w, blockIdx.y * blockDim.y - s,
                       blockIdx.x * blockDim.x * CONVCRF_TILE_CELLS - s, blockDim.y + 2 * s,
                       row_words, row_quarter, threadIdx.y * blockDim.x + threadIdx.x,
                       blockDim.x * blockDim.y);
    __syncthreads();

    const int x0 = (blockIdx.x * blockDim.x + threadIdx.x) * CONVCRF_TILE_CELLS;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x0 >= coarse_w || y >= coarse_h) return;
    const float* tile_q = convcrf_smem + num_feat * area;

    float centre[CONVCRF_TILE_CELLS][CONVCRF_MAX_FEATURES];
#pragma unroll
    for (int r = 0; r < CONVCRF_TILE_CELLS; ++r) {
        const int t = s + r;
        const int offset =
            (threadIdx.y + s) * row_words + (t & 3) * row_quarter + threadIdx.x + (t >> 2);
#pragma unroll
        for (int f = 0; f < CONVCRF_MAX_FEATURES; ++f) {
            centre[r][f] = f < num_feat ? convcrf_smem[f * area + offset] : 0.0f;
        }
    }

    float acc[CONVCRF_TILE_CELLS][CONVCRF_CLASS_BLOCK];
#pragma unroll
    for (int r = 0; r < CONVCRF_TILE_CELLS; ++r) {
#pragma unroll
        for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) acc[r][cc] = 0.0f;
    }

    const int span = CONVCRF_TILE_CELLS - 1 + 2 * s;  // neighbours j = 0..span of a window row
    for (int a = 0; a < filter_size; ++a) {
        const int row = (threadIdx.y + a) * row_words + threadIdx.x;
        for (int j = 0; j <= span; ++j) {
            const int nb = row + (j & 3) * row_quarter + (j >> 2);
            float nb_feat[CONVCRF_MAX_FEATURES];
#pragma unroll
            for (int f = 0; f < CONVCRF_MAX_FEATURES; ++f) {
                nb_feat[f] = f < num_feat ? convcrf_smem[f * area + nb] : 0.0f;
            }
            float q[CONVCRF_CLASS_BLOCK];
#pragma unroll
            for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) q[cc] = tile_q[cc * area + nb];
#pragma unroll
            for (int r = 0; r < CONVCRF_TILE_CELLS; ++r) {
                const int b = j - r;  // window column of this neighbour for cell r
                if (b < 0 || b >= filter_size) continue;
                float dist_pos = 0.0f;
#pragma unroll
                for (int f = 0; f < 2; ++f) {
                    const float d = (nb_feat[f] - centre[r][f]) * inv_pos_sdims;
                    dist_pos += d * d;
                }
                float dist_col = 0.0f;
#pragma unroll
                for (int f = 2; f < CONVCRF_MAX_FEATURES; ++f) {
                    if (f < num_feat) {
                        const float d = (nb_feat[f] - centre[r][f]) * inv_col_schan;
                        dist_col += d * d;
                    }
                }
                const float weight =
                    pos_compat * expf(-0.5f * dist_pos) + col_compat * expf(-0.5f * dist_col);
#pragma unroll
                for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) acc[r][cc] += weight * q[cc];
            }
        }
    }

    float* out = message + (long long)n * num_classes * plane + (long long)y * coarse_w;
#pragma unroll
    for (int r = 0; r < CONVCRF_TILE_CELLS; ++r) {
        if (x0 + r >= coarse_w) continue;
#pragma unroll
        for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) {
            if (c0 + cc < num_classes) out[(c0 + cc) * plane + x0 + r] = acc[r][cc];
        }
    }
}

// The window sum with given weights (the differentiable module's kernel tensor) and its
// transpose, for the mean field of the PyTorch module on the GPU and its backward pass:
//   adjoint 0: out[c,y,x] = sum_{a,b} K[a,b,y,x] * Pad0(q)[c, y+a-s, x+b-s]
//   adjoint 1: out[c,y,x] = sum_{a,b} K[a,b,y-a+s,x-b+s] * Pad0(q)[c, y-a+s, x-b+s]
// kernel [N,k,k,h,w], q [N,C,h,w] -> out [N,C,h,w] float32. One thread per coarse cell and
// chunk of CONVCRF_CLASS_BLOCK classes (blockIdx.z = image * num_chunks + chunk); the weights
// and neighbours are read through the cache.
extern "C" __global__ void convcrf_window_sum(const float* __restrict__ kernel,
                                              const float* __restrict__ q,
                                              float* __restrict__ out, int num_classes,
                                              int coarse_h, int coarse_w, int filter_size,
                                              int num_chunks, int adjoint) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= coarse_w || y >= coarse_h) return;
    const int s = filter_size / 2;
    const int n = blockIdx.z / num_chunks;
    const int c0 = (blockIdx.z % num_chunks) * CONVCRF_CLASS_BLOCK;
    const int count = min(CONVCRF_CLASS_BLOCK, num_classes - c0);
    const long long plane = (long long)coarse_h * coarse_w;
    const long long here = (long long)y * coarse_w + x;
    const float* kernel_n = kernel + (long long)n * filter_size * filter_size * plane;
    const float* q_n = q + ((long long)n * num_classes + c0) * plane;
    float* out_n = out + ((long long)n * num_classes + c0) * plane;

    float acc[CONVCRF_CLASS_BLOCK];
#pragma unroll
    for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) acc[cc] = 0.0f;
    for (int a = 0; a < filter_size; ++a) {
        const int sy = adjoint ? y - a + s : y + a - s;
        if (sy < 0 || sy >= coarse_h) continue;
        for (int b = 0; b < filter_size; ++b) {
            const int sx = adjoint ? x - b + s : x + b - s;
            if (sx < 0 || sx >= coarse_w) continue;
            const long long cell = (long long)sy * coarse_w + sx;
            const float weight = kernel_n[(a * filter_size + b) * plane + (adjoint ? cell : here)];
#pragma unroll
            for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) {
                if (cc < count) acc[cc] += weight * q_n[cc * plane + cell];
            }
        }
    }
#pragma unroll
    for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) {
        if (cc < count) out_n[cc * plane + here] = acc[cc];
    }
}

// The window sum's gradient in its weights, accumulated:
//   out[a,b,y,x] += sum_c grad[c,y,x] * Pad0(q)[c, y+a-s, x+b-s]
// grad, q [N,C,h,w] -> out [N,k,k,h,w] float32. One thread per coarse cell and window row a
// (blockIdx.z = image * filter_size + a).
extern "C" __global__ void convcrf_window_products(const float* __restrict__ grad,
                                                   const float* __restrict__ q,
                                                   float* __restrict__ out, int num_classes,
                                                   int coarse_h, int coarse_w,
                                                   int filter_size) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= coarse_w || y >= coarse_h) return;
    const int s = filter_size / 2;
    const int n = blockIdx.z / filter_size;
    const int a = blockIdx.z % filter_size;
    const int sy = y + a - s;
    const long long plane = (long long)coarse_h * coarse_w;
    const long long here = (long long)y * coarse_w + x;
    const float* grad_n = grad + (long long)n * num_classes * plane + here;
    const float* q_n = q + (long long)n * num_classes * plane;
    float* out_row = out + ((long long)n * filter_size + a) * filter_size * plane + here;
    if (sy < 0 || sy >= coarse_h) return;  // Pad0: these weights touch only zeros
    for (int b = 0; b < filter_size; ++b) {
        const int sx = x + b - s;
        if (sx < 0 || sx >= coarse_w) continue;
        const long long cell = (long long)sy * coarse_w + sx;
        float sum = 0.0f;
        for (int c = 0; c < num_classes; ++c) sum += grad_n[c * plane] * q_n[c * plane + cell];
        out_row[b * plane] += sum;
    }
}

#endif  // CONVCRF_MESSAGE_CU
