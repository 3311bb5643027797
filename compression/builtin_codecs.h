// Registers every codec that ships with qtrain: fp32, fp16, onebit, threshold, qsgd, terngrad.
// Called explicitly (no static self-registration). Not thread-safe: call before sharing.
#ifndef QTRAIN_COMPRESSION_BUILTIN_CODECS_H_
#define QTRAIN_COMPRESSION_BUILTIN_CODECS_H_

#include "absl/status/status.h"
#include "compression/codec_registry.h"

namespace qtrain::compression {

absl::Status RegisterBuiltinCodecs(CodecRegistry* registry);

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_BUILTIN_CODECS_H_
