"""CUDA C++ text of the fused-op kernels, forward and backward: the prelude every kernel
compiles with (storage type per dtype, 16-byte packs, conversions, the dropout hash), the
elementwise kernels (grid-stride loops) and the row kernels (one block per row: LayerNorm,
softmax).

Kept apart from `kernels.py`, which fills in the `%(...)s` parameters, compiles, caches and
launches them: this file is the kernels themselves, some 400 lines of CUDA, and needs neither
torch nor CuPy. `kernels` re-exports them as `_PRELUDE`, `_ELEMENTWISE`, `_ROWS`.
"""

__all__ = ["PRELUDE", "ELEMENTWISE", "ROWS"]

PRELUDE = r"""
#define STORAGE_%(kind)s 1
#if defined(STORAGE_float)
typedef float T;
__device__ __forceinline__ float ld(T v) { return v; }
__device__ __forceinline__ T st(float f) { return f; }
#elif defined(STORAGE_half)
typedef unsigned short T;
__device__ __forceinline__ float ld(T v) { float f; asm("cvt.f32.f16 %%0, %%1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ T st(float f) { T h; asm("cvt.rn.f16.f32 %%0, %%1;" : "=h"(h) : "f"(f)); return h; }
#else
typedef unsigned short T;
__device__ __forceinline__ float ld(T v) { return __uint_as_float(((unsigned int)v) << 16); }
#if __CUDA_ARCH__ >= 800
// one instruction (round to nearest even, NaN stays NaN) where the hardware has it
__device__ __forceinline__ T st(float f) { T h; asm("cvt.rn.bf16.f32 %%0, %%1;" : "=h"(h) : "f"(f)); return h; }
#else
__device__ __forceinline__ T st(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)0x7fc0;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (T)(u >> 16);
}
#endif
#endif
#define NEG_INF __int_as_float(0xff800000)
#define VEC %(vec)d
#define THREADS %(threads)d
#define NV %(nv)d
#define U %(unroll)d
#define MINB %(min_blocks)d
struct alignas(sizeof(T) * VEC) Pack { T e[VEC]; };
struct alignas(VEC) BPack { unsigned char e[VEC]; };

__device__ __forceinline__ float block_sum(float x, float* red) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    __syncthreads();  // red may still be read by the previous reduction
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float t = 0.f;
    #pragma unroll
    for (int i = 0; i < THREADS / 32; ++i) t += red[i];
    return t;
}
__device__ __forceinline__ float block_max(float x, float* red) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float t = NEG_INF;
    #pragma unroll
    for (int i = 0; i < THREADS / 32; ++i) t = fmaxf(t, red[i]);
    return t;
}
// fp32 storage uses the libm functions (results within an ulp or two of eager). fp16/bf16
// results keep 11/8 significant bits, so cheaper forms whose error stays far below that
// (|error| < 2e-7 for erf, ~1e-6 for tanh) are used there: the kernels would otherwise be
// bound by erff/tanhf instructions, not by memory (bf16 bias+GELU: 73%% of copy bandwidth).
#if defined(STORAGE_float)
__device__ __forceinline__ float erf_k(float x) { return erff(x); }
__device__ __forceinline__ float tanh_k(float u) { return tanhf(u); }
__device__ __forceinline__ float exp_k(float x) { return expf(x); }
#else
__device__ __forceinline__ float erf_k(float x) {  // Abramowitz & Stegun 7.1.26
    float a = fabsf(x);
    float t = __fdividef(1.f, 1.f + 0.3275911f * a);
    float y = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    return copysignf(1.f - y * __expf(-a * a), x);
}
__device__ __forceinline__ float tanh_k(float u) {  // 1 - 2 / (e^2u + 1), saturated at |u| = 9
    u = fminf(fmaxf(u, -9.f), 9.f);
    return 1.f - __fdividef(2.f, __expf(2.f * u) + 1.f);
}
__device__ __forceinline__ float exp_k(float x) { return __expf(x); }
#endif
__device__ __forceinline__ float gelu_f(float v, int tanh_approx) {
    if (tanh_approx) {
        float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        return 0.5f * v * (1.f + tanh_k(u));
    }
    return 0.5f * v * (1.f + erf_k(v * 0.7071067811865476f));
}
__device__ __forceinline__ float gelu_grad(float v, int tanh_approx) {
    if (tanh_approx) {
        float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        float t = tanh_k(u);
        return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * v * v);
    }
    return 0.5f * (1.f + erf_k(v * 0.7071067811865476f)) + v * 0.3989422804014327f * exp_k(-0.5f * v * v);
}
__device__ __forceinline__ unsigned int fmix32(unsigned int h) {
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16; return h;
}
// Counter-based uniform in [0, 1): the backward regenerates the forward's dropout mask. One
// finaliser per element: the counter is keyed by an odd multiplier from s1 (a bijection of
// 32-bit words, so distinct elements never share a hash input) xor s0; the high word of
// the index (tensors past 2^32 elements) is folded in with a golden-ratio step.
__device__ __forceinline__ float urand(unsigned int s0, unsigned int s1, unsigned long long i) {
    unsigned int c = (unsigned int)i + (unsigned int)(i >> 32) * 0x9e3779b9u;
    unsigned int h = fmix32((c * (s1 | 1u)) ^ s0);
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}
"""

ELEMENTWISE = r"""
// Grid-stride loops with U vectors in flight per thread. When the grid's thread count is a
// multiple of the row length in vectors (fixed_col), a thread always meets the same columns:
// its bias vector is loaded once and no per-element division is needed.
#define GRID_LOOP(body_load, body_compute)                                                   \
    const long long stride = (long long)gridDim.x * blockDim.x;                              \
    for (long long i0 = blockIdx.x * (long long)blockDim.x + threadIdx.x; i0 < nv; i0 += stride * U) { \
        body_load body_compute                                                               \
    }

extern "C" __global__ void __launch_bounds__(256, MINB) bias_gelu_fwd(const T* __restrict__ x, const T* __restrict__ b,
        T* __restrict__ y, long long nv, int h, int has_bias, int tanh_approx, int fixed_col) {
    Pack pb;
    long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (has_bias && fixed_col && first < nv) pb = *(const Pack*)(b + (int)((first * VEC) %% h));
    GRID_LOOP(
        Pack px[U];
        _Pragma("unroll") for (int u = 0; u < U; ++u) { long long i = i0 + u * stride; if (i < nv) px[u] = ((const Pack*)x)[i]; },
        _Pragma("unroll") for (int u = 0; u < U; ++u) {
            long long i = i0 + u * stride;
            if (i < nv) {
                Pack bb = pb; Pack py;
                if (has_bias && !fixed_col) bb = *(const Pack*)(b + (int)((i * VEC) %% h));
                _Pragma("unroll") for (int k = 0; k < VEC; ++k) {
                    float v = ld(px[u].e[k]) + (has_bias ? ld(bb.e[k]) : 0.f);
                    py.e[k] = st(gelu_f(v, tanh_approx));
                }
                ((Pack*)y)[i] = py;
            }
        })
}
extern "C" __global__ void __launch_bounds__(256, MINB) bias_gelu_bwd(const T* __restrict__ dy, const T* __restrict__ x,
        const T* __restrict__ b, T* __restrict__ dx, long long nv, int h, int has_bias, int tanh_approx, int fixed_col) {
    Pack pb;
    long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (has_bias && fixed_col && first < nv) pb = *(const Pack*)(b + (int)((first * VEC) %% h));
    GRID_LOOP(
        Pack px[U]; Pack pd[U];
        _Pragma("unroll") for (int u = 0; u < U; ++u) {
            long long i = i0 + u * stride;
            if (i < nv) { px[u] = ((const Pack*)x)[i]; pd[u] = ((const Pack*)dy)[i]; }
        },
        _Pragma("unroll") for (int u = 0; u < U; ++u) {
            long long i = i0 + u * stride;
            if (i < nv) {
                Pack bb = pb; Pack po;
                if (has_bias && !fixed_col) bb = *(const Pack*)(b + (int)((i * VEC) %% h));
                _Pragma("unroll") for (int k = 0; k < VEC; ++k) {
                    float v = ld(px[u].e[k]) + (has_bias ? ld(bb.e[k]) : 0.f);
                    po.e[k] = st(ld(pd[u].e[k]) * gelu_grad(v, tanh_approx));
                }
                ((Pack*)dx)[i] = po;
            }
        })
}
extern "C" __global__ void __launch_bounds__(256, MINB) dropout_add_fwd(const T* __restrict__ x, const T* __restrict__ r,
        T* __restrict__ y, long long nv, float p, float scale, unsigned int s0, unsigned int s1, int train) {
    GRID_LOOP(
        Pack px[U]; Pack pr[U];
        _Pragma("unroll") for (int u = 0; u < U; ++u) {
            long long i = i0 + u * stride;
            if (i < nv) { px[u] = ((const Pack*)x)[i]; pr[u] = ((const Pack*)r)[i]; }
        },
        _Pragma("unroll") for (int u = 0; u < U; ++u) {
            long long i = i0 + u * stride;
            if (i < nv) {
                Pack py;
                _Pragma("unroll") for (int k = 0; k < VEC; ++k) {
                    float v = ld(px[u].e[k]);
                    if (train) v = urand(s0, s1, (unsigned long long)(i * VEC + k)) >= p ? v * scale : 0.f;
                    py.e[k] = st(v + ld(pr[u].e[k]));
                }
                ((Pack*)y)[i] = py;
            }
        })
}
extern "C" __global__ void __launch_bounds__(256, MINB) dropout_add_bwd(const T* __restrict__ dy, T* __restrict__ dx,
        long long nv, float p, float scale, unsigned int s0, unsigned int s1) {
    GRID_LOOP(
        Pack pd[U];
        _Pragma("unroll") for (int u = 0; u < U; ++u) { long long i = i0 + u * stride; if (i < nv) pd[u] = ((const Pack*)dy)[i]; },
        _Pragma("unroll") for (int u = 0; u < U; ++u) {
            long long i = i0 + u * stride;
            if (i < nv) {
                Pack po;
                _Pragma("unroll") for (int k = 0; k < VEC; ++k)
                    po.e[k] = st(urand(s0, s1, (unsigned long long)(i * VEC + k)) >= p ? ld(pd[u].e[k]) * scale : 0.f);
                ((Pack*)dx)[i] = po;
            }
        })
}
"""

ROWS = r"""
#define FOR_CHUNKS for (int c = 0; c < NV; ++c)
#define IDX(c) (((c) * THREADS + (int)threadIdx.x) * VEC)

extern "C" __global__ void __launch_bounds__(THREADS) add_ln_fwd(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w, const T* __restrict__ beta, T* __restrict__ y, T* __restrict__ s,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows, int cols, float eps,
                                      int has_b, int has_w, int has_beta, int write_sum) {
    __shared__ float red[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        long long base = (long long)row * cols;
        float v[NV][VEC];
        float sum = 0.f;
        #pragma unroll
        FOR_CHUNKS {
            int idx = IDX(c);
            if (idx < cols) {
                Pack pa = *(const Pack*)(a + base + idx), pb;
                if (has_b) pb = *(const Pack*)(b + base + idx);
                #pragma unroll
                for (int k = 0; k < VEC; ++k) { v[c][k] = ld(pa.e[k]) + (has_b ? ld(pb.e[k]) : 0.f); sum += v[c][k]; }
                if (write_sum) {
                    Pack ps;
                    #pragma unroll
                    for (int k = 0; k < VEC; ++k) ps.e[k] = st(v[c][k]);
                    *(Pack*)(s + base + idx) = ps;
                }
            } else {
                #pragma unroll
                for (int k = 0; k < VEC; ++k) v[c][k] = 0.f;
            }
        }
        float mean = block_sum(sum, red) / cols;
        float sq = 0.f;
        #pragma unroll
        FOR_CHUNKS {
            if (IDX(c) < cols) {
                #pragma unroll
                for (int k = 0; k < VEC; ++k) { float d = v[c][k] - mean; sq += d * d; }
            }
        }
        float rstd = rsqrtf(block_sum(sq, red) / cols + eps);
        #pragma unroll
        FOR_CHUNKS {
            int idx = IDX(c);
            if (idx < cols) {
                Pack pw, pbeta, py;
                if (has_w) pw = *(const Pack*)(w + idx);
                if (has_beta) pbeta = *(const Pack*)(beta + idx);
                #pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    float o = (v[c][k] - mean) * rstd;
                    if (has_w) o *= ld(pw.e[k]);
                    if (has_beta) o += ld(pbeta.e[k]);
                    py.e[k] = st(o);
                }
                *(Pack*)(y + base + idx) = py;
            }
        }
        if (threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ ds), g = dy * w; per-block partial sums
// of dy * xhat and dy (weight and bias gradients) stay in registers across the block's rows.
extern "C" __global__ void __launch_bounds__(THREADS) add_ln_bwd(const T* __restrict__ dy, const T* __restrict__ ds, const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w,
                                      const float* __restrict__ mean_in, const float* __restrict__ rstd_in, T* __restrict__ dx,
                                      float* __restrict__ dw_part, float* __restrict__ db_part, int rows, int cols,
                                      int has_b, int has_w, int has_ds) {
    __shared__ float red[32];
    float accw[NV][VEC], accb[NV][VEC];
    #pragma unroll
    FOR_CHUNKS {
        #pragma unroll
        for (int k = 0; k < VEC; ++k) { accw[c][k] = 0.f; accb[c][k] = 0.f; }
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        long long base = (long long)row * cols;
        float mean = mean_in[row], rstd = rstd_in[row];
        float xh[NV][VEC], g[NV][VEC];
        float s1 = 0.f, s2 = 0.f;
        #pragma unroll
        FOR_CHUNKS {
            int idx = IDX(c);
            if (idx < cols) {
                Pack pa = *(const Pack*)(a + base + idx), pb, pd = *(const Pack*)(dy + base + idx), pw;
                if (has_b) pb = *(const Pack*)(b + base + idx);
                if (has_w) pw = *(const Pack*)(w + idx);
                #pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    float x = (ld(pa.e[k]) + (has_b ? ld(pb.e[k]) : 0.f) - mean) * rstd;
                    float d = ld(pd.e[k]);
                    xh[c][k] = x;
                    g[c][k] = has_w ? d * ld(pw.e[k]) : d;
                    accw[c][k] += d * x;
                    accb[c][k] += d;
                    s1 += g[c][k];
                    s2 += g[c][k] * x;
                }
            }
        }
        s1 = block_sum(s1, red) / cols;
        s2 = block_sum(s2, red) / cols;
        #pragma unroll
        FOR_CHUNKS {
            int idx = IDX(c);
            if (idx < cols) {
                Pack po, pds;
                if (has_ds) pds = *(const Pack*)(ds + base + idx);
                #pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    float o = rstd * (g[c][k] - s1 - xh[c][k] * s2);
                    if (has_ds) o += ld(pds.e[k]);
                    po.e[k] = st(o);
                }
                *(Pack*)(dx + base + idx) = po;
            }
        }
    }
    #pragma unroll
    FOR_CHUNKS {
        int idx = IDX(c);
        if (idx < cols) {
            #pragma unroll
            for (int k = 0; k < VEC; ++k) {
                dw_part[(long long)blockIdx.x * cols + idx + k] = accw[c][k];
                db_part[(long long)blockIdx.x * cols + idx + k] = accb[c][k];
            }
        }
    }
}

// mask_kind 0: none, 1: additive mask (dtype T), 2: boolean mask filled with fill_value.
// The mask is addressed through up to 4 leading-dim strides, so a broadcast mask is never copied.
extern "C" __global__ void __launch_bounds__(THREADS) softmax_fwd(const T* __restrict__ x, const void* mask, T* __restrict__ y, int rows, int cols,
                                       float scale, int divide, int mask_kind, float fill_value,
                                       int l1, int l2, int l3, long long m0, long long m1, long long m2, long long m3) {
    __shared__ float red[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        long long base = (long long)row * cols;
        int r = row;
        int i3 = r %% l3; r /= l3; int i2 = r %% l2; r /= l2; int i1 = r %% l1; int i0 = r / l1;
        long long mbase = i0 * m0 + i1 * m1 + i2 * m2 + i3 * m3;
        float v[NV][VEC];
        float mx = NEG_INF;
        #pragma unroll
        FOR_CHUNKS {
            int idx = IDX(c);
            if (idx < cols) {
                Pack px = *(const Pack*)(x + base + idx);
                #pragma unroll
                for (int k = 0; k < VEC; ++k) v[c][k] = divide ? ld(px.e[k]) / scale : ld(px.e[k]) * scale;
                if (mask_kind == 1) {
                    Pack pm = *(const Pack*)((const T*)mask + mbase + idx);
                    #pragma unroll
                    for (int k = 0; k < VEC; ++k) v[c][k] += ld(pm.e[k]);
                } else if (mask_kind == 2) {
                    BPack pm = *(const BPack*)((const unsigned char*)mask + mbase + idx);
                    #pragma unroll
                    for (int k = 0; k < VEC; ++k) if (pm.e[k]) v[c][k] = fill_value;
                }
                #pragma unroll
                for (int k = 0; k < VEC; ++k) mx = fmaxf(mx, v[c][k]);
            } else {
                #pragma unroll
                for (int k = 0; k < VEC; ++k) v[c][k] = NEG_INF;
            }
        }
        mx = block_max(mx, red);
        float sum = 0.f;
        #pragma unroll
        FOR_CHUNKS {
            #pragma unroll
            for (int k = 0; k < VEC; ++k) { float e = IDX(c) < cols ? __expf(v[c][k] - mx) : 0.f; v[c][k] = e; sum += e; }
        }
        float inv = 1.f / block_sum(sum, red);
        #pragma unroll
        FOR_CHUNKS {
            int idx = IDX(c);
            if (idx < cols) {
                Pack py;
                #pragma unroll
                for (int k = 0; k < VEC; ++k) py.e[k] = st(v[c][k] * inv);
                *(Pack*)(y + base + idx) = py;
            }
        }
    }
}

// dx = scale * y * (dy - sum(dy * y))
extern "C" __global__ void __launch_bounds__(THREADS) softmax_bwd(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int rows, int cols, float scale, int divide) {
    __shared__ float red[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        long long base = (long long)row * cols;
        float yy[NV][VEC], dd[NV][VEC];
        float dot = 0.f;
        #pragma unroll
        FOR_CHUNKS {
            int idx = IDX(c);
            if (idx < cols) {
                Pack py = *(const Pack*)(y + base + idx), pd = *(const Pack*)(dy + base + idx);
                #pragma unroll
                for (int k = 0; k < VEC; ++k) { yy[c][k] = ld(py.e[k]); dd[c][k] = ld(pd.e[k]); dot += yy[c][k] * dd[c][k]; }
            }
        }
        dot = block_sum(dot, red);
        #pragma unroll
        FOR_CHUNKS {
            int idx = IDX(c);
            if (idx < cols) {
                Pack po;
                #pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    float o = yy[c][k] * (dd[c][k] - dot);
                    po.e[k] = st(divide ? o / scale : o * scale);
                }
                *(Pack*)(dx + base + idx) = po;
            }
        }
    }
}
"""
