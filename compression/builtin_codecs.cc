#include "compression/builtin_codecs.h"

#include "common/status_macros.h"
#include "compression/fp16.h"
#include "compression/fp32.h"
#include "compression/onebit.h"
#include "compression/threshold.h"
#include "compression/qsgd.h"
#include "compression/terngrad.h"

namespace qtrain::compression {

absl::Status RegisterBuiltinCodecs(CodecRegistry* registry) {
  RETURN_IF_ERROR(registry->Register(Fp32Registration()));
  RETURN_IF_ERROR(registry->Register(Fp16Registration()));
  RETURN_IF_ERROR(registry->Register(OneBitRegistration()));
  RETURN_IF_ERROR(registry->Register(ThresholdRegistration()));
  RETURN_IF_ERROR(registry->Register(QsgdRegistration()));
  RETURN_IF_ERROR(registry->Register(TernGradRegistration()));
  return absl::OkStatus();
}

}  // namespace qtrain::compression
