// mma_layout.cuh — every index, fragment and packing function the W4A4 GEMM uses, as plain
// __host__ __device__ integer arithmetic so that csrc/cuda/tests/test_mma_layout.cpp (g++, no GPU) can
// check them against the PTX ISA fragment tables and simulate one warp tile end to end.
//
// Nothing here touches memory or issues an instruction: the kernel (w4a4_gemm.cu) and the repack
// (repack_weight.cu) call these functions for every address they form, so a wrong function fails a CPU test.
//
// Conventions (see docs/kernels.md for the pictures):
//   lane            0..31;  gid = lane >> 2 ("groupID"), tig = lane & 3 ("threadID_in_group")
//   canonical int4  byte j of a row holds k = 2j (low nibble) and k = 2j+1 (high nibble) — numerics.md §3
//   k-tile          64 k = one scale group = 32 bytes per row
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SVDQ_HD __host__ __device__ __forceinline__
#else
#define SVDQ_HD inline
#endif

namespace svdq::cuda::layout {

// ------------------------------------------------------------------------------------------------
// Tile configuration (shared by kernel, repack and tests).
// ------------------------------------------------------------------------------------------------
constexpr int kGroup = 64;           // k per scale group == k per pipeline stage
constexpr int kRowBytes = 32;        // bytes of one row of one k-tile (64 int4)
constexpr int kBM = 128;             // CTA tile rows (M)
constexpr int kBN = 128;             // CTA tile cols (N); any N (rows past N are zero-filled)
constexpr int kWarpsM = 2, kWarpsN = 4, kWarps = kWarpsM * kWarpsN, kThreads = kWarps * 32;
constexpr int kWM = kBM / kWarpsM;   // 64 rows per warp
constexpr int kWN = kBN / kWarpsN;   // 32 cols per warp
constexpr int kMT = kWM / 16;        // 4 m16 tiles per warp
constexpr int kNT = kWN / 8;         // 4 n8 tiles per warp
constexpr int kStages = 4;           // cp.async pipeline depth
constexpr int kLoraChunk = 32;       // ranks of lora_act / lora_up staged in shared memory at once
static_assert(kBM * 2 == kThreads && kBN * 2 == kThreads, "one 16-byte cp.async per thread per operand");

// Shared-memory stage: [A: kBM x 32 B][B: kBN x 32 B][s_a: kBM fp32][s_w: kBN fp32]
constexpr int kSmemA = 0;
constexpr int kSmemB = kSmemA + kBM * kRowBytes;
constexpr int kSmemSA = kSmemB + kBN * kRowBytes;
constexpr int kSmemSW = kSmemSA + kBM * 4;
constexpr int kStageBytes = kSmemSW + kBN * 4;                       // 9216
constexpr int kLoraActBytes = kBM * kLoraChunk * 4;                  // 16384 (fp32)
constexpr int kLoraUpBytes = kBN * kLoraChunk * 2;                   // 8192 (16-bit)
constexpr int kSmemLoraAct = kStages * kStageBytes;
constexpr int kSmemLoraUp = kSmemLoraAct + kLoraActBytes;
constexpr int kSmemBytes = kSmemLoraUp + kLoraUpBytes;               // 61440 (< 64 KiB: fits sm_75)

// Magic-number int->float: an int32 accumulator that starts at 0x4B400000 (= float 1.5 * 2^23) and gets
// an integer I with |I| < 2^22 added is, read as a float, exactly 1.5 * 2^23 + I.
constexpr uint32_t kMagicI = 0x4B400000u;
constexpr float kMagicF = 12582912.0f;
// The int8 path's MMA returns 256·I (both operands are 16·q). Starting it at 0x47400000 (= float 1.5·2^15,
// ulp 2^-8) makes the result read as the float 1.5·2^15 + I exactly (256·|I| <= 2^20 stays inside the
// mantissa), so the 1/256 costs nothing: no FMUL per scale, no pre-folded scale tensor (issue 11). Both paths
// then promote with the same two FFMAs against their own constant.
constexpr uint32_t kMagicI8 = 0x47400000u;
constexpr float kMagicF8 = 49152.0f;
constexpr uint32_t magic_bits(int path) { return path == 1 ? kMagicI8 : kMagicI; }
constexpr float magic_value(int path) { return path == 1 ? kMagicF8 : kMagicF; }

// ------------------------------------------------------------------------------------------------
// 1. PTX ISA fragment maps (PTX ISA "Matrix Fragments for mma.m16n8k*"). Each returns the (row, col) of
//    the matrix element held by `lane` in register `reg`, sub-element `e` (nibble / byte / half index
//    inside the 32-bit register, low to high). For A: row = m, col = k. For B: row = k, col = n.
// ------------------------------------------------------------------------------------------------
struct RC { int row, col; };

// mma.m16n8k64 .s4: A = 4 regs x 8 nibbles, B = 2 regs x 8 nibbles.
SVDQ_HD RC frag_a_m16n8k64_s4(int lane, int reg, int e) {
  return {(lane >> 2) + ((reg & 1) ? 8 : 0), (lane & 3) * 8 + e + ((reg & 2) ? 32 : 0)};
}
SVDQ_HD RC frag_b_m16n8k64_s4(int lane, int reg, int e) {
  return {(lane & 3) * 8 + e + (reg ? 32 : 0), lane >> 2};
}
// mma.m16n8k32 .s8: A = 4 regs x 4 bytes, B = 2 regs x 4 bytes.
SVDQ_HD RC frag_a_m16n8k32_s8(int lane, int reg, int e) {
  return {(lane >> 2) + ((reg & 1) ? 8 : 0), (lane & 3) * 4 + e + ((reg & 2) ? 16 : 0)};
}
SVDQ_HD RC frag_b_m16n8k32_s8(int lane, int reg, int e) {
  return {(lane & 3) * 4 + e + (reg ? 16 : 0), lane >> 2};
}
// mma.m16n8k16 .f16/.bf16: A = 4 regs x 2 halves, B = 2 regs x 2 halves.
SVDQ_HD RC frag_a_m16n8k16_f16(int lane, int reg, int e) {
  return {(lane >> 2) + ((reg & 1) ? 8 : 0), (lane & 3) * 2 + e + ((reg & 2) ? 8 : 0)};
}
SVDQ_HD RC frag_b_m16n8k16_f16(int lane, int reg, int e) {
  return {(lane & 3) * 2 + e + (reg ? 8 : 0), lane >> 2};
}
// C/D of every m16n8 shape above (s32 or f32): 4 regs.
SVDQ_HD RC frag_c_m16n8(int lane, int reg) {
  return {(lane >> 2) + ((reg & 2) ? 8 : 0), (lane & 3) * 2 + (reg & 1)};
}
// mma.m8n8k32 .s4 (Turing, sm_75): A = 1 reg x 8 nibbles, B = 1 reg x 8 nibbles, C = 2 regs.
SVDQ_HD RC frag_a_m8n8k32_s4(int lane, int e) { return {lane >> 2, (lane & 3) * 8 + e}; }
SVDQ_HD RC frag_b_m8n8k32_s4(int lane, int e) { return {(lane & 3) * 8 + e, lane >> 2}; }
SVDQ_HD RC frag_c_m8n8k32(int lane, int reg) { return {lane >> 2, (lane & 3) * 2 + reg}; }

// ------------------------------------------------------------------------------------------------
// 2. ldmatrix.sync.aligned.m8n8.x4.shared.b16: matrix q (0..3) is 8 rows x 16 bytes; lane l supplies the
//    address of row (l & 7) of matrix (l >> 3); register q of lane l receives 32-bit word (l & 3) of row
//    (l >> 2) of matrix q.
// ------------------------------------------------------------------------------------------------
struct LdsmSrc { int matrix, row; };
SVDQ_HD LdsmSrc ldsm_addr_lane(int lane) { return {lane >> 3, lane & 7}; }
struct LdsmDst { int row, word; };
SVDQ_HD LdsmDst ldsm_dst(int lane) { return {lane >> 2, lane & 3}; }

// Which (tile row, 16-byte chunk) each ldmatrix matrix covers, for our operands in a [rows][32 B] k-tile.
//   A (m16 x k64): matrices {rows 0-7 chunk 0, rows 8-15 chunk 0, rows 0-7 chunk 1, rows 8-15 chunk 1}
//                  -> registers a0..a3 in exactly the m16n8k64 .s4 A order (see test).
//   B (two n8 tiles x k64): matrices {tile 0 chunk 0, tile 0 chunk 1, tile 1 chunk 0, tile 1 chunk 1}
//                  -> b[2p][0], b[2p][1], b[2p+1][0], b[2p+1][1].
SVDQ_HD void ldsm_a_src(int lane, int* row, int* chunk) {
  const LdsmSrc s = ldsm_addr_lane(lane);
  *row = s.row + ((s.matrix & 1) ? 8 : 0);
  *chunk = s.matrix >> 1;
}
SVDQ_HD void ldsm_b_src(int lane, int* row, int* chunk) {
  const LdsmSrc s = ldsm_addr_lane(lane);
  *row = s.row + ((s.matrix >> 1) ? 8 : 0);
  *chunk = s.matrix & 1;
}

// ------------------------------------------------------------------------------------------------
// 3. Shared-memory k-tile layout: [rows][32 B], the two 16-byte chunks of a row swapped on rows 4-7 mod 8.
//    An ldmatrix phase reads 8 rows x 16 B; without the swap rows r and r+4 (128 B apart) share banks.
//      row 0: |c0|c1|   row 4: |c1|c0|
//      row 1: |c0|c1|   row 5: |c1|c0|   ...
// ------------------------------------------------------------------------------------------------
SVDQ_HD int smem_tile_offset(int row, int chunk) {
  return row * kRowBytes + ((chunk ^ ((row >> 2) & 1)) << 4);
}
// Byte offset of byte `b` (0..31) of row `row` (for the CPU simulation; the kernel moves 16-byte chunks).
SVDQ_HD int smem_tile_byte(int row, int b) { return smem_tile_offset(row, b >> 4) + (b & 15); }

// Loader mapping: thread t (0..255) copies one 16-byte chunk of the A tile and one of the B tile.
SVDQ_HD void loader_chunk(int tid, int* row, int* chunk) { *row = tid >> 1; *chunk = tid & 1; }

// lora_act stage [kBM][kLoraChunk] fp32, 16-byte chunks (4 floats) XOR-swizzled by 2*(row & 3) so that the
// float2 fragment reads (rows gid, cols 2*tig) of a half-warp hit 32 distinct banks.
SVDQ_HD int smem_lact_offset_f(int row, int col) {  // in floats
  return row * kLoraChunk + ((((col >> 2) ^ ((row & 3) << 1)) << 2) | (col & 3));
}
// lora_up stage [kBN][kLoraChunk] 16-bit, 16-byte chunks (8 halves) XOR-swizzled by (row >> 1) & 3 so the
// 32-bit fragment reads (rows gid, cols 2*tig + 8h) of a warp hit 32 distinct banks.
SVDQ_HD int smem_lup_offset_h(int row, int col) {  // in halves
  return row * kLoraChunk + ((((col >> 3) ^ ((row >> 1) & 3)) << 3) | (col & 7));
}

// ------------------------------------------------------------------------------------------------
// 4. Prepared (repacked) weight layout. Canonical qweight [N, K/2] -> group-major:
//
//      prepared = [G][N rows][32 B]     byte (n, kbyte) at ((kbyte / 32) * N + n) * 32 + kbyte % 32
//                  g   n      canonical bytes of row n, k in [64g, 64g+64)
//
//    Exactly N*K/2 bytes (no padding rows, so the tensor can keep the shape [N, K/2]). The B tile of a pipeline
//    stage (rows n0..n0+127 of group g) is one contiguous 4 KiB run: fully coalesced 16-byte cp.async,
//    rows >= N zero-filled. Within a row the nibble order stays canonical: 32-bit word w of a row holds
//    k = 8w..8w+7, which is what both mma paths need (section 5). Scales: fp32 [G][N], same idea.
// ------------------------------------------------------------------------------------------------
SVDQ_HD int64_t prepared_qweight_offset(int64_t n, int64_t kbyte, int64_t N) {
  return ((kbyte / kRowBytes) * N + n) * kRowBytes + (kbyte % kRowBytes);
}
SVDQ_HD int64_t prepared_wscale_offset(int64_t n, int64_t g, int64_t N) { return g * N + n; }

// ------------------------------------------------------------------------------------------------
// 5. int4 -> int8 for the Hopper path (mma.m16n8k32 .s8), one or two logic ops per register:
//      hi(x) = x & 0xF0F0F0F0          byte b = 16 * q[2b+1]   (the nibble already sits in the high half)
//      lo(x) = (x << 4) & 0xF0F0F0F0   byte b = 16 * q[2b]
//    A signed nibble in the high half of a byte *is* the int8 16*q (two's complement), so no sign
//    extension and no offset correction; the mma returns 256 * I exactly (|256 I| <= 2^20) and the
//    1/256 goes into the weight scale (a power of two: exact).
//
//    From the 4 int4 A registers (a0..a3, m16n8k64 order) and 2 B registers (b0, b1), the two k32 steps
//    of a group are:
//      step 0:  A = {lo(a0), lo(a1), hi(a0), hi(a1)}   B = {lo(b0), hi(b0)}
//      step 1:  A = {lo(a2), lo(a3), hi(a2), hi(a3)}   B = {lo(b1), hi(b1)}
//    Each s8 k-slot then holds the same canonical k in A and B (k order inside the group is permuted
//    identically on both sides, which leaves the dot product unchanged) — checked by the test.
// ------------------------------------------------------------------------------------------------
SVDQ_HD uint32_t unpack_hi(uint32_t x) { return x & 0xF0F0F0F0u; }
SVDQ_HD uint32_t unpack_lo(uint32_t x) { return (x << 4) & 0xF0F0F0F0u; }
// Source register (in the int4 fragment) and half (0 = lo, 1 = hi) of s8 register `reg` at k32 `step`.
SVDQ_HD void s8_a_source(int step, int reg, int* src_reg, int* hi) {
  *src_reg = step * 2 + (reg & 1);
  *hi = reg >> 1;
}
SVDQ_HD void s8_b_source(int step, int reg, int* src_reg, int* hi) {
  *src_reg = step;
  *hi = reg;
}

}  // namespace svdq::cuda::layout
