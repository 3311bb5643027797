// Small helpers shared by the layer implementations. Internal to worker/nn.
#ifndef QTRAIN_WORKER_NN_LAYER_UTIL_H_
#define QTRAIN_WORKER_NN_LAYER_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "common/logging.h"
#include "worker/nn/tensor.h"

namespace qtrain::nn::internal {

// Gives `t` the shape `dims`, allocating a new Shape only when it differs from the current one,
// so steady-state steps (same shapes every step) allocate nothing.
inline void EnsureShape(Tensor* t, std::initializer_list<int64_t> dims) {
  const Shape& s = t->shape();
  if (s.size() == dims.size() && std::equal(dims.begin(), dims.end(), s.begin())) return;
  t->Resize(Shape(dims));
}
inline void EnsureShape(Tensor* t, const Shape& shape) {
  if (t->shape() != shape) t->Resize(shape);
}

// Aborts with the status message: Forward/Backward preconditions are programmer errors.
inline void CheckOk(const absl::Status& status) { QTRAIN_CHECK(status.ok()) << status.ToString(); }

// "<what> of layer '<name>' expects ..., got [..]".
absl::Status BadInput(const std::string& layer_name, const std::string& expectation,
                      const Shape& got);

}  // namespace qtrain::nn::internal

#endif  // QTRAIN_WORKER_NN_LAYER_UTIL_H_
