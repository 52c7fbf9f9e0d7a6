// Fused bias + activation + gain + clamp: parameters and the per-element math.
//
// One elementwise kernel serves three modes (s = x + b is the pre-activation, y0 = gain * act(s),
// m = 1 if clamping is off or -clamp <= y0 <= clamp, else 0):
//   forward: out = clamp(y0)
//   grad:    out = g * gain * act'(s) * m                (g = dL/dy; out = dL/dx)
//   grad2:   out = g * dy * gain * act''(s) * m          (g = cotangent of dx; out = its derivative w.r.t. x)
// These are the derivatives of the PyTorch reference implementation in bias_act.py.

#pragma once

#include <math.h>
#include <cstdint>

#ifdef __CUDACC__
#define EG3D_HD __host__ __device__ __forceinline__
#else
#define EG3D_HD inline
#endif

enum BiasActMode : int { kBiasActForward = 0, kBiasActGrad = 1, kBiasActGrad2 = 2 };

// Activation ids; they equal `cuda_idx` in bias_act.activation_funcs.
enum BiasActFunc : int {
    kLinear = 1, kRelu = 2, kLrelu = 3, kTanh = 4, kSigmoid = 5, kElu = 6, kSelu = 7, kSoftplus = 8, kSwish = 9
};

struct BiasActParams {
    const void* x;        // pre-bias input (all modes)
    const void* b;        // bias, or nullptr
    const void* g;        // grad: dL/dy; grad2: cotangent of dx
    const void* dy;       // grad2: the dL/dy that produced dx
    void* out;
    int64_t numel;
    int64_t bias_stride;  // memory stride of the bias dimension (all tensors share one dense layout)
    int64_t bias_size;
    int act;
    double alpha, gain, clamp;  // clamp < 0: no clamping
};

namespace bias_act_math {

constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSoftplusThreshold = 20.0;  // as torch.nn.functional.softplus (beta = 1)

// Single and double precision versions of the libm functions used below.
EG3D_HD float exp_(float v) { return expf(v); }
EG3D_HD double exp_(double v) { return exp(v); }
EG3D_HD float expm1_(float v) { return expm1f(v); }
EG3D_HD double expm1_(double v) { return expm1(v); }
EG3D_HD float log1p_(float v) { return log1pf(v); }
EG3D_HD double log1p_(double v) { return log1p(v); }
EG3D_HD float tanh_(float v) { return tanhf(v); }
EG3D_HD double tanh_(double v) { return tanh(v); }

template <typename T> EG3D_HD T sigmoid(T s) { return T(1) / (T(1) + exp_(-s)); }

// act(s)
template <typename T> EG3D_HD T value(int act, T s, T alpha) {
    switch (act) {
        case kRelu:     return s > T(0) ? s : T(0);
        case kLrelu:    return s > T(0) ? s : s * alpha;
        case kTanh:     return tanh_(s);
        case kSigmoid:  return sigmoid(s);
        case kElu:      return s > T(0) ? s : expm1_(s);
        case kSelu:     return T(kSeluScale) * (s > T(0) ? s : T(kSeluAlpha) * expm1_(s));
        case kSoftplus: return s > T(kSoftplusThreshold) ? s : log1p_(exp_(s));
        case kSwish:    return s * sigmoid(s);
        default:        return s;  // linear
    }
}

// act'(s); at kinks the one-sided value PyTorch's autograd uses.
template <typename T> EG3D_HD T first(int act, T s, T alpha) {
    switch (act) {
        case kRelu:     return s > T(0) ? T(1) : T(0);
        case kLrelu:    return s > T(0) ? T(1) : alpha;
        case kTanh:     { T t = tanh_(s); return T(1) - t * t; }
        case kSigmoid:  { T p = sigmoid(s); return p * (T(1) - p); }
        case kElu:      return s > T(0) ? T(1) : exp_(s);
        case kSelu:     return s > T(0) ? T(kSeluScale) : T(kSeluScale * kSeluAlpha) * exp_(s);
        case kSoftplus: return s > T(kSoftplusThreshold) ? T(1) : sigmoid(s);
        case kSwish:    { T p = sigmoid(s); return p * (T(1) + s * (T(1) - p)); }
        default:        return T(1);  // linear
    }
}

// act''(s); zero for the piecewise-linear functions.
template <typename T> EG3D_HD T second(int act, T s) {
    switch (act) {
        case kTanh:     { T t = tanh_(s); return T(-2) * t * (T(1) - t * t); }
        case kSigmoid:  { T p = sigmoid(s); return p * (T(1) - p) * (T(1) - T(2) * p); }
        case kElu:      return s > T(0) ? T(0) : exp_(s);
        case kSelu:     return s > T(0) ? T(0) : T(kSeluScale * kSeluAlpha) * exp_(s);
        case kSoftplus: { if (s > T(kSoftplusThreshold)) return T(0); T p = sigmoid(s); return p * (T(1) - p); }
        case kSwish:    { T p = sigmoid(s); return p * (T(1) - p) * (T(2) + s * (T(1) - T(2) * p)); }
        default:        return T(0);  // linear, relu, lrelu
    }
}

// Result of `mode` for element i, computed in T (float for half inputs, else the input type).
template <typename scalar_t, typename T>
EG3D_HD T element(const BiasActParams& p, int mode, int64_t i) {
    T s = T(static_cast<const scalar_t*>(p.x)[i]);
    if (p.b) s += T(static_cast<const scalar_t*>(p.b)[(i / p.bias_stride) % p.bias_size]);
    const T alpha = T(p.alpha), gain = T(p.gain), clamp = T(p.clamp);
    const T y0 = gain * value(p.act, s, alpha);
    if (mode == kBiasActForward)
        return p.clamp >= 0 ? (y0 < -clamp ? -clamp : (y0 > clamp ? clamp : y0)) : y0;
    if (p.clamp >= 0 && (y0 < -clamp || y0 > clamp))
        return T(0);  // clamped outputs pass no gradient
    const T g = T(static_cast<const scalar_t*>(p.g)[i]);
    if (mode == kBiasActGrad)
        return g * gain * first(p.act, s, alpha);
    const T dy = T(static_cast<const scalar_t*>(p.dy)[i]);
    return g * dy * gain * second(p.act, s);
}

}  // namespace bias_act_math
