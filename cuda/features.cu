// Coarse-grid features of ConvCRF (steps 1-2 of README's "The algorithm"), once per image.
//
// Layout: class/channel-major, x fastest. One thread per coarse cell, 2-D blocks of any size,
// blockIdx.z = image of the batch.

// image [N,F,H,W] float32 (raw values) -> feat [N,2+F,h,w] float32 with
//   feat[:,0] = mean row, feat[:,1] = mean column, feat[:,2+f] = mean image[f],
// each mean over the valid pixels of the blur x blur cell (padding pad_y/pad_x not counted).
// Unscaled: the message kernels divide the differences of features by pos_sdims / col_schan,
// so that large values (16-bit images, far pixels) keep their float32 precision and a tiny
// scale gives weights of 0 instead of inf - inf.
extern "C" __global__ void convcrf_pool_features(const float* __restrict__ image,
                                                 float* __restrict__ feat, int num_features,
                                                 int height, int width, int coarse_h,
                                                 int coarse_w, int blur, int pad_y,
                                                 int pad_x) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int n = blockIdx.z;
    if (x >= coarse_w || y >= coarse_h) return;
    const int y0 = max(y * blur - pad_y, 0);
    const int y1 = min(y * blur - pad_y + blur, height);
    const int x0 = max(x * blur - pad_x, 0);
    const int x1 = min(x * blur - pad_x + blur, width);
    const float count = (float)((y1 - y0) * (x1 - x0));
    const long long plane = (long long)height * width;
    const long long coarse_plane = (long long)coarse_h * coarse_w;
    float* out = feat + (long long)n * (2 + num_features) * coarse_plane + (long long)y * coarse_w + x;
    // The mean of the consecutive integers a..b-1 is (a + b - 1) / 2.
    out[0] = 0.5f * (float)(y0 + y1 - 1);
    out[coarse_plane] = 0.5f * (float)(x0 + x1 - 1);
    for (int f = 0; f < num_features; ++f) {
        const float* channel = image + ((long long)n * num_features + f) * plane;
        float sum = 0.0f;
        for (int yy = y0; yy < y1; ++yy) {
            for (int xx = x0; xx < x1; ++xx) sum += channel[(long long)yy * width + xx];
        }
        out[(2 + f) * coarse_plane] = sum / count;
    }
}
