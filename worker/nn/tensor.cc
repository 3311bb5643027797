#include "worker/nn/tensor.h"

#include <algorithm>
#include <cstring>

#include "common/logging.h"

namespace qtrain::nn {

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeToString(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Tensor::Tensor(Shape shape, std::initializer_list<float> values) {
  Resize(std::move(shape));
  QTRAIN_CHECK(static_cast<int64_t>(values.size()) == size_)
      << values.size() << " values for shape " << ShapeToString(shape_);
  std::copy(values.begin(), values.end(), data_.get());
}

Tensor::Tensor(const Tensor& other) { *this = other; }

Tensor& Tensor::operator=(const Tensor& other) {
  if (this == &other) return *this;
  Resize(other.shape_);
  if (size_ > 0) std::memcpy(data_.get(), other.data_.get(), sizeof(float) * size_);
  return *this;
}

void Tensor::Resize(Shape shape) {
  for (int64_t d : shape) QTRAIN_CHECK(d >= 0) << "negative dimension in " << ShapeToString(shape);
  const int64_t n = NumElements(shape);
  if (n > capacity_) {
    const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
    QTRAIN_CHECK(p != nullptr) << "out of memory for tensor " << ShapeToString(shape);
    data_.reset(p);
    capacity_ = static_cast<int64_t>(bytes / sizeof(float));
  }
  shape_ = std::move(shape);
  size_ = n;
}

void Tensor::Reshape(Shape shape) {
  QTRAIN_CHECK(NumElements(shape) == size_)
      << "reshape " << ShapeToString(shape_) << " -> " << ShapeToString(shape);
  shape_ = std::move(shape);
}

void Tensor::Fill(float value) { std::fill_n(data_.get(), size_, value); }

}  // namespace qtrain::nn
