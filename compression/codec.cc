#include "compression/codec.h"

#include <cpuid.h>

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace qtrain::compression {

const char* CodecName(CodecId id) {
  switch (id) {
    case CodecId::kFp32: return "fp32";
    case CodecId::kFp16: return "fp16";
    case CodecId::kOneBit: return "onebit";
    case CodecId::kThreshold: return "threshold";
    case CodecId::kQsgd: return "qsgd";
    case CodecId::kTernGrad: return "terngrad";
  }
  return "unknown";
}

bool CpuHasAvx2() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // clang 14 has no "f16c" for __builtin_cpu_supports: read CPUID leaf 1, ECX bit 29.
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

absl::Status Codec::EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                       std::span<const int64_t> shape, Rng& rng,
                                       EncodedTensor* out) const {
  if (residual.size() != input.size()) {
    return absl::InvalidArgumentError(absl::StrCat("residual has ", residual.size(),
                                                   " elements, input has ", input.size()));
  }
  // v = input + residual, stored in residual; then residual = v - decode(encode(v)).
  for (size_t i = 0; i < input.size(); ++i) residual[i] += input[i];
  RETURN_IF_ERROR(Encode(residual, shape, rng, out));
  std::vector<float> decoded(input.size(), 0.0f);
  RETURN_IF_ERROR(DecodeAdd(*out, std::span<float>(decoded)));
  for (size_t i = 0; i < input.size(); ++i) residual[i] -= decoded[i];
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ShapeElements(std::span<const int64_t> shape) {
  uint64_t product = 1;
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && product > kMaxElements / static_cast<uint64_t>(d))) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad shape [", absl::StrJoin(shape, ","), "]: negative or over ",
                       kMaxElements, " elements"));
    }
    product *= static_cast<uint64_t>(d);
  }
  return product;
}

absl::Status Codec::ValidateInput(std::span<const float> input, std::span<const int64_t> shape) {
  if (input.size() > kMaxElements) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor of ", input.size(), " elements exceeds the limit of ", kMaxElements));
  }
  if (!shape.empty()) {
    ASSIGN_OR_RETURN(uint64_t product, ShapeElements(shape));
    if (product != input.size()) {
      return absl::InvalidArgumentError(absl::StrCat("shape [", absl::StrJoin(shape, ","),
                                                     "] has ", product, " elements, input has ",
                                                     input.size()));
    }
  }
  return absl::OkStatus();
}

void Codec::StartEnvelope(uint32_t version, std::span<const float> input,
                          std::span<const int64_t> shape, EncodedTensor* out) const {
  out->codec = id();
  out->format_version = version;
  out->num_elements = input.size();
  out->shape.assign(shape.begin(), shape.end());
  out->scales.clear();
  out->params.clear();
}

absl::Status Codec::ValidateEnvelope(const EncodedTensor& in, uint32_t max_version,
                                     size_t out_size) const {
  if (in.codec != id()) {
    return absl::InvalidArgumentError(absl::StrCat("payload is for codec id ",
                                                   static_cast<uint32_t>(in.codec), " (",
                                                   CodecName(in.codec), "), this decoder is ",
                                                   CodecName(id())));
  }
  if (in.format_version == 0 || in.format_version > max_version) {
    return absl::InvalidArgumentError(absl::StrCat(CodecName(id()), " payload has format version ",
                                                   in.format_version, "; supported: 1..",
                                                   max_version));
  }
  if (in.num_elements > kMaxElements) {
    return absl::InvalidArgumentError(absl::StrCat(CodecName(id()), " payload declares ",
                                                   in.num_elements, " elements, over the limit ",
                                                   kMaxElements));
  }
  if (in.num_elements != out_size) {
    return absl::InvalidArgumentError(absl::StrCat(CodecName(id()), " payload has ",
                                                   in.num_elements,
                                                   " elements, the output span has ", out_size));
  }
  if (!in.shape.empty()) {
    auto product = ShapeElements(in.shape);
    if (!product.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(CodecName(id()), " payload: ", product.status().message()));
    }
    if (*product != in.num_elements) {
      return absl::InvalidArgumentError(absl::StrCat(
          CodecName(id()), " payload shape [", absl::StrJoin(in.shape, ","), "] has ", *product,
          " elements but num_elements is ", in.num_elements));
    }
  }
  return absl::OkStatus();
}

}  // namespace qtrain::compression
