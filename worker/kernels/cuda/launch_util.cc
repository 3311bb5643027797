#include "worker/kernels/cuda/launch_util.h"

#include <cstdint>

#include "absl/strings/str_cat.h"

namespace qtrain::kernels::cuda {

absl::Status CheckAtLeast(const char* what, const char* name, int64_t value, int64_t min) {
  if (value >= min) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": ", name, " must be >= ", min, ", got ", value));
}

absl::Status CheckNotNull(const char* what, std::initializer_list<NamedPointer> pointers) {
  for (const NamedPointer& p : pointers) {
    if (p.pointer == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", p.name, " is null"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckWorkspace(const char* what, const void* workspace) {
  if (workspace == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": workspace is null"));
  }
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": workspace must be 16-byte aligned"));
  }
  return absl::OkStatus();
}

absl::Status CheckBits(const char* what, int bits, int min_bits, int max_bits) {
  if (bits >= min_bits && bits <= max_bits) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": bits must be in [", min_bits, ", ", max_bits, "], got ", bits));
}

}  // namespace qtrain::kernels::cuda
