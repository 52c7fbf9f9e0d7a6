// CUDA kernel for bias_act: one thread per element (grid-stride loop), math from bias_act.h.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "bias_act.h"

template <typename scalar_t>
__global__ void bias_act_kernel(BiasActParams p, int mode) {
    using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16
    const int64_t step = int64_t(blockDim.x) * gridDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += step)
        static_cast<scalar_t*>(p.out)[i] = scalar_t(bias_act_math::element<scalar_t, acc_t>(p, mode, i));
}

void bias_act_cuda(const BiasActParams& p, int mode, at::ScalarType dtype) {
    if (p.numel == 0) return;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((p.numel + threads - 1) / threads, int64_t(1) << 20);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bias_act_cuda", [&] {
        bias_act_kernel<scalar_t><<<blocks, threads, 0, stream>>>(p, mode);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
