// Host test of the Hopper GEMM layouts (csrc/cuda/w4a4_gemm_sm90_layout.cuh) against definitions written
// independently here: CUTLASS's Swizzle<B,M,S> for the 64B/128B smem swizzles, the PTX ISA's wgmma D and
// 16-bit A fragment tables, e4m3's bit layout. Run by tests/test_sm90_layout.py (no GPU, no CUDA toolkit).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "w4a4_gemm_sm90_layout.cuh"

using namespace svdq::cuda::sm90;

static int failures = 0;
#define CHECK(cond, ...)                                     \
  do {                                                       \
    if (!(cond)) {                                           \
      if (++failures < 20) {                                 \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                            \
        std::printf("\n");                                   \
      }                                                      \
    }                                                        \
  } while (0)

// CUTLASS Swizzle<B, M, S>: bits [M+S, M+S+B) of the byte offset are XORed into bits [M, M+B).
static int cute_swizzle(int off, int B, int M, int S) { return off ^ (((off >> (M + S)) & ((1 << B) - 1)) << M); }

// e4m3fn decode from the bit layout: S EEEE MMM, bias 7, subnormals at E = 0.
static double e4m3_decode(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  const double v = e ? std::ldexp(1.0 + m / 8.0, e - 7) : std::ldexp(m / 8.0, -6);
  return s ? -v : v;
}

int main() {
  // 1. swizzles: the byte position of (row, byte) equals Swizzle<2,4,3> / Swizzle<3,4,3> of the linear offset,
  //    and each 8-row atom is a permutation of itself.
  for (int r = 0; r < 128; ++r)
    for (int b = 0; b < 64; ++b) CHECK(swz64(r, b) == cute_swizzle(r * 64 + b, 2, 4, 3), "swz64(%d,%d)", r, b);
  for (int r = 0; r < 128; ++r)
    for (int b = 0; b < 128; ++b) CHECK(swz128(r, b) == cute_swizzle(r * 128 + b, 3, 4, 3), "swz128(%d,%d)", r, b);
  {
    std::set<int> seen;
    for (int r = 0; r < 8; ++r)
      for (int b = 0; b < 64; ++b) seen.insert(swz64(r, b));
    CHECK(seen.size() == 512 && *seen.begin() == 0 && *seen.rbegin() == 511, "swz64 atom not a permutation");
  }
  // 2. int4 -> e4m3 is exact for every code, -8 included (the reason the weights are e4m3 in memory).
  for (int q = -8; q <= 7; ++q) CHECK(e4m3_decode(int4_to_e4m3(q)) == q, "q=%d byte=0x%02x", q, int4_to_e4m3(q));
  CHECK(int4_to_e4m3(0) == 0x00 && int4_to_e4m3(1) == 0x38 && int4_to_e4m3(-8) == 0xD0, "known encodings");
  // 2b. fp32 -> e4m3 RNE (the W4A8 quantizer): against a brute-force nearest search over the finite codes,
  //     ties to the even code, on every tie point, values next to them, subnormals and random values.
  {
    std::vector<double> val(127);
    for (int c = 0; c < 127; ++c) val[c] = e4m3_decode(uint8_t(c));  // 0x00 .. 0x7E ascending
    auto brute = [&](float v) -> uint8_t {
      const double a = std::fabs(double(v));
      int best = 0;
      for (int c = 1; c < 127; ++c) {
        const double d = std::fabs(val[c] - a), db = std::fabs(val[best] - a);
        if (d < db || (d == db && c % 2 == 0)) best = c;
      }
      return uint8_t((v < 0 ? 0x80 : 0) | best);
    };
    std::vector<float> probes = {0.f, 448.f, -448.f, 447.99f, 1e-7f, 0.0009765625f, 0.0029296875f, 0.015625f};
    for (int c = 0; c + 1 < 127; ++c) {
      const float mid = float((val[c] + val[c + 1]) / 2);
      probes.push_back(mid);
      probes.push_back(std::nextafter(mid, 0.f));
      probes.push_back(std::nextafter(mid, 1e9f));
      probes.push_back(-mid);
    }
    uint32_t sd = 7;
    for (int i = 0; i < 20000; ++i) {
      sd = sd * 1664525u + 1013904223u;
      probes.push_back(std::ldexp(float(sd >> 8) / float(1 << 24), int(sd % 20) - 11) * ((sd >> 5) & 1 ? 1.f : -1.f));
    }
    for (float v : probes) {
      if (std::fabs(v) > 448.f) continue;
      const uint8_t got = float_to_e4m3_rne(v), want = brute(v);
      // ±0: either sign is the value 0
      CHECK(got == want || (e4m3_decode(got) == 0 && e4m3_decode(want) == 0), "v=%.9g got 0x%02x want 0x%02x", v, got, want);
    }
    CHECK(float_to_e4m3_rne(1e6f) == 0x7E && float_to_e4m3_rne(-500.f) == 0xFE, "saturation");
  }
  // 3. prepared weights: a bijection of [Np) x [K) onto [Np*K), each (channel tile, group) one contiguous
  //    8 KiB block at ((n/128)*G + g) * 8192 — the unit the producer fetches with one bulk copy.
  {
    const int N = 300, K = 192, G = K / 64;
    const int64_t Np = padded_n(N);
    CHECK(Np == 384, "padded_n(300) = %lld", (long long)Np);
    std::vector<int> hits(Np * K, 0);
    for (int64_t n = 0; n < Np; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = prepared_weight_offset(n, k, G);
        const int64_t blk = (n / 128) * G + k / 64;
        CHECK(o >= blk * 8192 && o < (blk + 1) * 8192, "n=%lld k=%lld outside its block", (long long)n, (long long)k);
        if (o >= 0 && o < Np * K) ++hits[o];
        CHECK(o - blk * 8192 == cute_swizzle(int(n % 128) * 64 + int(k % 64), 2, 4, 3), "in-block offset");
      }
    for (size_t i = 0; i < hits.size(); ++i) CHECK(hits[i] == 1, "prepared byte %zu hit %d times", i, hits[i]);
    std::vector<int> sh(Np * G, 0);
    for (int64_t n = 0; n < Np; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = prepared_wscale_index(n, g, G);
        CHECK(i / 128 == (n / 128) * G + g, "wscale block");
        ++sh[i];
      }
    for (size_t i = 0; i < sh.size(); ++i) CHECK(sh[i] == 1, "wscale %zu hit %d times", i, sh[i]);
  }
  // 4. wgmma m64n128 f32 D fragment (PTX ISA "Matrix fragments for wgmma .m64nNk*", D): warp w owns rows
  //    16w..16w+15; per 8-column block j, d[4j+0/1] at (w*16 + lane/4, 8j + 2(lane%4) + 0/1) and d[4j+2/3]
  //    8 rows below. Every (row, col) of 64 x 128 is held by exactly one (warp, lane, i).
  {
    std::vector<int> cover(64 * 128, 0);
    for (int w = 0; w < 4; ++w)
      for (int l = 0; l < 32; ++l)
        for (int j = 0; j < 16; ++j)
          for (int e = 0; e < 4; ++e) {
            const int i = 4 * j + e;
            const int row = 16 * w + l / 4 + (e >= 2 ? 8 : 0), col = 8 * j + 2 * (l % 4) + (e % 2);
            CHECK(acc_row(w, l, i) == row && acc_col(l, i) == col, "acc (%d,%d,%d)", w, l, i);
            ++cover[row * 128 + col];
          }
    for (size_t i = 0; i < cover.size(); ++i) CHECK(cover[i] == 1, "D element %zu covered %d times", i, cover[i]);
  }
  // 5. per-stage activation scales: token acc_col(lane, i) sits at row lane%4, position acc_scale_j(i) (what a
  //    thread reads with its 8 LDS.128); the 128 tokens land on distinct slots inside [4][kScalePad].
  {
    std::set<int> slots;
    for (int tk = 0; tk < 128; ++tk) {
      const int s = act_scale_slot(tk);
      CHECK(s >= 0 && s < 4 * kScalePad && s % kScalePad < 32, "slot %d of token %d", s, tk);
      slots.insert(s);
    }
    CHECK(slots.size() == 128, "act_scale_slot not injective");
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 64; ++i)
        CHECK(act_scale_slot(acc_col(l, i)) == (l % 4) * kScalePad + acc_scale_j(i), "lane %d acc %d", l, i);
  }
  // 6. 16-bit A fragment from registers (PTX ISA wgmma .m64nNk16 A, = mma.m16n8k16 A per warp):
  //    a0 (g, 2t), a1 (g+8, 2t), a2 (g, 2t+8), a3 (g+8, 2t+8), g = lane/4, t = lane%4, each + the next k.
  {
    std::vector<int> cover(64 * 16, 0);
    for (int w = 0; w < 4; ++w)
      for (int l = 0; l < 32; ++l)
        for (int r = 0; r < 4; ++r) {
          const int row = 16 * w + l / 4 + ((r == 1 || r == 3) ? 8 : 0), k = 2 * (l % 4) + (r >= 2 ? 8 : 0);
          CHECK(lora_a_row(w, l, r) == row && lora_a_k(l, r) == k, "lora A (%d,%d,%d)", w, l, r);
          ++cover[row * 16 + k];
          ++cover[row * 16 + k + 1];
        }
    for (size_t i = 0; i < cover.size(); ++i) CHECK(cover[i] == 1, "A element %zu covered %d times", i, cover[i]);
  }
  // 7. descriptors: start address >> 4 in bits 0-13, SBO >> 4 in 32-45, layout in 62-63; +2 = +32 bytes.
  {
    const uint64_t d = smem_desc(0x12400, 512, 2);
    CHECK((d & 0x3FFF) == (0x12400 >> 4), "start");
    CHECK(((d >> 32) & 0x3FFF) == 32 && (d >> 62) == 2 && ((d >> 16) & 0x3FFF) == 1, "sbo/layout/lbo");
    CHECK(smem_desc(0x12400 + 32, 512, 2) == d + 2, "k step");
  }
  // 8. epilogue staging rows are 16-byte aligned and disjoint; the persistent schedule visits every tile once.
  CHECK((kOutPitch * 2) % 16 == 0, "out pitch");
  CHECK(out_stage_index(1, 0) - out_stage_index(0, 127) > 0, "rows overlap");
  {
    const int n_tiles = 3, m_tiles = 5;
    std::set<std::pair<int, int>> seen;
    for (int t = 0; t < n_tiles * m_tiles; ++t) {
      TileCoord c = tile_coord(t, n_tiles);
      CHECK(c.n_tile < n_tiles && c.m_tile < m_tiles, "tile %d", t);
      seen.insert({c.n_tile, c.m_tile});
    }
    CHECK(seen.size() == size_t(n_tiles * m_tiles), "schedule");
  }
  // 9. A CPU model of one tile's main loop: prepared weights -> stage image (block copy) -> the wgmma's view
  //    through the hardware swizzle, activations placed by the producer's (row, chunk) formula, promotion with
  //    the slot-ordered scales; equals the spec's Σ_g s_a s_w I computed directly.
  {
    const int N = 128, M = 128, K = 128, G = K / 64;
    std::vector<int> qw(N * K), qa(M * K);
    std::vector<float> sw(N * G), sa(M * G);
    uint32_t seed = 12345;
    auto rnd = [&]() { seed = seed * 1664525u + 1013904223u; return seed >> 8; };
    for (auto& v : qw) v = int(rnd() % 16) - 8;
    for (auto& v : qa) v = int(rnd() % 16) - 8;
    for (auto& v : sw) v = 0.001f * float(1 + rnd() % 100);
    for (auto& v : sa) v = 0.01f * float(1 + rnd() % 100);
    std::vector<uint8_t> wq(padded_n(N) * K);
    std::vector<float> ws(padded_n(N) * G);
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k) wq[prepared_weight_offset(n, k, G)] = int4_to_e4m3(qw[n * K + k]);
    for (int n = 0; n < N; ++n)
      for (int g = 0; g < G; ++g) ws[prepared_wscale_index(n, g, G)] = sw[n * G + g];
    double max_err = 0;
    for (int wg = 0; wg < 2; ++wg) {
      std::vector<float> acc(64 * 128, 0.f);
      for (int g = 0; g < G; ++g) {
        const uint8_t* a_img = &wq[(size_t)g * 8192];  // n_tile 0: block g
        std::vector<uint8_t> b_img(8192);
        for (int row = 0; row < 128; ++row)
          for (int chunk = 0; chunk < 4; ++chunk)
            for (int byte = 0; byte < 16; ++byte)
              b_img[swz64(row, chunk * 16) + byte] = int4_to_e4m3(qa[row * K + g * 64 + chunk * 16 + byte]);
        float as_img[4][kScalePad];
        for (int tk = 0; tk < 128; ++tk) (&as_img[0][0])[act_scale_slot(tk)] = sa[tk * G + g];
        for (int w = 0; w < 4; ++w)
          for (int l = 0; l < 32; ++l)
            for (int i = 0; i < 64; ++i) {
              const int row = acc_row(w, l, i), col = acc_col(l, i);
              double d = 0;  // the wgmma: A rows wg*64 + row, B rows col, k through the hardware swizzle
              for (int k = 0; k < 64; ++k)
                d += e4m3_decode(a_img[cute_swizzle((wg * 64 + row) * 64 + k, 2, 4, 3)]) *
                     e4m3_decode(b_img[cute_swizzle(col * 64 + k, 2, 4, 3)]);
              const float s_w = ws[prepared_wscale_index(wg * 64 + row, g, G)];
              const float s_a = as_img[l % 4][acc_scale_j(i)];
              acc[row * 128 + col] = std::fma(float(d) * s_a, s_w, acc[row * 128 + col]);
            }
      }
      for (int row = 0; row < 64; ++row)
        for (int col = 0; col < 128; ++col) {
          const int n = wg * 64 + row;
          double ref = 0, mag = 0;  // error relative to Σ|terms| (fp32 rounding of a cancelling sum)
          for (int g = 0; g < G; ++g) {
            long I = 0;
            for (int k = 0; k < 64; ++k) I += long(qa[col * K + g * 64 + k]) * qw[n * K + g * 64 + k];
            ref += double(sa[col * G + g]) * sw[n * G + g] * double(I);
            mag += std::fabs(double(sa[col * G + g]) * sw[n * G + g] * double(I));
          }
          const double err = std::fabs(acc[row * 128 + col] - ref) / (mag + 1e-30);
          if (err > max_err) max_err = err;
        }
    }
    CHECK(max_err < 1e-6, "tile model rel err %g", max_err);  // a layout slip gives O(1)
    std::printf("tile model: max rel err %.3g\n", max_err);
  }
  if (failures) {
    std::printf("%d FAILED\n", failures);
    return 1;
  }
  std::printf("ALL PASSED\n");
  return 0;
}
