// WKV7 ("x070") forward and backward kernels, bf16 inputs, fp32 state.
//
// Per (batch b, head h) the state S is N x N (row i = value channel, column j =
// key channel), S_0 = 0 (or a given initial state, forward only), and for every step t
//
//   sa_t[i]  = sum_m S_{t-1}[i,m] a_t[m]
//   S_t[i,j] = S_{t-1}[i,j] d_t[j] + sa_t[i] b_t[j] + v_t[i] k_t[j]
//   y_t[i]   = sum_j S_t[i,j] r_t[j]
//
// with the decay d = exp(-exp(w)), w given in bf16 (the model passes
// w = -softplus(-w_raw) - 0.5 <= -0.5, so d >= exp(-exp(-0.5)) ~ 0.545).
// All six inputs are (B, T, H, N) = (B, T, C) contiguous bf16; T % CHUNK == 0.
//
// Design (see docs in rwkvlm/ops/wkv7/cuda.py for the user-facing contract):
//
// * Every row of S evolves independently of the other rows once the per-step
//   vectors d, k, a, b, r are known, so a head's N rows can be split across
//   several blocks (load balance: B*H is often ~1.5x the SM count) and within a
//   block a row is split across G = N/CPT adjacent lanes (dot products reduced
//   with G-lane xor shuffles).  A thread owns RPT rows x CPT columns of S in
//   registers, its columns being float4 groups (cg + G*q), so the lanes of a
//   row group read adjacent 16-byte words of the shared per-step vectors.
// * Per chunk of CHUNK steps the block stages w, k, a, b, r (all N columns)
//   and v (its rows) with cp.async into a double-buffered raw bf16 area (the
//   next chunk loads while this one computes), then converts them once to fp32
//   (decay computed here) so the inner loop is loads + FMAs only.
// * Forward stores sa_t (fp32, (B,T,H,N)) and, at every chunk end, S in
//   transposed layout (B, H, T/CHUNK, N[j], N[i]) fp32.  For inference it can
//   start from a given state and write the final one, both (B, H, N[i], N[j])
//   fp32 (the training op passes neither: the backward assumes S_0 = 0).
// * Backward is two kernels, both free of cross-row sums:
//     rows pass (wkv7_bwd_rows): dS rows go back in time without needing S:
//        dS_t = carry + dy_t[i] r_t ; dv_t[i] = dS_t.k_t ; dsa_t[i] = dS_t.b_t ;
//        carry = dS_t * d_t + dsa_t[i] a_t
//      writes dv (bf16) and dsa (fp32 scratch).
//     columns pass (wkv7_bwd_cols): a thread owns one column j (CR rows of it)
//      of S and dS; S is rebuilt backwards inside each chunk from the stored
//      chunk-end state, S_{t-1} = (S_t - sa_t b_t - v_t k_t) / d_t, and the
//      column sums give dr, dw, dk, db, da directly:
//        dr_t[j] = sum_i dy_t[i] S_t[i,j]      dk_t[j] = sum_i dS_t[i,j] v_t[i]
//        db_t[j] = sum_i dS_t[i,j] sa_t[i]     dd_t[j] = sum_i dS_t[i,j] S_{t-1}[i,j]
//        da_t[j] = sum_i dsa_t[i] S_{t-1}[i,j] dw = dd * (-exp(w) d)
//      (rows of a column split over RH lanes of a warp, xor-shuffle reduced).
//
// Written from the recurrence above; no code taken from other projects.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>

#ifndef WKV7_CHUNK
#define WKV7_CHUNK 16
#endif
#ifndef WKV7_HEAD_SIZE
#define WKV7_HEAD_SIZE 64
#endif

namespace wkv7 {

constexpr int CL = WKV7_CHUNK;
static_assert(CL >= 1 && CL <= 64, "chunk length");

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------- helpers
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int n>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory"); }

__device__ __forceinline__ float bf_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }

// unpack 8 bf16 (one 16-byte word) to 8 floats
__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
    f[0] = bf_lo(u.x); f[1] = bf_hi(u.x); f[2] = bf_lo(u.y); f[3] = bf_hi(u.y);
    f[4] = bf_lo(u.z); f[5] = bf_hi(u.z); f[6] = bf_lo(u.w); f[7] = bf_hi(u.w);
}

// decay from w (fast-math exp; the same value is used in forward and backward)
__device__ __forceinline__ float decay_of(float w) { return __expf(-__expf(w)); }

// ------------------------------------------------- row kernels (fwd, bwd rows)
// Shared-memory layout for the two row kernels.
//   raw[2]: double-buffered bf16 staging: 5 x [CL][N] (order X0..X4) + [CL][RB]
//   f:      fp32 [5][CL][N]
template <int N, int RB>
struct RowSmem {
    bf16 raw5[2][5][CL][N];
    bf16 rawv[2][CL][RB];
    float f[5][CL][N];
};

// Issue the cp.async loads of one chunk for the row kernels.
// x0..x4: the five full-width inputs, vv: the per-row input (v or dy).
template <int N, int RB, int NT>
__device__ __forceinline__ void row_stage(RowSmem<N, RB>& sm, int buf, const bf16* __restrict__ x0,
                                          const bf16* __restrict__ x1, const bf16* __restrict__ x2,
                                          const bf16* __restrict__ x3, const bf16* __restrict__ x4,
                                          const bf16* __restrict__ vv, int64_t base, int64_t C, int t0,
                                          int row0, int tid) {
    constexpr int UPT = N / 8;           // 16-byte units per time step per tensor
    constexpr int U = CL * UPT;          // units per tensor
#pragma unroll
    for (int x = 0; x < 5; x++) {
        const bf16* src = x == 0 ? x0 : x == 1 ? x1 : x == 2 ? x2 : x == 3 ? x3 : x4;
        for (int u = tid; u < U; u += NT) {
            int tt = u / UPT, n = (u % UPT) * 8;
            cp_async16(&sm.raw5[buf][x][tt][n], src + base + (int64_t)(t0 + tt) * C + n);
        }
    }
    constexpr int UV = CL * (RB / 8);
    for (int u = tid; u < UV; u += NT) {
        int tt = u / (RB / 8), n = (u % (RB / 8)) * 8;
        cp_async16(&sm.rawv[buf][tt][n], vv + base + (int64_t)(t0 + tt) * C + row0 + n);
    }
}

// Convert the staged chunk to fp32; tensor DX gets the decay transform.
template <int N, int RB, int NT, int DX>
__device__ __forceinline__ void row_prep(RowSmem<N, RB>& sm, int buf, int tid) {
    constexpr int UPT = N / 8;
    constexpr int U = CL * UPT;
#pragma unroll
    for (int x = 0; x < 5; x++) {
        for (int u = tid; u < U; u += NT) {
            int tt = u / UPT, n = (u % UPT) * 8;
            uint4 raw = *reinterpret_cast<const uint4*>(&sm.raw5[buf][x][tt][n]);
            float f[8];
            unpack8(raw, f);
            if (x == DX) {
#pragma unroll
                for (int e = 0; e < 8; e++) f[e] = decay_of(f[e]);
            }
            float4* dst = reinterpret_cast<float4*>(&sm.f[x][tt][n]);
            dst[0] = make_float4(f[0], f[1], f[2], f[3]);
            dst[1] = make_float4(f[4], f[5], f[6], f[7]);
        }
    }
}

template <int G>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int o = 1; o < G; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <int RPT>
__device__ __forceinline__ void load_rowvals(const bf16* p, float* out) {
    if constexpr (RPT % 2 == 0) {
#pragma unroll
        for (int r = 0; r < RPT; r += 2) {
            uint32_t u = *reinterpret_cast<const uint32_t*>(p + r);
            out[r] = bf_lo(u);
            out[r + 1] = bf_hi(u);
        }
    } else {
#pragma unroll
        for (int r = 0; r < RPT; r++) out[r] = bf2f(p[r]);
    }
}

// Forward.  Grid: B*H*(N/RB) blocks of NT = (RB/RPT)*(N/CPT) threads.
// Inputs in (B,T,H,N); y (bf16) and sa (fp32) out in (B,T,H,N);
// sT (fp32, (B,H,T/CL,N,N) transposed) written when non-null.
template <int N, int RB, int RPT, int CPT>
__global__ void __launch_bounds__((RB / RPT) * (N / CPT))
    wkv7_fwd(int T, int H, const bf16* __restrict__ r, const bf16* __restrict__ w, const bf16* __restrict__ k,
             const bf16* __restrict__ v, const bf16* __restrict__ a, const bf16* __restrict__ b,
             bf16* __restrict__ y, float* __restrict__ sa_out, float* __restrict__ sT,
             const float* __restrict__ s0, float* __restrict__ s_out) {
    constexpr int G = N / CPT;
    constexpr int NT = (RB / RPT) * G;
    constexpr int Q = CPT / 4;
    static_assert(CPT % 4 == 0 && N % CPT == 0 && RB % RPT == 0 && RB % 8 == 0 && N % RB == 0, "shape");
    static_assert(NT % 32 == 0 && G <= 32, "block");
    __shared__ __align__(16) RowSmem<N, RB> sm;

    const int tid = threadIdx.x;
    const int nrb = N / RB;
    const int bh = blockIdx.x / nrb, rb = blockIdx.x % nrb;
    const int bb = bh / H, hh = bh % H;
    const int64_t C = (int64_t)H * N;
    const int64_t base = (int64_t)bb * T * C + (int64_t)hh * N;
    const int row0 = rb * RB;
    const int cg = tid % G, rg = tid / G;
    const int rloc = rg * RPT;           // first local row of this thread
    const int nc = T / CL;

    // S starts from s0 ((B, H, N[i], N[j]) fp32) when given, else from zero
    float s[RPT][CPT];
#pragma unroll
    for (int i = 0; i < RPT; i++)
#pragma unroll
        for (int q = 0; q < Q; q++) {
            float4 v0 = make_float4(0.f, 0.f, 0.f, 0.f);
            if (s0 != nullptr)
                v0 = *reinterpret_cast<const float4*>(s0 + ((int64_t)bh * N + row0 + rloc + i) * N + (cg + G * q) * 4);
            s[i][4 * q + 0] = v0.x; s[i][4 * q + 1] = v0.y; s[i][4 * q + 2] = v0.z; s[i][4 * q + 3] = v0.w;
        }

    // raw order: 0 w, 1 k, 2 a, 3 b, 4 r ; f order identical with f[0] = decay
    row_stage<N, RB, NT>(sm, 0, w, k, a, b, r, v, base, C, 0, row0, tid);
    cp_async_commit();

    for (int c = 0; c < nc; c++) {
        const int buf = c & 1;
        if (c + 1 < nc) {
            row_stage<N, RB, NT>(sm, buf ^ 1, w, k, a, b, r, v, base, C, (c + 1) * CL, row0, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        row_prep<N, RB, NT, 0>(sm, buf, tid);
        __syncthreads();

#pragma unroll 4
        for (int tt = 0; tt < CL; tt++) {
            const int64_t off = base + (int64_t)(c * CL + tt) * C + row0 + rloc;
            float vr[RPT];
            load_rowvals<RPT>(&sm.rawv[buf][tt][rloc], vr);
            // sa = S_{t-1} a
            float sav[RPT];
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    float4 av = *reinterpret_cast<const float4*>(&sm.f[2][tt][(cg + G * q) * 4]);
                    float& acc = (q & 1) ? acc1 : acc0;
                    acc = fmaf(s[i][4 * q + 0], av.x, acc);
                    acc = fmaf(s[i][4 * q + 1], av.y, acc);
                    acc = fmaf(s[i][4 * q + 2], av.z, acc);
                    acc = fmaf(s[i][4 * q + 3], av.w, acc);
                }
                sav[i] = acc0 + acc1;
            }
#pragma unroll
            for (int i = 0; i < RPT; i++) sav[i] = group_sum<G>(sav[i]);
            // S_t = S_{t-1} d + sa b + v k ; y = S_t r
            float yv[RPT];
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    const int col = (cg + G * q) * 4;
                    float4 dv = *reinterpret_cast<const float4*>(&sm.f[0][tt][col]);
                    float4 kv = *reinterpret_cast<const float4*>(&sm.f[1][tt][col]);
                    float4 bv = *reinterpret_cast<const float4*>(&sm.f[3][tt][col]);
                    float4 rv = *reinterpret_cast<const float4*>(&sm.f[4][tt][col]);
                    float* sp = &s[i][4 * q];
                    sp[0] = fmaf(sp[0], dv.x, fmaf(sav[i], bv.x, vr[i] * kv.x));
                    sp[1] = fmaf(sp[1], dv.y, fmaf(sav[i], bv.y, vr[i] * kv.y));
                    sp[2] = fmaf(sp[2], dv.z, fmaf(sav[i], bv.z, vr[i] * kv.z));
                    sp[3] = fmaf(sp[3], dv.w, fmaf(sav[i], bv.w, vr[i] * kv.w));
                    float& acc = (q & 1) ? acc1 : acc0;
                    acc = fmaf(sp[0], rv.x, acc);
                    acc = fmaf(sp[1], rv.y, acc);
                    acc = fmaf(sp[2], rv.z, acc);
                    acc = fmaf(sp[3], rv.w, acc);
                }
                yv[i] = acc0 + acc1;
            }
#pragma unroll
            for (int i = 0; i < RPT; i++) yv[i] = group_sum<G>(yv[i]);
            // the G lanes of the group share the 2*RPT stores
#pragma unroll
            for (int e = 0; e < 2 * RPT; e++) {
                if (e % G == cg) {
                    if (e < RPT) y[off + e] = f2bf(yv[e]);
                    else sa_out[off + (e - RPT)] = sav[e - RPT];
                }
            }
        }
        if (sT != nullptr) {
            // transposed chunk-end state: sT[bh][c][j][i]
            float* dst = sT + ((int64_t)bh * nc + c) * N * N + row0 + rloc;
#pragma unroll
            for (int q = 0; q < Q; q++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = (cg + G * q) * 4 + e;
                    if constexpr (RPT % 4 == 0) {
#pragma unroll
                        for (int i = 0; i < RPT; i += 4)
                            *reinterpret_cast<float4*>(dst + (int64_t)j * N + i) =
                                make_float4(s[i][4 * q + e], s[i + 1][4 * q + e], s[i + 2][4 * q + e],
                                            s[i + 3][4 * q + e]);
                    } else if constexpr (RPT % 2 == 0) {
#pragma unroll
                        for (int i = 0; i < RPT; i += 2)
                            *reinterpret_cast<float2*>(dst + (int64_t)j * N + i) =
                                make_float2(s[i][4 * q + e], s[i + 1][4 * q + e]);
                    } else {
#pragma unroll
                        for (int i = 0; i < RPT; i++) dst[(int64_t)j * N + i] = s[i][4 * q + e];
                    }
                }
            }
        }
        __syncthreads();   // buffers of this chunk are free for the next stage/prep
    }
    if (s_out != nullptr) {   // the final state, in s0's (B, H, N[i], N[j]) layout
#pragma unroll
        for (int i = 0; i < RPT; i++)
#pragma unroll
            for (int q = 0; q < Q; q++)
                *reinterpret_cast<float4*>(s_out + ((int64_t)bh * N + row0 + rloc + i) * N + (cg + G * q) * 4) =
                    make_float4(s[i][4 * q + 0], s[i][4 * q + 1], s[i][4 * q + 2], s[i][4 * q + 3]);
    }
}

// Backward, rows pass.  Same grid/blocks as the forward.
// Produces dv (bf16) and dsa (fp32, (B,T,H,N)).
template <int N, int RB, int RPT, int CPT>
__global__ void __launch_bounds__((RB / RPT) * (N / CPT))
    wkv7_bwd_rows(int T, int H, const bf16* __restrict__ r, const bf16* __restrict__ w,
                  const bf16* __restrict__ k, const bf16* __restrict__ a, const bf16* __restrict__ b,
                  const bf16* __restrict__ dy, bf16* __restrict__ dv, float* __restrict__ dsa_out) {
    constexpr int G = N / CPT;
    constexpr int NT = (RB / RPT) * G;
    constexpr int Q = CPT / 4;
    static_assert(CPT % 4 == 0 && N % CPT == 0 && RB % RPT == 0 && RB % 8 == 0 && N % RB == 0, "shape");
    static_assert(NT % 32 == 0 && G <= 32, "block");
    __shared__ __align__(16) RowSmem<N, RB> sm;

    const int tid = threadIdx.x;
    const int nrb = N / RB;
    const int bh = blockIdx.x / nrb, rb = blockIdx.x % nrb;
    const int bb = bh / H, hh = bh % H;
    const int64_t C = (int64_t)H * N;
    const int64_t base = (int64_t)bb * T * C + (int64_t)hh * N;
    const int row0 = rb * RB;
    const int cg = tid % G, rg = tid / G;
    const int rloc = rg * RPT;
    const int nc = T / CL;

    float ds[RPT][CPT];
#pragma unroll
    for (int i = 0; i < RPT; i++)
#pragma unroll
        for (int j = 0; j < CPT; j++) ds[i][j] = 0.f;

    // raw order: 0 w, 1 k, 2 a, 3 b, 4 r (same as the forward); f[0] = decay
    row_stage<N, RB, NT>(sm, (nc - 1) & 1, w, k, a, b, r, dy, base, C, (nc - 1) * CL, row0, tid);
    cp_async_commit();

    for (int c = nc - 1; c >= 0; c--) {
        const int buf = c & 1;
        if (c > 0) {
            row_stage<N, RB, NT>(sm, buf ^ 1, w, k, a, b, r, dy, base, C, (c - 1) * CL, row0, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        row_prep<N, RB, NT, 0>(sm, buf, tid);
        __syncthreads();

#pragma unroll 4
        for (int tt = CL - 1; tt >= 0; tt--) {
            const int64_t off = base + (int64_t)(c * CL + tt) * C + row0 + rloc;
            float dyr[RPT];
            load_rowvals<RPT>(&sm.rawv[buf][tt][rloc], dyr);
            float dsav[RPT], dvv[RPT];
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                float ab0 = 0.f, ab1 = 0.f, ak0 = 0.f, ak1 = 0.f;
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    const int col = (cg + G * q) * 4;
                    float4 rv = *reinterpret_cast<const float4*>(&sm.f[4][tt][col]);
                    float4 bv = *reinterpret_cast<const float4*>(&sm.f[3][tt][col]);
                    float4 kv = *reinterpret_cast<const float4*>(&sm.f[1][tt][col]);
                    float* p = &ds[i][4 * q];
                    p[0] = fmaf(dyr[i], rv.x, p[0]);
                    p[1] = fmaf(dyr[i], rv.y, p[1]);
                    p[2] = fmaf(dyr[i], rv.z, p[2]);
                    p[3] = fmaf(dyr[i], rv.w, p[3]);
                    float& ab = (q & 1) ? ab1 : ab0;
                    float& ak = (q & 1) ? ak1 : ak0;
                    ab = fmaf(p[0], bv.x, ab); ak = fmaf(p[0], kv.x, ak);
                    ab = fmaf(p[1], bv.y, ab); ak = fmaf(p[1], kv.y, ak);
                    ab = fmaf(p[2], bv.z, ab); ak = fmaf(p[2], kv.z, ak);
                    ab = fmaf(p[3], bv.w, ab); ak = fmaf(p[3], kv.w, ak);
                }
                dsav[i] = ab0 + ab1;
                dvv[i] = ak0 + ak1;
            }
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                dsav[i] = group_sum<G>(dsav[i]);
                dvv[i] = group_sum<G>(dvv[i]);
            }
#pragma unroll
            for (int i = 0; i < RPT; i++) {
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    const int col = (cg + G * q) * 4;
                    float4 dd = *reinterpret_cast<const float4*>(&sm.f[0][tt][col]);
                    float4 av = *reinterpret_cast<const float4*>(&sm.f[2][tt][col]);
                    float* p = &ds[i][4 * q];
                    p[0] = fmaf(p[0], dd.x, dsav[i] * av.x);
                    p[1] = fmaf(p[1], dd.y, dsav[i] * av.y);
                    p[2] = fmaf(p[2], dd.z, dsav[i] * av.z);
                    p[3] = fmaf(p[3], dd.w, dsav[i] * av.w);
                }
            }
#pragma unroll
            for (int e = 0; e < 2 * RPT; e++) {
                if (e % G == cg) {
                    if (e < RPT) dv[off + e] = f2bf(dvv[e]);
                    else dsa_out[off + (e - RPT)] = dsav[e - RPT];
                }
            }
        }
        __syncthreads();
    }
}

// ------------------------------------------------------ columns kernel (bwd)
// Block: CB columns of one head, all N rows; a warp holds CPW = 32/RH columns
// x RH row parts of CR = N/RH rows.  NT = CB*RH threads.
template <int N, int CB, int RH>
struct ColSmem {
    static constexpr int CR = N / RH;
    static constexpr int PS = CR + 4;   // padded part stride (floats)
    bf16 rdy[2][CL][N];
    bf16 rv[2][CL][N];
    float sa[2][CL][RH][PS];
    float dsa[2][CL][RH][PS];
    bf16 col[2][5][CL][CB];             // r, w, k, b, a
    float fdy[CL][RH][PS];
    float fv[CL][RH][PS];
    float fcol[7][CL][CB];              // r, k, b, a, d, 1/d, -d*exp(w)
};

template <int N, int CB, int RH, int NT>
__device__ __forceinline__ void col_stage(ColSmem<N, CB, RH>& sm, int buf, const bf16* __restrict__ r,
                                          const bf16* __restrict__ w, const bf16* __restrict__ k,
                                          const bf16* __restrict__ b, const bf16* __restrict__ a,
                                          const bf16* __restrict__ dy, const bf16* __restrict__ v,
                                          const float* __restrict__ sa, const float* __restrict__ dsa,
                                          int64_t base, int64_t C, int t0, int col0, int tid) {
    using S = ColSmem<N, CB, RH>;
    {   // dy, v: full rows, bf16
        constexpr int UPT = N / 8, U = CL * UPT;
        for (int u = tid; u < U; u += NT) {
            int tt = u / UPT, n = (u % UPT) * 8;
            int64_t g = base + (int64_t)(t0 + tt) * C + n;
            cp_async16(&sm.rdy[buf][tt][n], dy + g);
            cp_async16(&sm.rv[buf][tt][n], v + g);
        }
    }
    {   // sa, dsa: fp32 into the padded part layout
        constexpr int UPT = N / 4, U = CL * UPT;
        for (int u = tid; u < U; u += NT) {
            int tt = u / UPT, n = (u % UPT) * 4;
            int p = n / S::CR, m = n % S::CR;
            int64_t g = base + (int64_t)(t0 + tt) * C + n;
            cp_async16(&sm.sa[buf][tt][p][m], sa + g);
            cp_async16(&sm.dsa[buf][tt][p][m], dsa + g);
        }
    }
    {   // r, w, k, b, a: this block's CB columns
        constexpr int UPT = CB / 8, U = CL * UPT;
#pragma unroll
        for (int x = 0; x < 5; x++) {
            const bf16* src = x == 0 ? r : x == 1 ? w : x == 2 ? k : x == 3 ? b : a;
            for (int u = tid; u < U; u += NT) {
                int tt = u / UPT, n = (u % UPT) * 8;
                cp_async16(&sm.col[buf][x][tt][n], src + base + (int64_t)(t0 + tt) * C + col0 + n);
            }
        }
    }
}

template <int N, int CB, int RH, int NT>
__device__ __forceinline__ void col_prep(ColSmem<N, CB, RH>& sm, int buf, int tid) {
    using S = ColSmem<N, CB, RH>;
    {
        constexpr int UPT = N / 8, U = CL * UPT;
        for (int u = tid; u < U; u += NT) {
            int tt = u / UPT, n = (u % UPT) * 8;
            int p = n / S::CR, m = n % S::CR;   // CR % 8 == 0: a unit never straddles parts
            float f[8];
            unpack8(*reinterpret_cast<const uint4*>(&sm.rdy[buf][tt][n]), f);
            float4* d0 = reinterpret_cast<float4*>(&sm.fdy[tt][p][m]);
            d0[0] = make_float4(f[0], f[1], f[2], f[3]);
            d0[1] = make_float4(f[4], f[5], f[6], f[7]);
            unpack8(*reinterpret_cast<const uint4*>(&sm.rv[buf][tt][n]), f);
            float4* d1 = reinterpret_cast<float4*>(&sm.fv[tt][p][m]);
            d1[0] = make_float4(f[0], f[1], f[2], f[3]);
            d1[1] = make_float4(f[4], f[5], f[6], f[7]);
        }
    }
    for (int e = tid; e < CL * CB; e += NT) {
        int tt = e / CB, j = e % CB;
        float rr = bf2f(sm.col[buf][0][tt][j]);
        float ww = bf2f(sm.col[buf][1][tt][j]);
        float kk = bf2f(sm.col[buf][2][tt][j]);
        float bb = bf2f(sm.col[buf][3][tt][j]);
        float aa = bf2f(sm.col[buf][4][tt][j]);
        float ew = __expf(ww);
        float d = __expf(-ew);
        sm.fcol[0][tt][j] = rr;
        sm.fcol[1][tt][j] = kk;
        sm.fcol[2][tt][j] = bb;
        sm.fcol[3][tt][j] = aa;
        sm.fcol[4][tt][j] = d;
        sm.fcol[5][tt][j] = 1.0f / d;
        sm.fcol[6][tt][j] = -d * ew;
    }
}

// Grid: B*H*(N/CB) blocks of (CB/CPT2)*RH threads; dynamic shared memory sizeof(ColSmem).
// A thread owns CPT2 adjacent columns (CR rows each): the per-step row vectors
// it loads from shared memory serve CPT2 columns.
template <int N, int CB, int RH, int CPT2>
__global__ void __launch_bounds__((CB / CPT2) * RH)
    wkv7_bwd_cols(int T, int H, const bf16* __restrict__ r, const bf16* __restrict__ w,
                  const bf16* __restrict__ k, const bf16* __restrict__ v, const bf16* __restrict__ a,
                  const bf16* __restrict__ b, const bf16* __restrict__ dy, const float* __restrict__ sT,
                  const float* __restrict__ sa, const float* __restrict__ dsa, bf16* __restrict__ dr,
                  bf16* __restrict__ dw, bf16* __restrict__ dk, bf16* __restrict__ da, bf16* __restrict__ db) {
    using S = ColSmem<N, CB, RH>;
    constexpr int CR = S::CR;
    constexpr int CPW = 32 / RH;               // lanes per part in a warp
    constexpr int NT = (CB / CPT2) * RH;
    static_assert(CPT2 == 1 || CPT2 == 2, "columns per thread");
    static_assert(32 % RH == 0 && (CB / CPT2) % CPW == 0 && CB % 8 == 0 && N % CB == 0 && CR % 8 == 0, "shape");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    S& sm = *reinterpret_cast<S*>(smem_raw);

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int part = lane / CPW;
    const int cl = (warp * CPW + lane % CPW) * CPT2;   // first local column
    const int ncb = N / CB;
    const int bh = blockIdx.x / ncb, cbk = blockIdx.x % ncb;
    const int bb = bh / H, hh = bh % H;
    const int64_t C = (int64_t)H * N;
    const int64_t base = (int64_t)bb * T * C + (int64_t)hh * N;
    const int col0 = cbk * CB;
    const int j = col0 + cl;
    const int nc = T / CL;

    float s[CPT2][CR], ds[CPT2][CR], pre[CPT2][CR];
#pragma unroll
    for (int cc = 0; cc < CPT2; cc++)
#pragma unroll
        for (int m = 0; m < CR; m++) ds[cc][m] = 0.f;

    // chunk-end state, transposed: sT[bh][c][j][part*CR + m]
    auto load_state = [&](int c) {
#pragma unroll
        for (int cc = 0; cc < CPT2; cc++) {
            const float4* src =
                reinterpret_cast<const float4*>(sT + (((int64_t)bh * nc + c) * N + j + cc) * N + part * CR);
#pragma unroll
            for (int m = 0; m < CR / 4; m++) {
                float4 x = __ldg(src + m);
                pre[cc][4 * m + 0] = x.x; pre[cc][4 * m + 1] = x.y;
                pre[cc][4 * m + 2] = x.z; pre[cc][4 * m + 3] = x.w;
            }
        }
    };
    load_state(nc - 1);
    col_stage<N, CB, RH, NT>(sm, (nc - 1) & 1, r, w, k, b, a, dy, v, sa, dsa, base, C, (nc - 1) * CL, col0, tid);
    cp_async_commit();

    for (int c = nc - 1; c >= 0; c--) {
        const int buf = c & 1;
#pragma unroll
        for (int cc = 0; cc < CPT2; cc++)
#pragma unroll
            for (int m = 0; m < CR; m++) s[cc][m] = pre[cc][m];
        if (c > 0) {
            load_state(c - 1);
            col_stage<N, CB, RH, NT>(sm, buf ^ 1, r, w, k, b, a, dy, v, sa, dsa, base, C, (c - 1) * CL, col0, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        col_prep<N, CB, RH, NT>(sm, buf, tid);
        __syncthreads();

#pragma unroll 2
        for (int tt = CL - 1; tt >= 0; tt--) {
            float rj[CPT2], kj[CPT2], bj[CPT2], aj[CPT2], dj[CPT2], ij[CPT2], wf[CPT2];
            auto ldc = [&](int x, float* dst) {
                if constexpr (CPT2 == 2) {
                    float2 t2 = *reinterpret_cast<const float2*>(&sm.fcol[x][tt][cl]);
                    dst[0] = t2.x; dst[1] = t2.y;
                } else {
                    dst[0] = sm.fcol[x][tt][cl];
                }
            };
            ldc(0, rj); ldc(1, kj); ldc(2, bj); ldc(3, aj); ldc(4, dj); ldc(5, ij); ldc(6, wf);
            float pdr[CPT2], pdk[CPT2], pdb[CPT2], pdd[CPT2], pda[CPT2];
#pragma unroll
            for (int cc = 0; cc < CPT2; cc++) pdr[cc] = pdk[cc] = pdb[cc] = pdd[cc] = pda[cc] = 0.f;
#pragma unroll
            for (int m4 = 0; m4 < CR / 4; m4++) {
                const float4 dy4 = *reinterpret_cast<const float4*>(&sm.fdy[tt][part][4 * m4]);
                const float4 v4 = *reinterpret_cast<const float4*>(&sm.fv[tt][part][4 * m4]);
                const float4 sa4 = *reinterpret_cast<const float4*>(&sm.sa[buf][tt][part][4 * m4]);
                const float4 dsa4 = *reinterpret_cast<const float4*>(&sm.dsa[buf][tt][part][4 * m4]);
                const float dyx[4] = {dy4.x, dy4.y, dy4.z, dy4.w};
                const float vx[4] = {v4.x, v4.y, v4.z, v4.w};
                const float sax[4] = {sa4.x, sa4.y, sa4.z, sa4.w};
                const float dsax[4] = {dsa4.x, dsa4.y, dsa4.z, dsa4.w};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int m = 4 * m4 + e;
#pragma unroll
                    for (int cc = 0; cc < CPT2; cc++) {
                        const float dsm = fmaf(dyx[e], rj[cc], ds[cc][m]);       // dS_t
                        pdr[cc] = fmaf(dyx[e], s[cc][m], pdr[cc]);                // uses S_t
                        pdk[cc] = fmaf(dsm, vx[e], pdk[cc]);
                        pdb[cc] = fmaf(dsm, sax[e], pdb[cc]);
                        const float sp = fmaf(-vx[e], kj[cc], fmaf(-sax[e], bj[cc], s[cc][m])) * ij[cc];  // S_{t-1}
                        pdd[cc] = fmaf(dsm, sp, pdd[cc]);
                        pda[cc] = fmaf(dsax[e], sp, pda[cc]);
                        s[cc][m] = sp;
                        ds[cc][m] = fmaf(dsm, dj[cc], dsax[e] * aj[cc]);
                    }
                }
            }
#pragma unroll
            for (int o = CPW; o < 32; o <<= 1) {
#pragma unroll
                for (int cc = 0; cc < CPT2; cc++) {
                    pdr[cc] += __shfl_xor_sync(0xffffffffu, pdr[cc], o);
                    pdk[cc] += __shfl_xor_sync(0xffffffffu, pdk[cc], o);
                    pdb[cc] += __shfl_xor_sync(0xffffffffu, pdb[cc], o);
                    pdd[cc] += __shfl_xor_sync(0xffffffffu, pdd[cc], o);
                    pda[cc] += __shfl_xor_sync(0xffffffffu, pda[cc], o);
                }
            }
            const int64_t off = base + (int64_t)(c * CL + tt) * C + j;
            auto st = [&](bf16* dst, const float* x, const float* f) {
                if constexpr (CPT2 == 2) {
                    __nv_bfloat162 h2;
                    h2.x = f2bf(x[0] * f[0]);
                    h2.y = f2bf(x[1] * f[1]);
                    *reinterpret_cast<__nv_bfloat162*>(dst + off) = h2;
                } else {
                    dst[off] = f2bf(x[0] * f[0]);
                }
            };
            const float one[2] = {1.f, 1.f};
            if (part == 0 % RH) st(dr, pdr, one);
            if (part == 1 % RH) st(dk, pdk, one);
            if (part == 2 % RH) st(db, pdb, one);
            if (part == 3 % RH) st(da, pda, one);
            if (part == 4 % RH) st(dw, pdd, wf);
        }
        __syncthreads();
    }
}

}  // namespace wkv7

// ------------------------------------------------------------ host launchers
// Configurations (timed on an H200, B16 T4096 H12: benchmarks/RESULTS.md, the 2026-11-28 01:19
// "WKV7 CUDA vs fla chunk_rwkv7" section).
// Row kernels (forward and backward rows pass share one id):
//   id : RB  RPT CPT  threads  blocks/head
//   0  : 32  1   16   128      2
//   1  : 64  1   16   256      1
//   2  : 32  2   16   64       2      <- default
//   3  : 32  2   8    128      2
//   4  : 64  1   64   64       1      (one thread per row, as the reference design)
//   5  : 16  1   16   64       4
//   6  : 32  4   8    64       2
//   7  : 16  2   16   32       4
//   8  : 64  4   16   64       1
//   9  : 32  4   16   32       2
//   10 : 64  2   16   128      1
// Column kernel (backward columns pass):
//   id : CB  RH  CPT2 threads  blocks/head
//   0  : 32  4   1    128      2      <- default
//   1  : 32  2   1    64       2
//   2  : 16  4   1    64       4
//   3  : 64  2   1    128      1
//   4  : 32  4   2    64       2
//   5  : 64  4   2    128      1
//   6  : 16  4   2    32       4
// WKV7_ALL_VARIANTS builds them all (benchmarks); otherwise only the defaults.
#ifndef WKV7_ROW_DEFAULT
#define WKV7_ROW_DEFAULT 2
#endif
#ifndef WKV7_COL_DEFAULT
#define WKV7_COL_DEFAULT 0
#endif

namespace {
using wkv7::bf16;
constexpr int N = WKV7_HEAD_SIZE;

template <int RB, int RPT, int CPT>
void launch_rows(bool fwd, int B, int T, int H, const bf16* r, const bf16* w, const bf16* k, const bf16* v,
                 const bf16* a, const bf16* b, bf16* y, float* sa, float* sT, const float* s0, float* s_out,
                 const bf16* dy, bf16* dv, float* dsa, cudaStream_t st) {
    constexpr int NT = (RB / RPT) * (N / CPT);
    dim3 grid(B * H * (N / RB));
    if (fwd) wkv7::wkv7_fwd<N, RB, RPT, CPT><<<grid, NT, 0, st>>>(T, H, r, w, k, v, a, b, y, sa, sT, s0, s_out);
    else wkv7::wkv7_bwd_rows<N, RB, RPT, CPT><<<grid, NT, 0, st>>>(T, H, r, w, k, a, b, dy, dv, dsa);
}

template <int CB, int RH, int CPT2>
cudaError_t launch_cols(int B, int T, int H, const bf16* r, const bf16* w, const bf16* k, const bf16* v,
                        const bf16* a, const bf16* b, const bf16* dy, const float* sT, const float* sa,
                        const float* dsa, bf16* dr, bf16* dw, bf16* dk, bf16* da, bf16* db, cudaStream_t st) {
    constexpr int NT = (CB / CPT2) * RH;
    const int smem = (int)sizeof(wkv7::ColSmem<N, CB, RH>);
    auto kern = wkv7::wkv7_bwd_cols<N, CB, RH, CPT2>;
    // idempotent and cheap; needed for > 48 KB of dynamic shared memory
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    dim3 grid(B * H * (N / CB));
    kern<<<grid, NT, smem, st>>>(T, H, r, w, k, v, a, b, dy, sT, sa, dsa, dr, dw, dk, da, db);
    return cudaSuccess;
}

bool rows_dispatch(int cfg, bool fwd, int B, int T, int H, const bf16* r, const bf16* w, const bf16* k,
                   const bf16* v, const bf16* a, const bf16* b, bf16* y, float* sa, float* sT, const float* s0,
                   float* s_out, const bf16* dy, bf16* dv, float* dsa, cudaStream_t st) {
#define WKV7_ROWS_CASE(ID, RB, RPT, CPT)                                                    \
    case ID:                                                                               \
        launch_rows<RB, RPT, CPT>(fwd, B, T, H, r, w, k, v, a, b, y, sa, sT, s0, s_out, dy, dv, dsa, st); \
        return true;
    switch (cfg) {
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 0
        WKV7_ROWS_CASE(0, 32, 1, 16)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 1
        WKV7_ROWS_CASE(1, 64, 1, 16)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 2
        WKV7_ROWS_CASE(2, 32, 2, 16)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 3
        WKV7_ROWS_CASE(3, 32, 2, 8)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 4
        WKV7_ROWS_CASE(4, 64, 1, 64)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 5
        WKV7_ROWS_CASE(5, 16, 1, 16)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 6
        WKV7_ROWS_CASE(6, 32, 4, 8)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 7
        WKV7_ROWS_CASE(7, 16, 2, 16)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 8
        WKV7_ROWS_CASE(8, 64, 4, 16)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 9
        WKV7_ROWS_CASE(9, 32, 4, 16)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_ROW_DEFAULT == 10
        WKV7_ROWS_CASE(10, 64, 2, 16)
#endif
        default: return false;
    }
#undef WKV7_ROWS_CASE
}

int cols_dispatch(int cfg, int B, int T, int H, const bf16* r, const bf16* w, const bf16* k, const bf16* v,
                  const bf16* a, const bf16* b, const bf16* dy, const float* sT, const float* sa, const float* dsa,
                  bf16* dr, bf16* dw, bf16* dk, bf16* da, bf16* db, cudaStream_t st) {
#define WKV7_COLS_CASE(ID, CB, RH, CPT2) \
    case ID:                             \
        return (int)launch_cols<CB, RH, CPT2>(B, T, H, r, w, k, v, a, b, dy, sT, sa, dsa, dr, dw, dk, da, db, st);
    switch (cfg) {
#if defined(WKV7_ALL_VARIANTS) || WKV7_COL_DEFAULT == 0
        WKV7_COLS_CASE(0, 32, 4, 1)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_COL_DEFAULT == 1
        WKV7_COLS_CASE(1, 32, 2, 1)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_COL_DEFAULT == 2
        WKV7_COLS_CASE(2, 16, 4, 1)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_COL_DEFAULT == 3
        WKV7_COLS_CASE(3, 64, 2, 1)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_COL_DEFAULT == 4
        WKV7_COLS_CASE(4, 32, 4, 2)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_COL_DEFAULT == 5
        WKV7_COLS_CASE(5, 64, 4, 2)
#endif
#if defined(WKV7_ALL_VARIANTS) || WKV7_COL_DEFAULT == 6
        WKV7_COLS_CASE(6, 16, 4, 2)
#endif
        default: return -1;
    }
#undef WKV7_COLS_CASE
}
}  // namespace

// C entry points used by wkv7_op.cpp.  Return 0 on success, -1 for an unknown
// configuration id, else a cudaError_t.
int wkv7_launch_forward(int cfg, int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
                        const void* a, const void* b, void* y, float* sa, float* sT, const float* s0, float* s_out,
                        cudaStream_t st) {
    if (!rows_dispatch(cfg < 0 ? WKV7_ROW_DEFAULT : cfg, true, B, T, H, (const bf16*)r, (const bf16*)w,
                       (const bf16*)k, (const bf16*)v, (const bf16*)a, (const bf16*)b, (bf16*)y, sa, sT, s0, s_out,
                       nullptr, nullptr, nullptr, st))
        return -1;
    return (int)cudaGetLastError();
}

int wkv7_launch_backward(int cfg_rows, int cfg_cols, int B, int T, int H, const void* r, const void* w,
                         const void* k, const void* v, const void* a, const void* b, const void* dy, const float* sT,
                         const float* sa, float* dsa, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                         cudaStream_t st) {
    if (!rows_dispatch(cfg_rows < 0 ? WKV7_ROW_DEFAULT : cfg_rows, false, B, T, H, (const bf16*)r,
                       (const bf16*)w, (const bf16*)k, nullptr, (const bf16*)a, (const bf16*)b, nullptr, nullptr,
                       nullptr, nullptr, nullptr, (const bf16*)dy, (bf16*)dv, dsa, st))
        return -1;
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return (int)e;
    int rc = cols_dispatch(cfg_cols < 0 ? WKV7_COL_DEFAULT : cfg_cols, B, T, H, (const bf16*)r, (const bf16*)w,
                           (const bf16*)k, (const bf16*)v, (const bf16*)a, (const bf16*)b, (const bf16*)dy, sT, sa,
                           dsa, (bf16*)dr, (bf16*)dw, (bf16*)dk, (bf16*)da, (bf16*)db, st);
    if (rc != 0) return rc;
    return (int)cudaGetLastError();
}

int wkv7_chunk_len() { return WKV7_CHUNK; }
int wkv7_head_size() { return WKV7_HEAD_SIZE; }
