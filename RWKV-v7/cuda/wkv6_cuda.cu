// WKV6 ("x060") forward and backward kernels: bf16 r, k, v, w; fp32 u and state.
//
// Per (batch b, head h) the state S is N x N (row i = value channel, column j = key
// channel), S_0 = 0 (or a given initial state, inference only), and for every step t
//
//   y_t[i]   = sum_j S_{t-1}[i,j] r_t[j] + v_t[i] * bonus_t,   bonus_t = sum_j r_t[j] u[j] k_t[j]
//   S_t[i,j] = S_{t-1}[i,j] d_t[j] + v_t[i] k_t[j],            d = exp(-exp(w)) = exp(l), l = -exp(w)
//
// r, k, v, w are (B, T, H, N) = (B, T, C) contiguous bf16 with T % CHUNK == 0; u is fp32 (C,).
//
// Gradients, with G_t = dL/dS_t through the recurrence (G_{T-1} = 0,
// G_{t-1} = G_t diag(d_t) + dy_t r_t^T) and xy_t = dy_t . v_t:
//
//   dr_t[j] = sum_i S_{t-1}[i,j] dy_t[i] + u[j] k_t[j] xy_t
//   dk_t[j] = sum_i G_t[i,j] v_t[i]      + u[j] r_t[j] xy_t
//   dv_t[i] = sum_j G_t[i,j] k_t[j]      + dy_t[i] bonus_t
//   du[j]   = sum_{b,t} r_t[j] k_t[j] xy_t
//   dl_t[j] = sum_{tau>t} P_tau[j] - sum_{s>=t} Q_s[j],   dw = dl * l
//     with P_t[j] = r_t[j] sum_i S_{t-1}[i,j] dy_t[i]  and  Q_t[j] = k_t[j] sum_i G_t[i,j] v_t[i].
//
// (The last line: l_t enters every pair s < t < tau of a key written at s and read at tau;
// summing P over tau > t counts the pairs with s < tau, Q over s >= t removes those with
// s >= t. The running difference stays of the size of the gradient, kept in fp32.)
//
// Two recurrences cover all of it, each run by one kernel template whose state never
// leaves registers:
//
// * wkv6_rows: a block owns RB rows of one head's state (all N columns); a thread owns RPT
//   rows x CPT columns (float4 groups cg + G*q, G = N/CPT lanes per row). It reduces along
//   rows (sum over j), xor-shuffled over the G lanes. Forward (S, forward in time, X = v,
//   K = k, R = r) gives y; the same kernel backwards in time on G (X = dy, K = r, R = k)
//   gives dv. The forward optionally starts from / writes a state (inference).
// * wkv6_cols: a block owns CB columns of one head (all N rows); a thread owns CPT2
//   columns x CR = N/RH rows, the RH row parts of a column xor-shuffled together. It
//   reduces along columns (sum over i). MODE 0 (S forward in time, X = v, Y = dy) writes dr
//   and P (fp32); MODE 1 (G backwards in time, X = dy, Y = v) writes dk, scans dl from P and
//   Q into dw, and sums du per batch. MODE 1 reads MODE 0's P, so they run in that order;
//   the dv pass is independent of both (wkv6_op.cpp puts it on a second stream).
//   No state is stored between the forward and the backward: S is recomputed (as cheap as
//   reading it back).
//
// Per chunk of CHUNK steps a block stages its inputs with cp.async into a double-buffered
// bf16 area (the next chunk loads while this one computes) and converts them once to fp32
// in "processing order" p (= t for forward-time passes, reversed for backward-time ones).
// With c_p the cumulative log-decay from the chunk start through step p, the update inside
// a chunk runs on the state relative to the chunk start, S~ = S / exp(c_p) per column:
//
//   S~ += x_i * (K_j exp(-c_p))       one FMA per element instead of an FMA and a multiply,
//   reads use S~ with R_j exp(c_{p-1}) (rows) or scale the column sum by exp(c_{p-1}) (cols),
//
// and S = S~ exp(c_last) at the chunk end. Every product keeps full fp32 relative precision;
// only the range of exp(-c_p) is at stake, so a chunk in which some column of the block
// decays by more than e^-kMaxLogDecay runs the direct update S = S d + x K instead (the
// choice is per chunk and per block, both forms leave the real state at the chunk end).
//
// Written from the recurrence above; no code taken from other projects.

// WKV6_HOST_EMULATION: tests/test_wkv6_cuda.py compiles the kernels below for the CPU (one
// coroutine per CUDA thread), bringing its own CUDA built-ins; the build here never sets it.
#ifndef WKV6_HOST_EMULATION
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#endif
#include <stdint.h>

#ifndef WKV6_CHUNK
#define WKV6_CHUNK 16
#endif
#ifndef WKV6_HEAD_SIZE
#define WKV6_HEAD_SIZE 64
#endif
#ifndef WKV6_DYNAMIC_SMEM
#define WKV6_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace wkv6 {

constexpr int CL = WKV6_CHUNK;
static_assert(CL >= 2 && CL <= 32 && (CL & (CL - 1)) == 0, "chunk length: a power of two in 2..32");
// Largest total log-decay of one chunk (in any column of a block) for the relative update.
constexpr float kMaxLogDecay = 40.f;

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------- helpers
#ifndef WKV6_HOST_EMULATION
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int n>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory"); }
#endif

__device__ __forceinline__ float bf_lo(uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf_hi(uint32_t x) { return __uint_as_float(x & 0xffff0000u); }
__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }

// 8 bf16 (one 16-byte word) to 8 floats
__device__ __forceinline__ void unpack8(const uint4& q, float* f) {
    f[0] = bf_lo(q.x); f[1] = bf_hi(q.x); f[2] = bf_lo(q.y); f[3] = bf_hi(q.y);
    f[4] = bf_lo(q.z); f[5] = bf_hi(q.z); f[6] = bf_lo(q.w); f[7] = bf_hi(q.w);
}

// sum over aligned groups of L adjacent lanes (every lane of the warp must call it)
template <int L>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int o = 1; o < L; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <int RPT>
__device__ __forceinline__ void load_rowvals(const bf16* p, float* out) {
    if constexpr (RPT % 2 == 0) {
#pragma unroll
        for (int i = 0; i < RPT; i += 2) {
            const uint32_t x = *reinterpret_cast<const uint32_t*>(p + i);
            out[i] = bf_lo(x);
            out[i + 1] = bf_hi(x);
        }
    } else {
#pragma unroll
        for (int i = 0; i < RPT; i++) out[i] = bf2f(p[i]);
    }
}

// Per-column cumulative log-decay of one chunk in processing order: l[p] = -exp(w), c[p] =
// l[0] + ... + l[p]. w_col points at the staged w of one column (stride `stride` per step).
template <bool REV>
__device__ __forceinline__ float chunk_logdecay(const bf16* w_col, int stride, float* l, float* c) {
    float acc = 0.f;
#pragma unroll
    for (int p = 0; p < CL; p++) {
        const int tt = REV ? CL - 1 - p : p;
        l[p] = -__expf(bf2f(w_col[tt * stride]));
        acc += l[p];
        c[p] = acc;
    }
    return acc;
}

// ======================================================= rows kernel (y, dv)
template <int N, int RB>
struct RowSmem {
    bf16 raw[2][3][CL][N];   // staged w, K, R of the chunk, time order
    bf16 rawx[2][CL][RB];    // staged X of this block's rows, time order
    float fk[CL][N];         // K: relative path K exp(-c_p), direct path K; processing order
    float fr[CL][N];         // R: relative path R exp(c_{p-1}), direct path R
    float fd[CL][N];         // decay (direct path)
    float dend[N];           // exp(c_last) (relative path: back to the real state)
    float fu[N];             // u of this head
    float bsc[CL];           // bonus_p = sum_j R u K
};

template <int N, int RB, int NT>
__device__ __forceinline__ void row_stage(RowSmem<N, RB>& sm, int buf, const bf16* __restrict__ w,
                                          const bf16* __restrict__ K, const bf16* __restrict__ R,
                                          const bf16* __restrict__ X, int64_t base, int64_t C, int t0,
                                          int row0, int tid) {
    constexpr int UPT = N / 8;        // 16-byte units per step of one full-width input
    constexpr int U = CL * UPT;
#pragma unroll
    for (int x = 0; x < 3; x++) {
        const bf16* src = x == 0 ? w : (x == 1 ? K : R);
        for (int e = tid; e < U; e += NT) {
            const int tt = e / UPT, n = (e % UPT) * 8;
            cp_async16(&sm.raw[buf][x][tt][n], src + base + (int64_t)(t0 + tt) * C + n);
        }
    }
    constexpr int UX = CL * (RB / 8);
    for (int e = tid; e < UX; e += NT) {
        const int tt = e / (RB / 8), n = (e % (RB / 8)) * 8;
        cp_async16(&sm.rawx[buf][tt][n], X + base + (int64_t)(t0 + tt) * C + row0 + n);
    }
}

// fp32 per-step vectors of the staged chunk; returns true for the direct path (block-uniform).
template <int N, int RB, int NT, bool REV>
__device__ __forceinline__ bool row_prep(RowSmem<N, RB>& sm, int buf, int tid) {
    float l[CL], c[CL];
    int strong = 0;
    if (tid < N) strong = chunk_logdecay<REV>(&sm.raw[buf][0][0][tid], N, l, c) < -kMaxLogDecay;
    const bool direct = __syncthreads_or(strong) != 0;
    if (tid < N) {
        const int j = tid;
        float prev = 0.f;
#pragma unroll
        for (int p = 0; p < CL; p++) {
            const int tt = REV ? CL - 1 - p : p;
            const float kk = bf2f(sm.raw[buf][1][tt][j]);
            const float rr = bf2f(sm.raw[buf][2][tt][j]);
            if (direct) {
                sm.fk[p][j] = kk;
                sm.fr[p][j] = rr;
                sm.fd[p][j] = __expf(l[p]);
            } else {
                sm.fk[p][j] = kk * __expf(-c[p]);
                sm.fr[p][j] = rr * __expf(prev);
            }
            prev = c[p];
        }
        sm.dend[j] = __expf(prev);
    }
    {   // bonus_p = sum_j R u K: TPP adjacent lanes per step
        constexpr int TPP = NT / CL;
        const int p = tid / TPP, part = tid % TPP;
        const int tt = REV ? CL - 1 - p : p;
        float acc = 0.f;
        for (int j = part; j < N; j += TPP)
            acc = fmaf(bf2f(sm.raw[buf][2][tt][j]) * sm.fu[j], bf2f(sm.raw[buf][1][tt][j]), acc);
        acc = group_sum<TPP>(acc);
        if (part == 0) sm.bsc[p] = acc;
    }
    __syncthreads();
    return direct;
}

// The CL steps of one chunk for one thread: out[t, row] = sum_j S[row, j] R_j + X_row bonus,
// then S <- S d + X K (direct) or S~ <- S~ + X K~ (relative). out_c: out at the chunk's
// first step and this thread's first row.
template <int N, int RB, int RPT, int CPT, bool REV, bool DIRECT>
__device__ __forceinline__ void row_steps(RowSmem<N, RB>& sm, int buf, float (&s)[RPT][CPT], int cg, int rloc,
                                          bf16* __restrict__ out_c, int64_t C) {
    constexpr int G = N / CPT;
    constexpr int Q = CPT / 4;
#pragma unroll 4
    for (int p = 0; p < CL; p++) {
        const int tt = REV ? CL - 1 - p : p;
        float xr[RPT];
        load_rowvals<RPT>(&sm.rawx[buf][tt][rloc], xr);
        float yv[RPT];
#pragma unroll
        for (int i = 0; i < RPT; i++) {
            float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
            for (int q = 0; q < Q; q++) {
                const int col = (cg + G * q) * 4;
                const float4 kv = *reinterpret_cast<const float4*>(&sm.fk[p][col]);
                const float4 rv = *reinterpret_cast<const float4*>(&sm.fr[p][col]);
                float* sp = &s[i][4 * q];
                float& acc = (q & 1) ? acc1 : acc0;
                acc = fmaf(sp[0], rv.x, acc);       // reads the state before step t
                acc = fmaf(sp[1], rv.y, acc);
                acc = fmaf(sp[2], rv.z, acc);
                acc = fmaf(sp[3], rv.w, acc);
                if constexpr (DIRECT) {
                    const float4 dv = *reinterpret_cast<const float4*>(&sm.fd[p][col]);
                    sp[0] = fmaf(sp[0], dv.x, xr[i] * kv.x);
                    sp[1] = fmaf(sp[1], dv.y, xr[i] * kv.y);
                    sp[2] = fmaf(sp[2], dv.z, xr[i] * kv.z);
                    sp[3] = fmaf(sp[3], dv.w, xr[i] * kv.w);
                } else {
                    sp[0] = fmaf(xr[i], kv.x, sp[0]);
                    sp[1] = fmaf(xr[i], kv.y, sp[1]);
                    sp[2] = fmaf(xr[i], kv.z, sp[2]);
                    sp[3] = fmaf(xr[i], kv.w, sp[3]);
                }
            }
            yv[i] = acc0 + acc1;
        }
        const float bonus = sm.bsc[p];
#pragma unroll
        for (int i = 0; i < RPT; i++) yv[i] = fmaf(xr[i], bonus, group_sum<G>(yv[i]));
        // every lane of the row group holds the sums; they share the RPT stores
        bf16* dst = out_c + (int64_t)tt * C;
#pragma unroll
        for (int e = 0; e < RPT; e++)
            if (e % G == cg) dst[e] = f2bf(yv[e]);
    }
}

// Grid: B*H*(N/RB) blocks of NT = (RB/RPT)*(N/CPT) threads; dynamic shared memory sizeof(RowSmem).
// REV = false: out = y from S (X = v, K = k, R = r), optional s0 / s_out ((B, H, N[i], N[j]) fp32).
// REV = true:  out = dv from G (X = dy, K = r, R = k), starting from zero at the end of time.
template <int N, int RB, int RPT, int CPT, bool REV>
__global__ void __launch_bounds__((RB / RPT) * (N / CPT))
    wkv6_rows(int T, int H, const bf16* __restrict__ X, const bf16* __restrict__ K, const bf16* __restrict__ R,
              const bf16* __restrict__ w, const float* __restrict__ u, bf16* __restrict__ out,
              const float* __restrict__ s0, float* __restrict__ s_out) {
    constexpr int G = N / CPT;
    constexpr int NT = (RB / RPT) * G;
    constexpr int Q = CPT / 4;
    static_assert(CPT % 4 == 0 && N % CPT == 0 && RB % RPT == 0 && RB % 8 == 0 && N % RB == 0, "shape");
    static_assert(NT % 32 == 0 && G <= 32 && NT >= N, "block: whole warps, one thread per column in the prep");
    static_assert(NT % CL == 0 && NT / CL <= 32 && ((NT / CL) & (NT / CL - 1)) == 0, "bonus lanes per step");
    WKV6_DYNAMIC_SMEM(smem_raw);
    RowSmem<N, RB>& sm = *reinterpret_cast<RowSmem<N, RB>*>(smem_raw);

    const int tid = threadIdx.x;
    const int nrb = N / RB;
    const int bh = blockIdx.x / nrb, rb = blockIdx.x % nrb;
    const int bb = bh / H, hh = bh % H;
    const int64_t C = (int64_t)H * N;
    const int64_t base = (int64_t)bb * T * C + (int64_t)hh * N;
    const int row0 = rb * RB;
    const int cg = tid % G, rg = tid / G;
    const int rloc = rg * RPT;          // first local row of this thread
    const int nc = T / CL;

    for (int j = tid; j < N; j += NT) sm.fu[j] = u[hh * N + j];   // read after the first barrier

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

    row_stage<N, RB, NT>(sm, 0, w, K, R, X, base, C, (REV ? nc - 1 : 0) * CL, row0, tid);
    cp_async_commit();

    for (int it = 0; it < nc; it++) {
        const int c = REV ? nc - 1 - it : it;
        const int buf = it & 1;
        if (it + 1 < nc) {
            row_stage<N, RB, NT>(sm, buf ^ 1, w, K, R, X, base, C, (REV ? c - 1 : c + 1) * CL, row0, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bool direct = row_prep<N, RB, NT, REV>(sm, buf, tid);
        bf16* out_c = out + base + (int64_t)c * CL * C + row0 + rloc;
        if (direct) {
            row_steps<N, RB, RPT, CPT, REV, true>(sm, buf, s, cg, rloc, out_c, C);
        } else {
            row_steps<N, RB, RPT, CPT, REV, false>(sm, buf, s, cg, rloc, out_c, C);
#pragma unroll
            for (int q = 0; q < Q; q++) {
                const float4 de = *reinterpret_cast<const float4*>(&sm.dend[(cg + G * q) * 4]);
#pragma unroll
                for (int i = 0; i < RPT; i++) {
                    s[i][4 * q + 0] *= de.x; s[i][4 * q + 1] *= de.y;
                    s[i][4 * q + 2] *= de.z; s[i][4 * q + 3] *= de.w;
                }
            }
        }
        __syncthreads();   // this chunk's buffers are free for the next stage / prep
    }
    if (s_out != nullptr) {
#pragma unroll
        for (int i = 0; i < RPT; i++)
#pragma unroll
            for (int q = 0; q < Q; q++)
                *reinterpret_cast<float4*>(s_out + ((int64_t)bh * N + row0 + rloc + i) * N + (cg + G * q) * 4) =
                    make_float4(s[i][4 * q + 0], s[i][4 * q + 1], s[i][4 * q + 2], s[i][4 * q + 3]);
    }
}

// ================================================== columns kernel (dr, dk, dw, du)
template <int N, int CB, int RH>
struct ColSmem {
    static constexpr int CR = N / RH;   // rows per part
    static constexpr int PS = CR + 4;   // padded part stride (floats): the parts of a warp hit different banks
    bf16 rawx[2][CL][N];                // staged X (all rows), time order
    bf16 rawy[2][CL][N];                // staged Y
    bf16 rawc[2][3][CL][CB];            // staged w, Kc, Oc of this block's columns
    float rawp[2][CL][CB];              // staged P (MODE 1)
    float fx[CL][RH][PS];               // X in processing order, split in parts
    float fy[CL][RH][PS];               // Y
    float fk[CL][CB];                   // Kc: relative path Kc exp(-c_p), direct path Kc
    float fd[CL][CB];                   // decay (direct path)
    float fe[CL][CB];                   // column-sum scale: exp(c_{p-1}) (relative) or 1 (direct)
    float fcs[CL][CB];                  // the chunk's column sums (before the fe scale)
    float dend[CB];                     // exp(c_last)
    float fu[CB];                       // u of these columns
    float xy[CL];                       // sum_i X_i Y_i per step
};

template <int N, int CB, int RH, int NT, bool LOADP>
__device__ __forceinline__ void col_stage(ColSmem<N, CB, RH>& sm, int buf, const bf16* __restrict__ X,
                                          const bf16* __restrict__ Y, const bf16* __restrict__ w,
                                          const bf16* __restrict__ Kc, const bf16* __restrict__ Oc,
                                          const float* __restrict__ P, int64_t base, int64_t C, int t0,
                                          int col0, int tid) {
    {
        constexpr int UPT = N / 8, U = CL * UPT;
        for (int e = tid; e < U; e += NT) {
            const int tt = e / UPT, n = (e % UPT) * 8;
            const int64_t g = base + (int64_t)(t0 + tt) * C + n;
            cp_async16(&sm.rawx[buf][tt][n], X + g);
            cp_async16(&sm.rawy[buf][tt][n], Y + g);
        }
    }
    {
        constexpr int UPC = CB / 8, UC = CL * UPC;
#pragma unroll
        for (int x = 0; x < 3; x++) {
            const bf16* src = x == 0 ? w : (x == 1 ? Kc : Oc);
            for (int e = tid; e < UC; e += NT) {
                const int tt = e / UPC, n = (e % UPC) * 8;
                cp_async16(&sm.rawc[buf][x][tt][n], src + base + (int64_t)(t0 + tt) * C + col0 + n);
            }
        }
    }
    if constexpr (LOADP) {
        constexpr int UPP = CB / 4, UP = CL * UPP;
        for (int e = tid; e < UP; e += NT) {
            const int tt = e / UPP, n = (e % UPP) * 4;
            cp_async16(&sm.rawp[buf][tt][n], P + base + (int64_t)(t0 + tt) * C + col0 + n);
        }
    }
}

template <int N, int CB, int RH, int NT, bool REV>
__device__ __forceinline__ bool col_prep(ColSmem<N, CB, RH>& sm, int buf, int tid) {
    using S = ColSmem<N, CB, RH>;
    float l[CL], c[CL];
    int strong = 0;
    if (tid < CB) strong = chunk_logdecay<REV>(&sm.rawc[buf][0][0][tid], CB, l, c) < -kMaxLogDecay;
    const bool direct = __syncthreads_or(strong) != 0;
    if (tid < CB) {
        const int j = tid;
        float prev = 0.f;
#pragma unroll
        for (int p = 0; p < CL; p++) {
            const int tt = REV ? CL - 1 - p : p;
            const float kk = bf2f(sm.rawc[buf][1][tt][j]);
            if (direct) {
                sm.fk[p][j] = kk;
                sm.fd[p][j] = __expf(l[p]);
                sm.fe[p][j] = 1.f;
            } else {
                sm.fk[p][j] = kk * __expf(-c[p]);
                sm.fe[p][j] = __expf(prev);
            }
            prev = c[p];
        }
        sm.dend[j] = __expf(prev);
    }
    {   // X, Y to fp32 in parts; xy_p = X . Y over the UPT lanes of a step
        constexpr int UPT = N / 8, U = CL * UPT;
        for (int e = tid; e < U; e += NT) {
            const int tt = e / UPT, n = (e % UPT) * 8;
            const int p = REV ? CL - 1 - tt : tt;
            const int part = n / S::CR, m = n % S::CR;   // CR % 8 == 0: a unit never straddles parts
            float fx8[8], fy8[8];
            unpack8(*reinterpret_cast<const uint4*>(&sm.rawx[buf][tt][n]), fx8);
            unpack8(*reinterpret_cast<const uint4*>(&sm.rawy[buf][tt][n]), fy8);
            float4* dx = reinterpret_cast<float4*>(&sm.fx[p][part][m]);
            dx[0] = make_float4(fx8[0], fx8[1], fx8[2], fx8[3]);
            dx[1] = make_float4(fx8[4], fx8[5], fx8[6], fx8[7]);
            float4* dy = reinterpret_cast<float4*>(&sm.fy[p][part][m]);
            dy[0] = make_float4(fy8[0], fy8[1], fy8[2], fy8[3]);
            dy[1] = make_float4(fy8[4], fy8[5], fy8[6], fy8[7]);
            float d = 0.f;
#pragma unroll
            for (int q = 0; q < 8; q++) d = fmaf(fx8[q], fy8[q], d);
            d = group_sum<UPT>(d);
            if (e % UPT == 0) sm.xy[p] = d;
        }
    }
    __syncthreads();
    return direct;
}

// The CL steps of one chunk for one thread: column sums sum_i S[i, j] Y_i (into fcs), then
// S <- S d + X K (direct) or S~ <- S~ + X K~ (relative).
template <int N, int CB, int RH, int CPT2, bool DIRECT>
__device__ __forceinline__ void col_steps(ColSmem<N, CB, RH>& sm, float (&s)[CPT2][N / RH], int part, int cl) {
    constexpr int CR = N / RH;
    constexpr int CPW = 32 / RH;
#pragma unroll 2
    for (int p = 0; p < CL; p++) {
        float kj[CPT2], dj[CPT2];
#pragma unroll
        for (int cc = 0; cc < CPT2; cc++) {
            kj[cc] = sm.fk[p][cl + cc];
            dj[cc] = DIRECT ? sm.fd[p][cl + cc] : 1.f;
        }
        float cs0[CPT2], cs1[CPT2];
#pragma unroll
        for (int cc = 0; cc < CPT2; cc++) cs0[cc] = cs1[cc] = 0.f;
#pragma unroll
        for (int m4 = 0; m4 < CR / 4; m4++) {
            const float4 x4 = *reinterpret_cast<const float4*>(&sm.fx[p][part][4 * m4]);
            const float4 y4 = *reinterpret_cast<const float4*>(&sm.fy[p][part][4 * m4]);
            const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
            const float ys[4] = {y4.x, y4.y, y4.z, y4.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int m = 4 * m4 + e;
#pragma unroll
                for (int cc = 0; cc < CPT2; cc++) {
                    float& cs = (e & 1) ? cs1[cc] : cs0[cc];
                    cs = fmaf(s[cc][m], ys[e], cs);     // reads the state before step t
                    if constexpr (DIRECT) s[cc][m] = fmaf(s[cc][m], dj[cc], xs[e] * kj[cc]);
                    else s[cc][m] = fmaf(xs[e], kj[cc], s[cc][m]);
                }
            }
        }
        float cs[CPT2];
#pragma unroll
        for (int cc = 0; cc < CPT2; cc++) cs[cc] = cs0[cc] + cs1[cc];
#pragma unroll
        for (int o = CPW; o < 32; o <<= 1)
#pragma unroll
            for (int cc = 0; cc < CPT2; cc++) cs[cc] += __shfl_xor_sync(0xffffffffu, cs[cc], o);
        if (part == 0) {
#pragma unroll
            for (int cc = 0; cc < CPT2; cc++) sm.fcs[p][cl + cc] = cs[cc];
        }
    }
}

// Grid: B*H*(N/CB) blocks of NT = (CB/CPT2)*RH threads; dynamic shared memory sizeof(ColSmem).
// MODE 0 (forward time, S): X = v, Y = dy, Kc = k, Oc = r; writes out = dr and P (fp32).
// MODE 1 (backward time, G): X = dy, Y = v, Kc = r, Oc = k; reads P; writes out = dk, dw and
//   du_b ((B, C) fp32, summed over time).
template <int N, int CB, int RH, int CPT2, int MODE>
__global__ void __launch_bounds__((CB / CPT2) * RH)
    wkv6_cols(int T, int H, const bf16* __restrict__ X, const bf16* __restrict__ Y, const bf16* __restrict__ Kc,
              const bf16* __restrict__ Oc, const bf16* __restrict__ w, const float* __restrict__ u,
              float* __restrict__ P, bf16* __restrict__ out, bf16* __restrict__ dw, float* __restrict__ du_b) {
    using S = ColSmem<N, CB, RH>;
    constexpr bool REV = MODE == 1;
    constexpr int CR = S::CR;
    constexpr int CPW = 32 / RH;               // column lanes per warp
    constexpr int NT = (CB / CPT2) * RH;
    static_assert(MODE == 0 || MODE == 1, "mode");
    static_assert(32 % RH == 0 && (CB / CPT2) % CPW == 0 && CB % CPT2 == 0, "warp layout");
    static_assert(CB % 8 == 0 && N % CB == 0 && CR % 8 == 0, "shape");
    static_assert(NT % 32 == 0 && NT >= CB && (CL * N / 8) % 32 == 0, "block");
    WKV6_DYNAMIC_SMEM(smem_raw);
    S& sm = *reinterpret_cast<S*>(smem_raw);

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int part = lane / CPW;
    const int cl = (warp * CPW + lane % CPW) * CPT2;   // first local column of this thread
    const int ncb = N / CB;
    const int bh = blockIdx.x / ncb, cbk = blockIdx.x % ncb;
    const int bb = bh / H, hh = bh % H;
    const int64_t C = (int64_t)H * N;
    const int64_t base = (int64_t)bb * T * C + (int64_t)hh * N;
    const int col0 = cbk * CB;
    const int nc = T / CL;

    for (int j = tid; j < CB; j += NT) sm.fu[j] = u[hh * N + col0 + j];   // read after the first barrier

    float s[CPT2][CR];
#pragma unroll
    for (int cc = 0; cc < CPT2; cc++)
#pragma unroll
        for (int m = 0; m < CR; m++) s[cc][m] = 0.f;
    float scan = 0.f, du_acc = 0.f;   // MODE 1, epilogue threads: sum_{tau>t} P - sum_{s>t} Q; du

    col_stage<N, CB, RH, NT, REV>(sm, 0, X, Y, w, Kc, Oc, P, base, C, (REV ? nc - 1 : 0) * CL, col0, tid);
    cp_async_commit();

    for (int it = 0; it < nc; it++) {
        const int c = REV ? nc - 1 - it : it;
        const int buf = it & 1;
        if (it + 1 < nc) {
            col_stage<N, CB, RH, NT, REV>(sm, buf ^ 1, X, Y, w, Kc, Oc, P, base, C, (REV ? c - 1 : c + 1) * CL,
                                          col0, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bool direct = col_prep<N, CB, RH, NT, REV>(sm, buf, tid);
        if (direct) {
            col_steps<N, CB, RH, CPT2, true>(sm, s, part, cl);
        } else {
            col_steps<N, CB, RH, CPT2, false>(sm, s, part, cl);
#pragma unroll
            for (int cc = 0; cc < CPT2; cc++) {
                const float de = sm.dend[cl + cc];
#pragma unroll
                for (int m = 0; m < CR; m++) s[cc][m] *= de;
            }
        }
        __syncthreads();   // fcs complete
        if (tid < CB) {    // epilogue: one thread per column, steps in processing order
            const int jl = tid;
            const float uj = sm.fu[jl];
            const int64_t col_off = base + col0 + jl;
#pragma unroll 4
            for (int p = 0; p < CL; p++) {
                const int tt = REV ? CL - 1 - p : p;
                const int64_t off = col_off + (int64_t)(c * CL + tt) * C;
                const float cs = sm.fcs[p][jl] * sm.fe[p][jl];
                const float kin = bf2f(sm.rawc[buf][1][tt][jl]);
                const float oth = bf2f(sm.rawc[buf][2][tt][jl]);
                const float xy = sm.xy[p];
                out[off] = f2bf(fmaf(uj * kin, xy, cs));
                if constexpr (MODE == 0) {
                    P[off] = oth * cs;                       // P_t = r_t * (S_{t-1}^T dy_t)
                } else {
                    const float q = oth * cs;                // Q_t = k_t * (G_t^T v_t)
                    const float l = -__expf(bf2f(sm.rawc[buf][0][tt][jl]));
                    const float dl = scan - q;
                    scan += sm.rawp[buf][tt][jl] - q;
                    dw[off] = f2bf(dl * l);
                    du_acc = fmaf(oth * kin, xy, du_acc);
                }
            }
        }
        __syncthreads();   // this chunk's buffers are free for the next stage / prep
    }
    if constexpr (MODE == 1) {
        if (tid < CB) du_b[(int64_t)bb * C + hh * N + col0 + tid] = du_acc;
    }
}

}  // namespace wkv6

#ifndef WKV6_HOST_EMULATION
// ------------------------------------------------------------ host launchers
// Configurations (ids for the benchmarks; the defaults are reasoned, to be timed on the card):
// Rows kernel (forward y, backward dv):
//   id : RB  RPT CPT  threads  blocks/head
//   0  : 32  2   16   64       2      <- default
//   1  : 64  2   16   128      1
//   2  : 16  1   16   64       4
//   3  : 32  1   16   128      2
//   4  : 32  4   8    64       2
//   5  : 64  4   16   64       1
//   6  : 16  2   8    64       4
// Columns kernel (backward dr / dk, dw, du):
//   id : CB  RH  CPT2 threads  blocks/head
//   0  : 32  4   2    64       2      <- default
//   1  : 32  4   1    128      2
//   2  : 16  4   1    64       4
//   3  : 64  4   2    128      1
//   4  : 16  4   2    32       4
//   5  : 32  8   4    64       2
//   6  : 32  2   2    32       2
// WKV6_ALL_VARIANTS (head size 64 only) builds them all; otherwise only the defaults.
#ifndef WKV6_ROW_DEFAULT
#define WKV6_ROW_DEFAULT 0
#endif
#ifndef WKV6_COL_DEFAULT
#define WKV6_COL_DEFAULT 0
#endif
#if defined(WKV6_ALL_VARIANTS) && WKV6_HEAD_SIZE == 64
#define WKV6_VARIANTS 1
#else
#define WKV6_VARIANTS 0
#endif

namespace {
using wkv6::bf16;
constexpr int N = WKV6_HEAD_SIZE;

template <int RB, int RPT, int CPT, bool REV>
cudaError_t launch_rows(int B, int T, int H, const bf16* X, const bf16* K, const bf16* R, const bf16* w,
                        const float* u, bf16* out, const float* s0, float* s_out, cudaStream_t st) {
    constexpr int NT = (RB / RPT) * (N / CPT);
    const int smem = (int)sizeof(wkv6::RowSmem<N, RB>);
    auto kern = wkv6::wkv6_rows<N, RB, RPT, CPT, REV>;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    kern<<<B * H * (N / RB), NT, smem, st>>>(T, H, X, K, R, w, u, out, s0, s_out);
    return cudaGetLastError();
}

template <int CB, int RH, int CPT2, int MODE>
cudaError_t launch_cols(int B, int T, int H, const bf16* X, const bf16* Y, const bf16* Kc, const bf16* Oc,
                        const bf16* w, const float* u, float* P, bf16* out, bf16* dw, float* du_b, cudaStream_t st) {
    constexpr int NT = (CB / CPT2) * RH;
    const int smem = (int)sizeof(wkv6::ColSmem<N, CB, RH>);
    auto kern = wkv6::wkv6_cols<N, CB, RH, CPT2, MODE>;
    // idempotent and cheap; needed for more than 48 KB of dynamic shared memory
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    kern<<<B * H * (N / CB), NT, smem, st>>>(T, H, X, Y, Kc, Oc, w, u, P, out, dw, du_b);
    return cudaGetLastError();
}

// Returns -1 for an id not built, else a cudaError_t.
template <bool REV>
int rows_dispatch(int cfg, int B, int T, int H, const bf16* X, const bf16* K, const bf16* R, const bf16* w,
                  const float* u, bf16* out, const float* s0, float* s_out, cudaStream_t st) {
#define WKV6_ROWS_CASE(ID, RB, RPT, CPT) \
    case ID: return (int)launch_rows<RB, RPT, CPT, REV>(B, T, H, X, K, R, w, u, out, s0, s_out, st);
    switch (cfg) {
#if WKV6_VARIANTS || WKV6_ROW_DEFAULT == 0
        WKV6_ROWS_CASE(0, 32, 2, 16)
#endif
#if WKV6_VARIANTS || WKV6_ROW_DEFAULT == 1
        WKV6_ROWS_CASE(1, 64, 2, 16)
#endif
#if WKV6_VARIANTS || WKV6_ROW_DEFAULT == 2
        WKV6_ROWS_CASE(2, 16, 1, 16)
#endif
#if WKV6_VARIANTS || WKV6_ROW_DEFAULT == 3
        WKV6_ROWS_CASE(3, 32, 1, 16)
#endif
#if WKV6_VARIANTS || WKV6_ROW_DEFAULT == 4
        WKV6_ROWS_CASE(4, 32, 4, 8)
#endif
#if WKV6_VARIANTS || WKV6_ROW_DEFAULT == 5
        WKV6_ROWS_CASE(5, 64, 4, 16)
#endif
#if WKV6_VARIANTS || WKV6_ROW_DEFAULT == 6
        WKV6_ROWS_CASE(6, 16, 2, 8)
#endif
        default: return -1;
    }
#undef WKV6_ROWS_CASE
}

template <int MODE>
int cols_dispatch(int cfg, int B, int T, int H, const bf16* X, const bf16* Y, const bf16* Kc, const bf16* Oc,
                  const bf16* w, const float* u, float* P, bf16* out, bf16* dw, float* du_b, cudaStream_t st) {
#define WKV6_COLS_CASE(ID, CB, RH, CPT2) \
    case ID: return (int)launch_cols<CB, RH, CPT2, MODE>(B, T, H, X, Y, Kc, Oc, w, u, P, out, dw, du_b, st);
    switch (cfg) {
#if WKV6_VARIANTS || WKV6_COL_DEFAULT == 0
        WKV6_COLS_CASE(0, 32, 4, 2)
#endif
#if WKV6_VARIANTS || WKV6_COL_DEFAULT == 1
        WKV6_COLS_CASE(1, 32, 4, 1)
#endif
#if WKV6_VARIANTS || WKV6_COL_DEFAULT == 2
        WKV6_COLS_CASE(2, 16, 4, 1)
#endif
#if WKV6_VARIANTS || WKV6_COL_DEFAULT == 3
        WKV6_COLS_CASE(3, 64, 4, 2)
#endif
#if WKV6_VARIANTS || WKV6_COL_DEFAULT == 4
        WKV6_COLS_CASE(4, 16, 4, 2)
#endif
#if WKV6_VARIANTS || WKV6_COL_DEFAULT == 5
        WKV6_COLS_CASE(5, 32, 8, 4)
#endif
#if WKV6_VARIANTS || WKV6_COL_DEFAULT == 6
        WKV6_COLS_CASE(6, 32, 2, 2)
#endif
        default: return -1;
    }
#undef WKV6_COLS_CASE
}
}  // namespace

// C entry points used by wkv6_op.cpp.  Return 0 on success, -1 for a configuration id not
// built, else a cudaError_t.
int wkv6_launch_forward(int cfg, int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
                        const float* u, void* y, const float* s0, float* s_out, cudaStream_t st) {
    return rows_dispatch<false>(cfg < 0 ? WKV6_ROW_DEFAULT : cfg, B, T, H, (const bf16*)v, (const bf16*)k,
                                (const bf16*)r, (const bf16*)w, u, (bf16*)y, s0, s_out, st);
}

// The backward, two independent halves (wkv6_op.cpp runs them on two streams):
// columns: dr (+ P, (B, T, C) fp32 scratch), then dk, dw and du_b ((B, C) fp32, du per batch entry);
// rows: dv.
int wkv6_launch_backward_cols(int cfg_cols, int B, int T, int H, const void* r, const void* k, const void* v,
                              const void* w, const float* u, const void* dy, float* P, void* dr, void* dk,
                              void* dw, float* du_b, cudaStream_t st) {
    const int ccfg = cfg_cols < 0 ? WKV6_COL_DEFAULT : cfg_cols;
    int rc = cols_dispatch<0>(ccfg, B, T, H, (const bf16*)v, (const bf16*)dy, (const bf16*)k, (const bf16*)r,
                              (const bf16*)w, u, P, (bf16*)dr, nullptr, nullptr, st);
    if (rc != 0) return rc;
    return cols_dispatch<1>(ccfg, B, T, H, (const bf16*)dy, (const bf16*)v, (const bf16*)r, (const bf16*)k,
                            (const bf16*)w, u, P, (bf16*)dk, (bf16*)dw, du_b, st);
}

int wkv6_launch_backward_rows(int cfg_rows, int B, int T, int H, const void* r, const void* k, const void* w,
                              const float* u, const void* dy, void* dv, cudaStream_t st) {
    return rows_dispatch<true>(cfg_rows < 0 ? WKV6_ROW_DEFAULT : cfg_rows, B, T, H, (const bf16*)dy,
                               (const bf16*)r, (const bf16*)k, (const bf16*)w, u, (bf16*)dv, nullptr, nullptr, st);
}

int wkv6_chunk_len() { return WKV6_CHUNK; }
int wkv6_head_size() { return WKV6_HEAD_SIZE; }
#endif  // WKV6_HOST_EMULATION
