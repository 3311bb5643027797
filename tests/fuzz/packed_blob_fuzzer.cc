// libFuzzer target for compression/packed_blob.h: UnpackBlob on arbitrary bytes must either fail
// with INVALID_ARGUMENT or return a tensor that PackBlob turns back into exactly the same bytes and
// that the CPU codec of the blob's codec id then decodes or rejects (INVALID_ARGUMENT, output
// untouched) without crashing.
//
// Input layout: bytes 0-1 the receiver's element count (little-endian, <= 65535), then the blob.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/packed_blob.h"

namespace {

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "fuzz packed_blob: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qtrain::compression;
  static const CodecRegistry* registry = [] {
    auto* r = new CodecRegistry;
    if (!RegisterBuiltinCodecs(r).ok()) Fail("registration failed");
    return r;
  }();
  if (size < 2) return 0;
  const uint64_t n = data[0] | (uint64_t{data[1]} << 8);
  const std::span<const uint8_t> blob(data + 2, size - 2);
  auto tensor = UnpackBlob(blob, n, {});
  if (!tensor.ok()) {
    if (tensor.status().code() != absl::StatusCode::kInvalidArgument) Fail("not INVALID_ARGUMENT");
    return 0;
  }
  std::vector<uint8_t> again;
  if (!PackBlob(*tensor, &again).ok()) Fail("an unpacked blob does not pack");
  if (again.size() != blob.size() || std::memcmp(again.data(), blob.data(), blob.size()) != 0) {
    Fail("PackBlob(UnpackBlob(b)) != b");
  }
  // Decode with the codec the blob names (qsgd with the blob's own settings when valid).
  qtrain::pb::CodecConfig config;
  config.set_codec(static_cast<qtrain::pb::CodecId>(tensor->codec));
  if (tensor->codec == CodecId::kQsgd && tensor->params.size() == 2 && tensor->params[0] >= 1 &&
      tensor->params[0] <= 32767 && tensor->params[1] >= 1 && tensor->params[1] <= (1u << 24)) {
    config.mutable_qsgd()->set_levels(tensor->params[0]);
    config.mutable_qsgd()->set_bucket(tensor->params[1]);
  }
  auto codec = registry->Create(config);
  if (!codec.ok()) return 0;
  std::vector<float> out(n, 0.5f);
  const absl::Status s = (*codec)->DecodeAdd(*tensor, std::span<float>(out));
  if (!s.ok()) {
    if (s.code() != absl::StatusCode::kInvalidArgument)
      Fail("decode error is not INVALID_ARGUMENT");
    for (float v : out) {
      if (v != 0.5f) Fail("output modified by a rejected payload");
    }
  }
  return 0;
}
