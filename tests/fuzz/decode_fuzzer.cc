#include "tests/fuzz/decode_fuzzer.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/wire.h"

namespace qtrain::compression {
namespace {

[[noreturn]] void Fail(const char* spec, const char* what) {
  std::fprintf(stderr, "fuzz %s: %s\n", spec, what);
  std::abort();
}

uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace

int FuzzCodec(const char* spec, const uint8_t* data, size_t size) {
  static std::unique_ptr<Codec> codec = [spec] {
    CodecRegistry registry;
    if (!RegisterBuiltinCodecs(&registry).ok()) Fail(spec, "registration failed");
    auto c = registry.CreateFromSpec(spec);
    if (!c.ok()) Fail(spec, "bad spec");
    return std::move(*c);
  }();
  if (size < 5) return 0;
  const uint8_t flags = data[0];
  const uint32_t n = data[1] | (uint32_t{data[2]} << 8);
  const size_t num_scales = data[3], num_params = data[4];
  size_t pos = 5;
  if (size < pos + 4 * (num_scales + num_params)) return 0;

  if (flags & 0x10) {  // encode mode
    std::vector<float> x((size - pos) / 4);
    if (!x.empty()) std::memcpy(x.data(), data + pos, 4 * x.size());
    std::vector<float> residual(x.size(), 0.0f);
    Rng rng(flags);
    EncodedTensor t;
    if (!codec->EncodeWithFeedback(x, std::span<float>(residual), {}, rng, &t).ok()) return 0;
    std::vector<float> out(x.size(), 0.0f);
    if (!codec->DecodeAdd(t, std::span<float>(out)).ok()) Fail(spec, "own payload rejected");
    return 0;
  }

  EncodedTensor t;
  t.codec = codec->id();
  if (flags & 1) t.codec = static_cast<CodecId>(1 + (static_cast<uint32_t>(t.codec) % 6));
  t.format_version = 1 + ((flags >> 1) & 3);
  t.num_elements = n;
  for (size_t i = 0; i < num_scales; ++i, pos += 4) {
    uint32_t bits = Load32(data + pos);
    float f;
    std::memcpy(&f, &bits, 4);
    t.scales.push_back(f);
  }
  for (size_t i = 0; i < num_params; ++i, pos += 4) t.params.push_back(Load32(data + pos));
  t.payload.assign(data + pos, data + size);
  if (flags & 8) {
    std::string bytes = Serialize(t, Checksum::kCrc32);
    auto parsed = Parse(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()),
                                                 bytes.size()),
                        1 << 22);
    if (!parsed.ok()) Fail(spec, "own serialization rejected");
    t = std::move(*parsed);
  }
  std::vector<float> out(n, 0.5f);
  absl::Status s = codec->DecodeAdd(t, std::span<float>(out));
  if (!s.ok()) {
    if (s.code() != absl::StatusCode::kInvalidArgument) Fail(spec, "error is not INVALID_ARGUMENT");
    for (float v : out) {
      if (v != 0.5f) Fail(spec, "output modified by a rejected payload");
    }
  }
  return 0;
}

}  // namespace qtrain::compression
