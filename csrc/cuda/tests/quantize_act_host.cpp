// Host harness for csrc/cuda/quantize_act_layout.cuh (compiled with g++ by tests/test_cuda_quantize_layout.py).
//
//   quantize_act_host quant IN OUT   IN: int32 rows, int32 kp, fp32 xhat[rows*kp] (already x/λ, zero-padded)
//                                    OUT: uint8 qact[rows*kp/2], fp32 ascales[rows*kp/64]
//                                    — the kernel's per-(row, group) arithmetic, element for element.
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

static int quant(const char* in, const char* out) {
  FILE* f = std::fopen(in, "rb");
  if (!f) return 2;
  int32_t rows = 0, kp = 0;
  if (std::fread(&rows, 4, 1, f) != 1 || std::fread(&kp, 4, 1, f) != 1) return 2;
  std::vector<float> xh((size_t)rows * kp);
  if (std::fread(xh.data(), 4, xh.size(), f) != xh.size()) return 2;
  std::fclose(f);
  const int groups = kp / kGroup;
  std::vector<uint8_t> q((size_t)rows * kp / 2);
  std::vector<float> sc((size_t)rows * groups);
  for (int r = 0; r < rows; ++r)
    for (int g = 0; g < groups; ++g) {
      const float* v = &xh[(size_t)r * kp + g * kGroup];
      float amax = 0.f;
      for (int e = 0; e < kGroup; ++e) amax = fmax_hd(amax, fabs_hd(v[e]));
      const float sa = act_scale(amax);
      const bool exact = group_needs_exact(sa);
      const float inv = exact ? 0.f : 1.0f / sa;
      sc[(size_t)r * groups + g] = sa;
      for (int c = 0; c < kGroup / 8; ++c) {  // one "thread" = 8 elements = one packed word
        uint32_t nib[8];
        for (int e = 0; e < 8; ++e) nib[e] = quant_nibble(v[c * 8 + e], sa, inv, exact);
        const uint32_t w = pack8(nib);
        // little-endian word -> 4 bytes at qact_word_offset(row, step, col8) with step/col8 from the group
        const int step = g / kGroupsPerStep, col8 = (g % kGroupsPerStep) * 8 + c;
        const int64_t off = qact_word_offset(r, step, col8, kp / 2);
        for (int b = 0; b < 4; ++b) q[off + b] = (uint8_t)(w >> (8 * b));
      }
    }
  FILE* o = std::fopen(out, "wb");
  if (!o) return 2;
  std::fwrite(q.data(), 1, q.size(), o);
  std::fwrite(sc.data(), 4, sc.size(), o);
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
    const bool exact = group_needs_exact(s);
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
      const uint32_t a = quant_nibble(x, s, inv, exact), b = quant_nibble_ref(x, s);
      float t = mul_rn(x, inv);
      float tc = fmin_hd(fmax_hd(t, -8.f), 7.f);
      if (fabs_hd(((tc + kMagic) - kMagic) - tc) > 0.5f - 4e-6f) ++slow;
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

int main(int argc, char** argv) {
  if (argc >= 4 && !std::strcmp(argv[1], "quant")) return quant(argv[2], argv[3]);
  if (argc >= 2 && !std::strcmp(argv[1], "nibble-sweep")) return nibble_sweep();
  if (argc >= 2 && !std::strcmp(argv[1], "plan")) return plan();
  std::fprintf(stderr, "usage: %s quant IN OUT | nibble-sweep | plan\n", argv[0]);
  return 2;
}
