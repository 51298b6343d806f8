// Host harness for csrc/cuda/quantize_act_layout.cuh (compiled with g++ by tests/test_cuda_quantize_layout.py).
//
//   quantize_act_host quant IN OUT   the kernel's per-(row, group) arithmetic, element for element (see quant())
//   quantize_act_host div-exhaustive bf16|fp16   div_by_recip claims (A)-(C) for all 2^32 (x, λ) pairs
//   quantize_act_host div-fp32-lambda            bf16 x × every fp32 λ significand + edge cases
//   quantize_act_host div7-exhaustive            act_scale_fast == amax / 7
//   quantize_act_host e4m3-table                 e4m3_of_int_float against the FP8 table
//   quantize_act_host nibble-sweep   quant_nibble (fast path) == quant_nibble_ref on adversarial values
//   quantize_act_host plan           make_plan invariants over a grid of sizes
#include "cuda/quantize_act_layout.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

using namespace svdq::qact;

// The kernel's per-(row, group) orchestration (quantize_step in quantize_act.cu), 8 "lanes" of 8 elements:
// x̂ by the corrected reciprocal (or '/' for unusable λ), NaN-propagating amax over the lanes, exact group or
// fast path + per-lane near-tie fallback. IN: int32 rows, int32 kp, int32 recip_allowed, fp32 x[rows*kp]
// (zero-padded, values exactly representable in the 16-bit dtype), fp32 lam[kp] (1 beyond K).
// OUT: uint8 qact[rows*kp/2], fp32 ascales[rows*kp/64], uint8 e4m3[rows*kp].
static int quant(const char* in, const char* out) {
  FILE* f = std::fopen(in, "rb");
  if (!f) return 2;
  int32_t rows = 0, kp = 0, recip_allowed = 1;
  if (std::fread(&rows, 4, 1, f) != 1 || std::fread(&kp, 4, 1, f) != 1 || std::fread(&recip_allowed, 4, 1, f) != 1)
    return 2;
  std::vector<float> x((size_t)rows * kp), lam(kp);
  if (std::fread(x.data(), 4, x.size(), f) != x.size() || std::fread(lam.data(), 4, lam.size(), f) != lam.size())
    return 2;
  std::fclose(f);
  const int groups = kp / kGroup;
  std::vector<uint8_t> q((size_t)rows * kp / 2), q8((size_t)rows * kp);
  std::vector<float> sc((size_t)rows * groups);
  for (int r = 0; r < rows; ++r)
    for (int g = 0; g < groups; ++g) {
      float xh[8][8], rv[8][8], amax_l[8];
      bool use_recip[8];
      for (int c = 0; c < 8; ++c) {
        const float* xv = &x[(size_t)r * kp + g * kGroup + c * 8];
        const float* lv = &lam[g * kGroup + c * 8];
        float rcp[8];
        use_recip[c] = recip_allowed != 0;
        for (int e = 0; e < 8; ++e) {
          rcp[e] = 1.0f / lv[e];
          use_recip[c] = use_recip[c] && recip_ok(lv[e]);
        }
        amax_l[c] = xhat8(xv, lv, rcp, use_recip[c], xh[c]);
      }
      float amax = 0.f;
      for (int c = 0; c < 8; ++c) amax = amax_nan(amax, amax_l[c]);
      uint32_t words[8];
      float sa;
      if (group_needs_exact(amax)) {
        amax = 0.f;
        for (int c = 0; c < 8; ++c) {
          const float* xv = &x[(size_t)r * kp + g * kGroup + c * 8];
          amax = amax_nan(amax, xhat8(xv, &lam[g * kGroup + c * 8], nullptr, false, xh[c]));
        }
        sa = act_scale(amax);
        for (int c = 0; c < 8; ++c) words[c] = quant8_ref(xh[c], sa, rv[c]);
      } else {
        sa = act_scale_fast(amax);
        for (int c = 0; c < 8; ++c) {
          bool near = false;
          words[c] = quant8_fast(xh[c], 1.0f / sa, near, rv[c]);
          if (near) words[c] = quant8_ref(xh[c], sa, rv[c]);
        }
      }
      sc[(size_t)r * groups + g] = sa;
      for (int c = 0; c < 8; ++c) {
        const int step = g / kGroupsPerStep, col8 = (g % kGroupsPerStep) * 8 + c;
        const int64_t off = qact_word_offset(r, step, col8, kp / 2);
        for (int b = 0; b < 4; ++b) q[off + b] = (uint8_t)(words[c] >> (8 * b));
        const int64_t off8 = qact_e4m3_offset(r, step, col8, kp);
        for (int e = 0; e < 8; ++e) q8[off8 + e] = (uint8_t)e4m3_of_int_float(rv[c][e]);
      }
    }
  FILE* o = std::fopen(out, "wb");
  if (!o) return 2;
  std::fwrite(q.data(), 1, q.size(), o);
  std::fwrite(sc.data(), 4, sc.size(), o);
  std::fwrite(q8.data(), 1, q8.size(), o);
  std::fclose(o);
  return 0;
}

static int nibble_sweep() {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::uniform_int_distribution<int> ex(-60, 60);
  long checked = 0, slow = 0, bad = 0;
  for (int it = 0; it < 200000; ++it) {
    const float amax = std::ldexp(std::fabs(u(rng)) + 1e-3f, ex(rng));
    const float s = act_scale(amax);
    const bool exact = group_needs_exact(amax);
    const float inv = exact ? 0.f : 1.0f / s;
    float cands[12];
    int n = 0;
    const int k = (int)std::floor(u(rng) * 8.f);  // -8..7
    const float tie = (k + 0.5f) * s;
    cands[n++] = tie;
    cands[n++] = std::nextafter(tie, INFINITY);
    cands[n++] = std::nextafter(tie, -INFINITY);
    cands[n++] = std::nextafter(std::nextafter(tie, INFINITY), INFINITY);
    cands[n++] = std::nextafter(std::nextafter(tie, -INFINITY), -INFINITY);
    cands[n++] = u(rng) * amax;
    cands[n++] = amax;
    cands[n++] = -amax;
    cands[n++] = std::nextafter(amax, 0.f);
    cands[n++] = k * s;
    cands[n++] = 0.f;
    cands[n++] = std::nextafter(7.5f * s, 0.f);
    for (int i = 0; i < n; ++i) {
      float x = cands[i];
      if (fabs_hd(x) > amax) continue;  // |xhat| <= amax holds in a real group
      ++checked;
      const uint32_t b = quant_nibble_ref(x, s);
      // the kernel's inv_s is MUFU.RCP (within 1 ulp of 1/s): the fast path must hold within ±2 ulp
      uint32_t a = quant_nibble(x, s, inv, exact);
      for (int d = -2; d <= 2 && !exact; ++d) {
        float iv = inv;
        for (int k = 0; k < (d < 0 ? -d : d); ++k) iv = std::nextafter(iv, d < 0 ? 0.f : INFINITY);
        const uint32_t ad = quant_nibble(x, s, iv, false);
        if (ad != b) a = ad;
      }
      float t = mul_rn(x, inv);
      if (fabs_hd(((t + kMagic) - kMagic) - t) > kNearTie) ++slow;
      if (a != b) {
        if (++bad < 10) std::printf("MISMATCH x=%a s=%a fast=%u ref=%u\n", x, s, a, b);
      }
    }
  }
  // exact ties with exactly representable scales: round-half-even
  for (int k = -9; k <= 8; ++k) {
    const float s = 1.0f;  // amax = 7
    const float x = k + 0.5f;
    if (fabs_hd(x) > 7.f) continue;
    const uint32_t a = quant_nibble(x, s, 1.0f, false);
    const int want = (int)std::nearbyint(x);  // default rounding mode: half-even
    const int wc = want < -8 ? -8 : (want > 7 ? 7 : want);
    if (a != ((uint32_t)wc & 0xFu)) {
      ++bad;
      std::printf("TIE MISMATCH x=%g got=%u want=%d\n", x, a, wc);
    }
    ++checked;
  }
  std::printf("checked=%ld slow_path=%ld bad=%ld\n", checked, slow, bad);
  return bad ? 1 : 0;
}

static int plan() {
  long bad = 0, n = 0;
  const int64_t Ms[] = {1, 3, 37, 64, 65, 118, 1000, 4096, 4608, 9216, 100000};
  const int64_t Ks[] = {1, 63, 64, 100, 128, 129, 3072, 12288, 65536};
  const int rs[] = {0, 16, 32, 48, 64, 80, 256, 512};
  const int slots[] = {1, 80, 132, 264, 396};
  for (int64_t M : Ms)
    for (int64_t K : Ks)
      for (int r : rs)
        for (int s : slots)
          for (int ov : {0, 1, 3, 7}) {
            QuantPlan p = make_plan(M, K, r, s, ov);
            ++n;
            const int64_t kp = (K + 63) / 64 * 64;
            bool ok = p.ksplit >= 1 && p.ksplit <= (ov ? ov : 16) && p.steps == (kp + kBK - 1) / kBK &&
                      (int64_t)p.ksplit * p.steps_per_split >= p.steps &&
                      (int64_t)(p.ksplit - 1) * p.steps_per_split < p.steps &&  // no empty split
                      p.row_tiles == (M + kBM - 1) / kBM &&
                      (r == 0 ? (p.rank_chunk == 0 && p.rank_chunks == 1)
                              : ((int64_t)p.rank_chunk * p.rank_chunks >= r &&
                                 (int64_t)p.rank_chunk * (p.rank_chunks - 1) < r));
            if (!ok) {
              if (++bad < 10)
                std::printf("BAD PLAN M=%ld K=%ld r=%d slots=%d ov=%d: ksplit=%d spl=%d steps=%d rc=%d x%d\n",
                            (long)M, (long)K, r, s, ov, p.ksplit, p.steps_per_split, p.steps, p.rank_chunk,
                            p.rank_chunks);
            }
          }
  QuantPlan f = make_plan(4608, 3072, 32, 264);
  QuantPlan g = make_plan(4608, 12288, 32, 264);
  std::printf("plans=%ld bad=%ld flux3072: tiles=%d steps=%d ksplit=%d spl=%d | flux12288: ksplit=%d spl=%d\n", n,
              bad, f.row_tiles, f.steps, f.ksplit, f.steps_per_split, g.ksplit, g.steps_per_split);
  return bad ? 1 : 0;
}

// ---- exhaustive proofs of the division shortcuts (docs/kernels.md §11) ----------------------------------
static float bf16_val(uint32_t h) {
  const uint32_t b = h << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
static float fp16_val(uint32_t h) {
  const uint32_t s = (h >> 15) & 1, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  float f;
  if (e == 0) f = std::ldexp((float)m, -24);
  else if (e == 31) f = m ? NAN : INFINITY;
  else f = std::ldexp((float)(m | 0x400), (int)e - 25);
  return s ? -f : f;
}
static uint32_t fbits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

static int g_printed = 0;
// For one x: the number of λ in lam[0..n) (with their IEEE reciprocals rcp[]) for which div_by_recip breaks
// claims (A)-(C) of quantize_act_layout.cuh. Branch-free so that g++ vectorizes it.
static long div_claims_bad(float x, const float* lam, const float* rcp, const int32_t* ok, long n, float* bad_lam) {
  int32_t bad_any = 0;
  for (long j = 0; j < n; ++j) {
    const float q = div_by_recip(x, lam[j], rcp[j]);
    const float Q = x / lam[j];
    const float aq = fabs_hd(q), aQ = fabs_hd(Q);
    const int32_t inA = (aQ >= 0x1p-80f) & (aQ <= 0x1p120f);
    const int32_t inB = aQ < 0x1p-80f;
    const int32_t inC = !(aQ <= 0x1p120f);
    const int32_t badA = inA & (fbits(q) != fbits(Q));
    const int32_t badB = inB & !(aq < 0x1p-79f);
    const int32_t badC = inC & (aq <= 0x1p120f);
    bad_any |= ok[j] & (badA | badB | badC);
  }
  if (!bad_any) return 0;
  long cnt = 0;  // slow recount for the report
  for (long j = 0; j < n; ++j) {
    if (!ok[j]) continue;
    const float q = div_by_recip(x, lam[j], rcp[j]), Q = x / lam[j];
    const float aq = fabs_hd(q), aQ = fabs_hd(Q);
    bool b = false;
    if (aQ >= 0x1p-80f && aQ <= 0x1p120f) b = fbits(q) != fbits(Q);
    else if (aQ < 0x1p-80f) b = !(aq < 0x1p-79f);
    else b = aq <= 0x1p120f;
    if (b) {
      if (cnt < 2 && g_printed++ < 20) std::printf("  x=%a lam=%a fast=%a ieee=%a\n", x, lam[j], q, Q);
      *bad_lam = lam[j];
      ++cnt;
    }
  }
  return cnt;
}

// All 2^16 x × 2^16 λ of one 16-bit format.
static int div_exhaustive(const char* fmt) {
  const bool bf = !std::strcmp(fmt, "bf16");
  std::vector<float> lam(65536), rcp(65536);
  std::vector<int32_t> ok(65536);
  long usable = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    lam[h] = bf ? bf16_val(h) : fp16_val(h);
    rcp[h] = 1.0f / lam[h];
    ok[h] = recip_ok(lam[h]) ? -1 : 0;
    usable += ok[h] != 0;
  }
  long bad = 0, pairs = 0;
  float bl = 0.f;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float x = bf ? bf16_val(h) : fp16_val(h);
    bad += div_claims_bad(x, lam.data(), rcp.data(), ok.data(), 65536, &bl);
    pairs += usable;
  }
  std::printf("div-exhaustive %s: pairs=%ld (lambda usable %ld of 65536) bad=%ld\n", fmt, pairs, usable, bad);
  return bad ? 1 : 0;
}

// bf16 x × fp32 λ: every bf16 significand × every fp32 significand (x ∈ [1, 2), λ ∈ [1, 2), both orders of
// magnitude of the quotient covered by scaling x by 2) — with nothing under- or overflowing this is every
// (x, λ) of the safe range — plus random edge cases over all exponents (claims (A)-(C)).
static int div_fp32_lambda() {
  const long n = 1L << 23;
  std::vector<float> lam(n), rcp(n);
  std::vector<int32_t> ok(n, -1);
  for (long m = 0; m < n; ++m) {
    uint32_t b = 0x3F800000u | (uint32_t)m;
    std::memcpy(&lam[m], &b, 4);
    rcp[m] = 1.0f / lam[m];
  }
  long bad = 0, pairs = 0;
  float bl = 0.f;
  for (uint32_t xm = 0; xm < 128; ++xm) {
    for (int sc = 0; sc < 2; ++sc) {
      const float x = bf16_val(0x3F80u | xm) * (sc ? 2.0f : 1.0f);
      bad += div_claims_bad(x, lam.data(), rcp.data(), ok.data(), n, &bl);
      pairs += n;
    }
  }
  // edge cases: random bf16 x against fp32 λ of every exponent, incl. the recip_ok boundaries
  std::mt19937 rng(7);
  std::vector<float> el, er;
  std::vector<int32_t> eo;
  for (int e = -149; e <= 128; ++e)
    for (int k = 0; k < 64; ++k) {
      const uint32_t mant = k < 2 ? (k ? 0x7FFFFFu : 0u) : (rng() & 0x7FFFFFu);
      float l = e <= -127 ? std::ldexp((float)mant, -149) : std::ldexp(1.0f + mant / 8388608.0f, e);
      if (k & 1) l = -l;
      el.push_back(l);
      er.push_back(1.0f / l);
      eo.push_back(recip_ok(l) ? -1 : 0);
    }
  for (uint32_t h = 0; h < 65536; ++h) {
    bad += div_claims_bad(bf16_val(h), el.data(), er.data(), eo.data(), (long)el.size(), &bl);
    pairs += (long)el.size();
  }
  std::printf("div-fp32-lambda: pairs=%ld bad=%ld\n", pairs, bad);
  return bad ? 1 : 0;
}

// act_scale_fast(amax) == amax / 7 for every fp32 significand at the ends and the middle of [2^-80, 2^120].
static int div7_exhaustive() {
  long bad = 0, n = 0;
  for (int e : {-60, -59, -1, 0, 1, 119, 120}) {
    for (uint32_t m = 0; m < (1u << 23); ++m) {
      uint32_t b = ((uint32_t)(e + 127) << 23) | m;
      float a;
      std::memcpy(&a, &b, 4);
      if (a > kExactHi) continue;
      bad += fbits(act_scale_fast(a)) != fbits(act_scale(a));
      ++n;
    }
  }
  std::printf("div7-exhaustive: checked=%ld bad=%ld\n", n, bad);
  return bad ? 1 : 0;
}

// rcp16_refine(λ, r0) == RN(1/λ) for every 11-bit significand and r0 within ±2 ulp of RN(1/λ).
static int rcp16() {
  long bad = 0, n = 0;
  for (uint32_t mm = 0; mm < (1u << 10); ++mm) {
    for (int sgn = 0; sgn < 2; ++sgn) {
      const uint32_t b = (sgn ? 0xBF800000u : 0x3F800000u) | (mm << 13);
      float l;
      std::memcpy(&l, &b, 4);
      const float R = 1.0f / l;
      for (int k = -2; k <= 2; ++k) {
        float r0 = R;
        for (int i = 0; i < (k < 0 ? -k : k); ++i) r0 = std::nextafter(r0, k < 0 ? 0.f : (sgn ? -INFINITY : INFINITY));
        if (fbits(rcp16_refine(l, r0)) != fbits(R)) ++bad;
        ++n;
      }
    }
  }
  std::printf("rcp16: checked=%ld bad=%ld\n", n, bad);
  return bad ? 1 : 0;
}

// e4m3_of_int_float: the exact float8_e4m3fn byte of every code -8..7 (table from the OCP FP8 spec).
static int e4m3_table() {
  const uint8_t want[16] = {0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E,   // 0..7
                            0xD0, 0xCE, 0xCC, 0xCA, 0xC8, 0xC4, 0xC0, 0xB8};  // -8..-1
  long bad = 0;
  for (int q = -8; q <= 7; ++q) {
    const uint32_t got = e4m3_of_int_float((float)q);
    if (got != want[q & 15]) {
      ++bad;
      std::printf("e4m3(%d) = %02x, want %02x\n", q, got, want[q & 15]);
    }
  }
  if (e4m3_of_int_float(-0.0f) != 0) ++bad;
  std::printf("e4m3-table: bad=%ld\n", bad);
  return bad ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc >= 3 && !std::strcmp(argv[1], "div-exhaustive")) return div_exhaustive(argv[2]);
  if (argc >= 2 && !std::strcmp(argv[1], "div-fp32-lambda")) return div_fp32_lambda();
  if (argc >= 2 && !std::strcmp(argv[1], "div7-exhaustive")) return div7_exhaustive();
  if (argc >= 2 && !std::strcmp(argv[1], "e4m3-table")) return e4m3_table();
  if (argc >= 2 && !std::strcmp(argv[1], "rcp16")) return rcp16();
  if (argc >= 4 && !std::strcmp(argv[1], "quant")) return quant(argv[2], argv[3]);
  if (argc >= 2 && !std::strcmp(argv[1], "nibble-sweep")) return nibble_sweep();
  if (argc >= 2 && !std::strcmp(argv[1], "plan")) return plan();
  std::fprintf(stderr, "usage: %s quant IN OUT | nibble-sweep | plan\n", argv[0]);
  return 2;
}
