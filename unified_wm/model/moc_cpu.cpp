// Mixture-of-Contexts attention on CPU: the `gather` backend's compiled kernel.
//
// Same semantics as attention.py's oracle (read its docstring first). Python does the
// routing; this file turns the routing into work lists and computes the attention:
//
//   moc_route     top-k routing on the chunk descriptors (no drop-off / drop-in).
//   moc_plan      for each (batch row b, KV head hk): the (query head in group, query)
//                 rows that read each key chunk, in one of three modes, bucketed by
//                 counting (no sort) per segment of queries. Mode 0 = own chunk (causal), 1 = a routed chunk
//                 (its non-mandatory keys), 2 = a past chunk that holds mandatory keys
//                 (only those keys). The three key sets are disjoint per query, so
//                 their softmax terms add up to exactly the routed mask.
//   moc_forward   per key chunk: the chunk's keys stay in cache while every row that
//                 reads it is processed in register-blocked tiles, as wide as that chunk
//                 (its length rounded up to 16, not the longest chunk's); each row keeps an
//                 online-softmax state (max, sum, accumulator) that merges the chunks in
//                 any order. Returns the output and the log-sum-exp of each row.
//   moc_backward  per key chunk again, with each row's global LSE and delta = dO . O:
//                 P = exp(S - lse), dV += P^T dO, dS = P (dO V^T - delta),
//                 dQ += dS K, dK += dS^T Q (the flash-attention backward, tile by tile).
//
// Parallel over (b, hk): rows and key chunks of different KV heads never overlap.
// q arrives pre-scaled by 1/sqrt(D). Everything is float32, contiguous.
// The tiles use GCC vector extensions of the machine's native width (VW floats: 16 with
// AVX-512, else 8), so -march=native turns them into AVX-512, AVX2 or NEON code without
// intrinsics. A vector wider than the registers is split into several by the compiler, and on
// AVX2 a 16-float type ran the micro-kernels about 8x slower than the native 8-float one.

// the headers the kernel uses, not <torch/extension.h> (the whole C++ API; twice the compile time)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;    // floats per vector
constexpr int NVMAX = 4;  // vectors per micro-kernel row: 6 x 4 = 24 of the 32 zmm registers
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#else
constexpr int VW = 8;
constexpr int NVMAX = 2;  // 6 x 2 = 12 of AVX2's 16 ymm registers (the classic 6x16 block)
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#endif
static_assert(16 % VW == 0, "rows, chunks and head dims are padded to multiples of 16");

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
// copy one row of D floats (D % 16 == 0) without a libc call
inline void copy_row(float* dst, const float* src, int D) {
  for (int d = 0; d < D; d += VW) st(dst + d, ld(src + d));
}
inline vf splat(float x) { return vf{} + x; }
inline vi iota() {  // 0, 1, ..., VW - 1
  vi v{};
  for (int x = 0; x < VW; x++) v[x] = x;
  return v;
}

constexpr float kNeg = -1e30f;  // finite "minus infinity": no inf arithmetic anywhere
constexpr int TB = 72;          // query rows per tile (a multiple of the 6-row micro-kernel)

// exp on VW lanes: 2^n * p(r), r = x - n ln2, |r| <= ln2/2, degree-6 polynomial
// (relative error ~2e-7, like expf). Inputs below -87 give ~0 (the caller masks anyway).
inline vf vexp(vf x) {
  const vf hi = splat(88.0f), lo = splat(-87.0f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  vf p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf s;
  std::memcpy(&s, &e, sizeof(vf));
  return p * s;
}

// Register-blocked micro-kernels: RR rows x NV vectors of accumulators (at most 6 x NVMAX,
// sized to the vector registers above).

// S[RR x VW*NV] = X[RR x D] . Yt[D x VW*NV]   (Yt: row d holds column values, stride ldy)
template <int RR, int NV>
inline void xyt_k(const float* X, int ldx, const float* Yt, int ldy, float* S, int lds, int D) {
  vf a[RR][NV];
  for (int r = 0; r < RR; r++)
    for (int c = 0; c < NV; c++) a[r][c] = vf{};
  for (int d = 0; d < D; d++) {
    vf y[NV];
    for (int c = 0; c < NV; c++) y[c] = ld(Yt + (int64_t)d * ldy + VW * c);
    for (int r = 0; r < RR; r++) {
      const vf x = splat(X[r * ldx + d]);
      for (int c = 0; c < NV; c++) a[r][c] += x * y[c];
    }
  }
  for (int r = 0; r < RR; r++)
    for (int c = 0; c < NV; c++) st(S + r * lds + VW * c, a[r][c]);
}

// O[RR x VW*NV] += P[RR x L] . Y[L x VW*NV]
template <int RR, int NV>
inline void py_k(const float* P, int ldp, const float* Y, int ldy, float* O, int ldo, int L) {
  vf a[RR][NV];
  for (int r = 0; r < RR; r++)
    for (int c = 0; c < NV; c++) a[r][c] = ld(O + r * ldo + VW * c);
  for (int j = 0; j < L; j++) {
    vf y[NV];
    for (int c = 0; c < NV; c++) y[c] = ld(Y + (int64_t)j * ldy + VW * c);
    for (int r = 0; r < RR; r++) {
      const vf p = splat(P[r * ldp + j]);
      for (int c = 0; c < NV; c++) a[r][c] += p * y[c];
    }
  }
  for (int r = 0; r < RR; r++)
    for (int c = 0; c < NV; c++) st(O + r * ldo + VW * c, a[r][c]);
}

// Column blocks of up to NVMAX vectors for a fixed row count RR.
template <int RR>
inline void xyt_rows(const float* X, int ldx, const float* Yt, int ldy, float* S, int lds, int D, int L) {
  int j = 0;
  for (; j + VW * NVMAX <= L; j += VW * NVMAX) xyt_k<RR, NVMAX>(X, ldx, Yt + j, ldy, S + j, lds, D);
  switch ((L - j) / VW) {
    case 3: xyt_k<RR, 3>(X, ldx, Yt + j, ldy, S + j, lds, D); break;
    case 2: xyt_k<RR, 2>(X, ldx, Yt + j, ldy, S + j, lds, D); break;
    case 1: xyt_k<RR, 1>(X, ldx, Yt + j, ldy, S + j, lds, D); break;
    default: break;
  }
}

template <int RR>
inline void py_rows(const float* P, int ldp, const float* Y, int ldy, float* O, int ldo, int L, int D) {
  int d = 0;
  for (; d + VW * NVMAX <= D; d += VW * NVMAX) py_k<RR, NVMAX>(P, ldp, Y + d, ldy, O + d, ldo, L);
  switch ((D - d) / VW) {
    case 3: py_k<RR, 3>(P, ldp, Y + d, ldy, O + d, ldo, L); break;
    case 2: py_k<RR, 2>(P, ldp, Y + d, ldy, O + d, ldo, L); break;
    case 1: py_k<RR, 1>(P, ldp, Y + d, ldy, O + d, ldo, L); break;
    default: break;
  }
}

// S[T x L] = X[T x D] . Yt[D x L]; L % 16 == 0, D % 16 == 0
void mm_xyt(const float* X, int ldx, const float* Yt, int ldy, float* S, int lds, int T, int D, int L) {
  int i = 0;
  for (; i + 6 <= T; i += 6) xyt_rows<6>(X + i * ldx, ldx, Yt, ldy, S + i * lds, lds, D, L);
  for (; i + 2 <= T; i += 2) xyt_rows<2>(X + i * ldx, ldx, Yt, ldy, S + i * lds, lds, D, L);
  if (i < T) xyt_rows<1>(X + i * ldx, ldx, Yt, ldy, S + i * lds, lds, D, L);
}

// O[T x D] += P[T x L] . Y[L x D]; D % 16 == 0
void mm_py(const float* P, int ldp, const float* Y, int ldy, float* O, int ldo, int T, int L, int D) {
  int i = 0;
  for (; i + 6 <= T; i += 6) py_rows<6>(P + i * ldp, ldp, Y, ldy, O + i * ldo, ldo, L, D);
  for (; i + 2 <= T; i += 2) py_rows<2>(P + i * ldp, ldp, Y, ldy, O + i * ldo, ldo, L, D);
  if (i < T) py_rows<1>(P + i * ldp, ldp, Y, ldy, O + i * ldo, ldo, L, D);
}

// O[L x D] += P^T . X with P[T x L], X[T x D], through P^T in `scratch` ([L x T]).
void mm_ptx(const float* P, int ldp, const float* X, int ldx, float* O, int ldo, int T, int L, int D, float* scratch) {
  for (int j0 = 0; j0 < L; j0 += VW)  // VW columns at a time: one vector load per row
    for (int i = 0; i < T; i++) {
      const vf x = ld(P + i * ldp + j0);
      for (int jj = 0; jj < VW; jj++) scratch[(size_t)(j0 + jj) * T + i] = x[jj];
    }
  mm_py(scratch, T, X, ldx, O, ldo, L, T, D);
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
// The tile width of a chunk of n keys: n rounded up to 16, at most Lp (the longest chunk's).
inline int chunk_width(int64_t n, int Lp) { return std::min(Lp, round_up(std::max<int>((int)n, 1), 16)); }


// The keys of chunk c that one row of a tile may read, lanes j..j+VW-1 as 0/1: `base` is
// the mode's key mask; mode 0 (own chunk) also stops after the query's own key `lim`.
inline vf row_mask(const float* base, int j, int mode, int lim) {
  const vf m = ld(base + j);
  if (mode != 0) return m;
  const vi idx = iota() + j;
  return idx <= (vi{} + lim) ? m : vf{};
}

struct Chunks {
  const int64_t* start;
  const int64_t* len;
  const bool* kmand;  // [B, Nk]
  int C, Nk;
};

// Key masks of chunk c for modes 0, 1, 2 (each [Lp]).
void chunk_masks(const Chunks& ch, int b, int c, int Lp, float* m0, float* m1, float* m2) {
  const int64_t s = ch.start[(int64_t)b * ch.C + c], n = ch.len[(int64_t)b * ch.C + c];
  const bool* km = ch.kmand + (int64_t)b * ch.Nk + s;
  for (int j = 0; j < Lp; j++) {
    const bool valid = j < n;
    const bool mand = valid && km[j];
    m0[j] = valid ? 1.0f : 0.0f;
    m1[j] = (valid && !mand) ? 1.0f : 0.0f;
    m2[j] = mand ? 1.0f : 0.0f;
  }
}

}  // namespace

// Work lists. sel [B, Hq, Nq, W] (chunk slot or -1), qslot/qdoc [B, Nq], cdoc/cmand [B, C].
// Buckets are (query segment of `seg` queries, key chunk, mode): the forward and backward
// walk one segment at a time, so the query/output rows a segment touches stay within cache
// and TLB reach (at 32k tokens the rows of a KV group span 32 MB per tensor).
// Returns (ptr [B*Hkv, 3*C*nseg + 1] int64 offsets into rows, rows int32 = g * Nq + q).
std::vector<at::Tensor> moc_plan(at::Tensor sel, at::Tensor qslot, at::Tensor qdoc,
                                    at::Tensor cdoc, at::Tensor cmand, int64_t Hkv, int64_t seg) {
  const int B = sel.size(0), Hq = sel.size(1), Nq = sel.size(2), W = sel.size(3);
  const int C = cdoc.size(1), G = Hq / Hkv;
  const int64_t nseg = (Nq + seg - 1) / seg, NBK = 3 * (int64_t)C * std::max<int64_t>(nseg, 1);
  const int64_t* S = sel.data_ptr<int64_t>();
  const int64_t* QS = qslot.data_ptr<int64_t>();
  const int64_t* QD = qdoc.data_ptr<int64_t>();
  const int64_t* CD = cdoc.data_ptr<int64_t>();
  const int64_t* CM = cmand.data_ptr<int64_t>();
  auto ptr = at::zeros({(int64_t)B * Hkv, NBK + 1}, at::kLong);
  int64_t* P = ptr.data_ptr<int64_t>();
  std::vector<std::vector<int>> mslots(B);
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++)
      if (CM[(int64_t)b * C + c] > 0) mslots[b].push_back(c);
  // visit(bh, fn): every (bucket, row) pair of (b, hk), in a fixed order
  auto visit = [&](int bh, auto&& fn) {
    const int b = bh / Hkv, hk = bh % Hkv;
    for (int g = 0; g < G; g++) {
      const int h = hk * G + g;
      for (int i = 0; i < Nq; i++) {
        const int64_t s = QS[(int64_t)b * Nq + i];
        if (s < 0) continue;
        const int row = g * Nq + i;
        const int64_t so = (i / seg) * 3 * (int64_t)C;  // the query's segment of buckets
        fn(so + 3 * s + 0, row);
        const int64_t* sr = S + (((int64_t)b * Hq + h) * Nq + i) * W;
        for (int w = 0; w < W; w++)
          if (sr[w] >= 0) fn(so + 3 * sr[w] + 1, row);
        const int64_t d = QD[(int64_t)b * Nq + i];
        for (int m : mslots[b]) {
          if (m >= s) break;
          if (CD[(int64_t)b * C + m] == d) fn(so + 3 * (int64_t)m + 2, row);
        }
      }
    }
  };
  at::parallel_for(0, (int64_t)B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; bh++) {
      int64_t* cnt = P + bh * (NBK + 1);
      visit(bh, [&](int64_t bucket, int) { cnt[bucket + 1]++; });
      for (int64_t x = 0; x < NBK; x++) cnt[x + 1] += cnt[x];
    }
  });
  // global offsets: bucket offsets of (b, hk) are relative to its own base
  std::vector<int64_t> base((size_t)B * Hkv + 1, 0);
  for (int64_t bh = 0; bh < (int64_t)B * Hkv; bh++) base[bh + 1] = base[bh] + P[bh * (NBK + 1) + NBK];
  auto rows = at::empty({base.back()}, at::kInt);
  int32_t* R = rows.data_ptr<int32_t>();
  at::parallel_for(0, (int64_t)B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; bh++) {
      int64_t* off = P + bh * (NBK + 1);
      for (int64_t x = 0; x <= NBK; x++) off[x] += base[bh];
      std::vector<int64_t> fill(off, off + NBK);
      visit(bh, [&](int64_t bucket, int row) { R[fill[bucket]++] = row; });
    }
  });
  return {ptr, rows};
}

// q [B, Hq, Nq, D] (pre-scaled), k/v [B, Hkv, Nk, D]; returns out [B, Hq, Nq, D], lse [B, Hq, Nq].
std::vector<at::Tensor> moc_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                       at::Tensor ptr, at::Tensor rows, at::Tensor cstart,
                                       at::Tensor clen, at::Tensor kmand, int64_t Lmax) {
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int Hkv = k.size(1), Nk = k.size(2), G = Hq / Hkv, C = cstart.size(1);
  const int Lp = round_up(std::max<int>(Lmax, 1), 16);
  const int64_t NBK = ptr.size(1) - 1;
  auto out = at::zeros_like(q);
  auto lse = at::zeros({B, Hq, Nq}, q.options());
  const Chunks ch{cstart.data_ptr<int64_t>(), clen.data_ptr<int64_t>(), kmand.data_ptr<bool>(), C, Nk};
  const int64_t* P = ptr.data_ptr<int64_t>();
  const int32_t* R = rows.data_ptr<int32_t>();
  const float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>(), *V = v.data_ptr<float>();
  float *O = out.data_ptr<float>(), *LSE = lse.data_ptr<float>();
  at::parallel_for(0, (int64_t)B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> kt((size_t)D * Lp), vc((size_t)Lp * D), qb((size_t)TB * D), sb((size_t)TB * Lp),
        ob((size_t)TB * D), msk(3 * (size_t)Lp), tmax(TB + 16), newm(TB + 16), resc(TB + 16, 0.0f);
    std::vector<float> mx, sm;
    for (int64_t bh = lo; bh < hi; bh++) {
      const int b = bh / Hkv, hk = bh % Hkv;
      const float* qg = Q + ((int64_t)b * Hq + (int64_t)hk * G) * Nq * D;  // rows g * Nq + i
      float* og = O + ((int64_t)b * Hq + (int64_t)hk * G) * Nq * D;        // accumulators
      const float* kh = K + ((int64_t)b * Hkv + hk) * Nk * D;
      const float* vh = V + ((int64_t)b * Hkv + hk) * Nk * D;
      mx.assign((size_t)G * Nq, kNeg);
      sm.assign((size_t)G * Nq, 0.0f);
      const int64_t* off = P + bh * (NBK + 1);
      for (int64_t sc = 0; sc < NBK / 3; sc++) {  // (query segment, key chunk)
        const int c = (int)(sc % C);
        if (off[3 * sc + 3] == off[3 * sc]) continue;
        const int64_t s0 = ch.start[(int64_t)b * C + c], n = ch.len[(int64_t)b * C + c];
        const int Lc = chunk_width(n, Lp);
        std::fill(kt.begin(), kt.end(), 0.0f);
        std::fill(vc.begin(), vc.begin() + (size_t)Lc * D, 0.0f);
        for (int j = 0; j < n; j++) {
          const float* kr = kh + (s0 + j) * D;
          for (int d = 0; d < D; d++) kt[(size_t)d * Lp + j] = kr[d];
          std::memcpy(&vc[(size_t)j * D], vh + (s0 + j) * D, sizeof(float) * D);
        }
        chunk_masks(ch, b, c, Lp, &msk[0], &msk[Lp], &msk[2 * Lp]);
        for (int mode = 0; mode < 3; mode++) {
          const int64_t r0 = off[3 * sc + mode], r1 = off[3 * sc + mode + 1];
          for (int64_t t = r0; t < r1; t += TB) {
            const int nb = (int)std::min<int64_t>(TB, r1 - t);  // the micro-kernels take any row count
            for (int r = 0; r < nb; r++) copy_row(&qb[(size_t)r * D], qg + (int64_t)R[t + r] * D, D);
            mm_xyt(qb.data(), D, kt.data(), Lp, sb.data(), Lp, nb, D, Lc);
            std::fill(ob.begin(), ob.begin() + (size_t)nb * D, 0.0f);
            const float* base = &msk[(size_t)mode * Lp];
            // the new running max of each row first, so the tile is exponentiated against
            // it directly; `resc` = exp(old max - new max) rescales the row's state
            for (int r = 0; r < nb; r++) {
              const float* srow = &sb[(size_t)r * Lp];
              const int lim = (int)(Nk - Nq + R[t + r] % Nq - s0);
              vf mv = splat(kNeg);
              for (int j = 0; j < Lc; j += VW) {
                const vf y = row_mask(base, j, mode, lim) > 0 ? ld(srow + j) : splat(kNeg);
                mv = y > mv ? y : mv;
              }
              float m = kNeg;
              for (int x = 0; x < VW; x++) m = std::max(m, mv[x]);
              const float mo = mx[R[t + r]];
              tmax[r] = m;
              newm[r] = std::max(mo, m);
              resc[r] = mo - newm[r];
            }
            for (int r = 0; r < nb; r += VW) st(&resc[r], vexp(ld(&resc[r])));
            for (int r = 0; r < nb; r++) {
              float* srow = &sb[(size_t)r * Lp];
              const int64_t row = R[t + r];
              if (tmax[r] == kNeg) {  // no key of this chunk is allowed for this row
                std::fill(srow, srow + Lc, 0.0f);
                continue;
              }
              const int lim = (int)(Nk - Nq + row % Nq - s0);
              const vf mv = splat(newm[r]);
              vf acc = vf{};
              for (int j = 0; j < Lc; j += VW) {
                const vf e = vexp(ld(srow + j) - mv) * row_mask(base, j, mode, lim);
                st(srow + j, e);
                acc += e;
              }
              float l = 0;
              for (int x = 0; x < VW; x++) l += acc[x];
              sm[row] = sm[row] * resc[r] + l;
              mx[row] = newm[r];
            }
            mm_py(sb.data(), Lp, vc.data(), D, ob.data(), D, nb, Lc, D);
            for (int r = 0; r < nb; r++) {
              float* orow = og + (int64_t)R[t + r] * D;
              const float* tr = &ob[(size_t)r * D];
              const vf av = splat(resc[r]);
              for (int d = 0; d < D; d += VW) st(orow + d, ld(orow + d) * av + ld(tr + d));
            }
          }
        }
      }
      float* lg = LSE + ((int64_t)b * Hq + (int64_t)hk * G) * Nq;
      for (int64_t row = 0; row < (int64_t)G * Nq; row++) {
        const float l = sm[row];
        float* orow = og + row * D;
        if (l > 0) {
          const float inv = 1.0f / l;
          for (int d = 0; d < D; d++) orow[d] *= inv;
          lg[row] = mx[row] + std::log(l);
        } else {
          for (int d = 0; d < D; d++) orow[d] = 0.0f;
          lg[row] = 0.0f;
        }
      }
    }
  });
  return {out, lse};
}

// Gradients: dq (w.r.t. the pre-scaled q), dk, dv. delta [B, Hq, Nq] = rowsum(dout * out).
std::vector<at::Tensor> moc_backward(at::Tensor q, at::Tensor k, at::Tensor v,
                                        at::Tensor dout, at::Tensor lse, at::Tensor delta,
                                        at::Tensor ptr, at::Tensor rows, at::Tensor cstart,
                                        at::Tensor clen, at::Tensor kmand, int64_t Lmax) {
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int Hkv = k.size(1), Nk = k.size(2), G = Hq / Hkv, C = cstart.size(1);
  const int Lp = round_up(std::max<int>(Lmax, 1), 16);
  const int64_t NBK = ptr.size(1) - 1;
  auto dq = at::zeros_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  const Chunks ch{cstart.data_ptr<int64_t>(), clen.data_ptr<int64_t>(), kmand.data_ptr<bool>(), C, Nk};
  const int64_t* P = ptr.data_ptr<int64_t>();
  const int32_t* R = rows.data_ptr<int32_t>();
  const float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>(), *V = v.data_ptr<float>();
  const float *DO = dout.data_ptr<float>(), *LS = lse.data_ptr<float>(), *DL = delta.data_ptr<float>();
  float *DQ = dq.data_ptr<float>(), *DK = dk.data_ptr<float>(), *DV = dv.data_ptr<float>();
  at::parallel_for(0, (int64_t)B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> kt((size_t)D * Lp), vt((size_t)D * Lp), kc((size_t)Lp * D), dkc((size_t)Lp * D),
        dvc((size_t)Lp * D), qb((size_t)TB * D), gb((size_t)TB * D), pb((size_t)TB * Lp), db((size_t)TB * Lp),
        dqb((size_t)TB * D), msk(3 * (size_t)Lp), tr((size_t)TB * Lp);
    for (int64_t bh = lo; bh < hi; bh++) {
      const int b = bh / Hkv, hk = bh % Hkv;
      const int64_t g0 = ((int64_t)b * Hq + (int64_t)hk * G) * Nq;  // first row of the group
      const float* kh = K + ((int64_t)b * Hkv + hk) * Nk * D;
      const float* vh = V + ((int64_t)b * Hkv + hk) * Nk * D;
      float* dkh = DK + ((int64_t)b * Hkv + hk) * Nk * D;
      float* dvh = DV + ((int64_t)b * Hkv + hk) * Nk * D;
      const int64_t* off = P + bh * (NBK + 1);
      for (int64_t sc = 0; sc < NBK / 3; sc++) {  // (query segment, key chunk)
        const int c = (int)(sc % C);
        if (off[3 * sc + 3] == off[3 * sc]) continue;
        const int64_t s0 = ch.start[(int64_t)b * C + c], n = ch.len[(int64_t)b * C + c];
        const int Lc = chunk_width(n, Lp);
        std::fill(kt.begin(), kt.end(), 0.0f);
        std::fill(vt.begin(), vt.end(), 0.0f);
        std::fill(kc.begin(), kc.begin() + (size_t)Lc * D, 0.0f);
        std::fill(dkc.begin(), dkc.begin() + (size_t)Lc * D, 0.0f);
        std::fill(dvc.begin(), dvc.begin() + (size_t)Lc * D, 0.0f);
        for (int j = 0; j < n; j++) {
          const float* kr = kh + (s0 + j) * D;
          const float* vr = vh + (s0 + j) * D;
          for (int d = 0; d < D; d++) {
            kt[(size_t)d * Lp + j] = kr[d];
            vt[(size_t)d * Lp + j] = vr[d];
          }
          std::memcpy(&kc[(size_t)j * D], kr, sizeof(float) * D);
        }
        chunk_masks(ch, b, c, Lp, &msk[0], &msk[Lp], &msk[2 * Lp]);
        for (int mode = 0; mode < 3; mode++) {
          const int64_t r0 = off[3 * sc + mode], r1 = off[3 * sc + mode + 1];
          for (int64_t t = r0; t < r1; t += TB) {
            const int nb = (int)std::min<int64_t>(TB, r1 - t);
            for (int r = 0; r < nb; r++) {
              const int64_t row = g0 + R[t + r];
              copy_row(&qb[(size_t)r * D], Q + row * D, D);
              copy_row(&gb[(size_t)r * D], DO + row * D, D);
            }
            mm_xyt(qb.data(), D, kt.data(), Lp, pb.data(), Lp, nb, D, Lc);  // scores
            mm_xyt(gb.data(), D, vt.data(), Lp, db.data(), Lp, nb, D, Lc);  // dP = dO V^T
            for (int r = 0; r < nb; r++) {
              float* prow = &pb[(size_t)r * Lp];
              float* drow = &db[(size_t)r * Lp];
              const int64_t row = g0 + R[t + r];
              const int i = R[t + r] % Nq;
              const int lim = (int)(Nk - Nq + i - s0);
              const float* base = &msk[(size_t)mode * Lp];
              const vf lv = splat(LS[row]), dl = splat(DL[row]);
              for (int j = 0; j < Lc; j += VW) {
                vf p = vexp(ld(prow + j) - lv) * row_mask(base, j, mode, lim);
                st(prow + j, p);
                st(drow + j, p * (ld(drow + j) - dl));  // dS
              }
            }
            mm_ptx(pb.data(), Lp, gb.data(), D, dvc.data(), D, nb, Lc, D, tr.data());  // dV += P^T dO
            mm_ptx(db.data(), Lp, qb.data(), D, dkc.data(), D, nb, Lc, D, tr.data());  // dK += dS^T Q
            std::fill(dqb.begin(), dqb.begin() + (size_t)nb * D, 0.0f);
            mm_py(db.data(), Lp, kc.data(), D, dqb.data(), D, nb, Lc, D);   // dQ = dS K
            for (int r = 0; r < nb; r++) {
              float* dr = DQ + (g0 + R[t + r]) * D;
              const float* tr = &dqb[(size_t)r * D];
              for (int d = 0; d < D; d += VW) st(dr + d, ld(dr + d) + ld(tr + d));
            }
          }
        }
        for (int j = 0; j < n; j++) {
          float* a = dkh + (s0 + j) * D;
          float* bq = dvh + (s0 + j) * D;
          for (int d = 0; d < D; d++) {
            a[d] += dkc[(size_t)j * D + d];
            bq[d] += dvc[(size_t)j * D + d];
          }
        }
      }
    }
  });
  return {dq, dk, dv};
}

// Routing (no drop-off / drop-in): for each query and head the top-k candidate chunks by
// q . descriptor. Candidates of a query: routable chunks (cand) of its document with a
// slot below its own. q [B, Hq, Nq, D], desc [B, Hkv, C, D] float32; cand [B, C] bool;
// cdoc [B, C], qslot / qdoc [B, Nq] int64. Returns sel [B, Hq, Nq, kk] int64 (-1 = none):
// the chunks above the k-th score in ascending slot order, then ties at it, lowest slots first.
at::Tensor moc_route(at::Tensor q, at::Tensor desc, at::Tensor cand, at::Tensor cdoc,
                        at::Tensor qslot, at::Tensor qdoc, int64_t kk) {
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int Hkv = desc.size(1), C = desc.size(2), G = Hq / Hkv;
  const int Cp = round_up(std::max(C, 1), 16);
  auto sel = at::full({B, Hq, Nq, kk}, -1, at::kLong);
  const float *Q = q.data_ptr<float>(), *DS = desc.data_ptr<float>();
  const bool* CA = cand.data_ptr<bool>();
  const int64_t *CD = cdoc.data_ptr<int64_t>(), *QS = qslot.data_ptr<int64_t>(), *QD = qdoc.data_ptr<int64_t>();
  int64_t* SEL = sel.data_ptr<int64_t>();
  at::parallel_for(0, (int64_t)B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> dt((size_t)D * Cp), sb((size_t)TB * Cp), vals(Cp);
    std::vector<int> elig;
    for (int64_t bh = lo; bh < hi; bh++) {
      const int b = bh / Hkv, hk = bh % Hkv;
      std::fill(dt.begin(), dt.end(), 0.0f);
      const float* dh = DS + ((int64_t)b * Hkv + hk) * C * D;
      for (int c = 0; c < C; c++)
        for (int d = 0; d < D; d++) dt[(size_t)d * Cp + c] = dh[(int64_t)c * D + d];
      int i0 = 0;
      while (i0 < Nq) {  // runs of queries with the same own chunk and document
        const int64_t s = QS[(int64_t)b * Nq + i0], doc = QD[(int64_t)b * Nq + i0];
        int i1 = i0 + 1;
        while (i1 < Nq && i1 - i0 < TB && QS[(int64_t)b * Nq + i1] == s && QD[(int64_t)b * Nq + i1] == doc) i1++;
        elig.clear();
        for (int c = 0; c < std::min<int64_t>(s, C); c++)
          if (CA[(int64_t)b * C + c] && CD[(int64_t)b * C + c] == doc) elig.push_back(c);
        const int m = (int)elig.size();
        const bool prefix = m > 0 && elig[m - 1] == m - 1;  // candidates are slots 0..m-1
        if (s >= 0 && m > 0) {
          const int Ls = round_up((int)std::min<int64_t>(s, C), 16);
          for (int g = 0; g < G; g++) {
            const int h = hk * G + g;
            const float* qr = Q + (((int64_t)b * Hq + h) * Nq + i0) * D;
            mm_xyt(qr, D, dt.data(), Cp, sb.data(), Ls, i1 - i0, D, Ls);
            for (int i = i0; i < i1; i++) {
              int64_t* out = SEL + (((int64_t)b * Hq + h) * Nq + i) * kk;
              const float* srow = &sb[(size_t)(i - i0) * Ls];
              if (m <= kk) {
                for (int x = 0; x < m; x++) out[x] = elig[x];
                continue;
              }
              if (prefix) std::copy(srow, srow + m, vals.begin());
              else for (int x = 0; x < m; x++) vals[x] = srow[elig[x]];
              std::nth_element(vals.begin(), vals.begin() + (kk - 1), vals.begin() + m, std::greater<float>());
              const float thr = vals[kk - 1];
              int n = 0;
              for (int x = 0; x < m; x++) {  // everything above the k-th score...
                const int c = prefix ? x : elig[x];
                if (srow[c] > thr) out[n++] = c;
              }
              for (int x = 0; x < m && n < kk; x++) {  // ...then ties at it, lowest slots first
                const int c = prefix ? x : elig[x];
                if (srow[c] == thr) out[n++] = c;
              }
            }
          }
        }
        i0 = i1;
      }
    }
  });
  return sel;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moc_route", &moc_route, "MoC top-k routing (CPU)");
  m.def("moc_plan", &moc_plan, "MoC work lists (CPU)");
  m.def("moc_forward", &moc_forward, "MoC attention forward (CPU)");
  m.def("moc_backward", &moc_backward, "MoC attention backward (CPU)");
}
