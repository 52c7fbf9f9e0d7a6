// CUDA kernel for upfirdn2d: one thread per output element (grid-stride loop), math from upfirdn2d.h.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "upfirdn2d.h"

template <typename scalar_t>
__global__ void upfirdn2d_kernel(Upfirdn2dParams p, int64_t numel) {
    using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16
    const int64_t step = int64_t(blockDim.x) * gridDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
        int64_t offset;
        const acc_t v = upfirdn2d_math::element<scalar_t, acc_t>(p, i, &offset);
        static_cast<scalar_t*>(p.y)[offset] = scalar_t(v);
    }
}

void upfirdn2d_cuda(const Upfirdn2dParams& p, int64_t numel, at::ScalarType dtype) {
    if (numel == 0) return;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, int64_t(1) << 20);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "upfirdn2d_cuda", [&] {
        upfirdn2d_kernel<scalar_t><<<blocks, threads, 0, stream>>>(p, numel);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
