// One mean-field iteration in one launch at blur > 1 (steps 3-5 of README's "The algorithm"):
// the message of message.cu and the full-resolution pass of fullres.cu fused, so that an
// iteration costs one launch instead of two and the message never goes through global memory.
// For small grids (500x375 at blur 4 is 125x94 cells), where launches and latency, not bytes,
// set the time.
//
// A block owns the tile_rows x tile_cols coarse cells (and their blur x blur pixels) of
// convcrf_step. The pixels of a cell take their bilinear taps from the cell and its neighbours,
// so the block first computes the message on a window of (tile_rows+2) x (tile_cols+2) cells
// (the message of cells outside the grid is computed but never read): it stages the features
// and P of the window with a halo of s = k/2 cells, all classes padded to whole chunks of
// CONVCRF_CLASS_BLOCK; thread items (window cell, class chunk, row group g) sum the window rows
// a = g, g + row_groups, ... (add_window_rows); the row groups' partial sums are added in order.
// Then, with the message window in shared memory, pool_q computes the next pooled Q into
// pooled_out (never pooled_in: other blocks read it for their halos) or, with write_scores, the
// block writes its pixels' scores.
//
// Dynamic shared memory, in floats, with W = (tile_rows+2)*(tile_cols+2), A the staged area
// (tile_rows+2+2s)*(tile_cols+2+2s) and C' the classes padded to whole chunks:
//   C*W (the message window)
//   + max((2+F+C')*A + row_groups*C'*W, (2 + chunk_classes) * tile_rows*blur*tile_cols*blur).

#ifndef CONVCRF_MESSAGE_CU
#include "message.cu"
#endif
#ifndef CONVCRF_FULLRES_CU
#include "fullres.cu"
#endif

// logits, lse [N,H,W], feat [N,2+F,h,w], pooled_in [N,C,h,w] -> pooled_out [N,C,h,w] or, with
// write_scores (the last iteration), scores [N,C,H,W]; float32. blockIdx.z = image.
extern "C" __global__ void convcrf_step_fused(
    const float* __restrict__ logits, const float* __restrict__ lse,
    const float* __restrict__ feat, const float* __restrict__ pooled_in,
    float* __restrict__ pooled_out, float* __restrict__ scores, int write_scores, int num_classes,
    int num_features, int height, int width, int coarse_h, int coarse_w, int blur, int pad_y,
    int pad_x, int tile_rows, int tile_cols, int chunk_classes, int filter_size, int row_groups,
    float pos_compat, float col_compat, float inv_pos_sdims, float inv_col_schan,
    float unary_scale, float msg_scale) {
    extern __shared__ float convcrf_smem[];
    const int n = blockIdx.z;
    const int s = filter_size / 2;
    const int num_feat = 2 + num_features;
    const int class_chunks = (num_classes + CONVCRF_CLASS_BLOCK - 1) / CONVCRF_CLASS_BLOCK;
    const int padded = class_chunks * CONVCRF_CLASS_BLOCK;
    const int win_row0 = blockIdx.y * tile_rows - 1;
    const int win_col0 = blockIdx.x * tile_cols - 1;
    const int win_w = tile_cols + 2;
    const int win = (tile_rows + 2) * win_w;
    const int tile_w = win_w + 2 * s;
    const int area = (tile_rows + 2 + 2 * s) * tile_w;
    const long long coarse_plane = (long long)coarse_h * coarse_w;
    float* window = convcrf_smem;                        // [C][win]: the message
    float* tile = window + num_classes * win;            // [2+F+C'][area]: features, P
    float* partial = tile + (num_feat + padded) * area;  // [row_groups][C'][win]

    stage_message_tile(tile, feat + (long long)n * num_feat * coarse_plane,
                       pooled_in + (long long)n * num_classes * coarse_plane, num_feat, 0, padded,
                       num_classes, coarse_h, coarse_w, win_row0 - s, win_col0 - s,
                       tile_rows + 2 + 2 * s, tile_w, 0, threadIdx.x, blockDim.x);
    __syncthreads();
    const int items = row_groups * class_chunks * win;
    for (int item = threadIdx.x; item < items; item += blockDim.x) {
        const int cell = item % win;
        const int chunk = (item / win) % class_chunks;
        const int group = item / (win * class_chunks);
        float acc[CONVCRF_CLASS_BLOCK];
#pragma unroll
        for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) acc[cc] = 0.0f;
        const float* tile_q = tile + (num_feat + chunk * CONVCRF_CLASS_BLOCK) * area;
        add_window_rows(tile, tile_q, area, tile_w, num_feat, cell % win_w, cell / win_w,
                        filter_size, group, row_groups, pos_compat, col_compat, inv_pos_sdims,
                        inv_col_schan, acc);
        float* out = partial + (group * padded + chunk * CONVCRF_CLASS_BLOCK) * win + cell;
#pragma unroll
        for (int cc = 0; cc < CONVCRF_CLASS_BLOCK; ++cc) out[cc * win] = acc[cc];
    }
    __syncthreads();
    for (int t = threadIdx.x; t < num_classes * win; t += blockDim.x) {
        const int c = t / win;
        const int cell = t - c * win;
        float sum = 0.0f;
        for (int group = 0; group < row_groups; ++group) {
            sum += partial[(group * padded + c) * win + cell];
        }
        window[c * win + cell] = sum;
    }
    __syncthreads();

    ScoreArgs args = {logits, lse, window, num_classes, height, width, coarse_h, coarse_w, blur,
                      pad_y, pad_x, unary_scale, msg_scale};
    args.msg_row0 = win_row0;
    args.msg_col0 = win_col0;
    args.msg_width = win_w;
    args.msg_plane = win;
    float* work = tile;  // the staged tile and the partial sums are free again
    if (!write_scores) {
        pool_q(args, work, nullptr, pooled_out, tile_rows, tile_cols, chunk_classes, true, false);
        return;
    }
    const int box_w = tile_cols * blur;
    const int box = tile_rows * blur * box_w;
    const int row0 = blockIdx.y * tile_rows * blur - pad_y;
    const int col0 = blockIdx.x * tile_cols * blur - pad_x;
    const long long plane = (long long)height * width;
    for (int p = threadIdx.x; p < box; p += blockDim.x) {
        const int y = row0 + p / box_w;
        const int x = col0 + p % box_w;
        if (y < 0 || y >= height || x < 0 || x >= width) continue;
        const PixelScore score = pixel_score(args, n, y, x, true);
        float* out = scores + (long long)n * num_classes * plane + (long long)y * width + x;
        store_scores(score, num_classes, out, plane);
    }
}
