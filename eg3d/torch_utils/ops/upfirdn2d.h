// upfirdn2d: parameters and the per-output-pixel math.
//
// For output pixel (oy, ox) and filter tap (ky, kx), the tap sits on pixel
// (oy * down_y + ky - pad_y0, ox * down_x + kx - pad_x0) of the zero-upsampled image, which holds
// input pixel (uy / up_y, ux / up_x) when both coordinates are multiples of `up` and inside the
// image, and zero otherwise. Only those taps are visited. Without flip_filter the filter is
// applied as a convolution (taps read mirrored), as in the PyTorch reference in upfirdn2d.py.

#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define EG3D_HD __host__ __device__ __forceinline__
#else
#define EG3D_HD inline
#endif

struct Upfirdn2dParams {
    const void* x;  // [N, C, in_h, in_w], any strides
    const float* f; // [fh, fw], contiguous
    void* y;        // [N, C, out_h, out_w], any strides
    int64_t channels, in_h, in_w, out_h, out_w;
    int64_t x_stride[4], y_stride[4];
    int fh, fw, up_x, up_y, down_x, down_y, pad_x0, pad_y0;
    bool flip_filter;
    double gain;
};

namespace upfirdn2d_math {

// First tap k >= 0 that lands on a stored pixel along one axis (`base` = position of tap 0 in the
// upsampled image), and the end of the tap range (exclusive).
EG3D_HD int64_t first_tap(int64_t base, int up) {
    int64_t k = base < 0 ? -base : 0;
    const int64_t r = (base + k) % up;
    return r ? k + (up - r) : k;
}

EG3D_HD int64_t end_tap(int64_t base, int64_t size, int up, int taps) {
    const int64_t end = size * up - base;  // first tap beyond the last input pixel
    return end < taps ? end : int64_t(taps);
}

// Output element number i (in N, C, H, W order), accumulated in T; returns its offset in `y` through `y_offset`.
template <typename scalar_t, typename T>
EG3D_HD T element(const Upfirdn2dParams& p, int64_t i, int64_t* y_offset) {
    const int64_t ox = i % p.out_w;
    const int64_t oy = (i / p.out_w) % p.out_h;
    const int64_t nc = i / (p.out_w * p.out_h);
    const int64_t c = nc % p.channels, n = nc / p.channels;
    *y_offset = n * p.y_stride[0] + c * p.y_stride[1] + oy * p.y_stride[2] + ox * p.y_stride[3];

    const scalar_t* x = static_cast<const scalar_t*>(p.x) + n * p.x_stride[0] + c * p.x_stride[1];
    const int64_t base_y = oy * p.down_y - p.pad_y0, base_x = ox * p.down_x - p.pad_x0;
    const int64_t ky_end = end_tap(base_y, p.in_h, p.up_y, p.fh), kx_end = end_tap(base_x, p.in_w, p.up_x, p.fw);
    const int64_t kx_begin = first_tap(base_x, p.up_x);
    T acc = T(0);
    for (int64_t ky = first_tap(base_y, p.up_y); ky < ky_end; ky += p.up_y) {
        const scalar_t* row = x + ((base_y + ky) / p.up_y) * p.x_stride[2];
        const float* taps = p.flip_filter ? p.f + ky * p.fw : p.f + (p.fh - 1 - ky) * p.fw;
        for (int64_t kx = kx_begin; kx < kx_end; kx += p.up_x) {
            const float w = p.flip_filter ? taps[kx] : taps[p.fw - 1 - kx];
            acc += T(row[((base_x + kx) / p.up_x) * p.x_stride[3]]) * T(w);
        }
    }
    return acc * T(p.gain);
}

}  // namespace upfirdn2d_math
