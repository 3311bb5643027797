#include "compression/error_feedback.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace qtrain::compression {

absl::Status ErrorFeedback::Encode(std::string_view key, std::span<const float> grad,
                                   std::span<const int64_t> shape, Rng& rng, EncodedTensor* out) {
  if (mode_ == FeedbackMode::kOff) return codec_->Encode(grad, shape, rng, out);
  auto [it, inserted] = residuals_.try_emplace(std::string(key));
  std::vector<float>& residual = it->second;
  if (inserted) {
    residual.assign(grad.size(), 0.0f);
  } else if (residual.size() != grad.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", std::string(key), "' has ", grad.size(),
                                                   " elements but its residual has ",
                                                   residual.size()));
  }
  return codec_->EncodeWithFeedback(grad, std::span<float>(residual), shape, rng, out);
}

std::span<const float> ErrorFeedback::Residual(std::string_view key) const {
  auto it = residuals_.find(absl::string_view(key.data(), key.size()));
  if (it == residuals_.end()) return {};
  return it->second;
}

void ErrorFeedback::SetResidual(std::string_view key, std::span<const float> values) {
  residuals_[std::string(key)].assign(values.begin(), values.end());
}

std::vector<std::string> ErrorFeedback::Keys() const {
  std::vector<std::string> keys;
  keys.reserve(residuals_.size());
  for (const auto& [k, v] : residuals_) keys.push_back(k);
  std::sort(keys.begin(), keys.end());
  return keys;
}

}  // namespace qtrain::compression
