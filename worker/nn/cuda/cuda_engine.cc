#include "worker/nn/cuda/cuda_engine.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_util.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/timer.h"
#include "worker/kernels/cuda/optimizer.h"
#include "worker/kernels/cuda/softmax_xent.h"
#include "worker/nn/cuda/gpu_layers.h"

namespace qtrain::nn::cuda {
namespace {

namespace kc = ::qtrain::kernels::cuda;
using qtrain::cuda::DeviceArray;

// Pinned host memory of n elements of T.
template <typename T>
class PinnedArray {
 public:
  PinnedArray() = default;
  PinnedArray(const PinnedArray&) = delete;
  PinnedArray& operator=(const PinnedArray&) = delete;
  ~PinnedArray() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }
  absl::Status Allocate(size_t n) {
    void* p = nullptr;
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMallocHost(&p, std::max<size_t>(n, 1) * sizeof(T)));
    data_ = static_cast<T*>(p);
    size_ = n;
    return absl::OkStatus();
  }
  T* data() { return data_; }
  size_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

int DeviceFromEnvironment() {
  for (const char* var : {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"}) {
    const char* v = std::getenv(var);
    int device = 0;
    if (v != nullptr && absl::SimpleAtoi(v, &device) && device >= 0) return device;
  }
  return 0;
}

// A captured step segment.
class Graph {
 public:
  Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
  }
  bool ready() const { return exec_ != nullptr; }
  absl::Status Begin(cudaStream_t stream) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    return absl::OkStatus();
  }
  // Ends the capture begun on `stream`; `body` is the status of what was enqueued meanwhile.
  absl::Status End(cudaStream_t stream, absl::Status body) {
    cudaGraph_t g = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream, &g);
    if (!body.ok()) {
      if (g != nullptr) cudaGraphDestroy(g);
      return body;
    }
    QTRAIN_CUDA_RETURN_IF_ERROR(end);
    graph_ = g;
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaGraphInstantiate(&exec_, graph_, 0));
    return absl::OkStatus();
  }
  absl::Status Launch(cudaStream_t stream) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec_, stream));
    return absl::OkStatus();
  }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

class CudaEngine : public train::StepEngine {
 public:
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Create(const train::StepEngineInputs& in,
                                                            const CudaEngineOptions& options);

  std::string Describe() const override { return describe_; }
  absl::Status PushState() override { return state_->Push(&in_.sgd->momentum(), stream_.get()); }
  absl::Status PullState() override { return state_->Pull(&in_.sgd->momentum(), stream_.get()); }

  absl::StatusOr<kernels::SoftmaxXentResult> TrainStep(const Tensor& x,
                                                       std::span<const int32_t> labels, float lr,
                                                       comm::StepStats* stats,
                                                       double* wait_seconds) override;
  absl::StatusOr<kernels::SoftmaxXentResult> EvalBatch(const Tensor& x,
                                                       std::span<const int32_t> labels) override;

 private:
  explicit CudaEngine(const train::StepEngineInputs& in) : in_(in) {}

  struct Graphs {
    int eager_steps = 0;
    std::unique_ptr<Graph> front, back;  // [inputs, forward, loss, backward], [SGD, outputs]
  };

  absl::Status Stage(const Tensor& x, std::span<const int32_t> labels);
  // Enqueues copy-in, forward (train or eval), loss (with gradient in training) and backward.
  absl::Status EnqueueFront(int64_t m, Mode mode);
  absl::Status EnqueueBack();
  absl::Status AverageGradients(comm::StepStats* stats);
  absl::StatusOr<kernels::SoftmaxXentResult> Results(int64_t m);

  train::StepEngineInputs in_;
  std::string describe_;
  CudaEngineOptions options_;
  qtrain::cuda::Stream stream_;
  std::unique_ptr<DeviceState> state_;
  std::unique_ptr<GpuLayer> root_;
  DeviceArray<uint8_t> workspace_, xent_workspace_;
  DeviceArray<float> x_, dlogits_, lr_;
  DeviceArray<int32_t> labels_;
  DeviceArray<kc::SoftmaxXentDeviceResult> totals_;
  DeviceArray<kc::SgdTensor> sgd_tensors_;
  DeviceArray<kc::SgdChunk> sgd_chunks_;
  kc::SgdStepOptions sgd_step_;
  PinnedArray<float> host_x_, host_lr_, host_bucket_;
  PinnedArray<int32_t> host_labels_;
  PinnedArray<kc::SoftmaxXentDeviceResult> host_totals_;
  int64_t sample_elements_ = 0;
  int64_t classes_ = 0;
  absl::flat_hash_map<int64_t, Graphs> graphs_;  // by batch size
};

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Create(const train::StepEngineInputs& in,
                                                               const CudaEngineOptions& options) {
  if (qtrain::cuda::DeviceCount() == 0) {
    return absl::FailedPreconditionError(
        "--device=cuda: no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)");
  }
  if (in.model == nullptr || in.sgd == nullptr || in.comm == nullptr || in.input_chw.size() != 3 ||
      in.num_classes < 1 || in.max_batch < 1) {
    return absl::InvalidArgumentError("CudaEngine: incomplete StepEngineInputs");
  }
  auto e = std::unique_ptr<CudaEngine>(new CudaEngine(in));
  e->options_ = options;
  const int device = options.device >= 0 ? options.device : DeviceFromEnvironment();
  if (device >= qtrain::cuda::DeviceCount()) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA device ", device, " requested but only ",
                                                   qtrain::cuda::DeviceCount(), " visible"));
  }
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  ASSIGN_OR_RETURN(std::string name, qtrain::cuda::DeviceName(device));
  ASSIGN_OR_RETURN(e->stream_, qtrain::cuda::Stream::Create());

  // Parameter storage with each gradient bucket contiguous.
  std::vector<DeviceState::BucketRange> ranges;
  std::vector<std::vector<std::pair<size_t, int64_t>>> members;
  int64_t at = 0;
  for (const train::GradientBucket& b : in.buckets) {
    ranges.push_back({b.key, at, b.elements});
    std::vector<std::pair<size_t, int64_t>> m;
    for (size_t k = 0; k < b.params.size(); ++k) m.push_back({b.params[k], b.offsets[k]});
    members.push_back(std::move(m));
    at += b.elements;
  }
  ASSIGN_OR_RETURN(e->state_, DeviceState::Create(in.params, in.buffers, ranges, members));
  ASSIGN_OR_RETURN(e->root_, CompileLayer(in.model, e->state_.get()));
  Planner planner;
  const Shape max_input = {in.max_batch, in.input_chw[0], in.input_chw[1], in.input_chw[2]};
  ASSIGN_OR_RETURN(Shape out, e->root_->Plan(max_input, &planner));
  if (out.size() != 2 || out[1] != in.num_classes) {
    return absl::InvalidArgumentError(absl::StrCat("CudaEngine: the model's output is ",
                                                   ShapeToString(out), ", expected [N,",
                                                   in.num_classes, "]"));
  }
  e->classes_ = in.num_classes;
  e->sample_elements_ = in.input_chw[0] * in.input_chw[1] * in.input_chw[2];
  const size_t max_x = static_cast<size_t>(in.max_batch * e->sample_elements_);
  ASSIGN_OR_RETURN(e->workspace_, DeviceArray<uint8_t>::Create(planner.workspace_bytes));
  ASSIGN_OR_RETURN(e->x_, DeviceArray<float>::Create(max_x));
  ASSIGN_OR_RETURN(e->dlogits_,
                   DeviceArray<float>::Create(static_cast<size_t>(in.max_batch * e->classes_)));
  ASSIGN_OR_RETURN(e->labels_, DeviceArray<int32_t>::Create(static_cast<size_t>(in.max_batch)));
  ASSIGN_OR_RETURN(e->lr_, DeviceArray<float>::Create(1));
  ASSIGN_OR_RETURN(e->totals_, DeviceArray<kc::SoftmaxXentDeviceResult>::Create(1));
  ASSIGN_OR_RETURN(e->xent_workspace_,
                   DeviceArray<uint8_t>::Create(kc::SoftmaxXentWorkspaceBytes(in.max_batch)));
  RETURN_IF_ERROR(e->host_x_.Allocate(max_x));
  RETURN_IF_ERROR(e->host_labels_.Allocate(static_cast<size_t>(in.max_batch)));
  RETURN_IF_ERROR(e->host_lr_.Allocate(1));
  RETURN_IF_ERROR(e->host_totals_.Allocate(1));
  int64_t largest_bucket = 0;
  for (const auto& r : ranges) largest_bucket = std::max(largest_bucket, r.elements);
  if (!in.comm->SupportsDeviceBuffers()) {
    RETURN_IF_ERROR(e->host_bucket_.Allocate(static_cast<size_t>(largest_bucket)));
  }

  // The optimizer's tensor list, in parameter order.
  std::vector<kc::SgdTensor> tensors;
  for (size_t i = 0; i < in.params.size(); ++i) {
    const Parameter* p = in.params[i];
    kc::SgdTensor t;
    t.param = e->state_->value(p);
    t.grad = e->state_->grad(p);
    t.momentum = e->state_->momentum(i);
    t.size = p->value.size();
    t.lr_scale = p->lr_scale;
    t.group_lr_scale =
        p->kind == ParamKind::kQuantizer ? in.sgd_options.quantizer_lr_scale : 1.0f;
    t.weight_decay = p->kind == ParamKind::kWeight ? in.sgd_options.weight_decay : 0.0f;
    tensors.push_back(t);
  }
  e->sgd_step_.momentum = in.sgd_options.momentum;
  e->sgd_step_.nesterov = in.sgd_options.nesterov;
  RETURN_IF_ERROR(kc::ValidateSgdStepOptions(e->sgd_step_));
  ASSIGN_OR_RETURN(std::vector<kc::SgdChunk> chunks, kc::PlanSgdChunks(tensors));
  ASSIGN_OR_RETURN(e->sgd_tensors_, DeviceArray<kc::SgdTensor>::Create(tensors.size()));
  RETURN_IF_ERROR(e->sgd_tensors_.CopyFromHost(tensors));
  ASSIGN_OR_RETURN(e->sgd_chunks_, DeviceArray<kc::SgdChunk>::Create(chunks.size()));
  RETURN_IF_ERROR(e->sgd_chunks_.CopyFromHost(chunks));
  RETURN_IF_ERROR(e->PushState());
  e->describe_ = absl::StrCat("cuda device ", device, ": ", name, ", workspace ",
                              planner.workspace_bytes >> 20, " MiB, CUDA graphs ",
                              options.graphs ? "on" : "off");
  return e;
}

absl::Status CudaEngine::Stage(const Tensor& x, std::span<const int32_t> labels) {
  const int64_t m = x.dim(0);
  if (m < 1 || m > in_.max_batch || x.size() != m * sample_elements_ ||
      static_cast<int64_t>(labels.size()) != m) {
    return absl::InvalidArgumentError(absl::StrCat("CudaEngine: batch ", ShapeToString(x.shape()),
                                                   " with ", labels.size(),
                                                   " labels does not fit the plan"));
  }
  std::memcpy(host_x_.data(), x.data(), 4 * static_cast<size_t>(x.size()));
  std::memcpy(host_labels_.data(), labels.data(), 4 * labels.size());
  return absl::OkStatus();
}

absl::Status CudaEngine::EnqueueFront(int64_t m, Mode mode) {
  cudaStream_t s = stream_.get();
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(x_.data(), host_x_.data(),
                                              4 * static_cast<size_t>(m * sample_elements_),
                                              cudaMemcpyHostToDevice, s));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(labels_.data(), host_labels_.data(),
                                              4 * static_cast<size_t>(m), cudaMemcpyHostToDevice,
                                              s));
  GpuPass pass{CudaContext{s}, mode, workspace_.data(), workspace_.size()};
  DeviceTensor logits;
  RETURN_IF_ERROR(root_->Forward(
      pass, DeviceTensor{x_.data(), {m, in_.input_chw[0], in_.input_chw[1], in_.input_chw[2]}},
      &logits));
  const bool train = mode == Mode::kTrain;
  RETURN_IF_ERROR(kc::SoftmaxCrossEntropy(pass.ctx, m, classes_, logits.data, labels_.data(),
                                          train ? dlogits_.data() : nullptr, totals_.data(),
                                          xent_workspace_.data()));
  if (train) {
    RETURN_IF_ERROR(root_->Backward(pass, DeviceTensor{dlogits_.data(), {m, classes_}}, nullptr));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::EnqueueBack() {
  cudaStream_t s = stream_.get();
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(lr_.data(), host_lr_.data(), 4, cudaMemcpyHostToDevice, s));
  RETURN_IF_ERROR(kc::SgdStepMultiTensor(CudaContext{s}, sgd_step_, lr_.data(),
                                         sgd_tensors_.data(), sgd_chunks_.data(),
                                         static_cast<int64_t>(sgd_chunks_.size())));
  return absl::OkStatus();
}

absl::Status CudaEngine::AverageGradients(comm::StepStats* stats) {
  comm::Communicator* comm = in_.comm;
  if (comm->IsIdentity()) return absl::OkStatus();
  cudaStream_t s = stream_.get();
  for (const DeviceState::BucketRange& b : state_->buckets()) {
    float* d = state_->grads() + b.offset;
    if (comm->SupportsDeviceBuffers()) {
      RETURN_IF_ERROR(comm->AllReduceMeanDevice(b.key, d, static_cast<size_t>(b.elements), s,
                                                stats));
      continue;
    }
    const size_t bytes = 4 * static_cast<size_t>(b.elements);
    QTRAIN_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host_bucket_.data(), d, bytes, cudaMemcpyDeviceToHost, s));
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    RETURN_IF_ERROR(comm->AllReduceMean(
        b.key, std::span<float>(host_bucket_.data(), static_cast<size_t>(b.elements)), stats));
    QTRAIN_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(d, host_bucket_.data(), bytes, cudaMemcpyHostToDevice, s));
  }
  return absl::OkStatus();
}

absl::StatusOr<kernels::SoftmaxXentResult> CudaEngine::Results(int64_t m) {
  cudaStream_t s = stream_.get();
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_totals_.data(), totals_.data(),
                                              sizeof(kc::SoftmaxXentDeviceResult),
                                              cudaMemcpyDeviceToHost, s));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  (void)m;
  return kc::SoftmaxXentResultFromDevice(*host_totals_.data(), classes_);
}

absl::StatusOr<kernels::SoftmaxXentResult> CudaEngine::TrainStep(const Tensor& x,
                                                                 std::span<const int32_t> labels,
                                                                 float lr, comm::StepStats* stats,
                                                                 double* wait_seconds) {
  RETURN_IF_ERROR(Stage(x, labels));
  *host_lr_.data() = lr;
  const int64_t m = x.dim(0);
  cudaStream_t s = stream_.get();
  Graphs& g = graphs_[m];
  if (options_.graphs && g.front == nullptr && g.eager_steps >= 1) {
    // Capture this step's two segments, then launch them below.
    g.front = std::make_unique<Graph>();
    RETURN_IF_ERROR(g.front->Begin(s));
    RETURN_IF_ERROR(g.front->End(s, EnqueueFront(m, Mode::kTrain)));
    g.back = std::make_unique<Graph>();
    RETURN_IF_ERROR(g.back->Begin(s));
    RETURN_IF_ERROR(g.back->End(s, EnqueueBack()));
  }
  if (g.front != nullptr) {
    RETURN_IF_ERROR(g.front->Launch(s));
  } else {
    RETURN_IF_ERROR(EnqueueFront(m, Mode::kTrain));
  }
  Timer wait;
  RETURN_IF_ERROR(AverageGradients(stats));
  if (!in_.comm->IsIdentity()) *wait_seconds += wait.Seconds();
  if (g.back != nullptr) {
    RETURN_IF_ERROR(g.back->Launch(s));
  } else {
    RETURN_IF_ERROR(EnqueueBack());
    ++g.eager_steps;
  }
  return Results(m);
}

absl::StatusOr<kernels::SoftmaxXentResult> CudaEngine::EvalBatch(const Tensor& x,
                                                                 std::span<const int32_t> labels) {
  RETURN_IF_ERROR(Stage(x, labels));
  RETURN_IF_ERROR(EnqueueFront(x.dim(0), Mode::kEval));
  return Results(x.dim(0));
}

}  // namespace

train::StepEngineFactory CudaEngineFactory(const CudaEngineOptions& options) {
  return [options](const train::StepEngineInputs& in)
             -> absl::StatusOr<std::unique_ptr<train::StepEngine>> {
    ASSIGN_OR_RETURN(std::unique_ptr<CudaEngine> e, CudaEngine::Create(in, options));
    return std::unique_ptr<train::StepEngine>(std::move(e));
  };
}

}  // namespace qtrain::nn::cuda
