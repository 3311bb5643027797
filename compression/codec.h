// The gradient-codec interface: encode a float span into an EncodedTensor, and decode-and-add a
// payload into a float span (the aggregation primitive: a sum of many workers' payloads never
// materializes each decoded copy).
//
// Thread-safety: a Codec is immutable after construction; Encode and DecodeAdd are const and may
// run concurrently on different outputs. Stochastic codecs draw from the Rng passed in.
#ifndef QTRAIN_COMPRESSION_CODEC_H_
#define QTRAIN_COMPRESSION_CODEC_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/rng.h"
#include "proto/config.pb.h"

namespace qtrain::compression {

// Values equal proto/tensor.proto's CodecId; only ever appended.
enum class CodecId : uint32_t {
  kFp32 = 1,
  kFp16 = 2,
  kOneBit = 3,
  kThreshold = 4,
  kQsgd = 5,
  kTernGrad = 6,
};
const char* CodecName(CodecId id);

// Tensors larger than this are refused by every encoder and decoder (2^31 - 1 elements, 8 GiB of
// fp32): it bounds what any declared size can make a decoder touch.
inline constexpr uint64_t kMaxElements = (uint64_t{1} << 31) - 1;

// One compressed tensor in memory. Mirrors pb::EncodedTensor (compression/wire.h converts).
struct EncodedTensor {
  CodecId codec = CodecId::kFp32;
  uint32_t format_version = 0;
  uint64_t num_elements = 0;
  std::vector<int64_t> shape;    // logical shape; empty means 1-D
  std::vector<float> scales;     // codec-defined (see each codec's header)
  std::vector<uint32_t> params;  // codec-defined small integers
  std::vector<uint8_t> payload;  // codec-defined packed bytes, little-endian

  // Bytes this tensor occupies on the wire, not counting the proto framing (a few bytes).
  uint64_t WireBytes() const {
    return payload.size() + 4 * scales.size() + 4 * params.size() + 8 * shape.size() + 16;
  }
};

// Which implementation a codec runs. kAuto picks the fastest the CPU supports; kReference is the
// plain scalar implementation every fast path is tested against.
enum class KernelPath { kAuto, kReference };

struct CodecOptions {
  KernelPath path = KernelPath::kAuto;
};

// Product of a shape's dimensions; INVALID_ARGUMENT for a negative dimension or a product over
// kMaxElements (checked without overflow).
absl::StatusOr<uint64_t> ShapeElements(std::span<const int64_t> shape);

// True when this CPU runs the AVX2+FMA+F16C paths.
bool CpuHasAvx2();

class Codec {
 public:
  virtual ~Codec() = default;

  virtual CodecId id() const = 0;
  // Canonical spec string, e.g. "qsgd:levels=16,bucket=512,coding=dense".
  virtual std::string Spec() const = 0;
  // Settings as a message (what crosses the wire in configs and checkpoints).
  virtual pb::CodecConfig Config() const = 0;
  // Whether error feedback is on by default for this method (onebit, threshold: yes).
  virtual bool DefaultErrorFeedback() const { return false; }

  // Encodes `input` (logical `shape`, empty = 1-D) into `out`, reusing out's buffers.
  // Errors: INVALID_ARGUMENT for a shape that does not match, more than kMaxElements, or
  // non-finite input where the codec cannot represent it.
  virtual absl::Status Encode(std::span<const float> input, std::span<const int64_t> shape,
                              Rng& rng, EncodedTensor* out) const = 0;

  // Error-feedback encode: encodes v = input + residual and leaves residual = v - decode(out).
  // The default runs Encode and DecodeAdd (several passes); codecs override it with one fused
  // pass (read gradient and residual once, write payload and new residual once).
  virtual absl::Status EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                          std::span<const int64_t> shape, Rng& rng,
                                          EncodedTensor* out) const;

  // Validates `in` completely (codec id, version, counts, indices, sizes) and then adds the
  // decoded values into `out`, whose size must equal in.num_elements. On any error `out` is
  // unchanged and the Status names what was wrong (INVALID_ARGUMENT; never a crash).
  virtual absl::Status DecodeAdd(const EncodedTensor& in, std::span<float> out) const = 0;

  // Exact payload size in bytes for n elements of `shape`, or -1 when it depends on the data
  // (threshold, qsgd with Elias coding).
  virtual int64_t PayloadBytes(std::span<const int64_t> shape, uint64_t n) const = 0;

 protected:
  // Checks what every decoder checks first: codec id, version in [1, max_version], element
  // count equal to out_size and to the product of the shape.
  absl::Status ValidateEnvelope(const EncodedTensor& in, uint32_t max_version,
                                size_t out_size) const;
  // Checks input size against shape and kMaxElements, for encoders.
  static absl::Status ValidateInput(std::span<const float> input, std::span<const int64_t> shape);
  // Fills the envelope fields of `out` (codec id, version, count, shape), clearing the rest.
  void StartEnvelope(uint32_t version, std::span<const float> input,
                     std::span<const int64_t> shape, EncodedTensor* out) const;
};

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_CODEC_H_
