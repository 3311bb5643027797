// A float32 tensor: a shape and 64-byte-aligned contiguous storage, row-major (NCHW for images).
//
// Thread-safety: a plain value; concurrent reads are fine, writes need external ordering.
// Cost: Resize reallocates only when the element count grows beyond the capacity.
#ifndef QTRAIN_WORKER_NN_TENSOR_H_
#define QTRAIN_WORKER_NN_TENSOR_H_

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace qtrain::nn {

using Shape = std::vector<int64_t>;

int64_t NumElements(const Shape& shape);
std::string ShapeToString(const Shape& shape);  // "[128,1,28,28]"

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(Shape shape) { Resize(std::move(shape)); Fill(0.0f); }
  Tensor(Shape shape, std::initializer_list<float> values);
  Tensor(const Tensor& other);
  Tensor& operator=(const Tensor& other);
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;

  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[static_cast<size_t>(i)]; }
  int64_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  std::span<float> span() { return {data_.get(), static_cast<size_t>(size_)}; }
  std::span<const float> span() const { return {data_.get(), static_cast<size_t>(size_)}; }
  float& operator[](int64_t i) { return data_.get()[i]; }
  float operator[](int64_t i) const { return data_.get()[i]; }

  // Changes the shape; contents are unspecified afterwards unless the size is unchanged.
  void Resize(Shape shape);
  // Same element count, new shape (e.g. flatten). Precondition: NumElements equal.
  void Reshape(Shape shape);
  void Fill(float value);

 private:
  struct FreeDeleter {
    void operator()(float* p) const { std::free(p); }
  };
  Shape shape_;
  int64_t size_ = 0;
  int64_t capacity_ = 0;
  std::unique_ptr<float[], FreeDeleter> data_;
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_TENSOR_H_
