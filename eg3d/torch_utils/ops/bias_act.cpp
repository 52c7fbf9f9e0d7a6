// Python binding of the bias_act kernel: argument checks and layout handling.

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>

#include "bias_act.h"

void bias_act_cuda(const BiasActParams& p, int mode, at::ScalarType dtype);

// mode: see BiasActMode. `b`, `g`, `dy` may be empty tensors when unused. The result has the
// strides of x (x made contiguous first if it is not dense).
static torch::Tensor bias_act(int64_t mode, torch::Tensor x, torch::Tensor b, torch::Tensor g, torch::Tensor dy,
                              int64_t dim, int64_t act, double alpha, double gain, double clamp) {
    TORCH_CHECK(mode >= kBiasActForward && mode <= kBiasActGrad2, "bias_act: invalid mode ", mode);
    TORCH_CHECK(x.is_cuda(), "bias_act: x must be a CUDA tensor");
    TORCH_CHECK(act >= kLinear && act <= kSwish, "bias_act: invalid activation id ", act);
    const bool has_bias = b.numel() > 0;
    if (!x.is_non_overlapping_and_dense()) x = x.contiguous();
    // Bring the other element-wise inputs to the strides of x, so that one linear index addresses
    // the same element in each of them (and in `out`, which copies the strides of x).
    auto like_x = [&](torch::Tensor t, const char* name) {
        TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(),
                    "bias_act: ", name, " must match x in device and dtype");
        TORCH_CHECK(t.sizes() == x.sizes(), "bias_act: ", name, " must have the shape of x");
        return t.strides() == x.strides() ? t : torch::empty_like(x).copy_(t);
    };
    if (mode >= kBiasActGrad) g = like_x(g, "the incoming gradient");
    if (mode == kBiasActGrad2) dy = like_x(dy, "dy");
    if (has_bias) {
        TORCH_CHECK(b.dim() == 1 && 0 <= dim && dim < x.dim() && b.size(0) == x.size(dim),
                    "bias_act: b must be 1-D with x.shape[dim] elements");
        TORCH_CHECK(b.device() == x.device() && b.scalar_type() == x.scalar_type(),
                    "bias_act: b must match x in device and dtype");
        b = b.contiguous();
    }
    auto out = torch::empty_like(x);

    BiasActParams p;
    p.x = x.data_ptr();
    p.b = has_bias ? b.data_ptr() : nullptr;
    p.g = mode >= kBiasActGrad ? g.data_ptr() : nullptr;
    p.dy = mode == kBiasActGrad2 ? dy.data_ptr() : nullptr;
    p.out = out.data_ptr();
    p.numel = x.numel();
    p.bias_stride = has_bias ? x.stride(dim) : 1;  // x is dense: (i / stride) % size is its index along dim
    p.bias_size = has_bias ? b.size(0) : 1;
    p.act = static_cast<int>(act);
    p.alpha = alpha;
    p.gain = gain;
    p.clamp = clamp;

    const at::cuda::OptionalCUDAGuard device_guard(x.device());
    bias_act_cuda(p, static_cast<int>(mode), x.scalar_type());
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("bias_act", &bias_act, "Fused bias + activation + gain + clamp and its first/second derivatives (CUDA)");
}
