// Python binding of the upfirdn2d kernel: argument checks and output allocation.

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>

#include "upfirdn2d.h"

void upfirdn2d_cuda(const Upfirdn2dParams& p, int64_t numel, at::ScalarType dtype);

// x: [N, C, H, W] CUDA tensor (any strides); f: [fh, fw] float32 filter. Returns
// a contiguous [N, C, out_h, out_w] tensor.
static torch::Tensor upfirdn2d(torch::Tensor x, torch::Tensor f, int64_t up_x, int64_t up_y, int64_t down_x,
                               int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1,
                               bool flip_filter, double gain) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 4, "upfirdn2d: x must be a 4-D CUDA tensor");
    TORCH_CHECK(f.device() == x.device() && f.scalar_type() == torch::kFloat32 && f.dim() == 2,
                "upfirdn2d: f must be a 2-D float32 tensor on the device of x");
    TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "upfirdn2d: factors must be >= 1");
    f = f.contiguous();
    const int64_t fh = f.size(0), fw = f.size(1);
    const int64_t padded_h = x.size(2) * up_y + pad_y0 + pad_y1, padded_w = x.size(3) * up_x + pad_x0 + pad_x1;
    TORCH_CHECK(fh >= 1 && fw >= 1 && padded_h >= fh && padded_w >= fw,
                "upfirdn2d: the padded, upsampled image is smaller than the filter");
    const int64_t out_h = (padded_h - fh + down_y) / down_y, out_w = (padded_w - fw + down_x) / down_x;
    auto y = torch::empty({x.size(0), x.size(1), out_h, out_w}, x.options());

    Upfirdn2dParams p;
    p.x = x.data_ptr();
    p.f = f.data_ptr<float>();
    p.y = y.data_ptr();
    p.channels = x.size(1);
    p.in_h = x.size(2);
    p.in_w = x.size(3);
    p.out_h = out_h;
    p.out_w = out_w;
    for (int d = 0; d < 4; ++d) {
        p.x_stride[d] = x.stride(d);
        p.y_stride[d] = y.stride(d);
    }
    p.fh = static_cast<int>(fh);
    p.fw = static_cast<int>(fw);
    p.up_x = static_cast<int>(up_x);
    p.up_y = static_cast<int>(up_y);
    p.down_x = static_cast<int>(down_x);
    p.down_y = static_cast<int>(down_y);
    p.pad_x0 = static_cast<int>(pad_x0);
    p.pad_y0 = static_cast<int>(pad_y0);
    p.flip_filter = flip_filter;
    p.gain = gain;

    const at::cuda::OptionalCUDAGuard device_guard(x.device());
    upfirdn2d_cuda(p, y.numel(), x.scalar_type());
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("upfirdn2d", &upfirdn2d, "Upsample, pad, FIR-filter and downsample 2-D images (CUDA)");
}
