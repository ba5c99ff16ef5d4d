// Full-resolution passes of ConvCRF mean field (steps 4-5 of README's "The algorithm"), fused
// so that the full-resolution Q is never stored between iterations:
//
//   convcrf_init:  L = log_softmax(logits); writes lse = logsumexp(logits) per pixel and
//                  P = pool(Q0) with Q0 = L (init "log") or softmax(L) (init "softmax").
//   convcrf_step:  z = unary_scale * L + msg_scale * crop(up(M)); P = pool(softmax(z)).
//   convcrf_final: Q = unary_scale * L + msg_scale * crop(up(M)), written at full resolution.
//
// Layout: class-major [N,C,H,W] at full resolution, [N,C,h,w] on the coarse grid, x fastest,
// so consecutive threads touch consecutive addresses of one class plane.
//
// init/step: a 1-D block owns tile_rows x tile_cols coarse cells, i.e. a box of
// (tile_rows*blur) x (tile_cols*blur) pixels starting at pixel (-pad_y, -pad_x) of its tile, so
// every cell it pools lies in the block: pooling needs no atomics. Phase A computes each
// pixel's softmax statistics (one pass over classes, online max and sum) into shared memory,
// and, when chunk_classes covers every class, each pixel's scores z too; phase B, per chunk of
// chunk_classes classes, writes each pixel's Q for the chunk into shared memory (from the kept
// z, or computing z again) and then averages each cell over its valid pixels. At blur 1 the
// box is a tile of pixels and Q is written to P directly; when chunk_classes covers every
// class, each pixel's z waits in shared memory between the statistics and Q instead of being
// computed again (its logits and message read twice). blockIdx.z = image of the batch.
// Dynamic shared memory: (2 + chunk_classes) * tile_rows*blur * tile_cols*blur floats at
// blur > 1; num_classes * tile_rows * tile_cols floats at blur 1 when z is kept, else none.
//
// The bilinear upsampling (half-pixel centres, source clamped to [0, n-1]) of the coarse message
// M and the crop by (pad_y, pad_x) are computed on the fly from the pixel coordinates.
//
// A thread loads the logits and message taps of CONVCRF_LOAD_GROUP classes of its pixel (1, 4
// or 8, a compile-time option of the module, which also groups the loads that stage the
// message tiles; the backend times them) before it uses or stores any of them: more loads in
// flight per thread, for more registers.

#ifndef CONVCRF_FULLRES_CU
#define CONVCRF_FULLRES_CU

// Pixel-independent arguments of the per-class score z.
struct ScoreArgs {
    const float* logits;  // [N,C,H,W]
    const float* lse;     // [N,H,W] (step/final)
    const float* message; // [N,C,h,w] (step/final), or a window of it (msg_width > 0)
    int num_classes, height, width, coarse_h, coarse_w, blur, pad_y, pad_x;
    float unary_scale, msg_scale;
    // A window of the message of one image (convcrf_step_fused): coarse cell (r, c) of class k
    // at message[k * msg_plane + (r - msg_row0) * msg_width + (c - msg_col0)]. msg_width 0:
    // the whole grid of every image.
    int msg_row0 = 0, msg_col0 = 0, msg_width = 0;
    long long msg_plane = 0;
};

// The per-class score z_c of one pixel: the logit (init) or the mean-field update (step/final).
struct PixelScore {
    const float* logit;  // logits at (n, class 0, y, x); class stride = plane
    long long plane;
    const float* msg;  // message at (n, class 0); class stride = coarse_plane
    long long coarse_plane;
    int i00, i01, i10, i11;  // coarse cells of the 4 bilinear taps
    float w00, w01, w10, w11;
    float lse, unary_scale, msg_scale;
    bool with_message;
    bool one_tap;  // blur 1: the message is not upsampled, the pixel's own cell is i00

    __device__ float operator()(int c) const {
        const float unary = logit[c * plane];
        if (!with_message) return unary;
        const float* m = msg + c * coarse_plane;
        const float up =
            one_tap ? m[i00] : w00 * m[i00] + w01 * m[i01] + w10 * m[i10] + w11 * m[i11];
        return unary_scale * (unary - lse) + msg_scale * up;
    }
};

// Source cell i0, its neighbour i1 and the weight of i1 for output index `index` of a bilinear
// x`blur` upsampling of an axis of `n` cells (align_corners=False, clamped).
__device__ inline void bilinear_taps(int index, int blur, int n, int& i0, int& i1, float& frac) {
    const float src = fmaxf(((float)index + 0.5f) / (float)blur - 0.5f, 0.0f);
    i0 = min((int)src, n - 1);
    i1 = min(i0 + 1, n - 1);
    frac = src - (float)i0;
}

__device__ inline PixelScore pixel_score(const ScoreArgs& args, int n, int y, int x,
                                         bool with_message) {
    PixelScore score;
    score.plane = (long long)args.height * args.width;
    const long long pixel = (long long)y * args.width + x;
    score.logit = args.logits + (long long)n * args.num_classes * score.plane + pixel;
    score.with_message = with_message;
    score.unary_scale = args.unary_scale;
    score.msg_scale = args.msg_scale;
    if (!with_message) return score;
    score.lse = args.lse[(long long)n * score.plane + pixel];
    const bool window = args.msg_width > 0;
    const int msg_w = window ? args.msg_width : args.coarse_w;
    const int row0 = args.msg_row0, col0 = args.msg_col0;
    score.coarse_plane = window ? args.msg_plane : (long long)args.coarse_h * args.coarse_w;
    score.msg = window ? args.message
                       : args.message + (long long)n * args.num_classes * score.coarse_plane;
    score.one_tap = args.blur == 1;
    if (score.one_tap) {
        score.i00 = (y - row0) * msg_w + x - col0;
        return score;
    }
    int r0, r1, c0, c1;
    float fy, fx;
    bilinear_taps(y + args.pad_y, args.blur, args.coarse_h, r0, r1, fy);
    bilinear_taps(x + args.pad_x, args.blur, args.coarse_w, c0, c1, fx);
    score.i00 = (r0 - row0) * msg_w + c0 - col0;
    score.i01 = (r0 - row0) * msg_w + c1 - col0;
    score.i10 = (r1 - row0) * msg_w + c0 - col0;
    score.i11 = (r1 - row0) * msg_w + c1 - col0;
    score.w00 = (1.0f - fy) * (1.0f - fx);
    score.w01 = (1.0f - fy) * fx;
    score.w10 = fy * (1.0f - fx);
    score.w11 = fy * fx;
    return score;
}

#ifndef CONVCRF_LOAD_GROUP
#define CONVCRF_LOAD_GROUP 1  // classes whose scores a thread loads before it uses or stores any
                              // (staged tile values in message.cu)
#endif

// z of classes first .. first + CONVCRF_LOAD_GROUP - 1 below `stop` into z[] (the others are
// left as they are). Every load of the group is issued before any store: a store between two
// classes' loads (to shared memory, or to an output the compiler cannot tell from the inputs)
// would make each class wait for the one before, one memory latency per class.
__device__ inline void load_scores(const PixelScore& score, int first, int stop,
                                   float (&z)[CONVCRF_LOAD_GROUP]) {
#pragma unroll
    for (int g = 0; g < CONVCRF_LOAD_GROUP; ++g) {
        if (first + g < stop) z[g] = score(first + g);
    }
}

// Softmax statistics of z over classes: max and sum of exp(z - max), in one pass over groups
// of CONVCRF_LOAD_GROUP classes. With `store`, z of class c is also written to
// store[c * stride].
__device__ inline void softmax_stats(const PixelScore& score, int num_classes, float& max_z,
                                     float& sum_exp, float* store = nullptr, int stride = 0) {
    for (int first = 0; first < num_classes; first += CONVCRF_LOAD_GROUP) {
        float z[CONVCRF_LOAD_GROUP];
        load_scores(score, first, num_classes, z);
        float group_max = z[0];
#pragma unroll
        for (int g = 1; g < CONVCRF_LOAD_GROUP; ++g) {
            if (first + g < num_classes) group_max = fmaxf(group_max, z[g]);
        }
        if (first == 0) {
            max_z = group_max;
            sum_exp = 0.0f;
        } else if (group_max > max_z) {
            sum_exp *= expf(max_z - group_max);
            max_z = group_max;
        }
#pragma unroll
        for (int g = 0; g < CONVCRF_LOAD_GROUP; ++g) {
            if (first + g >= num_classes) continue;
            sum_exp += expf(z[g] - max_z);
            if (store != nullptr) store[(first + g) * stride] = z[g];
        }
    }
}

// Every class's z of one pixel to out[c * plane] (the final scores), a group at a time.
__device__ inline void store_scores(const PixelScore& score, int num_classes, float* out,
                                    long long plane) {
    for (int first = 0; first < num_classes; first += CONVCRF_LOAD_GROUP) {
        float z[CONVCRF_LOAD_GROUP];
        load_scores(score, first, num_classes, z);
#pragma unroll
        for (int g = 0; g < CONVCRF_LOAD_GROUP; ++g) {
            if (first + g < num_classes) out[(first + g) * plane] = z[g];
        }
    }
}

// Q of class c from z: log_output ? z - shift : exp(z - shift) * scale.
__device__ inline float q_value(float z, float shift, float scale, bool log_output) {
    return log_output ? z - shift : expf(z - shift) * scale;
}

// Shared body of convcrf_init (with_message false), convcrf_step and convcrf_step_fused (with
// message true); `work` is the shared memory it may use.
__device__ void pool_q(const ScoreArgs& args, float* work, float* __restrict__ lse_out,
                       float* __restrict__ pooled, int tile_rows, int tile_cols,
                       int chunk_classes, bool with_message, bool log_output) {
    const int n = blockIdx.z;
    const int blur = args.blur;
    const int box_w = tile_cols * blur;
    const int box = tile_rows * blur * box_w;
    const int row0 = blockIdx.y * tile_rows * blur - args.pad_y;
    const int col0 = blockIdx.x * tile_cols * blur - args.pad_x;
    const int num_classes = args.num_classes;
    const long long plane = (long long)args.height * args.width;
    const long long coarse_plane = (long long)args.coarse_h * args.coarse_w;
    float* pooled_n = pooled + (long long)n * num_classes * coarse_plane;

    if (blur == 1) {  // P is Q itself: one thread per pixel, z in shared memory if it fits.
        const bool keep_z = chunk_classes >= num_classes;
        for (int p = threadIdx.x; p < box; p += blockDim.x) {
            const int y = row0 + p / box_w;
            const int x = col0 + p % box_w;
            if (y >= args.height || x >= args.width) continue;
            const PixelScore score = pixel_score(args, n, y, x, with_message);
            float* kept = keep_z ? work + p : nullptr;  // z of class c at kept[c * box]
            float max_z, sum_exp;
            softmax_stats(score, num_classes, max_z, sum_exp, kept, box);
            const float lse = max_z + logf(sum_exp);
            if (lse_out != nullptr) lse_out[(long long)n * plane + (long long)y * args.width + x] = lse;
            const float shift = log_output ? lse : max_z;
            const float scale = 1.0f / sum_exp;
            float* q = pooled_n + (long long)y * args.width + x;
            for (int first = 0; first < num_classes; first += CONVCRF_LOAD_GROUP) {
                float z[CONVCRF_LOAD_GROUP];
                if (keep_z) {
#pragma unroll
                    for (int g = 0; g < CONVCRF_LOAD_GROUP; ++g) {
                        if (first + g < num_classes) z[g] = kept[(first + g) * box];
                    }
                } else {
                    load_scores(score, first, num_classes, z);
                }
#pragma unroll
                for (int g = 0; g < CONVCRF_LOAD_GROUP; ++g) {
                    if (first + g < num_classes)
                        q[(first + g) * plane] = q_value(z[g], shift, scale, log_output);
                }
            }
        }
        return;
    }

    float* shift = work;
    float* scale = work + box;
    float* chunk = work + 2 * box;

    // Phase A: per-pixel softmax statistics. When one chunk holds every class, z itself is
    // kept in the chunk buffer, so that phase B reads it instead of computing it again.
    const bool one_chunk = chunk_classes >= num_classes;
    for (int p = threadIdx.x; p < box; p += blockDim.x) {
        const int y = row0 + p / box_w;
        const int x = col0 + p % box_w;
        if (y < 0 || y >= args.height || x < 0 || x >= args.width) continue;
        const PixelScore score = pixel_score(args, n, y, x, with_message);
        float max_z, sum_exp;
        softmax_stats(score, num_classes, max_z, sum_exp, one_chunk ? chunk + p : nullptr, box);
        const float lse = max_z + logf(sum_exp);
        if (lse_out != nullptr) lse_out[(long long)n * plane + (long long)y * args.width + x] = lse;
        shift[p] = log_output ? lse : max_z;
        scale[p] = 1.0f / sum_exp;
    }
    __syncthreads();

    // Phase B: per chunk of classes, Q into shared memory, then the mean of each cell.
    const int cells = tile_rows * tile_cols;
    for (int c0 = 0; c0 < num_classes; c0 += chunk_classes) {
        const int count = min(chunk_classes, num_classes - c0);
        for (int p = threadIdx.x; p < box; p += blockDim.x) {
            const int y = row0 + p / box_w;
            const int x = col0 + p % box_w;
            if (y < 0 || y >= args.height || x < 0 || x >= args.width) continue;
            if (one_chunk) {  // z is in place from phase A
                for (int cc = 0; cc < count; ++cc) {
                    float* value = chunk + cc * box + p;
                    *value = q_value(*value, shift[p], scale[p], log_output);
                }
                continue;
            }
            const PixelScore score = pixel_score(args, n, y, x, with_message);
            for (int first = 0; first < count; first += CONVCRF_LOAD_GROUP) {
                float z[CONVCRF_LOAD_GROUP];
                load_scores(score, c0 + first, c0 + count, z);
#pragma unroll
                for (int g = 0; g < CONVCRF_LOAD_GROUP; ++g) {
                    if (first + g < count)
                        chunk[(first + g) * box + p] = q_value(z[g], shift[p], scale[p], log_output);
                }
            }
        }
        __syncthreads();
        for (int t = threadIdx.x; t < count * cells; t += blockDim.x) {
            const int cc = t / cells;
            const int cell = t - cc * cells;
            const int ci = cell / tile_cols;
            const int cj = cell - ci * tile_cols;
            const int gi = blockIdx.y * tile_rows + ci;
            const int gj = blockIdx.x * tile_cols + cj;
            if (gi >= args.coarse_h || gj >= args.coarse_w) continue;
            const int ly0 = max(row0 + ci * blur, 0) - row0;
            const int ly1 = min(row0 + ci * blur + blur, args.height) - row0;
            const int lx0 = max(col0 + cj * blur, 0) - col0;
            const int lx1 = min(col0 + cj * blur + blur, args.width) - col0;
            float sum = 0.0f;
            for (int ly = ly0; ly < ly1; ++ly) {
                const float* row = chunk + cc * box + ly * box_w;
                for (int lx = lx0; lx < lx1; ++lx) sum += row[lx];
            }
            pooled_n[(c0 + cc) * coarse_plane + (long long)gi * args.coarse_w + gj] =
                sum / (float)((ly1 - ly0) * (lx1 - lx0));
        }
        __syncthreads();
    }
}

// logits [N,C,H,W] -> lse [N,H,W], pooled Q0 [N,C,h,w] (float32). log_init: Q0 = L, else softmax(L).
extern "C" __global__ void convcrf_init(const float* __restrict__ logits, float* __restrict__ lse,
                                        float* __restrict__ pooled, int num_classes, int height,
                                        int width, int coarse_h, int coarse_w, int blur,
                                        int pad_y, int pad_x, int tile_rows, int tile_cols,
                                        int chunk_classes, int log_init) {
    const ScoreArgs args = {logits, nullptr, nullptr, num_classes, height, width, coarse_h,
                            coarse_w, blur, pad_y, pad_x, 1.0f, 0.0f};
    extern __shared__ float convcrf_smem[];
    pool_q(args, convcrf_smem, lse, pooled, tile_rows, tile_cols, chunk_classes, false,
           log_init != 0);
}

// logits, lse, message [N,C,h,w] -> pooled softmax(unary_scale*L + msg_scale*crop(up(M))).
extern "C" __global__ void convcrf_step(const float* __restrict__ logits,
                                        const float* __restrict__ lse,
                                        const float* __restrict__ message,
                                        float* __restrict__ pooled, int num_classes, int height,
                                        int width, int coarse_h, int coarse_w, int blur,
                                        int pad_y, int pad_x, int tile_rows, int tile_cols,
                                        int chunk_classes, float unary_scale, float msg_scale) {
    const ScoreArgs args = {logits, lse, message, num_classes, height, width, coarse_h,
                            coarse_w, blur, pad_y, pad_x, unary_scale, msg_scale};
    extern __shared__ float convcrf_smem[];
    pool_q(args, convcrf_smem, nullptr, pooled, tile_rows, tile_cols, chunk_classes, true, false);
}

// logits, lse, message -> scores [N,C,H,W] = unary_scale*L + msg_scale*crop(up(M)).
// One thread per pixel, 2-D blocks, blockIdx.z = image.
extern "C" __global__ void convcrf_final(const float* __restrict__ logits,
                                         const float* __restrict__ lse,
                                         const float* __restrict__ message,
                                         float* __restrict__ scores, int num_classes, int height,
                                         int width, int coarse_h, int coarse_w, int blur,
                                         int pad_y, int pad_x, float unary_scale,
                                         float msg_scale) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int n = blockIdx.z;
    if (x >= width || y >= height) return;
    const ScoreArgs args = {logits, lse, message, num_classes, height, width, coarse_h,
                            coarse_w, blur, pad_y, pad_x, unary_scale, msg_scale};
    const PixelScore score = pixel_score(args, n, y, x, true);
    const long long plane = (long long)height * width;
    float* out = scores + (long long)n * num_classes * plane + (long long)y * width + x;
    store_scores(score, num_classes, out, plane);
}

// ---- Adjoints of the full-resolution passes (the PyTorch module's backward on the GPU) ----

#ifndef CONVCRF_CLASS_BLOCK
#define CONVCRF_CLASS_BLOCK 8  // classes per thread of convcrf_upsample_adjoint (as in message.cu)
#endif

// Weight of coarse cell `cell` in the bilinear upsampling of output index `index` (0 if no tap).
__device__ inline float tap_weight(int index, int blur, int n, int cell) {
    int i0, i1;
    float frac;
    bilinear_taps(index, blur, n, i0, i1, frac);
    return (i0 == cell ? 1.0f - frac : 0.0f) + (i1 == cell ? frac : 0.0f);
}

// Rows (or columns) [first, stop) of the image pooled into coarse cell `cell` of an axis.
__device__ inline void cell_span(int cell, int blur, int pad, int length, int& first, int& stop) {
    first = max(cell * blur - pad, 0);
    stop = min(cell * blur + blur - pad, length);
}

// The transpose of crop(up(.)), the message's upsampling: grad [N,C,H,W] -> out [N,C,h,w],
//   out[c,i,j] = sum_{y,x} tap_weight(y + pad_y, i) * tap_weight(x + pad_x, j) * grad[c,y,x].
// Cell i is a tap of the pixels with (i-1)*blur <= y + pad_y < (i+2)*blur only. One thread per
// coarse cell and chunk of CONVCRF_CLASS_BLOCK classes (blockIdx.z = image * num_chunks + chunk).
extern "C" __global__ void convcrf_upsample_adjoint(const float* __restrict__ grad,
                                                    float* __restrict__ out, int num_classes,
                                                    int height, int width, int coarse_h,
                                                    int coarse_w, int blur, int pad_y, int pad_x,
                                                    int num_chunks) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y * blockDim.y + threadIdx.y;
    if (j >= coarse_w || i >= coarse_h) return;
    const int n = blockIdx.z / num_chunks;
    const int c0 = (blockIdx.z % num_chunks) * CONVCRF_CLASS_BLOCK;
    const int count = min(CONVCRF_CLASS_BLOCK, num_classes - c0);
    const long long plane = (long long)height * width;
    const long long coarse_plane = (long long)coarse_h * coarse_w;
    const float* grad_n = grad + ((long long)n * num_classes + c0) * plane;
    const int y0 = max((i - 1) * blur - pad_y, 0), y1 = min((i + 2) * blur - pad_y, height);
    const int x0 = max((j - 1) * blur - pad_x, 0), x1 = min((j + 2) * blur - pad_x, width);

    float acc[CONVCRF_CLASS_BLOCK];
#pragma unroll
    for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) acc[cc] = 0.0f;
    for (int y = y0; y < y1; ++y) {
        const float wy = tap_weight(y + pad_y, blur, coarse_h, i);
        if (wy == 0.0f) continue;
        for (int x = x0; x < x1; ++x) {
            const float weight = wy * tap_weight(x + pad_x, blur, coarse_w, j);
            if (weight == 0.0f) continue;
            const long long pixel = (long long)y * width + x;
#pragma unroll
            for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) {
                if (cc < count) acc[cc] += weight * grad_n[cc * plane + pixel];
            }
        }
    }
    float* out_n = out + ((long long)n * num_classes + c0) * coarse_plane + (long long)i * coarse_w + j;
#pragma unroll
    for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) {
        if (cc < count) out_n[cc * coarse_plane] = acc[cc];
    }
}

// The gradient of pooled Q spread back to a pixel (pooling's adjoint: the cell's value over
// its pixel count). Returns a pointer to class 0 of the pixel's cell; *inv_count is set.
__device__ inline const float* spread_source(const ScoreArgs& args, const float* grad_pooled,
                                             int n, int y, int x, float* inv_count) {
    const int ci = (y + args.pad_y) / args.blur;
    const int cj = (x + args.pad_x) / args.blur;
    int r0, r1, q0, q1;
    cell_span(ci, args.blur, args.pad_y, args.height, r0, r1);
    cell_span(cj, args.blur, args.pad_x, args.width, q0, q1);
    *inv_count = 1.0f / (float)((r1 - r0) * (q1 - q0));
    const long long coarse_plane = (long long)args.coarse_h * args.coarse_w;
    return grad_pooled + (long long)n * args.num_classes * coarse_plane +
           (long long)ci * args.coarse_w + cj;
}

// The softmax's adjoint for one mean-field step, per pixel: with Q = softmax(z) of the step's
// scores z = unary_scale*(logit - lse) + msg_scale*crop(up(M)) and g the spread gradient of
// the pooled Q, grad_scores = Q * (g - sum_c Q_c g_c); it is written and added into acc.
// One thread per pixel, 2-D blocks, blockIdx.z = image; all arrays float32.
extern "C" __global__ void convcrf_softmax_adjoint(
    const float* __restrict__ logits, const float* __restrict__ lse,
    const float* __restrict__ message, const float* __restrict__ grad_pooled,
    float* __restrict__ grad_scores, float* __restrict__ acc, int num_classes, int height,
    int width, int coarse_h, int coarse_w, int blur, int pad_y, int pad_x, float unary_scale,
    float msg_scale) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int n = blockIdx.z;
    if (x >= width || y >= height) return;
    const ScoreArgs args = {logits, lse, message, num_classes, height, width, coarse_h,
                            coarse_w, blur, pad_y, pad_x, unary_scale, msg_scale};
    const PixelScore score = pixel_score(args, n, y, x, true);
    float max_z, sum_exp, inv_count;
    softmax_stats(score, num_classes, max_z, sum_exp);
    const float* g = spread_source(args, grad_pooled, n, y, x, &inv_count);
    const long long coarse_plane = (long long)coarse_h * coarse_w;
    const float scale = 1.0f / sum_exp;
    float dot = 0.0f;
    for (int c = 0; c < num_classes; ++c) dot += expf(score(c) - max_z) * scale * g[c * coarse_plane];
    const long long plane = (long long)height * width;
    const long long offset = (long long)n * num_classes * plane + (long long)y * width + x;
    for (int c = 0; c < num_classes; ++c) {
        const float q = expf(score(c) - max_z) * scale;
        const float value = q * (g[c * coarse_plane] - dot) * inv_count;
        grad_scores[offset + c * plane] = value;
        acc[offset + c * plane] += value;
    }
}

// The logits' gradient. With p = softmax(logits) = exp(logit - lse), the first Q is p (init
// softmax) or log p (init log); g is the spread gradient of its pooling, so its gradient is
// G0 = log_init ? g : p * (g - sum_c p_c g_c). With v = unary_scale * acc + G0 (acc: the sum of
// every step's score gradients), log_softmax's Jacobian gives grad_logits = v - p * sum_c v_c.
// One thread per pixel, 2-D blocks, blockIdx.z = image; all arrays float32.
extern "C" __global__ void convcrf_unary_adjoint(
    const float* __restrict__ logits, const float* __restrict__ lse,
    const float* __restrict__ grad_pooled, const float* __restrict__ acc,
    float* __restrict__ grad_logits, int num_classes, int height, int width, int coarse_h,
    int coarse_w, int blur, int pad_y, int pad_x, float unary_scale, int log_init) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int n = blockIdx.z;
    if (x >= width || y >= height) return;
    const ScoreArgs args = {logits, lse, nullptr, num_classes, height, width, coarse_h,
                            coarse_w, blur, pad_y, pad_x, 1.0f, 0.0f};
    float inv_count;
    const float* g = spread_source(args, grad_pooled, n, y, x, &inv_count);
    const long long coarse_plane = (long long)coarse_h * coarse_w;
    const long long plane = (long long)height * width;
    const long long offset = (long long)n * num_classes * plane + (long long)y * width + x;
    const float pixel_lse = lse[(long long)n * plane + (long long)y * width + x];
    float dot = 0.0f;  // sum_c p_c g_c
    if (!log_init) {
        for (int c = 0; c < num_classes; ++c)
            dot += expf(logits[offset + c * plane] - pixel_lse) * g[c * coarse_plane];
    }
    float total = 0.0f;  // sum_c v_c
    for (int c = 0; c < num_classes; ++c) {
        const float p = expf(logits[offset + c * plane] - pixel_lse);
        const float g0 = log_init ? g[c * coarse_plane] : p * (g[c * coarse_plane] - dot);
        total += unary_scale * acc[offset + c * plane] + g0 * inv_count;
    }
    for (int c = 0; c < num_classes; ++c) {
        const float p = expf(logits[offset + c * plane] - pixel_lse);
        const float g0 = log_init ? g[c * coarse_plane] : p * (g[c * coarse_plane] - dot);
        grad_logits[offset + c * plane] =
            unary_scale * acc[offset + c * plane] + g0 * inv_count - p * total;
    }
}

#endif  // CONVCRF_FULLRES_CU
