// The GPU twin of an nn::Layer tree: CompileLayer walks a host model (Sequential, Conv2d, Linear,
// BatchNorm2d, Relu, MaxPool2d, Flatten, GlobalAvgPool, Residual, ScalarLayer, and the quantized layers and
// activation quantizers of worker/quant) and builds one GpuLayer per layer that runs the same math
// with the CUDA kernels (worker/kernels/cuda/) on device copies of the parameters (DeviceState).
//
// Memory is planned once: Plan(max_input) allocates every activation and gradient buffer for the
// largest batch the engine will see, so a step allocates nothing and can be captured in a CUDA
// graph. A GpuLayer's output lives in its own buffer until its next Forward; Backward reads the
// input pointer its Forward was given, so the caller keeps that input alive and unchanged.
//
// Parameter gradients are overwritten by Backward (as on the CPU). Thread-safety: one thread.
#ifndef QTRAIN_WORKER_NN_CUDA_GPU_LAYERS_H_
#define QTRAIN_WORKER_NN_CUDA_GPU_LAYERS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/cuda/cuda_util.h"
#include "worker/kernels/cuda/cuda_context.h"
#include "worker/nn/layer.h"

namespace qtrain::nn::cuda {

using kernels::cuda::CudaContext;

struct DeviceTensor {
  float* data = nullptr;
  Shape shape;
  int64_t size() const { return NumElements(shape); }
};

// Device copies of a host model's parameters (value, grad, momentum) and buffers. Gradients are
// laid out so that each gradient bucket of the plan is one contiguous range (bucket i starts at
// bucket_offset(i)), which lets a communicator average a bucket in place.
class DeviceState {
 public:
  struct BucketRange {
    std::string key;
    int64_t offset = 0;    // into grads()
    int64_t elements = 0;
  };
  // `bucket_params` lists, per bucket, indices into `params` in the bucket's order with their
  // offsets inside the bucket (train::GradientBucket's params/offsets); parameters in no bucket
  // follow the buckets.
  static absl::StatusOr<std::unique_ptr<DeviceState>> Create(
      const std::vector<Parameter*>& params, const std::vector<Buffer*>& buffers,
      const std::vector<BucketRange>& buckets,
      const std::vector<std::vector<std::pair<size_t, int64_t>>>& bucket_params);

  float* value(const Parameter* p) const;
  float* grad(const Parameter* p) const;
  float* momentum(size_t param_index) const;
  float* buffer(const Buffer* b) const;
  float* grads() { return grads_.data(); }
  const std::vector<BucketRange>& buckets() const { return buckets_; }
  const std::vector<Parameter*>& params() const { return params_; }

  // Host -> device (values, buffers, and momentum when given) and back, synchronously on `stream`.
  absl::Status Push(const std::vector<Tensor>* momentum, cudaStream_t stream);
  absl::Status Pull(std::vector<Tensor>* momentum, cudaStream_t stream);

 private:
  std::vector<Parameter*> params_;
  std::vector<Buffer*> buffers_;
  std::vector<BucketRange> buckets_;
  absl::flat_hash_map<const Parameter*, size_t> param_index_;
  absl::flat_hash_map<const Buffer*, int64_t> buffer_offset_;
  std::vector<int64_t> value_offset_, grad_offset_;
  qtrain::cuda::DeviceArray<float> values_, grads_, momentum_, buffer_values_;
};

struct GpuPass {
  CudaContext ctx;
  Mode mode = Mode::kTrain;
  void* workspace = nullptr;  // shared scratch, at least Planner::workspace_bytes
  uint64_t workspace_bytes = 0;
};

struct Planner {
  uint64_t workspace_bytes = 0;  // the most any layer asked for
};

class GpuLayer {
 public:
  explicit GpuLayer(std::string name) : name_(std::move(name)) {}
  virtual ~GpuLayer() = default;
  const std::string& name() const { return name_; }

  // Allocates buffers for inputs up to `max_input` (dim 0 = the largest batch); returns the output
  // shape at that input.
  virtual absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) = 0;
  virtual absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) = 0;
  // dx may be null (the first layer needs no input gradient).
  virtual absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) = 0;

 private:
  std::string name_;
};

// UNIMPLEMENTED naming the layer (its name and Describe()) when a layer type has no GPU twin.
absl::StatusOr<std::unique_ptr<GpuLayer>> CompileLayer(Layer* layer, DeviceState* state);

// The twin of an nn::Sequential, with guided training's taps (train/guided.h's TapRunner on the
// GPU): after Forward the output of each tapped child is readable, and during Backward a gradient
// the caller wrote into that tap's buffer is added to the gradient reaching that child's output.
class GpuSequential : public GpuLayer {
 public:
  GpuSequential(std::string name, std::vector<std::unique_ptr<GpuLayer>> children)
      : GpuLayer(std::move(name)), children_(std::move(children)) {}

  // Before Plan. INVALID_ARGUMENT naming the children when a name is not a direct child before
  // the last one, or is named twice.
  absl::Status SetTaps(const std::vector<std::string>& names);
  // Tap k's output of the last Forward (the child's own buffer).
  const DeviceTensor& tap(int k) const { return tap_out_[static_cast<size_t>(k)]; }
  // Tap k's extra gradient: a device buffer of the tap's size at the planned batch (Plan allocates
  // it), added during every Backward, so the caller rewrites it before each one.
  float* tap_grad(int k) { return tap_grad_[static_cast<size_t>(k)].data(); }
  // Tap k's shape at the planned (largest) input, after Plan.
  const Shape& planned_tap_shape(int k) const { return tap_plan_[static_cast<size_t>(k)]; }

  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) override;
  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override;
  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override;

 private:
  std::vector<std::unique_ptr<GpuLayer>> children_;
  qtrain::cuda::DeviceArray<float> grad_[3];  // ping-pong gradients between children; tap sums
  std::vector<int> tap_of_child_;             // per child: tap index or -1 (empty: no taps)
  std::vector<DeviceTensor> tap_out_;
  std::vector<Shape> tap_plan_;
  std::vector<qtrain::cuda::DeviceArray<float>> tap_grad_;
};

}  // namespace qtrain::nn::cuda

#endif  // QTRAIN_WORKER_NN_CUDA_GPU_LAYERS_H_
