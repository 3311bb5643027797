#include "worker/nn/cuda/gpu_layers.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace qtrain::nn::cuda {

absl::StatusOr<std::unique_ptr<DeviceState>> DeviceState::Create(
    const std::vector<Parameter*>& params, const std::vector<Buffer*>& buffers,
    const std::vector<BucketRange>& buckets,
    const std::vector<std::vector<std::pair<size_t, int64_t>>>& bucket_params) {
  auto s = std::unique_ptr<DeviceState>(new DeviceState());
  s->params_ = params;
  s->buffers_ = buffers;
  s->buckets_ = buckets;
  if (bucket_params.size() != buckets.size()) {
    return absl::InvalidArgumentError("DeviceState: bucket lists and ranges differ in count");
  }
  int64_t total = 0;
  s->value_offset_.resize(params.size());
  s->grad_offset_.assign(params.size(), -1);
  for (size_t i = 0; i < params.size(); ++i) {
    s->param_index_[params[i]] = i;
    s->value_offset_[i] = total;
    total += params[i]->value.size();
  }
  // Gradients: bucket by bucket, then whatever no bucket holds.
  int64_t at = 0;
  for (size_t b = 0; b < buckets.size(); ++b) {
    if (buckets[b].offset != at) {
      return absl::InvalidArgumentError(absl::StrCat("DeviceState: bucket ", buckets[b].key,
                                                     " does not start where the last ended"));
    }
    for (const auto& [index, offset] : bucket_params[b]) {
      if (index >= params.size() || s->grad_offset_[index] >= 0) {
        return absl::InvalidArgumentError("DeviceState: a parameter is in no or two buckets");
      }
      s->grad_offset_[index] = at + offset;
    }
    at += buckets[b].elements;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (s->grad_offset_[i] < 0) {
      s->grad_offset_[i] = at;
      at += params[i]->value.size();
    }
  }
  if (at != total) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceState: the buckets hold ", at,
                                                   " gradient elements, the parameters ", total));
  }
  int64_t buffer_total = 0;
  for (const Buffer* b : buffers) {
    s->buffer_offset_[b] = buffer_total;
    buffer_total += b->value.size();
  }
  ASSIGN_OR_RETURN(s->values_, qtrain::cuda::DeviceArray<float>::Create(total));
  ASSIGN_OR_RETURN(s->grads_, qtrain::cuda::DeviceArray<float>::Create(total));
  ASSIGN_OR_RETURN(s->momentum_, qtrain::cuda::DeviceArray<float>::Create(total));
  ASSIGN_OR_RETURN(s->buffer_values_, qtrain::cuda::DeviceArray<float>::Create(buffer_total));
  if (total > 0) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemset(s->grads_.data(), 0, s->grads_.bytes()));
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemset(s->momentum_.data(), 0, s->momentum_.bytes()));
  }
  return s;
}

float* DeviceState::value(const Parameter* p) const {
  return const_cast<float*>(values_.data()) + value_offset_[param_index_.at(p)];
}
float* DeviceState::grad(const Parameter* p) const {
  return const_cast<float*>(grads_.data()) + grad_offset_[param_index_.at(p)];
}
float* DeviceState::momentum(size_t param_index) const {
  return const_cast<float*>(momentum_.data()) + value_offset_[param_index];
}
float* DeviceState::buffer(const Buffer* b) const {
  return const_cast<float*>(buffer_values_.data()) + buffer_offset_.at(b);
}

absl::Status DeviceState::Push(const std::vector<Tensor>* momentum, cudaStream_t stream) {
  if (momentum != nullptr && momentum->size() != params_.size()) {
    return absl::InvalidArgumentError("DeviceState::Push: one momentum tensor per parameter");
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& v = params_[i]->value;
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(values_.data() + value_offset_[i], v.data(),
                                                4 * v.size(), cudaMemcpyHostToDevice, stream));
    if (momentum != nullptr) {
      const Tensor& m = (*momentum)[i];
      QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(momentum_.data() + value_offset_[i], m.data(),
                                                  4 * m.size(), cudaMemcpyHostToDevice, stream));
    }
  }
  for (const Buffer* b : buffers_) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(buffer(b), b->value.data(), 4 * b->value.size(),
                                                cudaMemcpyHostToDevice, stream));
  }
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status DeviceState::Pull(std::vector<Tensor>* momentum, cudaStream_t stream) {
  if (momentum != nullptr && momentum->size() != params_.size()) {
    return absl::InvalidArgumentError("DeviceState::Pull: one momentum tensor per parameter");
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor& v = params_[i]->value;
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(v.data(), values_.data() + value_offset_[i],
                                                4 * v.size(), cudaMemcpyDeviceToHost, stream));
    if (momentum != nullptr) {
      Tensor& m = (*momentum)[i];
      QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.data(), momentum_.data() + value_offset_[i],
                                                  4 * m.size(), cudaMemcpyDeviceToHost, stream));
    }
  }
  for (Buffer* b : buffers_) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(b->value.data(), buffer(b), 4 * b->value.size(),
                                                cudaMemcpyDeviceToHost, stream));
  }
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

}  // namespace qtrain::nn::cuda
