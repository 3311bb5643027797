#include "compression/builtin_codecs.h"

#include "common/status_macros.h"
#include "compression/fp16.h"
#include "compression/fp32.h"
#if defined(QTRAIN_HAVE_ONEBIT)
#include "compression/onebit.h"
#endif
#if defined(QTRAIN_HAVE_THRESHOLD)
#include "compression/threshold.h"
#endif
#if defined(QTRAIN_HAVE_QSGD)
#include "compression/qsgd.h"
#endif
#if defined(QTRAIN_HAVE_TERNGRAD)
#include "compression/terngrad.h"
#endif

namespace qtrain::compression {

absl::Status RegisterBuiltinCodecs(CodecRegistry* registry) {
  RETURN_IF_ERROR(registry->Register(Fp32Registration()));
  RETURN_IF_ERROR(registry->Register(Fp16Registration()));
#if defined(QTRAIN_HAVE_ONEBIT)
  RETURN_IF_ERROR(registry->Register(OneBitRegistration()));
#endif
#if defined(QTRAIN_HAVE_THRESHOLD)
  RETURN_IF_ERROR(registry->Register(ThresholdRegistration()));
#endif
#if defined(QTRAIN_HAVE_QSGD)
  RETURN_IF_ERROR(registry->Register(QsgdRegistration()));
#endif
#if defined(QTRAIN_HAVE_TERNGRAD)
  RETURN_IF_ERROR(registry->Register(TernGradRegistration()));
#endif
  return absl::OkStatus();
}

}  // namespace qtrain::compression
