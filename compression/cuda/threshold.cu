// threshold (Strom) on the GPU. Math and byte layout are compression/threshold.h's: every element
// of v = grad + residual with |v| > tau is sent as +-tau, the residual keeps v - sent; the payload
// is one LEB128 varint of (gap << 1) | sign per entry, in increasing index order, scales = [tau],
// params = [entry count]. There is no reduction: GPU and CPU payloads and residuals are identical.
// (A non-finite v marks the blob invalid and keeps that element's old residual; the CPU codec
// returns INVALID_ARGUMENT.)
//
// Encode (deterministic; no atomics decide anything but the non-finite mark):
//   1. select: tiles of 4096 elements; v, the residual and the selection/sign bit masks (ballots)
//      in one pass that reads grad and residual once and writes the residual once; each tile
//      also summarizes its entries as an EntryRun (count, first, last, bytes but the first's).
//   2. scan: one block combines the tiles' runs in order (an associative operation) to give each
//      tile its byte offset and the index of the entry before it, and writes the header (entry
//      count, payload size, blob size).
//   3. write: one thread per 32-element mask word writes its entries' varints into the tile's
//      bytes in shared memory at offsets from a block scan; the block then stores the tile's bytes
//      with consecutive threads on consecutive bytes. The masks cost n/4 bytes written and read
//      again (2 bits per element).
// Decode-add:
//   1. validate: tiles of 4096 payload bytes, 16 per thread, held in registers with the 8
//      before them; every byte below 0x80 ends a varint, which is parsed backwards (as
//      codec_math.h ParseVarintEndingAt does) and checked as compression/varint.h checks it; each
//      tile counts its entries and sums gap + 1 over them.
//   2. one block checks the totals (entry count == params[0]; sum of gap + 1 <= n, i.e. every
//      index < n) and scans the sums into each tile's first index.
//   3. apply: each tile re-parses its varints and adds +-tau at out[index]. Indices are strictly
//      increasing, so every entry touches its own element and every tile its own span of out:
//      plain reads and writes, no atomics. A dense tile (span <= kDenseSpan) marks its entries in
//      shared memory and sweeps its span in 16-byte groups; a sparse one adds entry by entry.
// Both directions need scratch (the caller allocates it: see codec_kernels.h).
#include "compression/cuda/codec_kernels.h"
#include "compression/cuda/device_util.cuh"

namespace qtrain::compression::cuda {
namespace {

constexpr uint32_t kSelectThreads = 512;
constexpr uint32_t kSelectItems = kThresholdTile / kSelectThreads;  // 8
constexpr uint32_t kWriteThreads = kThresholdTileWords;             // 128
constexpr uint32_t kScanThreads = 1024;

// Where each tile's entries start: the byte offset in the payload and the index after the entry
// before the tile (0 when there is none).
struct TileStart {
  uint64_t offset;
  uint64_t next;
};

uint64_t AlignUp16(uint64_t x) { return (x + 15) & ~uint64_t{15}; }

struct EncodeScratch {
  uint32_t* flag;     // non-zero: a non-finite v was seen
  EntryRun* runs;     // per tile
  TileStart* starts;  // per tile
  uint32_t* masks;    // per tile: 128 selection words, then 128 sign words
};

EncodeScratch EncodeScratchFor(void* base, uint64_t tiles) {
  uint8_t* p = static_cast<uint8_t*>(base);
  EncodeScratch s;
  s.flag = reinterpret_cast<uint32_t*>(p);
  uint64_t offset = 16;
  s.runs = reinterpret_cast<EntryRun*>(p + offset);
  offset = AlignUp16(offset + tiles * sizeof(EntryRun));
  s.starts = reinterpret_cast<TileStart*>(p + offset);
  offset = AlignUp16(offset + tiles * sizeof(TileStart));
  s.masks = reinterpret_cast<uint32_t*>(p + offset);
  return s;
}

uint64_t EncodeTiles(uint64_t n) { return (n + kThresholdTile - 1) / kThresholdTile; }

__global__ void __launch_bounds__(kSelectThreads)
    ThresholdSelectKernel(ThresholdEncodeArgs a, EncodeScratch s) {
  const uint64_t tile = blockIdx.x;
  const uint64_t base = tile * kThresholdTile;
  __shared__ uint32_t selected_words[kThresholdTileWords];
  __shared__ uint32_t sign_words[kThresholdTileWords];
  __shared__ EntryRun smem_runs[32];
  float v[kSelectItems];
#pragma unroll
  for (uint32_t k = 0; k < kSelectItems; ++k) {
    const uint64_t i = base + k * kSelectThreads + threadIdx.x;
    v[k] = i < a.n ? a.grad[i] : 0.0f;
  }
  if (a.residual != nullptr) {
#pragma unroll
    for (uint32_t k = 0; k < kSelectItems; ++k) {
      const uint64_t i = base + k * kSelectThreads + threadIdx.x;
      if (i < a.n) v[k] = AddRn(v[k], a.residual[i]);
    }
  }
#pragma unroll
  for (uint32_t k = 0; k < kSelectItems; ++k) {
    const uint64_t i = base + k * kSelectThreads + threadIdx.x;
    const bool in = i < a.n;
    const bool finite = IsFiniteF(v[k]);
    const bool selected = in && finite && AbsF(v[k]) > a.tau;
    const bool negative = v[k] < 0.0f;
    if (in && !finite) atomicOr(s.flag, 1u);
    if (in && finite && a.residual != nullptr) {
      a.residual[i] = selected ? SubRn(v[k], negative ? -a.tau : a.tau) : v[k];
    }
    const uint32_t sel = __ballot_sync(kFullMask, selected);
    const uint32_t sgn = __ballot_sync(kFullMask, selected && negative);
    if (LaneId() == 0) {
      selected_words[k * (kSelectThreads / 32) + WarpId()] = sel;
      sign_words[k * (kSelectThreads / 32) + WarpId()] = sgn;
    }
  }
  __syncthreads();
  EntryRun run = EmptyRun();
  if (threadIdx.x < kThresholdTileWords) {
    const uint32_t q = threadIdx.x;
    s.masks[tile * 2 * kThresholdTileWords + q] = selected_words[q];
    s.masks[tile * 2 * kThresholdTileWords + kThresholdTileWords + q] = sign_words[q];
    run = WordRun(selected_words[q], base + 32 * q);
  }
  const EntryRun total = BlockCombineRuns(run, smem_runs);
  if (threadIdx.x == 0) s.runs[tile] = total;
}

__global__ void __launch_bounds__(kScanThreads)
    ThresholdScanKernel(ThresholdEncodeArgs a, EncodeScratch s, uint64_t tiles) {
  __shared__ EntryRun smem_runs[32];
  const uint64_t per = (tiles + kScanThreads - 1) / kScanThreads;
  const uint64_t t0 = min(uint64_t{threadIdx.x} * per, tiles);
  const uint64_t t1 = min(t0 + per, tiles);
  EntryRun local = EmptyRun();
  for (uint64_t t = t0; t < t1; ++t) local = CombineRuns(local, s.runs[t]);
  EntryRun total;
  EntryRun prefix = BlockExclusiveRuns(local, smem_runs, &total);
  for (uint64_t t = t0; t < t1; ++t) {
    s.starts[t] =
        TileStart{RunStreamBytes(prefix), prefix.count != 0 ? uint64_t{prefix.last} + 1 : 0};
    prefix = CombineRuns(prefix, s.runs[t]);
  }
  if (threadIdx.x != 0) return;
  const uint64_t payload_bytes = RunStreamBytes(total);
  const DevBlobLayout l = BlobLayoutFor(1, 1, payload_bytes);  // payload_offset == 48
  uint32_t* w = reinterpret_cast<uint32_t*>(a.blob);
  w[0] = kDevBlobMagic;
  w[1] = kDevThreshold;
  w[2] = 1;  // ThresholdCodec::kFormatVersion
  w[3] = 1;  // scales: [tau]
  w[4] = 1;  // params: [entry count]
  w[5] = *s.flag != 0 ? kDevBlobReservedNonFinite : 0;
  w[6] = static_cast<uint32_t>(payload_bytes);
  w[7] = static_cast<uint32_t>(payload_bytes >> 32);
  w[8] = FloatBits(a.tau);
  w[9] = total.count;
  w[10] = 0;
  w[11] = 0;
  for (uint64_t k = l.payload_offset + payload_bytes; k < l.total; ++k) a.blob[k] = 0;
  if (a.blob_bytes_out != nullptr) *a.blob_bytes_out = l.total;
}

// A tile's entries take at most kMaxTileBytes: the first entry's varint up to 5 bytes, every
// other entry of gap g at most g + 1 bytes (VarintBytesForGap), and those gaps plus one sum to
// less than the tile's 4096 elements.
constexpr uint32_t kMaxTileBytes = kThresholdTile + 8;

__global__ void __launch_bounds__(kWriteThreads)
    ThresholdWriteKernel(ThresholdEncodeArgs a, EncodeScratch s) {
  const uint64_t tile = blockIdx.x;
  if (s.runs[tile].count == 0) return;  // uniform over the block
  __shared__ uint64_t smem[32];
  // The tile's bytes are assembled here, then stored with consecutive threads writing
  // consecutive bytes (the varints' own writes would scatter one byte per thread).
  __shared__ uint8_t staged[kMaxTileBytes];
  const uint32_t q = threadIdx.x;
  const uint32_t sel = s.masks[tile * 2 * kThresholdTileWords + q];
  const uint32_t sgn = s.masks[tile * 2 * kThresholdTileWords + kThresholdTileWords + q];
  const TileStart start = s.starts[tile];
  const uint64_t word_base = tile * kThresholdTile + 32 * uint64_t{q};
  const uint64_t word_next = sel != 0 ? word_base + HighBit(sel) + 1 : 0;
  const uint64_t before = BlockExclusiveMax(word_next, smem);
  const uint64_t next = before > start.next ? before : start.next;
  const uint64_t bytes = WordBytes(sel, word_base, next);
  uint64_t tile_bytes = 0;
  const uint64_t offset = BlockExclusiveSum(bytes, smem, &tile_bytes);
  PutWordEntries(sel, sgn, word_base, next, staged + offset);
  __syncthreads();
  uint8_t* dst = a.blob + kThresholdPayloadOffset + start.offset;
  for (uint32_t b = q; b < tile_bytes; b += kWriteThreads) dst[b] = staged[b];
}

// ---- Decode ------------------------------------------------------------------------------------

constexpr uint32_t kDecodeThreads = 256;
constexpr uint32_t kBytesPerThread = kThresholdDecodeTile / kDecodeThreads;  // 16
// A decode tile whose entries span at most this many elements (a quarter or more of them sent)
// adds along the span through shared memory instead of at each entry.
constexpr uint32_t kDenseSpan = 16384;

struct DecodeScratch {
  uint32_t* counts;  // per tile: entries
  uint64_t* sums;    // per tile: sum of gap + 1
  uint64_t* prefix;  // per tile: index of the tile's first entry minus its gap
};

uint64_t DecodeTilesBound(uint64_t blob_bytes) {
  if (blob_bytes <= kThresholdPayloadOffset) return 0;
  return (blob_bytes - kThresholdPayloadOffset + kThresholdDecodeTile - 1) / kThresholdDecodeTile;
}

DecodeScratch DecodeScratchFor(void* base, uint64_t tiles) {
  uint8_t* p = static_cast<uint8_t*>(base);
  DecodeScratch s;
  s.counts = reinterpret_cast<uint32_t*>(p);
  uint64_t offset = AlignUp16(tiles * 4);
  s.sums = reinterpret_cast<uint64_t*>(p + offset);
  offset = AlignUp16(offset + tiles * 8);
  s.prefix = reinterpret_cast<uint64_t*>(p + offset);
  return s;
}

// The thread's 16 payload bytes: which end a varint (terminators) and those varints' values.
// Returns a bit mask of the terminators. Parses as ParseVarintEndingAt does (same values, same
// errors), but from registers: the 16 bytes and the 8 before them (a varint ending here may start
// there, and a sixth byte back only matters as "too long"), loaded once as two vectors instead
// of a byte load for every byte of every varint.
__device__ __forceinline__ uint32_t ThreadVarints(const uint8_t* payload, uint64_t payload_bytes,
                                                  uint64_t p0, uint32_t* values, int32_t* error) {
  if (p0 >= payload_bytes) return 0;
  // 16-byte aligned (the blob and the payload offset are), and inside the blob (whose total is
  // the payload end rounded up to 16). Bytes before the payload read as 0, which ends a varint
  // as the payload's start does.
  const uint4 chunk = *reinterpret_cast<const uint4*>(payload + p0);
  const uint2 before =
      p0 >= 8 ? *reinterpret_cast<const uint2*>(payload + p0 - 8) : make_uint2(0, 0);
  const uint32_t w[6] = {before.x, before.y, chunk.x, chunk.y, chunk.z, chunk.w};
  // Byte i of the window: payload[p0 - 8 + i]. Every index below is a constant after unrolling.
  const auto byte = [&](uint32_t i) { return (w[i / 4] >> (8 * (i % 4))) & 0xffu; };
  uint32_t terminators = 0;
#pragma unroll
  for (uint32_t j = 0; j < kBytesPerThread; ++j) {
    const uint32_t t = 8 + j;
    const uint32_t last = byte(t);
    if (p0 + j >= payload_bytes || last >= 0x80) continue;
    uint32_t k = 0;  // continuation bytes before t, at most 5 looked at
#pragma unroll
    for (uint32_t i = 1; i <= 5; ++i) {
      if (k == i - 1 && byte(t - i) >= 0x80) k = i;
    }
    int32_t e = kDecodeOk;
    if (k == 5) {
      e = kErrVarintTooLong;
    } else if (k == 4 && last > 0x0f) {
      e = kErrVarintOverflow;
    } else if (k > 0 && last == 0) {
      e = kErrVarintNonCanonical;
    }
    if (e != kDecodeOk) {
      if (error != nullptr) ReportError(error, e);
      continue;
    }
    uint32_t v = last;
#pragma unroll
    for (uint32_t i = 1; i <= 4; ++i) {
      if (i <= k) v = (v << 7) | (byte(t - i) & 0x7fu);
    }
    values[j] = v;
    terminators |= 1u << j;
  }
  return terminators;
}

__global__ void __launch_bounds__(kDecodeThreads)
    ThresholdValidateTiles(ThresholdDecodeArgs a, DecodeScratch s) {
  if (*a.d.error != kDecodeOk) return;
  const DevBlobHeader h = ReadBlobHeader(a.d.blob);
  const uint64_t tiles = (h.payload_bytes + kThresholdDecodeTile - 1) / kThresholdDecodeTile;
  const uint64_t tile = blockIdx.x;
  if (tile >= tiles) return;  // uniform over the block
  __shared__ uint64_t smem_sum[32];
  __shared__ uint32_t smem_count[32];
  const uint8_t* payload = a.d.blob + kThresholdPayloadOffset;
  const uint64_t p0 = tile * kThresholdDecodeTile + kBytesPerThread * threadIdx.x;
  uint32_t values[kBytesPerThread];
  const uint32_t terminators = ThreadVarints(payload, h.payload_bytes, p0, values, a.d.error);
  uint64_t sum = 0;
#pragma unroll
  for (uint32_t j = 0; j < kBytesPerThread; ++j) {
    if (terminators & (1u << j)) sum += uint64_t{values[j] >> 1} + 1;
  }
  const uint32_t count =
      BlockReduce(static_cast<uint32_t>(PopCount(terminators)), SumOp(), 0u, smem_count);
  sum = BlockReduce(sum, SumOp(), uint64_t{0}, smem_sum);
  if (threadIdx.x == 0) {
    s.counts[tile] = count;
    s.sums[tile] = sum;
  }
}

__global__ void __launch_bounds__(kScanThreads)
    ThresholdCheckTotals(ThresholdDecodeArgs a, DecodeScratch s) {
  if (*a.d.error != kDecodeOk) return;
  const DevBlobHeader h = ReadBlobHeader(a.d.blob);
  const uint64_t tiles = (h.payload_bytes + kThresholdDecodeTile - 1) / kThresholdDecodeTile;
  const uint64_t declared = LoadLe32(a.d.blob + kDevBlobHeaderBytes + 4);  // params[0]
  __shared__ uint64_t smem[32];
  const uint64_t per = (tiles + kScanThreads - 1) / kScanThreads;
  const uint64_t t0 = min(uint64_t{threadIdx.x} * per, tiles);
  const uint64_t t1 = min(t0 + per, tiles);
  uint64_t count = 0, sum = 0;
  for (uint64_t t = t0; t < t1; ++t) {
    count += s.counts[t];
    sum += s.sums[t];
  }
  uint64_t total_count = 0, total_sum = 0;
  BlockExclusiveSum(count, smem, &total_count);
  uint64_t running = BlockExclusiveSum(sum, smem, &total_sum);
  for (uint64_t t = t0; t < t1; ++t) {
    s.prefix[t] = running;
    running += s.sums[t];
  }
  if (threadIdx.x == 0) {
    if (total_count != declared) {
      ReportError(a.d.error, kErrEntryCount);
    } else if (total_sum > a.d.n) {
      ReportError(a.d.error, kErrIndexOutOfRange);  // the last index is total_sum - 1
    }
  }
}

__global__ void __launch_bounds__(kDecodeThreads)
    ThresholdApplyTiles(ThresholdDecodeArgs a, DecodeScratch s) {
  if (*a.d.error != kDecodeOk) return;
  const DevBlobHeader h = ReadBlobHeader(a.d.blob);
  const uint64_t tiles = (h.payload_bytes + kThresholdDecodeTile - 1) / kThresholdDecodeTile;
  const uint64_t tile = blockIdx.x;
  if (tile >= tiles) return;  // uniform over the block
  __shared__ uint64_t smem[32];
  const float tau = BitsFloat(LoadLe32(a.d.blob + kDevBlobHeaderBytes));
  const uint8_t* payload = a.d.blob + kThresholdPayloadOffset;
  const uint64_t p0 = tile * kThresholdDecodeTile + kBytesPerThread * threadIdx.x;
  uint32_t values[kBytesPerThread];
  const uint32_t terminators = ThreadVarints(payload, h.payload_bytes, p0, values, nullptr);
  uint64_t sum = 0;
#pragma unroll
  for (uint32_t j = 0; j < kBytesPerThread; ++j) {
    if (terminators & (1u << j)) sum += uint64_t{values[j] >> 1} + 1;
  }
  uint64_t tile_sum = 0;
  const uint64_t offset = BlockExclusiveSum(sum, smem, &tile_sum);
  const uint64_t base = s.prefix[tile];
  if (tile_sum > kDenseSpan) {  // a sparse tile (uniform over the block): add at each entry
    uint64_t next = base + offset;
#pragma unroll
    for (uint32_t j = 0; j < kBytesPerThread; ++j) {
      if ((terminators & (1u << j)) == 0) continue;
      const uint64_t index = next + (values[j] >> 1);
      a.d.out[index] = AddRn(a.d.out[index], (values[j] & 1u) ? -tau : tau);
      next = index + 1;
    }
    return;
  }
  // A dense tile: its entries lie in out[base, base + span), which no other tile touches. Mark
  // them in shared memory (0 none, 1 +tau, 2 -tau), then sweep the span in 16-byte groups of out
  // (aligned in memory; `lead` elements of the first group precede base), loading several groups
  // before storing any: coalesced, and not one dependent load-add-store per entry. The groups at
  // either end reach outside the span and are added element by element, marked ones only.
  __shared__ __align__(16) uint8_t marks[kDenseSpan + 8];
  const uint32_t span = static_cast<uint32_t>(tile_sum);
  const uint32_t misalign = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(a.d.out) / 4 % 4);
  const uint32_t lead = static_cast<uint32_t>((base + misalign) % 4);
  const uint32_t groups = (lead + span + 3) / 4;
  for (uint32_t i = threadIdx.x; i < groups; i += kDecodeThreads) {
    reinterpret_cast<uint32_t*>(marks)[i] = 0;
  }
  __syncthreads();
  uint32_t local = lead + static_cast<uint32_t>(offset);
#pragma unroll
  for (uint32_t j = 0; j < kBytesPerThread; ++j) {
    if ((terminators & (1u << j)) == 0) continue;
    local += values[j] >> 1;
    marks[local] = static_cast<uint8_t>(1u + (values[j] & 1u));
    ++local;
  }
  __syncthreads();
  float* first = a.d.out + base - lead;  // 16-byte aligned
  const auto add = [&](float x, uint32_t m) { return m == 0 ? x : AddRn(x, m == 2 ? -tau : tau); };
  const uint32_t* mark_words = reinterpret_cast<const uint32_t*>(marks);
  // The end groups: the first when it starts before base (thread 0), the last when it ends past
  // the span and is not that same group (thread 1).
  const bool first_partial = lead != 0;
  const bool last_partial = (lead + span) % 4 != 0;
  const uint32_t g_begin = first_partial ? 1 : 0;
  const uint32_t g_end = last_partial ? groups - 1 : groups;
  const bool mine = threadIdx.x == 0 ? first_partial
                    : threadIdx.x == 1 ? last_partial && (groups > 1 || !first_partial)
                                       : false;
  if (mine) {
    const uint32_t g = threadIdx.x == 0 ? 0 : groups - 1;
    for (uint32_t q = 0; q < 4; ++q) {
      const uint32_t m = marks[4 * g + q];
      if (m != 0) first[4 * g + q] = add(first[4 * g + q], m);
    }
  }
  constexpr uint32_t kUnroll = 4;
  for (uint32_t g0 = g_begin + threadIdx.x; g0 < g_end; g0 += kUnroll * kDecodeThreads) {
    float4 v[kUnroll] = {};
    uint32_t m[kUnroll];
#pragma unroll
    for (uint32_t u = 0; u < kUnroll; ++u) {
      const uint32_t g = g0 + u * kDecodeThreads;
      m[u] = g < g_end ? mark_words[g] : 0;
      if (m[u] != 0) v[u] = reinterpret_cast<const float4*>(first)[g];
    }
#pragma unroll
    for (uint32_t u = 0; u < kUnroll; ++u) {
      if (m[u] == 0) continue;
      v[u].x = add(v[u].x, m[u] & 0xffu);
      v[u].y = add(v[u].y, (m[u] >> 8) & 0xffu);
      v[u].z = add(v[u].z, (m[u] >> 16) & 0xffu);
      v[u].w = add(v[u].w, m[u] >> 24);
      reinterpret_cast<float4*>(first)[g0 + u * kDecodeThreads] = v[u];
    }
  }
}

}  // namespace

uint64_t ThresholdEncodeScratchBytes(uint64_t n) {
  const uint64_t tiles = EncodeTiles(n);
  return 16 + AlignUp16(tiles * sizeof(EntryRun)) + AlignUp16(tiles * sizeof(TileStart)) +
         tiles * 2 * kThresholdTileWords * sizeof(uint32_t);
}

cudaError_t LaunchThresholdEncode(const ThresholdEncodeArgs& a, cudaStream_t stream) {
  const uint64_t tiles = EncodeTiles(a.n);
  const EncodeScratch s = EncodeScratchFor(a.scratch, tiles);
  cudaError_t e = cudaMemsetAsync(s.flag, 0, sizeof(uint32_t), stream);
  if (e != cudaSuccess) return e;
  if (tiles > 0) {
    ThresholdSelectKernel<<<static_cast<uint32_t>(tiles), kSelectThreads, 0, stream>>>(a, s);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  ThresholdScanKernel<<<1, kScanThreads, 0, stream>>>(a, s, tiles);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  if (tiles > 0) {
    ThresholdWriteKernel<<<static_cast<uint32_t>(tiles), kWriteThreads, 0, stream>>>(a, s);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  return cudaSuccess;
}

uint64_t ThresholdDecodeScratchBytes(uint64_t blob_bytes) {
  const uint64_t tiles = DecodeTilesBound(blob_bytes);
  return AlignUp16(tiles * 4) + AlignUp16(tiles * 8) + tiles * 8;
}

cudaError_t LaunchThresholdDecodeAdd(const ThresholdDecodeArgs& a, cudaStream_t stream) {
  const uint64_t tiles = DecodeTilesBound(a.blob_bytes);
  const DecodeScratch s = tiles > 0 ? DecodeScratchFor(a.scratch, tiles) : DecodeScratch{};
  cudaError_t e;
  if (tiles > 0) {
    ThresholdValidateTiles<<<static_cast<uint32_t>(tiles), kDecodeThreads, 0, stream>>>(a, s);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  ThresholdCheckTotals<<<1, kScanThreads, 0, stream>>>(a, s);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  if (tiles > 0) {
    ThresholdApplyTiles<<<static_cast<uint32_t>(tiles), kDecodeThreads, 0, stream>>>(a, s);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace qtrain::compression::cuda
