// test_mma_layout.cpp — host test (g++, no GPU) of csrc/cuda/mma_layout.cuh.
//
//  1. The fragment maps against the PTX ISA tables, re-written here independently from the ISA text
//     (element index i -> (row, col)), plus bijectivity.
//  2. ldmatrix, simulated from the ISA description (lanes 8q..8q+7 give the row addresses of matrix q;
//     register q of lane l gets word l%4 of row l/4 of matrix q), fed with the kernel's address functions.
//  3. Shared-memory swizzles: bijective and bank-conflict free for the accesses the kernel makes.
//  4. The repack map: a bijection onto the prepared buffer.
//  5. A whole-kernel simulation: canonical int4 tensors -> repack -> cp.async stage layout -> ldmatrix ->
//     (kInt8: nibble unpack) -> MMA with ISA semantics (this file's tables) -> magic-number promotion ->
//     low-rank 16-bit MMA -> bias -> store, for both paths and both 16-bit dtypes, on sizes that cut tiles
//     (M, N not multiples of 128, two lora chunks with a partial one). Compared with a naive reference.
//     A kernel that reads the wrong lane, row, nibble or k of anything fails here.
//
// Build: g++ -std=c++17 -O2 -I csrc/cuda csrc/cuda/tests/test_mma_layout.cpp -o /tmp/t && /tmp/t
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "mma_layout.cuh"

using namespace svdq::cuda::layout;

static int g_failures = 0;
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      if (g_failures < 30) {                                      \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                 \
        std::printf("\n");                                        \
      }                                                           \
      ++g_failures;                                               \
    }                                                             \
  } while (0)

// ------------------------------------------------------------------------------------------------
// 1. ISA tables (PTX ISA 9.7.14.5, "Matrix Fragments for mma.m16n8k*"), by element index i.
// ------------------------------------------------------------------------------------------------
namespace isa {
inline int gid(int lane) { return lane >> 2; }
inline int tig(int lane) { return lane % 4; }
// m16n8k64 .s4, A: a0..a31 (8 per .b32 register)
inline RC a_k64(int lane, int i) {
  const int row = ((i < 8) || (i >= 16 && i < 24)) ? gid(lane) : gid(lane) + 8;
  const int col = i < 16 ? tig(lane) * 8 + (i & 7) : tig(lane) * 8 + (i & 7) + 32;
  return {row, col};
}
// m16n8k64 .s4, B: b0..b15
inline RC b_k64(int lane, int i) {
  const int row = i < 8 ? tig(lane) * 8 + (i & 7) : tig(lane) * 8 + (i & 7) + 32;
  return {row, gid(lane)};
}
// m16n8k32 .s8, A: a0..a15 (4 per register)
inline RC a_k32(int lane, int i) {
  const int row = ((i < 4) || (i >= 8 && i < 12)) ? gid(lane) : gid(lane) + 8;
  const int col = i < 8 ? tig(lane) * 4 + (i & 3) : tig(lane) * 4 + (i & 3) + 16;
  return {row, col};
}
inline RC b_k32(int lane, int i) {
  const int row = i < 4 ? tig(lane) * 4 + (i & 3) : tig(lane) * 4 + (i & 3) + 16;
  return {row, gid(lane)};
}
// m16n8k16 .f16/.bf16, A: a0..a7 (2 per register)
inline RC a_k16(int lane, int i) {
  const int row = ((i < 2) || (i >= 4 && i < 6)) ? gid(lane) : gid(lane) + 8;
  const int col = i < 4 ? tig(lane) * 2 + (i & 1) : tig(lane) * 2 + (i & 1) + 8;
  return {row, col};
}
inline RC b_k16(int lane, int i) {
  const int row = i < 2 ? tig(lane) * 2 + (i & 1) : tig(lane) * 2 + (i & 1) + 8;
  return {row, gid(lane)};
}
// C/D m16n8 (s32 / f32): c0..c3
inline RC c_m16n8(int lane, int i) { return {i < 2 ? gid(lane) : gid(lane) + 8, tig(lane) * 2 + (i & 1)}; }
// m8n8k32 .s4
inline RC a_m8k32(int lane, int i) { return {gid(lane), tig(lane) * 8 + i}; }
inline RC b_m8k32(int lane, int i) { return {tig(lane) * 8 + i, gid(lane)}; }
inline RC c_m8(int lane, int i) { return {gid(lane), tig(lane) * 2 + i}; }
}  // namespace isa

static bool same(RC x, RC y) { return x.row == y.row && x.col == y.col; }

static void test_fragment_maps() {
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 32; ++i)
      CHECK(same(frag_a_m16n8k64_s4(lane, i / 8, i % 8), isa::a_k64(lane, i)), "k64 A lane %d i %d", lane, i);
    for (int i = 0; i < 16; ++i)
      CHECK(same(frag_b_m16n8k64_s4(lane, i / 8, i % 8), isa::b_k64(lane, i)), "k64 B lane %d i %d", lane, i);
    for (int i = 0; i < 16; ++i)
      CHECK(same(frag_a_m16n8k32_s8(lane, i / 4, i % 4), isa::a_k32(lane, i)), "k32 A lane %d i %d", lane, i);
    for (int i = 0; i < 8; ++i)
      CHECK(same(frag_b_m16n8k32_s8(lane, i / 4, i % 4), isa::b_k32(lane, i)), "k32 B lane %d i %d", lane, i);
    for (int i = 0; i < 8; ++i)
      CHECK(same(frag_a_m16n8k16_f16(lane, i / 2, i % 2), isa::a_k16(lane, i)), "k16 A lane %d i %d", lane, i);
    for (int i = 0; i < 4; ++i)
      CHECK(same(frag_b_m16n8k16_f16(lane, i / 2, i % 2), isa::b_k16(lane, i)), "k16 B lane %d i %d", lane, i);
    for (int i = 0; i < 4; ++i) CHECK(same(frag_c_m16n8(lane, i), isa::c_m16n8(lane, i)), "C lane %d i %d", lane, i);
    for (int i = 0; i < 8; ++i) {
      CHECK(same(frag_a_m8n8k32_s4(lane, i), isa::a_m8k32(lane, i)), "m8 A lane %d", lane);
      CHECK(same(frag_b_m8n8k32_s4(lane, i), isa::b_m8k32(lane, i)), "m8 B lane %d", lane);
    }
    for (int i = 0; i < 2; ++i) CHECK(same(frag_c_m8n8k32(lane, i), isa::c_m8(lane, i)), "m8 C lane %d", lane);
  }
  // Each map covers its tile exactly once.
  auto bij = [](const char* name, int rows, int cols, int regs, int per, RC (*f)(int, int, int)) {
    std::set<int> seen;
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < regs; ++r)
        for (int e = 0; e < per; ++e) {
          RC x = f(lane, r, e);
          CHECK(x.row >= 0 && x.row < rows && x.col >= 0 && x.col < cols, "%s out of range", name);
          seen.insert(x.row * cols + x.col);
        }
    CHECK(int(seen.size()) == rows * cols, "%s not a bijection", name);
  };
  bij("k64A", 16, 64, 4, 8, frag_a_m16n8k64_s4);
  bij("k64B", 64, 8, 2, 8, frag_b_m16n8k64_s4);
  bij("k32A", 16, 32, 4, 4, frag_a_m16n8k32_s8);
  bij("k32B", 32, 8, 2, 4, frag_b_m16n8k32_s8);
  bij("k16A", 16, 16, 4, 2, frag_a_m16n8k16_f16);
  bij("k16B", 16, 8, 2, 2, frag_b_m16n8k16_f16);
}

// ------------------------------------------------------------------------------------------------
// 2. ldmatrix .x4 .b16 simulated from the ISA text. addr[l] = byte address lane l supplies (only lanes
//    8q..8q+7 matter for matrix q). Returns regs[lane][q].
// ------------------------------------------------------------------------------------------------
static void sim_ldmatrix_x4(const uint8_t* smem, const int (&addr)[32], uint32_t (&regs)[32][4]) {
  for (int q = 0; q < 4; ++q)
    for (int lane = 0; lane < 32; ++lane) {
      const int row = lane / 4, word = lane % 4;
      const int a = addr[q * 8 + row] + word * 4;
      std::memcpy(&regs[lane][q], smem + a, 4);
    }
}

// ------------------------------------------------------------------------------------------------
// 3. Swizzles: bijective, and conflict free (shared memory: 32 banks x 4 B).
// ------------------------------------------------------------------------------------------------
static void test_swizzles() {
  {  // k-tile: bijective over [128][32 B]; ldmatrix phase (8 row addresses x 16 B) hits 32 distinct banks.
    std::set<int> seen;
    for (int r = 0; r < kBM; ++r)
      for (int b = 0; b < 32; ++b) seen.insert(smem_tile_byte(r, b));
    CHECK(int(seen.size()) == kBM * 32 && *seen.rbegin() == kBM * 32 - 1, "k-tile swizzle not bijective");
    for (int base = 0; base < kBM; base += 8)
      for (int chunk = 0; chunk < 2; ++chunk) {
        std::set<int> banks;
        for (int r = 0; r < 8; ++r)
          for (int w = 0; w < 4; ++w) banks.insert((smem_tile_offset(base + r, chunk) / 4 + w) % 32);
        CHECK(banks.size() == 32, "ldmatrix bank conflict base %d chunk %d", base, chunk);
      }
  }
  {  // lora_act: float2 reads of a half-warp (rows gid 0..3 or 4..7, cols 2 tig + 8h + 16ks) conflict free.
    std::set<int> seen;
    for (int r = 0; r < kBM; ++r)
      for (int c = 0; c < kLoraChunk; ++c) seen.insert(smem_lact_offset_f(r, c));
    CHECK(int(seen.size()) == kBM * kLoraChunk && *seen.rbegin() == kBM * kLoraChunk - 1, "lact swizzle");
    for (int row0 = 0; row0 < 16; row0 += 8)
      for (int reg = 0; reg < 4; ++reg)
        for (int ks = 0; ks < kLoraChunk / 16; ++ks)
          for (int half = 0; half < 2; ++half) {
            std::set<int> banks;
            for (int lane = half * 16; lane < half * 16 + 16; ++lane) {
              RC e = frag_a_m16n8k16_f16(lane, reg, 0);
              const int f = smem_lact_offset_f(row0 + e.row, ks * 16 + e.col);
              CHECK(f % 2 == 0, "lact float2 misaligned");
              banks.insert(f % 32);
              banks.insert((f + 1) % 32);
            }
            CHECK(banks.size() == 32, "lact bank conflict reg %d ks %d", reg, ks);
          }
  }
  {  // lora_up: 32-bit reads of a warp (rows gid, halves 2 tig + 8 r + 16 ks) conflict free.
    std::set<int> seen;
    for (int r = 0; r < kBN; ++r)
      for (int c = 0; c < kLoraChunk; ++c) seen.insert(smem_lup_offset_h(r, c));
    CHECK(int(seen.size()) == kBN * kLoraChunk && *seen.rbegin() == kBN * kLoraChunk - 1, "lup swizzle");
    for (int n0 = 0; n0 < 32; n0 += 8)
      for (int reg = 0; reg < 2; ++reg)
        for (int ks = 0; ks < kLoraChunk / 16; ++ks) {
          std::set<int> banks;
          for (int lane = 0; lane < 32; ++lane) {
            RC e = frag_b_m16n8k16_f16(lane, reg, 0);
            const int h = smem_lup_offset_h(n0 + e.col, ks * 16 + e.row);
            CHECK(h % 2 == 0, "lup word misaligned");
            banks.insert((h / 2) % 32);
          }
          CHECK(banks.size() == 32, "lup bank conflict reg %d ks %d", reg, ks);
        }
  }
  // Stage layout fits and is 16-byte aligned.
  CHECK(kSmemBytes <= 64 * 1024, "smem %d > 64 KiB (sm_75 limit)", kSmemBytes);
  CHECK(kStageBytes % 128 == 0 && kSmemSA % 16 == 0 && kSmemSW % 16 == 0 && kSmemLoraUp % 16 == 0, "align");
}

// ------------------------------------------------------------------------------------------------
// 4. Repack map.
// ------------------------------------------------------------------------------------------------
static void test_repack_map() {
  for (int N : {1, 8, 128, 200, 300})
    for (int K : {64, 192}) {
      const int64_t bytes = int64_t(N) * K / 2;
      std::vector<int> hit(bytes, 0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t kb = 0; kb < K / 2; ++kb) {
          const int64_t o = prepared_qweight_offset(n, kb, N);
          CHECK(o >= 0 && o < bytes, "repack out of range");
          if (o >= 0 && o < bytes) ++hit[o];
        }
      int bad = 0;
      for (int64_t o = 0; o < bytes; ++o) bad += hit[o] != 1;
      CHECK(bad == 0, "repack map not bijective N=%d K=%d", N, K);
      // Rows n0..n0+127 of group g are one contiguous [row][32 B] run (one pipeline stage of B).
      if (N >= 2 * kBN)
        for (int r = 0; r < kBN; ++r)
          CHECK(prepared_qweight_offset(kBN + r, 32 + 7, N) == (int64_t(1) * N + kBN) * 32 + r * 32 + 7, "tile run");
      std::set<int64_t> s;
      for (int64_t n = 0; n < N; ++n)
        for (int g = 0; g < K / 64; ++g) s.insert(prepared_wscale_offset(n, g, N));
      CHECK(int64_t(s.size()) == int64_t(N) * (K / 64) && *s.rbegin() == int64_t(N) * (K / 64) - 1, "wscale map");
    }
}

// ------------------------------------------------------------------------------------------------
// 5. Whole-kernel simulation.
// ------------------------------------------------------------------------------------------------
static float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  u &= 0xFFFF0000u;
  std::memcpy(&x, &u, 4);
  return x;
}
static float round_f16(float x) { return float(static_cast<_Float16>(x)); }
static float round_t(float x, bool bf16) { return bf16 ? round_bf16(x) : round_f16(x); }
static uint16_t bits_t(float x, bool bf16) {
  if (bf16) {
    float r = round_bf16(x);
    uint32_t u;
    std::memcpy(&u, &r, 4);
    return uint16_t(u >> 16);
  }
  _Float16 h = static_cast<_Float16>(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
static float from_bits(uint16_t b, bool bf16) {
  if (bf16) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return float(h);
}
static int sext4(uint32_t v) { return int((v & 0xF) ^ 0x8) - 8; }
static int sext8(uint32_t v) { return int(int8_t(uint8_t(v & 0xFF))); }
static float as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

// MMA with ISA semantics from this file's tables. elem: bits per element (4 or 8); A 16 x K, B K x 8.
static void sim_mma_int(int bits, int kdim, const uint32_t (&a)[32][4], const uint32_t (&b)[32][2],
                        const int (&c)[32][4], int (&d)[32][4]) {
  std::vector<int> A(16 * kdim), B(kdim * 8);
  const int per = 32 / bits;
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4 * per; ++i) {
      RC x = bits == 4 ? isa::a_k64(lane, i) : isa::a_k32(lane, i);
      const uint32_t v = a[lane][i / per] >> ((i % per) * bits);
      A[x.row * kdim + x.col] = bits == 4 ? sext4(v) : sext8(v);
    }
    for (int i = 0; i < 2 * per; ++i) {
      RC x = bits == 4 ? isa::b_k64(lane, i) : isa::b_k32(lane, i);
      const uint32_t v = b[lane][i / per] >> ((i % per) * bits);
      B[x.row * 8 + x.col] = bits == 4 ? sext4(v) : sext8(v);
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      RC x = isa::c_m16n8(lane, i);
      int64_t s = c[lane][i];
      for (int k = 0; k < kdim; ++k) s += int64_t(A[x.row * kdim + k]) * B[k * 8 + x.col];
      d[lane][i] = int(uint32_t(s));  // wraps like the hardware adder (never needed here)
    }
}
// Turing: m16n8k64 as four m8n8k32 (as mma_s4 in w4a4_gemm.cu does on sm_75), m8n8k32 from ISA tables.
static void sim_mma_s4_sm75(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], const int (&c)[32][4],
                            int (&d)[32][4]) {
  auto m8 = [](const uint32_t* areg, const uint32_t* breg, const int (*cc)[2], int (*dd)[2]) {
    int A[8][32], B[32][8];
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 8; ++i) {
        RC x = isa::a_m8k32(lane, i);
        A[x.row][x.col] = sext4(areg[lane] >> (4 * i));
        RC y = isa::b_m8k32(lane, i);
        B[y.row][y.col] = sext4(breg[lane] >> (4 * i));
      }
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 2; ++i) {
        RC x = isa::c_m8(lane, i);
        int s = cc[lane][i];
        for (int k = 0; k < 32; ++k) s += A[x.row][k] * B[k][x.col];
        dd[lane][i] = s;
      }
  };
  uint32_t ar[4][32], br[2][32];
  int c01[32][2], c23[32][2], t[32][2], d01[32][2], d23[32][2];
  for (int l = 0; l < 32; ++l) {
    for (int r = 0; r < 4; ++r) ar[r][l] = a[l][r];
    for (int r = 0; r < 2; ++r) br[r][l] = b[l][r];
    c01[l][0] = c[l][0]; c01[l][1] = c[l][1]; c23[l][0] = c[l][2]; c23[l][1] = c[l][3];
  }
  m8(ar[0], br[0], c01, t);
  m8(ar[2], br[1], t, d01);
  m8(ar[1], br[0], c23, t);
  m8(ar[3], br[1], t, d23);
  for (int l = 0; l < 32; ++l) { d[l][0] = d01[l][0]; d[l][1] = d01[l][1]; d[l][2] = d23[l][0]; d[l][3] = d23[l][1]; }
}
// 16-bit MMA (f32 acc) with ISA semantics.
static void sim_mma_16(bool bf16, const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], float (&d)[32][4]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      RC x = isa::a_k16(lane, i);
      A[x.row][x.col] = from_bits(uint16_t(a[lane][i / 2] >> (16 * (i % 2))), bf16);
    }
    for (int i = 0; i < 4; ++i) {
      RC x = isa::b_k16(lane, i);
      B[x.row][x.col] = from_bits(uint16_t(b[lane][i / 2] >> (16 * (i % 2))), bf16);
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      RC x = isa::c_m16n8(lane, i);
      double s = d[lane][i];
      for (int k = 0; k < 16; ++k) s += double(A[x.row][k]) * B[k][x.col];
      d[lane][i] = float(s);
    }
}

struct Problem {
  int M, N, K, R;
  bool bf16, has_bias;
  std::vector<int8_t> qa, qw;           // unpacked, [M][K], [N][K]
  std::vector<uint8_t> qact, qweight;   // canonical packed
  std::vector<float> sa, sw;            // [M][G] fp32, [N][G] (16-bit values)
  std::vector<float> lact;              // [M][R]
  std::vector<uint16_t> lup, bias;      // [N][R], [N] 16-bit bits
};

static Problem make_problem(int M, int N, int K, int R, bool bf16, bool has_bias, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> q(-8, 7);
  std::uniform_real_distribution<float> u(0.5f, 2.0f), v(-1.0f, 1.0f);
  Problem p{M, N, K, R, bf16, has_bias, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const int G = K / 64;
  p.qa.resize(size_t(M) * K);
  p.qw.resize(size_t(N) * K);
  for (auto& x : p.qa) x = int8_t(q(rng));
  for (auto& x : p.qw) x = int8_t(q(rng));
  auto pack = [](const std::vector<int8_t>& src, int rows, int K) {
    std::vector<uint8_t> out(size_t(rows) * K / 2);
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < K / 2; ++j)
        out[size_t(r) * K / 2 + j] = uint8_t((src[size_t(r) * K + 2 * j] & 0xF) | (src[size_t(r) * K + 2 * j + 1] << 4));
    return out;
  };
  p.qact = pack(p.qa, M, K);
  p.qweight = pack(p.qw, N, K);
  p.sa.resize(size_t(M) * G);
  p.sw.resize(size_t(N) * G);
  for (auto& x : p.sa) x = u(rng) * 0.01f;
  for (auto& x : p.sw) x = round_t(u(rng) * 0.02f, bf16);
  p.lact.resize(size_t(M) * R);
  p.lup.resize(size_t(N) * R);
  p.bias.resize(N);
  for (auto& x : p.lact) x = v(rng) * 3.0f;
  for (auto& x : p.lup) x = bits_t(v(rng) * 0.5f, bf16);
  for (auto& x : p.bias) x = bits_t(v(rng), bf16);
  return p;
}

// Reference (numerics.md §4.2) in double, then fp32 value before the final cast.
static std::vector<double> reference(const Problem& p) {
  const int G = p.K / 64;
  std::vector<double> y(size_t(p.M) * p.N);
  for (int m = 0; m < p.M; ++m)
    for (int n = 0; n < p.N; ++n) {
      double acc = 0;
      for (int g = 0; g < G; ++g) {
        int64_t I = 0;
        for (int k = 64 * g; k < 64 * g + 64; ++k) I += int64_t(p.qa[size_t(m) * p.K + k]) * p.qw[size_t(n) * p.K + k];
        acc += double(p.sa[size_t(m) * G + g]) * p.sw[size_t(n) * G + g] * double(I);
      }
      for (int j = 0; j < p.R; ++j)
        acc += double(round_t(p.lact[size_t(m) * p.R + j], p.bf16)) * from_bits(p.lup[size_t(n) * p.R + j], p.bf16);
      if (p.has_bias) acc += from_bits(p.bias[n], p.bf16);
      y[size_t(m) * p.N + n] = acc;
    }
  return y;
}

// The kernel, on the CPU, following w4a4_gemm.cu statement by statement (all indices from the header).
// path 0 = kInt4 (sm_80+ m16n8k64, or sm75 decomposition when sm75), 1 = kInt8.
static std::vector<float> simulate_kernel(const Problem& p, int path, bool sm75) {
  const int M = p.M, N = p.N, K = p.K, R = p.R, G = K / 64;
  // Repack (repack_weight.cu).
  std::vector<uint8_t> prep_q(size_t(N) * K / 2, 0xAA);
  std::vector<float> prep_s(size_t(N) * G, NAN);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < K / 32; ++c)
      for (int b = 0; b < 16; ++b) prep_q[prepared_qweight_offset(n, c * 16, N) + b] = p.qweight[n * (K / 2) + c * 16 + b];
  for (int64_t n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g) prep_s[prepared_wscale_offset(n, g, N)] = p.sw[n * G + g];

  std::vector<float> out(size_t(M) * N, NAN);
  std::vector<uint8_t> smem(kSmemBytes);
  const int magic_v = int(magic_bits(path));
  for (int by = 0; by * kBM < M; ++by)
    for (int bx = 0; bx * kBN < N; ++bx) {
      const int m0 = by * kBM, n0 = bx * kBN;
      // Loaders (load_stage / load_lora), per thread.
      auto load_stage = [&](int slot, int g) {
        uint8_t* st = smem.data() + slot * kStageBytes;
        for (int tid = 0; tid < kThreads; ++tid) {
          int row, chunk;
          loader_chunk(tid, &row, &chunk);
          const bool a_ok = m0 + row < M;
          const int dst = smem_tile_offset(row, chunk);
          const bool b_ok = n0 + row < N;
          for (int b = 0; b < 16; ++b) {
            st[kSmemA + dst + b] = a_ok ? p.qact[size_t(m0 + row) * (K / 2) + chunk * 16 + g * 32 + b] : 0;
            st[kSmemB + dst + b] =
                b_ok ? prep_q[int64_t(n0 + row) * kRowBytes + chunk * 16 + int64_t(g) * N * kRowBytes + b] : 0;
          }
          const int s_idx = tid & (kBM - 1);
          if (tid < kBM) {
            const float s = m0 + s_idx < M ? p.sa[size_t(m0 + s_idx) * G + g] : 0.f;
            std::memcpy(st + kSmemSA + s_idx * 4, &s, 4);
          } else {
            const float s = n0 + s_idx < N ? prep_s[int64_t(g) * N + n0 + s_idx] : 0.f;
            std::memcpy(st + kSmemSW + s_idx * 4, &s, 4);
          }
        }
      };
      float* s_lact = reinterpret_cast<float*>(smem.data() + kSmemLoraAct);
      uint16_t* s_lup = reinterpret_cast<uint16_t*>(smem.data() + kSmemLoraUp);
      auto load_lora = [&](int c) {
        for (int i = 0; i < kBM * (kLoraChunk / 4); ++i) {
          const int row = i / (kLoraChunk / 4), col = (i % (kLoraChunk / 4)) * 4;
          const bool ok = m0 + row < M && c * kLoraChunk + col < R;
          for (int e = 0; e < 4; ++e)
            s_lact[smem_lact_offset_f(row, col) + e] = ok ? p.lact[size_t(m0 + row) * R + c * kLoraChunk + col + e] : 0.f;
        }
        for (int i = 0; i < kBN * (kLoraChunk / 8); ++i) {
          const int row = i / (kLoraChunk / 8), col = (i % (kLoraChunk / 8)) * 8;
          const bool ok = n0 + row < N && c * kLoraChunk + col < R;
          for (int e = 0; e < 8; ++e)
            s_lup[smem_lup_offset_h(row, col) + e] = ok ? p.lup[size_t(n0 + row) * R + c * kLoraChunk + col + e] : 0;
        }
      };
      // Accumulators of every warp: acc[warp][i][j][lane][r].
      static float acc[kWarps][kMT][kNT][32][4];
      for (auto& w : acc) for (auto& x : w) for (auto& y : x) for (auto& z : y) for (auto& f : z) f = 0.f;
      for (int g = 0; g < G; ++g) {
        load_stage(g % kStages, g);  // the pipeline only changes *when*; the slot is g % kStages
        const uint8_t* st = smem.data() + (g % kStages) * kStageBytes;
        for (int warp = 0; warp < kWarps; ++warp) {
          const int wm = warp / kWarpsN, wn = warp % kWarpsN;
          uint32_t a[kMT][32][4], b[kNT][32][2];
          for (int i = 0; i < kMT; ++i) {
            int addr[32];
            for (int lane = 0; lane < 32; ++lane) {
              int row, chunk;
              ldsm_a_src(lane, &row, &chunk);
              addr[lane] = kSmemA + smem_tile_offset(wm * kWM + i * 16 + row, chunk);
            }
            uint32_t regs[32][4];
            sim_ldmatrix_x4(st, addr, regs);
            for (int l = 0; l < 32; ++l) for (int r = 0; r < 4; ++r) a[i][l][r] = regs[l][r];
          }
          for (int jj = 0; jj < kNT / 2; ++jj) {
            int addr[32];
            for (int lane = 0; lane < 32; ++lane) {
              int row, chunk;
              ldsm_b_src(lane, &row, &chunk);
              addr[lane] = kSmemB + smem_tile_offset(wn * kWN + jj * 16 + row, chunk);
            }
            uint32_t regs[32][4];
            sim_ldmatrix_x4(st, addr, regs);
            for (int l = 0; l < 32; ++l) {
              b[2 * jj][l][0] = regs[l][0];
              b[2 * jj][l][1] = regs[l][1];
              b[2 * jj + 1][l][0] = regs[l][2];
              b[2 * jj + 1][l][1] = regs[l][3];
            }
          }
          int magic[32][4];
          for (auto& x : magic) for (auto& y : x) y = magic_v;
          static int iacc[kMT][kNT][32][4];
          if (path == 0) {
            for (int i = 0; i < kMT; ++i)
              for (int j = 0; j < kNT; ++j) {
                if (sm75) sim_mma_s4_sm75(a[i], b[j], magic, iacc[i][j]);
                else sim_mma_int(4, 64, a[i], b[j], magic, iacc[i][j]);
              }
          } else {
            for (int step = 0; step < 2; ++step) {
              uint32_t b8[kNT][32][2];
              for (int j = 0; j < kNT; ++j)
                for (int l = 0; l < 32; ++l)
                  for (int r = 0; r < 2; ++r) {
                    int src, hi;
                    s8_b_source(step, r, &src, &hi);
                    b8[j][l][r] = hi ? unpack_hi(b[j][l][src]) : unpack_lo(b[j][l][src]);
                  }
              for (int i = 0; i < kMT; ++i) {
                uint32_t a8[32][4];
                for (int l = 0; l < 32; ++l)
                  for (int r = 0; r < 4; ++r) {
                    int src, hi;
                    s8_a_source(step, r, &src, &hi);
                    a8[l][r] = hi ? unpack_hi(a[i][l][src]) : unpack_lo(a[i][l][src]);
                  }
                for (int j = 0; j < kNT; ++j) {
                  int cin[32][4];
                  std::memcpy(cin, step == 0 ? magic : iacc[i][j], sizeof(cin));
                  sim_mma_int(8, 32, a8, b8[j], cin, iacc[i][j]);
                }
              }
            }
          }
          const float* s_sa = reinterpret_cast<const float*>(st + kSmemSA);
          const float* s_sw = reinterpret_cast<const float*>(st + kSmemSW);
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < kMT; ++i)
              for (int j = 0; j < kNT; ++j)
                for (int r = 0; r < 4; ++r) {
                  const float sa = s_sa[wm * kWM + i * 16 + frag_c_m16n8(lane, 2 * (r >> 1)).row];
                  const float sw = s_sw[wn * kWN + j * 8 + frag_c_m16n8(lane, r & 1).col];
                  const float swc = -magic_value(path) * sw;
                  const float t = std::fmaf(as_float(iacc[i][j][lane][r]), sw, swc);
                  acc[warp][i][j][lane][r] = std::fmaf(t, sa, acc[warp][i][j][lane][r]);
                }
        }
      }
      // Low-rank epilogue.
      for (int c = 0; c * kLoraChunk < R; ++c) {
        load_lora(c);
        const int ksteps = std::min(kLoraChunk, R - c * kLoraChunk) / 16;
        for (int ks = 0; ks < ksteps; ++ks)
          for (int warp = 0; warp < kWarps; ++warp) {
            const int wm = warp / kWarpsN, wn = warp % kWarpsN;
            uint32_t bl[kNT][32][2];
            for (int j = 0; j < kNT; ++j)
              for (int lane = 0; lane < 32; ++lane)
                for (int r = 0; r < 2; ++r) {
                  const RC e = frag_b_m16n8k16_f16(lane, r, 0);
                  std::memcpy(&bl[j][lane][r], s_lup + smem_lup_offset_h(wn * kWN + j * 8 + e.col, ks * 16 + e.row), 4);
                }
            for (int i = 0; i < kMT; ++i) {
              uint32_t al[32][4];
              for (int lane = 0; lane < 32; ++lane)
                for (int r = 0; r < 4; ++r) {
                  const RC e = frag_a_m16n8k16_f16(lane, r, 0);
                  const float* f = s_lact + smem_lact_offset_f(wm * kWM + i * 16 + e.row, ks * 16 + e.col);
                  al[lane][r] = uint32_t(bits_t(f[0], p.bf16)) | (uint32_t(bits_t(f[1], p.bf16)) << 16);
                }
              for (int j = 0; j < kNT; ++j) {
                float d[32][4];
                for (int l = 0; l < 32; ++l) for (int r = 0; r < 4; ++r) d[l][r] = acc[warp][i][j][l][r];
                sim_mma_16(p.bf16, al, bl[j], d);
                for (int l = 0; l < 32; ++l) for (int r = 0; r < 4; ++r) acc[warp][i][j][l][r] = d[l][r];
              }
            }
          }
      }
      // Store (before the final cast, to compare in fp32 terms).
      for (int warp = 0; warp < kWarps; ++warp) {
        const int wm = warp / kWarpsN, wn = warp % kWarpsN;
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < kMT; ++i)
            for (int j = 0; j < kNT; ++j)
              for (int h = 0; h < 2; ++h) {
                const RC e = frag_c_m16n8(lane, 2 * h);
                const int row = m0 + wm * kWM + i * 16 + e.row, col = n0 + wn * kWN + j * 8 + e.col;
                if (row >= M || col >= N) continue;
                for (int x = 0; x < 2 && col + x < N; ++x) {
                  float v = acc[warp][i][j][lane][2 * h + x];
                  if (p.has_bias) v += from_bits(p.bias[col + x], p.bf16);
                  out[size_t(row) * N + col + x] = v;
                }
              }
      }
    }
  return out;
}

static void test_kernel_simulation() {
  struct Case { int M, N, K, R; bool bf16, bias; };
  const Case cases[] = {{150, 200, 128, 48, true, true},   // partial tiles, 2 lora chunks (32 + 16)
                        {37, 136, 64, 16, false, false},   // one group, N not a multiple of 128, fp16
                        {1, 13, 192, 0, true, true},       // M = 1, odd N, no lora
                        {130, 128, 64, 32, false, true}};
  for (const Case& cs : cases) {
    const Problem p = make_problem(cs.M, cs.N, cs.K, cs.R, cs.bf16, cs.bias, 1234 + cs.M);
    const std::vector<double> ref = reference(p);
    for (int variant = 0; variant < 3; ++variant) {  // 0: kInt4 sm_80+, 1: kInt4 sm_75, 2: kInt8
      const std::vector<float> y = simulate_kernel(p, variant == 2 ? 1 : 0, variant == 1);
      double num = 0, den = 0, worst = 0;
      int nan = 0;
      for (size_t idx = 0; idx < ref.size(); ++idx) {
        if (std::isnan(y[idx])) { ++nan; continue; }
        const double d = y[idx] - ref[idx];
        num += d * d;
        den += ref[idx] * ref[idx];
        worst = std::max(worst, std::fabs(d) / (std::fabs(ref[idx]) + 1e-3));
      }
      const double rel = std::sqrt(num / den);
      CHECK(nan == 0, "case M=%d N=%d variant %d: %d outputs not written", cs.M, cs.N, variant, nan);
      CHECK(rel < 1e-5, "case M=%d N=%d K=%d R=%d variant %d: rel err %.3g", cs.M, cs.N, cs.K, cs.R, variant, rel);
      std::printf("  sim M=%-4d N=%-4d K=%-4d R=%-3d %s %-14s rel err %.2e  max elem %.2e\n", cs.M, cs.N, cs.K, cs.R,
                  cs.bf16 ? "bf16" : "fp16", variant == 0 ? "int4" : variant == 1 ? "int4(sm_75)" : "int8", rel, worst);
    }
  }
}

// A deliberately wrong layout must be caught: swap the A registers a1/a2 before the MMA.
static void test_negative_control() {
  const Problem p = make_problem(16, 8, 64, 0, true, false, 7);
  uint32_t a[32][4], b[32][2];
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r) {
      const RC e = frag_a_m16n8k64_s4(lane, r, 0);
      std::memcpy(&a[lane][r], &p.qact[e.row * 32 + e.col / 2], 4);
    }
    for (int r = 0; r < 2; ++r) {
      const RC e = frag_b_m16n8k64_s4(lane, r, 0);
      std::memcpy(&b[lane][r], &p.qweight[e.col * 32 + e.row / 2], 4);
    }
  }
  int zero[32][4] = {}, d[32][4], d_bad[32][4];
  sim_mma_int(4, 64, a, b, zero, d);
  uint32_t a_bad[32][4];
  std::memcpy(a_bad, a, sizeof(a));
  for (auto& r : a_bad) std::swap(r[1], r[2]);
  sim_mma_int(4, 64, a_bad, b, zero, d_bad);
  int ok = 0, bad_ok = 0;
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 4; ++r) {
      const RC e = frag_c_m16n8(lane, r);
      int ref = 0;
      for (int k = 0; k < 64; ++k) ref += p.qa[e.row * 64 + k] * p.qw[e.col * 64 + k];
      ok += d[lane][r] == ref;
      bad_ok += d_bad[lane][r] == ref;
    }
  CHECK(ok == 128, "direct m16n8k64 warp tile wrong (%d/128)", ok);
  CHECK(bad_ok < 128, "negative control not detected");
}

// Both magic constants, exhaustively over every group sum |I| <= 4096 and a sweep of scales with <= 11
// significant bits (bf16/fp16 origin): the int32 MMA result read as a float is magic + I exactly, and the
// promotion fma(D, s_w, -magic*s_w) is RN(I * s_w) (one rounding, as the spec's product).
static void test_magic_promotion() {
  int bad = 0;
  const float sws[] = {1.0f, 0.0078125f, 3.1415926e-3f, 1.7e-5f, 0.3f, 65504.0f, 1e-30f};
  for (int path = 0; path < 2; ++path) {
    const int step = path == 1 ? 256 : 1;  // the int8 MMA returns 256 * I
    for (int I = -4096; I <= 4096; ++I) {
      const uint32_t bits = magic_bits(path) + uint32_t(step * I);
      const float d = as_float(int(bits));
      if (d != magic_value(path) + float(I)) ++bad;
      for (float sw0 : sws) {
        // round the scale to 11 significant bits, like a bf16/fp16 value widened to fp32
        int e;
        const float m = std::frexp(sw0, &e);
        const float sw = std::ldexp(std::nearbyint(std::ldexp(m, 11)), e - 11);
        const float t = std::fmaf(d, sw, -magic_value(path) * sw);
        if (t != float(double(I) * double(sw))) ++bad;
      }
    }
  }
  CHECK(bad == 0, "magic-number promotion wrong in %d cases", bad);
}

int main() {
  test_magic_promotion();
  test_fragment_maps();
  test_swizzles();
  test_repack_map();
  test_negative_control();
  test_kernel_simulation();
  if (g_failures) {
    std::printf("%d FAILURES\n", g_failures);
    return 1;
  }
  std::printf("ALL PASSED\n");
  return 0;
}
